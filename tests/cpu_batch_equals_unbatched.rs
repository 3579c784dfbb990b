//! A batch of sequences through the CPU engine gives each sequence its unbatched output: on
//! small random models (Q4_1, F32, with and without the head) several sequences — one
//! prefilling while others decode, at different positions and asking for different outputs —
//! get the logits and hidden states they get alone (relative L2 ≤ 1e-5) and the same greedy
//! tokens; a sequence with a bad input or a full cache gets its own error without disturbing
//! the rest. On the default model, four chat prompts decoded as one batch give exactly the
//! greedy tokens each gets alone, and rows run through the head together get the head each
//! gets alone. A cache or position mixed up between sequences, or rows of one sequence
//! attending to another's, fails here.

use anyhow::{bail, ensure, Result};
use mdi_core::engine::BatchItem;
use mdi_core::sampling::{argmax, Rng};
use mdi_core::{DType, Error, StageEngine, StageInput, StageOutput, StageSpec, StageWeights, Want};
use mdi_cpu::{CpuCache, CpuEngine};
use mdi_tests::tiny::{Shape, TinyModel};

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn same(what: &str, got: &StageOutput, want: &StageOutput) -> Result<()> {
    match (got, want) {
        (StageOutput::Token(a), StageOutput::Token(b)) => {
            ensure!(a == b, "{what}: token {a} alone, {b} batched")
        }
        (StageOutput::Logits(a), StageOutput::Logits(b))
        | (StageOutput::Hidden(a), StageOutput::Hidden(b)) => {
            let e = rel_l2(a, b);
            ensure!(e <= 1e-5, "{what}: relative L2 {e:e}");
            if let (StageOutput::Logits(a), StageOutput::Logits(b)) = (got, want) {
                ensure!(argmax(a) == argmax(b), "{what}: greedy tokens differ");
            }
        }
        _ => bail!("{what}: output kinds differ: {got:?} vs {want:?}"),
    }
    Ok(())
}

/// Per sequence and step: its input and what it wants.
type Plan = Vec<Vec<(Vec<u32>, Want)>>;

fn run_tiny(dtype: DType, with_head: bool, seed: u64) -> Result<()> {
    let tiny = TinyModel::random(Shape::default(), seed);
    let (store, config) = (tiny.gguf_store(dtype), tiny.gguf_config(dtype));
    let spec = StageSpec {
        layers: 0..config.n_layers,
        embed: true,
        head: with_head,
    };
    let weights = || StageWeights::load(&store, &config, &spec);
    let mut alone = CpuEngine::new(config.clone(), weights()?, 2)?;
    let mut batched = CpuEngine::new(config.clone(), weights()?, 2)?;
    let mut rng = Rng::new(seed);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| (rng.next_u64() % config.vocab as u64) as u32)
            .collect()
    };
    let wants = if with_head {
        [Want::Logits, Want::Argmax, Want::Hidden]
    } else {
        [Want::Hidden; 3]
    };
    // Four sequences whose prompts (lengths 5, 1, 9, 3) start at different steps, so one
    // sequence prefills while the others decode.
    let mut plan: Plan = vec![Vec::new(); 4];
    for (s, (len, start)) in [(5usize, 0usize), (1, 0), (9, 2), (3, 1)]
        .into_iter()
        .enumerate()
    {
        for step in 0..6 {
            let input = if step < start {
                Vec::new()
            } else if step == start {
                ids(len)
            } else {
                ids(1)
            };
            plan[s].push((input, wants[(s + step) % 3]));
        }
    }
    let mut alone_caches: Vec<CpuCache> = (0..4)
        .map(|_| alone.new_cache(32))
        .collect::<mdi_core::Result<_>>()?;
    let mut batch_caches: Vec<CpuCache> = (0..4)
        .map(|_| batched.new_cache(32))
        .collect::<mdi_core::Result<_>>()?;
    for step in 0..6 {
        let mut want_out = Vec::new();
        for s in 0..4 {
            let (input, want) = &plan[s][step];
            if !input.is_empty() {
                want_out.push(alone.forward(
                    &mut alone_caches[s],
                    StageInput::Tokens(input),
                    *want,
                )?);
            }
        }
        let mut items: Vec<BatchItem<'_, CpuCache>> = batch_caches
            .iter_mut()
            .zip(&plan)
            .filter(|(_, p)| !p[step].0.is_empty())
            .map(|(cache, p)| BatchItem {
                cache,
                input: StageInput::Tokens(&p[step].0),
                want: p[step].1,
            })
            .collect();
        let got = batched.forward_batch(&mut items);
        ensure!(got.len() == want_out.len(), "one output per item");
        for (i, (g, w)) in got.into_iter().zip(&want_out).enumerate() {
            same(
                &format!("{dtype} head {with_head} step {step} item {i}"),
                &g?,
                w,
            )?;
        }
    }
    for (a, b) in alone_caches.iter().zip(&batch_caches) {
        ensure!(
            alone.cache_len(a) == batched.cache_len(b),
            "cache lengths differ"
        );
    }
    Ok(())
}

