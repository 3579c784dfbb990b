// Weight format Q4_0, repacked for 4-byte-aligned reads (structure of arrays, per part):
//   words [0, q_offset*4): the f16 scale `d` of every block, two per u32 (block 2i in the low
//                          half), zero-padded to a whole vec4<u32>;
//   vec4s [q_offset, ..):  the 16 nibble bytes of every block as one vec4<u32>, byte j of the
//                          block in byte j%4 of component j/4 (the GGML bytes unchanged).
// Value j (0..16) is (low nibble of byte j - 8) * d, value j+16 is (high nibble - 8) * d.
const UNIT: u32 = 32u;
const UNIT_V4: u32 = 8u;

fn lo_nibbles(p: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(p) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
}

fn hi_nibbles(p: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(p) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));
}

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let d = half2(w[unit / 8u][(unit / 2u) % 4u])[unit % 2u];
    let q = w[q_offset + unit];
    let o = vec4<f32>(-8.0);
    return array<vec4<f32>, UNIT_V4>(
        d * (lo_nibbles(q.x) + o), d * (lo_nibbles(q.y) + o),
        d * (lo_nibbles(q.z) + o), d * (lo_nibbles(q.w) + o),
        d * (hi_nibbles(q.x) + o), d * (hi_nibbles(q.y) + o),
        d * (hi_nibbles(q.z) + o), d * (hi_nibbles(q.w) + o),
    );
}
