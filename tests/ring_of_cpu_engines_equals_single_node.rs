//! A ring of CPU-engine nodes (weights kept quantized, SIMD kernels) in this process gives
//! every sequence exactly the greedy tokens a single CPU-engine node gives it, for 2 and 3
//! nodes with twice as many sequences in flight as nodes — so nodes find several sequences
//! waiting and run them as one batch (each weight read once), which the test also checks.

use mdi::generate::{generate, Request};
use mdi::ring::{run_ring_cpu, RingOptions, TransportKind};
use mdi_core::starter::Finish;
use mdi_core::wire::WireDtype;
use mdi_core::{StageSpec, StageWeights};
use mdi_tests::rings::chat_requests;

#[test]
fn cpu_rings_match_a_single_cpu_node_and_batch_sequences() -> anyhow::Result<()> {
    let model = mdi_tests::default_model()?;
    // Questions whose greedy choices are clear over these lengths (no near ties that float
    // ordering could flip).
    let questions = [
        "What is 7 times 8?",
        "What color is the sky?",
        "What is the largest planet?",
        "What is the capital of France?",
    ];
    let lengths = [8, 6, 3, 7];
    let reqs = chat_requests(model, &questions, |i| lengths[i])?;
    let spec = StageSpec::whole(&model.config);
    let weights = StageWeights::load(model.store.as_ref(), &model.config, &spec)?;
    let mut single = mdi_cpu::CpuEngine::new(model.config.clone(), weights, 1)?;
    let mut expected = Vec::new();
    for r in &reqs {
        let req = Request {
            prompt_tokens: r.prompt_tokens.clone(),
            max_tokens: r.max_tokens,
            params: r.params,
            eos_ids: r.eos_ids.clone(),
            context: model.config.context,
        };
        expected.push(generate(&mut single, &req, |_| Ok(()))?.tokens);
    }
    for n in [2, 3] {
        let opts = RingOptions {
            nodes: n,
            in_flight: 2 * n,
            wire: WireDtype::F32,
            transport: TransportKind::InProcess,
        };
        let mut run = run_ring_cpu(model, reqs.clone(), &opts)?;
        // Four sequences in flight over two or three nodes: some node must have found
        // several waiting at once. (With a short prefill it can happen that they arrive one by
        // one; then run again.)
        for _ in 0..3 {
            if run.per_node.iter().any(|p| p.peak_batch > 1) {
                break;
            }
            run = run_ring_cpu(model, reqs.clone(), &opts)?;
        }
        assert_eq!(run.tokens, expected, "N={n}");
        assert!(run
            .finish
            .iter()
            .all(|f| matches!(f, Some(Finish::Eos | Finish::MaxTokens))));
        assert!(run.node_errors.is_empty(), "{:?}", run.node_errors);
        assert!(
            run.per_node.iter().any(|p| p.peak_batch > 1),
            "N={n}: no node ran a batch: {:?}",
            run.per_node
        );
        let held: u64 = run.per_node.iter().map(|p| p.engine_bytes).sum();
        let stored: u64 = run.per_node.iter().map(|p| p.weight_bytes).sum();
        assert!(
            held <= stored,
            "the CPU engines hold the weights as stored: {held} > {stored}"
        );
    }
    Ok(())
}
