//! Running layers `[0, k)` on one stage and `[k, L)` on another — the unit of the ring — gives
//! exactly the logits of running `[0, L)` on one stage, for prefill and decode, for several k.
//! A stage that mishandles its KV cache, the embedding or the head fails this.

use mdi_core::weights::TensorStore;
use mdi_core::{Config, Oracle, StageInput, StageOutput, StageSpec, StageWeights, Want};
use mdi_tests::tiny::{Shape, TinyModel};

fn stage(store: &dyn TensorStore, config: &Config, spec: StageSpec) -> Oracle {
    Oracle::new(
        config.clone(),
        StageWeights::load(store, config, &spec).unwrap(),
    )
    .unwrap()
}

fn check_splits(store: &dyn TensorStore, config: &Config, steps: &[&[u32]], cuts: &[usize]) {
    let l = config.n_layers;
    let whole = stage(store, config, StageSpec::whole(config));
    let mut cache = whole.new_cache(32);
    let expected: Vec<_> = steps
        .iter()
        .map(|ids| {
            whole
                .forward(&mut cache, StageInput::Tokens(ids), Want::Logits)
                .unwrap()
        })
        .collect();
    for &k in cuts {
        let front = stage(
            store,
            config,
            StageSpec {
                layers: 0..k,
                embed: true,
                head: false,
            },
        );
        let back = stage(
            store,
            config,
            StageSpec {
                layers: k..l,
                embed: false,
                head: true,
            },
        );
        let (mut c1, mut c2) = (front.new_cache(32), back.new_cache(32));
        for (ids, want) in steps.iter().zip(&expected) {
            let StageOutput::Hidden(h) = front
                .forward(&mut c1, StageInput::Tokens(ids), Want::Hidden)
                .unwrap()
            else {
                panic!("front stage must hand on hidden states");
            };
            assert_eq!(h.len(), ids.len() * config.hidden);
            let got = back
                .forward(&mut c2, StageInput::Hidden(&h), Want::Logits)
                .unwrap();
            assert_eq!(&got, want, "split at {k}: logits differ");
        }
        assert_eq!(c1.len(), c2.len());
    }
}

#[test]
fn two_stages_equal_one_on_a_random_model() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 6,
            ..Shape::default()
        },
        11,
    );
    let steps: [&[u32]; 4] = [&[3, 1, 4, 1, 5, 9, 2, 6], &[5], &[35], &[89]];
    check_splits(
        &tiny.safetensors_store(),
        &tiny.config(),
        &steps,
        &[0, 1, 3, 5, 6],
    );
}

#[test]
fn three_stages_equal_one() {
    let tiny = TinyModel::random(
        Shape {
            n_layers: 6,
            tied: true,
            ..Shape::default()
        },
        12,
    );
    let config = tiny.config();
    let store = tiny.safetensors_store();
    let whole = stage(&store, &config, StageSpec::whole(&config));
    let stages = [
        stage(
            &store,
            &config,
            StageSpec {
                layers: 0..2,
                embed: true,
                head: false,
            },
        ),
        stage(
            &store,
            &config,
            StageSpec {
                layers: 2..3,
                embed: false,
                head: false,
            },
        ),
        stage(
            &store,
            &config,
            StageSpec {
                layers: 3..6,
                embed: false,
                head: true,
            },
        ),
    ];
    let mut wc = whole.new_cache(16);
    let mut caches: Vec<_> = stages.iter().map(|s| s.new_cache(16)).collect();
    for ids in [&[7u32, 8, 9][..], &[10], &[11]] {
        let want = whole
            .forward(&mut wc, StageInput::Tokens(ids), Want::Argmax)
            .unwrap();
        let mut out = stages[0]
            .forward(&mut caches[0], StageInput::Tokens(ids), Want::Hidden)
            .unwrap();
        for (i, (s, c)) in stages[1..].iter().zip(&mut caches[1..]).enumerate() {
            let StageOutput::Hidden(h) = out else {
                panic!("hidden expected")
            };
            let want = if i == 1 { Want::Argmax } else { Want::Hidden };
            out = s.forward(c, StageInput::Hidden(&h), want).unwrap();
        }
        assert_eq!(out, want);
    }
}

#[test]
fn two_stages_equal_one_on_the_default_model() -> anyhow::Result<()> {
    let model = mdi_tests::default_model()?;
    let golden = mdi_tests::golden_chat()?;
    let steps: [&[u32]; 3] = [&golden.prompt_tokens, &[504], &[3575]];
    check_splits(model.store.as_ref(), &model.config, &steps, &[1, 15, 29]);
    Ok(())
}
