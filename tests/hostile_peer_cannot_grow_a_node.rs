//! A hostile previous node: between the starter and a ring node sits a peer that forwards the
//! real traffic and, for `MDI_HOSTILE_SECS` (60 by default), floods the node with garbage and
//! with well-formed frames meant to make it allocate: starts asking for ~4 G positions,
//! activations and chunks for sequences nobody configured, first chunks of the largest
//! activations that never finish, sequences opened and abandoned, ends for strangers. The
//! process's resident memory is sampled throughout and must stay under a ceiling fixed before
//! the attack (what it held, plus the node's configured bound, plus a margin for the links'
//! buffers), and real requests keep completing with exactly the tokens of a single node.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::StreamExt;
use mdi_core::node::{Node, NodeConfig};
use mdi_core::oracle::Oracle;
use mdi_core::sampling::Rng;
use mdi_core::starter::{Event, Finish, SeqRequest, Starter, StarterConfig};
use mdi_core::weights::{StageSpec, StageWeights};
use mdi_core::wire::{self, Control, WireDtype};
use mdi_core::SamplingParams;
use mdi_runtime::driver::{self, Command, DriverStats, Hops};
use mdi_runtime::exec::{Exec, ThreadedExec};
use mdi_tests::rings::single_node_all;
use mdi_tests::tiny::{Shape, TinyModel};
use mdi_transport::in_process;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn requests(round: u32) -> Vec<SeqRequest> {
    (0..3u32)
        .map(|i| SeqRequest {
            prompt_tokens: (0..4 + i * 3).map(|t| (t * 7 + i + round) % 200).collect(),
            max_tokens: 8,
            params: SamplingParams::default(),
            eos_ids: vec![],
        })
        .collect()
}

/// One frame of the attack.
fn hostile_frame(
    rng: &mut Rng,
    starts_due: bool,
    hidden: usize,
    context: usize,
    max_message: usize,
) -> Vec<u8> {
    // Strangers' sequence ids: far from the starter's.
    let seq = (1u64 << 40) + rng.next_u64() % 100_000;
    let act = |seq: u64, n_tokens: usize| {
        let values = vec![0.25f32; n_tokens * hidden];
        wire::encode_activation(seq, 0, hidden, &values, WireDtype::F32, max_message)
    };
    match rng.next_u64() % 9 {
        0 => (0..rng.next_u64() % 64)
            .map(|_| rng.next_u64() as u8)
            .collect(),
        1 => wire::encode_control(&Control::Start {
            seq,
            positions: u32::MAX - (rng.next_u64() % 16) as u32,
        }),
        // Opened and abandoned (a few a second: the node keeps only so many, the least
        // recently used unfed ones go first, and a peer opening them without pause would
        // displace every sequence, its own real ones too).
        2 if starts_due => wire::encode_control(&Control::Start {
            seq,
            positions: context as u32,
        }),
        // The first chunk of the largest activation, never continued.
        3 => act(seq, context).swap_remove(0),
        // A whole activation for a sequence nobody started.
        4 => act(seq, 1).swap_remove(0),
        5 => wire::encode_control(&Control::End { seq }),
        // A header claiming more tokens than the context.
        6 => {
            let mut f = act(seq, 1).swap_remove(0);
            f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
            f
        }
        7 => {
            let mut f = act(seq, 1).swap_remove(0);
            f[1] = 200; // an unknown kind
            f
        }
        2 => vec![wire::VERSION],
        _ => wire::encode_control(&Control::Error {
            seq: Some(seq),
            node: 9,
            message: "x".repeat(10_000),
        }),
    }
}

