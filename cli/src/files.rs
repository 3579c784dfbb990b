//! Files as ranged byte sources, and opening a model from a path: a GGUF file, or a Hugging
//! Face checkpoint folder (`config.json`, `*.safetensors`, `tokenizer.json`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use mdi_core::weights::{GgufStore, SafetensorsStore};
use mdi_core::{ByteSource, Config, TensorStore, Tokenizer};

/// A file read at offsets. The mutex keeps seek + read together when threads share it.
pub struct FileSource {
    name: String,
    file: Mutex<File>,
    len: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let len = file.metadata()?.len();
        Ok(Self {
            name: path.display().to_string(),
            file: Mutex::new(file),
            len,
        })
    }
}

impl ByteSource for FileSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> mdi_core::Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let end = offset + buf.len() as u64;
        let err = |e: std::io::Error| mdi_core::Error::Read {
            source_name: self.name.clone(),
            start: offset,
            end,
            reason: e.to_string(),
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.seek(SeekFrom::Start(offset)).map_err(err)?;
        file.read_exact(buf).map_err(err)
    }
}

/// A model opened from disk: configuration, tokenizer and a tensor store to load stages from.
pub struct Model {
    pub path: PathBuf,
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub store: Box<dyn TensorStore + Send + Sync>,
}

/// Open a GGUF file or a Hugging Face checkpoint folder.
pub fn open_model(path: &Path) -> Result<Model> {
    if path.is_dir() {
        open_hf(path)
    } else {
        let store = GgufStore::open(FileSource::open(path)?).with_context(|| {
            format!(
                "{} is not a model this program reads: give a GGUF file or a Hugging Face \
                 folder (config.json, *.safetensors, tokenizer.json)",
                path.display()
            )
        })?;
        let config = Config::from_gguf(&store.gguf)?;
        let tokenizer = Tokenizer::from_gguf(&store.gguf)?;
        Ok(Model {
            path: path.to_path_buf(),
            config,
            tokenizer,
            store: Box::new(store),
        })
    }
}

fn open_hf(dir: &Path) -> Result<Model> {
    let read = |name: &str| {
        std::fs::read(dir.join(name)).with_context(|| format!("{}: no {name}", dir.display()))
    };
    let config = Config::from_hf_json(std::str::from_utf8(&read("config.json")?)?)?;
    // The chat template lives in tokenizer_config.json, when there is one.
    let template = read("tokenizer_config.json")
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v.get("chat_template")?.as_str().map(str::to_string));
    let tokenizer = Tokenizer::from_json(&read("tokenizer.json")?, template)?;
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        bail!("{}: no *.safetensors files", dir.display());
    }
    let sources = shards
        .iter()
        .map(|p| FileSource::open(p))
        .collect::<Result<Vec<_>>>()?;
    let store = SafetensorsStore::open(dir.display().to_string(), sources)?;
    Ok(Model {
        path: dir.to_path_buf(),
        config,
        tokenizer,
        store: Box::new(store),
    })
}

