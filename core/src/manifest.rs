//! The model manifest: what a server publishes so that a node can fetch only its own layers.
//!
//! It carries the configuration, the tokenizer and chat template, the files (length and
//! sha256), and the byte range of every tensor, grouped by layer (the embedding, final norm and
//! head apart). A node turns its assigned [`StageSpec`] into the few byte ranges it needs
//! ([`Manifest::ranges`]), downloads them (HTTP Range natively and in the browser), holds them
//! in a [`SparseSource`], and loads its stage through a [`ManifestStore`] exactly as it would
//! from the whole file.
//!
//! A manifest comes from the network, so [`Manifest::validate`] checks the configuration, every
//! tensor's shape against it, every size against the tensor's type and shape and every range
//! against its file (checked `u64` sums) before anything is allocated.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::quant::DType;
use crate::source::ByteSource;
use crate::weights::{Naming, Role, StageSpec, TensorLocation, TensorStore, LAYER_ROLES};

/// One file of the model as served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Where to fetch it (absolute, or relative to the manifest's URL).
    pub url: String,
    pub len: u64,
    /// Hex SHA-256 of the whole file: the key of browser caches.
    pub sha256: String,
}

/// One tensor: type, shape and where its bytes are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    #[serde(flatten)]
    pub at: TensorLocation,
}

/// A model as a server publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The model's id, as `/v1/models` lists it.
    pub model: String,
    pub config: Config,
    pub naming: Naming,
    /// `tokenizer.json`, for nodes that tokenize.
    pub tokenizer: Option<String>,
    pub chat_template: Option<String>,
    pub files: Vec<ManifestFile>,
    /// Tensors outside the blocks: embedding, final norm, LM head.
    pub global: Vec<ManifestTensor>,
    /// Each block's tensors, by layer.
    pub layers: Vec<Vec<ManifestTensor>>,
}

/// A contiguous byte range of one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRange {
    pub file: usize,
    pub start: u64,
    pub end: u64,
}

impl FileRange {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

const GLOBAL_ROLES: [Role; 3] = [Role::Embed, Role::OutputNorm, Role::Head];

/// The tensors a stage holds, as (role, layer): exactly what [`crate::StageWeights::load`]
/// reads (biases only when the model has them).
pub fn stage_tensors(config: &Config, spec: &StageSpec) -> Vec<(Role, usize)> {
    let mut out = Vec::new();
    if spec.embed || (spec.head && config.tied_embeddings) {
        out.push((Role::Embed, 0));
    }
    if spec.head {
        out.push((Role::OutputNorm, 0));
        if !config.tied_embeddings {
            out.push((Role::Head, 0));
        }
    }
    for layer in spec.layers.clone() {
        for role in LAYER_ROLES {
            if matches!(role, Role::Bq | Role::Bk | Role::Bv) && !config.qkv_bias {
                continue;
            }
            out.push((role, layer));
        }
    }
    out
}

impl Manifest {
    /// Describe the model in `store` (every tensor a stage may need).
    pub fn build(
        model: impl Into<String>,
        config: &Config,
        naming: Naming,
        store: &dyn TensorStore,
        files: Vec<ManifestFile>,
        tokenizer: Option<String>,
        chat_template: Option<String>,
    ) -> Result<Self> {
        let entry = |role: Role, layer: usize| -> Result<Option<ManifestTensor>> {
            let name = naming.tensor_name(role, layer);
            let Some((dtype, shape)) = store.info(&name) else {
                return Ok(None);
            };
            let at = store.locate(&name).ok_or_else(|| Error::MissingTensor {
                file: store.file().to_string(),
                tensor: name.clone(),
            })?;
            Ok(Some(ManifestTensor {
                name,
                dtype,
                shape,
                at,
            }))
        };
        let mut global = Vec::new();
        for role in GLOBAL_ROLES {
            global.extend(entry(role, 0)?);
        }
        let mut layers = Vec::with_capacity(config.n_layers);
        for layer in 0..config.n_layers {
            let mut ts = Vec::new();
            for role in LAYER_ROLES {
                ts.extend(entry(role, layer)?);
            }
            layers.push(ts);
        }
        let m = Self {
            model: model.into(),
            config: config.clone(),
            naming,
            tokenizer,
            chat_template,
            files,
            global,
            layers,
        };
        m.validate()?;
        Ok(m)
    }

    fn all(&self) -> impl Iterator<Item = &ManifestTensor> {
        self.global.iter().chain(self.layers.iter().flatten())
    }

