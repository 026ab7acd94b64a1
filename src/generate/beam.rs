//! Beam search as transformers' `generate(num_beams=…)` runs it (the vectorised rewrite of
//! transformers ≥ 4.50, one source at a time): at each step the best 2·beams continuations of
//! all beams are ranked; those ending in EOS (or reaching the length limit) among the first
//! `beams` become finished hypotheses scored sum-logprob / length^length_penalty, the best
//! `beams` others continue; the search stops on transformers' early-stopping rules.
//! Greedy search is the same loop with one beam and no length penalty. Several sources are
//! searched in lockstep, their beams stepped through the decoder together, each search
//! deciding on its own when it is done.

use rayon::prelude::*;

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::generate::sampling::{Sampler, SamplingParams};
use crate::kernels::activation::log_softmax_inplace;

/// A decoder that can be stepped one token at a time for several beams.
pub trait StepDecoder {
    /// One beam's decoder state (its self-attention cache).
    type State;
    fn initial_state(&self) -> Self::State;
    /// An independent copy (two beams continuing from one parent).
    fn fork(&self, state: &Self::State) -> Result<Self::State>;
    /// Feed `tokens[i]` to beam `i`, a beam of the search of source `sources[i]`; the f32
    /// logits of each beam's next token.
    fn step(
        &self,
        sources: &[usize],
        states: &mut [Self::State],
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>>;
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
    /// `do_sample`: with one beam, draw each token with the core sampler (temperature, top-k,
    /// top-p, seed) from the processed distribution instead of taking the best.
    pub sampling: Option<SamplingParams>,
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
            log_softmax_inplace(scores);
        }
    }

    /// Candidates kept per step: enough that `num_beams` survive however many hit an EOS.
    fn keep(&self) -> usize {
        2.max(1 + self.eos_token_ids.len()) * self.num_beams
    }

    /// A beam's logits (overwritten) as log-probabilities after the processors; NaN is an error.
    fn processed_log_probs(&self, logits: &mut [f32], sequence: &[u32]) -> Result<()> {
        check_finite(logits, sequence)?;
        log_softmax_inplace(logits);
        self.process(sequence, logits);
        Ok(())
    }

    /// The one continuation `sampler` draws from a beam's processed log-probabilities, as
    /// (accumulated score, token).
    fn sampled_continuation(
        &self,
        logits: &mut [f32],
        sequence: &[u32],
        base: f32,
        sampler: &mut Sampler,
    ) -> Result<Vec<(f32, u32)>> {
        self.processed_log_probs(logits, sequence)?;
        let log_probs = logits.to_vec();
        let token = sampler.sample(logits, sequence, &HashMap::new());
        Ok(vec![(base + log_probs[token as usize], token)])
    }

    /// One beam's `keep` best continuations from its logits (overwritten) as (accumulated
    /// score, token), best first, ties to the lower token as torch.topk breaks them. The
    /// step's best candidates overall are among those of each beam.
    fn best_continuations(
        &self,
        logits: &mut [f32],
        sequence: &[u32],
        base: f32,
    ) -> Result<Vec<(f32, u32)>> {
        self.processed_log_probs(logits, sequence)?;
        let keep = self.keep();
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(keep + 1);
        for (token, &score) in logits.iter().enumerate() {
            let total = score + base;
            if best.len() == keep && total <= best[keep - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(kept, _)| kept >= total);
            best.insert(at, (total, token as u32));
            best.truncate(keep);
        }
        Ok(best)
    }
}

fn check_finite(logits: &[f32], sequence: &[u32]) -> Result<()> {
    if logits.iter().any(|l| l.is_nan()) {
        return Err(Error::invalid(format!(
            "the model produced NaN logits at generated position {}; its weights or inputs are \
             broken",
            sequence.len()
        )));
    }
    Ok(())
}

struct Running<S> {
    tokens: Vec<u32>,
    score: f32,
    state: S,
}

/// The search of one source, advanced one decoder step at a time.
struct Search<S> {
    running: Vec<Running<S>>,
    finished: Vec<Hypothesis>,
    /// transformers' early-stop heuristic, sticky once satisfied.
    heuristic_unsatisfied: bool,
    done: bool,
}

/// The decoder start token counts as the prompt.
const PROMPT_LEN: usize = 1;

impl<S> Search<S> {
    fn new<D: StepDecoder<State = S>>(decoder: &D, start: u32, beams: usize) -> Self {
        Search {
            running: (0..beams)
                .map(|i| Running {
                    tokens: vec![start],
                    score: if i == 0 { 0.0 } else { IMPOSSIBLE },
                    state: decoder.initial_state(),
                })
                .collect(),
            finished: Vec::new(),
            heuristic_unsatisfied: true,
            done: false,
        }
    }