#[test]
fn a_hostile_previous_node_cannot_grow_a_node_or_stop_real_sequences() {
    let secs: u64 = std::env::var("MDI_HOSTILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let tiny = TinyModel::random(
        Shape {
            n_layers: 4,
            hidden: 256,
            n_heads: 4,
            n_kv_heads: 2,
            ffn: 384,
            vocab: 256,
            ..Shape::default()
        },
        11,
    );
    let config = tiny.config();
    let store = tiny.safetensors_store();
    let hidden = config.hidden;
    let context = config.context;
    let max_message = 16 * 1024;

    let links = in_process::InProcessConfig::default();
    // starter → hostile peer → node → starter, each hop with its reply direction.
    let ((s_next, s_next_back), (h_back, h_in)) = in_process::pair(&links);
    let ((h_out, h_out_back), (n_back, n_in)) = in_process::pair(&links);
    let ((n_next, n_next_back), (s_prev_back, s_prev)) = in_process::pair(&links);

    let spec = |layers, ends| StageSpec {
        layers,
        embed: ends,
        head: ends,
    };
    let load = |s: &StageSpec| {
        let w = StageWeights::load(&store, &config, s).expect("stage weights");
        let bytes = w.stored_bytes();
        ThreadedExec::new(
            Oracle::new(config.clone(), w).expect("oracle"),
            bytes,
            "oracle",
        )
    };
    let starter_exec = load(&spec(0..2, true));
    let node_exec = load(&spec(2..4, false));
    let node_cfg = NodeConfig {
        index: 1,
        is_last: true,
        hidden,
        wire: WireDtype::F32,
        max_message,
        max_positions: context,
        max_tokens: context,
        max_sequences: 8,
        max_partials: 2,
        max_held_bytes: 4 << 20,
        kv_bytes_per_position: node_exec.kv_bytes_per_position() as u64,
        kv_cap_bytes: 16 << 20,
    };
    let bound = node_cfg.memory_bound();
    let starter = Starter::new(StarterConfig {
        n_nodes: 2,
        hidden,
        wire: WireDtype::F32,
        max_message,
        context,
        in_flight: 3,
        kv_bytes_per_position: starter_exec.kv_bytes_per_position() as u64,
        kv_cap_bytes: u64::MAX,
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stats = || Arc::new(Mutex::new(DriverStats::default()));
    let node_stats = stats();
    let (cmd_tx, cmd_rx) = mpsc::unbounded();
    let (ev_tx, mut ev_rx) = mpsc::unbounded();
    let h = rt.handle().clone();
    let starter_thread = std::thread::spawn(move || {
        let hops = Hops {
            next: Some((s_next, s_next_back)),
            prev: Some((s_prev, s_prev_back)),
        };
        h.block_on(driver::run_starter(
            starter,
            &starter_exec,
            hops,
            cmd_rx,
            ev_tx,
            stats(),
            driver::Batching::greedy(),
        ))
    });
    let h = rt.handle().clone();
    let ns = node_stats.clone();
    let node_thread = std::thread::spawn(move || {
        let hops = Hops {
            next: Some((n_next, n_next_back)),
            prev: Some((n_in, n_back)),
        };
        h.block_on(driver::run_node(
            Node::new(node_cfg),
            &node_exec,
            hops,
            ns,
            driver::Batching::greedy(),
        ))
    });

    // The hostile peer: forwards both ways, and attacks while `attacking` is set.
    let attacking = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let h_out = Arc::new(h_out);
    {
        let (mut h_in, out) = (h_in, h_out.clone());
        rt.spawn(async move {
            while let Some(m) = h_in.recv().await {
                if out.send(m).await.is_err() {
                    break;
                }
            }
        });
        let mut h_out_back = h_out_back;
        rt.spawn(async move {
            while let Some(m) = h_out_back.recv().await {
                if h_back.send(m).await.is_err() {
                    break;
                }
            }
        });
        let (out, on, sent) = (h_out.clone(), attacking.clone(), sent.clone());
        rt.spawn(async move {
            let mut rng = Rng::new(0xbad);
            let mut last_start = Instant::now();
            loop {
                if on.load(std::sync::atomic::Ordering::SeqCst) {
                    let due = last_start.elapsed() > Duration::from_millis(50);
                    if due {
                        last_start = Instant::now();
                    }
                    let f = hostile_frame(&mut rng, due, hidden, context, max_message);
                    if out.send(f).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // Bursts of 32, then a pause: the flood never starves the runtime's
                    // timers and workers of their turn.
                    if sent.load(std::sync::atomic::Ordering::Relaxed) % 32 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
    }

    let mut next_id = 0u64;
    let mut run_round = |round: u32, ev_rx: &mut mpsc::UnboundedReceiver<Event>| {
        let reqs = requests(round);
        let want = single_node_all(&store, &config, &reqs);
        let ids: Vec<u64> = reqs
            .into_iter()
            .map(|req| {
                next_id += 1;
                cmd_tx
                    .unbounded_send(Command::Submit { id: next_id, req })
                    .expect("the starter runs");
                next_id
            })
            .collect();
        let mut got: Vec<Vec<u32>> = vec![Vec::new(); ids.len()];
        let mut done = 0;
        while done < ids.len() {
            let ev = rt
                .block_on(async {
                    tokio::time::timeout(Duration::from_secs(60), ev_rx.next()).await
                })
                .expect("a real request stalled under attack")
                .expect("the starter ended");
            match ev {
                Event::Token { id, token } => got[(id - ids[0]) as usize].push(token),
                Event::Done { id, finish } => {
                    assert!(
                        matches!(finish, Finish::MaxTokens),
                        "request {id} ended with {finish:?}"
                    );
                    done += 1;
                }
                Event::NodeError { .. } => {}
            }
        }
        assert_eq!(got, want, "round {round}: the real answers changed");
    };

    // A clean round, then the ceiling: what the process holds now, plus what the node may hold
    // whatever it is sent, plus a margin for the links' buffers and the allocator.
    run_round(0, &mut ev_rx);
    let baseline = rss_bytes();
    let margin = 48u64 << 20;
    let ceiling = baseline + bound + margin;
    attacking.store(true, std::sync::atomic::Ordering::SeqCst);
    let start = Instant::now();
    let mut peak = 0u64;
    let mut rounds = 0u32;
    while start.elapsed() < Duration::from_secs(secs) {
        rounds += 1;
        run_round(rounds, &mut ev_rx);
        peak = peak.max(rss_bytes());
    }
    attacking.store(false, std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(200));
    peak = peak.max(rss_bytes());
    let frames = sent.load(std::sync::atomic::Ordering::Relaxed);
    let s = node_stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
    eprintln!(
        "{secs} s under attack: {frames} hostile frames, {rounds} rounds of real requests, \
         node garbage count {}, RSS {:.1} MB before, peak {:.1} MB, ceiling {:.1} MB \
         (node bound {:.1} MB)",
        s.garbage,
        baseline as f64 / 1e6,
        peak as f64 / 1e6,
        ceiling as f64 / 1e6,
        bound as f64 / 1e6
    );
    assert!(frames > 1000, "the attack ran ({frames} frames)");
    assert!(s.garbage > 0, "the node counted the garbage");
    assert!(rounds >= 2, "real requests completed during the attack");
    assert!(
        peak <= ceiling,
        "resident memory {peak} passed the ceiling {ceiling}"
    );
    // The ring still answers once the attack stops, and shuts down cleanly.
    run_round(rounds + 1, &mut ev_rx);
    eprintln!("the ring answers after the attack");
    // The ring serves until its links close, and the hostile peer holds one open: leave the
    // driver threads to the end of the process.
    drop((starter_thread, node_thread));
    rt.shutdown_background();
}
