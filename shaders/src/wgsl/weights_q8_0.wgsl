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

// Dot product of unit `unit` with the matching slice of x (row-per-thread kernels): the scale
// is applied once per block, not per value.
fn w_dot(
    unit: u32,
    q_offset: u32,
    xv: array<vec4<f32>, UNIT_V4>,
    xs: array<vec4<f32>, UNIT_V4>,  // x_prep(xv)
) -> f32 {
    let d = half2(w[unit / 8u][(unit / 2u) % 4u])[unit % 2u];
    let a = w[q_offset + unit * 2u];
    let b = w[q_offset + unit * 2u + 1u];
    let s = (dot(i8x4(a.x), xv[0]) + dot(i8x4(a.y), xv[1]))
        + (dot(i8x4(a.z), xv[2]) + dot(i8x4(a.w), xv[3]))
        + (dot(i8x4(b.x), xv[4]) + dot(i8x4(b.y), xv[5]))
        + (dot(i8x4(b.z), xv[6]) + dot(i8x4(b.w), xv[7]));
    return d * s;
}

// Dot product of a decoded unit with the matching slice of x (constant indices only).
fn unit_dot(wv: array<vec4<f32>, UNIT_V4>, xv: array<vec4<f32>, UNIT_V4>) -> f32 {
    return ((dot(wv[0], xv[0]) + dot(wv[1], xv[1])) + (dot(wv[2], xv[2]) + dot(wv[3], xv[3])))
        + ((dot(wv[4], xv[4]) + dot(wv[5], xv[5])) + (dot(wv[6], xv[6]) + dot(wv[7], xv[7])));
}

// x as w_dot wants it (unchanged for this format); computed once per unit, shared by rows.
fn x_prep(xv: array<vec4<f32>, UNIT_V4>) -> array<vec4<f32>, UNIT_V4> {
    return xv;
}
