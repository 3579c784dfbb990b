// Weight format BF16: row-major bfloat16 values, two per u32 (low half first). A bfloat16 is
// the top half of an f32, so decoding is a shift. Requires cols % 8 == 0. `q_offset` is unused.
const UNIT: u32 = 8u;
const UNIT_V4: u32 = 2u;

fn bf16_pair(p: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(p << 16u), bitcast<f32>(p & 0xffff0000u));
}

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let p = w[unit];
    return array<vec4<f32>, UNIT_V4>(
        vec4<f32>(bf16_pair(p.x), bf16_pair(p.y)),
        vec4<f32>(bf16_pair(p.z), bf16_pair(p.w)),
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
    return dot(vec4<f32>(bf16_pair(p.x), bf16_pair(p.y)), xv[0])
        + dot(vec4<f32>(bf16_pair(p.z), bf16_pair(p.w)), xv[1]);
}

// Dot product of a decoded unit with the matching slice of x (constant indices only).
fn unit_dot(wv: array<vec4<f32>, UNIT_V4>, xv: array<vec4<f32>, UNIT_V4>) -> f32 {
    return dot(wv[0], xv[0]) + dot(wv[1], xv[1]);
}

// x as w_dot wants it (unchanged for this format); computed once per unit, shared by rows.
fn x_prep(xv: array<vec4<f32>, UNIT_V4>) -> array<vec4<f32>, UNIT_V4> {
    return xv;
}
