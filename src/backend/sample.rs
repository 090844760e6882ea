//! Choosing the next token from logits: greedy, or temperature with optional
//! top-k and top-p (nucleus) filtering, reproducible from a seed. Every device
//! implements `Backend::sample` as exactly this function.
//!
//! [`choose`] is the one definition of the choice, given one uniform draw; the
//! CUDA kernels of kernels/sampling.cu compute exactly the same function (the
//! tests in tests/cuda_sampling.rs compare them token for token). To make that
//! possible on a device that sums in a different order, every step is either
//! an IEEE-exact single operation or integer arithmetic:
//!
//! - Logits are compared through [`key`], an order-preserving map of the float
//!   to a `u32` (NaN counts as -inf, -0 as +0). The candidates' order is
//!   (logit descending, id ascending). Dividing by a positive temperature is
//!   monotone, so this is the order of the scaled logits, with ties broken by
//!   id (it keeps apart logits that the division would round together).
//! - A token's weight is `exp((logit - max) / T)` in fixed point: an integer,
//!   `floor(exp(d) * 2^40)` ([`weight`]), with `exp` evaluated by a fixed
//!   sequence of correctly rounded f32 operations ([`exp_fixed`]); the top
//!   token weighs exactly `2^40`, tokens below `2^-40` of it weigh 0 (and are
//!   never drawn). Sums of weights are exact `u64` sums, whatever the order
//!   (the vocabulary must stay below 2^23 tokens).
//! - Probabilities are weights over a sum; "mass ≥ p" and "running sum > u ×
//!   total" compare integers with `ceil(p × total)` and `floor(u × total)`,
//!   each one f64 product.

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

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// The uniform number for the next choice: drawn from the seeded
    /// generator, except when greedy (which draws nothing, so a greedy run
    /// leaves the stream untouched).
    pub fn draw(&mut self) -> f32 {
        if is_greedy(&self.cfg) {
            0.0
        } else {
            self.rng.random::<f32>()
        }
    }

    /// The next token, chosen on the host.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let u = self.draw();
        choose(logits, &self.cfg, u)
    }
}

/// Whether `cfg` samples greedily (temperature 0, negative or NaN).
pub fn is_greedy(cfg: &SamplerConfig) -> bool {
    cfg.temperature.is_nan() || cfg.temperature <= 0.0
}

/// The weight of the most likely token, and the unit of all weights: 2^40.
pub const WEIGHT_ONE: u64 = 1 << 40;

/// The value a logit is compared and weighed as: NaN counts as -inf, -0 as +0.
pub fn canonical(x: f32) -> f32 {
    if x.is_nan() {
        f32::NEG_INFINITY
    } else if x == 0.0 {
        0.0
    } else {
        x
    }
}

/// An order-preserving image of the (canonical) float in `u32`: `a < b` as
/// floats exactly when `key(a) < key(b)`; equal floats have equal keys.
pub fn key(x: f32) -> u32 {
    let b = canonical(x).to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// `floor(exp(d) * 2^40)` for `d ≤ 0`, 0 for `d < -28` or NaN (where the
/// result would be below 2^0.6). Range reduction `d = k ln2 + r` and a
/// degree-7 Taylor polynomial in `r`, in correctly rounded f32 operations
/// that kernels/sampling.cu repeats one for one (relative error ~1e-7).
pub fn exp_fixed(d: f32) -> u64 {
    if d.is_nan() || d < -28.0 {
        return 0;
    }
    // As bit patterns, so that kernels/sampling.cu has the very same values.
    const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b); // log2(e)
    const LN2_HI: f32 = f32::from_bits(0x3f31_7200); // ln 2, 15 bits: k·LN2_HI is exact
    const LN2_LO: f32 = f32::from_bits(0x35bf_be8e); // ln 2 - LN2_HI
    let k = (d * LOG2E).round_ties_even(); // -40 ..= 0
    let r = k.mul_add(-LN2_HI, d);
    let r = k.mul_add(-LN2_LO, r);
    let mut p = 1.0 / 5040.0f32;
    for c in [
        1.0 / 720.0f32,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p.mul_add(r, c);
    }
    // p·2^(40+k), with 40 + k in 0..=40: exact.
    let scale = f32::from_bits(((127 + 40 + k as i32) as u32) << 23);
    (p * scale) as u64
}

