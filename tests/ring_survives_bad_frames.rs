//! Garbage, truncated, oversized and misaddressed frames sent to ring nodes become error
//! reports while every sequence still finishes with the right tokens; a prompt longer than the
//! context fails alone and a sequence that fills the context stops there while the others finish; a KV memory cap makes new sequences
//! wait instead of running out.

use mdi_core::starter::{Finish, SeqRequest};
use mdi_core::wire::{self, WireDtype};
use mdi_core::SamplingParams;
use mdi_tests::rings::{build_ring, build_ring_with_kv_cap};
use mdi_tests::tiny::{Shape, TinyModel};

fn reqs() -> Vec<SeqRequest> {
    (0..5)
        .map(|i| SeqRequest {
            prompt_tokens: (0..3 + i * 4).map(|t| (t * 11 + i) % 100).collect(),
            max_tokens: 6 + i as usize,
            params: SamplingParams::default(),
            eos_ids: vec![],
        })
        .collect()
}

#[test]
fn bad_frames_are_reported_and_sequences_finish() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 4,
            vocab: 100,
            ..Shape::default()
        },
        5,
    );
    let config = tiny.config();
    let store = tiny.safetensors_store();
    let expected = build_ring(&store, &config, 3, 3, WireDtype::F16, 4096).run(reqs());

    let mut ring = build_ring(&store, &config, 3, 3, WireDtype::F16, 4096);
    let good = wire::encode_activation(
        99,
        0,
        config.hidden,
        &vec![0.5; config.hidden],
        WireDtype::F16,
        4096,
    );
    let mut unknown_seq = wire::encode_activation(
        77,
        5,
        config.hidden,
        &vec![0.5; config.hidden],
        WireDtype::F16,
        4096,
    );
    let mut oversized = good[0].clone();
    oversized[16..20].copy_from_slice(&1_000_000u32.to_le_bytes());
    let mut wrong_hidden = good[0].clone();
    wrong_hidden[20..24].copy_from_slice(&7u32.to_le_bytes());
    let bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 3],
        b"hello, ring".to_vec(),
        good[0][..good[0].len() - 5].to_vec(),
        oversized,
        wrong_hidden,
        unknown_seq.remove(0),
        vec![2, 1, 0, 0],
        [vec![1, 2], b"{not json".to_vec()].concat(),
    ];
    let n_bad = bad.len();
    for (i, m) in bad.into_iter().enumerate() {
        ring.inbox[1 + i % 2].push_back(m);
    }
    let out = ring.run(reqs());
    assert_eq!(out, expected, "sequences unaffected by garbage");
    // Every bad frame is counted; reports thin out (the 1st, 2nd, 4th... per node), so a
    // stream of garbage costs the ring a few messages.
    let garbage: Vec<u64> = ring.nodes.iter().map(|n| n.node.garbage().0).collect();
    assert_eq!(garbage.iter().sum::<u64>(), n_bad as u64, "{garbage:?}");
    let reports: usize = garbage
        .iter()
        .map(|&g| (u64::BITS - g.leading_zeros()) as usize)
        .sum();
    assert_eq!(ring.node_errors.len(), reports, "{:#?}", ring.node_errors);
    assert!(ring
        .node_errors
        .iter()
        .any(|e| e.contains("unusable messages from the previous node so far")));
    assert!(ring
        .node_errors
        .iter()
        .any(|e| e.contains("sequence 77, which was never started")));
    assert!(ring.node_errors.iter().any(|e| e.contains("version 2")));
}

#[test]
fn a_sequence_outgrowing_the_context_fails_alone() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 3,
            vocab: 100,
            ..Shape::default()
        },
        6,
    );
    let mut config = tiny.config();
    config.context = 20;
    let store = tiny.safetensors_store();
    let mut requests = reqs();
    requests[1].prompt_tokens = vec![5; 25]; // longer than the context
    requests[2].max_tokens = 40; // grows past it
    requests[2].prompt_tokens.truncate(10);
    requests[3].prompt_tokens.truncate(4);
    requests[4].prompt_tokens.truncate(4);
    let mut ring = build_ring(&store, &config, 3, 5, WireDtype::F32, 4096);
    let out = ring.run(requests.clone());
    match &out[1].finish {
        Some(Finish::Error(m)) => assert!(m.contains("25 tokens") && m.contains("20"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        out[2].finish,
        Some(Finish::Context),
        "stops when the context is full"
    );
    // It produced tokens until the context was full: 20 positions − 10 prompt + 1.
    assert_eq!(out[2].tokens.len(), 11);
    for i in [0, 3, 4] {
        assert_eq!(out[i].finish, Some(Finish::MaxTokens), "sequence {i}");
        assert_eq!(out[i].tokens.len(), requests[i].max_tokens);
    }
}

#[test]
fn a_kv_cap_applies_backpressure_instead_of_running_out() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 4,
            vocab: 100,
            ..Shape::default()
        },
        8,
    );
    let config = tiny.config();
    let store = tiny.safetensors_store();
    let mut expected_ring = build_ring(&store, &config, 2, 5, WireDtype::F32, 4096);
    let expected = expected_ring.run(reqs());
    // Room for two of the longest sequences on the secondary node.
    let longest = reqs()
        .iter()
        .map(|r| r.prompt_tokens.len() + r.max_tokens)
        .max()
        .unwrap();
    let per_seq =
        mdi_core::StageEngine::cache_bytes(expected_ring.nodes[0].engine(), longest) as u64;
    let cap = 2 * per_seq;
    let mut ring = build_ring_with_kv_cap(&store, &config, 2, 5, WireDtype::F32, 4096, cap);
    let out = ring.run(reqs());
    assert_eq!(out, expected);
    let (now, peak) = ring.nodes[0].kv_bytes();
    assert_eq!(now, 0);
    assert!(peak <= cap, "peak {peak} > cap {cap}");
    assert!(peak > per_seq / 2, "the node did hold caches");
}
