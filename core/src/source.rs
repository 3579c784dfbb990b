//! Ranged byte sources. The core never opens files or sockets itself: a node hands it
//! something that can read `len` bytes at `offset`: a file natively, an HTTP Range request
//! in the browser, a `Vec<u8>` in tests. Loading layers `[a, b)` reads only their bytes.

use crate::error::{Error, Result};

/// Something that holds bytes and can read any range of them.
pub trait ByteSource {
    /// A name for error messages (a path or URL).
    fn name(&self) -> &str;
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Whether the source holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fill `buf` with the bytes starting at `offset`. Fails if the range passes the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Read `len` bytes at `offset` into a fresh vector, checking the range first so that a
    /// corrupt length field cannot make us allocate more than the source holds.
    fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let end = offset.checked_add(len).ok_or_else(|| Error::Truncated {
            file: self.name().to_string(),
            what: what.to_string(),
            needed: u64::MAX,
            len: self.len(),
        })?;
        if end > self.len() {
            return Err(Error::Truncated {
                file: self.name().to_string(),
                what: what.to_string(),
                needed: end,
                len: self.len(),
            });
        }
        // On wasm32 a range of the file can be larger than the address space.
        let n = usize::try_from(len).map_err(|_| Error::Read {
            source_name: self.name().to_string(),
            start: offset,
            end,
            reason: format!("{what}: {len} bytes do not fit in memory"),
        })?;
        let mut buf = vec![0u8; n];
        self.read_at(offset, &mut buf)?;
        Ok(buf)
    }
}

/// Bytes held in memory, named for error messages.
#[derive(Debug, Clone)]
pub struct MemSource {
    name: String,
    bytes: Vec<u8>,
}

impl MemSource {
    pub fn new(name: impl Into<String>, bytes: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            bytes,
        }
    }
}

impl ByteSource for MemSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let start = usize::try_from(offset).ok();
        let end = start.and_then(|s| s.checked_add(buf.len()));
        match (start, end) {
            (Some(s), Some(e)) if e <= self.bytes.len() => {
                buf.copy_from_slice(&self.bytes[s..e]);
                Ok(())
            }
            _ => Err(Error::Read {
                source_name: self.name.clone(),
                start: offset,
                end: offset.saturating_add(buf.len() as u64),
                reason: format!("past the end ({} bytes)", self.bytes.len()),
            }),
        }
    }
}

impl<T: ByteSource + ?Sized> ByteSource for &T {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        (**self).read_at(offset, buf)
    }
}
