//! The CPU engine benchmark behind `mdi bench`: decode and prefill speed of [`CpuEngine`] on a
//! whole model with each thread count, next to llama.cpp on the same file in the same run
//! (through the `llama-cpp-python` package, when Python has it), against the memory-bandwidth
//! bound (weight bytes per token × a streaming-read rate measured here, over a buffer of the
//! same size); the resident memory a whole-model engine adds to the process (RSS, measured);
//! and a batch of sequences against one.
//!
//! Every figure is the best of a few repetitions: the machines this runs on are small and
//! shared, and the best run is the one least disturbed by other work.

use std::path::Path;
use std::time::{Duration, Instant};

use mdi_core::engine::{BatchItem, StageEngine, StageInput, StageOutput, Want};
use mdi_core::weights::{StageSpec, StageWeights, TensorStore};
use mdi_core::{Config, Error, Result};

use crate::{CpuCache, CpuEngine, Kernels};

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Prompt length of the prefill measurement.
    pub prefill_tokens: usize,
    /// Greedy decode steps per timed run.
    pub decode_tokens: usize,
    /// Thread counts to measure.
    pub threads: Vec<usize>,
    /// Sequences of the batched-decode measurement.
    pub batch: usize,
    /// Timed repetitions of each measurement; the best counts.
    pub reps: usize,
    /// Python interpreter for the llama.cpp side (`None`: leave llama.cpp out).
    pub python: Option<String>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            prefill_tokens: 128,
            decode_tokens: 32,
            threads: vec![1, 2],
            batch: 4,
            reps: 7,
            python: Some("python3".into()),
        }
    }
}

/// One table row: what was measured, on what, the value, and the bound it is held to.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub what: String,
    pub on: String,
    pub value: String,
    pub bound: String,
    /// Whether the bound is met; `None` for reference rows.
    pub ok: Option<bool>,
}

/// llama.cpp's figures for one thread count.
#[derive(Debug, Clone)]
struct Llama {
    decode_tok_s: f64,
    prefill_tok_s: f64,
    /// A batch of sequences and one sequence through llama.cpp's batch API, tok/s (builds
    /// without that API: the reason).
    batch: std::result::Result<(f64, f64), String>,
    /// Version and configuration, for the table.
    label: String,
}

