//! Where a stage's weights come from. A [`TensorStore`] names tensors in its own format
//! (GGUF `blk.3.attn_q.weight`, Hugging Face `model.layers.3.self_attn.q_proj.weight`) and
//! reads their raw bytes; [`StageWeights::load`] asks only for the tensors of one stage, so a
//! ring node reads only its own layers. Files are not trusted: every tensor's shape is checked
//! against the configuration and its byte count against its type and shape before an engine
//! sees it, and offsets are checked `u64` sums.

use std::ops::Range;

use safetensors::tensor::{Dtype as StDtype, Metadata as StMetadata};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::quant::DType;
use crate::source::ByteSource;

/// The part of the model one ring node runs: layers `[a, b)`, plus the token embedding at
/// the front (starter) and the final norm + LM head at the back (starter, end of the ring).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StageSpec {
    pub layers: Range<usize>,
    pub embed: bool,
    pub head: bool,
}

impl StageSpec {
    /// The whole model on one node.
    pub fn whole(config: &Config) -> Self {
        Self {
            layers: 0..config.n_layers,
            embed: true,
            head: true,
        }
    }

    pub fn validate(&self, config: &Config) -> Result<()> {
        if self.layers.start > self.layers.end || self.layers.end > config.n_layers {
            return Err(Error::Input(format!(
                "layer range {:?} is not inside the model's {} layers",
                self.layers, config.n_layers
            )));
        }
        Ok(())
    }
}

/// The role of a tensor in the model, independent of the file format's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Embed,
    OutputNorm,
    Head,
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    Bq,
    Bk,
    Bv,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// How a weight format names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Naming {
    /// `blk.N.attn_q.weight`, as in GGUF files.
    Gguf,
    /// `model.layers.N.self_attn.q_proj.weight`, as in Hugging Face checkpoints.
    HuggingFace,
}

impl Naming {
    /// The name of the tensor playing `role` (in `layer`, for per-layer roles).
    pub fn tensor_name(self, role: Role, layer: usize) -> String {
        match self {
            Naming::Gguf => {
                let per_layer = |s: &str| format!("blk.{layer}.{s}");
                match role {
                    Role::Embed => "token_embd.weight".into(),
                    Role::OutputNorm => "output_norm.weight".into(),
                    Role::Head => "output.weight".into(),
                    Role::AttnNorm => per_layer("attn_norm.weight"),
                    Role::Wq => per_layer("attn_q.weight"),
                    Role::Wk => per_layer("attn_k.weight"),
                    Role::Wv => per_layer("attn_v.weight"),
                    Role::Wo => per_layer("attn_output.weight"),
                    Role::Bq => per_layer("attn_q.bias"),
                    Role::Bk => per_layer("attn_k.bias"),
                    Role::Bv => per_layer("attn_v.bias"),
                    Role::FfnNorm => per_layer("ffn_norm.weight"),
                    Role::Gate => per_layer("ffn_gate.weight"),
                    Role::Up => per_layer("ffn_up.weight"),
                    Role::Down => per_layer("ffn_down.weight"),
                }
            }
            Naming::HuggingFace => {
                let per_layer = |s: &str| format!("model.layers.{layer}.{s}");
                match role {
                    Role::Embed => "model.embed_tokens.weight".into(),
                    Role::OutputNorm => "model.norm.weight".into(),
                    Role::Head => "lm_head.weight".into(),
                    Role::AttnNorm => per_layer("input_layernorm.weight"),
                    Role::Wq => per_layer("self_attn.q_proj.weight"),
                    Role::Wk => per_layer("self_attn.k_proj.weight"),
                    Role::Wv => per_layer("self_attn.v_proj.weight"),
                    Role::Wo => per_layer("self_attn.o_proj.weight"),
                    Role::Bq => per_layer("self_attn.q_proj.bias"),
                    Role::Bk => per_layer("self_attn.k_proj.bias"),
                    Role::Bv => per_layer("self_attn.v_proj.bias"),
                    Role::FfnNorm => per_layer("post_attention_layernorm.weight"),
                    Role::Gate => per_layer("mlp.gate_proj.weight"),
                    Role::Up => per_layer("mlp.up_proj.weight"),
                    Role::Down => per_layer("mlp.down_proj.weight"),
                }
            }
        }
    }
}

impl Role {
    /// The row-major shape the configuration implies for this role's tensor.
    pub fn shape(self, c: &Config) -> Vec<usize> {
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        match self {
            Role::Embed | Role::Head => vec![c.vocab, h],
            Role::OutputNorm | Role::AttnNorm | Role::FfnNorm => vec![h],
            Role::Wq => vec![q, h],
            Role::Wk | Role::Wv => vec![kv, h],
            Role::Wo => vec![h, q],
            Role::Bq => vec![q],
            Role::Bk | Role::Bv => vec![kv],
            Role::Gate | Role::Up => vec![f, h],
            Role::Down => vec![h, f],
        }
    }
}