#[test]
fn batched_sequences_get_their_unbatched_outputs() -> Result<()> {
    run_tiny(DType::Q4_1, true, 31)?;
    run_tiny(DType::F32, true, 32)?;
    run_tiny(DType::Q8_0, false, 33)
}

#[test]
fn a_bad_item_gets_its_own_error_and_the_rest_run() -> Result<()> {
    let tiny = TinyModel::random(Shape::default(), 4);
    let (store, config) = (tiny.gguf_store(DType::Q4_0), tiny.gguf_config(DType::Q4_0));
    let spec = StageSpec::whole(&config);
    let mut cpu = CpuEngine::new(
        config.clone(),
        StageWeights::load(&store, &config, &spec)?,
        2,
    )?;
    let mut full = cpu.new_cache(2)?;
    let mut ok = cpu.new_cache(8)?;
    let mut bad = cpu.new_cache(8)?;
    let mut alone = cpu.new_cache(8)?;
    let out_of_vocab = [config.vocab as u32];
    let mut items = vec![
        BatchItem {
            cache: &mut full,
            input: StageInput::Tokens(&[1, 2, 3]),
            want: Want::Logits,
        },
        BatchItem {
            cache: &mut ok,
            input: StageInput::Tokens(&[4, 5]),
            want: Want::Logits,
        },
        BatchItem {
            cache: &mut bad,
            input: StageInput::Tokens(&out_of_vocab),
            want: Want::Logits,
        },
    ];
    let out = cpu.forward_batch(&mut items);
    ensure!(out.len() == 3);
    ensure!(
        matches!(out[0], Err(Error::ContextFull { .. })),
        "{:?}",
        out[0]
    );
    ensure!(matches!(out[2], Err(Error::Input(_))), "{:?}", out[2]);
    let want = cpu.forward(&mut alone, StageInput::Tokens(&[4, 5]), Want::Logits)?;
    match &out[1] {
        Ok(got) => same("the valid item", got, &want)?,
        Err(e) => bail!("the valid item failed: {e}"),
    }
    ensure!(cpu.cache_len(&full) == 0 && cpu.cache_len(&bad) == 0 && cpu.cache_len(&ok) == 2);
    Ok(())
}

