//! [`CpuEngine`]: one stage of the model on the CPU, computing what the oracle computes
//! (RMSNorm, RoPE in either layout, grouped-query attention, SwiGLU, tied or untied head,
//! optional Q/K/V biases) with the weights left in their stored blocks.
//!
//! Every call is a batch: the rows of all its sequences (a prefill's prompt, several
//! sequences' decode tokens, or both) go through each weight matrix together, so each weight
//! is read once per call however many rows there are; attention then runs per sequence
//! against that sequence's own KV cache at its own positions. [`StageEngine::forward`] is a
//! batch of one.

use mdi_core::config::RopeLayout;
use mdi_core::engine::{BatchItem, StageEngine, StageInput, StageOutput, Want};
use mdi_core::weights::{LayerWeights, RawTensor, StageSpec, StageWeights};
use mdi_core::{Config, Error, Result};

use crate::kernels::Kernels;
use crate::matrix::{vector, QMatrix};
use crate::pool::Pool;
use std::sync::Mutex;

/// Weight bytes a parallel task should at least cover, so that tiny matrices are not split
/// into tasks that cost more to hand out than to run.
const MIN_TASK_BYTES: usize = 16 * 1024;
/// Each task of a step takes this share of what is left per thread (guided scheduling):
/// large tasks first, few hand-outs; small ones last, so threads end a step together even
/// when one ran slower for a while (its neighbour on a shared core, the OS).
const GUIDE: usize = 2;

/// The output of a matrix product, shared by the tasks that each write their own rows of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: the tasks sharing an `Out` write disjoint values (their own rows of every token), and
// the pool's step returns only after every task has finished, while the output is borrowed.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The pointer (a method, so closures capture the whole `Out`, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// One transformer block's weights.
struct Layer {
    attn_norm: Vec<f32>, // (hidden)
    wq: QMatrix,         // (n_heads·head_dim, hidden)
    wk: QMatrix,         // (n_kv_heads·head_dim, hidden)
    wv: QMatrix,         // (n_kv_heads·head_dim, hidden)
    wo: QMatrix,         // (hidden, n_heads·head_dim)
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>, // (hidden)
    gate: QMatrix,      // (ffn, hidden)
    up: QMatrix,        // (ffn, hidden)
    down: QMatrix,      // (hidden, ffn)
}

/// A sequence's keys and values for one stage's layers.
#[derive(Debug, Clone)]
pub struct CpuCache {
    /// Per layer: (n_kv_heads, max_positions, head_dim). Allocated zeroed, so pages are only
    /// committed as positions are written.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    max_positions: usize,
    /// Positions filled: the next token's position.
    len: usize,
}

impl CpuCache {
    /// Positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions this cache can hold.
    pub fn capacity(&self) -> usize {
        self.max_positions
    }
}

/// One stage of the model on the CPU: weights in their stored format, SIMD kernels chosen at
/// run time, a thread pool made once.
pub struct CpuEngine {
    config: Config,
    spec: StageSpec,
    kernels: Kernels,
    pool: Pool,
    /// (vocab, hidden): for embedding, and the head when tied.
    embed: Option<QMatrix>,
    layers: Vec<Layer>,
    output_norm: Option<Vec<f32>>,
    /// (vocab, hidden): an untied head.
    head: Option<QMatrix>,
    /// RoPE frequency of each dimension pair, (head_dim / 2).
    inv_freq: Vec<f64>,
    /// The head's logits, (rows, vocab), kept between calls: a fresh zeroed buffer per token
    /// (196 KB a row for the default model) cost page faults and a memset every step. Its size
    /// is the largest number of head rows one call has had (at most one per sequence).
    logits: Mutex<Vec<f32>>,
}

/// One valid sequence of a batch while it runs.
struct Seq<'c> {
    index: usize,
    cache: &'c mut CpuCache,
    /// Position of the first row.
    pos: usize,
    rows: usize,
    want: Want,
}

impl CpuEngine {
    /// Take a stage's stored weights; `threads` 0 means one per core (always 1 on wasm32).
    pub fn new(config: Config, weights: StageWeights<RawTensor>, threads: usize) -> Result<Self> {
        Self::with_kernels(config, weights, threads, Kernels::best())
    }

