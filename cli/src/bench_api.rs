//! `mdi bench --api`: requests through the OpenAI-compatible API of a real `signaling` server
//! with 1..N `mdi node` processes on this machine and as many concurrent streaming clients.
//! Per ring size it measures aggregate tokens per second, time to first token, and for every
//! node the model bytes the server sent it against its planned share, and its resident memory
//! (RSS, measured by the node) against the weights its engine holds.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::Row;

/// How to run the API benchmark.
pub struct ApiBench {
    pub model: PathBuf,
    pub max_nodes: usize,
    pub max_tokens: usize,
    /// Node engine (`oracle`, `cpu`, `gpu`, `auto`).
    pub backend: String,
    pub memory_budget: String,
}

pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name(name);
    if !p.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p {name}`",
            p.display()
        );
    }
    Ok(p)
}

pub(crate) fn start_server(signaling: &Path, args: &[String]) -> Result<(Killed, String)> {
    let mut child = Command::new(signaling)
        .args(["--bind", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", signaling.display()))?;
    let out = child.stdout.take().context("server stdout")?;
    let guard = Killed(child);
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("unexpected server output `{line}`"))?
        .to_string();
    Ok((guard, url))
}

pub(crate) fn get_ring(client: &reqwest::blocking::Client, url: &str) -> Result<Value> {
    Ok(client.get(format!("{url}/api/ring")).send()?.json()?)
}

/// One streamed request: (time to first content, completion tokens, finished at).
pub(crate) fn stream_one(
    url: &str,
    question: &str,
    max_tokens: usize,
) -> Result<(Duration, u64, Instant)> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let start = Instant::now();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()?;
    if !resp.status().is_success() {
        bail!("HTTP {}: {}", resp.status(), resp.text()?);
    }
    let mut first = None;
    let mut tokens = 0;
    for line in BufReader::new(resp).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if v["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty())
        {
            first.get_or_insert_with(|| start.elapsed());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n;
        }
    }
    Ok((
        first.unwrap_or_else(|| start.elapsed()),
        tokens,
        Instant::now(),
    ))
}

pub(crate) const QUESTIONS: [&str; 8] = [
    "Write a short poem about the sea.",
    "Describe a mountain at dawn.",
    "Tell a story about a city at night.",
    "Explain why rain falls.",
    "Write about the moon.",
    "Describe a walk in a forest.",
    "Write about winter.",
    "Tell a story about a train.",
];

/// Runs the benchmark; rows for the table.
pub fn run(b: &ApiBench) -> Result<Vec<Row>> {
    let signaling = sibling("signaling")?;
    let mdi = std::env::current_exe()?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let file_len = std::fs::metadata(&b.model)?.len();
    let mut rows = Vec::new();
    let mut base_tok_s = None;
    for n in 1..=b.max_nodes {
        let s = n;
        let args: Vec<String> = [
            "--model",
            &b.model.to_string_lossy(),
            "--min-nodes",
            &n.to_string(),
            "--in-flight",
            &s.to_string(),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        let (_server, url) = start_server(&signaling, &args)?;
        let _nodes: Vec<Killed> = (1..=n)
            .map(|i| {
                Command::new(&mdi)
                    .args([
                        "node",
                        "--server",
                        &url,
                        "--name",
                        &format!("bench-{i}"),
                        "--no-cache",
                    ])
                    .args(["--backend", &b.backend, "--memory-budget", &b.memory_budget])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map(Killed)
                    .context("starting mdi node")
            })
            .collect::<Result<_>>()?;
        let start = Instant::now();
        loop {
            let r = get_ring(&client, &url)?;
            if r["ready"] == true && r["nodes"].as_array().map_or(0, Vec::len) == n {
                break;
            }
            if start.elapsed() > Duration::from_secs(300) {
                bail!(
                    "{n} nodes: the ring was not ready in 300 s: {}",
                    r["status"]
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let formed = start.elapsed();
        // A warm-up request (first-touch of every engine), then S clients at once.
        stream_one(&url, "Hello.", 4)?;
        let t0 = Instant::now();
        let results: Vec<Result<(Duration, u64, Instant)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..s)
                .map(|i| {
                    let url = url.clone();
                    let q = QUESTIONS[i % QUESTIONS.len()];
                    let t = b.max_tokens;
                    sc.spawn(move || stream_one(&url, q, t))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| bail!("a client panicked")))
                .collect()
        });
        let results: Vec<_> = results.into_iter().collect::<Result<_>>()?;
        let end = results.iter().map(|r| r.2).max().unwrap_or(t0);
        let tokens: u64 = results.iter().map(|r| r.1).sum();
        let wall = end.duration_since(t0).as_secs_f64().max(1e-9);
        let tok_s = tokens as f64 / wall;
        let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1e3).collect();
        ttft.sort_by(f64::total_cmp);
        let ttft_p50 = ttft[ttft.len() / 2];
        // Let a heartbeat carry the final memory figures.
        std::thread::sleep(Duration::from_millis(1200));
        let ring = get_ring(&client, &url)?;
        let base = *base_tok_s.get_or_insert(tok_s);
        let on = format!("{n} node process(es), {} engine, this machine", b.backend);
        rows.push(Row {
            what: format!(
                "N={n}: aggregate tok/s, {s} streaming clients × {} tokens",
                b.max_tokens
            ),
            on: on.clone(),
            value: format!("{tok_s:.1} tok/s ({tokens} tokens in {wall:.1} s)"),
            bound: if n == 1 {
                "reference".into()
            } else {
                format!("scaling {:.2}× of N=1 (ideal {n}×)", tok_s / base)
            },
            ok: None,
        });
        rows.push(Row {
            what: format!("N={n}: time to first token p50 / max"),
            on: on.clone(),
            value: format!(
                "{ttft_p50:.0} / {:.0} ms",
                ttft.last().copied().unwrap_or(0.0)
            ),
            bound: format!("ring formed in {:.1} s", formed.as_secs_f64()),
            ok: None,
        });
        for node in ring["nodes"].as_array().context("nodes")? {
            let got = node["downloaded_bytes"].as_u64().unwrap_or(0);
            let share = node["planned_weight_bytes"].as_u64().unwrap_or(0);
            let rss = node["rss_bytes"].as_u64().unwrap_or(0);
            let held = node["weight_bytes"].as_u64().unwrap_or(0);
            let kv = node["kv_bytes"].as_u64().unwrap_or(0);
            let mb = |b: u64| b as f64 / 1e6;
            rows.push(Row {
                what: format!(
                    "N={n}: {} ({}) layers {}..{}: downloaded / RSS",
                    node["name"].as_str().unwrap_or("?"),
                    node["role"].as_str().unwrap_or("?"),
                    node["layers"][0],
                    node["layers"][1]
                ),
                on: format!("file {:.1} MB", mb(file_len)),
                value: format!("{:.1} MB / {:.1} MB", mb(got), mb(rss)),
                bound: format!(
                    "share {:.1} MB / engine weights {:.1} MB + KV {:.1} MB",
                    mb(share),
                    mb(held),
                    mb(kv)
                ),
                ok: Some(got == share),
            });
        }
    }
    Ok(rows)
}