    /// Take the best continuations of this search's beams (sequences `cur_len` long before
    /// the step) and pick the next running beams and the finished hypotheses.
    fn advance<D: StepDecoder<State = S>>(
        &mut self,
        decoder: &D,
        settings: &BeamSettings,
        cur_len: usize,
        beams_in: Vec<Running<S>>,
        continuations: &[Vec<(f32, u32)>],
    ) -> Result<()> {
        let beams = settings.num_beams;
        // (accumulated score, beam, token) of every continuation worth ranking.
        let mut candidates: Vec<(f32, usize, u32)> = continuations
            .iter()
            .enumerate()
            .flat_map(|(b, best)| best.iter().map(move |&(score, t)| (score, b, t)))
            .collect();
        // torch.topk order: by score, ties by flat index (beam-major).
        let k = settings.keep().min(candidates.len());
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
        let length = (cur_len + 1 - PROMPT_LEN) as f32;
        let full = self.finished.len() == beams && settings.early_stopping == EarlyStopping::True;
        if self.heuristic_unsatisfied && !full {
            for (i, &(score, b, t)) in candidates.iter().enumerate().take(beams) {
                if hits[i] {
                    let mut tokens = beams_in[b].tokens.clone();
                    tokens.push(t);
                    self.finished.push(Hypothesis {
                        tokens,
                        score: score / length.powf(settings.length_penalty),
                    });
                }
            }
            self.finished.sort_by(|a, b| b.score.total_cmp(&a.score));
            self.finished.truncate(beams);
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
        let mut parents: Vec<Option<Running<S>>> = beams_in.into_iter().map(Some).collect();
        for &i in &order {
            let (score, b, t) = candidates[i];
            uses[b] -= 1;
            let parent = parents[b].as_ref().expect("parent still held");
            let mut tokens = parent.tokens.clone();
            tokens.push(t);
            let state = if uses[b] == 0 {
                parents[b]
                    .take()
                    .expect("a parent is moved out only once")
                    .state
            } else {
                decoder.fork(&parent.state)?
            };
            self.running.push(Running {
                tokens,
                score: score + if hits[i] { IMPOSSIBLE } else { 0.0 },
                state,
            });
        }
        let best_length = match settings.early_stopping {
            EarlyStopping::Never if settings.length_penalty > 0.0 => {
                settings.max_length - PROMPT_LEN
            }
            _ => cur_len + 1 - PROMPT_LEN,
        } as f32;
        let best_possible = self.running[0].score / best_length.powf(settings.length_penalty);
        let worst_finished = if self.finished.len() == beams {
            self.finished.last().map_or(IMPOSSIBLE, |h| h.score)
        } else {
            IMPOSSIBLE
        };
        self.heuristic_unsatisfied &= best_possible > worst_finished;
        let all_finished_early =
            self.finished.len() == beams && settings.early_stopping == EarlyStopping::True;
        self.done = !self.heuristic_unsatisfied || all_finished_early || hits.iter().all(|&h| h);
        if self.done {
            self.running.clear();
        }
        Ok(())
    }
}

/// Beam search from `start` (the decoder start token). Returns up to `num_return_sequences`
/// hypotheses, best first.
pub fn beam_search<D: StepDecoder>(
    decoder: &D,
    start: u32,
    settings: &BeamSettings,
) -> Result<Vec<Hypothesis>> {
    let mut results = beam_search_batch(decoder, 1, start, settings)?;
    Ok(results.pop().expect("one search"))
}

/// Beam searches of `sources` sources (numbered for `decoder.step`), each as `beam_search`
/// would run it alone; one decoder step per token position for the beams of all searches not
/// yet done.
pub fn beam_search_batch<D: StepDecoder>(
    decoder: &D,
    sources: usize,
    start: u32,
    settings: &BeamSettings,
) -> Result<Vec<Vec<Hypothesis>>> {
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
    // One sampler per source, each seeded alike, so a source samples the same batched or alone.
    let mut samplers: Vec<Sampler> =
        match &settings.sampling {
            Some(_) if beams > 1 => return Err(Error::invalid(
                "sampling draws one sequence: use 1 beam with it (beam sampling is not supported)",
            )),
            Some(params) => (0..sources)
                .map(|_| Sampler::new(params.clone()))
                .collect::<Result<_>>()?,
            None => Vec::new(),
        };
    let mut searches: Vec<Search<D::State>> = (0..sources)
        .map(|_| Search::new(decoder, start, beams))
        .collect();
    let mut cur_len = PROMPT_LEN;
    loop {
        let active: Vec<usize> = (0..sources).filter(|&s| !searches[s].done).collect();
        if active.is_empty() {
            break;
        }
        let mut beams_in: Vec<Running<D::State>> = Vec::with_capacity(active.len() * beams);
        for &s in &active {
            beams_in.append(&mut searches[s].running);
        }
        let inputs: Vec<u32> = beams_in
            .iter()
            .map(|r| *r.tokens.last().expect("non-empty"))
            .collect();
        let mut states: Vec<D::State> = Vec::with_capacity(beams_in.len());
        let mut metas: Vec<(Vec<u32>, f32)> = Vec::with_capacity(beams_in.len());
        for beam in beams_in {
            metas.push((beam.tokens, beam.score));
            states.push(beam.state);
        }
        let owners: Vec<usize> = active
            .iter()
            .flat_map(|&s| std::iter::repeat_n(s, beams))
            .collect();
        let logits = decoder.step(&owners, &mut states, &inputs)?;
        let continuations: Vec<Vec<(f32, u32)>> = if samplers.is_empty() {
            logits
                .into_par_iter()
                .zip(metas.par_iter())
                .map(|(mut row, (tokens, score))| {
                    settings.best_continuations(&mut row, tokens, *score)
                })
                .collect::<Result<_>>()?
        } else {
            // One beam per search: row i belongs to source owners[i].
            logits
                .into_iter()
                .zip(&metas)
                .zip(&owners)
                .map(|((mut row, (tokens, score)), &s)| {
                    settings.sampled_continuation(&mut row, tokens, *score, &mut samplers[s])
                })
                .collect::<Result<_>>()?
        };
        let mut returned = metas
            .into_iter()
            .zip(states)
            .map(|((tokens, score), state)| Running {
                tokens,
                score,
                state,
            });
        for (&s, rows) in active.iter().zip(continuations.chunks(beams)) {
            let own: Vec<Running<D::State>> = returned.by_ref().take(beams).collect();
            searches[s].advance(decoder, settings, cur_len, own, rows)?;
        }
        cur_len += 1;
    }
    Ok(searches
        .into_iter()
        .map(|search| {
            let mut finished = search.finished;
            finished.truncate(settings.num_return_sequences);
            finished
        })
        .collect())
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
        fn step(&self, _: &[usize], _: &mut [()], tokens: &[u32]) -> Result<Vec<Vec<f32>>> {
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
            sampling: None,
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
    fn nan_logits_are_an_error_not_a_translation() {
        let table = Table(vec![
            vec![0.0, 0.0, 0.0],
            vec![0.0, 1.0, -5.0],
            vec![0.0, f32::NAN, 0.0],
        ]);
        let err = beam_search(&table, 2, &settings(2)).unwrap_err();
        assert!(err.to_string().contains("NaN logits"), "{err}");
        // Greedy from token 1 never feeds token 2, so never meets the NaN row.
        assert!(beam_search(&table, 1, &settings(1)).is_ok());
    }

    #[test]
    fn sampling_follows_the_seed_alone_or_batched() {
        // Whatever came before: EOS (0) unlikely, tokens 1..8 equally likely.
        let flat = Table(vec![[-4.0].into_iter().chain([0.0; 8]).collect(); 9]);
        let sampled = |seed: u64, sources: usize| {
            let mut s = settings(1);
            s.max_length = 12;
            s.sampling = Some(SamplingParams {
                temperature: 1.0,
                seed: Some(seed),
                ..SamplingParams::default()
            });
            beam_search_batch(&flat, sources, 1, &s).unwrap()
        };
        let alone = sampled(7, 1);
        let batched = sampled(7, 3);
        assert!(
            batched.iter().all(|h| *h == alone[0]),
            "same seed per source"
        );
        assert_ne!(sampled(8, 1), alone, "another seed, another draw");
        let tokens = &alone[0][0].tokens;
        assert!(
            tokens.len() > 3,
            "not just greedy's first token: {tokens:?}"
        );
        let distinct: std::collections::HashSet<_> = tokens[1..].iter().collect();
        assert!(
            distinct.len() > 2,
            "greedy would repeat token 1: {tokens:?}"
        );
        let mut s = settings(2);
        s.sampling = Some(SamplingParams::default());
        assert!(
            beam_search(&flat, 1, &s).is_err(),
            "beam sampling is refused"
        );
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
