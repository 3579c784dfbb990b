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

// Dot product of unit `unit` with the matching slice of x (row-per-thread kernels):
// d·(Σ q_j x_j − 8·Σ x_j), the scale and offset applied once per block.
fn w_dot(
    unit: u32,
    q_offset: u32,
    xv: array<vec4<f32>, UNIT_V4>,
    xs: array<vec4<f32>, UNIT_V4>,  // x_prep(xv)
) -> f32 {
    let d = half2(w[unit / 8u][(unit / 2u) % 4u])[unit % 2u];
    let q = w[q_offset + unit];
    let s = (dot(nib_scaled(q.x), xs[0]) + dot(nib_scaled(q.y), xs[1]))
        + (dot(nib_scaled(q.z), xs[2]) + dot(nib_scaled(q.w), xs[3]))
        + (dot(nib_scaled(q.x >> 4u), xs[4]) + dot(nib_scaled(q.y >> 4u), xs[5]))
        + (dot(nib_scaled(q.z >> 4u), xs[6]) + dot(nib_scaled(q.w >> 4u), xs[7]));
    let sx = ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
    return d * (s - 8.0 * (sx.x + sx.y + sx.z + sx.w));
}

// Dot product of a decoded unit with the matching slice of x (constant indices only).
fn unit_dot(wv: array<vec4<f32>, UNIT_V4>, xv: array<vec4<f32>, UNIT_V4>) -> f32 {
    return ((dot(wv[0], xv[0]) + dot(wv[1], xv[1])) + (dot(wv[2], xv[2]) + dot(wv[3], xv[3])))
        + ((dot(wv[4], xv[4]) + dot(wv[5], xv[5])) + (dot(wv[6], xv[6]) + dot(wv[7], xv[7])));
}

// Nibble positions for w_dot: value j of word c sits at bits 8(j%4) (low nibbles) and, after a
// shift by 4, the same bits (high nibbles). Masking without shifting leaves n·256^k, which
// x_prep's scaling by 256^-k cancels exactly (powers of two), saving three shifts per word.
const NIB_MASK: vec4<u32> = vec4<u32>(0xfu, 0xf00u, 0xf0000u, 0xf000000u);

fn nib_scaled(p: u32) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(p) & NIB_MASK));
}

// x scaled for nib_scaled: component k times 256^-k; computed once per unit, shared by rows.
fn x_prep(xv: array<vec4<f32>, UNIT_V4>) -> array<vec4<f32>, UNIT_V4> {
    let s = vec4<f32>(1.0, 0.00390625, 1.52587890625e-05, 5.9604644775390625e-08);
    return array<vec4<f32>, UNIT_V4>(
        xv[0] * s, xv[1] * s, xv[2] * s, xv[3] * s,
        xv[4] * s, xv[5] * s, xv[6] * s, xv[7] * s,
    );
}