    /// The entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&ManifestTensor> {
        self.all().find(|t| t.name == name)
    }

    /// Checks a manifest from the network: a sane configuration, one entry list per layer,
    /// sizes that match types and shapes, ranges inside their files.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Error::format("model manifest", what);
        self.config.validate()?;
        if self.layers.len() != self.config.n_layers {
            return Err(bad(format!(
                "{} layer groups for a model of {} layers",
                self.layers.len(),
                self.config.n_layers
            )));
        }
        // Tensors the model uses must have the shapes its configuration implies: a node sizes
        // its downloads by them before it can check anything else.
        let whole = StageSpec::whole(&self.config);
        for (role, layer) in stage_tensors(&self.config, &whole) {
            let name = self.naming.tensor_name(role, layer);
            if let Some(t) = self.tensor(&name) {
                let want = role.shape(&self.config);
                if t.shape != want {
                    return Err(bad(format!(
                        "tensor `{name}` has shape {:?}, expected {want:?}",
                        t.shape
                    )));
                }
            }
        }
        for t in self.all() {
            let n = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor `{}`: shape {:?} overflows",
                        t.name, t.shape
                    ))
                })?;
            let want = t.dtype.bytes_for(n).map(|b| b as u64);
            if want != Some(t.at.len) {
                return Err(bad(format!(
                    "tensor `{}`: {} bytes for {n} values of {:?}",
                    t.name, t.at.len, t.dtype
                )));
            }
            let file = self.files.get(t.at.file).ok_or_else(|| {
                bad(format!(
                    "tensor `{}` is in file {}, which is not listed",
                    t.name, t.at.file
                ))
            })?;
            let end = t.at.offset.checked_add(t.at.len);
            if end.is_none_or(|e| e > file.len) {
                return Err(bad(format!(
                    "tensor `{}` at bytes {}+{} passes the end of {} ({} bytes)",
                    t.name, t.at.offset, t.at.len, file.url, file.len
                )));
            }
        }
        Ok(())
    }

    /// The tensors a stage holds, in file order.
    pub fn stage_tensors(&self, spec: &StageSpec) -> Result<Vec<&ManifestTensor>> {
        spec.validate(&self.config)?;
        let mut out = Vec::new();
        for (role, layer) in stage_tensors(&self.config, spec) {
            let name = self.naming.tensor_name(role, layer);
            let t = self.tensor(&name).ok_or_else(|| Error::MissingTensor {
                file: "model manifest".into(),
                tensor: name.clone(),
            })?;
            out.push(t);
        }
        out.sort_by_key(|t| (t.at.file, t.at.offset));
        Ok(out)
    }

    /// The byte ranges a stage needs, merged where they touch, sorted by file and offset.
    pub fn ranges(&self, spec: &StageSpec) -> Result<Vec<FileRange>> {
        let ranges = self
            .stage_tensors(spec)?
            .into_iter()
            .map(|t| FileRange {
                file: t.at.file,
                start: t.at.offset,
                end: t.at.offset.saturating_add(t.at.len),
            })
            .collect();
        Ok(merge(ranges))
    }

    /// Bytes a stage downloads.
    pub fn stage_bytes(&self, spec: &StageSpec) -> Result<u64> {
        Ok(self
            .ranges(spec)?
            .iter()
            .fold(0u64, |a, r| a.saturating_add(r.len())))
    }
}

/// Sort and merge overlapping or touching ranges of the same file.
pub fn merge(mut ranges: Vec<FileRange>) -> Vec<FileRange> {
    ranges.sort_by_key(|r| (r.file, r.start));
    let mut out: Vec<FileRange> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if last.file == r.file && r.start <= last.end => {
                last.end = last.end.max(r.end)
            }
            _ => out.push(r),
        }
    }
    out
}

/// The parts of `want` not covered by `have` (both merged lists of one file or several).
pub fn missing(want: &[FileRange], have: &[FileRange]) -> Vec<FileRange> {
    let mut out = Vec::new();
    for w in want {
        let mut cur = w.start;
        for h in have
            .iter()
            .filter(|h| h.file == w.file && h.end > w.start && h.start < w.end)
        {
            if h.start > cur {
                out.push(FileRange {
                    file: w.file,
                    start: cur,
                    end: h.start.min(w.end),
                });
            }
            cur = cur.max(h.end);
        }
        if cur < w.end {
            out.push(FileRange {
                file: w.file,
                start: cur,
                end: w.end,
            });
        }
    }
    out
}

