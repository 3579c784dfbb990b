//! CPU side of the GPU weight layouts: repacks GGML-style raw tensor bytes into the 4-byte
//! aligned words the kernels read (see the `mdi-shaders` crate docs and `weights_*.wgsl`).
//!
//! Q8_0 (34-byte) and Q4_0 (18-byte) blocks are not 4-byte aligned and WGSL storage has no u8,
//! so quantized tensors become structure-of-arrays: all block scales first (f16 pairs, or the
//! (d, m) pair of Q4_1, packed in u32), zero-padded to 16 bytes, then all quant bytes in their
//! GGML order. Plain-float tensors are their little-endian bytes read as u32. Every packed
//! tensor is padded to 16 bytes because kernels bind weights as `array<vec4<u32>>`.

use mdi_core::quant::{DType, BLOCK};
use mdi_shaders::WeightFormat;

use crate::error::{Error, Result};

/// The GPU weight format for a stored type (every core type has one).
pub fn weight_format(dtype: DType) -> WeightFormat {
    match dtype {
        DType::F32 => WeightFormat::F32,
        DType::F16 => WeightFormat::F16,
        DType::BF16 => WeightFormat::BF16,
        DType::Q8_0 => WeightFormat::Q8_0,
        DType::Q4_0 => WeightFormat::Q4_0,
        DType::Q4_1 => WeightFormat::Q4_1,
    }
}

/// Sizes of one packed (rows, cols) matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedShape {
    /// Total u32 words (a multiple of 4).
    pub words: usize,
    /// vec4 index where the quant bytes start (0 for plain floats): the kernels' `q_offset`.
    pub q_offset: usize,
}

fn round4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// Words per block of quant bytes and of scales (scales may be fractional: two per word).
fn quant_words_per_block(dtype: DType) -> usize {
    match dtype {
        DType::Q8_0 => 8,
        DType::Q4_0 | DType::Q4_1 => 4,
        _ => 0,
    }
}

/// Checks that a (rows, cols) matrix of `dtype` can be laid out for the kernels.
pub fn check_shape(name: &str, dtype: DType, rows: usize, cols: usize) -> Result<()> {
    let unit = weight_format(dtype).unit();
    if rows == 0 || cols == 0 {
        return Err(Error::tensor(name, format!("empty shape ({rows}, {cols})")));
    }
    if !cols.is_multiple_of(unit) {
        return Err(Error::tensor(
            name,
            format!("{dtype} rows of {cols} values: the GPU kernels need a multiple of {unit}"),
        ));
    }
    Ok(())
}

/// The packed size of a (rows, cols) matrix of `dtype`.
pub fn packed_shape(dtype: DType, rows: usize, cols: usize) -> PackedShape {
    let n = rows * cols;
    if !dtype.is_quantized() {
        // 4-, 2- and 2-byte values: the LE bytes as words.
        return PackedShape {
            words: round4((n * dtype.block_bytes()).div_ceil(4)),
            q_offset: 0,
        };
    }
    let blocks = n / BLOCK;
    let scale_words = match dtype {
        DType::Q4_1 => blocks,
        _ => blocks.div_ceil(2),
    };
    let scale_words = round4(scale_words);
    PackedShape {
        words: scale_words + blocks * quant_words_per_block(dtype),
        q_offset: scale_words / 4,
    }
}

fn le_words(bytes: &[u8], out: &mut Vec<u32>) {
    out.extend(
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
    );
}

/// Repacks the raw bytes of a (rows, cols) matrix of `dtype` (GGML/GGUF block layout, row by
/// row) into the words of the GPU layout.
pub fn repack(name: &str, dtype: DType, raw: &[u8], rows: usize, cols: usize) -> Result<Vec<u32>> {
    check_shape(name, dtype, rows, cols)?;
    let expected = dtype.bytes_for(rows * cols);
    if expected != Some(raw.len()) {
        return Err(Error::tensor(
            name,
            format!(
                "{dtype} ({rows}, {cols}) needs {expected:?} bytes but {} were given",
                raw.len()
            ),
        ));
    }
    let shape = packed_shape(dtype, rows, cols);
    let mut words = Vec::with_capacity(shape.words);
    if !dtype.is_quantized() {
        // cols is a multiple of 8, so the byte count is a multiple of 16.
        le_words(raw, &mut words);
    } else {
        let bb = dtype.block_bytes();
        let blocks = raw.chunks_exact(bb);
        match dtype {
            DType::Q4_1 => le_words_of(blocks.clone().map(|b| &b[0..4]), &mut words),
            _ => {
                // Two f16 scales per word, even block in the low half.
                let scales: Vec<[u8; 2]> = blocks.clone().map(|b| [b[0], b[1]]).collect();
                words.extend(scales.chunks(2).map(|p| {
                    let lo = u16::from_le_bytes(p[0]) as u32;
                    let hi = p.get(1).map_or(0, |h| u16::from_le_bytes(*h) as u32);
                    lo | (hi << 16)
                }));
            }
        }
        words.resize(shape.q_offset * 4, 0);
        let quant_start = if dtype == DType::Q4_1 { 4 } else { 2 };
        le_words_of(blocks.map(|b| &b[quant_start..]), &mut words);
    }
    words.resize(shape.words, 0);
    Ok(words)
}