/// Run the benchmark on the whole model in `store` (read from `model_path`, whose size is the
/// memory bound's file size and which llama.cpp opens).
pub fn run(
    config: &Config,
    store: &dyn TensorStore,
    model_path: &Path,
    opts: &BenchOptions,
) -> Result<Vec<BenchRow>> {
    let reps = opts.reps.max(1);
    let spec = StageSpec::whole(config);
    let cpu_name = cpu_model();
    let file_bytes = std::fs::metadata(model_path)
        .map_err(|e| Error::Input(format!("{}: {e}", model_path.display())))?
        .len();
    // Token ids the same for both engines: a spread over the vocabulary.
    let prompt: Vec<u32> = (0..opts.prefill_tokens.max(1))
        .map(|i| ((i * 7919 + 1009) % config.vocab) as u32)
        .collect();
    let short = &prompt[..prompt.len().min(8)];
    let positions = opts.prefill_tokens.max(short.len()) + opts.decode_tokens * (reps + 2) + 8;
    let mut rows = Vec::new();

    // Resident memory first, before any other engine has come and gone: freed memory the
    // allocator keeps would otherwise hide part of the delta.
    let max_threads = opts.threads.iter().copied().max().unwrap_or(1);
    let rss_before = rss_bytes();
    let weights = StageWeights::load(store, config, &spec)?;
    let stored = weights.stored_bytes();
    let mut engine = CpuEngine::new(config.clone(), weights, max_threads)?;
    let mut cache = engine.new_cache(positions)?;
    engine.forward(&mut cache, StageInput::Tokens(&prompt), Want::Argmax)?;
    decode(&mut engine, &mut cache, opts.decode_tokens)?;
    let rss_after = rss_bytes();
    let kv = engine.cache_bytes(positions) as u64;
    let held = engine.weight_bytes();
    let per_token = engine.bytes_per_token();
    let isa = engine.kernels().isa();
    drop(cache);
    drop(engine);
    let on = |threads: usize| format!("{cpu_name}, {isa}, {threads} thr");
    let mb = |b: f64| b / 1e6;
    match (rss_before, rss_after) {
        (Some(a), Some(b)) => {
            let delta = b.saturating_sub(a);
            let bound = file_bytes + kv + 40_000_000;
            rows.push(BenchRow {
                what: "resident memory of a whole-model engine (RSS delta)".into(),
                on: on(max_threads),
                value: format!("{:.1} MB", mb(delta as f64)),
                bound: format!(
                    "≤ file {:.1} + KV {:.1} ({positions} pos) + 40 = {:.1} MB",
                    mb(file_bytes as f64),
                    mb(kv as f64),
                    mb(bound as f64)
                ),
                ok: Some(delta <= bound),
            });
        }
        _ => rows.push(BenchRow {
            what: "resident memory of a whole-model engine".into(),
            on: on(max_threads),
            value: "no /proc/self/status".into(),
            bound: "-".into(),
            ok: None,
        }),
    }
    rows.push(BenchRow {
        what: "weight bytes held by the engine".into(),
        on: on(max_threads),
        value: format!("{:.1} MB", mb(held as f64)),
        bound: format!("≤ stored {:.1} MB", mb(stored as f64)),
        ok: Some(held <= stored),
    });

    let stream = StreamProbe::new(per_token as usize);
    for &threads in &opts.threads {
        let weights = StageWeights::load(store, config, &spec)?;
        let mut engine = CpuEngine::new(config.clone(), weights, threads)?;

        // Decode of one sequence (a short prompt, two warm-up steps, then the timed steps)
        // and of a batch of sequences, taken in turns: on a shared machine both then see the
        // same quiet and busy spells, and the ratio of the two bests compares like with like.
        let b = opts.batch.max(1);
        let mut best_decode = Duration::MAX;
        let mut best_batch = Duration::MAX;
        for _ in 0..reps {
            let mut cache = engine.new_cache(positions)?;
            engine.forward(&mut cache, StageInput::Tokens(short), Want::Argmax)?;
            decode(&mut engine, &mut cache, 2)?;
            let t = Instant::now();
            decode(&mut engine, &mut cache, opts.decode_tokens)?;
            best_decode = best_decode.min(t.elapsed());
            drop(cache);

            let mut caches: Vec<CpuCache> = (0..b)
                .map(|_| engine.new_cache(positions))
                .collect::<Result<_>>()?;
            let mut next = vec![short.to_vec(); b];
            batch_step(&mut engine, &mut caches, &mut next)?;
            batch_step(&mut engine, &mut caches, &mut next)?;
            let t = Instant::now();
            for _ in 0..opts.decode_tokens {
                batch_step(&mut engine, &mut caches, &mut next)?;
            }
            best_batch = best_batch.min(t.elapsed());
        }
        let decode_tok_s = opts.decode_tokens as f64 / best_decode.as_secs_f64();

        let mut best_prefill = Duration::MAX;
        for _ in 0..reps {
            let mut cache = engine.new_cache(positions)?;
            let t = Instant::now();
            engine.forward(&mut cache, StageInput::Tokens(&prompt), Want::Logits)?;
            best_prefill = best_prefill.min(t.elapsed());
        }
        let prefill_tok_s = prompt.len() as f64 / best_prefill.as_secs_f64();

        let batch_tok_s = (b * opts.decode_tokens) as f64 / best_batch.as_secs_f64();
        drop(engine);

        let read_gb_s = stream.best_rate(threads, reps + 2) / 1e9;
        let bw_bound = read_gb_s * 1e9 / per_token as f64;
        let llama = opts.python.as_deref().map(|py| {
            llama_cpp(
                py,
                model_path,
                threads,
                &prompt,
                short,
                opts.decode_tokens,
                b,
                reps,
            )
        });

        let on = on(threads);
        let llama_on = match &llama {
            Some(Ok(l)) => format!("{cpu_name}, {threads} thr, {}", l.label),
            _ => format!("{cpu_name}, {threads} thr"),
        };
        let (llama_decode, llama_prefill) = match &llama {
            Some(Ok(l)) => (
                format!("{:.1} tok/s", l.decode_tok_s),
                format!("{:.1} tok/s", l.prefill_tok_s),
            ),
            Some(Err(e)) => (e.clone(), e.clone()),
            None => ("left out".into(), "left out".into()),
        };
        let llama_ok = llama.as_ref().and_then(|l| l.as_ref().ok()).cloned();
        let bw_ok = decode_tok_s >= 0.6 * bw_bound;
        rows.push(BenchRow {
            what: format!("decode, CpuEngine, {threads} thread(s)"),
            on: on.clone(),
            value: format!("{decode_tok_s:.1} tok/s"),
            bound: match &llama_ok {
                Some(l) => format!(
                    "≥ 1.0× llama.cpp ({:.2}×) and ≥ 60% of bound ({:.0}%)",
                    decode_tok_s / l.decode_tok_s,
                    100.0 * decode_tok_s / bw_bound
                ),
                None => format!(
                    "≥ 60% of bound ({:.0}%); llama.cpp: no figure",
                    100.0 * decode_tok_s / bw_bound
                ),
            },
            ok: Some(
                bw_ok
                    && llama_ok
                        .as_ref()
                        .is_none_or(|l| decode_tok_s >= l.decode_tok_s),
            ),
        });
        rows.push(BenchRow {
            what: format!("decode, llama.cpp, {threads} thread(s)"),
            on: llama_on.clone(),
            value: llama_decode,
            bound: "reference".into(),
            ok: None,
        });
        rows.push(BenchRow {
            what: format!("decode bandwidth bound, {threads} thread(s)"),
            on: on.clone(),
            value: format!("{bw_bound:.1} tok/s"),
            bound: format!(
                "{:.1} MB/token ÷ {read_gb_s:.1} GB/s streaming read",
                mb(per_token as f64)
            ),
            ok: None,
        });
        rows.push(BenchRow {
            what: format!(
                "prefill ({}-token prompt), CpuEngine, {threads} thread(s)",
                prompt.len()
            ),
            on: on.clone(),
            value: format!("{prefill_tok_s:.1} tok/s"),
            bound: match &llama_ok {
                Some(l) => format!("≥ 1.0× llama.cpp ({:.2}×)", prefill_tok_s / l.prefill_tok_s),
                None => "llama.cpp: no figure".into(),
            },
            ok: llama_ok.as_ref().map(|l| prefill_tok_s >= l.prefill_tok_s),
        });
        rows.push(BenchRow {
            what: format!(
                "prefill ({}-token prompt), llama.cpp, {threads} thread(s)",
                prompt.len()
            ),
            on: llama_on,
            value: llama_prefill,
            bound: "reference".into(),
            ok: None,
        });
        let ratio = batch_tok_s / decode_tok_s;
        rows.push(BenchRow {
            what: format!("batch of {b} vs 1 sequence, decode, {threads} thread(s)"),
            on,
            value: batch_ratio_text(batch_tok_s, decode_tok_s),
            bound: "≥ 2.5×".into(),
            ok: Some(ratio >= 2.5),
        });
        if let Some(l) = &llama_ok {
            rows.push(BenchRow {
                what: format!("batch of {b} vs 1 sequence, decode, llama.cpp, {threads} thread(s)"),
                on: format!("{cpu_name}, {threads} thr, {}", l.label),
                value: match &l.batch {
                    Ok((many, one)) => batch_ratio_text(*many, *one),
                    Err(e) => e.clone(),
                },
                bound: "reference: each step one llama_decode of every sequence's token".into(),
                ok: None,
            });
        }
    }
    if let Some((ratio, one, many, mb_read)) =
        kernel_batch_ratio(store, config, opts.batch.max(1), reps)?
    {
        let b = opts.batch.max(1);
        rows.push(BenchRow {
            what: format!("batch of {b} vs 1 sequence, the matrix kernel alone, 1 thread"),
            on: on(1),
            value: format!("{ratio:.2}× ({many:.2} vs {one:.2} ns per row and block)"),
            bound: format!(
                "what the kernel allows the batch rows: every weight matrix ({mb_read:.0} MB) \
                 streamed for 1 and for {b} tokens; no attention, norms or threads"
            ),
            ok: None,
        });
    }
    Ok(rows)
}

