//! The CPU oracle: a plain f32 forward pass over dequantized weights. It is written to be read,
//! not to be fast; every GPU kernel and the ring are tested against it.
//!
//! A stage runs layers `[a, b)` of one sequence, optionally embedding token ids first and
//! applying the final norm and LM head last: exactly the unit a ring node runs.

use crate::config::{Config, RopeLayout};
use crate::engine::{StageEngine, StageInput, StageOutput, Want};
use crate::error::{Error, Result};
use crate::sampling::argmax;
use crate::weights::{LayerWeights, RawTensor, StageSpec, StageWeights};

/// A row-major f32 matrix (or a vector, with one row).
#[derive(Debug, Clone)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>, // (rows, cols)
}

impl Mat {
    fn from_raw(t: RawTensor) -> Result<Self> {
        Ok(Mat {
            rows: t.rows(),
            cols: t.cols(),
            data: t.to_f32(),
        })
    }

    fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// Key and value cache of one sequence for one stage's layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer of the stage: keys and values, each (n_kv_heads, max_positions, head_dim).
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    max_positions: usize,
    /// Positions already filled: the next token's position.
    len: usize,
}

impl KvCache {
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

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.k.iter().chain(&self.v).map(|x| x.len() * 4).sum()
    }
}

/// One stage of the model on the CPU.
pub struct Oracle {
    config: Config,
    weights: StageWeights<Mat>,
}