fn le_words_of<'a>(chunks: impl Iterator<Item = &'a [u8]>, out: &mut Vec<u32>) {
    for c in chunks {
        le_words(c, out);
    }
}

/// Splits `rows` into consecutive ranges whose packed size stays within `max_bytes`, so each
/// range can be bound on its own (the LM head of a big vocabulary exceeds one binding).
pub fn split_rows(
    name: &str,
    dtype: DType,
    rows: usize,
    cols: usize,
    max_bytes: u64,
) -> Result<Vec<std::ops::Range<usize>>> {
    check_shape(name, dtype, rows, cols)?;
    let fits = |r: usize| (packed_shape(dtype, r, cols).words as u64) * 4 <= max_bytes;
    if !fits(1) {
        return Err(Error::Limit {
            what: format!("one row of tensor `{name}` ({dtype}, {cols} values)"),
            needed: packed_shape(dtype, 1, cols).words as u64 * 4,
            limit: max_bytes,
        });
    }
    // Packed size grows by a fixed amount per row plus at most 16 bytes of padding, so start
    // from the estimate and step down to the exact answer.
    let row_bytes = dtype.bytes_for(cols).unwrap_or(usize::MAX) as u64;
    let mut per_part = ((max_bytes.saturating_sub(32) / row_bytes.max(1)) as usize).clamp(1, rows);
    while per_part > 1 && !fits(per_part) {
        per_part -= 1;
    }
    Ok((0..rows)
        .step_by(per_part)
        .map(|s| s..(s + per_part).min(rows))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdi_core::quant::{dequantize, quantize};

    /// Decodes the packed words on the CPU exactly as the WGSL decoders do.
    fn unpack(dtype: DType, words: &[u32], rows: usize, cols: usize) -> Vec<f32> {
        let shape = packed_shape(dtype, rows, cols);
        let half = |h: u32| half::f16::from_bits(h as u16).to_f32();
        let n = rows * cols;
        let mut out = vec![0f32; n];
        let q = &words[shape.q_offset * 4..];
        for (i, o) in out.iter_mut().enumerate() {
            let (b, j) = (i / BLOCK, i % BLOCK);
            *o = match dtype {
                DType::F32 => f32::from_bits(words[i]),
                DType::F16 => half(words[i / 2] >> (16 * (i % 2))),
                DType::BF16 => f32::from_bits((words[i / 2] >> (16 * (i % 2))) << 16),
                DType::Q8_0 => {
                    let d = half(words[b / 2] >> (16 * (b % 2)));
                    let byte = (q[b * 8 + j / 4] >> (8 * (j % 4))) as u8 as i8;
                    d * byte as f32
                }
                DType::Q4_0 | DType::Q4_1 => {
                    let (d, m) = if dtype == DType::Q4_1 {
                        (half(words[b]), half(words[b] >> 16))
                    } else {
                        (
                            half(words[b / 2] >> (16 * (b % 2))),
                            -8.0 * half(words[b / 2] >> (16 * (b % 2))),
                        )
                    };
                    let k = j % 16;
                    let byte = (q[b * 4 + k / 4] >> (8 * (k % 4))) & 0xff;
                    let nib = if j < 16 { byte & 15 } else { byte >> 4 };
                    nib as f32 * d + m
                }
            };
        }
        out
    }

    #[test]
    fn repacked_words_decode_to_the_dequantized_values() {
        let (rows, cols) = (7, 96);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0)
            .collect();
        for dtype in DType::ALL {
            let raw = quantize(dtype, &values);
            let words = repack("t", dtype, &raw, rows, cols).expect("repack");
            assert_eq!(words.len(), packed_shape(dtype, rows, cols).words);
            assert_eq!(words.len() % 4, 0);
            let mut want = vec![0f32; rows * cols];
            dequantize(dtype, &raw, &mut want);
            let got = unpack(dtype, &words, rows, cols);
            for (i, (a, b)) in want.iter().zip(&got).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{dtype} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn quantized_layouts_have_no_per_block_overhead() {
        // 49152 x 576 Q8_0 (the tied LM head of SmolLM2): exactly 34 bytes per block.
        let s = packed_shape(DType::Q8_0, 49152, 576);
        assert_eq!(s.words * 4, 49152 * 576 / 32 * 34);
        let s = packed_shape(DType::Q4_0, 3, 32);
        assert_eq!((s.q_offset, s.words), (1, 4 + 12));
    }

    #[test]
    fn splits_respect_the_limit_and_cover_every_row() {
        for dtype in DType::ALL {
            let parts = split_rows("t", dtype, 37, 128, 1000).expect("split");
            assert_eq!(parts.first().map(|r| r.start), Some(0));
            assert_eq!(parts.last().map(|r| r.end), Some(37));
            for w in parts.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for p in &parts {
                assert!(
                    packed_shape(dtype, p.len(), 128).words * 4 <= 1000,
                    "{dtype} {p:?}"
                );
            }
        }
        assert!(split_rows("t", DType::F32, 4, 1024, 1000).is_err());
        assert!(repack("t", DType::Q4_1, &[0; 20], 1, 30).is_err());
    }
}