/// The batch ratio the matrix kernel alone allows: every weight matrix of a decode step as
/// stored, streamed through `rows_dot` for one token and for `b` tokens in turns (best of
/// `reps` each), on one thread. Returns (ratio, ns per row and block for 1 and for `b`
/// tokens, MB streamed), or `None` when the model has no such matrices.
fn kernel_batch_ratio(
    store: &dyn TensorStore,
    config: &Config,
    b: usize,
    reps: usize,
) -> Result<Option<(f64, f64, f64, f64)>> {
    use mdi_core::weights::Role;
    let kernels = Kernels::best();
    let mut mats = Vec::new();
    // Every matrix a decode step reads: the layers', then the head (the embedding when tied).
    let roles = [
        Role::Wq,
        Role::Wk,
        Role::Wv,
        Role::Wo,
        Role::Gate,
        Role::Up,
        Role::Down,
    ];
    let head = if config.tied_embeddings {
        Role::Embed
    } else {
        Role::Head
    };
    let names = (0..config.n_layers)
        .flat_map(|layer| roles.map(|role| store.tensor_name(role, layer)))
        .chain([store.tensor_name(head, 0)]);
    for name in names {
        let Some((dtype, shape)) = store.info(&name) else {
            continue;
        };
        let [rows, cols] = shape[..] else { continue };
        mats.push((dtype, rows, cols, store.read(&name)?));
    }
    let blocks: usize = mats.iter().map(|(_, r, c, _)| r * c.div_ceil(32)).sum();
    if blocks == 0 {
        return Ok(None);
    }
    let bytes: usize = mats.iter().map(|m| m.3.len()).sum();
    let widest = mats.iter().map(|m| m.2).max().unwrap_or(0);
    let x: Vec<f32> = (0..b * widest).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut out = vec![0f32; mats.iter().map(|m| m.1).max().unwrap_or(0) * b];
    let mut pass = |t: usize| {
        let start = Instant::now();
        for (dtype, rows, cols, w) in &mats {
            kernels.rows_dot(*dtype, w, *cols, &x[..t * cols], &mut out[..rows * t]);
        }
        start.elapsed()
    };
    let (mut one, mut many) = (Duration::MAX, Duration::MAX);
    for _ in 0..reps.max(3) {
        one = one.min(pass(1));
        many = many.min(pass(b));
    }
    let ns = |d: Duration| d.as_secs_f64() * 1e9 / blocks as f64;
    Ok(Some((
        b as f64 * one.as_secs_f64() / many.as_secs_f64(),
        ns(one),
        ns(many),
        bytes as f64 / 1e6,
    )))
}

