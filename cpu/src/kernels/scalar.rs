//! The plain reference kernels: dequantize a row with `mdi_core::quant::dequantize`, then
//! f32 dot products. Every SIMD kernel is tested against these, and targets without SIMD
//! (or wasm without `simd128`) run them.

use mdi_core::quant::dequantize;
use mdi_core::DType;

use super::row_bytes;

/// See [`Kernels::rows_dot_strided`](super::Kernels::rows_dot_strided).
///
/// # Safety
/// As that method requires: row r, token t is written to `out + r·rs + t·ts`.
pub unsafe fn rows_dot(
    dtype: DType,
    w: &[u8],
    cols: usize,
    xs: &[f32],
    out: *mut f32,
    rs: usize,
    ts: usize,
) {
    let rb = row_bytes(dtype, cols);
    let mut row = vec![0f32; cols]; // (cols)
    for (r, wr) in w.chunks_exact(rb).enumerate() {
        dequantize(dtype, wr, &mut row);
        for (t, x) in xs.chunks_exact(cols).enumerate() {
            // SAFETY: the caller vouches for every (row, token) output of the call.
            unsafe { *out.add(r * rs + t * ts) = dot(&row, x) };
        }
    }
}

/// See [`Kernels::dequantize_row`](super::Kernels::dequantize_row).
pub fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    dequantize(dtype, bytes, out);
}

/// Dot product with independent partial sums, so the compiler can vectorise it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// See [`Kernels::attend`](super::Kernels::attend).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    positions: usize,
    hd: usize,
    scale: f32,
    scores: &mut [f32],
    out: &mut [f32],
) {
    let n = positions;
    for (g, (qh, s)) in q
        .chunks_exact(hd)
        .zip(scores.chunks_exact_mut(n))
        .enumerate()
    {
        for (j, s) in s.iter_mut().enumerate() {
            *s = dot(qh, &keys[j * hd..(j + 1) * hd]) * scale;
        }
        super::softmax(s);
        let o = &mut out[g * hd..(g + 1) * hd];
        o.fill(0.0);
        for (j, &a) in s.iter().enumerate() {
            for (o, v) in o.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                *o += a * v;
            }
        }
    }
}

/// Dequantize the last, partial chunk of a plain-float row (`out.len()` < 32 values) from a
/// raw pointer: the SIMD kernels walk rows in chunks of 32 and finish here.
///
/// # Safety
/// `p` must point at the stored bytes of `out.len()` values of `dtype`, a plain-float type.
#[allow(dead_code)] // only the SIMD modules call it
pub(crate) unsafe fn tail(dtype: DType, p: *const u8, out: &mut [f32]) {
    let bytes = std::slice::from_raw_parts(p, row_bytes(dtype, out.len()));
    dequantize(dtype, bytes, out);
}
