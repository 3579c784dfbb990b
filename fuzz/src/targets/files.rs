//! Model files: the GGUF reader (header, metadata, tensor table) and everything built from a
//! header (configuration, tokenizer, a stage's weights dequantized); the safetensors reader with
//! its `config.json`; and the manifest a node receives from a server.
//!
//! Limits: a file's structures take a small multiple of the file's own bytes in memory (a
//! metadata value about 32 bytes however few it takes in the file, a Q4 block 7× when
//! dequantized), so the limit is linear in the input with a fixed allowance for the
//! tokenizer. What the limit rules out is memory driven by a *claimed* count or size.

use mdi_core::gguf::Gguf;
use mdi_core::manifest::Manifest;
use mdi_core::weights::{GgufStore, SafetensorsStore, StageSpec, StageWeights};
use mdi_core::{Config, DType, MemSource, Tokenizer};

use super::model;
use crate::engine::{label, Run, Target};
use crate::meter;

/// Bytes a model file of `len` bytes may make the readers hold.
fn file_limit(len: usize) -> u64 {
    (4 << 20) + 64 * len as u64
}

/// Loads a stage and dequantizes what it read: tensor sizes must match types and shapes.
fn load_and_dequantize(
    store: &dyn mdi_core::TensorStore,
    config: &Config,
    spec: &StageSpec,
) -> String {
    match StageWeights::load(store, config, spec) {
        Ok(w) => {
            let mut sum = 0usize;
            for t in w.tensors() {
                sum += t.to_f32().len();
            }
            format!("loaded {sum}")
        }
        Err(e) => format!("load: {e}"),
    }
}

/// GGUF inputs: mode 0 is a header alone, to which the target appends a data section as large
/// as the seeds' (so every mutation lands in the header, where the reader's decisions are);
/// mode 1 is a whole file.
pub struct GgufTarget {
    data: Vec<u8>,
}

impl GgufTarget {
    pub fn new() -> Self {
        let whole = model::gguf(&[DType::F32], 0);
        let header = Gguf::read(&MemSource::new("seed", whole.clone())).map_or(0, |g| g.data_start);
        Self {
            data: whole[header as usize..].to_vec(),
        }
    }
}

impl Default for GgufTarget {
    fn default() -> Self {
        Self::new()
    }
}

impl Target for GgufTarget {
    fn name(&self) -> &'static str {
        "gguf"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let mut seeds = Vec::new();
        for (i, dtypes) in [
            &[
                DType::F32,
                DType::Q8_0,
                DType::Q4_0,
                DType::Q4_1,
                DType::F16,
            ][..],
            &[DType::Q4_1],
            &[DType::BF16, DType::F32],
        ]
        .into_iter()
        .enumerate()
        {
            let whole = model::gguf(dtypes, i as u64 + 1);
            let start =
                Gguf::read(&MemSource::new("seed", whole.clone())).map_or(0, |g| g.data_start);
            seeds.push([&[0u8][..], &whole[..start as usize]].concat());
            seeds.push([&[1u8][..], &whole[..]].concat());
        }
        seeds
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"GGUF",
            b"general.alignment",
            b"tokenizer.ggml.tokens",
            b"tokenizer.ggml.merges",
            b"llama.block_count",
            b"llama.context_length",
            b"\x09\x00\x00\x00",
            b"\x08\x00\x00\x00",
            b"\xff\xff\xff\xff\xff\xff\xff\xff",
            b"\x00\x00\x00\x00\x00\x00\x00\x80",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let (mode, rest) = data.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
        let mut file = rest.to_vec();
        if mode % 2 == 0 {
            // Pad to the alignment the header most likely asks for, then the data.
            file.resize(file.len().next_multiple_of(32), 0);
            file.extend_from_slice(&self.data);
        }
        let limit = file_limit(file.len());
        let src = MemSource::new("fuzz.gguf", file);
        meter::reset();
        let g = match Gguf::read(&src) {
            Ok(g) => g,
            Err(e) => {
                return Run {
                    behaviour: label(&format!("read: {e}")),
                    limit,
                    depth: 0,
                }
            }
        };
        let mut depth = 1;
        let mut what = format!("{} tensors", g.tensors.len());
        match Config::from_gguf(&g) {
            Ok(config) => {
                depth = 2;
                let store = GgufStore {
                    gguf: g.clone(),
                    source: src,
                };
                let half = config.n_layers / 2;
                for spec in [
                    StageSpec::whole(&config),
                    StageSpec {
                        layers: half..config.n_layers,
                        embed: false,
                        head: false,
                    },
                ] {
                    what += &load_and_dequantize(&store, &config, &spec);
                }
            }
            Err(e) => what += &format!("config: {e}"),
        }
        match Tokenizer::from_gguf(&g) {
            Ok(t) => {
                depth = 3;
                let ids = t.encode("hello world<|im_end|>", true).unwrap_or_default();
                let text = t.decode(&ids).unwrap_or_default();
                what += &format!("tokenizer {} {}", ids.len(), text.len());
                if let Ok(p) = t.chat(&[("user", "hello")]) {
                    what += &format!("chat {}", p.len());
                }
            }
            Err(e) => what += &format!("tokenizer: {e}"),
        }
        Run {
            behaviour: label(&what),
            limit,
            depth,
        }
    }
}

