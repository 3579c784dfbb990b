//! `mdi bench`: benchmarks that print tables. Every row says what was measured, on what, and
//! against which bound.

use anyhow::Result;
use mdi_core::starter::SeqRequest;
use mdi_core::wire::WireDtype;
use mdi_core::SamplingParams;

use crate::ring::{percentile, run_ring, RingOptions, RingRun, TransportKind};
use crate::Model;

/// One table row.
pub struct Row {
    pub what: String,
    pub on: String,
    pub value: String,
    pub bound: String,
    pub ok: Option<bool>,
}

pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    let w = [
        rows.iter().map(|r| r.what.len()).max().unwrap_or(4).max(4),
        rows.iter().map(|r| r.on.len()).max().unwrap_or(2).max(2),
        rows.iter().map(|r| r.value.len()).max().unwrap_or(5).max(5),
        rows.iter().map(|r| r.bound.len()).max().unwrap_or(5).max(5),
    ];
    println!(
        "| {:w0$} | {:w1$} | {:>w2$} | {:w3$} | met |",
        "what",
        "on",
        "value",
        "bound",
        w0 = w[0],
        w1 = w[1],
        w2 = w[2],
        w3 = w[3]
    );
    println!(
        "|{}|{}|{}|{}|-----|",
        "-".repeat(w[0] + 2),
        "-".repeat(w[1] + 2),
        "-".repeat(w[2] + 2),
        "-".repeat(w[3] + 2)
    );
    for r in rows {
        let met = match r.ok {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "-",
        };
        println!(
            "| {:w0$} | {:w1$} | {:>w2$} | {:w3$} | {met:3} |",
            r.what,
            r.on,
            r.value,
            r.bound,
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    }
}

/// The ring against one node on this machine: same model, same sequences.
pub fn ring(model: &Model, nodes: usize, sequences: usize, max_tokens: usize) -> Result<Vec<Row>> {
    let tok = &model.tokenizer;
    let topics = [
        "the sea",
        "mountains",
        "a city at night",
        "rain",
        "the moon",
        "a forest",
        "winter",
        "a train",
    ];
    let mut reqs = Vec::new();
    for i in 0..sequences {
        let q = format!("Write a short poem about {}.", topics[i % topics.len()]);
        reqs.push(SeqRequest {
            prompt_tokens: tok.encode(&tok.chat_prompt(&q)?, false)?,
            max_tokens,
            params: SamplingParams::default(),
            // No early stops: every sequence costs the same in both runs.
            eos_ids: vec![],
        });
    }
    let opts = |n, s, transport| RingOptions {
        nodes: n,
        in_flight: s,
        wire: WireDtype::F16,
        transport,
    };
    let single = run_ring(
        model,
        reqs.clone(),
        &opts(1, sequences, TransportKind::InProcess),
    )?;
    let ring = run_ring(
        model,
        reqs.clone(),
        &opts(nodes, sequences, TransportKind::WebRtc),
    )?;
    anyhow::ensure!(
        ring.tokens == single.tokens,
        "the ring's tokens differ from one node's"
    );
    // One sequence at a time: nothing queues at a receiver, so a ping's round trip is the
    // transport's own.
    let lone = vec![reqs[0].clone()];
    let webrtc = run_ring(model, lone.clone(), &opts(nodes, 1, TransportKind::WebRtc))?;
    let memory = run_ring(model, lone, &opts(nodes, 1, TransportKind::InProcess))?;

    let machine = format!("this machine, {} CPU oracle", model.config.arch);
    let ratio = ring.tok_s() / single.tok_s();
    let hidden = model.config.hidden;
    let hop_bytes = ring.decode_hop_bytes.unwrap_or(0);
    let lat = |r: &RingRun, p| percentile(&r.hop_rtt_ms, p).unwrap_or(f64::NAN);
    let added = lat(&webrtc, 0.5) - lat(&memory, 0.5);
    let total: u64 = std::fs::metadata(&model.path)?.len();
    let share = total as f64 / nodes as f64 * 1.05;
    let mut rows = vec![
        Row {
            what: format!("throughput, 1 node, {sequences} sequences × {max_tokens} tokens"),
            on: machine.clone(),
            value: format!("{:.1} tok/s", single.tok_s()),
            bound: "reference".into(),
            ok: None,
        },
        Row {
            what: format!("throughput, ring of {nodes} over WebRTC, same sequences"),
            on: machine.clone(),
            value: format!("{:.1} tok/s", ring.tok_s()),
            bound: "reference".into(),
            ok: None,
        },
        Row {
            what: "ring / one node throughput".into(),
            on: machine.clone(),
            value: format!("{ratio:.2}"),
            bound: "≥ 0.90 (pipeline costs ≤ 10%)".into(),
            ok: Some(ratio >= 0.9),
        },
        Row {
            what: "wire bytes per decode hop (f16)".into(),
            on: format!("hidden {hidden}"),
            value: format!("{hop_bytes} B"),
            bound: format!("≤ {} B (hidden×2 + 64)", hidden * 2 + 64),
            ok: Some(hop_bytes > 0 && hop_bytes <= hidden * 2 + 64),
        },
        Row {
            what: "hop round trip p50 / p99, WebRTC loopback".into(),
            on: "1 sequence in flight".into(),
            value: format!("{:.3} / {:.3} ms", lat(&webrtc, 0.5), lat(&webrtc, 0.99)),
            bound: "-".into(),
            ok: None,
        },
        Row {
            what: "hop round trip p50, in-process channel".into(),
            on: "1 sequence in flight".into(),
            value: format!("{:.3} ms", lat(&memory, 0.5)),
            bound: "-".into(),
            ok: None,
        },
        Row {
            what: "round trip WebRTC adds per hop (p50)".into(),
            on: "loopback".into(),
            value: format!("{added:.3} ms"),
            bound: "≤ 2 ms".into(),
            ok: Some(added <= 2.0),
        },
    ];
    for (i, p) in ring.per_node.iter().enumerate() {
        rows.push(Row {
            what: format!(
                "node {i} weight bytes, layers {}..{}",
                p.layers[0], p.layers[1]
            ),
            on: format!("KV peak {:.1} MB", p.kv_bytes_peak as f64 / 1e6),
            value: format!("{:.1} MB", p.weight_bytes as f64 / 1e6),
            bound: format!("≤ {:.1} MB (model/{nodes} + 5%)", share / 1e6),
            ok: Some(p.weight_bytes as f64 <= share),
        });
    }
    Ok(rows)
}