/// The head on several rows at once (tokens that came back around the ring together) gives
/// each row what the head gives it alone, and the engine matches the oracle there; a row of
/// the wrong length gets its own error, and a stage without the head an error for every row.
#[test]
fn batched_heads_give_each_row_its_own_head() -> Result<()> {
    for (dtype, seed) in [(DType::Q4_1, 41), (DType::Q8_0, 42), (DType::F16, 43)] {
        let tiny = TinyModel::random(Shape::default(), seed);
        let (store, config) = (tiny.gguf_store(dtype), tiny.gguf_config(dtype));
        let spec = StageSpec::whole(&config);
        let mut cpu = CpuEngine::new(
            config.clone(),
            StageWeights::load(&store, &config, &spec)?,
            2,
        )?;
        let oracle =
            mdi_core::Oracle::new(config.clone(), StageWeights::load(&store, &config, &spec)?)?;
        let mut rng = Rng::new(seed);
        let rows: Vec<Vec<f32>> = (0..5)
            .map(|i| {
                // Row 3 is one value short.
                let n = if i == 3 {
                    config.hidden - 1
                } else {
                    config.hidden
                };
                (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect()
            })
            .collect();
        let wants = [
            Want::Logits,
            Want::Argmax,
            Want::Logits,
            Want::Logits,
            Want::Argmax,
        ];
        let items: Vec<(&[f32], Want)> = rows.iter().map(|r| &r[..]).zip(wants).collect();
        let got = cpu.head_batch(&items);
        ensure!(got.len() == rows.len(), "one output per row");
        for (i, (g, (row, want))) in got.into_iter().zip(&items).enumerate() {
            let what = format!("{dtype} head row {i}");
            if i == 3 {
                ensure!(matches!(g, Err(Error::Input(_))), "{what}: {g:?}");
                continue;
            }
            let g = g?;
            same(&what, &g, &cpu.head(row, *want)?)?;
            // And the oracle's logits, within the engine's tolerance.
            if let (StageOutput::Logits(a), StageOutput::Logits(b)) =
                (&g, &oracle.head(row, Want::Logits)?)
            {
                let e = rel_l2(a, b);
                ensure!(e <= 1e-3, "{what}: relative L2 {e:e} against the oracle");
            }
        }
        // A stage without the head: every row gets the error.
        let partial = StageSpec {
            layers: 0..config.n_layers,
            embed: true,
            head: false,
        };
        let mut body = CpuEngine::new(
            config.clone(),
            StageWeights::load(&store, &config, &partial)?,
            1,
        )?;
        let out = body.head_batch(&items[..2]);
        ensure!(
            out.len() == 2 && out.iter().all(|o| matches!(o, Err(Error::Input(_)))),
            "{out:?}"
        );
    }
    Ok(())
}

#[test]
fn default_model_batch_of_four_decodes_the_tokens_each_gets_alone() -> Result<()> {
    let model = mdi_tests::default_model()?;
    let config = model.config.clone();
    let weights = StageWeights::load(&*model.store, &config, &StageSpec::whole(&config))?;
    let mut cpu = CpuEngine::new(config, weights, 2)?;
    let tok = &model.tokenizer;
    let prompts: Vec<Vec<u32>> = [
        "What is the capital of France?",
        "Name three colours.",
        "Write one sentence about the sea.",
        "What is 2 + 2?",
    ]
    .iter()
    .map(|q| Ok(tok.encode(&tok.chat_prompt(q)?, false)?))
    .collect::<Result<_>>()?;
    let steps = 8;
    // Alone: each prompt, then greedy decode.
    let mut alone = Vec::new();
    for p in &prompts {
        let mut cache = cpu.new_cache(128)?;
        let mut ids = Vec::new();
        let mut input = p.clone();
        for _ in 0..steps {
            match cpu.forward(&mut cache, StageInput::Tokens(&input), Want::Argmax)? {
                StageOutput::Token(t) => {
                    ids.push(t);
                    input = vec![t];
                }
                other => bail!("argmax gave {other:?}"),
            }
        }
        alone.push(ids);
    }
    // Batched: all four prompts in one call, then all four decode tokens per call.
    let mut caches: Vec<CpuCache> = (0..4)
        .map(|_| cpu.new_cache(128))
        .collect::<mdi_core::Result<_>>()?;
    let mut inputs = prompts.clone();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 4];
    for _ in 0..steps {
        let mut items: Vec<BatchItem<'_, CpuCache>> = caches
            .iter_mut()
            .zip(&inputs)
            .map(|(cache, input)| BatchItem {
                cache,
                input: StageInput::Tokens(input),
                want: Want::Argmax,
            })
            .collect();
        let out = cpu.forward_batch(&mut items);
        for (s, o) in out.into_iter().enumerate() {
            match o? {
                StageOutput::Token(t) => {
                    got[s].push(t);
                    inputs[s] = vec![t];
                }
                other => bail!("argmax gave {other:?}"),
            }
        }
    }
    ensure!(got == alone, "batched {got:?}, alone {alone:?}");
    Ok(())
}
