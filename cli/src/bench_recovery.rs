//! `mdi bench --recovery R`: how long a ring takes to heal mid-answer. A `signaling` server and
//! three `mdi node` processes on this machine serve four streaming clients; mid-answer the
//! benchmark SIGKILLs a secondary node (R times) and then the starter (R times), restarting the
//! killed node between rounds (it rejoins with its disk cache). Per kind of kill it reports the
//! time from the kill to the ring being ready again and to each stream's next token, the
//! tokens the resumed requests prefilled again, the model bytes the nodes fetched again, and
//! whether every stream still equals its undisturbed answer.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::bench::Row;
use crate::bench_api::{get_ring, sibling, start_server, Killed, QUESTIONS};
use crate::ring::percentile;

/// How to run the recovery benchmark.
pub struct RecoveryBench {
    pub model: PathBuf,
    /// Kills of each kind (secondary, starter).
    pub rounds: usize,
    pub max_tokens: usize,
    /// Node engine (`oracle`, `cpu`, `gpu`, `auto`).
    pub backend: String,
    pub memory_budget: String,
}

const NODES: usize = 3;
const STREAMS: usize = 4;

/// The text pieces of one streamed answer, each with its arrival time.
type Timed = Vec<(Instant, String)>;
/// A stream's pieces so far, and whether it has ended.
type Pieces = Arc<Mutex<(Timed, bool)>>;

fn stream(url: &str, question: &str, max_tokens: usize, out: &Pieces) -> Result<()> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({
            "messages": [{"role": "user", "content": question}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": true,
        }))
        .send()?;
    if !resp.status().is_success() {
        bail!("HTTP {}: {}", resp.status(), resp.text()?);
    }
    for line in BufReader::new(resp).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            out.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
            return Ok(());
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("the stream ended with an error: {e}");
        }
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
            o.0.push((Instant::now(), c.to_string()));
        }
    }
    bail!("the stream ended without [DONE]")
}

/// Four clients streaming at once; `during` runs once every stream has a few pieces.
/// Returns each stream's pieces.
fn streams<T>(
    url: &str,
    max_tokens: usize,
    during: impl FnOnce() -> Result<T>,
) -> Result<(Vec<Timed>, T)> {
    let outs: Vec<Pieces> = (0..STREAMS).map(|_| Arc::default()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = outs
            .iter()
            .zip(QUESTIONS)
            .map(|(o, q)| s.spawn(move || stream(url, q, max_tokens, o)))
            .collect();
        let start = Instant::now();
        while !outs.iter().all(|o| {
            let o = o.lock().unwrap_or_else(|p| p.into_inner());
            o.0.len() >= 3 || o.1
        }) {
            if start.elapsed() > Duration::from_secs(300) || handles.iter().any(|h| h.is_finished())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = during();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        }
        let pieces = outs
            .iter()
            .map(|o| o.lock().unwrap_or_else(|p| p.into_inner()).0.clone())
            .collect();
        Ok((pieces, t?))
    })
}

fn text(pieces: &[(Instant, String)]) -> String {
    pieces.iter().map(|(_, p)| p.as_str()).collect()
}

