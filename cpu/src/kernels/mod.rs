//! The CPU engine's compute kernels: matrix rows in their stored format (F32, F16, BF16, Q8_0,
//! Q4_0, Q4_1) times f32 activation rows, dequantized inside the dot product, and grouped-query
//! attention over one KV head. Accumulation is always in f32.
//!
//! Each instruction set has its own module (`x86::avx512`, `x86::avx2`, `neon`, `wasm`) that
//! supplies a handful of vector primitives (load, FMA, horizontal sum, and "dequantize one
//! 32-value block into vectors"); the kernels themselves are written once, in
//! [`simd_kernels!`], and expanded inside each module under that module's `target_feature`s.
//! [`scalar`] is the plain reference every SIMD kernel is tested against and the fallback.
//!
//! [`Kernels`] is the run-time choice: it can only be made for an instruction set the CPU
//! reports, which is what makes calling the `target_feature` functions sound.

use mdi_core::DType;

pub mod scalar;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm;
#[cfg(target_arch = "x86_64")]
mod x86;

/// An instruction set the kernels are written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Plain Rust, every target.
    Scalar,
    /// x86_64 AVX2 + FMA + F16C.
    Avx2,
    /// x86_64 AVX-512F and AVX-512BW (with AVX2, FMA, F16C).
    Avx512,
    /// aarch64 Advanced SIMD.
    Neon,
    /// wasm32 `simd128` (a compile-time feature of the module).
    Simd128,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 5] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Simd128, Isa::Scalar];

    /// Lower-case name for tables and messages.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::Simd128 => "simd128",
        }
    }

    /// The instruction set named `name` (as [`Isa::name`] prints it).
    pub fn from_name(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// Whether this CPU (or wasm module) can run the kernels of this set.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2_supported(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512_supported(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The kernels of one instruction set this CPU supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kernels {
    // Private: a `Kernels` exists only for a supported set (see `new`), so the dispatch below
    // never runs an instruction the CPU lacks.
    isa: Isa,
}

// SAFETY (every `unsafe` block of the dispatch): `Kernels::new` checked at run time that the
// CPU has the module's target features, and the callers below checked the slice lengths the
// module's kernels rely on.
macro_rules! dispatch {
    // Every module's function unsafe, the scalar one too.
    (unsafe $self:expr, $f:ident ( $($arg:expr),* )) => {
        match $self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512::$f($($arg),*),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2::$f($($arg),*),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => neon::$f($($arg),*),
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => wasm::$f($($arg),*),
            _ => scalar::$f($($arg),*),
        }
    };
    ($self:expr, $f:ident ( $($arg:expr),* )) => {
        match $self.isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::$f($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2::$f($($arg),*) },
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => unsafe { neon::$f($($arg),*) },
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Isa::Simd128 => unsafe { wasm::$f($($arg),*) },
            _ => scalar::$f($($arg),*),
        }
    };
}

impl Kernels {
    /// The kernels of `isa`, if this CPU supports it.
    pub fn new(isa: Isa) -> Option<Self> {
        isa.supported().then_some(Self { isa })
    }

    /// The best instruction set this CPU supports.
    pub fn best() -> Self {
        Self::available()[0]
    }

    /// The plain reference kernels.
    pub fn scalar() -> Self {
        Self { isa: Isa::Scalar }
    }

    /// Every supported set, best first (ends with scalar).
    pub fn available() -> Vec<Self> {
        Isa::ALL.into_iter().filter_map(Self::new).collect()
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// `out[r·n + t] = row r of w · xs[t]`: `w` holds whole rows of `cols` values stored as
    /// `dtype`, `xs` is (n, cols) and `out` (rows, n). Weights are read once for all n rows of
    /// `xs`; a few rows are dequantized in registers, many through a small f32 panel.
    ///
    /// Panics if the lengths do not describe whole rows (callers size them from validated
    /// shapes).
    pub fn rows_dot(&self, dtype: DType, w: &[u8], cols: usize, xs: &[f32], out: &mut [f32]) {
        let (rows, n) = rows_and_tokens(dtype, w, cols, xs);
        assert_eq!(out.len(), rows * n, "rows_dot {dtype}: output size");
        // SAFETY: `out` holds rows × n values, (r, t) at r·n + t, and is borrowed mutably.
        unsafe { self.rows_dot_strided(dtype, w, cols, xs, out.as_mut_ptr(), n, 1) }
    }

    /// [`rows_dot`](Self::rows_dot) writing the value of row r and token t to
    /// `out + r·row_stride + t·token_stride`: with a token stride of a whole output row, each
    /// task of a batched matrix product writes its rows of every token's output in place.
    ///
    /// # Safety
    /// For every row r and token t of the call, `out + r·row_stride + t·token_stride` must be
    /// valid for a write of one `f32` that nothing else reads or writes during the call.
    /// Panics (before writing) if the lengths do not describe whole rows.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rows_dot_strided(
        &self,
        dtype: DType,
        w: &[u8],
        cols: usize,
        xs: &[f32],
        out: *mut f32,
        row_stride: usize,
        token_stride: usize,
    ) {
        let (rows, n) = rows_and_tokens(dtype, w, cols, xs);
        if rows == 0 || n == 0 {
            return;
        }
        // SAFETY: the module's features are checked as for `dispatch!`; the caller vouches
        // for the outputs, and the lengths of `w` and `xs` are checked above.
        unsafe {
            dispatch!(unsafe self, rows_dot(dtype, w, cols, xs, out, row_stride, token_stride))
        }
    }

