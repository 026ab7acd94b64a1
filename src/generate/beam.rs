//! Beam search as transformers' `generate(num_beams=…)` runs it (the vectorised rewrite of
//! transformers ≥ 4.50, one source at a time): at each step the best 2·beams continuations of
//! all beams are ranked; those ending in EOS (or reaching the length limit) among the first
//! `beams` become finished hypotheses scored sum-logprob / length^length_penalty, the best
//! `beams` others continue; the search stops on transformers' early-stopping rules.
//! Greedy search is the same loop with one beam and no length penalty.

use crate::error::{Error, Result};

/// A decoder that can be stepped one token at a time for several beams.
pub trait StepDecoder {
    /// One beam's decoder state (its self-attention cache).
    type State;
    fn initial_state(&self) -> Self::State;
    /// An independent copy (two beams continuing from one parent).
    fn fork(&self, state: &Self::State) -> Result<Self::State>;
    /// Feed `tokens[i]` to beam `i`; the f32 logits of each beam's next token.
    fn step(&self, states: &mut [Self::State], tokens: &[u32]) -> Result<Vec<Vec<f32>>>;
}

/// transformers' `early_stopping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EarlyStopping {
    /// Stop as soon as `beams` hypotheses are finished.
    True,
    /// Stop when the best running beam, scored at its current length, cannot beat the worst finished.
    False,
    /// Like False, but with a positive length penalty scored at the maximum length.
    Never,
}

/// Search settings, with transformers' names and meanings.
#[derive(Clone, Debug)]
pub struct BeamSettings {
    pub num_beams: usize,
    pub num_return_sequences: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub no_repeat_ngram_size: usize,
    /// Limit on the whole decoder sequence, decoder start token included (`max_length`).
    pub max_length: usize,
    pub eos_token_ids: Vec<u32>,
    /// Token forced as the first generated one (M2M100's target language).
    pub forced_bos_token_id: Option<u32>,
    /// Token forced at the last position allowed by `max_length`.
    pub forced_eos_token_id: Option<u32>,
    /// Tokens never generated (`bad_words_ids` of single tokens, e.g. Marian's pad).
    pub suppressed: Vec<u32>,
    /// Log-softmax again after the processors (`renormalize_logits`), so banned tokens' mass
    /// goes to the others.
    pub renormalize: bool,
}

/// A finished output: the decoder sequence (start token first) and its score.
#[derive(Clone, Debug, PartialEq)]
pub struct Hypothesis {
    pub tokens: Vec<u32>,
    /// Sum of token log-probabilities / generated-length^length_penalty.
    pub score: f32,
}

/// transformers marks impossible candidates with this rather than -inf.
const IMPOSSIBLE: f32 = -1.0e9;

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    let log_sum = sum.ln();
    logits.iter().map(|&l| l - max - log_sum).collect()
}

impl BeamSettings {
    /// The logits processors transformers applies to each beam's log-probabilities.
    fn process(&self, sequence: &[u32], scores: &mut [f32]) {
        for &token in &self.suppressed {
            if let Some(s) = scores.get_mut(token as usize) {
                *s = f32::NEG_INFINITY;
            }
        }
        let n = self.no_repeat_ngram_size;
        if n > 0 && sequence.len() + 1 >= n {
            // Tokens that would complete an n-gram already in the sequence.
            let prefix = &sequence[sequence.len() + 1 - n..];
            for window in sequence.windows(n) {
                if window[..n - 1] == *prefix {
                    scores[window[n - 1] as usize] = f32::NEG_INFINITY;
                }
            }
        }
        let forced = if sequence.len() == 1 {
            self.forced_bos_token_id
        } else if sequence.len() + 1 == self.max_length {
            self.forced_eos_token_id
        } else {
            None
        };
        if let Some(token) = forced {
            for (i, s) in scores.iter_mut().enumerate() {
                if i != token as usize {
                    *s = f32::NEG_INFINITY;
                }
            }
            scores[token as usize] = 0.0;
        }
        if self.renormalize {
            let renormalized = log_softmax(scores);
            scores.copy_from_slice(&renormalized);
        }
    }
}

struct Running<S> {
    tokens: Vec<u32>,
    score: f32,
    state: S,
}