    /// As [`new`](Self::new), with a chosen instruction set (tests, benchmarks).
    pub fn with_kernels(
        config: Config,
        weights: StageWeights<RawTensor>,
        threads: usize,
        kernels: Kernels,
    ) -> Result<Self> {
        config.validate()?;
        weights.spec.validate(&config)?;
        let c = &config;
        let (h, q, kv, f) = (c.hidden, c.q_dim(), c.kv_dim(), c.ffn);
        let matrix = |t: RawTensor, rows: usize, cols: usize| -> Result<QMatrix> {
            let m = QMatrix::from_raw(t)?;
            if (m.rows(), m.cols()) != (rows, cols) {
                return Err(Error::Shape {
                    file: "stage weights".into(),
                    tensor: m.name().to_string(),
                    expected: vec![rows, cols],
                    actual: vec![m.rows(), m.cols()],
                });
            }
            Ok(m)
        };
        let bias = |t: Option<RawTensor>, n: usize| t.map(|t| vector(t, n)).transpose();
        let StageWeights {
            spec,
            embed,
            layers,
            output_norm,
            head,
        } = weights;
        let layers = layers
            .into_iter()
            .map(|l: LayerWeights<RawTensor>| {
                Ok(Layer {
                    attn_norm: vector(l.attn_norm, h)?,
                    wq: matrix(l.wq, q, h)?,
                    wk: matrix(l.wk, kv, h)?,
                    wv: matrix(l.wv, kv, h)?,
                    wo: matrix(l.wo, h, q)?,
                    bq: bias(l.bq, q)?,
                    bk: bias(l.bk, kv)?,
                    bv: bias(l.bv, kv)?,
                    ffn_norm: vector(l.ffn_norm, h)?,
                    gate: matrix(l.gate, f, h)?,
                    up: matrix(l.up, f, h)?,
                    down: matrix(l.down, h, f)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if layers.len() != spec.layers.len() {
            return Err(Error::Input(format!(
                "stage {:?} came with {} layers of weights",
                spec.layers,
                layers.len()
            )));
        }
        let embed = embed.map(|t| matrix(t, c.vocab, h)).transpose()?;
        let head = head.map(|t| matrix(t, c.vocab, h)).transpose()?;
        let output_norm = output_norm.map(|t| vector(t, h)).transpose()?;
        if spec.embed && embed.is_none() {
            return Err(Error::Input(
                "an embedding stage needs the embedding".into(),
            ));
        }
        if spec.head && (output_norm.is_none() || head.as_ref().or(embed.as_ref()).is_none()) {
            return Err(Error::Input(
                "a head stage needs the final norm and the head matrix".into(),
            ));
        }
        let hd = c.head_dim;
        let inv_freq = (0..hd / 2)
            .map(|i| (c.rope_base as f64).powf(-2.0 * i as f64 / hd as f64))
            .collect();
        Ok(Self {
            pool: Pool::new(threads)?,
            kernels,
            spec,
            embed,
            layers,
            output_norm,
            head,
            inv_freq,
            config,
            logits: Mutex::new(Vec::new()),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The instruction set the kernels use.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Threads of the pool.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Weight bytes this engine holds: the stored bytes of its matrices plus its f32 norms and
    /// biases.
    pub fn weight_bytes(&self) -> u64 {
        let mut total = 0usize;
        let mut mat = |m: &QMatrix| total += m.bytes_held();
        self.embed.iter().chain(&self.head).for_each(&mut mat);
        let mut vecs = self.output_norm.as_ref().map_or(0, Vec::len);
        for l in &self.layers {
            for m in [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down] {
                mat(m);
            }
            vecs += l.attn_norm.len() + l.ffn_norm.len();
            vecs += [&l.bq, &l.bk, &l.bv]
                .into_iter()
                .flatten()
                .map(Vec::len)
                .sum::<usize>();
        }
        (total + vecs * 4) as u64
    }

    /// Weight bytes one decode step of one sequence reads: every layer matrix, and the head
    /// when the stage has one (the embedding is a single row).
    pub fn bytes_per_token(&self) -> u64 {
        let mut total: usize = self
            .layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.gate, &l.up, &l.down])
            .map(QMatrix::bytes_held)
            .sum();
        if self.spec.head {
            total += self.head_matrix().map_or(0, QMatrix::bytes_held);
        }
        total as u64
    }

    fn head_matrix(&self) -> Option<&QMatrix> {
        self.head.as_ref().or(self.embed.as_ref())
    }

    /// An empty cache for `max_positions` positions.
    pub fn new_cache(&self, max_positions: usize) -> Result<CpuCache> {
        let c = &self.config;
        let size = c
            .n_kv_heads
            .checked_mul(max_positions)
            .and_then(|s| s.checked_mul(c.head_dim))
            .ok_or_else(|| Error::Input(format!("a cache of {max_positions} positions")))?;
        let n = self.layers.len();
        Ok(CpuCache {
            k: (0..n).map(|_| vec![0.0; size]).collect(),
            v: (0..n).map(|_| vec![0.0; size]).collect(),
            max_positions,
            len: 0,
        })
    }

    /// Bytes of a cache for `max_positions` positions.
    pub fn cache_bytes(&self, max_positions: usize) -> usize {
        mdi_core::oracle::kv_cache_bytes(&self.config, self.layers.len(), max_positions)
    }

    /// Check one sequence's call and turn its input into hidden rows (n_tokens, hidden).
    fn prepare(&self, cache: &CpuCache, input: StageInput<'_>, want: Want) -> Result<Vec<f32>> {
        let c = &self.config;
        let spec = &self.spec;
        let x = match (input, &self.embed) {
            (StageInput::Tokens(ids), Some(embed)) if spec.embed => {
                let mut x = vec![0.0; ids.len() * c.hidden]; // (n_tokens, hidden)
                for (&id, row) in ids.iter().zip(x.chunks_exact_mut(c.hidden)) {
                    if id as usize >= c.vocab {
                        return Err(Error::Input(format!(
                            "token id {id} is outside the vocabulary of {}",
                            c.vocab
                        )));
                    }
                    let id = id as usize;
                    self.kernels
                        .dequantize_row(embed.dtype(), embed.rows_bytes(id..id + 1), row);
                }
                x
            }
            (StageInput::Hidden(h), _) if !spec.embed => {
                if !h.len().is_multiple_of(c.hidden) {
                    return Err(Error::Input(format!(
                        "{} hidden values are not whole rows of {}",
                        h.len(),
                        c.hidden
                    )));
                }
                h.to_vec()
            }
            _ => {
                return Err(Error::Input(format!(
                    "stage {:?} (embed: {}) got the wrong kind of input",
                    spec.layers, spec.embed
                )))
            }
        };
        let n = x.len() / c.hidden;
        if n == 0 {
            return Err(Error::Input("no tokens to process".into()));
        }
        if want != Want::Hidden && !spec.head {
            return Err(Error::Input(format!(
                "stage {:?} does not hold the head, so it cannot return {want:?}",
                spec.layers
            )));
        }
        let size = c.n_kv_heads * cache.max_positions * c.head_dim;
        if cache.k.len() != self.layers.len()
            || cache.k.iter().chain(&cache.v).any(|l| l.len() != size)
        {
            return Err(Error::Input(format!(
                "the cache was made for another stage than {:?}",
                spec.layers
            )));
        }
        if cache.len + n > cache.max_positions {
            return Err(Error::ContextFull {
                position: cache.len + n - 1,
                context: cache.max_positions,
            });
        }
        Ok(x)
    }

    /// Run every layer over the rows of all sequences in `x` (rows, hidden), in place.
    fn layers(&self, seqs: &mut [Seq<'_>], x: &mut [f32]) {
        let c = &self.config;
        let (hidden, hd, qd, kvd) = (c.hidden, c.head_dim, c.q_dim(), c.kv_dim());
        let rows = x.len() / hidden;
        // Each row's sequence and position.
        let mut row_seq = Vec::with_capacity(rows);
        let mut row_pos = Vec::with_capacity(rows);
        for (s, seq) in seqs.iter().enumerate() {
            for t in 0..seq.rows {
                row_seq.push(s);
                row_pos.push(seq.pos + t);
            }
        }
        // RoPE angles per row, shared by every layer and head: (rows, head_dim / 2).
        let half = hd / 2;
        let mut cos = vec![0f32; rows * half];
        let mut sin = vec![0f32; rows * half];
        for (r, &p) in row_pos.iter().enumerate() {
            for (i, f) in self.inv_freq.iter().enumerate() {
                // Angles in f64, as the oracle: position × frequency loses digits in f32.
                let (s, co) = (p as f64 * f).sin_cos();
                cos[r * half + i] = co as f32;
                sin[r * half + i] = s as f32;
            }
        }
        let mut xn = vec![0f32; rows * hidden]; // (rows, hidden)
        let mut q = vec![0f32; rows * qd]; // (rows, n_heads·head_dim)
        let mut k = vec![0f32; rows * kvd]; // (rows, n_kv_heads·head_dim)
        let mut v = vec![0f32; rows * kvd]; // (rows, n_kv_heads·head_dim)
        let mut att = vec![0f32; rows * qd]; // (rows, n_heads·head_dim)
        let mut proj = vec![0f32; rows * hidden]; // (rows, hidden)
        let mut gate = vec![0f32; rows * c.ffn]; // (rows, ffn)
        let mut up = vec![0f32; rows * c.ffn]; // (rows, ffn)
        let scale = 1.0 / (hd as f32).sqrt();

        for (li, w) in self.layers.iter().enumerate() {
            // Attention: x += Wo · attn(rope(Wq·norm(x)), rope(Wk·norm(x)), Wv·norm(x))
            rmsnorm_rows(x, &w.attn_norm, c.norm_eps, &mut xn);
            self.matmuls(
                &xn,
                &mut [
                    (&w.wq, &mut q[..]),
                    (&w.wk, &mut k[..]),
                    (&w.wv, &mut v[..]),
                ],
            );
            for (b, y) in [(&w.bq, &mut q), (&w.bk, &mut k), (&w.bv, &mut v)] {
                if let Some(b) = b {
                    for row in y.chunks_exact_mut(b.len()) {
                        row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
                    }
                }
            }
            for r in 0..rows {
                let (co, si) = (&cos[r * half..][..half], &sin[r * half..][..half]);
                for head in q[r * qd..(r + 1) * qd].chunks_exact_mut(hd) {
                    rope(head, co, si, c.rope_layout);
                }
                for head in k[r * kvd..(r + 1) * kvd].chunks_exact_mut(hd) {
                    rope(head, co, si, c.rope_layout);
                }
            }
            // Append each row's keys and values to its sequence's cache.
            for (r, (&s, &p)) in row_seq.iter().zip(&row_pos).enumerate() {
                let cache = &mut *seqs[s].cache;
                let max = cache.max_positions;
                for kvh in 0..c.n_kv_heads {
                    let dst = (kvh * max + p) * hd;
                    let src = r * kvd + kvh * hd;
                    cache.k[li][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                    cache.v[li][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
                }
            }
            self.attention(seqs, li, &row_seq, &row_pos, &q, &mut att, scale);
            self.matmuls(&att, &mut [(&w.wo, &mut proj[..])]);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

            // Feed-forward: x += down(silu(gate·norm(x)) ⊙ up·norm(x))
            rmsnorm_rows(x, &w.ffn_norm, c.norm_eps, &mut xn);
            self.gate_up(&xn, &w.gate, &w.up, &mut gate, &mut up);
            self.matmuls(&gate, &mut [(&w.down, &mut proj[..])]);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
    }

    /// Causal attention of every row over its own sequence's cache, one task per (row, KV
    /// head): the query heads sharing a KV head read its keys and values once.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        seqs: &[Seq<'_>],
        layer: usize,
        row_seq: &[usize],
        row_pos: &[usize],
        q: &[f32],       // (rows, n_heads·head_dim)
        att: &mut [f32], // (rows, n_heads·head_dim)
        scale: f32,
    ) {
        let c = &self.config;
        let (hd, group) = (c.head_dim, c.group());
        let width = group * hd;
        // (keys, values, max_positions) of each sequence at this layer.
        let kv: Vec<(&[f32], &[f32], usize)> = seqs
            .iter()
            .map(|s| {
                (
                    &s.cache.k[layer][..],
                    &s.cache.v[layer][..],
                    s.cache.max_positions,
                )
            })
            .collect();
        let tasks: Vec<(usize, &mut [f32])> = att.chunks_mut(width).enumerate().collect();
        self.pool.run(tasks, |(i, out)| {
            let (r, kvh) = (i / c.n_kv_heads, i % c.n_kv_heads);
            let (keys, values, max) = kv[row_seq[r]];
            let positions = row_pos[r] + 1; // causal: sees 0..=its own position
            let base = kvh * max * hd;
            let mut scores = vec![0f32; group * positions]; // (group, positions)
            self.kernels.attend(
                &q[i * width..(i + 1) * width],
                &keys[base..base + positions * hd],
                &values[base..base + positions * hd],
                positions,
                hd,
                scale,
                &mut scores,
                out,
            );
        });
    }

    /// Cut rows `0..rows` of a step's matrices (`row_bytes` per row, all of them together)
    /// into tasks, in the order the pool hands them out; `left` is the step's weight bytes not
    /// yet cut. One thread takes everything in one task.
    fn cut(&self, rows: usize, row_bytes: usize, left: &mut usize) -> Vec<(usize, usize)> {
        let threads = self.pool.threads();
        if threads == 1 {
            return vec![(0, rows)];
        }
        let row_bytes = row_bytes.max(1);
        let mut cuts = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let bytes = (*left / (threads * GUIDE)).max(MIN_TASK_BYTES);
            // Whole groups of the kernels' rows: 2, 4 or 6 in a panel, up to 4 fused.
            let len = (bytes.div_ceil(row_bytes).div_ceil(12) * 12).min(rows - r0);
            cuts.push((r0, len));
            *left = left.saturating_sub(len * row_bytes);
            r0 += len;
        }
        cuts
    }

    /// For every (W, y): y (n, W.rows) = x (n, W.cols) · Wᵀ. All matrices' rows are cut into
    /// tasks for one parallel step; each task reads its rows once for all n rows of x and
    /// writes its columns of every row of y in place.
    fn matmuls(&self, x: &[f32], jobs: &mut [(&QMatrix, &mut [f32])]) {
        let Some(cols) = jobs.first().map(|(w, _)| w.cols()) else {
            return;
        };
        let n = x.len() / cols;
        let mut left = jobs.iter().map(|(w, _)| w.rows() * w.row_bytes()).sum();
        // (W, first row, rows, where y starts)
        let mut tasks: Vec<(&QMatrix, usize, usize, Out)> = Vec::new();
        for (w, y) in jobs.iter_mut() {
            let rows = w.rows();
            assert_eq!(y.len(), n * rows, "matmul output of {n} × {rows}");
            let out = Out(y.as_mut_ptr());
            for (r0, len) in self.cut(rows, w.row_bytes(), &mut left) {
                tasks.push((w, r0, len, out));
            }
        }
        self.pool.run(tasks, |(w, r0, len, out)| {
            // SAFETY: y holds n rows of W.rows values (checked above) and stays borrowed
            // until the step has finished; this task alone writes rows r0..r0 + len of each.
            unsafe { self.rows_into(w, r0, len, x, out.get()) };
        });
    }

    /// Rows r0..r0 + len of W against every row of x, into `out + t·W.rows + r` (token t, row
    /// r).
    ///
    /// # Safety
    /// `out` must hold x's rows × W.rows values that no other thread touches at those places.
    unsafe fn rows_into(&self, w: &QMatrix, r0: usize, len: usize, x: &[f32], out: *mut f32) {
        let bytes = w.rows_bytes(r0..r0 + len);
        // SAFETY: as the caller promises; the kernel checks the lengths of `bytes` and `x`.
        unsafe {
            self.kernels
                .rows_dot_strided(w.dtype(), bytes, w.cols(), x, out.add(r0), 1, w.rows())
        };
    }

    /// gate = silu(x · gateᵀ) ⊙ (x · upᵀ), both (n, ffn): each task computes the same rows of
    /// both matrices for every row of x and combines them while they are still in cache, so
    /// the activation takes no step (or serial pass) of its own.
    fn gate_up(&self, x: &[f32], wg: &QMatrix, wu: &QMatrix, gate: &mut [f32], up: &mut [f32]) {
        let (rows, cols) = (wg.rows(), wg.cols());
        let n = x.len() / cols;
        assert_eq!((wu.rows(), wu.cols()), (rows, cols), "gate and up shapes");
        assert!(
            gate.len() == n * rows && up.len() == n * rows,
            "gate/up output of {n} × {rows}"
        );
        let mut left = rows * (wg.row_bytes() + wu.row_bytes());
        let (g, u) = (Out(gate.as_mut_ptr()), Out(up.as_mut_ptr()));
        let tasks = self.cut(rows, wg.row_bytes() + wu.row_bytes(), &mut left);
        self.pool.run(tasks, |(r0, len)| {
            // SAFETY: gate and up hold n × rows values (checked above) and stay borrowed until
            // the step has finished; this task alone touches rows r0..r0 + len of each token.
            unsafe {
                let (g, u) = (g.get(), u.get());
                self.rows_into(wg, r0, len, x, g);
                self.rows_into(wu, r0, len, x, u);
                for t in 0..n {
                    let at = t * rows + r0;
                    self.kernels.silu_mul(
                        std::slice::from_raw_parts_mut(g.add(at), len),
                        std::slice::from_raw_parts(u.add(at), len),
                    );
                }
            }
        });
    }

    /// A head input must be one hidden row.
    fn check_head_row(&self, hidden: &[f32]) -> Result<()> {
        if hidden.len() != self.config.hidden {
            return Err(Error::Input(format!(
                "head input has {} values, expected one row of {}",
                hidden.len(),
                self.config.hidden
            )));
        }
        Ok(())
    }

    fn no_head(&self) -> Error {
        Error::Input(format!(
            "stage {:?} does not hold the head",
            self.spec.layers
        ))
    }

    /// Final norm + LM head on rows (m, hidden), one per entry of `wants`: each row's greedy
    /// token or its logits. The head's tasks find the greedy tokens in the logits they
    /// computed while those are still in cache (a serial pass over m × vocab values otherwise).
    fn head_rows(&self, hidden: &[f32], wants: &[Want]) -> Result<Vec<StageOutput>> {
        let c = &self.config;
        let (Some(norm), Some(head)) = (&self.output_norm, self.head_matrix()) else {
            return Err(self.no_head());
        };
        let (m, vocab) = (hidden.len() / c.hidden, head.rows());
        if wants.len() != m {
            return Err(Error::Engine(format!(
                "{m} head rows for {} outputs",
                wants.len()
            )));
        }
        let mut normed = vec![0f32; hidden.len()]; // (m, hidden)
        rmsnorm_rows(hidden, norm, c.norm_eps, &mut normed);
        let mut logits = self.logits.lock().unwrap_or_else(|e| e.into_inner());
        if logits.len() < m * vocab {
            logits.resize(m * vocab, 0.0);
        }
        let logits = &mut logits[..m * vocab]; // (m, vocab): every value written below
        let argmax = wants.contains(&Want::Argmax);
        let mut left = vocab * head.row_bytes();
        let cuts = self.cut(vocab, head.row_bytes(), &mut left);
        // Each task's largest logit per row: (index, value), in the tasks' vocabulary order.
        let mut best = vec![None; cuts.len() * m];
        let out = Out(logits.as_mut_ptr());
        let tasks: Vec<_> = cuts.into_iter().zip(best.chunks_mut(m.max(1))).collect();
        self.pool.run(tasks, |((r0, len), best)| {
            // SAFETY: logits holds m × vocab values and stays borrowed until the step has
            // finished; this task alone touches vocabulary rows r0..r0 + len of each row.
            unsafe {
                let out = out.get();
                self.rows_into(head, r0, len, &normed, out);
                if argmax {
                    for (t, b) in best.iter_mut().enumerate() {
                        let row = std::slice::from_raw_parts(out.add(t * vocab + r0), len);
                        *b = max_index(row).map(|(i, v)| (r0 + i, v));
                    }
                }
            }
        });
        Ok(wants
            .iter()
            .zip(logits.chunks_exact(vocab))
            .enumerate()
            .map(|(t, (want, row))| match want {
                Want::Argmax => StageOutput::Token(first_max(row[0], best.chunks(m).map(|b| b[t]))),
                _ => StageOutput::Logits(row.to_vec()),
            })
            .collect())
    }

    /// Run a batch of checked sequences whose rows are `x`; outputs in `seqs` order.
    fn run(&self, seqs: &mut [Seq<'_>], mut x: Vec<f32>) -> Vec<Result<StageOutput>> {
        let hidden = self.config.hidden;
        self.layers(seqs, &mut x);
        let mut outputs: Vec<Option<Result<StageOutput>>> = Vec::with_capacity(seqs.len());
        // The last rows of the sequences that want the head, run through it together.
        let (mut last_rows, mut wants) = (Vec::new(), Vec::new());
        let mut start = 0;
        for s in seqs.iter_mut() {
            s.cache.len += s.rows;
            let rows = &x[start * hidden..(start + s.rows) * hidden];
            start += s.rows;
            if s.want == Want::Hidden {
                outputs.push(Some(Ok(StageOutput::Hidden(rows.to_vec()))));
            } else {
                last_rows.extend_from_slice(&rows[(s.rows - 1) * hidden..]);
                wants.push(s.want);
                outputs.push(None);
            }
        }
        if !last_rows.is_empty() {
            match self.head_rows(&last_rows, &wants) {
                Ok(heads) => {
                    let mut heads = heads.into_iter();
                    for o in outputs.iter_mut().filter(|o| o.is_none()) {
                        *o = heads.next().map(Ok);
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    for o in outputs.iter_mut().filter(|o| o.is_none()) {
                        *o = Some(Err(Error::Engine(msg.clone())));
                    }
                }
            }
        }
        outputs
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::Engine("no output".into()))))
            .collect()
    }
}

impl StageEngine for CpuEngine {
    type Cache = CpuCache;

    fn spec(&self) -> &StageSpec {
        &self.spec
    }

    fn new_cache(&mut self, max_positions: usize) -> Result<CpuCache> {
        CpuEngine::new_cache(self, max_positions)
    }

    fn cache_len(&self, cache: &CpuCache) -> usize {
        cache.len
    }

    fn cache_bytes(&self, max_positions: usize) -> usize {
        CpuEngine::cache_bytes(self, max_positions)
    }

    fn forward(
        &mut self,
        cache: &mut CpuCache,
        input: StageInput<'_>,
        want: Want,
    ) -> Result<StageOutput> {
        let mut items = [BatchItem { cache, input, want }];
        self.forward_batch(&mut items)
            .pop()
            .unwrap_or_else(|| Err(Error::Engine("no output".into())))
    }

    fn head(&mut self, hidden: &[f32], want: Want) -> Result<StageOutput> {
        self.check_head_row(hidden)?;
        self.head_rows(hidden, &[want])?
            .pop()
            .ok_or_else(|| Error::Engine("no head output".into()))
    }

    /// All valid rows through the final norm and the head matrix together: the matrix (the
    /// largest of the model) is read once for every sequence whose token came back.
    fn head_batch(&mut self, rows: &[(&[f32], Want)]) -> Vec<Result<StageOutput>> {
        let mut results: Vec<Option<Result<StageOutput>>> = rows
            .iter()
            .map(|(hidden, _)| self.check_head_row(hidden).err().map(Err))
            .collect();
        let valid: Vec<usize> = (0..rows.len()).filter(|&i| results[i].is_none()).collect();
        if !valid.is_empty() {
            let mut x = Vec::with_capacity(valid.len() * self.config.hidden); // (valid, hidden)
            for &i in &valid {
                x.extend_from_slice(rows[i].0);
            }
            let wants: Vec<Want> = valid.iter().map(|&i| rows[i].1).collect();
            match self.head_rows(&x, &wants) {
                Ok(heads) => {
                    for (&i, h) in valid.iter().zip(heads) {
                        results[i] = Some(Ok(h));
                    }
                }
                Err(_) => {
                    for &i in &valid {
                        results[i] = Some(Err(self.no_head()));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Engine("no output".into()))))
            .collect()
    }

    /// All sequences' rows go through each weight matrix together; a sequence whose input is
    /// invalid (or whose cache is full) gets its error and leaves the others unaffected.
    fn forward_batch(&mut self, items: &mut [BatchItem<'_, CpuCache>]) -> Vec<Result<StageOutput>> {
        let mut results: Vec<Option<Result<StageOutput>>> =
            (0..items.len()).map(|_| None).collect();
        let mut seqs = Vec::with_capacity(items.len());
        let mut x = Vec::new();
        for (index, it) in items.iter_mut().enumerate() {
            match self.prepare(it.cache, it.input, it.want) {
                Ok(rows) => {
                    seqs.push(Seq {
                        index,
                        pos: it.cache.len,
                        rows: rows.len() / self.config.hidden,
                        want: it.want,
                        cache: &mut *it.cache,
                    });
                    x.extend_from_slice(&rows);
                }
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        if !seqs.is_empty() {
            let outputs = self.run(&mut seqs, x);
            for (s, o) in seqs.iter().zip(outputs) {
                results[s.index] = Some(o);
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::Engine("no output".into()))))
            .collect()
    }
}

/// The first index of the largest value of `v` above −∞, and that value; `None` when there is
/// none (NaN never wins). Lane-wise maxima first, which vectorize, then one search for the
/// first place that holds the largest.
fn max_index(v: &[f32]) -> Option<(usize, f32)> {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let mut top = f32::NEG_INFINITY;
    for &x in chunks.remainder() {
        top = if x > top { x } else { top };
    }
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    for x in lanes {
        top = if x > top { x } else { top };
    }
    if top == f32::NEG_INFINITY {
        return None;
    }
    v.iter().position(|&x| x == top).map(|i| (i, top))
}

/// The greedy token of one row from its parts' [`max_index`] results in vocabulary order,
/// `first` being the row's first logit: the token `argmax` picks over the whole row (the
/// first index whose value beats every value before it), ties and NaNs included.
fn first_max(first: f32, parts: impl Iterator<Item = Option<(usize, f32)>>) -> u32 {
    let mut best = (0, first);
    for (i, v) in parts.flatten() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0 as u32
}

/// out = x / rms(x) · weight, row by row.
fn rmsnorm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = sum_squares(row) / n as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// Σ v², in 16 independent partial sums: one running sum is a chain of dependent adds that
/// neither vectorizes nor overlaps (a quarter of a millisecond per decode step of the default
/// model at batch 4, all of it on one thread).
fn sum_squares(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Rotate one head's vector (head_dim) by precomputed angles (head_dim / 2).
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], layout: RopeLayout) {
    let half = x.len() / 2;
    for i in 0..half {
        let (a, b) = match layout {
            RopeLayout::AdjacentPairs => (2 * i, 2 * i + 1),
            RopeLayout::RotateHalf => (i, i + half),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos[i] - x1 * sin[i];
        x[b] = x0 * sin[i] + x1 * cos[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::{exp, silu_mul};
    use mdi_core::sampling::{argmax, Rng};

    #[test]
    fn exp_matches_the_library_on_the_whole_range() {
        let mut worst = 0f32;
        let mut x = -86.0f32;
        while x <= 88.7 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.000_731;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        // Far outside: finite and of the right side of 1, never NaN.
        assert!(exp(-1000.0) < 1e-37 && exp(-1000.0) > 0.0);
        assert!(exp(1000.0) > 1e38 && exp(1000.0).is_finite());
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn silu_mul_and_sum_squares_match_the_plain_formulas() {
        let gate: Vec<f32> = (0..1037)
            .map(|i| ((i * 37 % 211) as f32 - 105.0) * 0.13)
            .collect();
        let up: Vec<f32> = (0..1037)
            .map(|i| ((i * 11 % 97) as f32 - 48.0) * 0.07)
            .collect();
        let mut got = gate.clone();
        silu_mul(&mut got, &up);
        for ((g, u), y) in gate.iter().zip(&up).zip(&got) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (y - want).abs() <= 1e-6 * (1.0 + want.abs()),
                "{g} {u}: {y} vs {want}"
            );
        }
        let want: f64 = gate.iter().map(|v| (*v as f64) * (*v as f64)).sum();
        let got = sum_squares(&gate) as f64;
        assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    }

    #[test]
    fn greedy_token_from_parts_is_the_whole_rows_argmax() {
        // Values from a small set (ties everywhere), with NaN and infinities mixed in, rows of
        // 1..300 values cut into parts at random places: the parts' maxima, combined in
        // order, pick the token `argmax` picks over the whole row.
        let values = [
            -2.5,
            -1.0,
            0.0,
            0.5,
            3.0,
            f32::NAN,
            f32::NEG_INFINITY,
            f32::INFINITY,
        ];
        let mut rng = Rng::new(0x2545_f491_4f6c_dd1d);
        let mut next = |m: usize| (rng.next_u64() % m as u64) as usize;
        for case in 0..4000 {
            let len = 1 + next(300);
            // Fewer kinds of values in some rows: long runs of ties, or all −∞ / NaN.
            let kinds = 1 + next(values.len());
            let offset = next(values.len());
            let row: Vec<f32> = (0..len)
                .map(|_| values[(offset + next(kinds)) % values.len()])
                .collect();
            let mut parts = Vec::new();
            let mut start = 0;
            while start < len {
                let n = (1 + next(70)).min(len - start);
                parts.push(max_index(&row[start..start + n]).map(|(i, v)| (start + i, v)));
                start += n;
            }
            let got = first_max(row[0], parts.into_iter());
            assert_eq!(got, argmax(&row), "case {case}: {row:?}");
        }
    }
}
