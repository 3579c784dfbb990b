// Weight format Q8_0, repacked for 4-byte-aligned reads (structure of arrays, per part):
//   words [0, q_offset*4): the f16 scale `d` of every block, two per u32 (block 2i in the low
//                          half), zero-padded to a whole vec4<u32>;
//   vec4s [q_offset, ..):  the 32 signed bytes of every block, 8 u32 = 2 vec4<u32> per block,
//                          byte j of the block in byte j%4 (little end first) of u32 j/4.
// Blocks run row by row: block b of row r is unit r*(cols/32) + b. value j = d * q[j].
const UNIT: u32 = 32u;
const UNIT_V4: u32 = 8u;

// Sign-extends the four bytes of `p` (byte 0 first).
fn i8x4(p: u32) -> vec4<f32> {
    let shifted = vec4<u32>(p) << vec4<u32>(24u, 16u, 8u, 0u);
    return vec4<f32>(bitcast<vec4<i32>>(shifted) >> vec4<u32>(24u));
}

fn w_decode(unit: u32, q_offset: u32) -> array<vec4<f32>, UNIT_V4> {
    let d = half2(w[unit / 8u][(unit / 2u) % 4u])[unit % 2u];
    let a = w[q_offset + unit * 2u];
    let b = w[q_offset + unit * 2u + 1u];
    return array<vec4<f32>, UNIT_V4>(
        d * i8x4(a.x), d * i8x4(a.y), d * i8x4(a.z), d * i8x4(a.w),
        d * i8x4(b.x), d * i8x4(b.y), d * i8x4(b.z), d * i8x4(b.w),
    );
}
