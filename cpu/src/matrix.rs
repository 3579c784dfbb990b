//! Weights as the CPU engine holds them: a matrix keeps its stored bytes (quantized blocks
//! stay quantized), so a node's resident weight memory is its share of the file; norms and
//! biases, a few kilobytes, are f32.

use std::ops::Range;

use mdi_core::weights::RawTensor;
use mdi_core::{DType, Error, Result};

use crate::kernels::row_bytes;

/// A row-major matrix in its stored format: (rows, cols) values, `row_bytes` bytes per row.
#[derive(Debug, Clone)]
pub struct QMatrix {
    name: String,
    dtype: DType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: Vec<u8>, // (rows, row_bytes)
}

impl QMatrix {
    /// Take a stored tensor as it is, checking that its bytes are whole rows of its shape.
    pub fn from_raw(t: RawTensor) -> Result<Self> {
        let (rows, cols) = (t.rows(), t.cols());
        let rb = row_bytes(t.dtype, cols);
        if t.shape.len() > 2 || cols == 0 || rb == 0 || Some(t.bytes.len()) != rows.checked_mul(rb)
        {
            return Err(Error::Format {
                file: t.name,
                what: format!(
                    "{} bytes of {} are not whole rows of shape {:?}",
                    t.bytes.len(),
                    t.dtype,
                    t.shape
                ),
            });
        }
        Ok(Self {
            name: t.name,
            dtype: t.dtype,
            rows,
            cols,
            row_bytes: rb,
            bytes: t.bytes,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }

    /// Bytes held: exactly the stored bytes.
    pub fn bytes_held(&self) -> usize {
        self.bytes.len()
    }

    /// The stored bytes of rows `r`.
    pub fn rows_bytes(&self, r: Range<usize>) -> &[u8] {
        &self.bytes[r.start * self.row_bytes..r.end * self.row_bytes]
    }
}

/// A vector tensor (norm weight, bias) of `len` values, dequantized to f32.
pub fn vector(t: RawTensor, len: usize) -> Result<Vec<f32>> {
    if t.n_elements() != len || t.dtype.bytes_for(len) != Some(t.bytes.len()) {
        return Err(Error::Format {
            file: t.name,
            what: format!(
                "{} bytes of {} with shape {:?} are not a vector of {len}",
                t.bytes.len(),
                t.dtype,
                t.shape
            ),
        });
    }
    Ok(t.to_f32())
}
