//! The engine's threads: one rayon pool made with the engine and kept for its lifetime, so a
//! token costs no thread creation. A whole forward pass runs inside [`Pool::install`]: the
//! calling work then happens on a pool thread and each parallel step only wakes the others
//! (which spin briefly between steps before they sleep). On wasm32, and with one thread,
//! everything runs inline on the caller's thread.

use mdi_core::Result;

pub(crate) struct Pool {
    threads: usize,
    #[cfg(not(target_arch = "wasm32"))]
    pool: Option<rayon::ThreadPool>,
}

impl Pool {
    /// A pool of `threads` threads; 0 means one per available core.
    pub(crate) fn new(threads: usize) -> Result<Self> {
        #[cfg(target_arch = "wasm32")]
        {
            // No threads without a worker setup: run on the page's (or worker's) own thread.
            let _ = threads;
            Ok(Self { threads: 1 })
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let threads = if threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                threads
            };
            let pool = if threads > 1 {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("mdi-cpu-{i}"))
                    .build()
                    .map_err(|e| {
                        mdi_core::Error::Engine(format!("cannot start {threads} threads: {e}"))
                    })?;
                Some(pool)
            } else {
                None
            };
            Ok(Self { threads, pool })
        }
    }

    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` on a pool thread (inline without a pool).
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(pool) = &self.pool {
            return pool.install(f);
        }
        f()
    }

    /// Run `f` on every task, spread over the pool's threads.
    pub(crate) fn run<T: Send>(&self, tasks: Vec<T>, f: impl Fn(T) + Sync + Send) {
        #[cfg(not(target_arch = "wasm32"))]
        if let Some(pool) = &self.pool {
            if tasks.len() > 1 {
                use rayon::prelude::*;
                // Already inside the pool during a forward pass: this does not hop threads.
                pool.install(|| tasks.into_par_iter().for_each(f));
                return;
            }
        }
        tasks.into_iter().for_each(f)
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads)
    }
}
