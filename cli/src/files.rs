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