/// Where a tensor's stored bytes are: which file of the store, and the byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TensorLocation {
    pub file: usize,
    pub offset: u64,
    pub len: u64,
}

/// Roles of one transformer block's tensors (biases only where the model has them).
pub const LAYER_ROLES: [Role; 12] = [
    Role::AttnNorm,
    Role::Wq,
    Role::Wk,
    Role::Wv,
    Role::Wo,
    Role::Bq,
    Role::Bk,
    Role::Bv,
    Role::FfnNorm,
    Role::Gate,
    Role::Up,
    Role::Down,
];

/// Tensor table of a weight file: names in the file's own convention, raw bytes on demand.
pub trait TensorStore {
    /// A name for error messages.
    fn file(&self) -> &str;
    /// The file's name for `role` (in `layer`, for per-layer roles).
    fn tensor_name(&self, role: Role, layer: usize) -> String;
    /// Stored type and row-major shape of a tensor, if present.
    fn info(&self, name: &str) -> Option<(DType, Vec<usize>)>;
    /// The tensor's raw stored bytes.
    fn read(&self, name: &str) -> Result<Vec<u8>>;
    /// Where the tensor's bytes are stored, for serving them by range.
    fn locate(&self, name: &str) -> Option<TensorLocation>;
}

/// A tensor as stored: type, row-major shape and raw bytes (blocks stay quantized).
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl RawTensor {
    /// Values in the tensor (saturating: shapes are checked against the configuration, whose
    /// products are checked, before a tensor is read).
    pub fn n_elements(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .unwrap_or(usize::MAX)
    }

    /// Rows of a matrix (outputs), or 1 for a vector.
    pub fn rows(&self) -> usize {
        if self.shape.len() >= 2 {
            self.shape[0]
        } else {
            1
        }
    }

    /// Values per row (inputs).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(0)
    }

    /// Dequantize to f32, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_elements()];
        crate::quant::dequantize(self.dtype, &self.bytes, &mut out);
        out
    }
}

/// The weights of one transformer block.
#[derive(Debug, Clone)]
pub struct LayerWeights<T> {
    pub attn_norm: T,  // (hidden)
    pub wq: T,         // (n_heads·head_dim, hidden)
    pub wk: T,         // (n_kv_heads·head_dim, hidden)
    pub wv: T,         // (n_kv_heads·head_dim, hidden)
    pub wo: T,         // (hidden, n_heads·head_dim)
    pub bq: Option<T>, // (n_heads·head_dim)
    pub bk: Option<T>, // (n_kv_heads·head_dim)
    pub bv: Option<T>, // (n_kv_heads·head_dim)
    pub ffn_norm: T,   // (hidden)
    pub gate: T,       // (ffn, hidden)
    pub up: T,         // (ffn, hidden)
    pub down: T,       // (hidden, ffn)
}

/// Everything one stage holds. With tied embeddings the head is the embedding, held once.
#[derive(Debug, Clone)]
pub struct StageWeights<T> {
    pub spec: StageSpec,
    /// (vocab, hidden): present when the stage embeds, or when it runs a tied head.
    pub embed: Option<T>,
    pub layers: Vec<LayerWeights<T>>,
    /// (hidden): present when the stage runs the head.
    pub output_norm: Option<T>,
    /// (vocab, hidden): present when the stage runs an untied head.
    pub head: Option<T>,
}

impl<T> StageWeights<T> {
    /// The LM head matrix: its own tensor or the tied embedding.
    pub fn head_matrix(&self) -> Option<&T> {
        self.head.as_ref().or(self.embed.as_ref())
    }

    /// Every tensor the stage holds, once.
    pub fn tensors(&self) -> Vec<&T> {
        let mut out: Vec<&T> = Vec::new();
        out.extend(&self.embed);
        for l in &self.layers {
            out.extend([&l.attn_norm, &l.wq, &l.wk, &l.wv, &l.wo]);
            out.extend([&l.bq, &l.bk, &l.bv].into_iter().flatten());
            out.extend([&l.ffn_norm, &l.gate, &l.up, &l.down]);
        }
        out.extend(&self.output_norm);
        out.extend(&self.head);
        out
    }

