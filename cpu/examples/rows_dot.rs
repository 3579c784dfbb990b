//! Kernel microbenchmark: one matrix-times-activations call of the best kernels this CPU has,
//! for 1, 2 and 4 tokens, best of seven rounds.
//!
//! `cargo run --release -p mdi-cpu --example rows_dot -- [q4_1|q4_0|q8_0] ROWS COLS MATRICES`
//! (defaults: q4_1 1536 576 1). Several matrices (their total larger than the last-level
//! cache) time the weights streaming from memory, as in decoding; one small matrix times the
//! kernel with its weights in cache. Weights are random bytes with small f16 scales.
//! `ISA=avx2` (or another name `Isa::from_name` knows) times that module's kernels instead.

use mdi_core::DType;
use mdi_cpu::Kernels;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dtype = match args.get(1).map(|s| s.as_str()).unwrap_or("q4_1") {
        "q8_0" => DType::Q8_0,
        "q4_0" => DType::Q4_0,
        "q4_1" => DType::Q4_1,
        other => panic!("format {other:?}: one of q4_1, q4_0, q8_0"),
    };
    let block = dtype.bytes_for(32).expect("a block format");
    let rows: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1536);
    let cols: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(576);
    let mats: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let k = match std::env::var("ISA") {
        Ok(name) => mdi_cpu::Isa::from_name(&name)
            .and_then(Kernels::new)
            .unwrap_or_else(|| panic!("ISA={name}: not a kernel module this CPU runs")),
        Err(_) => Kernels::best(),
    };
    println!("kernels: {}", k.isa());
    let rb = dtype
        .bytes_for(cols)
        .expect("COLS a whole number of 32-value blocks");
    let mut seed = 12345u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut w = vec![0u8; rb * rows * mats];
    for (i, b) in w.iter_mut().enumerate() {
        *b = rnd() as u8;
        // Every block's f16 scale (and Q4_1 minimum) about 1/16: high bytes 0x2c.
        let off = (i % rb) % block;
        if off == 1 || (dtype == DType::Q4_1 && off == 3) {
            *b = 0x2c;
        }
    }
    for t in [1usize, 2, 4] {
        let xs: Vec<f32> = (0..t * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut out = vec![0f32; rows * t];
        let mut best = f64::MAX;
        for _ in 0..7 {
            let reps = (200 / mats).max(3);
            let t0 = Instant::now();
            for _ in 0..reps {
                for m in 0..mats {
                    k.rows_dot(
                        dtype,
                        &w[m * rb * rows..(m + 1) * rb * rows],
                        cols,
                        &xs,
                        &mut out,
                    );
                }
            }
            let dt = t0.elapsed().as_secs_f64() / (reps * mats) as f64;
            best = best.min(dt);
        }
        let bytes = (rb * rows) as f64;
        println!(
            "{dtype} {rows}x{cols} ×{mats}, {t} token(s): {:.1} µs per matrix, {:.2} GB/s, {:.2} ns per row and block",
            best * 1e6,
            bytes / best / 1e9,
            best * 1e9 / (rows * cols / 32) as f64
        );
    }
}
