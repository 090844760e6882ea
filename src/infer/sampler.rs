//! Choosing the next token from logits: greedy, or temperature with optional
//! top-k and top-p (nucleus) filtering, reproducible from a seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches p; 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Self {
        Sampler {
            cfg,
            rng: StdRng::seed_from_u64(cfg.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, highest first (ties: lower id first).
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / self.cfg.temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.cfg.top_k > 0 {
            cand.truncate(self.cfg.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|c| (c.1 - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.cfg.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    mass += p;
                    mass >= self.cfg.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (c, p) in cand.iter().zip(&probs) {
            r -= p;
            if r <= 0.0 {
                return c.0;
            }
        }
        cand[probs.len() - 1].0
    }
}

/// Index of the largest logit; the lowest index among equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(cfg: SamplerConfig, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(cfg);
        let mut c = vec![0; logits.len()];
        for _ in 0..draws {
            c[s.sample(logits) as usize] += 1;
        }
        c
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        let c = counts(SamplerConfig::default(), &[0.0, 3.0, 1.0], 10);
        assert_eq!(c, [0, 10, 0]);
    }

    #[test]
    fn top_k_excludes_the_rest() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            ..Default::default()
        };
        let c = counts(cfg, &[1.0, 0.9, 0.8, 0.7], 2000);
        assert_eq!(c[2] + c[3], 0);
        assert!(c[0] > 0 && c[1] > 0);
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // probabilities ≈ 0.64, 0.24, 0.09, 0.03: p = 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 0.8,
            ..Default::default()
        };
        let c = counts(cfg, &logits, 2000);
        assert_eq!(c[2] + c[3], 0);
        assert!(c[1] > 300, "{c:?}");
    }

    #[test]
    fn temperature_sampling_follows_softmax_and_seed() {
        let logits = [0.0, (3.0f32).ln()]; // p = 0.25, 0.75
        let cfg = SamplerConfig {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let c = counts(cfg, &logits, 4000);
        let p1 = c[1] as f32 / 4000.0;
        assert!((p1 - 0.75).abs() < 0.03, "{p1}");
        assert_eq!(c, counts(cfg, &logits, 4000), "same seed, same draws");
    }
}
