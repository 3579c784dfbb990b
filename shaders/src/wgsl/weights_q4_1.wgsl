// Weight format Q4_1, repacked for coalesced reads (structure of arrays, per part):
//   words [0, q_offset*4): per block one u32 holding f16 `d` (low half) and f16 `m` (high
//                          half), zero-padded to a whole vec4<u32>;
//   vec4s [q_offset, ..):  the 16 nibble bytes of every block as one vec4<u32>, byte j of the
//                          block in byte j%4 of component j/4 (the GGML bytes unchanged).
// Value j (0..16) is (low nibble of byte j) * d + m, value j+16 is (high nibble) * d + m.
const UNIT: u32 = 32u;
const UNIT_V4: u32 = 8u;

fn lo_nibbles(p: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(p) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(15u));
}

fn hi_nibbles(p: u32) -> vec4<f32> {
    return vec4<f32>((vec4<u32>(p) >> vec4<u32>(4u, 12u, 20u, 28u)) & vec4<u32>(15u));
}

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let dm = half2(w[unit / 4u][unit % 4u]);
    let q = w[q_offset + unit];
    let d = vec4<f32>(dm.x);
    let m = vec4<f32>(dm.y);
    return array<vec4<f32>, UNIT_V4>(
        fma(lo_nibbles(q.x), d, m), fma(lo_nibbles(q.y), d, m),
        fma(lo_nibbles(q.z), d, m), fma(lo_nibbles(q.w), d, m),
        fma(hi_nibbles(q.x), d, m), fma(hi_nibbles(q.y), d, m),
        fma(hi_nibbles(q.z), d, m), fma(hi_nibbles(q.w), d, m),
    );
}
