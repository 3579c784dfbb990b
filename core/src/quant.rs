//! Element types of stored tensors and their block layouts.
//!
//! Quantized types store values in blocks of 32 with per-block scales (GGML layouts):
//! - `Q8_0`: 34 bytes: f16 `d`, 32 × i8 `q`; value = d·q.
//! - `Q4_0`: 18 bytes: f16 `d`, 16 bytes of nibbles; value j = (lo(byte j) − 8)·d,
//!   value j+16 = (hi(byte j) − 8)·d.
//! - `Q4_1`: 20 bytes: f16 `d`, f16 `m`, 16 bytes of nibbles; value = nibble·d + m, same order.
//!
//! The CPU dequantizes with [`dequantize`]; GPU nodes upload the raw blocks and dequantize
//! inside the shaders, so weights stay quantized in device memory.

use half::{bf16, f16};

/// Values per quantization block.
pub const BLOCK: usize = 32;

/// Storage type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
}

impl DType {
    /// All supported types, for tests and tables.
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q8_0,
        DType::Q4_0,
        DType::Q4_1,
    ];

    /// The GGML type id used in GGUF tensor tables.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q4_1 => 3,
            DType::Q8_0 => 8,
            DType::BF16 => 30,
        }
    }

    /// The type for a GGML type id, if this build supports it.
    pub fn from_ggml_id(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// Values per storage block (1 for plain floats).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => BLOCK,
        }
    }

    /// Bytes per storage block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// Whether values are stored in blocks with scales.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Bytes needed for `n` values, or `None` if `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_len()) {
            return None;
        }
        (n / self.block_len()).checked_mul(self.block_bytes())
    }

    /// Lower-case name as used in kernel keys and messages (`q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q8_0 => "q8_0",
            DType::Q4_0 => "q4_0",
            DType::Q4_1 => "q4_1",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn f16_at(bytes: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([bytes[i], bytes[i + 1]]).to_f32()
}

/// Dequantize `bytes` (a whole number of blocks of `dtype`) into `out`.
///
/// Panics if the lengths disagree: callers size both from the same validated shape.
pub fn dequantize(dtype: DType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(
        Some(bytes.len()),
        dtype.bytes_for(out.len()),
        "dequantize {dtype}: {} bytes for {} values",
        bytes.len(),
        out.len()
    );
    match dtype {
        DType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        DType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(BLOCK).zip(bytes.chunks_exact(34)) {
                let d = f16_at(b, 0);
                for (v, &q) in o.iter_mut().zip(&b[2..34]) {
                    *v = d * (q as i8) as f32;
                }
            }
        }
        DType::Q4_0 => {
            for (o, b) in out.chunks_exact_mut(BLOCK).zip(bytes.chunks_exact(18)) {
                let d = f16_at(b, 0);
                for (j, &q) in b[2..18].iter().enumerate() {
                    o[j] = ((q & 15) as i32 - 8) as f32 * d;
                    o[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        DType::Q4_1 => {
            for (o, b) in out.chunks_exact_mut(BLOCK).zip(bytes.chunks_exact(20)) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                for (j, &q) in b[4..20].iter().enumerate() {
                    o[j] = (q & 15) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
    }
}

/// Quantize (or convert) `values` into `dtype` storage bytes. Used by writers and tests;
/// `values.len()` must be a whole number of blocks.
pub fn quantize(dtype: DType, values: &[f32]) -> Vec<u8> {
    assert_eq!(
        values.len() % dtype.block_len(),
        0,
        "quantize {dtype}: partial block"
    );
    let mut out = Vec::with_capacity(dtype.bytes_for(values.len()).unwrap_or(0));
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend(bf16::from_f32(*v).to_le_bytes())),
        DType::Q8_0 => {
            for block in values.chunks_exact(BLOCK) {
                let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(block.iter().map(|v| ((v * inv).round() as i8) as u8));
            }
        }
        DType::Q4_0 => {
            for block in values.chunks_exact(BLOCK) {
                // Like GGML: the value of largest magnitude maps to −8.
                let max = block
                    .iter()
                    .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
                let d = max / -8.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                let q = |v: f32| ((v * inv + 8.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
        DType::Q4_1 => {
            for block in values.chunks_exact(BLOCK) {
                let min = block.iter().copied().fold(f32::INFINITY, f32::min);
                let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend(f16::from_f32(d).to_le_bytes());
                out.extend(f16::from_f32(min).to_le_bytes());
                let q = |v: f32| (((v - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_then_dequantize_is_close() {
        let values: Vec<f32> = (0..256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 13.0)
            .collect();
        for dtype in DType::ALL {
            let bytes = quantize(dtype, &values);
            assert_eq!(Some(bytes.len()), dtype.bytes_for(values.len()));
            let mut back = vec![0f32; values.len()];
            dequantize(dtype, &bytes, &mut back);
            let amax = values.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = match dtype {
                DType::F32 => 0.0,
                DType::F16 => amax * 1e-3,
                DType::BF16 => amax * 8e-3,
                DType::Q8_0 => amax / 127.0,
                DType::Q4_0 | DType::Q4_1 => amax / 7.0,
            };
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tol, "{dtype}: {a} vs {b} (tol {tol})");
            }
        }
    }
}
