//! A ring of N nodes (starter + N−1 secondaries, each holding only its own layers) with S
//! sequences in flight produces, sequence by sequence, exactly the greedy tokens of the
//! single-node engine — for N in 1..=4 and S in {1, N, 2N}, with prompts of different lengths
//! and different stop points. Messages pass through the real wire encoding (chunked prefill
//! frames included) in a deterministic in-memory ring.

use mdi_core::starter::{Finish, SeqRequest};
use mdi_core::wire::WireDtype;
use mdi_core::SamplingParams;
use mdi_tests::rings::{build_ring, chat_requests, single_node, single_node_all};
use mdi_tests::tiny::{Shape, TinyModel};

fn requests(vocab: u32, eos_from: &[u32]) -> Vec<SeqRequest> {
    (0..8)
        .map(|i| SeqRequest {
            // Prompts of 1 to 36 tokens; token budgets of 1 to 15.
            prompt_tokens: (0..1 + (i * 5) % 37)
                .map(|t| (t * 7 + i * 3) % vocab)
                .collect(),
            max_tokens: 1 + (i as usize * 2) % 15,
            params: SamplingParams::default(),
            eos_ids: eos_from.to_vec(),
        })
        .collect()
}

#[test]
fn random_model_rings_match_single_node_for_every_n_and_s() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 4,
            vocab: 96,
            ..Shape::default()
        },
        21,
    );
    let config = tiny.config();
    let store = tiny.safetensors_store();
    // Pick an EOS id the model actually produces, so some sequences stop early.
    let probe = requests(96, &[]);
    let first = single_node(&store, &config, &probe[3]);
    let eos = vec![first[first.len() / 2]];
    let reqs = requests(96, &eos);
    let expected: Vec<Vec<u32>> = reqs
        .iter()
        .map(|r| single_node(&store, &config, r))
        .collect();
    assert!(
        expected.iter().any(|t| t.last() == Some(&eos[0])),
        "some stop on EOS"
    );
    assert!(
        expected.iter().any(|t| t.last() != Some(&eos[0])),
        "some stop on max tokens"
    );
    for n in 1..=4 {
        for s in [1, n, 2 * n] {
            // Small messages force prefills into several chunks.
            let mut ring = build_ring(&store, &config, n, s, WireDtype::F32, 300);
            let out = ring.run(reqs.clone());
            for (i, (o, want)) in out.iter().zip(&expected).enumerate() {
                assert_eq!(&o.tokens, want, "N={n} S={s} sequence {i}");
                let finish = o.finish.clone().expect("finished");
                assert!(
                    matches!(finish, Finish::Eos | Finish::MaxTokens),
                    "{finish:?}"
                );
            }
            assert!(ring.node_errors.is_empty(), "{:?}", ring.node_errors);
            for node in &ring.nodes {
                assert_eq!(node.live_sequences(), 0, "caches freed at the end");
            }
        }
    }
}

#[test]
fn default_model_ring_matches_single_node_with_f16_activations() -> anyhow::Result<()> {
    let model = mdi_tests::default_model()?;
    let golden = mdi_tests::golden_chat()?;
    let mut reqs = vec![SeqRequest {
        prompt_tokens: golden.prompt_tokens.clone(),
        max_tokens: 12,
        params: SamplingParams::default(),
        eos_ids: model.config.eos_ids.clone(),
    }];
    let questions = [
        "Name three colours.",
        "What is 12 times 12?",
        "Say hello in French.",
    ];
    reqs.extend(chat_requests(model, &questions, |i| 4 + 3 * i)?);
    let store = model.store.as_ref();
    let expected = single_node_all(store, &model.config, &reqs);
    assert_eq!(expected[0], golden.greedy_tokens);
    for (n, s) in [(2, 2), (3, 6), (4, 1)] {
        let mut ring = build_ring(store, &model.config, n, s, WireDtype::F16, 16 * 1024);
        let out = ring.run(reqs.clone());
        for (i, (o, want)) in out.iter().zip(&expected).enumerate() {
            assert_eq!(&o.tokens, want, "N={n} S={s} sequence {i}");
        }
    }
    Ok(())
}
