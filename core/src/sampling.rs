//! Choosing the next token from logits: greedy, or temperature with top-k and top-p, driven by
//! a small seeded generator so runs repeat exactly.

use serde::{Deserialize, Serialize};

/// How to pick tokens. `temperature == 0` is greedy. Reading one checks it (a finite
/// temperature ≥ 0, `top_p` within (0, 1]), so a peer cannot hand a node one that samples
/// nonsense or does not survive being sent on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Unchecked")]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// [`SamplingParams`] as read, before [`SamplingParams::check`].
#[derive(Deserialize)]
struct Unchecked {
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u64,
}

impl TryFrom<Unchecked> for SamplingParams {
    type Error = String;

    fn try_from(u: Unchecked) -> Result<Self, String> {
        let p = SamplingParams {
            temperature: u.temperature,
            top_k: u.top_k,
            top_p: u.top_p,
            seed: u.seed,
        };
        p.check()?;
        Ok(p)
    }
}

impl SamplingParams {
    /// Whether these parameters can be used: a finite temperature ≥ 0 and `top_p` in (0, 1].
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!(
                "temperature must be a finite number ≥ 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be within (0, 1], got {}", self.top_p));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// The parameters of a sequence resumed after `sampled` tokens: a sampler made from them
    /// makes the draws the original one had not made yet (one draw per token it sampled;
    /// greedy decoding draws nothing), so a resumed seeded sequence repeats the undisturbed one.
    pub fn resumed_after(&self, sampled: usize) -> Self {
        let mut p = *self;
        if !self.is_greedy() {
            p.seed = Rng::seed_after(self.seed, sampled as u64);
        }
        p
    }
}

/// SplitMix64: tiny, seedable and the same on every target.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The seed of a generator that starts where one seeded with `seed` is after `draws`
    /// draws (SplitMix64's state only moves by a constant step).
    pub fn seed_after(seed: u64, draws: u64) -> u64 {
        seed.wrapping_add(Self::GAMMA.wrapping_mul(draws))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// Index of the largest logit (the first one on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A sampler with its own random state: one per sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Self {
            rng: Rng::new(params.seed),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits` (vocab).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first; NaNs sort last and never win.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, if l.is_nan() { f32::NEG_INFINITY } else { l }))
            .collect();
        let k = match self.params.top_k {
            0 => cand.len(),
            k => k.min(cand.len()),
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        let max = cand[0].1;
        let t = self.params.temperature;
        let mut probs: Vec<f32> = cand.iter().map(|c| ((c.1 - max) / t).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let top_p = self.params.top_p.clamp(0.0, 1.0);
        if top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            let sum: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= sum);
        }
        let r = self.rng.next_f32();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if r < acc {
                return cand[i].0;
            }
        }
        cand[probs.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let best = argmax(&logits);
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            top_p: 1.0,
            seed: 7,
        };
        let mut sorted: Vec<u32> = (0..50).collect();
        sorted.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        let mut s = Sampler::new(params);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let t = s.sample(&logits);
            assert!(sorted[..3].contains(&t), "{t} is outside the top 3");
            seen.insert(t);
        }
        assert_eq!(seen.len(), 3, "all three candidates get sampled");
        let mut g = Sampler::new(SamplingParams { top_k: 1, ..params });
        assert_eq!(g.sample(&logits), best);
    }

    #[test]
    fn a_resumed_sampler_makes_the_draws_the_original_had_left() {
        let params = SamplingParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            seed: 12345,
        };
        let mut rng = Rng(99);
        let steps: Vec<Vec<f32>> = (0..24)
            .map(|_| (0..17).map(|_| rng.next_f32() * 4.0).collect())
            .collect();
        let mut whole = Sampler::new(params);
        let all: Vec<u32> = steps.iter().map(|l| whole.sample(l)).collect();
        for cut in [0, 1, 7, 23] {
            let mut resumed = Sampler::new(params.resumed_after(cut));
            let rest: Vec<u32> = steps[cut..].iter().map(|l| resumed.sample(l)).collect();
            assert_eq!(rest, all[cut..], "resumed after {cut}");
        }
        // Greedy parameters stay as they are.
        let greedy = SamplingParams::default();
        assert_eq!(greedy.resumed_after(5).seed, greedy.seed);
    }

    #[test]
    fn top_p_keeps_the_nucleus_and_seeds_repeat() {
        // One token holds ~97% of the mass: top_p 0.9 must always pick it.
        let logits = [10.0, 6.0, 5.0, 1.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            seed: 1,
        };
        let mut s = Sampler::new(params);
        assert!((0..200).all(|_| s.sample(&logits) == 0));
        let flat = [1.0f32; 64];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&flat)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..20).map(|_| s.sample(&flat)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::BTreeSet<_>>().len() > 5);
    }

    #[test]
    fn sampling_params_from_outside_are_checked() {
        let ok = r#"{"temperature":0.7,"top_k":40,"top_p":0.9,"seed":3}"#;
        let p: SamplingParams = serde_json::from_str(ok).unwrap();
        assert_eq!(serde_json::to_string(&p).unwrap(), ok);
        for bad in [
            r#"{"temperature":0.0,"top_k":0,"top_p":1.01e308,"seed":0}"#,
            r#"{"temperature":1e39,"top_k":0,"top_p":1.0,"seed":0}"#,
            r#"{"temperature":-1.0,"top_k":0,"top_p":1.0,"seed":0}"#,
            r#"{"temperature":0.0,"top_k":0,"top_p":0.0,"seed":0}"#,
        ] {
            let e = serde_json::from_str::<SamplingParams>(bad).unwrap_err();
            assert!(e.to_string().contains("must be"), "{bad}: {e}");
        }
    }
}
