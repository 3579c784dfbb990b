//! The engine's threads: `threads − 1` workers made with the engine and kept for its lifetime,
//! so a token costs no thread creation, and the calling thread as the last one. A forward pass
//! is a few hundred short parallel steps (each matrix of each layer, attention), tens of
//! microseconds each, with a little serial work between them (norms, RoPE, residuals).
//!
//! Why not rayon (which this used before): its idle workers yield a few dozen times and then
//! sleep, and in the uneven gaps of a forward pass many of them fell asleep between steps; on
//! a 2-vCPU virtual machine, a pass of batched decode then woke a sleeping
//! worker about 70 times (context switches counted per pass), and each wake-up is a system call
//! and a scheduler round trip on the critical path. Here a worker spins for [`SPIN`] after its
//! last step before it parks, so the steps of one pass find it awake; tasks are handed out by
//! one atomic counter, so a thread on a slower (or shared) core simply takes fewer of them;
//! and the caller never waits for a worker that did not join a step, only for the ones that
//! are running one of its tasks.
//!
//! On wasm32, and with one thread, everything runs inline on the caller's thread.

use mdi_core::Result;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use native::Pool;

#[cfg(target_arch = "wasm32")]
pub(crate) use inline::Pool;

/// How long an idle worker spins before it parks: longer than the serial gaps between the
/// steps of one forward pass, short against the time between passes when nothing is waiting.
#[cfg(not(target_arch = "wasm32"))]
const SPIN: std::time::Duration = std::time::Duration::from_micros(100);

#[cfg(target_arch = "wasm32")]
mod inline {
    use super::Result;

    /// No threads without a worker setup: run on the page's (or worker's) own thread.
    pub(crate) struct Pool;

    impl Pool {
        pub(crate) fn new(_threads: usize) -> Result<Self> {
            Ok(Self)
        }

        pub(crate) fn threads(&self) -> usize {
            1
        }

        pub(crate) fn run<T: Send>(&self, tasks: Vec<T>, f: impl Fn(T) + Sync + Send) {
            tasks.into_iter().for_each(f)
        }
    }

    impl std::fmt::Debug for Pool {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Pool(1 thread)")
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Condvar, Mutex};
    use std::thread::JoinHandle;
    use std::time::Instant;

    use super::{Result, SPIN};

    /// Busy-wait iterations (a `pause` each, tens of nanoseconds) before a waiting thread
    /// yields its core between checks instead: on a machine with more runnable threads than
    /// cores, the thread waited for may need this one's core to finish.
    const YIELD_AFTER_SPINS: u32 = 512;

