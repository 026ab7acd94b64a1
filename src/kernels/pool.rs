//! A small spinning worker pool for the matmul kernels. Decoding runs ~200 matmuls per token,
//! each only tens of microseconds long; rayon's workers fall asleep between them and every
//! matmul then pays a futex wake-up. These workers spin for a while after each job (as
//! llama.cpp's do), so the next matmul starts on all cores at once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it starts sleeping between checks.
const SPIN: Duration = Duration::from_micros(200);
/// Checks of the generation between two reads of the clock while spinning (~1 µs).
const SPINS_PER_CLOCK_READ: usize = 32;
const NAP: Duration = Duration::from_micros(50);
/// After this long without work (a chat waiting for input, an idle server) naps grow longer.
const DOZE_AFTER: Duration = Duration::from_millis(50);
const DOZE: Duration = Duration::from_millis(2);

/// The job of one generation, with its lifetime erased; only called while the caller waits.
#[derive(Clone, Copy)]
struct Job(*const (dyn Fn(usize) + Sync));
// SAFETY: the pointee is Sync and outlives every call (see `Pool::run`).
unsafe impl Send for Job {}

struct State {
    generation: u64,
    job: Option<Job>,
    next: usize,
    tasks: usize,
}

struct Shared {
    state: Mutex<State>,
    generation: AtomicU64,
    pending: AtomicUsize,
}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    busy: AtomicBool,
    workers: usize,
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                generation: 0,
                job: None,
                next: 0,
                tasks: 0,
            }),
            generation: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
        });
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            let mine = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("wordloom-kernel-{i}"))
                .spawn(move || worker(&mine));
            if spawned.is_err() {
                return Pool {
                    shared,
                    busy: AtomicBool::new(false),
                    workers: i,
                };
            }
        }
        Pool {
            shared,
            busy: AtomicBool::new(false),
            workers,
        }
    }

    /// Run `f(0..tasks)` on the pool and the calling thread; returns when all have finished.
    /// A nested or concurrent call runs its tasks on the calling thread alone.
    pub(crate) fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || tasks <= 1 || self.busy.swap(true, Ordering::Acquire) {
            (0..tasks).for_each(f);
            return;
        }
        // SAFETY: workers call the job only after taking a task of this generation under the
        // lock, and `pending` reaches zero only after the last call returned; we wait for that
        // before returning, so the erased reference never outlives `f`.
        let job = Job(unsafe {
            std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static (dyn Fn(usize) + Sync)>(f)
        });
        let generation = {
            let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
            state.generation += 1;
            state.job = Some(job);
            state.next = 0;
            state.tasks = tasks;
            self.shared.pending.store(tasks, Ordering::Release);
            state.generation
        };
        self.shared.generation.store(generation, Ordering::Release);
        run_tasks(&self.shared, generation);
        while self.shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        self.shared
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .job = None;
        self.busy.store(false, Ordering::Release);
    }
}

/// Take and run tasks of `generation` until none is left.
fn run_tasks(shared: &Shared, generation: u64) {
    loop {
        let (job, index) = {
            let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.generation != generation || state.next >= state.tasks {
                return;
            }
            let Some(job) = state.job else { return };
            state.next += 1;
            (job, state.next - 1)
        };
        // SAFETY: see `Pool::run`.
        unsafe { (*job.0)(index) };
        shared.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

fn worker(shared: &Shared) {
    let mut seen = 0;
    let mut idle_since = Instant::now();
    loop {
        let generation = shared.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            run_tasks(shared, generation);
            idle_since = Instant::now();
        } else {
            let idle = idle_since.elapsed();
            if idle < SPIN {
                // Between clock reads: a clock read per check was 6% of a loaded server's time.
                for _ in 0..SPINS_PER_CLOCK_READ {
                    if shared.generation.load(Ordering::Acquire) != seen {
                        break;
                    }
                    std::hint::spin_loop();
                }
            } else {
                std::thread::sleep(if idle < DOZE_AFTER { NAP } else { DOZE });
            }
        }
    }
}

/// The process-wide pool, sized by rayon's current thread count when first used (the CLI's
/// `--threads`).
pub(crate) fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_across_many_generations() {
        let pool = Pool::new(3);
        for tasks in [0, 1, 2, 7, 64] {
            for _ in 0..200 {
                let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }
}
