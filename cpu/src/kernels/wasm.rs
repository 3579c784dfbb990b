//! wasm32 `simd128` primitives for the shared kernels: 4 lanes, a block is 8 vectors. The
//! module exists only when the crate is built with `-C target-feature=+simd128` (wasm has no
//! run-time detection: a module either validates with SIMD or not at all). Plain simd128 has
//! no fused multiply-add, so `fma` is a multiply and an add.

// Register tiles and blocks are clearer with explicit indices.
#![allow(clippy::needless_range_loop)]

use std::arch::wasm32::*;

type V = v128;
const LANES: usize = 4;
const NB: usize = 8;
const NACC: usize = 2;
const GEMM_MIN: usize = 16;
const PANEL_R: usize = 2;
const PANEL_T: usize = 4;
// Three and four tokens: two rows sharing each activation load, one accumulator per row and
// token (V8: four tokens 28–37 → 22–26 ns per row and block for Q4_1 and Q8_0 rows).
const FUSED_R: [usize; 4] = [2, 1, 2, 2];
const FUSED_A: [usize; 4] = [2, 2, 1, 1];
// One token: the stored-integer kernel (no FMA here, so each multiply saved is two
// instructions), two rows at a time: Q4_1 1 536 × 576 in V8 (Node 20, x86_64 host) 11.5 → 9.4 ns
// per row and block; one, three or four rows measured 10.2, 10.1–11.0 and 9.8–10.1.
const RAW_T1: bool = true;
const RAW_R: usize = 2;

#[inline]
unsafe fn zero() -> V {
    f32x4_splat(0.0)
}
#[inline]
unsafe fn splat(v: f32) -> V {
    f32x4_splat(v)
}
#[inline]
unsafe fn fma(a: V, b: V, c: V) -> V {
    f32x4_add(f32x4_mul(a, b), c)
}
#[inline]
unsafe fn add(a: V, b: V) -> V {
    f32x4_add(a, b)
}
#[inline]
unsafe fn mul(a: V, b: V) -> V {
    f32x4_mul(a, b)
}
#[inline]
unsafe fn loadu(p: *const f32) -> V {
    v128_load(p.cast())
}
#[inline]
unsafe fn storeu(p: *mut f32, v: V) {
    v128_store(p.cast(), v)
}
#[inline]
unsafe fn prefetch(_: *const u8) {}
#[inline]
unsafe fn hsum(v: V) -> f32 {
    (f32x4_extract_lane::<0>(v) + f32x4_extract_lane::<1>(v))
        + (f32x4_extract_lane::<2>(v) + f32x4_extract_lane::<3>(v))
}
/// Four halves (the low u16 lanes of `h`) to f32: see [`super::f16_to_f32`].
#[inline]
unsafe fn hsum4(v: [V; 4]) -> [f32; 4] {
    [hsum(v[0]), hsum(v[1]), hsum(v[2]), hsum(v[3])]
}
#[inline]
unsafe fn f16x4(h: v128) -> V {
    let w = u32x4_extend_low_u16x8(h);
    let sign = i32x4_shl(v128_and(w, u32x4_splat(0x8000)), 16);
    let mag = i32x4_shl(v128_and(w, u32x4_splat(0x7fff)), 13);
    let f = f32x4_mul(mag, f32x4_splat(f32::from_bits((127 + 112) << 23)));
    let exp = v128_and(w, u32x4_splat(0x7c00));
    let inf_nan = v128_and(u32x4_eq(exp, u32x4_splat(0x7c00)), u32x4_splat(0x7f80_0000));
    v128_or(v128_or(f, inf_nan), sign)
}
/// 16 unsigned bytes → four vectors of f32.
#[inline]
unsafe fn widen_u8(v: v128) -> [V; 4] {
    let lo = u16x8_extend_low_u8x16(v);
    let hi = u16x8_extend_high_u8x16(v);
    [
        f32x4_convert_u32x4(u32x4_extend_low_u16x8(lo)),
        f32x4_convert_u32x4(u32x4_extend_high_u16x8(lo)),
        f32x4_convert_u32x4(u32x4_extend_low_u16x8(hi)),
        f32x4_convert_u32x4(u32x4_extend_high_u16x8(hi)),
    ]
}
/// 16 signed bytes → four vectors of f32.
#[inline]
unsafe fn widen_i8(v: v128) -> [V; 4] {
    let lo = i16x8_extend_low_i8x16(v);
    let hi = i16x8_extend_high_i8x16(v);
    [
        f32x4_convert_i32x4(i32x4_extend_low_i16x8(lo)),
        f32x4_convert_i32x4(i32x4_extend_high_i16x8(lo)),
        f32x4_convert_i32x4(i32x4_extend_low_i16x8(hi)),
        f32x4_convert_i32x4(i32x4_extend_high_i16x8(hi)),
    ]
}
/// 16 nibble bytes → values 0..16 (low nibbles) then 16..32 (high nibbles).
#[inline]
unsafe fn nibbles(p: *const u8) -> [V; NB] {
    let v = v128_load(p.cast());
    let lo = widen_u8(v128_and(v, u8x16_splat(15)));
    let hi = widen_u8(u8x16_shr(v, 4));
    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
}
#[inline]
unsafe fn blk_f32(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        out[i] = v128_load(p.add(16 * i).cast());
    }
    out
}
#[inline]
unsafe fn blk_f16(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        out[i] = f16x4(v128_load64_zero(p.add(8 * i).cast()));
    }
    out
}
#[inline]
unsafe fn blk_bf16(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        let w = u32x4_extend_low_u16x8(v128_load64_zero(p.add(8 * i).cast()));
        out[i] = i32x4_shl(w, 16);
    }
    out
}
#[inline]
unsafe fn scales_q8_0(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 34, n, false)
}
#[inline]
unsafe fn scales_q4_0(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 18, n, false)
}
#[inline]
unsafe fn scales_q4_1(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 20, n, true)
}
#[inline]
unsafe fn raw_q4(q: *const u8) -> [V; NB] {
    nibbles(q)
}
#[inline]
unsafe fn blk_q8_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    let d = splat(s.d[j]);
    let a = widen_i8(v128_load(p.add(2).cast()));
    let b = widen_i8(v128_load(p.add(18).cast()));
    let mut out = [zero(); NB];
    for i in 0..4 {
        out[i] = f32x4_mul(a[i], d);
        out[i + 4] = f32x4_mul(b[i], d);
    }
    out
}
#[inline]
unsafe fn blk_q4_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    let d = splat(s.d[j]);
    let mut q = nibbles(p.add(2));
    for v in q.iter_mut() {
        // Without FMA, (q − 8)·d exactly as the scalar path computes it.
        *v = f32x4_mul(f32x4_add(*v, splat(-8.0)), d);
    }
    q
}
#[inline]
unsafe fn blk_q4_1(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    let (d, m) = (splat(s.d[j]), splat(s.o[j]));
    let mut q = nibbles(p.add(4));
    for v in q.iter_mut() {
        *v = fma(*v, d, m);
    }
    q
}

super::simd_kernels!();
