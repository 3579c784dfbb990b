//! Every SIMD kernel of the CPU engine this machine can run (AVX-512, AVX2, NEON, simd128)
//! computes what the scalar reference computes, and the scalar reference what the oracle
//! computes: row·activation products for every stored format (one to 17 activation rows, so
//! both the in-register and the panel paths), row dequantization, dot products and grouped
//! attention, on fresh random inputs with odd sizes. A wrong nibble order, a lost tail, a
//! mis-strided tile or a softmax over the wrong span fails here. The seed is printed.
//!
//! The same tests run compiled to wasm32 in Node (`scripts/test-browser.sh`): built with
//! `simd128` they check the simd128 kernels a browser node runs, and fail if that set is
//! missing; built without, the scalar path a browser without SIMD falls back to.

use anyhow::{ensure, Result};
use mdi_core::oracle::{matmul, Mat};
use mdi_core::quant::{dequantize, quantize};
use mdi_core::sampling::Rng;
use mdi_core::DType;
use mdi_cpu::kernels::row_bytes;
use mdi_cpu::Kernels;

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// Progress lines: stderr natively, the runner's console on wasm32.
macro_rules! note {
    ($($t:tt)*) => {{
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!($($t)*);
        #[cfg(target_arch = "wasm32")]
        wasm_bindgen_test::console_log!($($t)*);
    }};
}

fn seed() -> u64 {
    #[cfg(not(target_arch = "wasm32"))]
    let s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    // wasm32-unknown-unknown has no clock of its own: the host's, in microseconds.
    #[cfg(target_arch = "wasm32")]
    let s = (js_sys::Date::now() * 1000.0) as u64;
    note!("seed {s}");
    s
}

fn random(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
}

fn simd_sets() -> Vec<Kernels> {
    let sets: Vec<Kernels> = Kernels::available()
        .into_iter()
        .filter(|k| *k != Kernels::scalar())
        .collect();
    note!(
        "SIMD sets on this machine: {:?}",
        sets.iter().map(|k| k.isa().name()).collect::<Vec<_>>()
    );
    // A module built with simd128 must run the simd128 kernels (else this file would test
    // only the scalar path and pass).
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    assert_eq!(
        sets.iter().map(|k| k.isa()).collect::<Vec<_>>(),
        [mdi_cpu::Isa::Simd128]
    );
    sets
}

/// Columns to try for a format: whole blocks for the block formats (up to 257 blocks, past
/// what the one-token Q4 kernel keeps on the stack), odd counts for floats.
fn col_sizes(dtype: DType) -> Vec<usize> {
    if dtype.is_quantized() {
        vec![32, 96, 160, 576, 8224]
    } else {
        vec![1, 7, 33, 67, 131]
    }
}

/// |got − want| ≤ tol · Σ|w·x| for every output: the bound of f32 rounding in any order.
fn check_products(
    what: &str,
    got: &[f32],
    want: &[f32],
    w: &[f32],
    xs: &[f32],
    cols: usize,
    tol: f32,
) -> Result<()> {
    let n = xs.len() / cols;
    for (i, (g, e)) in got.iter().zip(want).enumerate() {
        let (r, t) = (i / n, i % n);
        let scale: f32 = w[r * cols..(r + 1) * cols]
            .iter()
            .zip(&xs[t * cols..(t + 1) * cols])
            .map(|(a, b)| (a * b).abs())
            .sum();
        ensure!(
            (g - e).abs() <= tol * scale.max(1e-6),
            "{what}: row {r} token {t}: {g} vs {e} (scale {scale})"
        );
    }
    Ok(())
}