/// The fixed-point weight of a token with canonical logit `x`, when the
/// largest canonical logit is `max` and the temperature `t > 0`:
/// `floor(exp((x - max) / t) · 2^40)`, exactly [`WEIGHT_ONE`] when `x == max`.
pub fn weight(x: f32, max: f32, t: f32) -> u64 {
    if x == max {
        return WEIGHT_ONE;
    }
    exp_fixed((x - max) / t)
}

/// `ceil(p · total)` in f64, at least 1: the mass a nucleus must reach.
pub fn nucleus_need(p: f32, total: u64) -> u64 {
    let x = p as f64 * total as f64;
    let need = if x > 0.0 { x.ceil() as u64 } else { 0 };
    need.max(1)
}

/// `floor(u · total)` in f64, clamped to `0 ..= total - 1` (u NaN or below 0
/// gives 0, u ≥ 1 gives `total - 1`): the first kept token, in id order, at
/// which the running sum of weights exceeds this is drawn. `total ≥ 1`.
pub fn draw_threshold(u: f32, total: u64) -> u64 {
    let x = u as f64 * total as f64;
    let thr = if x.is_nan() || x <= 0.0 {
        0
    } else if x >= total as f64 {
        total - 1
    } else {
        x as u64
    };
    thr.min(total - 1)
}

/// The token chosen from `logits` by `cfg` (its seed unused) with the uniform
/// draw `u` ∈ [0, 1); greedy configurations ignore `u`.
///
/// Temperature ≤ 0: [`argmax`]. Otherwise, with candidates in the order
/// (logit descending, id ascending) and weights [`weight`] (the softmax of
/// `logit / T`, unnormalised, in fixed point):
/// 1. top-k: the first k candidates (k = 0 or k ≥ vocabulary: all);
/// 2. top-p (p < 1): of those, the shortest prefix whose weight reaches
///    [`nucleus_need`]`(p, their total)` (at least one token);
/// 3. the draw: walking the kept tokens in increasing id order, the first at
///    which the running sum of weights exceeds
///    [`draw_threshold`]`(u, kept total)`.
///
/// Tokens whose weight is 0 (below 2^-40 of the top one) are never drawn.
pub fn choose(logits: &[f32], cfg: &SamplerConfig, u: f32) -> u32 {
    assert!(!logits.is_empty(), "no logits to sample from");
    if is_greedy(cfg) {
        return argmax(logits);
    }
    let t = cfg.temperature;
    let n = logits.len();
    let keys: Vec<u32> = logits.iter().map(|&x| key(x)).collect();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_unstable_by(|&a, &b| keys[b as usize].cmp(&keys[a as usize]).then(a.cmp(&b)));
    let max = canonical(logits[order[0] as usize]);
    let w = |i: u32| weight(canonical(logits[i as usize]), max, t);

    let top_k = if cfg.top_k == 0 { n } else { cfg.top_k.min(n) };
    let mut kept = &order[..top_k];
    if cfg.top_p < 1.0 {
        let total: u64 = kept.iter().map(|&i| w(i)).sum();
        let need = nucleus_need(cfg.top_p, total);
        let mut mass = 0;
        let len = kept
            .iter()
            .position(|&i| {
                mass += w(i);
                mass >= need
            })
            .map_or(kept.len(), |j| j + 1);
        kept = &kept[..len];
    }

    let mut kept = kept.to_vec();
    kept.sort_unstable();
    let weights: Vec<u64> = kept.iter().map(|&i| w(i)).collect();
    let thr = draw_threshold(u, weights.iter().sum());
    let mut cum = 0;
    for (&i, &wi) in kept.iter().zip(&weights) {
        cum += wi;
        if cum > thr {
            return i;
        }
    }
    unreachable!("the threshold lies below the kept total")
}

