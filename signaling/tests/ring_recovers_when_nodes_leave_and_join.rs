//! Membership changes mid-answer, with real processes: `signaling` and `mdi node` processes
//! linked by WebRTC on loopback, inside a network namespace of the test's own, while four
//! clients stream greedy answers through the OpenAI-compatible API.
//!
//! 1. A secondary node is SIGKILLed: every stream completes with its undisturbed answer, and
//!    the ring is ready again with one node fewer.
//! 2. A node joins mid-answer: the answers do not change, and the next request runs on a ring
//!    that includes it.
//! 3. The starter is SIGKILLed: the same as 1.
//! 4. A node freezes (SIGSTOP, like a device that lost its network) and the one left cannot
//!    hold the model: the frozen node is dropped within the heartbeat timeout, the streams
//!    wait while `/api/ring` says why, a node joins, and they complete with their undisturbed
//!    answers.
//!
//! Prints, per kill, the time from the kill to each stream's next token, the tokens the
//! resumed requests prefilled again, and the model bytes the nodes downloaded again.

use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mdi::bench_recovery::downloaded_since;
use mdi_tests::procs::{self, http, Proc};
use mdi_tests::rings::{chat_requests, single_node_all};
use serde_json::{json, Value};

const TOKEN: &str = "ring-secret";
const QUESTIONS: [&str; 4] = [
    "Write a short story about a dragon who learns to bake bread.",
    "Explain how rain forms, step by step.",
    "Describe a busy city street at night.",
    "Write a poem about autumn leaves.",
];
const MAX_TOKENS: usize = 40;
/// Each node's memory budget: one node cannot hold the model with the oracle's f32 weights,
/// two can.
const BUDGET: &str = "450M";

/// One streaming client: the text pieces it received, each with when it arrived.
#[derive(Default)]
struct Stream {
    pieces: Vec<(Instant, String)>,
    finish: Option<String>,
    error: Option<String>,
}

impl Stream {
    fn text(&self) -> String {
        self.pieces.iter().map(|(_, p)| p.as_str()).collect()
    }
}

fn stream_chat(url: &str, question: &str, out: &Mutex<Stream>) -> Result<()> {
    let resp = http()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&json!({
            "model": "default",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "stream": true,
        }))
        .send()?;
    ensure!(resp.status() == 200, "HTTP {}", resp.status());
    for line in BufReader::new(resp).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data:").map(str::trim) else {
            continue;
        };
        if data == "[DONE]" {
            return Ok(());
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(e) = v.get("error") {
            bail!("the stream ended with an error: {e}");
        }
        let choice = &v["choices"][0];
        let mut s = out.lock().unwrap();
        if let Some(t) = choice["delta"]["content"].as_str() {
            s.pieces.push((Instant::now(), t.to_string()));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            s.finish = Some(f.to_string());
        }
    }
    bail!("the stream ended without [DONE]")
}

