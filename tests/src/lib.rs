//! Shared helpers for the end-to-end tests: the default model (fetched once and cached), the
//! golden reference data, and small random Llama models written as GGUF or safetensors.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result};

pub mod procs;
pub mod rings;
pub mod tiny;

/// The golden reference folder: `$MDI_REFERENCE_DIR`, else `shared/reference` beside the
/// checkout.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("MDI_REFERENCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference"),
    }
}

/// The golden chat case.
pub struct GoldenChat {
    pub prompt: String,
    pub prompt_tokens: Vec<u32>,
    pub greedy_tokens: Vec<u32>,
    pub greedy_text: String,
    /// Logits after the prompt, (vocab).
    pub step0_logits: Vec<f32>,
}

pub fn golden_chat() -> Result<GoldenChat> {
    let dir = reference_dir();
    let path = dir.join("smollm2_chat.json");
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let ids = |key: &str| -> Result<Vec<u32>> {
        json[key]
            .as_array()
            .with_context(|| format!("{key} missing"))?
            .iter()
            .map(|v| v.as_u64().map(|v| v as u32).context("not an id"))
            .collect()
    };
    Ok(GoldenChat {
        prompt: json["prompt"].as_str().context("prompt")?.to_string(),
        prompt_tokens: ids("prompt_tokens")?,
        greedy_tokens: ids("greedy_tokens")?,
        greedy_text: json["greedy_text"]
            .as_str()
            .context("greedy_text")?
            .to_string(),
        step0_logits: read_npy_f32(&dir.join("smollm2_chat_step0_logits.npy"))?,
    })
}

/// Read a 1-D little-endian float32 `.npy` file.
pub fn read_npy_f32(path: &std::path::Path) -> Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        bytes.starts_with(b"\x93NUMPY"),
        "{}: not .npy",
        path.display()
    );
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len])?;
    anyhow::ensure!(
        header.contains("'<f4'"),
        "{}: not little-endian f32",
        path.display()
    );
    anyhow::ensure!(header.contains("'fortran_order': False"), "fortran order");
    Ok(bytes[start + header_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The default model, fetched on first use and opened once per test binary.
pub fn default_model() -> Result<&'static mdi::Model> {
    static MODEL: OnceLock<mdi::Model> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    if let Some(m) = MODEL.get() {
        return Ok(m);
    }
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = MODEL.get() {
        return Ok(m);
    }
    let path = mdi::fetch::ensure_default_model()?;
    let model = mdi::open_model(&path)?;
    Ok(MODEL.get_or_init(|| model))
}

/// Largest absolute difference between two slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