/// Index of the largest logit; the lowest index among equals (NaN counts as
/// -inf, -0 equals +0).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_key = 0;
    for (i, &l) in logits.iter().enumerate() {
        let k = key(l);
        if k > best_key {
            best = i;
            best_key = k;
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

    fn cfg(temperature: f32, top_k: usize, top_p: f32) -> SamplerConfig {
        SamplerConfig {
            temperature,
            top_k,
            top_p,
            seed: 0,
        }
    }

    /// `choose` for u = (i + 0.5) / steps, i in 0..steps.
    fn sweep(logits: &[f32], c: &SamplerConfig, steps: usize) -> Vec<u32> {
        (0..steps)
            .map(|i| choose(logits, c, (i as f32 + 0.5) / steps as f32))
            .collect()
    }

    /// The distinct tokens `sweep` reaches, sorted.
    fn reached(logits: &[f32], c: &SamplerConfig) -> Vec<u32> {
        let mut v = sweep(logits, c, 4096);
        v.push(choose(logits, c, 0.0));
        v.push(choose(logits, c, 1.0 - f32::EPSILON / 2.0));
        v.sort_unstable();
        v.dedup();
        v
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
        assert_eq!(argmax(&[-0.0, 0.0]), 0, "-0 equals +0");
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1, "NaN counts as -inf");
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
        let c = counts(SamplerConfig::default(), &[0.0, 3.0, 1.0], 10);
        assert_eq!(c, [0, 10, 0]);
        for t in [0.0, -1.0, f32::NAN] {
            assert_eq!(choose(&[0.0, 3.0, 3.0], &cfg(t, 0, 1.0), 0.9), 1);
        }
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

    #[test]
    fn the_draw_walks_kept_tokens_in_id_order() {
        // p = 0.25, 0.75: u below 0.25 draws token 0, above it token 1,
        // whichever is more likely.
        let logits = [0.0, (3.0f32).ln()];
        let c = cfg(1.0, 0, 1.0);
        assert_eq!(choose(&logits, &c, 0.0), 0);
        assert_eq!(choose(&logits, &c, 0.24), 0);
        assert_eq!(choose(&logits, &c, 0.26), 1);
        assert_eq!(choose(&logits, &c, 1.0 - f32::EPSILON / 2.0), 1);
        // Out-of-range draws are clamped, never panic.
        assert_eq!(choose(&logits, &c, -1.0), 0);
        assert_eq!(choose(&logits, &c, f32::NAN), 0);
        assert_eq!(choose(&logits, &c, 1.0), 1);
        assert_eq!(choose(&logits, &c, f32::INFINITY), 1);
        // Uniform over four: u picks floor(4u).
        let even = [2.0; 4];
        assert_eq!(sweep(&even, &c, 8), [0, 0, 1, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn ties_at_the_top_k_boundary_go_to_the_lowest_id() {
        let logits = [1.0, 3.0, 0.5, 3.0, 3.0];
        // k = 1: of the three equal maxima, id 1.
        assert_eq!(reached(&logits, &cfg(1.0, 1, 1.0)), [1]);
        // k = 2: ids 1 and 3, half each.
        assert_eq!(sweep(&logits, &cfg(1.0, 2, 1.0), 4), [1, 1, 3, 3]);
        // k = 4: the three maxima and then the next largest, id 0.
        assert_eq!(reached(&logits, &cfg(1.0, 4, 1.0)), [0, 1, 3, 4]);
        // k beyond the vocabulary: all.
        assert_eq!(reached(&logits, &cfg(1.0, 99, 1.0)), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn ties_at_the_nucleus_boundary_go_to_the_lowest_id() {
        // Four equal tokens: p = 0.5 keeps exactly two of them, the first two.
        let logits = [-1.0, 2.0, -5.0, 2.0, 2.0, 2.0];
        // The four tied tokens hold this much of the mass, a quarter each.
        let tied = 4.0 / (4.0 + (-3.0f64).exp() + (-7.0f64).exp());
        // p just under two quarters of it keeps two of them, the first two.
        let c = cfg(1.0, 0, (tied * 0.5 * 0.999) as f32);
        assert_eq!(reached(&logits, &c), [1, 3]);
        // Just over: three.
        let c = cfg(1.0, 0, (tied * 0.5 * 1.001) as f32);
        assert_eq!(reached(&logits, &c), [1, 3, 4]);
    }

    #[test]
    fn tiny_p_and_k_one_are_greedy() {
        let logits = [0.3, -2.0, 1.7, 1.6, 0.0];
        for c in [cfg(1.0, 1, 1.0), cfg(1.0, 0, 1e-9), cfg(5.0, 3, 0.0)] {
            assert_eq!(reached(&logits, &c), [2], "{c:?}");
        }
        // p = 1 with k = 0 reaches every token (at a high temperature).
        assert_eq!(reached(&logits, &cfg(4.0, 0, 1.0)), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn extreme_temperatures() {
        let logits = [0.3, -2.0, 1.7, 1.6, 0.0];
        // T → 0: the maximum only (also when logit / T would overflow).
        for t in [1e-3, 1e-30, f32::from_bits(1)] {
            assert_eq!(reached(&logits, &cfg(t, 0, 1.0)), [2], "T = {t:e}");
        }
        // T → ∞: uniform.
        for t in [1e30, f32::INFINITY] {
            assert_eq!(sweep(&logits, &cfg(t, 0, 1.0), 5), [0, 1, 2, 3, 4]);
        }
    }

    #[test]
    fn all_equal_logits_are_uniform() {
        let logits = [0.25; 7];
        let c = cfg(0.7, 0, 1.0);
        assert_eq!(sweep(&logits, &c, 7), [0, 1, 2, 3, 4, 5, 6]);
        let c = cfg(0.7, 3, 1.0);
        assert_eq!(sweep(&logits, &c, 3), [0, 1, 2]);
        assert_eq!(
            reached(&[f32::NEG_INFINITY; 3], &cfg(1.0, 0, 1.0)),
            [0, 1, 2]
        );
        assert_eq!(reached(&[5.0], &cfg(1.0, 0, 0.5)), [0]);
    }

    #[test]
    fn minus_infinity_and_nan_are_never_drawn() {
        let inf = f32::INFINITY;
        let logits = [-inf, 1.0, f32::NAN, 1.0, -inf];
        assert_eq!(reached(&logits, &cfg(1.0, 0, 1.0)), [1, 3]);
        assert_eq!(reached(&logits, &cfg(1.0, 4, 1.0)), [1, 3]);
        // +inf logits share all the mass.
        let logits = [1.0, inf, 3.0, inf];
        assert_eq!(sweep(&logits, &cfg(1.0, 0, 1.0), 2), [1, 3]);
        // Far below the maximum: weight 0, never drawn.
        let logits = [0.0, -100.0, -1e30];
        assert_eq!(reached(&logits, &cfg(1.0, 0, 1.0)), [0]);
    }

    #[test]
    fn fixed_point_exp_is_accurate() {
        assert_eq!(exp_fixed(0.0), WEIGHT_ONE);
        assert_eq!(exp_fixed(-0.0), WEIGHT_ONE);
        assert_eq!(exp_fixed(f32::NAN), 0);
        assert_eq!(exp_fixed(-28.5), 0);
        assert_eq!(exp_fixed(f32::NEG_INFINITY), 0);
        let mut d = 0.0f32;
        while d > -28.0 {
            let want = (d as f64).exp() * WEIGHT_ONE as f64;
            let got = exp_fixed(d) as f64;
            assert!(
                (got - want).abs() <= want * 3e-7 + 1.0,
                "{d}: {got} vs {want}"
            );
            d -= 0.0137;
        }
        assert_eq!(weight(f32::INFINITY, f32::INFINITY, 1.0), WEIGHT_ONE);
        assert_eq!(weight(1.0, f32::INFINITY, 1.0), 0);
    }

    #[test]
    fn keys_preserve_order() {
        let v = [
            f32::NEG_INFINITY,
            -3e38,
            -1.0,
            -1e-40,
            0.0,
            1e-40,
            1.0,
            3e38,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(key(w[0]) < key(w[1]), "{w:?}");
        }
        assert_eq!(key(-0.0), key(0.0));
        assert_eq!(key(f32::NAN), key(f32::NEG_INFINITY));
        assert_eq!(key(-f32::NAN), key(f32::NEG_INFINITY));
    }
}