/// Four clients streaming at once.
struct Clients {
    streams: Vec<Arc<Mutex<Stream>>>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

fn start_clients(url: &str) -> Clients {
    let streams: Vec<Arc<Mutex<Stream>>> = QUESTIONS.iter().map(|_| Arc::default()).collect();
    let handles = QUESTIONS
        .iter()
        .zip(&streams)
        .map(|(q, s)| {
            let (url, q, s) = (url.to_string(), q.to_string(), s.clone());
            std::thread::spawn(move || {
                if let Err(e) = stream_chat(&url, &q, &s) {
                    s.lock().unwrap().error = Some(format!("{e:#}"));
                }
            })
        })
        .collect();
    Clients { streams, handles }
}

impl Clients {
    /// Waits until every stream has at least `n` pieces (or has ended).
    fn wait_pieces(&self, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let ok = self.streams.iter().all(|s| {
                let s = s.lock().unwrap();
                s.pieces.len() >= n || s.finish.is_some() || s.error.is_some()
            });
            if ok {
                return Ok(());
            }
            ensure!(
                start.elapsed() < timeout,
                "the streams did not reach {n} pieces in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for every stream to end; checks each against its expected answer and returns,
    /// per stream, the time from `since` to its first piece after it.
    fn finish(self, expected: &[String], since: Option<Instant>) -> Result<Vec<Duration>> {
        for h in self.handles {
            h.join().map_err(|_| anyhow::anyhow!("a client panicked"))?;
        }
        let mut waits = Vec::new();
        for (i, s) in self.streams.iter().enumerate() {
            let s = s.lock().unwrap();
            if let Some(e) = &s.error {
                bail!("stream {i}: {e}");
            }
            ensure!(s.finish.is_some(), "stream {i} has no finish reason");
            assert_eq!(
                s.text(),
                expected[i],
                "stream {i} differs from its undisturbed answer"
            );
            if let Some(t0) = since {
                if let Some((t, _)) = s.pieces.iter().find(|(t, _)| *t > t0) {
                    waits.push(*t - t0);
                }
            }
        }
        Ok(waits)
    }
}

fn node(url: &str, name: &str) -> Result<Proc> {
    procs::start_node(
        &procs::binary("mdi"),
        url,
        name,
        &[
            "--token",
            TOKEN,
            "--backend",
            "oracle",
            "--memory-budget",
            BUDGET,
        ],
    )
}

/// The node playing `role` in the ready ring, by name.
fn with_role(ring: &Value, role: &str) -> Result<String> {
    ring["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .find(|n| n["role"] == role)
        .and_then(|n| n["name"].as_str())
        .map(str::to_string)
        .with_context(|| format!("no {role} in {ring}"))
}

fn kill(nodes: &mut Vec<Proc>, name: &str) -> Result<Instant> {
    let i = nodes
        .iter()
        .position(|p| p.name == name)
        .with_context(|| format!("no process {name}"))?;
    let mut p = nodes.remove(i);
    p.child.kill()?;
    let at = Instant::now();
    p.child.wait()?;
    Ok(at)
}

fn report(what: &str, mut waits: Vec<Duration>, before: &Value, after: &Value) {
    waits.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1e3;
    let median = waits.get(waits.len() / 2).map_or(f64::NAN, ms);
    let worst = waits.last().map_or(f64::NAN, ms);
    let rb = &before["sequences"]["recovery"];
    let ra = &after["sequences"]["recovery"];
    let delta = |k: &str| ra[k].as_u64().unwrap_or(0) - rb[k].as_u64().unwrap_or(0);
    eprintln!(
        "{what}: kill → next token median {median:.0} ms, worst {worst:.0} ms over {} streams; \
         {} requests resumed, {} tokens replayed; {} model bytes downloaded again",
        waits.len(),
        delta("resumed"),
        delta("replayed_tokens"),
        downloaded_since(before, after),
    );
}

#[test]
fn the_ring_heals_mid_answer_when_nodes_die_or_join() -> Result<()> {
    if !procs::isolated("the_ring_heals_mid_answer_when_nodes_die_or_join") {
        return Ok(());
    }
    let model = mdi_tests::default_model()?;
    let reqs = chat_requests(model, &QUESTIONS, |_| MAX_TOKENS)?;
    let eos = &model.config.eos_ids;
    let expected: Vec<String> = single_node_all(model.store.as_ref(), &model.config, &reqs)
        .iter()
        .map(|t| {
            let ids: Vec<u32> = t.iter().copied().filter(|x| !eos.contains(x)).collect();
            model.tokenizer.decode_text(&ids)
        })
        .collect::<mdi_core::Result<_>>()?;

    let path = model.path.to_string_lossy().to_string();
    let server = procs::start_server(
        env!("CARGO_BIN_EXE_signaling").as_ref(),
        // f32 activations: every ring computes what one node does, so greedy answers match.
        &[
            "--model",
            &path,
            "--token",
            TOKEN,
            "--min-nodes",
            "3",
            "--in-flight",
            "4",
            "--wire",
            "f32",
        ],
    )?;
    let url = server.url.clone();
    let mut nodes: Vec<Proc> = ["a", "b", "c"]
        .iter()
        .map(|n| node(&url, n))
        .collect::<Result<_>>()?;
    let ring = procs::wait_ready(&url, 3, Duration::from_secs(240))?;
    let long = Duration::from_secs(240);

    // 1. A secondary dies mid-answer.
    let clients = start_clients(&url);
    clients.wait_pieces(3, long)?;
    let victim = with_role(&ring, "secondary")?;
    let killed = kill(&mut nodes, &victim)?;
    let waits = clients.finish(&expected, Some(killed))?;
    let after = procs::wait_ready(&url, 2, long)?;
    report("secondary killed", waits, &ring, &after);
    ensure!(
        after["sequences"]["recovery"]["resumed"].as_u64() > Some(0),
        "the kill came mid-answer: {after}"
    );

    // 2. A node joins mid-answer: the answers stay; the next request runs on it too.
    let clients = start_clients(&url);
    clients.wait_pieces(3, long)?;
    nodes.push(node(&url, "d")?);
    clients.finish(&expected, None)?;
    let ring = procs::wait_ring(&url, long, "a ready ring with the new node", |r| {
        r["ready"] == true
            && r["nodes"].as_array().is_some_and(|ns| {
                ns.iter()
                    .any(|n| n["name"] == "d" && n["layers"].is_array())
            })
    })?;
    ensure!(ring["nodes"].as_array().map(Vec::len) == Some(3));
    let clients = start_clients(&url);
    clients.finish(&expected, None)?;

    // 3. The starter dies mid-answer.
    let ring = procs::ring(&url)?;
    let clients = start_clients(&url);
    clients.wait_pieces(3, long)?;
    let starter = with_role(&ring, "starter")?;
    let killed = kill(&mut nodes, &starter)?;
    let waits = clients.finish(&expected, Some(killed))?;
    let after = procs::wait_ready(&url, 2, long)?;
    report("starter killed", waits, &ring, &after);
    ensure!(with_role(&after, "starter")? != starter);

    // 4. One of the last two freezes (SIGSTOP: its connection stays open but it says nothing,
    //    as a device that lost its network): the heartbeat timeout drops it, and the one left
    //    cannot hold the model, so the streams wait with a clear status until a node joins.
    let ring = after;
    let clients = start_clients(&url);
    clients.wait_pieces(3, long)?;
    let victim = with_role(&ring, "secondary")?;
    let frozen = nodes
        .iter()
        .find(|p| p.name == victim)
        .context("the secondary's process")?;
    let status = std::process::Command::new("kill")
        .args(["-STOP", &frozen.child.id().to_string()])
        .status()?;
    ensure!(status.success(), "kill -STOP failed");
    let killed = Instant::now();
    let waiting = procs::wait_ring(&url, long, "the ring says why it waits", |r| {
        r["status"]
            .as_str()
            .is_some_and(|s| s.contains("cannot hold the model"))
            && r["sequences"]["requests_waiting"].as_u64() > Some(0)
    })?;
    let noticed = killed.elapsed();
    eprintln!(
        "frozen node dropped after {noticed:?}; while too small: {}",
        waiting["status"]
    );
    ensure!(
        noticed < Duration::from_secs(4),
        "a silent node is noticed within the heartbeat timeout: {noticed:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        clients
            .streams
            .iter()
            .all(|s| s.lock().unwrap().error.is_none()),
        "waiting requests do not fail"
    );
    nodes.push(node(&url, "e")?);
    let waits = clients.finish(&expected, Some(killed))?;
    let after = procs::wait_ready(&url, 2, long)?;
    report(
        "frozen, too small until a node joined",
        waits,
        &ring,
        &after,
    );
    Ok(())
}