/// A file of which only some ranges are present: the pieces a node downloaded. Reading
/// outside them fails, naming the range, so a wrong plan cannot silently read zeros.
#[derive(Debug, Clone)]
pub struct SparseSource {
    name: String,
    len: u64,
    /// Start offset → bytes; pieces never overlap.
    pieces: BTreeMap<u64, Vec<u8>>,
}

impl SparseSource {
    pub fn new(name: impl Into<String>, len: u64) -> Self {
        Self {
            name: name.into(),
            len,
            pieces: BTreeMap::new(),
        }
    }

    /// Adds the bytes of `range` (which must lie inside the file and not overlap a piece).
    pub fn insert(&mut self, start: u64, bytes: Vec<u8>) -> Result<()> {
        let end = start
            .checked_add(bytes.len() as u64)
            .filter(|&e| e <= self.len)
            .ok_or_else(|| Error::Read {
                source_name: self.name.clone(),
                start,
                end: start.saturating_add(bytes.len() as u64),
                reason: format!("piece passes the end ({} bytes)", self.len),
            })?;
        let overlaps = self
            .pieces
            .range(..end)
            .next_back()
            .is_some_and(|(&s, b)| s + b.len() as u64 > start);
        if overlaps {
            return Err(Error::Read {
                source_name: self.name.clone(),
                start,
                end,
                reason: "overlaps a piece already held".into(),
            });
        }
        if !bytes.is_empty() {
            self.pieces.insert(start, bytes);
        }
        Ok(())
    }

    /// The ranges held, merged.
    pub fn held(&self, file: usize) -> Vec<FileRange> {
        merge(
            self.pieces
                .iter()
                .map(|(&s, b)| FileRange {
                    file,
                    start: s,
                    end: s + b.len() as u64,
                })
                .collect(),
        )
    }

    /// Bytes held in memory.
    pub fn held_bytes(&self) -> u64 {
        self.pieces.values().map(|b| b.len() as u64).sum()
    }

    /// Drops every piece outside `keep` (after a re-plan shrank the node's share).
    pub fn retain(&mut self, keep: &[FileRange]) {
        self.pieces.retain(|&s, b| {
            let e = s + b.len() as u64;
            keep.iter().any(|k| k.start < e && s < k.end)
        });
    }
}

impl ByteSource for SparseSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset.saturating_add(buf.len() as u64);
        let mut filled = 0usize;
        let mut pos = offset;
        // Pieces may be adjacent: a read can span several of them.
        while pos < end {
            let piece = self.pieces.range(..=pos).next_back();
            let Some((&s, b)) = piece.filter(|(&s, b)| s + b.len() as u64 > pos) else {
                return Err(Error::Read {
                    source_name: self.name.clone(),
                    start: offset,
                    end,
                    reason: format!("bytes from {pos} were not downloaded"),
                });
            };
            let from = (pos - s) as usize;
            let take = (b.len() - from).min((end - pos) as usize);
            buf[filled..filled + take].copy_from_slice(&b[from..from + take]);
            filled += take;
            pos += take as u64;
        }
        Ok(())
    }
}

/// A [`SparseSource`] that hands a piece over instead of copying it when a read asks for
/// exactly that piece (a node downloads one piece per tensor): loading a stage from it leaves
/// the download empty, so a node needs its share of memory once, not twice, while it loads.
/// Other reads copy, as from a plain [`SparseSource`].
#[derive(Debug)]
pub struct HandOver {
    name: String,
    len: u64,
    inner: std::sync::Mutex<SparseSource>,
}

impl HandOver {
    pub fn new(source: SparseSource) -> Self {
        Self {
            name: source.name.clone(),
            len: source.len,
            inner: std::sync::Mutex::new(source),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SparseSource> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes still held (not yet handed over).
    pub fn held_bytes(&self) -> u64 {
        self.lock().held_bytes()
    }
}

impl ByteSource for HandOver {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.lock().read_at(offset, buf)
    }

    fn read_vec(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut inner = self.lock();
        if inner
            .pieces
            .get(&offset)
            .is_some_and(|b| b.len() as u64 == len)
        {
            if let Some(bytes) = inner.pieces.remove(&offset) {
                return Ok(bytes);
            }
        }
        let end = offset.saturating_add(len);
        if end > self.len {
            return Err(Error::Truncated {
                file: self.name.clone(),
                what: what.to_string(),
                needed: end,
                len: self.len,
            });
        }
        let mut buf = vec![0u8; len as usize];
        inner.read_at(offset, &mut buf)?;
        Ok(buf)
    }
}

/// A tensor store over a manifest and the bytes of its files (typically [`SparseSource`]s).
pub struct ManifestStore<S> {
    manifest: Manifest,
    sources: Vec<S>,
}

impl<S: ByteSource> ManifestStore<S> {
    /// `sources[i]` holds (some of) `manifest.files[i]`.
    pub fn new(manifest: Manifest, sources: Vec<S>) -> Result<Self> {
        if sources.len() != manifest.files.len() {
            return Err(Error::Input(format!(
                "{} sources for a manifest of {} files",
                sources.len(),
                manifest.files.len()
            )));
        }
        Ok(Self { manifest, sources })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn into_sources(self) -> Vec<S> {
        self.sources
    }
}

impl<S: ByteSource> TensorStore for ManifestStore<S> {
    fn file(&self) -> &str {
        &self.manifest.model
    }