/// Writes `dst`: the GGUF model `src` with its transformer layers repeated `times` over
/// (layer j of the new model is layer j mod L of the old), everything else as it was. The
/// result computes like a model `times` as deep with the same widths — the work per token of a
/// larger model for benchmarks where no larger checkpoint is at hand. Its text means nothing.
pub fn write_repeated_layers(src: &Path, times: usize, dst: &Path) -> Result<()> {
    use mdi_core::gguf::{Gguf, GgufWriter, Value};
    if times == 0 {
        bail!("layers repeated 0 times make no model");
    }
    let source = FileSource::open(src)?;
    let gguf = Gguf::read(&source).with_context(|| format!("{} is not GGUF", src.display()))?;
    let arch = gguf
        .get("general.architecture")
        .and_then(Value::as_str)
        .context("no general.architecture")?
        .to_string();
    let count_key = format!("{arch}.block_count");
    let layers = gguf
        .get(&count_key)
        .and_then(Value::as_u64)
        .with_context(|| format!("no {count_key}"))? as usize;
    let mut w = GgufWriter::new();
    for (key, value) in &gguf.metadata {
        if *key == count_key {
            w.metadata(key.clone(), Value::U32((layers * times) as u32));
        } else {
            w.metadata(key.clone(), value.clone());
        }
    }
    // (layer, rest of the name) of a block tensor.
    let block = |name: &str| -> Option<(usize, String)> {
        let rest = name.strip_prefix("blk.")?;
        let (i, tail) = rest.split_once('.')?;
        Some((i.parse().ok()?, tail.to_string()))
    };
    // Each source layer's tensors (name after `blk.N.`, type, shape, bytes), read once.
    let mut per_layer = vec![Vec::new(); layers];
    for t in &gguf.tensors {
        let bytes = gguf.read_bytes(&source, &t.name)?;
        match block(&t.name) {
            // (A block past the file's own layer count has no place in the new model.)
            Some((i, tail)) => {
                if let Some(layer) = per_layer.get_mut(i) {
                    layer.push((tail, t.dtype, t.shape.clone(), bytes));
                }
            }
            None => {
                w.tensor(t.name.clone(), t.dtype, &t.shape, bytes);
            }
        }
    }
    for j in 0..layers * times {
        for (tail, dtype, shape, bytes) in &per_layer[j % layers] {
            w.tensor(format!("blk.{j}.{tail}"), *dtype, shape, bytes.clone());
        }
    }
    std::fs::write(dst, w.to_bytes()).with_context(|| format!("cannot write {}", dst.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdi_core::gguf::{Gguf, GgufWriter, Value};
    use mdi_core::DType;

    #[test]
    fn repeated_layers_copy_each_layer_in_turn_and_keep_the_rest() {
        let dir = std::env::temp_dir().join(format!("mdi-repeat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, dst) = (dir.join("two.gguf"), dir.join("six.gguf"));
        // Two layers of two tensors each, with distinct bytes, and tensors outside the layers.
        let f32s = |seed: f32, n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (seed + i as f32).to_le_bytes())
                .collect()
        };
        let mut w = GgufWriter::new();
        w.metadata("general.architecture", Value::String("llama".into()))
            .metadata("llama.block_count", Value::U32(2))
            .metadata("llama.embedding_length", Value::U32(4))
            .tensor("token_embd.weight", DType::F32, &[3, 4], f32s(100.0, 12))
            .tensor("output_norm.weight", DType::F32, &[4], f32s(200.0, 4));
        for l in 0..2 {
            w.tensor(
                format!("blk.{l}.attn_q.weight"),
                DType::F32,
                &[4, 4],
                f32s(10.0 * l as f32, 16),
            )
            .tensor(
                format!("blk.{l}.ffn_norm.weight"),
                DType::F32,
                &[4],
                f32s(50.0 + l as f32, 4),
            );
        }
        std::fs::write(&src, w.to_bytes()).unwrap();

        write_repeated_layers(&src, 3, &dst).unwrap();
        let (a, b) = (
            FileSource::open(&src).unwrap(),
            FileSource::open(&dst).unwrap(),
        );
        let (ga, gb) = (Gguf::read(&a).unwrap(), Gguf::read(&b).unwrap());
        assert_eq!(gb.get("llama.block_count").and_then(Value::as_u64), Some(6));
        assert_eq!(
            gb.get("llama.embedding_length"),
            ga.get("llama.embedding_length")
        );
        assert_eq!(gb.tensors.len(), 2 + 6 * 2);
        for name in ["token_embd.weight", "output_norm.weight"] {
            assert_eq!(
                gb.read_bytes(&b, name).unwrap(),
                ga.read_bytes(&a, name).unwrap()
            );
        }
        for j in 0..6 {
            for tail in ["attn_q.weight", "ffn_norm.weight"] {
                let new = gb.tensor(&format!("blk.{j}.{tail}")).unwrap();
                let old = ga.tensor(&format!("blk.{}.{tail}", j % 2)).unwrap();
                assert_eq!((new.dtype, &new.shape), (old.dtype, &old.shape));
                assert_eq!(
                    gb.read_bytes(&b, &new.name).unwrap(),
                    ga.read_bytes(&a, &old.name).unwrap(),
                    "blk.{j}.{tail}"
                );
            }
        }
        assert!(write_repeated_layers(&src, 0, &dst).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