    /// gate = silu(gate) ⊙ up, element by element (SwiGLU's activation), in this set's
    /// vector width where the build's baseline is narrower (x86_64).
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        assert_eq!(gate.len(), up.len(), "silu_mul: gate and up lengths");
        match self.isa {
            // SAFETY: `Kernels::new` checked the CPU has the module's features.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::avx512::silu_mul(gate, up) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { x86::avx2::silu_mul(gate, up) },
            _ => silu_mul(gate, up),
        }
    }

    /// Dequantize one row (`out.len()` values stored as `dtype` in `bytes`).
    pub fn dequantize_row(&self, dtype: DType, bytes: &[u8], out: &mut [f32]) {
        assert_eq!(
            Some(bytes.len()),
            dtype.bytes_for(out.len()),
            "dequantize_row {dtype}: {} bytes for {} values",
            bytes.len(),
            out.len()
        );
        dispatch!(self, dequantize_row(dtype, bytes, out))
    }

    /// Dot product of two equally long f32 slices.
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len(), "dot: lengths differ");
        dispatch!(self, dot(a, b))
    }

    /// Causal attention of the query heads sharing one KV head, for one token:
    /// `q` (group, head_dim); `keys`, `values` (≥ positions, head_dim), rows 0..positions
    /// visible; `scores` scratch of (group, positions); `out` (group, head_dim).
    /// Scores are `q·k · scale`, softmaxed per head, and mix the value rows.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        positions: usize,
        head_dim: usize,
        scale: f32,
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        assert!(
            head_dim > 0 && q.len().is_multiple_of(head_dim) && positions > 0,
            "attend: {} query values for heads of {head_dim}",
            q.len()
        );
        let group = q.len() / head_dim;
        assert!(
            keys.len() >= positions * head_dim
                && values.len() >= positions * head_dim
                && scores.len() >= group * positions
                && out.len() == q.len(),
            "attend: buffers too small for {positions} positions"
        );
        dispatch!(
            self,
            attend(q, keys, values, positions, head_dim, scale, scores, out)
        )
    }
}

/// (rows, tokens) of a matrix product, panicking unless `w` holds whole rows of `cols` values
/// stored as `dtype` and `xs` whole rows of `cols` activations.
fn rows_and_tokens(dtype: DType, w: &[u8], cols: usize, xs: &[f32]) -> (usize, usize) {
    let rb = row_bytes(dtype, cols);
    assert!(
        cols > 0 && rb > 0 && w.len().is_multiple_of(rb) && xs.len().is_multiple_of(cols),
        "rows_dot {dtype}: {} weight bytes, {} inputs for rows of {cols}",
        w.len(),
        xs.len()
    );
    (w.len() / rb, xs.len() / cols)
}

/// Bytes of one row of `cols` values stored as `dtype` (0 if `cols` is not whole blocks).
pub fn row_bytes(dtype: DType, cols: usize) -> usize {
    dtype.bytes_for(cols).unwrap_or(0)
}

/// gate = silu(gate) ⊙ up = gate / (1 + e^(−gate)) ⊙ up, with [`exp`]: the library's `expf`
/// is a call per value that does not vectorize, and at batch 4 the 184 K values of a decode
/// step of the default model took ~1 ms on one thread while the other waited. Compiled once
/// per instruction set where the loop is wider than the build's baseline (see
/// [`Kernels::silu_mul`]).
#[inline(always)]
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// e^x within a few ulp of `f32::exp` on the range that matters (below −86 it returns
/// e^−86 ≈ 4e-38 instead of something smaller; above 88.7 ≈ 3.4e38 instead of infinity), in
/// plain arithmetic that the compiler turns into vector instructions in a loop:
/// x = k·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor polynomial of degree 7 (the first
/// term left out is below 1e-8 of it), 2^k added to the result's exponent bits.
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-86.0, 88.7);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let k = t - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // k as an integer: the low bits of t's mantissa, two's complement around ROUND.
    let k_bits = t.to_bits().wrapping_sub(ROUND.to_bits());
    f32::from_bits(p.to_bits().wrapping_add(k_bits << 23))
}

