//! x86_64 primitives for the shared kernels: AVX-512 (16 lanes, a block is 2 vectors) and
//! AVX2 (8 lanes, 4 vectors), both with FMA and F16C for half-precision values and scales.
//! Loads are unaligned: weights sit in byte buffers at any offset.

// Register tiles and blocks are clearer with explicit indices.
#![allow(clippy::needless_range_loop)]

pub(super) fn avx2_supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

pub(super) fn avx512_supported() -> bool {
    avx2_supported() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")
}

pub(super) mod avx512 {
    use std::arch::x86_64::*;

    type V = __m512;
    const LANES: usize = 16;
    const NB: usize = 2;
    const NACC: usize = 2;
    // Up to 8 tokens run as groups of 4 dequantized in registers (cheaper than a panel).
    const GEMM_MIN: usize = 16;
    // 6 × 4 accumulators + 4 activation vectors + 1 weight vector of the 32 registers; the
    // panel (6 rows of up to 1536 values) stays in L1.
    const PANEL_R: usize = 6;
    const PANEL_T: usize = 4;
    // One token: 4 rows × 2 accumulators. More tokens: the activation vectors (T × 2) stay in
    // registers for 4 rows, one accumulator per row and token (16 + 8 of the 32 registers at
    // T = 4; 4 rows beat 2 by about a tenth there, fewer activation loads per block).
    const FUSED_R: [usize; 4] = [4, 4, 4, 4];
    const FUSED_A: [usize; 4] = [2, 1, 1, 1];
    // The dequantizing kernel at one token too (the stored-integer one is unmeasured here).
    const RAW_T1: bool = false;
    const RAW_R: usize = 1;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn zero() -> V {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn splat(v: f32) -> V {
        _mm512_set1_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn fma(a: V, b: V, c: V) -> V {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn add(a: V, b: V) -> V {
        _mm512_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn mul(a: V, b: V) -> V {
        _mm512_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn loadu(p: *const f32) -> V {
        _mm512_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn storeu(p: *mut f32, v: V) {
        _mm512_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn hsum(v: V) -> f32 {
        _mm512_reduce_add_ps(v)
    }
    /// Horizontal sums of four vectors at once: pairwise adds across them before the lanes
    /// are folded, a third of the shuffles of four separate sums.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn hsum4(v: [V; 4]) -> [f32; 4] {
        let ab = _mm512_add_ps(
            _mm512_unpacklo_ps(v[0], v[1]),
            _mm512_unpackhi_ps(v[0], v[1]),
        );
        let cd = _mm512_add_ps(
            _mm512_unpacklo_ps(v[2], v[3]),
            _mm512_unpackhi_ps(v[2], v[3]),
        );
        // Each 128-bit lane: [a, b, c, d] partial sums.
        let abcd = _mm512_add_ps(
            _mm512_shuffle_ps::<0x44>(ab, cd),
            _mm512_shuffle_ps::<0xEE>(ab, cd),
        );
        // The upper half through the f64 view: `extractf32x8` needs AVX-512DQ, which these
        // functions do not enable (it would not inline).
        let upper = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(abcd));
        let h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(upper));
        let q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), q);
        out
    }
    /// Where the scales of 16 blocks are, as 16-bit words from the first block's start, for
    /// two-source word permutes over each 128 bytes (a gather of 16 values costs tens of cycles
    /// on current cores): lane k (of 32) of the result takes word `idx[k]` of the pair of
    /// vectors whose `pair_lanes` hold bit k.
    struct Picks {
        /// Each lane's word within its 128-byte pair of vectors.
        idx: [i16; 32],
        /// The lanes each pair of vectors fills.
        pair_lanes: [u32; 4],
    }
    /// The picks for blocks `stride` words long: lane k the first word of block k, and lane
    /// 16 + k its second (with `second`, Q4_1's minimum).
    const fn picks(stride: usize, second: bool) -> Picks {
        let mut p = Picks {
            idx: [0; 32],
            pair_lanes: [0; 4],
        };
        let mut k = 0;
        while k < 32 {
            if k < 16 || second {
                let w = stride * (k % 16) + k / 16;
                p.idx[k] = (w % 64) as i16;
                p.pair_lanes[w / 64] |= 1 << k;
            }
            k += 1;
        }
        p
    }
    /// The picked words of `n` ≤ 16 blocks at `p`, `stride` words each (only their bytes are
    /// read: masked loads); lanes of blocks past `n` are zero.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn pick_words(p: *const u8, picks: &Picks, n: usize, stride: usize) -> __m512i {
        if n == 16 {
            // Whole groups (most of a row): masks known at compile time, nothing tested.
            pick_words_of(p, picks, 16, stride)
        } else {
            pick_words_of(p, picks, n, stride)
        }
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn pick_words_of(p: *const u8, picks: &Picks, n: usize, stride: usize) -> __m512i {
        let readable = n * stride;
        let block_lanes = if n >= 16 { 0xffff } else { (1u32 << n) - 1 };
        let want = block_lanes | block_lanes << 16;
        let idx = _mm512_loadu_si512(picks.idx.as_ptr().cast());
        let load = |first: usize| -> __m512i {
            let n = readable.saturating_sub(first).min(32);
            let mask: __mmask32 = if n >= 32 { !0 } else { (1u32 << n) - 1 };
            // Wrapping: past the last block the address is only formed, never read (mask 0).
            _mm512_maskz_loadu_epi16(mask, p.wrapping_add(2 * first).cast())
        };
        let mut out = _mm512_setzero_si512();
        for (pair, &lanes) in picks.pair_lanes.iter().enumerate() {
            let lanes = lanes & want;
            if lanes != 0 {
                let (a, b) = (load(64 * pair), load(64 * pair + 32));
                out = _mm512_or_si512(out, _mm512_maskz_permutex2var_epi16(lanes, a, idx, b));
            }
        }
        out
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn scales_q8_0(p: *const u8, n: usize, s: &mut Scales) {
        const P: Picks = picks(17, false);
        let h = pick_words(p, &P, n, 17);
        _mm512_storeu_ps(s.d.as_mut_ptr(), _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn scales_q4_0(p: *const u8, n: usize, s: &mut Scales) {
        const P: Picks = picks(9, false);
        let d = _mm512_cvtph_ps(_mm512_castsi512_si256(pick_words(p, &P, n, 9)));
        _mm512_storeu_ps(s.d.as_mut_ptr(), d);
        _mm512_storeu_ps(s.o.as_mut_ptr(), _mm512_mul_ps(d, _mm512_set1_ps(-8.0)));
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn scales_q4_1(p: *const u8, n: usize, s: &mut Scales) {
        const P: Picks = picks(10, true);
        let h = pick_words(p, &P, n, 10);
        _mm512_storeu_ps(s.d.as_mut_ptr(), _mm512_cvtph_ps(_mm512_castsi512_si256(h)));
        _mm512_storeu_ps(
            s.o.as_mut_ptr(),
            _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(h)),
        );
    }
    /// 32 nibble values through a 16-entry table of their dequantized values
    /// (`table[q] = q·d + o` in one rounding): `vpermps` reads only the low 4 bits of each
    /// index, so the low nibbles need no mask and nothing is converted per value.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn nibbles(q: *const u8, d: f32, o: f32) -> [V; NB] {
        let steps = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        let table = _mm512_fmadd_ps(steps, _mm512_set1_ps(d), _mm512_set1_ps(o));
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
        [
            _mm512_permutexvar_ps(v, table),
            _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(v), table),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_f32(p: *const u8) -> [V; NB] {
        [_mm512_loadu_ps(p.cast()), _mm512_loadu_ps(p.add(64).cast())]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_f16(p: *const u8) -> [V; NB] {
        [
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())),
            _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32).cast())),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn bf16x16(q: *const u8) -> V {
        let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(q.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_bf16(p: *const u8) -> [V; NB] {
        [bf16x16(p), bf16x16(p.add(32))]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_q8_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        let d = _mm512_set1_ps(s.d[j]);
        let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast())));
        let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast())));
        [_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d)]
    }
    /// 16 nibble bytes → values 0..16 (low nibbles), 16..32 (high), unscaled.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn raw_q4(q: *const u8) -> [V; NB] {
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(q.cast()));
        [
            _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))),
            _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_q4_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        // o = −8·d: (q − 8)·d as q·d − 8d, one rounding, the scalar path's value.
        nibbles(p.add(2), s.d[j], s.o[j])
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    unsafe fn blk_q4_1(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        nibbles(p.add(4), s.d[j], s.o[j])
    }

    /// [`silu_mul`](crate::kernels::silu_mul) compiled for this module's vector width.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        crate::kernels::silu_mul(gate, up)
    }

    super::super::simd_kernels!(#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]);
}