impl Oracle {
    /// Dequantize a stage's weights.
    pub fn new(config: Config, weights: StageWeights<RawTensor>) -> Result<Self> {
        Ok(Self {
            weights: weights.try_map(Mat::from_raw)?,
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn spec(&self) -> &StageSpec {
        &self.weights.spec
    }

    /// Bytes of the dequantized f32 weights this stage holds.
    pub fn weight_bytes(&self) -> u64 {
        self.weights
            .tensors()
            .iter()
            .map(|m| m.data.len() as u64 * 4)
            .sum()
    }

    /// An empty cache for `max_positions` positions of this stage's layers.
    pub fn new_cache(&self, max_positions: usize) -> KvCache {
        // Positions are bounded by the context, whose product with the KV width the
        // configuration checked; saturate regardless so a bad count fails to allocate instead
        // of wrapping to a small cache.
        let size = self.config.kv_dim().saturating_mul(max_positions);
        let n = self.weights.layers.len();
        KvCache {
            k: vec![vec![0.0; size]; n],
            v: vec![vec![0.0; size]; n],
            max_positions,
            len: 0,
        }
    }

    /// Run the stage on `input`: the tokens at positions `cache.len()..` of the sequence.
    pub fn forward(
        &self,
        cache: &mut KvCache,
        input: StageInput<'_>,
        want: Want,
    ) -> Result<StageOutput> {
        let c = &self.config;
        let spec = &self.weights.spec;
        // x: (n_tokens, hidden)
        let mut x = match (input, &self.weights.embed) {
            (StageInput::Tokens(ids), Some(embed)) if spec.embed => {
                let mut x = Vec::with_capacity(ids.len() * c.hidden);
                for &id in ids {
                    if id as usize >= c.vocab {
                        return Err(Error::Input(format!(
                            "token id {id} is outside the vocabulary of {}",
                            c.vocab
                        )));
                    }
                    x.extend_from_slice(embed.row(id as usize));
                }
                x
            }
            (StageInput::Hidden(h), _) if !spec.embed => {
                if h.len() % c.hidden != 0 {
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
        let n_tokens = x.len() / c.hidden;
        if n_tokens == 0 {
            return Err(Error::Input("no tokens to process".into()));
        }
        let pos = cache.len;
        if pos + n_tokens > cache.max_positions {
            return Err(Error::ContextFull {
                position: pos + n_tokens - 1,
                context: cache.max_positions,
            });
        }
        for (i, layer) in self.weights.layers.iter().enumerate() {
            self.block(
                layer,
                &mut cache.k[i],
                &mut cache.v[i],
                cache.max_positions,
                pos,
                &mut x,
            );
        }
        cache.len += n_tokens;
        match want {
            Want::Hidden => Ok(StageOutput::Hidden(x)),
            _ => self.head(&x[(n_tokens - 1) * c.hidden..], want),
        }
    }

    /// Final norm + LM head on one hidden row (hidden).
    pub fn head(&self, hidden: &[f32], want: Want) -> Result<StageOutput> {
        let c = &self.config;
        let (Some(norm), Some(head)) = (&self.weights.output_norm, self.weights.head_matrix())
        else {
            return Err(Error::Input(format!(
                "stage {:?} does not hold the head",
                self.weights.spec.layers
            )));
        };
        if hidden.len() != c.hidden {
            return Err(Error::Input(format!(
                "head input has {} values, expected one row of {}",
                hidden.len(),
                c.hidden
            )));
        }
        let mut normed = vec![0.0; c.hidden]; // (hidden)
        rmsnorm(hidden, &norm.data, c.norm_eps, &mut normed);
        let mut logits = vec![0.0; c.vocab]; // (vocab)
        matmul(&normed, head, &mut logits);
        Ok(match want {
            Want::Argmax => StageOutput::Token(argmax(&logits)),
            _ => StageOutput::Logits(logits),
        })
    }

    /// Bytes of a cache for `max_positions` positions.
    pub fn cache_bytes(&self, max_positions: usize) -> usize {
        kv_cache_bytes(&self.config, self.weights.layers.len(), max_positions)
    }

    /// One transformer block over all tokens in `x` (n_tokens, hidden), in place.
    fn block(
        &self,
        w: &LayerWeights<Mat>,
        k_cache: &mut [f32], // (n_kv_heads, max_positions, head_dim)
        v_cache: &mut [f32], // (n_kv_heads, max_positions, head_dim)
        max_positions: usize,
        pos: usize,
        x: &mut [f32], // (n_tokens, hidden)
    ) {
        let c = &self.config;
        let (hd, hidden) = (c.head_dim, c.hidden);
        let n_tokens = x.len() / hidden;

        // Attention: x += Wo · attn(rope(Wq·norm(x)), rope(Wk·norm(x)), Wv·norm(x))
        let mut xn = vec![0.0; x.len()]; // (n_tokens, hidden)
        for (row, out) in x.chunks_exact(hidden).zip(xn.chunks_exact_mut(hidden)) {
            rmsnorm(row, &w.attn_norm.data, c.norm_eps, out);
        }
        let mut q = vec![0.0; n_tokens * c.q_dim()]; // (n_tokens, n_heads·head_dim)
        let mut k = vec![0.0; n_tokens * c.kv_dim()]; // (n_tokens, n_kv_heads·head_dim)
        let mut v = vec![0.0; n_tokens * c.kv_dim()]; // (n_tokens, n_kv_heads·head_dim)
        matmul(&xn, &w.wq, &mut q);
        matmul(&xn, &w.wk, &mut k);
        matmul(&xn, &w.wv, &mut v);
        for (b, y) in [(&w.bq, &mut q), (&w.bk, &mut k), (&w.bv, &mut v)] {
            if let Some(b) = b {
                for row in y.chunks_exact_mut(b.data.len()) {
                    row.iter_mut().zip(&b.data).for_each(|(y, b)| *y += b);
                }
            }
        }
        for t in 0..n_tokens {
            let p = pos + t;
            for head in q[t * c.q_dim()..(t + 1) * c.q_dim()].chunks_exact_mut(hd) {
                rope(head, p, c.rope_base, c.rope_layout);
            }
            for head in k[t * c.kv_dim()..(t + 1) * c.kv_dim()].chunks_exact_mut(hd) {
                rope(head, p, c.rope_base, c.rope_layout);
            }
            // Append this token's keys and values to the cache.
            for kvh in 0..c.n_kv_heads {
                let dst = (kvh * max_positions + p) * hd;
                let src = t * c.kv_dim() + kvh * hd;
                k_cache[dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                v_cache[dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
        let mut att = vec![0.0; n_tokens * c.q_dim()]; // (n_tokens, n_heads·head_dim)
        let scale = 1.0 / (hd as f32).sqrt();
        let mut scores = vec![0.0; pos + n_tokens]; // (positions)
        for t in 0..n_tokens {
            let last = pos + t; // causal: token t sees positions 0..=last
            for h in 0..c.n_heads {
                let kvh = h / c.group();
                let qh = &q[t * c.q_dim() + h * hd..][..hd];
                let keys = &k_cache[kvh * max_positions * hd..];
                let values = &v_cache[kvh * max_positions * hd..];
                for (j, s) in scores[..=last].iter_mut().enumerate() {
                    *s = dot(qh, &keys[j * hd..(j + 1) * hd]) * scale;
                }
                softmax(&mut scores[..=last]);
                let out = &mut att[t * c.q_dim() + h * hd..][..hd];
                out.fill(0.0);
                for (j, &a) in scores[..=last].iter().enumerate() {
                    for (o, &vv) in out.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                        *o += a * vv;
                    }
                }
            }
        }
        let mut proj = vec![0.0; x.len()]; // (n_tokens, hidden)
        matmul(&att, &w.wo, &mut proj);
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);

        // Feed-forward: x += down(silu(gate·norm(x)) ⊙ up·norm(x))
        for (row, out) in x.chunks_exact(hidden).zip(xn.chunks_exact_mut(hidden)) {
            rmsnorm(row, &w.ffn_norm.data, c.norm_eps, out);
        }
        let mut gate = vec![0.0; n_tokens * c.ffn]; // (n_tokens, ffn)
        let mut up = vec![0.0; n_tokens * c.ffn]; // (n_tokens, ffn)
        matmul(&xn, &w.gate, &mut gate);
        matmul(&xn, &w.up, &mut up);
        gate.iter_mut()
            .zip(&up)
            .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
        matmul(&gate, &w.down, &mut proj);
        x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
    }
}

impl StageEngine for Oracle {
    type Cache = KvCache;

    fn spec(&self) -> &StageSpec {
        &self.weights.spec
    }

    fn new_cache(&mut self, max_positions: usize) -> Result<KvCache> {
        Ok(Oracle::new_cache(self, max_positions))
    }

    fn cache_len(&self, cache: &KvCache) -> usize {
        cache.len()
    }

    fn cache_bytes(&self, max_positions: usize) -> usize {
        Oracle::cache_bytes(self, max_positions)
    }

    fn forward(
        &mut self,
        cache: &mut KvCache,
        input: StageInput<'_>,
        want: Want,
    ) -> Result<StageOutput> {
        Oracle::forward(self, cache, input, want)
    }

    fn head(&mut self, hidden: &[f32], want: Want) -> Result<StageOutput> {
        Oracle::head(self, hidden, want)
    }
}

/// out = x / rms(x) · weight
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * inv * w;
    }
}

/// Rotate one head's vector `x` (head_dim) for position `pos`.
pub fn rope(x: &mut [f32], pos: usize, base: f32, layout: RopeLayout) {
    let hd = x.len();
    let half = hd / 2;
    for i in 0..half {
        // Angles in f64: position × frequency loses digits in f32 at long contexts.
        let theta = (base as f64).powf(-2.0 * i as f64 / hd as f64);
        let (sin, cos) = (pos as f64 * theta).sin_cos();
        let (a, b) = match layout {
            RopeLayout::AdjacentPairs => (2 * i, 2 * i + 1),
            RopeLayout::RotateHalf => (i, i + half),
        };
        let (x0, x1) = (x[a], x[b]);
        x[a] = x0 * cos as f32 - x1 * sin as f32;
        x[b] = x0 * sin as f32 + x1 * cos as f32;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// Dot product with independent partial sums, so the compiler can vectorise it.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// y = x · Wᵀ for every row of x: x (n_tokens, cols), w (rows, cols), y (n_tokens, rows).
/// Rows of W are the outer loop so each weight row is read once for all tokens.
pub fn matmul(x: &[f32], w: &Mat, y: &mut [f32]) {
    let n_tokens = x.len() / w.cols;
    for r in 0..w.rows {
        let wr = w.row(r);
        for t in 0..n_tokens {
            y[t * w.rows + r] = dot(&x[t * w.cols..(t + 1) * w.cols], wr);
        }
    }
}

/// Bytes of f32 keys and values for `layers` layers of `max_positions` positions, computed in
/// `u64` and saturated to `usize` (which is 32 bits on wasm32), so an oversized request reads
/// as more memory than any cap rather than wrapping to a small number.
pub fn kv_cache_bytes(config: &Config, layers: usize, max_positions: usize) -> usize {
    let bytes = [layers, config.n_kv_heads, config.head_dim, max_positions]
        .iter()
        .try_fold(8u64, |a, &d| a.checked_mul(d as u64));
    bytes
        .and_then(|b| usize::try_from(b).ok())
        .unwrap_or(usize::MAX)
}