/// Model bytes the server sent the nodes of `after` (two `/api/ring` views) since `before`; a
/// node new in `after` counts whole.
pub fn downloaded_since(before: &Value, after: &Value) -> u64 {
    let empty = Vec::new();
    let earlier = before["nodes"].as_array().unwrap_or(&empty);
    after["nodes"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|n| {
            let was = earlier
                .iter()
                .find(|b| b["id"] == n["id"])
                .and_then(|b| b["downloaded_bytes"].as_u64())
                .unwrap_or(0);
            n["downloaded_bytes"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(was)
        })
        .sum()
}

fn counter(ring: &Value, key: &str) -> u64 {
    ring["sequences"]["recovery"][key].as_u64().unwrap_or(0)
}

/// Removes the nodes' cache directories at the end.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the benchmark; rows for the table.
pub fn run(b: &RecoveryBench) -> Result<Vec<Row>> {
    let signaling = sibling("signaling")?;
    let mdi = std::env::current_exe()?;
    let caches = Dir(std::env::temp_dir().join(format!("mdi-recovery-{}", std::process::id())));
    let args: Vec<String> = [
        "--model",
        &b.model.to_string_lossy(),
        "--min-nodes",
        &NODES.to_string(),
        "--in-flight",
        "8",
        "--wire",
        "f32",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let (_server, url) = start_server(&signaling, &args)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let spawn = |name: &str| -> Result<Killed> {
        Command::new(&mdi)
            .args(["node", "--server", &url, "--name", name])
            .args(["--backend", &b.backend, "--memory-budget", &b.memory_budget])
            .arg("--cache-dir")
            .arg(caches.0.join(name))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map(Killed)
            .context("starting mdi node")
    };
    let mut nodes: Vec<(String, Killed)> = (1..=NODES)
        .map(|i| {
            let name = format!("node-{i}");
            spawn(&name).map(|k| (name, k))
        })
        .collect::<Result<_>>()?;
    // A ready ring of all NODES nodes, each with layers.
    let full = |timeout: Duration| -> Result<Value> {
        let start = Instant::now();
        loop {
            let r = get_ring(&client, &url)?;
            let nodes = r["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            if r["ready"] == true
                && nodes.len() == NODES
                && nodes.iter().all(|n| n["layers"].is_array())
            {
                return Ok(r);
            }
            if start.elapsed() > timeout {
                bail!("the ring of {NODES} was not ready within {timeout:?}: {r}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    full(Duration::from_secs(300))?;
    let max_tokens = b.max_tokens;
    let (reference, ()) = streams(&url, max_tokens, || Ok(()))?;
    let expected: Vec<String> = reference.iter().map(|p| text(p)).collect();

    let mut rows = Vec::new();
    for role in ["secondary", "starter"] {
        let (mut ready_ms, mut token_ms) = (Vec::new(), Vec::new());
        let (mut replayed, mut fetched, mut equal, mut total) = (0u64, 0u64, 0usize, 0usize);
        for round in 0..b.rounds {
            let before = full(Duration::from_secs(300))?;
            let victim = before["nodes"]
                .as_array()
                .and_then(|ns| ns.iter().find(|n| n["role"] == role))
                .and_then(|n| n["name"].as_str())
                .map(str::to_string)
                .with_context(|| format!("no {role} in {before}"))?;
            let epoch = before["epoch"].as_u64().unwrap_or(0);
            let (pieces, (killed, ready_at)) = streams(&url, max_tokens, || {
                let i = nodes
                    .iter()
                    .position(|(n, _)| *n == victim)
                    .context("the victim's process")?;
                let (_, mut k) = nodes.remove(i);
                k.0.kill()?;
                let killed = Instant::now();
                let _ = k.0.wait();
                // The ring ready again, without it.
                loop {
                    let r = get_ring(&client, &url)?;
                    if r["ready"] == true && r["epoch"].as_u64().unwrap_or(0) > epoch {
                        break Ok((killed, Instant::now()));
                    }
                    if killed.elapsed() > Duration::from_secs(120) {
                        bail!("the ring did not heal within 120 s: {r}");
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })?;
            ready_ms.push((ready_at - killed).as_secs_f64() * 1e3);
            for (i, p) in pieces.iter().enumerate() {
                total += 1;
                equal += usize::from(text(p) == expected[i]);
                if let Some((t, _)) = p.iter().find(|(t, _)| *t > killed) {
                    token_ms.push((*t - killed).as_secs_f64() * 1e3);
                }
            }
            let after = get_ring(&client, &url)?;
            replayed += counter(&after, "replayed_tokens") - counter(&before, "replayed_tokens");
            fetched += downloaded_since(&before, &after);
            eprintln!(
                "recovery: {role} round {}: ready again after {:.0} ms",
                round + 1,
                ready_ms.last().copied().unwrap_or(f64::NAN)
            );
            // The device comes back (a new process with its cache) for the next round.
            nodes.push((victim.clone(), spawn(&victim)?));
        }
        let n = b.rounds.max(1) as f64;
        let on = format!(
            "{NODES}→{} nodes ({}), {STREAMS} streams, {} rounds",
            NODES - 1,
            b.backend,
            b.rounds
        );
        rows.push(Row {
            what: format!("{role} killed: kill → ring ready again"),
            on: on.clone(),
            value: format!(
                "p50 {:.0} ms, worst {:.0} ms",
                percentile(&ready_ms, 0.5).unwrap_or(f64::NAN),
                percentile(&ready_ms, 1.0).unwrap_or(f64::NAN)
            ),
            bound: "detection + re-plan + downloads + links".into(),
            ok: None,
        });
        rows.push(Row {
            what: format!("{role} killed: kill → each stream's next token"),
            on: on.clone(),
            value: format!(
                "p50 {:.0} ms, worst {:.0} ms",
                percentile(&token_ms, 0.5).unwrap_or(f64::NAN),
                percentile(&token_ms, 1.0).unwrap_or(f64::NAN)
            ),
            bound: "+ replaying prompt and answer so far".into(),
            ok: None,
        });
        rows.push(Row {
            what: format!("{role} killed: replayed, fetched again per kill"),
            on: on.clone(),
            value: format!(
                "{:.0} tokens, {:.1} MB",
                replayed as f64 / n,
                fetched as f64 / n / 1e6
            ),
            bound: "only ranges a node did not hold".into(),
            ok: None,
        });
        rows.push(Row {
            what: format!("{role} killed: streams equal to their undisturbed answer"),
            on,
            value: format!("{equal} of {total}"),
            bound: "all (greedy, f32 activations)".into(),
            ok: Some(equal == total),
        });
    }
    Ok(rows)
}
