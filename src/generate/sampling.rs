//! Logits processors and token selection: HF semantics for repetition penalty, temperature,
//! top-k, top-p and min-p; OpenAI semantics for presence and frequency penalties.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::kernels::activation;

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    /// HF `repetition_penalty`: > 1 discourages every token already in prompt or output.
    pub repetition_penalty: Option<f32>,
    /// OpenAI `presence_penalty`, over generated tokens.
    pub presence_penalty: f32,
    /// OpenAI `frequency_penalty`, over generated tokens.
    pub frequency_penalty: f32,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Reject values no sampler can honour, naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(Error::invalid(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(format!("top-p must be in (0, 1], got {p}")));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(format!("min-p must be in [0, 1], got {p}")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("top-k must be >= 1"));
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(Error::invalid(format!(
                    "repetition penalty must be > 0, got {r}"
                )));
            }
        }
        for (name, v) in [
            ("presence penalty", self.presence_penalty),
            ("frequency penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid(format!(
                    "{name} must be in [-2, 2], got {v}"
                )));
            }
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A token and its log-probability.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
}

/// The chosen token's log-probability under the model, with the `top` most likely alternatives.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LogprobEntry {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<TokenLogprob>,
}

/// Picks tokens for one sequence; owns its random state so a seed reproduces the output.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffer of (token, value) pairs, reused across steps.
    candidates: Vec<(u32, f32)>,
    /// Scratch buffer of the vocabulary's sampling weights, reused across steps.
    weights: Vec<f32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        Ok(Sampler {
            params,
            rng,
            candidates: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// Choose the next token from raw `logits` (modified in place).
    /// `context` is prompt + generated ids (repetition penalty); `generated_counts` counts generated ids.
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        context: &[u32],
        generated_counts: &HashMap<u32, usize>,
    ) -> u32 {
        self.apply_penalties(logits, context, generated_counts);
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // e^((l − max)/T) over the whole vocabulary, vectorised (tens of thousands per token).
        self.weights.clear();
        self.weights.extend(logits.iter().map(|l| l * inv_t));
        activation::exp_shifted_inplace(&mut self.weights, max * inv_t);
        self.candidates.clear();
        // Tokens masked to -inf (JSON mode, banned ids) are no candidates at all.
        self.candidates.extend(
            (0..logits.len() as u32)
                .zip(&self.weights)
                .zip(logits.iter())
                .filter(|(_, &l)| l != f32::NEG_INFINITY)
                .map(|((i, &w), _)| (i, w)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }
        let mut kept = sort_top(
            &mut self.candidates,
            self.params.top_k.unwrap_or(usize::MAX),
            self.params.top_p,
        );
        if let Some(min_p) = self.params.min_p {
            // Relative to the most likely token, whose weight is exp(0) = 1 after subtracting the max.
            kept = keep_front(&mut self.candidates[..kept], |w| w >= min_p).max(1);
        }
        let mass: f32 = self.candidates[..kept].iter().map(|c| c.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for &(id, p) in &self.candidates[..kept] {
            if r < p {
                return id;
            }
            r -= p;
        }
        self.candidates[kept - 1].0
    }

    fn apply_penalties(&self, logits: &mut [f32], context: &[u32], counts: &HashMap<u32, usize>) {
        if let Some(penalty) = self.params.repetition_penalty.filter(|&p| p != 1.0) {
            let mut seen = std::collections::HashSet::new();
            for &id in context {
                if seen.insert(id) {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
                    }
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence != 0.0 || frequency != 0.0 {
            for (&id, &n) in counts {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l -= presence + frequency * n as f32;
                }
            }
        }
    }
}

/// Reorder `candidates` (token, weight) so that the ones kept by top-k and then top-p come first,
/// and return how many are kept. Only what top-p needs is sorted, never the whole vocabulary.
fn sort_top(candidates: &mut [(u32, f32)], top_k: usize, top_p: Option<f32>) -> usize {
    let by_weight = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    let limit = top_k.min(candidates.len());
    if limit < candidates.len() {
        candidates.select_nth_unstable_by(limit - 1, by_weight);
    }
    let pool = &mut candidates[..limit];
    let p = match top_p {
        Some(p) if p < 1.0 => p,
        _ => return limit,
    };
    // Top-p is taken over the mass top-k left, as HF applies top-k first.
    let mass: f32 = pool.iter().map(|c| c.1).sum();
    let mut sorted = 64.min(limit);
    loop {
        if sorted < limit {
            pool.select_nth_unstable_by(sorted - 1, by_weight);
        }
        pool[..sorted].sort_unstable_by(by_weight);
        let mut cumulative = 0.0;
        for (i, c) in pool[..sorted].iter().enumerate() {
            cumulative += c.1 / mass;
            if cumulative >= p {
                return i + 1;
            }
        }
        if sorted == limit {
            return limit;
        }
        sorted = (sorted * 4).min(limit);
    }
}

/// Move the items whose weight passes `keep` to the front; returns how many there are.
fn keep_front(items: &mut [(u32, f32)], keep: impl Fn(f32) -> bool) -> usize {
    let mut front = 0;
    for i in 0..items.len() {
        if keep(items[i].1) {
            items.swap(front, i);
            front += 1;
        }
    }
    front
}

pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row of logits, the chosen token's entry and the `k` best alternatives.
pub fn logprob_entry(logits: &[f32], chosen: u32, k: usize) -> LogprobEntry {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(top.len());
    if k > 0 && k < top.len() {
        top.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
    }
    top.truncate(k);
    top.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
    LogprobEntry {
        token_id: chosen,
        logprob: logits[chosen as usize] - lse,
        top: top
            .into_iter()
            .map(|(token_id, l)| TokenLogprob {
                token_id,
                logprob: l - lse,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        assert_eq!(s.sample(&mut [0.1, 3.0, -1.0], &[], &HashMap::new()), 1);
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        // HF: positive logits are divided, negative ones multiplied.
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: Some(2.0),
            ..params(0.0)
        })
        .unwrap();
        let mut logits = [4.0, 3.0, -1.0];
        assert_eq!(s.sample(&mut logits, &[0, 2, 0], &HashMap::new()), 1);
        assert_eq!(logits, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn presence_and_frequency_penalties_follow_openai() {
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..params(0.0)
        })
        .unwrap();
        let mut logits = [1.0, 1.0];
        let counts = HashMap::from([(0u32, 2usize)]);
        s.sample(&mut logits, &[], &counts);
        assert_eq!(logits, [1.0 - 0.5 - 0.5, 1.0]);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let logits: Vec<f32> = (0..1000).map(|i| (i as f32) * 0.01).collect();
        let mut s = Sampler::new(SamplingParams {
            top_k: Some(1),
            ..params(1.0)
        })
        .unwrap();
        assert_eq!(s.sample(&mut logits.clone(), &[], &HashMap::new()), 999);
        // A dominant token holding > 90% of the mass is the whole nucleus at top-p 0.9.
        let mut peaked = vec![0.0f32; 1000];
        peaked[5] = 20.0;
        let mut s = Sampler::new(SamplingParams {
            top_p: Some(0.9),
            ..params(1.0)
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&mut peaked.clone(), &[], &HashMap::new()), 5);
        }
    }

    #[test]
    fn sort_top_finds_the_exact_nucleus() {
        // weights 1..=200: the nucleus for p is the smallest prefix of the sorted weights reaching p.
        let mut c: Vec<(u32, f32)> = (1..=200).map(|i| (i as u32, i as f32)).collect();
        let total: f32 = (1..=200).sum::<i32>() as f32;
        let kept = sort_top(&mut c, usize::MAX, Some(0.5));
        let mass: f32 = c[..kept].iter().map(|x| x.1).sum();
        assert!(mass / total >= 0.5 && (mass - c[kept - 1].1) / total < 0.5);
        assert_eq!(c[0].0, 200);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let run = || {
            let mut s = Sampler::new(params(1.0)).unwrap();
            (0..10)
                .map(|_| s.sample(&mut logits.clone(), &[], &HashMap::new()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn invalid_parameters_are_named() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("temperature"));
        assert!(SamplingParams {
            top_p: Some(1.5),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("top-p"));
        assert!(SamplingParams {
            top_p: Some(0.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string()
        .contains("top-p"));
    }

    #[test]
    fn logprobs_are_normalised() {
        let e = logprob_entry(&[0.0, 0.0, (2.0f32).ln()], 2, 2);
        assert!((e.logprob - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(e.top[0].token_id, 2);
        assert_eq!(e.top.len(), 2);
    }
}
