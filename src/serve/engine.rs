//! Continuous batching: one thread owns the decoder and, step after step, runs every active
//! sequence's next tokens as one batch. New requests join at the next step; long prompts are fed
//! in chunks under a per-step token budget so that they do not stall the sequences already
//! decoding; a sequence whose client has gone is dropped before the next step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use super::prompt_cache::PromptCache;
use crate::error::{Error, Result};
use crate::generate::sequence::{FinishReason, Sequence, StepOutput};
use crate::models::{LogitsWanted, SeqInput};
use crate::LanguageModel;

/// Prompt tokens fed per step across all prefilling sequences (decode steps are not counted).
pub const PREFILL_BUDGET: usize = 256;

/// What the engine tells a request about one of its sequences (`index` = choice index).
#[derive(Debug)]
pub enum Event {
    Step {
        index: usize,
        output: StepOutput,
    },
    /// The sequence ended with this many prompt and completion tokens; `cached_tokens` of the
    /// prompt's were copied from the prompt cache rather than computed.
    Done {
        index: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

/// A request's sequences and where their events go.
pub struct Job {
    pub sequences: Vec<Sequence>,
    pub events: UnboundedSender<Event>,
}

struct Slot {
    seq: Sequence,
    index: usize,
    events: UnboundedSender<Event>,
    submitted: Instant,
    first_token: bool,
    /// Prompt tokens taken from the prompt cache.
    cached_tokens: usize,
}

/// The handle the HTTP side holds.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    /// Sequences submitted and not yet finished (queued or running).
    in_flight: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    max_batch: usize,
    max_queue: usize,
}

/// Why a job was not accepted.
#[derive(Debug)]
pub enum Rejected {
    /// Every batch slot and queue place is taken.
    Full,
    /// The engine thread has stopped.
    Stopped,
}

impl Engine {
    /// Start the engine thread. It runs the model on a rayon pool of `threads` threads and keeps
    /// up to `prompt_cache_bytes` of recent prompts' keys and values for reuse.
    pub fn start(
        lm: LanguageModel,
        max_batch: usize,
        max_queue: usize,
        threads: usize,
        prompt_cache_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .build()
            .map_err(|e| Error::invalid(format!("cannot start the engine's threads: {e}")))?;
        let (in_flight2, queued2) = (in_flight.clone(), queued.clone());
        std::thread::Builder::new()
            .name("wordloom-engine".into())
            .spawn(move || {
                let prompts = PromptCache::new(prompt_cache_bytes);
                pool.install(|| run(lm, rx, max_batch, prompts, in_flight2, queued2, metrics));
            })
            .map_err(|e| Error::invalid(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            jobs: tx,
            in_flight,
            queued,
            max_batch,
            max_queue,
        })
    }

    /// Queue a job unless the batch and the queue are full.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Rejected> {
        let n = job.sequences.len();
        let capacity = self.max_batch + self.max_queue;
        // Reserve the places first so that concurrent submissions cannot overshoot.
        let before = self.in_flight.fetch_add(n, Ordering::SeqCst);
        if before + n > capacity {
            self.in_flight.fetch_sub(n, Ordering::SeqCst);
            return Err(Rejected::Full);
        }
        self.queued.fetch_add(n, Ordering::SeqCst);
        self.jobs.send(job).map_err(|_| {
            self.in_flight.fetch_sub(n, Ordering::SeqCst);
            self.queued.fetch_sub(n, Ordering::SeqCst);
            Rejected::Stopped
        })
    }