/// Greedy decode `steps` tokens after what the cache holds.
fn decode(engine: &mut CpuEngine, cache: &mut CpuCache, steps: usize) -> Result<()> {
    let mut token = 1u32;
    for _ in 0..steps {
        if let StageOutput::Token(t) =
            engine.forward(cache, StageInput::Tokens(&[token]), Want::Argmax)?
        {
            token = t;
        }
    }
    Ok(())
}

/// One call of every sequence's next input; each then continues with its greedy token.
fn batch_step(
    engine: &mut CpuEngine,
    caches: &mut [CpuCache],
    next: &mut [Vec<u32>],
) -> Result<()> {
    let mut items: Vec<BatchItem<'_, CpuCache>> = caches
        .iter_mut()
        .zip(next.iter())
        .map(|(cache, ids)| BatchItem {
            cache,
            input: StageInput::Tokens(ids),
            want: Want::Argmax,
        })
        .collect();
    let out = engine.forward_batch(&mut items);
    for (o, n) in out.into_iter().zip(next.iter_mut()) {
        if let StageOutput::Token(t) = o? {
            *n = vec![t];
        }
    }
    Ok(())
}

/// A buffer as large as the weights one token reads, read in full by 1..n threads.
struct StreamProbe {
    buf: Vec<f32>,
}

impl StreamProbe {
    fn new(bytes: usize) -> Self {
        // Non-zero values, written once: every page is resident before the timing.
        let buf = (0..bytes.div_ceil(4).max(1024))
            .map(|i| (i % 7) as f32 * 0.25)
            .collect();
        Self { buf }
    }