    /// The step being run: a pointer to the caller's closure, which lives on the caller's
    /// stack for as long as the pointer is published (see [`Pool::run`]).
    struct Job<'a> {
        body: &'a (dyn Fn() + Sync),
    }

    /// What the caller and the workers share.
    struct Shared {
        /// Bumped for every step, so a worker knows there is something to look at.
        epoch: AtomicU64,
        /// The current step's [`Job`], or null between steps.
        job: AtomicPtr<Job<'static>>,
        /// Workers that registered for a step and may be inside its job.
        inside: AtomicUsize,
        /// Workers parked on `wake`.
        sleepers: AtomicUsize,
        /// A worker's task panicked during the current step.
        panicked: AtomicBool,
        stop: AtomicBool,
        lock: Mutex<()>,
        wake: Condvar,
    }

    /// A fixed set of worker threads and the caller, sharing each step's tasks.
    pub(crate) struct Pool {
        threads: usize,
        shared: Arc<Shared>,
        workers: Vec<JoinHandle<()>>,
        /// A step is running: a second caller (another thread with the same engine, or a task
        /// calling back into the pool) runs its tasks inline instead.
        running: AtomicBool,
    }

    impl Pool {
        /// A pool of `threads` threads, the caller included; 0 means one per available core.
        pub(crate) fn new(threads: usize) -> Result<Self> {
            let threads = if threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                threads
            };
            let shared = Arc::new(Shared {
                epoch: AtomicU64::new(0),
                job: AtomicPtr::new(std::ptr::null_mut()),
                inside: AtomicUsize::new(0),
                sleepers: AtomicUsize::new(0),
                panicked: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                lock: Mutex::new(()),
                wake: Condvar::new(),
            });
            let mut pool = Self {
                threads,
                shared: shared.clone(),
                workers: Vec::with_capacity(threads.saturating_sub(1)),
                running: AtomicBool::new(false),
            };
            for i in 1..threads {
                let shared = shared.clone();
                let worker = std::thread::Builder::new()
                    .name(format!("mdi-cpu-{i}"))
                    .spawn(move || work(&shared))
                    .map_err(|e| {
                        mdi_core::Error::Engine(format!("cannot start {threads} threads: {e}"))
                    })?;
                // Pushed at once: dropping the pool on a later failure stops those started.
                pool.workers.push(worker);
            }
            Ok(pool)
        }

        pub(crate) fn threads(&self) -> usize {
            self.threads
        }

        /// Run `f` on every task, spread over the caller and the workers; returns when every
        /// task has run. A panic in a task is raised here, after the step has ended.
        pub(crate) fn run<T: Send>(&self, tasks: Vec<T>, f: impl Fn(T) + Sync + Send) {
            if self.workers.is_empty() || tasks.len() < 2 || self.running.swap(true, SeqCst) {
                tasks.into_iter().for_each(f);
                return;
            }
            let slots = Slots::new(tasks);
            let body = || {
                while let Some(task) = slots.claim() {
                    f(task);
                }
            };
            let job = Job { body: &body };
            let shared = &*self.shared;
            shared.panicked.store(false, SeqCst);
            // Retires the job when this function leaves, by return or by unwinding: nothing
            // may still point at `body` or `slots` once they are gone.
            let retire = Retire {
                shared,
                running: &self.running,
            };
            shared.job.store(
                (&job as *const Job<'_>).cast_mut().cast::<Job<'static>>(),
                SeqCst,
            );
            shared.epoch.fetch_add(1, SeqCst);
            if shared.sleepers.load(SeqCst) > 0 {
                let _guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                shared.wake.notify_all();
            }
            body();
            drop(retire);
            if shared.panicked.swap(false, SeqCst) {
                panic!("a task of the CPU engine's worker threads panicked");
            }
        }
    }

    /// Ends a step: unpublishes the job, then waits for the workers inside it.
    ///
    /// A worker registers (`inside`) before it reads the job and leaves after its last task,
    /// so once the job reads null here, every worker that saw it is counted in `inside`
    /// (sequentially consistent order), and none will read it again.
    struct Retire<'a> {
        shared: &'a Shared,
        running: &'a AtomicBool,
    }

    impl Drop for Retire<'_> {
        fn drop(&mut self) {
            self.shared.job.store(std::ptr::null_mut(), SeqCst);
            let mut spins = 0u32;
            while self.shared.inside.load(SeqCst) > 0 {
                // A worker is finishing a task, usually within microseconds; if it is not
                // (more threads than cores, and it lost its core), give the core up to it.
                spins = spins.saturating_add(1);
                if spins < YIELD_AFTER_SPINS {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
            self.running.store(false, SeqCst);
        }
    }

    /// The step's tasks, in the caller's own vector: each is moved out exactly once, by
    /// whichever thread's claim returned its index; those never claimed (a task panicked and
    /// the step ended early) are dropped with the slots.
    struct Slots<T> {
        /// Its length set to zero at once: the vector only frees its buffer, the items are
        /// moved out by `claim` or dropped by `drop`.
        tasks: Vec<T>,
        len: usize,
        next: AtomicUsize,
    }

    // SAFETY: an item is only read by the one thread whose `fetch_add` returned its index, so
    // no item is touched twice or concurrently; the tasks move to that thread, hence `T: Send`.
    unsafe impl<T: Send> Sync for Slots<T> {}

    impl<T> Slots<T> {
        fn new(mut tasks: Vec<T>) -> Self {
            let len = tasks.len();
            // SAFETY: the items stay initialised in the buffer; from here on `claim` and
            // `drop` own them, and a length of zero keeps the vector from dropping them too.
            unsafe { tasks.set_len(0) };
            Self {
                tasks,
                len,
                next: AtomicUsize::new(0),
            }
        }

        /// The next unclaimed task, moved out; `None` once all are claimed.
        fn claim(&self) -> Option<T> {
            let i = self.next.fetch_add(1, SeqCst);
            // SAFETY: `i < len` is an initialised item that no other claim returned.
            (i < self.len).then(|| unsafe { self.tasks.as_ptr().add(i).read() })
        }
    }

    impl<T> Drop for Slots<T> {
        fn drop(&mut self) {
            // Dropped after the step is retired: no thread claims any more.
            let claimed = self.next.load(SeqCst).min(self.len);
            let rest = std::ptr::slice_from_raw_parts_mut(
                // SAFETY: `claimed <= len`, within the buffer.
                unsafe { self.tasks.as_mut_ptr().add(claimed) },
                self.len - claimed,
            );
            // SAFETY: the items past the last claim were never moved out.
            unsafe { std::ptr::drop_in_place(rest) };
        }
    }

    fn work(shared: &Shared) {
        let mut seen = shared.epoch.load(SeqCst);
        loop {
            // Wait for a new step: spin a while, then park.
            let start = Instant::now();
            let mut spins = 0u32;
            loop {
                let epoch = shared.epoch.load(SeqCst);
                if epoch != seen {
                    seen = epoch;
                    break;
                }
                if shared.stop.load(SeqCst) {
                    return;
                }
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                    let mut guard = shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                    shared.sleepers.fetch_add(1, SeqCst);
                    while shared.epoch.load(SeqCst) == seen && !shared.stop.load(SeqCst) {
                        guard = shared.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                    }
                    shared.sleepers.fetch_sub(1, SeqCst);
                } else if spins < YIELD_AFTER_SPINS {
                    std::hint::spin_loop();
                } else {
                    // Still awake for the next step, but not holding a core another thread
                    // of this machine may be waiting for.
                    std::thread::yield_now();
                }
            }
            shared.inside.fetch_add(1, SeqCst);
            let job = shared.job.load(SeqCst);
            if !job.is_null() {
                // SAFETY: the job was published and is not yet retired: `Retire` unpublishes
                // it and then waits until `inside` drops to zero, which needs this worker's
                // decrement below, so the caller's closure outlives this call.
                let body = unsafe { (*job).body };
                if catch_unwind(AssertUnwindSafe(body)).is_err() {
                    shared.panicked.store(true, SeqCst);
                }
            }
            shared.inside.fetch_sub(1, SeqCst);
        }
    }

    impl Drop for Pool {
        fn drop(&mut self) {
            self.shared.stop.store(true, SeqCst);
            {
                let _guard = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
                self.shared.wake.notify_all();
            }
            for worker in self.workers.drain(..) {
                let _ = worker.join();
            }
        }
    }

    impl std::fmt::Debug for Pool {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Pool({} threads)", self.threads)
        }
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_once_on_some_thread() {
        let pool = Pool::new(3).unwrap();
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run((0..n).collect(), |i| {
                hits[i].fetch_add(1, Ordering::SeqCst);
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::SeqCst) == 1),
                "{n} tasks"
            );
        }
    }

    #[test]
    fn tasks_write_disjoint_slices_and_parked_workers_come_back() {
        let pool = Pool::new(2).unwrap();
        let mut out = vec![0u64; 1000];
        for round in 0..50u64 {
            let tasks: Vec<(usize, &mut [u64])> = out.chunks_mut(64).enumerate().collect();
            pool.run(tasks, |(i, part)| {
                part.iter_mut().for_each(|v| *v = round * 1000 + i as u64)
            });
            for (i, part) in out.chunks(64).enumerate() {
                assert!(part.iter().all(|&v| v == round * 1000 + i as u64));
            }
            if round % 10 == 9 {
                // Long enough for the worker to park: the next step must still complete.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn a_panicking_task_is_raised_in_the_caller_and_the_pool_stays_usable() {
        let pool = Pool::new(2).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run((0..64).collect(), |i: usize| {
                if i == 40 {
                    panic!("task {i}");
                }
            })
        }));
        assert!(caught.is_err());
        let count = AtomicUsize::new(0);
        pool.run((0..64).collect(), |_| {
            count.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(count.load(Ordering::SeqCst), 64);
    }

    #[test]
    fn every_task_is_dropped_once_also_those_a_panic_left_unclaimed() {
        struct Counted<'a>(&'a AtomicUsize);
        impl Drop for Counted<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let pool = Pool::new(2).unwrap();
        let dropped = AtomicUsize::new(0);
        let tasks: Vec<(usize, Counted)> = (0..64).map(|i| (i, Counted(&dropped))).collect();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(tasks, |(i, _counted)| {
                if i == 3 {
                    panic!("task {i}");
                }
                // Slow enough that the panic ends the step with tasks still unclaimed.
                std::thread::sleep(std::time::Duration::from_millis(1));
            })
        }));
        assert!(caught.is_err());
        assert_eq!(dropped.load(Ordering::SeqCst), 64);
    }

    #[test]
    fn a_nested_step_runs_inline() {
        let pool = Pool::new(2).unwrap();
        let count = AtomicUsize::new(0);
        pool.run((0..4).collect(), |_: usize| {
            pool.run((0..4).collect(), |_: usize| {
                count.fetch_add(1, Ordering::SeqCst);
            });
        });
        assert_eq!(count.load(Ordering::SeqCst), 16);
    }
}