#[test]
fn rows_dot_matches_scalar_and_oracle_for_every_format() -> Result<()> {
    let mut rng = Rng::new(seed());
    let sets = simd_sets();
    let scalar = Kernels::scalar();
    for dtype in DType::ALL {
        for cols in col_sizes(dtype) {
            for rows in [1usize, 7, 37] {
                let w = quantize(dtype, &random(&mut rng, rows * cols));
                assert_eq!(w.len(), rows * row_bytes(dtype, cols));
                let mut wf = vec![0f32; rows * cols];
                dequantize(dtype, &w, &mut wf);
                for n in [1usize, 2, 3, 4, 5, 6, 7, 9, 13, 17] {
                    let xs = random(&mut rng, n * cols);
                    let what = format!("{dtype} rows {rows} cols {cols} tokens {n}");
                    // The oracle: dequantized weights, y (n, rows); ours is (rows, n).
                    let mut oracle = vec![0f32; n * rows];
                    matmul(
                        &xs,
                        &Mat {
                            rows,
                            cols,
                            data: wf.clone(),
                        },
                        &mut oracle,
                    );
                    let oracle_t: Vec<f32> = (0..rows * n)
                        .map(|i| oracle[(i % n) * rows + i / n])
                        .collect();
                    let mut reference = vec![0f32; rows * n];
                    scalar.rows_dot(dtype, &w, cols, &xs, &mut reference);
                    check_products(
                        &format!("scalar {what}"),
                        &reference,
                        &oracle_t,
                        &wf,
                        &xs,
                        cols,
                        1e-5,
                    )?;
                    for k in &sets {
                        let mut got = vec![f32::NAN; rows * n];
                        k.rows_dot(dtype, &w, cols, &xs, &mut got);
                        check_products(
                            &format!("{} {what}", k.isa()),
                            &got,
                            &reference,
                            &wf,
                            &xs,
                            cols,
                            1e-5,
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Strided outputs (a task writing its rows of every token's output in place) hold exactly
/// what the contiguous call computes, and nothing between them is touched.
#[test]
fn rows_dot_strided_writes_the_same_values_only_where_told() -> Result<()> {
    let mut rng = Rng::new(seed());
    for k in Kernels::available() {
        for dtype in DType::ALL {
            let cols = if dtype.is_quantized() { 96 } else { 40 };
            let rows = 13;
            let w = quantize(dtype, &random(&mut rng, rows * cols));
            // One token (single-row kernels), 2..4 (fused), 5, and 17 (the panel kernel).
            for n in [1usize, 2, 3, 4, 5, 17] {
                let xs = random(&mut rng, n * cols);
                let mut want = vec![0f32; rows * n]; // (rows, n)
                k.rows_dot(dtype, &w, cols, &xs, &mut want);
                // Token-major with 3 spare values after each token's rows, and row-major
                // with a spare value after each row.
                for (rs, ts) in [(1, rows + 3), (n + 1, 1)] {
                    let len = (rows - 1) * rs + (n - 1) * ts + 1;
                    let mut got = vec![f32::NAN; len + 2];
                    // SAFETY: every (r, t) lands inside `got` (its last index is len − 1 + 1),
                    // which nothing else touches.
                    unsafe {
                        k.rows_dot_strided(dtype, &w, cols, &xs, got.as_mut_ptr().add(1), rs, ts)
                    };
                    let mut written = vec![false; got.len()];
                    for r in 0..rows {
                        for t in 0..n {
                            let i = 1 + r * rs + t * ts;
                            written[i] = true;
                            ensure!(
                                got[i].to_bits() == want[r * n + t].to_bits(),
                                "{} {dtype} n {n} stride ({rs}, {ts}): row {r} token {t}: {} vs {}",
                                k.isa(),
                                got[i],
                                want[r * n + t]
                            );
                        }
                    }
                    ensure!(
                        got.iter().zip(&written).all(|(v, w)| *w || v.is_nan()),
                        "{} {dtype} n {n} stride ({rs}, {ts}): wrote outside its outputs",
                        k.isa()
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn dequantize_row_matches_the_reference_for_every_format() -> Result<()> {
    let mut rng = Rng::new(seed());
    for dtype in DType::ALL {
        for cols in col_sizes(dtype) {
            // Large values too, so f16 and bf16 rounding and the block scales are exercised.
            let values: Vec<f32> = random(&mut rng, cols).iter().map(|v| v * 300.0).collect();
            let bytes = quantize(dtype, &values);
            let mut want = vec![0f32; cols];
            dequantize(dtype, &bytes, &mut want);
            for k in Kernels::available() {
                let mut got = vec![f32::NAN; cols];
                k.dequantize_row(dtype, &bytes, &mut got);
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Q4_1 is d·q + m in one rounding (FMA) on SIMD, two in scalar.
                    let tol = if dtype == DType::Q4_1 {
                        w.abs() * 2e-7 + 1e-6
                    } else {
                        0.0
                    };
                    ensure!(
                        (g - w).abs() <= tol,
                        "{} {dtype} cols {cols} value {j}: {g} vs {w}",
                        k.isa()
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn dot_matches_scalar_on_odd_lengths() -> Result<()> {
    let mut rng = Rng::new(seed());
    for len in [1usize, 3, 15, 16, 17, 63, 64, 65, 577] {
        let (a, b) = (random(&mut rng, len), random(&mut rng, len));
        let want = Kernels::scalar().dot(&a, &b);
        let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
        for k in Kernels::available() {
            let got = k.dot(&a, &b);
            ensure!(
                (got - want).abs() <= 1e-5 * scale,
                "{} dot of {len}: {got} vs {want}",
                k.isa()
            );
        }
    }
    Ok(())
}

#[test]
fn silu_mul_matches_the_plain_formula_in_every_set() -> Result<()> {
    let mut rng = Rng::new(seed());
    for len in [1usize, 7, 16, 17, 100, 1537] {
        // Activations well past the exponential's useful range on both sides too.
        let gate: Vec<f32> = random(&mut rng, len).iter().map(|v| v * 40.0).collect();
        let up = random(&mut rng, len);
        for k in Kernels::available() {
            let mut got = gate.clone();
            k.silu_mul(&mut got, &up);
            for ((g, u), y) in gate.iter().zip(&up).zip(&got) {
                let want = g / (1.0 + (-g).exp()) * u;
                ensure!(
                    (y - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{} silu_mul of {len}: {g}, {u} gave {y}, want {want}",
                    k.isa()
                );
            }
        }
    }
    Ok(())
}

/// Attention written out plainly, as the oracle does it, for one head.
fn naive_attention(q: &[f32], keys: &[f32], values: &[f32], n: usize, scale: f32) -> Vec<f32> {
    let hd = q.len();
    let mut s: Vec<f32> = (0..n)
        .map(|j| {
            q.iter()
                .zip(&keys[j * hd..(j + 1) * hd])
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale
        })
        .collect();
    mdi_core::oracle::softmax(&mut s);
    let mut out = vec![0f32; hd];
    for (j, a) in s.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
            *o += a * v;
        }
    }
    out
}

#[test]
fn attention_matches_scalar_and_the_plain_formula() -> Result<()> {
    let mut rng = Rng::new(seed());
    for hd in [2usize, 10, 16, 64, 66, 128] {
        for group in [1usize, 3, 4] {
            for positions in [1usize, 5, 33] {
                let cap = positions + 3; // rows past the visible ones must not matter
                let q = random(&mut rng, group * hd);
                let keys = random(&mut rng, cap * hd);
                let values = random(&mut rng, cap * hd);
                let scale = 1.0 / (hd as f32).sqrt();
                let want: Vec<f32> = q
                    .chunks_exact(hd)
                    .flat_map(|qh| naive_attention(qh, &keys, &values, positions, scale))
                    .collect();
                for k in Kernels::available() {
                    let mut scores = vec![f32::NAN; group * positions];
                    let mut out = vec![f32::NAN; group * hd];
                    k.attend(
                        &q,
                        &keys,
                        &values,
                        positions,
                        hd,
                        scale,
                        &mut scores,
                        &mut out,
                    );
                    for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                        ensure!(
                            (g - w).abs() <= 1e-5,
                            "{} attention hd {hd} group {group} positions {positions} value {i}: {g} vs {w}",
                            k.isa()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_best_set_is_chosen_and_every_reported_set_is_supported() {
    let all = Kernels::available();
    assert_eq!(all[0], Kernels::best());
    assert_eq!(all.last().copied(), Some(Kernels::scalar()));
    for k in &all {
        assert!(k.isa().supported());
        assert_eq!(mdi_cpu::Isa::from_name(k.isa().name()), Some(k.isa()));
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        assert_eq!(Kernels::best().isa(), mdi_cpu::Isa::Avx512);
    }
}
