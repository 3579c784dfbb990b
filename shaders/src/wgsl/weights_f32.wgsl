// Weight format F32: row-major f32 values, 8 per unit (two vec4 loads).
// Requires cols % 8 == 0. `q_offset` is unused (there are no scales).
const UNIT: u32 = 8u;
const UNIT_V4: u32 = 2u;

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let i = unit * 2u;
    return array<vec4<f32>, UNIT_V4>(bitcast<vec4<f32>>(w[i]), bitcast<vec4<f32>>(w[i + 1u]));
}
