// Weight format F16: row-major IEEE half values, two per u32 (low half first), so one vec4<u32>
// holds a unit of 8. Decoded with integer operations (half2), needing no f16 support.
// Requires cols % 8 == 0. `q_offset` is unused.
const UNIT: u32 = 8u;
const UNIT_V4: u32 = 2u;

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let p = w[unit];
    return array<vec4<f32>, UNIT_V4>(
        vec4<f32>(half2(p.x), half2(p.y)),
        vec4<f32>(half2(p.z), half2(p.w)),
    );
}

// Dot product of unit `unit` with the matching slice of x (row-per-thread kernels).
fn w_dot(
    unit: u32,
    q_offset: u32,
    xv: array<vec4<f32>, UNIT_V4>,
    xs: array<vec4<f32>, UNIT_V4>,  // x_prep(xv)
) -> f32 {
    let p = w[unit];
    return dot(vec4<f32>(half2(p.x), half2(p.y)), xv[0])
        + dot(vec4<f32>(half2(p.z), half2(p.w)), xv[1]);
}

// Dot product of a decoded unit with the matching slice of x (constant indices only).
fn unit_dot(wv: array<vec4<f32>, UNIT_V4>, xv: array<vec4<f32>, UNIT_V4>) -> f32 {
    return dot(wv[0], xv[0]) + dot(wv[1], xv[1]);
}

// x as w_dot wants it (unchanged for this format); computed once per unit, shared by rows.
fn x_prep(xv: array<vec4<f32>, UNIT_V4>) -> array<vec4<f32>, UNIT_V4> {
    return xv;
}