/// In-place softmax, as the oracle computes it.
pub(crate) fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// IEEE half to single precision without lookup tables or hardware conversion: the
/// magnitude's bits shifted into place are a float 2^-112 too small (for normal and
/// subnormal halves alike), so one multiply rescales them; infinities and NaNs get the full
/// exponent back. Used for block scales on targets whose f16 conversion instructions Rust does
/// not expose on stable (NEON, wasm).
#[allow(dead_code)] // only the NEON and wasm modules call it
#[inline]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let mag = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits((127 + 112) << 23);
    let mut bits = mag.to_bits();
    if h & 0x7c00 == 0x7c00 {
        bits |= 0x7f80_0000;
    }
    f32::from_bits(bits | ((h & 0x8000) << 16))
}

/// Block scales of up to [`SCALE_GROUP`] consecutive blocks of a row, converted to f32 in one
/// pass before their blocks are dequantized: `d` the scales, `o` the offsets (Q4_1's `m`, or
/// −8·d for Q4_0). Converting them together (word permutes over a few loads and one conversion
/// on AVX-512) instead of block by block takes most of the per-block work out of the
/// single-token dot product, and the per-block broadcasts then read memory instead of
/// occupying a shuffle port.
#[derive(Clone, Copy)]
#[allow(dead_code)] // the scalar build of wasm has no SIMD module to use it
pub(crate) struct Scales {
    pub(crate) d: [f32; SCALE_GROUP],
    pub(crate) o: [f32; SCALE_GROUP],
}

/// Blocks whose scales are converted together.
pub(crate) const SCALE_GROUP: usize = 16;

impl Scales {
    #[allow(dead_code)]
    pub(crate) const ZERO: Scales = Scales {
        d: [0.0; SCALE_GROUP],
        o: [0.0; SCALE_GROUP],
    };

    /// Portable conversion of `n` blocks' scales: `stride` bytes per block, the f16 scale at
    /// offset 0 and (`with_min`) the f16 minimum at offset 2; otherwise `o` = −8·d.
    ///
    /// # Safety
    /// `p` must point at `n` blocks of `stride` bytes, `n` ≤ [`SCALE_GROUP`].
    #[allow(dead_code)] // only the NEON and wasm modules call it
    pub(crate) unsafe fn fill_portable(
        &mut self,
        p: *const u8,
        stride: usize,
        n: usize,
        with_min: bool,
    ) {
        for j in 0..n {
            let b = p.add(j * stride);
            let d = f16_to_f32(b.cast::<u16>().read_unaligned());
            self.d[j] = d;
            self.o[j] = if with_min {
                f16_to_f32(b.add(2).cast::<u16>().read_unaligned())
            } else {
                -8.0 * d
            };
        }
    }
}