    fn tensor_name(&self, role: Role, layer: usize) -> String {
        self.manifest.naming.tensor_name(role, layer)
    }

    fn info(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        self.manifest
            .tensor(name)
            .map(|t| (t.dtype, t.shape.clone()))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let t = self
            .manifest
            .tensor(name)
            .ok_or_else(|| Error::MissingTensor {
                file: self.manifest.model.clone(),
                tensor: name.to_string(),
            })?;
        let src = &self.sources[t.at.file];
        src.read_vec(t.at.offset, t.at.len, &format!("tensor `{name}`"))
    }

    fn locate(&self, name: &str) -> Option<TensorLocation> {
        self.manifest.tensor(name).map(|t| t.at)
    }
}

/// Ranges as `start..end` (for HTTP Range headers and logs).
pub fn as_ranges(ranges: &[FileRange]) -> Vec<(usize, Range<u64>)> {
    ranges.iter().map(|r| (r.file, r.start..r.end)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fr(file: usize, start: u64, end: u64) -> FileRange {
        FileRange { file, start, end }
    }

    #[test]
    fn ranges_merge_and_subtract() {
        let m = merge(vec![
            fr(0, 10, 20),
            fr(0, 20, 25),
            fr(1, 0, 5),
            fr(0, 30, 40),
            fr(0, 12, 15),
        ]);
        assert_eq!(m, vec![fr(0, 10, 25), fr(0, 30, 40), fr(1, 0, 5)]);
        let have = vec![fr(0, 12, 18), fr(0, 30, 50)];
        assert_eq!(
            missing(&m, &have),
            vec![fr(0, 10, 12), fr(0, 18, 25), fr(1, 0, 5)]
        );
        assert!(missing(&m, &m).is_empty());
    }

    #[test]
    fn sparse_source_reads_only_what_it_holds() {
        let mut s = SparseSource::new("f", 100);
        s.insert(10, (10..20).collect()).unwrap();
        s.insert(20, (20..30).collect()).unwrap();
        assert!(s.insert(25, vec![0; 3]).is_err(), "overlap");
        assert!(s.insert(95, vec![0; 10]).is_err(), "past the end");
        let v = s.read_vec(15, 10, "t").unwrap();
        assert_eq!(v, (15..25).collect::<Vec<u8>>());
        let e = s.read_vec(25, 10, "t").unwrap_err().to_string();
        assert!(e.contains("not downloaded"), "{e}");
        assert_eq!(s.held(0), vec![fr(0, 10, 30)]);
        s.retain(&[fr(0, 0, 12)]);
        assert_eq!(s.held_bytes(), 10);
    }

    #[test]
    fn hand_over_moves_whole_pieces_and_copies_the_rest() {
        let mut s = SparseSource::new("f", 100);
        let a: Vec<u8> = (0..10).collect();
        let b: Vec<u8> = (10..30).collect();
        s.insert(10, a.clone()).unwrap();
        s.insert(20, b.clone()).unwrap();
        let h = HandOver::new(s);
        // A read across both pieces copies and leaves them.
        assert_eq!(
            h.read_vec(15, 10, "t").unwrap(),
            [&a[5..], &b[..5]].concat()
        );
        assert_eq!(h.held_bytes(), 30);
        // Exactly one piece: handed over, gone from the source.
        assert_eq!(h.read_vec(20, 20, "t").unwrap(), b);
        assert_eq!(h.held_bytes(), 10);
        assert!(
            h.read_vec(20, 20, "t").is_err(),
            "a piece is handed over once"
        );
        assert!(h.read_vec(95, 10, "t").is_err(), "past the end");
        assert_eq!(h.read_vec(10, 10, "t").unwrap(), a);
        assert_eq!(h.held_bytes(), 0);
    }
}