/// Safetensors inputs: a mode byte, then for even modes a `config.json` (length-prefixed, u32
/// LE) and, in mode 0, a safetensors header alone (the target adds the length prefix and a data
/// section as large as the seed's, so mutations land in the JSON), in mode 2 a whole file; odd
/// modes are a manifest in JSON.
pub struct SafetensorsTarget {
    data: Vec<u8>,
}

impl SafetensorsTarget {
    pub fn new() -> Self {
        let file = model::safetensors(0);
        let (_, data) = split_safetensors(&file);
        Self {
            data: data.to_vec(),
        }
    }
}

impl Default for SafetensorsTarget {
    fn default() -> Self {
        Self::new()
    }
}

/// A safetensors file's header JSON and its data.
fn split_safetensors(file: &[u8]) -> (&[u8], &[u8]) {
    let n = file.get(..8).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize
    });
    let end = (8 + n).min(file.len());
    (&file[8.min(end)..end], &file[end..])
}

impl Target for SafetensorsTarget {
    fn name(&self) -> &'static str {
        "safetensors"
    }

    fn seeds(&self) -> Vec<Vec<u8>> {
        let config = model::hf_config_json();
        let file = model::safetensors(1);
        let (header, _) = split_safetensors(&file);
        let with_config = |mode: u8, rest: &[u8]| {
            let mut s = vec![mode];
            s.extend((config.len() as u32).to_le_bytes());
            s.extend(config.as_bytes());
            s.extend(rest);
            s
        };
        let mut manifest = vec![1u8];
        manifest.extend(model::manifest_json(2));
        vec![with_config(0, header), with_config(2, &file), manifest]
    }

    fn dictionary(&self) -> &'static [&'static [u8]] {
        &[
            b"\"data_offsets\"",
            b"\"shape\"",
            b"\"dtype\":\"F32\"",
            b"\"dtype\":\"Q4_1\"",
            b"18446744073709551615",
            b"4294967296",
            b"-1",
            b"1e400",
            b"null",
            b"[]",
            b"\"offset\"",
            b"\"len\"",
            b"\"hidden_size\"",
            b"\"max_position_embeddings\"",
            b"\"num_attention_heads\"",
            b"0",
        ]
    }

    fn run(&mut self, data: &[u8]) -> Run {
        let limit = file_limit(data.len() + self.data.len());
        let (mode, rest) = data.split_first().map_or((0, &[][..]), |(m, r)| (*m, r));
        let mode = mode % 3;
        if mode == 1 {
            meter::reset();
            let mut depth = 0;
            let what = match serde_json::from_slice::<Manifest>(rest) {
                Err(e) => format!("json: {e}"),
                Ok(m) => match m.validate() {
                    Err(e) => {
                        depth = 1;
                        format!("validate: {e}")
                    }
                    Ok(()) => {
                        depth = 3;
                        let n = m.config.n_layers;
                        let mut what = String::from("valid");
                        for spec in [
                            StageSpec::whole(&m.config),
                            StageSpec {
                                layers: n / 2..n,
                                embed: false,
                                head: true,
                            },
                        ] {
                            what += &match m.ranges(&spec) {
                                Ok(r) => format!("ranges {}", r.len()),
                                Err(e) => format!("ranges: {e}"),
                            };
                        }
                        what
                    }
                },
            };
            return Run {
                behaviour: label(&what),
                limit,
                depth,
            };
        }
        let n = rest
            .get(..4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
        let rest = rest.get(4..).unwrap_or_default();
        let (json, file) = rest.split_at(n.min(rest.len()));
        let json = String::from_utf8_lossy(json).into_owned();
        let file = if mode == 0 {
            let mut f = (file.len() as u64).to_le_bytes().to_vec();
            f.extend_from_slice(file);
            f.extend_from_slice(&self.data);
            f
        } else {
            file.to_vec()
        };
        let src = MemSource::new("fuzz.safetensors", file);
        meter::reset();
        let mut what = String::new();
        let config = Config::from_hf_json(&json);
        let mut depth = usize::from(config.is_ok());
        if let Err(e) = &config {
            what += &format!("config: {e}");
        }
        match SafetensorsStore::open("fuzz", vec![src]) {
            Err(e) => what += &format!("open: {e}"),
            Ok(store) => {
                depth += 1;
                let config = config.unwrap_or_else(|_| model::config_hf());
                let loaded = load_and_dequantize(&store, &config, &StageSpec::whole(&config));
                depth += usize::from(loaded.starts_with("loaded"));
                what += &loaded;
            }
        }
        Run {
            behaviour: label(&what),
            limit,
            depth,
        }
    }
}