/// The kernels, written once over a module's vector primitives. The invoking module defines:
/// `V` (a vector of f32), `LANES`; `NB = 32 / LANES`; `NACC` (accumulators per dot product);
/// `FUSED_R[T - 1]` rows and `FUSED_A[T - 1]` accumulators per row and token for groups of
/// T ≤ 4 tokens dequantized in registers; `GEMM_MIN` (tokens from which rows are dequantized
/// into an f32 panel instead) and `PANEL_R` × `PANEL_T` (the panel path's register tile:
/// weight rows × tokens); `RAW_T1` (whether one token against Q4 rows takes the
/// stored-integer kernel, `RAW_R` rows at a time); `zero`, `splat`,
/// `fma(a, b, c) = a·b + c`, `add`, `mul`, `loadu`, `storeu`, `hsum`, `hsum4` (four at once),
/// `prefetch` (a hint, any address);
/// `scales_q8_0`, `scales_q4_0`, `scales_q4_1`, each filling a [`Scales`] for up to
/// [`SCALE_GROUP`] blocks; and `blk_f32`, `blk_f16`, `blk_bf16`, `blk_q8_0`, `blk_q4_0`,
/// `blk_q4_1`, each turning the bytes of 32 stored values (and, for the block formats, the
/// block's converted scales) into `NB` vectors; `raw_q4`, 16 nibble bytes as their unscaled
/// values 0..16 in `NB` vectors (low nibbles, then high). The attributes (the module's
/// `target_feature`s) go on every function.
// Unused only where no SIMD module is built (wasm32 without `simd128`).
#[allow(unused_macros)]
macro_rules! simd_kernels {
    ($(#[$attr:meta])*) => {
        use mdi_core::DType;

        use $crate::kernels::{Scales, SCALE_GROUP};

        /// How many row groups ahead the single-token kernels prefetch.
        const PREFETCH_GROUPS: usize = 4;

        /// One storage format: how 32 values are laid out and loaded.
        trait Block {
            const DTYPE: DType;
            /// Bytes of 32 values.
            const BYTES: usize;
            /// Convert the scales of `n` ≤ SCALE_GROUP blocks at `p` (nothing for plain floats).
            ///
            /// # Safety
            /// `p` must point at `n` blocks; the CPU must have the module's features.
            unsafe fn scales(p: *const u8, n: usize, s: &mut Scales);
            /// The 32 values of the block at `p`, the `j`th of the group whose scales are in `s`.
            ///
            /// # Safety
            /// `p` must point at `BYTES` readable bytes; the CPU must have the module's
            /// features.
            unsafe fn load(p: *const u8, s: &Scales, j: usize) -> [V; NB];
            /// Whether [`Block::raw`] gives the block's stored integers, so that a dot product
            /// can apply the block's scale once to a sum instead of to every value.
            const RAW: bool = false;
            /// Whether a value is `q·d + o` (Q4_0's o = −8·d, Q4_1's minimum) rather than `q·d`.
            const OFFSET: bool = false;
            /// The block's 32 stored integers (Q4: 0..16) as f32, unscaled.
            ///
            /// # Safety
            /// As [`Block::load`]; only called where `RAW` holds.
            unsafe fn raw(_p: *const u8) -> [V; NB] {
                unreachable!("no stored integers in {:?}", Self::DTYPE)
            }
        }

        struct BF32;
        struct BF16;
        struct BBf16;
        struct BQ8_0;
        struct BQ4_0;
        struct BQ4_1;

        impl Block for BF32 {
            const DTYPE: DType = DType::F32;
            const BYTES: usize = 128;
            #[inline]
            unsafe fn scales(_: *const u8, _: usize, _: &mut Scales) {}
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, _: &Scales, _: usize) -> [V; NB] {
                blk_f32(p)
            }
        }
        impl Block for BF16 {
            const DTYPE: DType = DType::F16;
            const BYTES: usize = 64;
            #[inline]
            unsafe fn scales(_: *const u8, _: usize, _: &mut Scales) {}
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, _: &Scales, _: usize) -> [V; NB] {
                blk_f16(p)
            }
        }
        impl Block for BBf16 {
            const DTYPE: DType = DType::BF16;
            const BYTES: usize = 64;
            #[inline]
            unsafe fn scales(_: *const u8, _: usize, _: &mut Scales) {}
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, _: &Scales, _: usize) -> [V; NB] {
                blk_bf16(p)
            }
        }
        impl Block for BQ8_0 {
            const DTYPE: DType = DType::Q8_0;
            const BYTES: usize = 34;
            $(#[$attr])*
            #[inline]
            unsafe fn scales(p: *const u8, n: usize, s: &mut Scales) {
                scales_q8_0(p, n, s)
            }
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
                blk_q8_0(p, s, j)
            }
        }
        impl Block for BQ4_0 {
            const DTYPE: DType = DType::Q4_0;
            const BYTES: usize = 18;
            $(#[$attr])*
            #[inline]
            unsafe fn scales(p: *const u8, n: usize, s: &mut Scales) {
                scales_q4_0(p, n, s)
            }
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
                blk_q4_0(p, s, j)
            }
            const RAW: bool = true;
            const OFFSET: bool = true;
            $(#[$attr])*
            #[inline]
            unsafe fn raw(p: *const u8) -> [V; NB] {
                raw_q4(p.add(2))
            }
        }
        impl Block for BQ4_1 {
            const DTYPE: DType = DType::Q4_1;
            const BYTES: usize = 20;
            $(#[$attr])*
            #[inline]
            unsafe fn scales(p: *const u8, n: usize, s: &mut Scales) {
                scales_q4_1(p, n, s)
            }
            $(#[$attr])*
            #[inline]
            unsafe fn load(p: *const u8, s: &Scales, j: usize) -> [V; NB] {
                blk_q4_1(p, s, j)
            }
            const RAW: bool = true;
            const OFFSET: bool = true;
            $(#[$attr])*
            #[inline]
            unsafe fn raw(p: *const u8) -> [V; NB] {
                raw_q4(p.add(4))
            }
        }

        /// See [`Kernels::rows_dot_strided`](super::Kernels::rows_dot_strided).
        ///
        /// # Safety
        /// The CPU must have the module's features; the lengths and outputs must be as that
        /// method requires.
        $(#[$attr])*
        pub unsafe fn rows_dot(dtype: DType, w: &[u8], cols: usize, xs: &[f32], out: *mut f32, rs: usize, ts: usize) {
            match dtype {
                DType::F32 => rows_dot_b::<BF32>(w, cols, xs, out, rs, ts),
                DType::F16 => rows_dot_b::<BF16>(w, cols, xs, out, rs, ts),
                DType::BF16 => rows_dot_b::<BBf16>(w, cols, xs, out, rs, ts),
                DType::Q8_0 => rows_dot_b::<BQ8_0>(w, cols, xs, out, rs, ts),
                DType::Q4_0 => rows_dot_b::<BQ4_0>(w, cols, xs, out, rs, ts),
                DType::Q4_1 => rows_dot_b::<BQ4_1>(w, cols, xs, out, rs, ts),
            }
        }

        /// Row r and token t go to `o + r·rs + t·ts`.
        $(#[$attr])*
        unsafe fn rows_dot_b<B: Block>(w: &[u8], cols: usize, xs: &[f32], o: *mut f32, rs: usize, ts: usize) {
            let rb = $crate::kernels::row_bytes(B::DTYPE, cols);
            let (rows, n) = (w.len() / rb, xs.len() / cols);
            let (w, x) = (w.as_ptr(), xs.as_ptr());
            if n >= GEMM_MIN {
                gemm::<B>(w, rb, rows, cols, x, n, o, rs, ts);
                return;
            }
            // Tokens in groups of up to 4, each weight block dequantized in registers once per
            // group; several rows at once (FUSED_R, per group size) so each activation vector is
            // loaded once for all of them, with more independent FMA chains than the FMA
            // latency needs.
            let mut t0 = 0;
            while t0 < n {
                let tn = (n - t0).min(4);
                let (x, o) = (x.add(t0 * cols), o.add(t0 * ts));
                match tn {
                    1 if RAW_T1 && B::RAW => raw_rows::<B>(w, rb, rows, cols, x, o, rs),
                    1 => fused_rows::<B, { FUSED_R[0] }, 1, { FUSED_A[0] }>(w, rb, rows, cols, x, o, rs, ts),
                    2 => fused_rows::<B, { FUSED_R[1] }, 2, { FUSED_A[1] }>(w, rb, rows, cols, x, o, rs, ts),
                    3 => fused_rows::<B, { FUSED_R[2] }, 3, { FUSED_A[2] }>(w, rb, rows, cols, x, o, rs, ts),
                    _ => fused_rows::<B, { FUSED_R[3] }, 4, { FUSED_A[3] }>(w, rb, rows, cols, x, o, rs, ts),
                }
                t0 += tn;
            }
        }

        /// One token against all rows of a format with stored integers, RAW_R rows at a time.
        /// The activations' block sums (for the offsets) are taken once here for every row.
        $(#[$attr])*
        #[inline]
        unsafe fn raw_rows<B: Block>(
            w: *const u8,
            rb: usize,
            rows: usize,
            cols: usize,
            x: *const f32,
            out: *mut f32,
            ld: usize,
        ) {
            let nb = cols / 32;
            // Zero past the last block, so whole groups of SCALE_GROUP blocks can be read; on
            // the stack up to rows of 8 192 values (this runs for every matrix of every token).
            let pad = nb.div_ceil(SCALE_GROUP) * SCALE_GROUP;
            let (mut stack, mut heap) = ([0f32; 256], Vec::new());
            let sx: &mut [f32] = if pad <= stack.len() {
                &mut stack[..pad]
            } else {
                heap.resize(pad, 0.0);
                &mut heap
            };
            if B::OFFSET {
                for (b, s) in sx[..nb].iter_mut().enumerate() {
                    let mut v = loadu(x.add(b * 32));
                    for i in 1..NB {
                        v = add(v, loadu(x.add(b * 32 + i * LANES)));
                    }
                    *s = hsum(v);
                }
            }
            let sx = sx.as_ptr();
            let mut r = 0;
            while r + RAW_R <= rows {
                raw::<B, RAW_R>(w.add(r * rb), rb, cols, x, sx, out.add(r * ld), ld);
                r += RAW_R;
            }
            while r < rows {
                raw::<B, 1>(w.add(r * rb), rb, cols, x, sx, out.add(r * ld), ld);
                r += 1;
            }
        }

        /// R rows of a format with stored integers against one token: per block, the dot
        /// product of the stored integers with the activations, then one multiply-add by the
        /// block's scale; the offsets (Q4's `o` per block) add `Σ_b o_b · Σ x over block b`
        /// (`sx`). Five multiplies per block and row where dequantizing each value first
        /// takes eight, and the same sum up to rounding (accumulated in f32 throughout).
        $(#[$attr])*
        #[inline]
        unsafe fn raw<B: Block, const R: usize>(
            w: *const u8,
            rb: usize,
            cols: usize,
            x: *const f32,
            sx: *const f32,
            out: *mut f32,
            ld: usize,
        ) {
            let nb = cols / 32;
            // One accumulator per row (R rows are R independent chains), which the offsets of
            // whole groups join: few enough registers that nothing spills at R = 4 on AVX2.
            let mut acc = [zero(); R];
            let mut offs = [0f32; R];
            let mut s = [Scales::ZERO; R];
            let mut g0 = 0;
            while g0 < nb {
                let g = (nb - g0).min(SCALE_GROUP);
                for r in 0..R {
                    B::scales(w.add(r * rb + g0 * B::BYTES), g, &mut s[r]);
                }
                for j in 0..g {
                    let b = g0 + j;
                    let mut xv = [zero(); NB];
                    for i in 0..NB {
                        xv[i] = loadu(x.add(b * 32 + i * LANES));
                    }
                    for r in 0..R {
                        let p = w.add(r * rb + b * B::BYTES);
                        prefetch(p.wrapping_add(PREFETCH_GROUPS * R * rb));
                        let q = B::raw(p);
                        // Two chains, so no multiply waits on the one before.
                        let mut t = [mul(q[0], xv[0]), mul(q[1], xv[1])];
                        // (Empty where NB = 2, AVX-512.)
                        #[allow(clippy::reversed_empty_ranges)]
                        for i in 2..NB {
                            t[i % 2] = fma(q[i], xv[i], t[i % 2]);
                        }
                        acc[r] = fma(add(t[0], t[1]), splat(s[r].d[j]), acc[r]);
                    }
                }
                if B::OFFSET {
                    for r in 0..R {
                        if g == SCALE_GROUP {
                            for k in 0..SCALE_GROUP / LANES {
                                let o = loadu(s[r].o.as_ptr().add(k * LANES));
                                acc[r] = fma(o, loadu(sx.add(g0 + k * LANES)), acc[r]);
                            }
                        } else {
                            for j in 0..g {
                                offs[r] += s[r].o[j] * *sx.add(g0 + j);
                            }
                        }
                    }
                }
                g0 += g;
            }
            for r in 0..R {
                *out.add(r * ld) = hsum(acc[r]) + offs[r];
            }
        }

        /// All rows, R at a time (then one at a time), against T tokens.
        $(#[$attr])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        unsafe fn fused_rows<B: Block, const R: usize, const T: usize, const A: usize>(
            w: *const u8,
            rb: usize,
            rows: usize,
            cols: usize,
            x: *const f32,
            out: *mut f32,
            rs: usize,
            ts: usize,
        ) {
            let mut r = 0;
            while r + R <= rows {
                fused::<B, R, T, A>(w.add(r * rb), rb, cols, x, out.add(r * rs), rs, ts);
                r += R;
            }
            while r < rows {
                fused::<B, 1, T, A>(w.add(r * rb), rb, cols, x, out.add(r * rs), rs, ts);
                r += 1;
            }
        }

        /// R stored rows (`rb` bytes apart) against T consecutive activation rows (each `cols`
        /// long), with A accumulators per row and token: each block is dequantized once, in
        /// registers, for all T. Writes row r, token t to `out + r·rs + t·ts`.
        $(#[$attr])*
        #[inline]
        unsafe fn fused<B: Block, const R: usize, const T: usize, const A: usize>(
            w: *const u8,
            rb: usize,
            cols: usize,
            x: *const f32,
            out: *mut f32,
            rs: usize,
            ts: usize,
        ) {
            let nb = cols / 32;
            let mut acc = [[[zero(); A]; T]; R];
            let mut s = [Scales::ZERO; R];
            let mut g0 = 0;
            while g0 < nb {
                let g = (nb - g0).min(SCALE_GROUP);
                for r in 0..R {
                    B::scales(w.add(r * rb + g0 * B::BYTES), g, &mut s[r]);
                }
                for j in 0..g {
                    let b = g0 + j;
                    let mut xv = [[zero(); NB]; T];
                    for t in 0..T {
                        for i in 0..NB {
                            xv[t][i] = loadu(x.add(t * cols + b * 32 + i * LANES));
                        }
                    }
                    for r in 0..R {
                        let p = w.add(r * rb + b * B::BYTES);
                        // The same block PREFETCH_GROUPS row groups ahead: decode streams the
                        // weights once from memory, and the hardware prefetcher alone keeps too
                        // few lines in flight while the core also dequantizes.
                        prefetch(p.wrapping_add(PREFETCH_GROUPS * R * rb));
                        let wv = B::load(p, &s[r], j);
                        for t in 0..T {
                            for i in 0..NB {
                                acc[r][t][i % A] = fma(wv[i], xv[t][i], acc[r][t][i % A]);
                            }
                        }
                    }
                }
                g0 += g;
            }
            // Fold the accumulators of each (row, token), then sum them four at a time.
            let mut folded = [[zero(); T]; R];
            for r in 0..R {
                for t in 0..T {
                    let mut v = acc[r][t][0];
                    for i in 1..A {
                        v = add(v, acc[r][t][i]);
                    }
                    folded[r][t] = v;
                }
            }
            let mut sums = [[0f32; T]; R];
            let mut k = 0;
            while k + 4 <= R * T {
                let idx = [k, k + 1, k + 2, k + 3];
                let s4 = hsum4(idx.map(|i| folded[i / T][i % T]));
                for (j, i) in idx.into_iter().enumerate() {
                    sums[i / T][i % T] = s4[j];
                }
                k += 4;
            }
            while k < R * T {
                sums[k / T][k % T] = hsum(folded[k / T][k % T]);
                k += 1;
            }
            let done = nb * 32;
            for r in 0..R {
                let mut tail = [0f32; 32];
                if done < cols {
                    // Only plain-float rows end in a partial chunk.
                    $crate::kernels::scalar::tail(B::DTYPE, w.add(r * rb + nb * B::BYTES), &mut tail[..cols - done]);
                }
                for t in 0..T {
                    let mut sum = sums[r][t];
                    for (j, wt) in tail[..cols - done].iter().enumerate() {
                        sum += wt * *x.add(t * cols + done + j);
                    }
                    *out.add(r * rs + t * ts) = sum;
                }
            }
        }

        /// Many tokens (prefill): dequantize PANEL_R rows into an f32 panel once, then run a
        /// PANEL_R × PANEL_T register tile over all tokens.
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        unsafe fn gemm<B: Block>(w: *const u8, rb: usize, rows: usize, cols: usize, x: *const f32, n: usize, out: *mut f32, rs: usize, ts: usize) {
            let mut buf = vec![0f32; PANEL_R * cols]; // (PANEL_R, cols)
            let p = buf.as_mut_ptr();
            let mut r = 0;
            while r < rows {
                let nr = (rows - r).min(PANEL_R);
                for i in 0..nr {
                    dequant_b::<B>(w.add((r + i) * rb), cols, p.add(i * cols));
                }
                if nr < PANEL_R {
                    // The tile always computes PANEL_R rows; missing ones read zeros.
                    std::ptr::write_bytes(p.add(nr * cols), 0, (PANEL_R - nr) * cols);
                }
                let mut t = 0;
                while t + PANEL_T <= n {
                    let acc = micro::<PANEL_T>(p, cols, x.add(t * cols));
                    for i in 0..nr {
                        for k in 0..PANEL_T {
                            *out.add((r + i) * rs + (t + k) * ts) = acc[i][k];
                        }
                    }
                    t += PANEL_T;
                }
                while t < n {
                    let acc = micro::<1>(p, cols, x.add(t * cols));
                    for i in 0..nr {
                        *out.add((r + i) * rs + t * ts) = acc[i][0];
                    }
                    t += 1;
                }
                r += nr;
            }
        }

        /// PANEL_R f32 rows (`wf`, (PANEL_R, cols)) times T activation rows.
        $(#[$attr])*
        #[inline]
        unsafe fn micro<const T: usize>(wf: *const f32, cols: usize, x: *const f32) -> [[f32; T]; PANEL_R] {
            let mut acc = [[zero(); T]; PANEL_R];
            let nv = cols / LANES;
            for k in 0..nv {
                let off = k * LANES;
                let mut xv = [zero(); T];
                for t in 0..T {
                    xv[t] = loadu(x.add(t * cols + off));
                }
                for i in 0..PANEL_R {
                    let wv = loadu(wf.add(i * cols + off));
                    for t in 0..T {
                        acc[i][t] = fma(wv, xv[t], acc[i][t]);
                    }
                }
            }
            let mut out = [[0f32; T]; PANEL_R];
            for i in 0..PANEL_R {
                if T == 4 {
                    let s4 = hsum4([acc[i][0], acc[i][1 % T], acc[i][2 % T], acc[i][3 % T]]);
                    out[i].copy_from_slice(&s4[..T]);
                } else {
                    for t in 0..T {
                        out[i][t] = hsum(acc[i][t]);
                    }
                }
            }
            for k in nv * LANES..cols {
                for i in 0..PANEL_R {
                    for t in 0..T {
                        out[i][t] += *wf.add(i * cols + k) * *x.add(t * cols + k);
                    }
                }
            }
            out
        }

        /// See [`Kernels::dequantize_row`](super::Kernels::dequantize_row).
        ///
        /// # Safety
        /// The CPU must have the module's features; `bytes` must hold `out.len()` values.
        $(#[$attr])*
        pub unsafe fn dequantize_row(dtype: DType, bytes: &[u8], out: &mut [f32]) {
            let (p, n, o) = (bytes.as_ptr(), out.len(), out.as_mut_ptr());
            match dtype {
                DType::F32 => dequant_b::<BF32>(p, n, o),
                DType::F16 => dequant_b::<BF16>(p, n, o),
                DType::BF16 => dequant_b::<BBf16>(p, n, o),
                DType::Q8_0 => dequant_b::<BQ8_0>(p, n, o),
                DType::Q4_0 => dequant_b::<BQ4_0>(p, n, o),
                DType::Q4_1 => dequant_b::<BQ4_1>(p, n, o),
            }
        }

        $(#[$attr])*
        #[inline]
        unsafe fn dequant_b<B: Block>(p: *const u8, cols: usize, out: *mut f32) {
            let nb = cols / 32;
            let mut s = Scales::ZERO;
            let mut g0 = 0;
            while g0 < nb {
                let g = (nb - g0).min(SCALE_GROUP);
                B::scales(p.add(g0 * B::BYTES), g, &mut s);
                for j in 0..g {
                    let b = g0 + j;
                    let w = B::load(p.add(b * B::BYTES), &s, j);
                    for i in 0..NB {
                        storeu(out.add(b * 32 + i * LANES), w[i]);
                    }
                }
                g0 += g;
            }
            let done = nb * 32;
            if done < cols {
                let tail = std::slice::from_raw_parts_mut(out.add(done), cols - done);
                $crate::kernels::scalar::tail(B::DTYPE, p.add(nb * B::BYTES), tail);
            }
        }

        /// # Safety
        /// The CPU must have the module's features; `a` and `b` must be equally long.
        $(#[$attr])*
        pub unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
            dot_ptr(a.as_ptr(), b.as_ptr(), a.len())
        }

        $(#[$attr])*
        #[inline]
        unsafe fn dot_ptr(a: *const f32, b: *const f32, len: usize) -> f32 {
            let nv = len / LANES;
            let mut acc = [zero(); NACC];
            for k in 0..nv {
                acc[k % NACC] = fma(loadu(a.add(k * LANES)), loadu(b.add(k * LANES)), acc[k % NACC]);
            }
            let mut s = acc[0];
            for i in 1..NACC {
                s = add(s, acc[i]);
            }
            let mut sum = hsum(s);
            for k in nv * LANES..len {
                sum += *a.add(k) * *b.add(k);
            }
            sum
        }

        /// See [`Kernels::attend`](super::Kernels::attend).
        ///
        /// # Safety
        /// The CPU must have the module's features; the lengths must be as that method checks.
        $(#[$attr])*
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn attend(
            q: &[f32],
            keys: &[f32],
            values: &[f32],
            positions: usize,
            hd: usize,
            scale: f32,
            scores: &mut [f32],
            out: &mut [f32],
        ) {
            let group = q.len() / hd;
            let n = positions;
            let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
            let (sp, op) = (scores.as_mut_ptr(), out.as_mut_ptr());
            let nv = hd / LANES;
            let done = nv * LANES;
            // Scores, four key rows at a time: each row is read once for all heads of the
            // group, and the four dot products of a head are summed across lanes together.
            let mut j = 0;
            while j + 4 <= n {
                for g in 0..group {
                    let qg = qp.add(g * hd);
                    let mut acc = [zero(); 4];
                    for k in 0..nv {
                        let qv = loadu(qg.add(k * LANES));
                        for t in 0..4 {
                            acc[t] = fma(qv, loadu(kp.add((j + t) * hd + k * LANES)), acc[t]);
                        }
                    }
                    let mut s4 = hsum4(acc);
                    for t in 0..4 {
                        for k in done..hd {
                            s4[t] += *qg.add(k) * *kp.add((j + t) * hd + k);
                        }
                        *sp.add(g * n + j + t) = s4[t] * scale;
                    }
                }
                j += 4;
            }
            while j < n {
                for g in 0..group {
                    *sp.add(g * n + j) = dot_ptr(qp.add(g * hd), kp.add(j * hd), hd) * scale;
                }
                j += 1;
            }
            for g in 0..group {
                $crate::kernels::softmax(&mut scores[g * n..(g + 1) * n]);
            }
            // The value rows mixed into accumulators held in registers, up to four vectors
            // of two heads at a time (eight independent FMA chains), not through memory.
            let mut g = 0;
            while g < group {
                let heads = if g + 2 <= group { 2 } else { 1 };
                let mut k = 0;
                while k < nv {
                    let c = if k + 4 <= nv { 4 } else { 1 };
                    match (heads, c) {
                        (2, 4) => mix::<2, 4>(sp.add(g * n), n, vp, hd, k * LANES, op.add(g * hd)),
                        (2, _) => mix::<2, 1>(sp.add(g * n), n, vp, hd, k * LANES, op.add(g * hd)),
                        (_, 4) => mix::<1, 4>(sp.add(g * n), n, vp, hd, k * LANES, op.add(g * hd)),
                        _ => mix::<1, 1>(sp.add(g * n), n, vp, hd, k * LANES, op.add(g * hd)),
                    }
                    k += c;
                }
                for h in g..g + heads {
                    for d in done..hd {
                        let mut sum = 0.0;
                        for j in 0..n {
                            sum += *sp.add(h * n + j) * *vp.add(j * hd + d);
                        }
                        *op.add(h * hd + d) = sum;
                    }
                }
                g += heads;
            }
        }

        /// `out[h·hd + off ..][.. C·LANES] = Σ_j scores[h·n + j] · values[j·hd + off ..]` for
        /// the G heads whose scores start at `s` and outputs at `o`.
        $(#[$attr])*
        #[inline]
        unsafe fn mix<const G: usize, const C: usize>(
            s: *const f32,
            n: usize,
            v: *const f32,
            hd: usize,
            off: usize,
            o: *mut f32,
        ) {
            let mut acc = [[zero(); C]; G];
            for j in 0..n {
                let row = v.add(j * hd + off);
                let mut vv = [zero(); C];
                for c in 0..C {
                    vv[c] = loadu(row.add(c * LANES));
                }
                for h in 0..G {
                    let a = splat(*s.add(h * n + j));
                    for c in 0..C {
                        acc[h][c] = fma(a, vv[c], acc[h][c]);
                    }
                }
            }
            for h in 0..G {
                for c in 0..C {
                    storeu(o.add(h * hd + off + c * LANES), acc[h][c]);
                }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use simd_kernels;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_bit_trick_matches_half_on_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }
}