/// Beam search from `start` (the decoder start token). Returns up to `num_return_sequences`
/// hypotheses, best first.
pub fn beam_search<D: StepDecoder>(
    decoder: &D,
    start: u32,
    settings: &BeamSettings,
) -> Result<Vec<Hypothesis>> {
    let beams = settings.num_beams;
    if beams == 0 {
        return Err(Error::invalid("num_beams must be at least 1"));
    }
    if settings.num_return_sequences == 0 || settings.num_return_sequences > beams {
        return Err(Error::invalid(format!(
            "num_return_sequences must be between 1 and num_beams ({beams})"
        )));
    }
    if settings.max_length < 2 {
        return Err(Error::invalid(
            "max_length leaves no room for a generated token",
        ));
    }
    let prompt_len = 1usize;
    let keep = 2.max(1 + settings.eos_token_ids.len()) * beams;
    let mut running: Vec<Running<D::State>> = (0..beams)
        .map(|i| Running {
            tokens: vec![start],
            score: if i == 0 { 0.0 } else { IMPOSSIBLE },
            state: decoder.initial_state(),
        })
        .collect();
    let mut finished: Vec<Hypothesis> = Vec::new();
    let mut heuristic_unsatisfied = true;
    let mut inputs: Vec<u32> = vec![start; beams];
    let mut cur_len = prompt_len;
    loop {
        let mut states: Vec<D::State> = Vec::with_capacity(beams);
        let mut meta: Vec<(Vec<u32>, f32)> = Vec::with_capacity(beams);
        for beam in running.drain(..) {
            meta.push((beam.tokens, beam.score));
            states.push(beam.state);
        }
        let logits = decoder.step(&mut states, &inputs)?;
        // (accumulated score, beam, token) of every continuation.
        let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
        for (b, row) in logits.iter().enumerate() {
            let mut scores = log_softmax(row);
            settings.process(&meta[b].0, &mut scores);
            let base = meta[b].1;
            candidates.extend(
                scores
                    .iter()
                    .enumerate()
                    .map(|(t, &s)| (s + base, b, t as u32)),
            );
        }
        // torch.topk order: by score, ties by flat index (beam-major).
        let k = keep.min(candidates.len());
        candidates.select_nth_unstable_by(k - 1, |a, b| {
            b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2)))
        });
        candidates.truncate(k);
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        let at_limit = cur_len + 1 >= settings.max_length;
        let hits: Vec<bool> = candidates
            .iter()
            .map(|&(_, _, t)| at_limit || settings.eos_token_ids.contains(&t))
            .collect();
        // Finished hypotheses: only among the first `beams` candidates.
        let length = (cur_len + 1 - prompt_len) as f32;
        let full = finished.len() == beams && settings.early_stopping == EarlyStopping::True;
        if heuristic_unsatisfied && !full {
            for (i, &(score, b, t)) in candidates.iter().enumerate().take(beams) {
                if hits[i] {
                    let mut tokens = meta[b].0.clone();
                    tokens.push(t);
                    finished.push(Hypothesis {
                        tokens,
                        score: score / length.powf(settings.length_penalty),
                    });
                }
            }
            finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            finished.truncate(beams);
        }
        // The next running beams: the best candidates that did not stop.
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by(|&a, &b| {
            let score = |i: usize| candidates[i].0 + if hits[i] { IMPOSSIBLE } else { 0.0 };
            score(b).total_cmp(&score(a)).then(a.cmp(&b))
        });
        order.truncate(beams);
        let mut uses = vec![0usize; beams];
        for &i in &order {
            uses[candidates[i].1] += 1;
        }
        let mut parents: Vec<Option<D::State>> = states.into_iter().map(Some).collect();
        for &i in &order {
            let (score, b, t) = candidates[i];
            uses[b] -= 1;
            let state = if uses[b] == 0 {
                parents[b].take().expect("a parent is moved out only once")
            } else {
                decoder.fork(parents[b].as_ref().expect("parent still held"))?
            };
            let mut tokens = meta[b].0.clone();
            tokens.push(t);
            running.push(Running {
                tokens,
                score: score + if hits[i] { IMPOSSIBLE } else { 0.0 },
                state,
            });
        }
        cur_len += 1;
        // transformers' early-stop heuristic, sticky once satisfied.
        let best_length = match settings.early_stopping {
            EarlyStopping::Never if settings.length_penalty > 0.0 => {
                settings.max_length - prompt_len
            }
            _ => cur_len - prompt_len,
        } as f32;
        let best_possible = running[0].score / best_length.powf(settings.length_penalty);
        let worst_finished = if finished.len() == beams {
            finished.last().map_or(IMPOSSIBLE, |h| h.score)
        } else {
            IMPOSSIBLE
        };
        heuristic_unsatisfied &= best_possible > worst_finished;
        let all_finished_early =
            finished.len() == beams && settings.early_stopping == EarlyStopping::True;
        if !heuristic_unsatisfied || all_finished_early || hits.iter().all(|&h| h) {
            break;
        }
        inputs = running
            .iter()
            .map(|r| *r.tokens.last().expect("non-empty"))
            .collect();
    }
    finished.truncate(settings.num_return_sequences);
    Ok(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder whose next-token distribution depends only on the last token.
    struct Table(Vec<Vec<f32>>);

    impl StepDecoder for Table {
        type State = ();
        fn initial_state(&self) {}
        fn fork(&self, _: &()) -> Result<()> {
            Ok(())
        }
        fn step(&self, _: &mut [()], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
            Ok(tokens.iter().map(|&t| self.0[t as usize].clone()).collect())
        }
    }

    fn settings(beams: usize) -> BeamSettings {
        BeamSettings {
            num_beams: beams,
            num_return_sequences: 1,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::True,
            no_repeat_ngram_size: 0,
            max_length: 6,
            eos_token_ids: vec![0],
            forced_bos_token_id: None,
            forced_eos_token_id: None,
            suppressed: vec![],
            renormalize: false,
        }
    }

    #[test]
    fn beams_find_a_better_sequence_than_greedy() {
        // From the start token 3: token 1 looks best, but everything after it is poor;
        // token 2 leads to a confident EOS.
        let table = Table(vec![
            vec![0.0, 0.0, 0.0, 0.0],
            vec![1.0, 1.0, 1.0, 1.0],
            vec![9.0, 0.0, 0.0, 0.0],
            vec![0.0, 2.0, 1.8, 0.0],
        ]);
        let greedy = beam_search(&table, 3, &settings(1)).unwrap();
        assert_eq!(greedy[0].tokens[..2], [3, 1]);
        let beam = beam_search(&table, 3, &settings(2)).unwrap();
        assert_eq!(beam[0].tokens, [3, 2, 0]);
    }

    #[test]
    fn repeated_ngrams_are_blocked() {
        let mut s = settings(1);
        s.no_repeat_ngram_size = 2;
        s.eos_token_ids = vec![];
        let mut scores = vec![0.0; 5];
        s.process(&[4, 1, 2, 1], &mut scores);
        assert_eq!(scores[2], f32::NEG_INFINITY, "1 2 already occurred");
        assert_eq!(scores[3], 0.0);
    }
}
