//! aarch64 Advanced SIMD primitives for the shared kernels: 4 lanes, a block is 8 vectors.
//! Stable Rust has no NEON half-precision type, so f16 values are widened with integer
//! operations (the same bit trick as [`super::f16_to_f32`]); loads go through byte vectors
//! because weights sit at any byte offset.

// Register tiles and blocks are clearer with explicit indices.
#![allow(clippy::needless_range_loop)]

use std::arch::aarch64::*;

type V = float32x4_t;
const LANES: usize = 4;
const NB: usize = 8;
const NACC: usize = 4;
const GEMM_MIN: usize = 16;
const PANEL_R: usize = 4;
const PANEL_T: usize = 4;
const FUSED_R: [usize; 4] = [2, 1, 1, 1];
const FUSED_A: [usize; 4] = [4, 2, 2, 2];
// The dequantizing kernel at one token too (the stored-integer one is unmeasured here).
const RAW_T1: bool = false;
const RAW_R: usize = 1;

#[inline]
#[target_feature(enable = "neon")]
unsafe fn zero() -> V {
    vdupq_n_f32(0.0)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn splat(v: f32) -> V {
    vdupq_n_f32(v)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma(a: V, b: V, c: V) -> V {
    vfmaq_f32(c, a, b)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn add(a: V, b: V) -> V {
    vaddq_f32(a, b)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn mul(a: V, b: V) -> V {
    vmulq_f32(a, b)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn loadu(p: *const f32) -> V {
    vld1q_f32(p)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn storeu(p: *mut f32, v: V) {
    vst1q_f32(p, v)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn prefetch(_: *const u8) {}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn hsum(v: V) -> f32 {
    vaddvq_f32(v)
}
/// Four halves (as u16) to f32: see [`super::f16_to_f32`].
/// Horizontal sums of four vectors at once: two rounds of pairwise adds.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn hsum4(v: [V; 4]) -> [f32; 4] {
    let s = vpaddq_f32(vpaddq_f32(v[0], v[1]), vpaddq_f32(v[2], v[3]));
    let mut out = [0f32; 4];
    vst1q_f32(out.as_mut_ptr(), s);
    out
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn f16x4(h: uint16x4_t) -> V {
    let w = vmovl_u16(h);
    let sign = vshlq_n_u32::<16>(vandq_u32(w, vdupq_n_u32(0x8000)));
    let mag = vshlq_n_u32::<13>(vandq_u32(w, vdupq_n_u32(0x7fff)));
    let f = vmulq_f32(
        vreinterpretq_f32_u32(mag),
        vdupq_n_f32(f32::from_bits((127 + 112) << 23)),
    );
    let exp = vandq_u32(w, vdupq_n_u32(0x7c00));
    let inf_nan = vandq_u32(
        vceqq_u32(exp, vdupq_n_u32(0x7c00)),
        vdupq_n_u32(0x7f80_0000),
    );
    vreinterpretq_f32_u32(vorrq_u32(
        vorrq_u32(vreinterpretq_u32_f32(f), inf_nan),
        sign,
    ))
}
/// 16 unsigned bytes → four vectors of f32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen_u8(v: uint8x16_t) -> [V; 4] {
    let lo = vmovl_u8(vget_low_u8(v));
    let hi = vmovl_high_u8(v);
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(lo))),
        vcvtq_f32_u32(vmovl_high_u16(lo)),
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(hi))),
        vcvtq_f32_u32(vmovl_high_u16(hi)),
    ]
}
/// 16 signed bytes → four vectors of f32.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn widen_i8(v: int8x16_t) -> [V; 4] {
    let lo = vmovl_s8(vget_low_s8(v));
    let hi = vmovl_high_s8(v);
    [
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))),
        vcvtq_f32_s32(vmovl_high_s16(lo)),
        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))),
        vcvtq_f32_s32(vmovl_high_s16(hi)),
    ]
}
/// 16 nibble bytes → values 0..16 (low nibbles) then 16..32 (high nibbles).
#[inline]
#[target_feature(enable = "neon")]
unsafe fn nibbles(p: *const u8) -> [V; NB] {
    let v = vld1q_u8(p);
    let lo = widen_u8(vandq_u8(v, vdupq_n_u8(15)));
    let hi = widen_u8(vshrq_n_u8::<4>(v));
    [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]]
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_f32(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        out[i] = vreinterpretq_f32_u8(vld1q_u8(p.add(16 * i)));
    }
    out
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_f16(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        out[i] = f16x4(vreinterpret_u16_u8(vld1_u8(p.add(8 * i))));
    }
    out
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_bf16(p: *const u8) -> [V; NB] {
    let mut out = [zero(); NB];
    for i in 0..NB {
        let h = vreinterpret_u16_u8(vld1_u8(p.add(8 * i)));
        out[i] = vreinterpretq_f32_u32(vshll_n_u16::<16>(h));
    }
    out
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn scales_q8_0(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 34, n, false)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn scales_q4_0(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 18, n, false)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn scales_q4_1(p: *const u8, n: usize, s: &mut Scales) {
    s.fill_portable(p, 20, n, true)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn raw_q4(q: *const u8) -> [V; NB] {
    nibbles(q)
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_q8_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    let d = splat(s.d[j]);
    let a = widen_i8(vld1q_s8(p.add(2).cast()));
    let b = widen_i8(vld1q_s8(p.add(18).cast()));
    let mut out = [zero(); NB];
    for i in 0..4 {
        out[i] = vmulq_f32(a[i], d);
        out[i + 4] = vmulq_f32(b[i], d);
    }
    out
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_q4_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    // o = −8·d: (q − 8)·d as q·d − 8d, one rounding, the same value as the scalar path.
    let (vd, off) = (splat(s.d[j]), splat(s.o[j]));
    let mut q = nibbles(p.add(2));
    for v in q.iter_mut() {
        *v = fma(*v, vd, off);
    }
    q
}
#[inline]
#[target_feature(enable = "neon")]
unsafe fn blk_q4_1(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
    let (d, m) = (splat(s.d[j]), splat(s.o[j]));
    let mut q = nibbles(p.add(4));
    for v in q.iter_mut() {
        *v = fma(*v, d, m);
    }
    q
}

super::simd_kernels!(#[target_feature(enable = "neon")]);