    /// Bytes per second of the best of `reps` full reads with `threads` threads, each timing
    /// its own share after a common start.
    fn best_rate(&self, threads: usize, reps: usize) -> f64 {
        let k = Kernels::best();
        let threads = threads.max(1);
        let part = self.buf.len().div_ceil(threads);
        let mut best = f64::MAX;
        let mut sink = 0f32;
        for _ in 0..reps {
            let barrier = std::sync::Barrier::new(threads);
            let times: Vec<(f64, f32)> = std::thread::scope(|s| {
                let handles: Vec<_> = self
                    .buf
                    .chunks(part)
                    .map(|chunk| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            barrier.wait();
                            let t = Instant::now();
                            let v = k.dot(chunk, chunk);
                            (t.elapsed().as_secs_f64(), v)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or((f64::MAX, 0.0)))
                    .collect()
            });
            let slowest = times.iter().map(|t| t.0).fold(0f64, f64::max);
            sink += times.iter().map(|t| t.1).sum::<f32>();
            best = best.min(slowest);
        }
        // Keep the sums observable so the reads cannot be optimised away.
        std::hint::black_box(sink);
        (self.buf.len() * 4) as f64 / best
    }
}

/// The process's resident set size, from `/proc/self/status`.
pub fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Times llama.cpp's decode and prefill through llama-cpp-python: the same prompt ids, the
/// same number of greedy steps after the same short prompt, the best of the same repetitions.
/// Prints one JSON line.
const LLAMA_SCRIPT: &str = r#"
import json, sys, time
try:
    import numpy as np
    import llama_cpp
except Exception:
    print(json.dumps({"error": "not installed"}))
    sys.exit(0)
path, threads = sys.argv[1], int(sys.argv[2])
prompt = [int(t) for t in sys.argv[3].split(",")]
short = [int(t) for t in sys.argv[4].split(",")]
steps, reps = int(sys.argv[5]), int(sys.argv[6])
if sys.argv[7] == "0":
    # Without llama.cpp's extra buffer types (weight repacking, AMX): a build for a CPU that
    # reports AMX faults where the hypervisor does not let the guest use it.
    import llama_cpp.llama_cpp as low
    default_params = low.llama_model_default_params
    def no_extra_bufts():
        p = default_params()
        p.use_extra_bufts = False
        return p
    low.llama_model_default_params = no_extra_bufts
llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads,
                      n_ctx=1024, n_batch=512, n_ubatch=512, verbose=False)
n_vocab = llm.n_vocab()
def greedy():
    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
prefill = []
for _ in range(reps):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    greedy()
    prefill.append(time.perf_counter() - t)
decode = []
for _ in range(reps):
    llm.reset()
    llm.eval(short)
    tok = greedy()
    for _ in range(2):
        llm.eval([tok]); tok = greedy()
    t = time.perf_counter()
    for _ in range(steps):
        llm.eval([tok]); tok = greedy()
    decode.append(time.perf_counter() - t)
result = {"version": llama_cpp.__version__,
          "prefill_tok_s": len(prompt) / min(prefill),
          "decode_tok_s": steps / min(decode)}