    pub fn queue_depth(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

fn run(
    lm: LanguageModel,
    jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    mut prompts: PromptCache,
    in_flight: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let model = lm.model.as_ref();
    let mut waiting: std::collections::VecDeque<Slot> = std::collections::VecDeque::new();
    let mut active: Vec<Slot> = Vec::new();
    let release = || {
        in_flight.fetch_sub(1, Ordering::SeqCst);
    };
    loop {
        // Take in new jobs: block only when there is nothing to run.
        loop {
            let job = if active.is_empty() && waiting.is_empty() {
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            };
            let submitted = Instant::now();
            for (index, seq) in job.sequences.into_iter().enumerate() {
                waiting.push_back(Slot {
                    seq,
                    index,
                    events: job.events.clone(),
                    submitted,
                    first_token: false,
                    cached_tokens: 0,
                });
            }
        }
        // Free the places of clients that have gone, queued or running.
        let still_wanted = |s: &Slot| {
            let gone = s.events.is_closed();
            if gone {
                in_flight.fetch_sub(1, Ordering::SeqCst);
                metrics.cancelled.inc();
            }
            !gone
        };
        active.retain(still_wanted);
        waiting.retain(|s| {
            let keep = still_wanted(s);
            if !keep {
                queued.fetch_sub(1, Ordering::SeqCst);
            }
            keep
        });
        while active.len() < max_batch {
            match waiting.pop_front() {
                Some(mut slot) => {
                    queued.fetch_sub(1, Ordering::SeqCst);
                    reuse_cached_prompt(&mut slot, &mut prompts, &metrics);
                    active.push(slot);
                }
                None => break,
            }
        }
        metrics
            .queue_depth
            .set(queued.load(Ordering::SeqCst) as f64);
        if active.is_empty() {
            continue;
        }

        // This step's inputs: one token per decoding sequence, prompt chunks within the budget.
        let mut budget = PREFILL_BUDGET;
        let mut feeds: Vec<(usize, Vec<u32>)> = Vec::new();
        for (i, slot) in active.iter().enumerate() {
            let pending = slot.seq.pending_len();
            let decoding = !slot.seq.generated_ids().is_empty() && pending == 1;
            let take = if decoding { 1 } else { pending.min(budget) };
            if take == 0 {
                continue;
            }
            if !decoding {
                budget -= take;
            }
            feeds.push((i, slot.seq.next_input(take).to_vec()));
        }
        metrics.batch_size.observe(feeds.len() as f64);
        let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(feeds.len());
        {
            let mut fed = feeds.iter().peekable();
            for (i, slot) in active.iter_mut().enumerate() {
                if let Some((j, tokens)) = fed.peek() {
                    if *j == i {
                        inputs.push(SeqInput {
                            tokens,
                            cache: &mut slot.seq.cache,
                            logits: LogitsWanted::Last,
                        });
                        fed.next();
                    }
                }
            }
        }
        let result = model
            .forward(&mut inputs)
            .and_then(|logits| Ok(logits.to_vec2::<f32>()?));
        drop(inputs);
        let rows = match result {
            Ok(rows) => rows,
            Err(err) => {
                // Tell everyone in this step; the engine itself stays up.
                for (i, _) in &feeds {
                    let _ = active[*i].events.send(Event::Failed(err.to_string()));
                }
                let failed: Vec<usize> = feeds.iter().map(|(i, _)| *i).collect();
                remove_indices(&mut active, &failed, &release);
                continue;
            }
        };

        let mut done = Vec::new();
        for ((i, tokens), mut row) in feeds.into_iter().zip(rows) {
            let slot = &mut active[i];
            if tokens.len() < slot.seq.pending_len() {
                slot.seq.consumed(tokens.len());
                continue;
            }
            if slot.seq.generated_ids().is_empty() {
                // The prompt is all in the cache now: keep it for requests that begin alike.
                if let Err(err) = prompts.keep(slot.seq.prompt_ids(), &slot.seq.cache) {
                    tracing::warn!("not caching a prompt: {err}");
                }
            }
            match slot.seq.accept(tokens.len(), &mut row, &lm.tokenizer) {
                Ok(output) => {
                    if !slot.first_token {
                        slot.first_token = true;
                        metrics
                            .time_to_first_token
                            .observe(slot.submitted.elapsed().as_secs_f64());
                    }
                    metrics.tokens_out.inc();
                    let finished = output.finished;
                    let _ = slot.events.send(Event::Step {
                        index: slot.index,
                        output,
                    });
                    if let Some(reason) = finished {
                        let _ = slot.events.send(Event::Done {
                            index: slot.index,
                            reason,
                            prompt_tokens: slot.seq.prompt_ids().len(),
                            cached_tokens: slot.cached_tokens,
                            completion_tokens: slot.seq.generated_ids().len(),
                        });
                        done.push(i);
                    }
                }
                Err(err) => {
                    let _ = slot.events.send(Event::Failed(err.to_string()));
                    done.push(i);
                }
            }
        }
        remove_indices(&mut active, &done, &release);
    }
}

/// Start a sequence about to run its prompt from the longest beginning it shares with a cached
/// prompt. A failed copy only costs the prefill it would have saved.
fn reuse_cached_prompt(slot: &mut Slot, prompts: &mut PromptCache, metrics: &Metrics) {
    if !slot.seq.cache.is_empty() {
        return;
    }
    match prompts.reuse(slot.seq.prompt_ids()) {
        Ok(Some((cache, shared))) => {
            slot.seq.cache = cache;
            slot.seq.consumed(shared);
            slot.cached_tokens = shared;
            metrics.cached_prompt_tokens.add(shared as u64);
        }
        Ok(None) => {}
        Err(err) => tracing::warn!("not reusing a cached prompt: {err}"),
    }
}

/// Remove the slots at `indices` (ascending), releasing each one's place.
fn remove_indices(active: &mut Vec<Slot>, indices: &[usize], release: &dyn Fn()) {
    for &i in indices.iter().rev() {
        active.remove(i);
        release();
    }
}