    /// Convert every tensor (dequantize for the CPU, upload for the GPU).
    pub fn try_map<U>(self, mut f: impl FnMut(T) -> Result<U>) -> Result<StageWeights<U>> {
        let opt = |t: Option<T>, f: &mut dyn FnMut(T) -> Result<U>| t.map(f).transpose();
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in self.layers {
            layers.push(LayerWeights {
                attn_norm: f(l.attn_norm)?,
                wq: f(l.wq)?,
                wk: f(l.wk)?,
                wv: f(l.wv)?,
                wo: f(l.wo)?,
                bq: opt(l.bq, &mut f)?,
                bk: opt(l.bk, &mut f)?,
                bv: opt(l.bv, &mut f)?,
                ffn_norm: f(l.ffn_norm)?,
                gate: f(l.gate)?,
                up: f(l.up)?,
                down: f(l.down)?,
            });
        }
        Ok(StageWeights {
            spec: self.spec,
            embed: opt(self.embed, &mut f)?,
            layers,
            output_norm: opt(self.output_norm, &mut f)?,
            head: opt(self.head, &mut f)?,
        })
    }
}

impl StageWeights<RawTensor> {
    /// Stored bytes of every tensor: what the stage read from its file.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors().iter().map(|t| t.bytes.len() as u64).sum()
    }

    /// Read the tensors of `spec` from `store`, checking every shape against `config`.
    pub fn load(store: &dyn TensorStore, config: &Config, spec: &StageSpec) -> Result<Self> {
        spec.validate(config)?;
        let c = config;
        let get = |role: Role, layer: usize, shape: &[usize]| -> Result<RawTensor> {
            let name = store.tensor_name(role, layer);
            let (dtype, actual) = store.info(&name).ok_or_else(|| Error::MissingTensor {
                file: store.file().to_string(),
                tensor: name.clone(),
            })?;
            if actual != shape {
                return Err(Error::Shape {
                    file: store.file().to_string(),
                    tensor: name,
                    expected: shape.to_vec(),
                    actual,
                });
            }
            // Engines index rows block by block: a file whose byte count or row length does
            // not match its type would otherwise fail deep inside a kernel.
            let cols = actual.last().copied().unwrap_or(0);
            let n = actual.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let want = n.and_then(|n| dtype.bytes_for(n));
            if !cols.is_multiple_of(dtype.block_len()) || want.is_none() {
                return Err(Error::format(
                    store.file(),
                    format!(
                        "tensor `{name}` ({dtype}): rows of {cols} values are not whole blocks \
                         of {}",
                        dtype.block_len()
                    ),
                ));
            }
            let bytes = store.read(&name)?;
            if Some(bytes.len()) != want {
                return Err(Error::format(
                    store.file(),
                    format!(
                        "tensor `{name}` ({dtype}, shape {actual:?}) holds {} bytes, expected {}",
                        bytes.len(),
                        want.unwrap_or(0)
                    ),
                ));
            }
            Ok(RawTensor {
                name,
                dtype,
                shape: actual,
                bytes,
            })
        };
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let bias = |role, layer, n| -> Result<Option<RawTensor>> {
            if c.qkv_bias {
                get(role, layer, &[n]).map(Some)
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(spec.layers.len());
        for i in spec.layers.clone() {
            layers.push(LayerWeights {
                attn_norm: get(Role::AttnNorm, i, &[h])?,
                wq: get(Role::Wq, i, &[q, h])?,
                wk: get(Role::Wk, i, &[kv, h])?,
                wv: get(Role::Wv, i, &[kv, h])?,
                wo: get(Role::Wo, i, &[h, q])?,
                bq: bias(Role::Bq, i, q)?,
                bk: bias(Role::Bk, i, kv)?,
                bv: bias(Role::Bv, i, kv)?,
                ffn_norm: get(Role::FfnNorm, i, &[h])?,
                gate: get(Role::Gate, i, &[f, h])?,
                up: get(Role::Up, i, &[f, h])?,
                down: get(Role::Down, i, &[h, f])?,
            });
        }
        let need_embed = spec.embed || (spec.head && c.tied_embeddings);
        Ok(StageWeights {
            spec: spec.clone(),
            embed: need_embed
                .then(|| get(Role::Embed, 0, &[c.vocab, h]))
                .transpose()?,
            layers,
            output_norm: spec
                .head
                .then(|| get(Role::OutputNorm, 0, &[h]))
                .transpose()?,
            head: (spec.head && !c.tied_embeddings)
                .then(|| get(Role::Head, 0, &[c.vocab, h]))
                .transpose()?,
        })
    }
}

/// A GGUF file as a tensor store.
pub struct GgufStore<S> {
    pub gguf: Gguf,
    pub source: S,
}

impl<S: ByteSource> GgufStore<S> {
    /// Parse the header of `source`.
    pub fn open(source: S) -> Result<Self> {
        Ok(Self {
            gguf: Gguf::read(&source)?,
            source,
        })
    }
}

impl<S: ByteSource> TensorStore for GgufStore<S> {
    fn file(&self) -> &str {
        &self.gguf.file
    }

    fn tensor_name(&self, role: Role, layer: usize) -> String {
        Naming::Gguf.tensor_name(role, layer)
    }

    fn info(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        self.gguf.tensor(name).map(|t| (t.dtype, t.shape.clone()))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        self.gguf.read_bytes(&self.source, name)
    }

    fn locate(&self, name: &str) -> Option<TensorLocation> {
        self.gguf.tensor(name).map(|t| TensorLocation {
            file: 0,
            offset: t.offset,
            len: t.n_bytes,
        })
    }
}

/// One `.safetensors` file: its parsed header and where its data starts.
struct StFile<S> {
    source: S,
    metadata: StMetadata,
    data_start: u64,
}

/// Hugging Face safetensors checkpoints (one file or several shards) as a tensor store.
pub struct SafetensorsStore<S> {
    name: String,
    files: Vec<StFile<S>>,
}

impl<S: ByteSource> SafetensorsStore<S> {
    /// Parse the header of every shard. `name` labels errors (the checkpoint folder).
    pub fn open(name: impl Into<String>, shards: Vec<S>) -> Result<Self> {
        let mut files = Vec::with_capacity(shards.len());
        for source in shards {
            let n = u64::from_le_bytes(
                source
                    .read_vec(0, 8, "safetensors header length")?
                    .try_into()
                    .map_err(|_| Error::format(source.name(), "short header length"))?,
            );
            // safetensors caps headers at 100 MB; a larger length is garbage.
            if n > 100_000_000 {
                return Err(Error::format(
                    source.name(),
                    format!("safetensors header of {n} bytes is too large"),
                ));
            }
            let header = source.read_vec(8, n, "safetensors header")?;
            let metadata: StMetadata = serde_json::from_slice(&header).map_err(|e| {
                Error::format(source.name(), format!("bad safetensors header: {e}"))
            })?;
            let data_start = 8 + n;
            let end = data_start.checked_add(metadata.data_len() as u64);
            if end.is_none_or(|e| e > source.len()) {
                return Err(Error::Truncated {
                    file: source.name().to_string(),
                    what: "safetensors data".into(),
                    needed: end.unwrap_or(u64::MAX),
                    len: source.len(),
                });
            }
            files.push(StFile {
                source,
                metadata,
                data_start,
            });
        }
        Ok(Self {
            name: name.into(),
            files,
        })
    }

    fn find(&self, name: &str) -> Option<(&StFile<S>, &safetensors::tensor::TensorInfo)> {
        self.files
            .iter()
            .find_map(|f| f.metadata.info(name).map(|i| (f, i)))
    }

    /// The names of the shard files, in store order (what [`TensorLocation::file`] indexes).
    pub fn shard_names(&self) -> Vec<String> {
        self.files
            .iter()
            .map(|f| f.source.name().to_string())
            .collect()
    }
}

fn st_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl<S: ByteSource> TensorStore for SafetensorsStore<S> {
    fn file(&self) -> &str {
        &self.name
    }

    fn tensor_name(&self, role: Role, layer: usize) -> String {
        Naming::HuggingFace.tensor_name(role, layer)
    }

    fn info(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        // A tensor of a type we cannot read is reported by `read`, naming it.
        let (_, info) = self.find(name)?;
        Some((
            st_dtype(info.dtype).unwrap_or(DType::F32),
            info.shape.clone(),
        ))
    }

    fn read(&self, name: &str) -> Result<Vec<u8>> {
        let (file, info) = self.find(name).ok_or_else(|| Error::MissingTensor {
            file: self.name.clone(),
            tensor: name.to_string(),
        })?;
        if st_dtype(info.dtype).is_none() {
            return Err(Error::UnsupportedType {
                file: file.source.name().to_string(),
                tensor: name.to_string(),
                dtype: format!("{:?}", info.dtype),
            });
        }
        let (start, end) = info.data_offsets;
        if end < start {
            return Err(Error::format(
                file.source.name(),
                format!("tensor `{name}` ends before it starts"),
            ));
        }
        // Offsets are checked against the file when it is opened; stay checked regardless.
        let at = file.data_start.checked_add(start as u64).ok_or_else(|| {
            Error::format(
                file.source.name(),
                format!("tensor `{name}` starts past any file"),
            )
        })?;
        file.source
            .read_vec(at, (end - start) as u64, &format!("tensor `{name}`"))
    }

    fn locate(&self, name: &str) -> Option<TensorLocation> {
        let (i, info) = self
            .files
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.metadata.info(name).map(|t| (i, t)))?;
        let (start, end) = info.data_offsets;
        Some(TensorLocation {
            file: i,
            offset: self.files[i].data_start.checked_add(start as u64)?,
            len: end.checked_sub(start)? as u64,
        })
    }
}