# A batch of sequences against one, each decoded by the same loop through llama.cpp's own
# batch API (one llama_decode per step for all sequences, each with its own sequence id and
# positions, then each one's greedy token); left out where this build lacks that API.
def batched(b):
    import llama_cpp.llama_cpp as low
    cap = max(512, b * len(short))
    cp = low.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = 1024 * b, cap, cap, b
    cp.n_threads, cp.n_threads_batch = threads, threads
    ctx = low.llama_init_from_model(llm._model.model, cp)
    if not ctx:
        raise RuntimeError("no batch context")
    batch = low.llama_batch_init(cap, 0, b)
    try:
        def put(i, tok, pos, seq, logits):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        def greedy_of(i):
            return int(np.argmax(np.ctypeslib.as_array(low.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))
        best = float("inf")
        for _ in range(reps):
            low.llama_memory_clear(low.llama_get_memory(ctx), True)
            n = 0
            for q in range(b):
                for k, t in enumerate(short):
                    put(n, t, k, q, k == len(short) - 1); n += 1
            batch.n_tokens = n
            if low.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            toks, pos = [greedy_of(q * len(short) + len(short) - 1) for q in range(b)], len(short)
            for step in range(steps + 2):
                if step == 2:
                    t = time.perf_counter()
                for q in range(b):
                    put(q, toks[q], pos, q, True)
                batch.n_tokens = b
                if low.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                toks, pos = [greedy_of(q) for q in range(b)], pos + 1
            best = min(best, time.perf_counter() - t)
        return b * steps / best
    finally:
        low.llama_batch_free(batch)
        low.llama_free(ctx)
try:
    result["batch_one_tok_s"] = batched(1)
    result["batch_tok_s"] = batched(int(sys.argv[8]))
except Exception as e:
    result["batch_error"] = str(e)[:200]
print(json.dumps(result))
"#;

/// A batch's tok/s against one sequence's, as the table prints it: the ratio rounded down, so a
/// ratio just under the 2.5× bound does not print as the bound, then both figures.
fn batch_ratio_text(many: f64, one: f64) -> String {
    format!(
        "{:.2}× ({many:.1} vs {one:.1} tok/s)",
        (many / one * 100.0).floor() / 100.0
    )
}

/// llama.cpp as its build configures itself; when that process dies (an AMX build on a guest
/// without AMX dies of SIGILL), once more without its extra buffer types.
#[allow(clippy::too_many_arguments)]
fn llama_cpp(
    python: &str,
    model: &Path,
    threads: usize,
    prompt: &[u32],
    short: &[u32],
    steps: usize,
    batch: usize,
    reps: usize,
) -> std::result::Result<Llama, String> {
    let run = |extra| {
        llama_cpp_run(
            python, model, threads, prompt, short, steps, batch, reps, extra,
        )
    };
    match run(true) {
        Err(e) if e.starts_with("llama.cpp failed") => run(false)
            .map(|mut l| {
                l.label += ", extra buffer types off (default build faulted)";
                l
            })
            .map_err(|e2| format!("{e}; without extra buffer types: {e2}")),
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
fn llama_cpp_run(
    python: &str,
    model: &Path,
    threads: usize,
    prompt: &[u32],
    short: &[u32],
    steps: usize,
    batch: usize,
    reps: usize,
    extra_bufts: bool,
) -> std::result::Result<Llama, String> {
    let ids = |t: &[u32]| t.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(LLAMA_SCRIPT)
        .arg(model)
        .arg(threads.to_string())
        .arg(ids(prompt))
        .arg(ids(short))
        .arg(steps.to_string())
        .arg(reps.to_string())
        .arg(if extra_bufts { "1" } else { "0" })
        .arg(batch.to_string())
        .output()
        .map_err(|e| format!("no {python}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with('{'));
    let Some(line) = line else {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("no output");
        return Err(format!("llama.cpp failed ({}): {last}", out.status));
    };
    let field = |key: &str| -> Option<String> {
        let start = line.find(&format!("\"{key}\": "))? + key.len() + 4;
        let rest = &line[start..];
        let end = rest.find([',', '}'])?;
        Some(rest[..end].trim().trim_matches('"').to_string())
    };
    if let Some(e) = field("error") {
        return Err(e);
    }
    let num = |key: &str| field(key).and_then(|v| v.parse::<f64>().ok());
    match (num("decode_tok_s"), num("prefill_tok_s")) {
        (Some(d), Some(p)) => Ok(Llama {
            decode_tok_s: d,
            prefill_tok_s: p,
            batch: match (num("batch_tok_s"), num("batch_one_tok_s")) {
                (Some(many), Some(one)) => Ok((many, one)),
                _ => Err(format!(
                    "no batch figure: {}",
                    field("batch_error").unwrap_or_else(|| "not reported".into())
                )),
            },
            label: format!("llama-cpp-python {}", field("version").unwrap_or_default()),
        }),
        _ => Err(format!("unreadable llama.cpp result: {line}")),
    }
}

/// Print `rows` as a table under `title`.
pub fn print_table(title: &str, rows: &[BenchRow]) {
    println!("\n{title}");
    let width = |f: fn(&BenchRow) -> &str, min: usize| {
        rows.iter()
            .map(|r| f(r).chars().count())
            .max()
            .unwrap_or(min)
            .max(min)
    };
    let w = [
        width(|r| &r.what, 4),
        width(|r| &r.on, 2),
        width(|r| &r.value, 5),
        width(|r| &r.bound, 5),
    ];
    let pad = |s: &str, n: usize| format!("{s}{}", " ".repeat(n.saturating_sub(s.chars().count())));
    let lpad =
        |s: &str, n: usize| format!("{}{s}", " ".repeat(n.saturating_sub(s.chars().count())));
    println!(
        "| {} | {} | {} | {} | met |",
        pad("what", w[0]),
        pad("on", w[1]),
        lpad("value", w[2]),
        pad("bound", w[3])
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
            "| {} | {} | {} | {} | {met:3} |",
            pad(&r.what, w[0]),
            pad(&r.on, w[1]),
            lpad(&r.value, w[2]),
            pad(&r.bound, w[3])
        );
    }
}
