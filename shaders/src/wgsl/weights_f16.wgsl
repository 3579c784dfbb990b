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