pub(super) mod avx2 {
    use std::arch::x86_64::*;

    type V = __m256;
    const LANES: usize = 8;
    const NB: usize = 4;
    const NACC: usize = 2;
    const GEMM_MIN: usize = 16;
    // 16 registers: 2 × 4 accumulators + 4 activation vectors + 1 weight vector.
    const PANEL_R: usize = 2;
    const PANEL_T: usize = 4;
    // 16 registers: two rows for one token, else one row (activations read from L1).
    const FUSED_R: [usize; 4] = [2, 1, 1, 1];
    const FUSED_A: [usize; 4] = [2, 2, 2, 2];
    // One token: the stored-integer kernel (block scale applied to a sum), four rows at a
    // time: 5–8% faster than dequantizing two rows (Q4_1, 1 536 × 576, interleaved runs).
    const RAW_T1: bool = true;
    const RAW_R: usize = 4;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn zero() -> V {
        _mm256_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn splat(v: f32) -> V {
        _mm256_set1_ps(v)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fma(a: V, b: V, c: V) -> V {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn add(a: V, b: V) -> V {
        _mm256_add_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn mul(a: V, b: V) -> V {
        _mm256_mul_ps(a, b)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn loadu(p: *const f32) -> V {
        _mm256_loadu_ps(p)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn storeu(p: *mut f32, v: V) {
        _mm256_storeu_ps(p, v)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p.cast());
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: V) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
    /// Horizontal sums of four vectors at once (see the AVX-512 version).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum4(v: [V; 4]) -> [f32; 4] {
        let ab = _mm256_add_ps(
            _mm256_unpacklo_ps(v[0], v[1]),
            _mm256_unpackhi_ps(v[0], v[1]),
        );
        let cd = _mm256_add_ps(
            _mm256_unpacklo_ps(v[2], v[3]),
            _mm256_unpackhi_ps(v[2], v[3]),
        );
        let abcd = _mm256_add_ps(
            _mm256_shuffle_ps::<0x44>(ab, cd),
            _mm256_shuffle_ps::<0xEE>(ab, cd),
        );
        let q = _mm_add_ps(
            _mm256_castps256_ps128(abcd),
            _mm256_extractf128_ps::<1>(abcd),
        );
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), q);
        out
    }
    /// 16 unsigned nibbles → values 0..8, 8..16 (low nibbles), 16..24, 24..32 (high).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn nibbles(p: *const u8) -> [V; 4] {
        let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.cast()));
        let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8).cast()));
        let m = _mm256_set1_epi32(15);
        [
            _mm256_cvtepi32_ps(_mm256_and_si256(a, m)),
            _mm256_cvtepi32_ps(_mm256_and_si256(b, m)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(a)),
            _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(b)),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_f32(p: *const u8) -> [V; NB] {
        let f = p.cast::<f32>();
        [
            _mm256_loadu_ps(f),
            _mm256_loadu_ps(f.add(8)),
            _mm256_loadu_ps(f.add(16)),
            _mm256_loadu_ps(f.add(24)),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_f16(p: *const u8) -> [V; NB] {
        let mut out = [zero(); NB];
        for i in 0..NB {
            out[i] = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * i).cast()));
        }
        out
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_bf16(p: *const u8) -> [V; NB] {
        let mut out = [zero(); NB];
        for i in 0..NB {
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16 * i).cast()));
            out[i] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
        }
        out
    }
    /// Scales (and minima) of `n` blocks `stride` bytes apart, four blocks per F16C
    /// conversion: the dword at each block's start holds its f16 scale (low half) and, for
    /// Q4_1, its f16 minimum (high half); lanes past `n` read nothing and stay zero.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill(p: *const u8, stride: usize, n: usize, s: &mut Scales, with_min: bool) {
        // Low halves of four dwords to bytes 0..8, high halves to bytes 8..16.
        let split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        let dword = |j: usize| -> i32 {
            if j < n {
                p.add(j * stride).cast::<i32>().read_unaligned()
            } else {
                0
            }
        };
        let mut j = 0;
        while j < n {
            let dw = _mm_setr_epi32(dword(j), dword(j + 1), dword(j + 2), dword(j + 3));
            let f = _mm256_cvtph_ps(_mm_shuffle_epi8(dw, split));
            let d = _mm256_castps256_ps128(f);
            let o = if with_min {
                _mm256_extractf128_ps::<1>(f)
            } else {
                _mm_mul_ps(d, _mm_set1_ps(-8.0))
            };
            _mm_storeu_ps(s.d.as_mut_ptr().add(j), d);
            _mm_storeu_ps(s.o.as_mut_ptr().add(j), o);
            j += 4;
        }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales_q8_0(p: *const u8, n: usize, s: &mut Scales) {
        fill(p, 34, n, s, false)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales_q4_0(p: *const u8, n: usize, s: &mut Scales) {
        fill(p, 18, n, s, false)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scales_q4_1(p: *const u8, n: usize, s: &mut Scales) {
        fill(p, 20, n, s, true)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8x8(q: *const u8, d: V) -> V {
        let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.cast()));
        _mm256_mul_ps(_mm256_cvtepi32_ps(v), d)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn raw_q4(q: *const u8) -> [V; NB] {
        nibbles(q)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_q8_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        let d = splat(s.d[j]);
        [
            q8x8(p.add(2), d),
            q8x8(p.add(10), d),
            q8x8(p.add(18), d),
            q8x8(p.add(26), d),
        ]
    }
    /// q·d + o for 32 nibbles (o = −8·d for Q4_0: one rounding, the scalar path's value).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4(q: *const u8, s: &Scales, j: usize) -> [V; NB] {
        let (d, o) = (splat(s.d[j]), splat(s.o[j]));
        let v = nibbles(q);
        [
            fma(v[0], d, o),
            fma(v[1], d, o),
            fma(v[2], d, o),
            fma(v[3], d, o),
        ]
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_q4_0(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        q4(p.add(2), s, j)
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn blk_q4_1(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
        q4(p.add(4), s, j)
    }

    /// [`silu_mul`](crate::kernels::silu_mul) compiled for this module's vector width.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) {
        crate::kernels::silu_mul(gate, up)
    }

    super::super::simd_kernels!(#[target_feature(enable = "avx2,fma,f16c")]);
}
