// Weight format F32: row-major f32 values, 8 per unit (two vec4 loads).
// Requires cols % 8 == 0. `q_offset` is unused (there are no scales).
const UNIT: u32 = 8u;
const UNIT_V4: u32 = 2u;

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let i = unit * 2u;
    return array<vec4<f32>, UNIT_V4>(bitcast<vec4<f32>>(w[i]), bitcast<vec4<f32>>(w[i + 1u]));
}

// Dot product of unit `unit` with the matching slice of x (row-per-thread kernels).
fn w_dot(
    unit: u32,
    q_offset: u32,
    xv: array<vec4<f32>, UNIT_V4>,
    xs: array<vec4<f32>, UNIT_V4>,  // x_prep(xv)
) -> f32 {
    let i = unit * 2u;
    return dot(bitcast<vec4<f32>>(w[i]), xv[0]) + dot(bitcast<vec4<f32>>(w[i + 1u]), xv[1]);
}

// Dot product of a decoded unit with the matching slice of x (constant indices only).
fn unit_dot(wv: array<vec4<f32>, UNIT_V4>, xv: array<vec4<f32>, UNIT_V4>) -> f32 {
    return dot(wv[0], xv[0]) + dot(wv[1], xv[1]);
}

// x as w_dot wants it (unchanged for this format); computed once per unit, shared by rows.
fn x_prep(xv: array<vec4<f32>, UNIT_V4>) -> array<vec4<f32>, UNIT_V4> {
    return xv;
}
