//! `mdi generate --nodes N` runs a ring of N nodes in one process, each on its own thread with
//! only its own layers, linked by real WebRTC data channels over loopback. Its greedy tokens
//! equal the single-node engine's, sequence by sequence, for N in 1..=4 and S in {1, N, 2N}
//! sequences in flight, on the default model; the summary reports each node's share.

use mdi::ring::{run_ring, RingOptions, TransportKind};
use mdi_core::starter::Finish;
use mdi_core::wire::WireDtype;
use mdi_tests::rings::{chat_requests, single_node_all};

#[test]
fn webrtc_rings_match_single_node_on_the_default_model() -> anyhow::Result<()> {
    let model = mdi_tests::default_model()?;
    let questions = [
        "What is the capital of France?",
        "Name three colours.",
        "What is 7 times 8?",
        "Say hello in German.",
    ];
    let reqs = chat_requests(model, &questions, |i| 3 + 2 * i)?;
    let store = model.store.as_ref();
    let expected = single_node_all(store, &model.config, &reqs);
    let total_weights: u64 = std::fs::metadata(&model.path)?.len();
    for n in 1..=4 {
        for s in [1, n, 2 * n] {
            let opts = RingOptions {
                nodes: n,
                in_flight: s,
                wire: WireDtype::F16,
                transport: TransportKind::WebRtc,
            };
            let run = run_ring(model, reqs.clone(), &opts)?;
            assert_eq!(run.tokens, expected, "N={n} S={s}");
            assert!(run
                .finish
                .iter()
                .all(|f| matches!(f, Some(Finish::Eos | Finish::MaxTokens))));
            assert!(run.node_errors.is_empty(), "{:?}", run.node_errors);
            assert_eq!(run.per_node.len(), n);
            assert_eq!(run.per_node[0].layers[0], 0);
            assert_eq!(run.per_node[n - 1].layers[1], model.config.n_layers);
            let held: u64 = run.per_node.iter().map(|p| p.weight_bytes).sum();
            assert!(held <= total_weights, "no layer is loaded twice");
            if n > 1 {
                assert!(!run.hop_rtt_ms.is_empty(), "hops were timed");
                assert_eq!(run.decode_hop_bytes, Some(576 * 2 + 32));
            }
        }
    }
    Ok(())
}
