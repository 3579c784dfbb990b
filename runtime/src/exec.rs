//! Executors: how the runtime gets a [`Job`] of the sans-IO starter or node computed and
//! awaits its [`Done`] without blocking the loop that moves messages.
//!
//! - [`ThreadedExec`] (native): any blocking [`StageEngine`] on its own compute thread; the
//!   async side awaits a oneshot. While a step computes, the node keeps reading its links.
//! - [`InlineExec`]: a blocking engine run in place (the CPU engine in a browser without
//!   threads, and tests).
//! - [`GpuAsyncExec`]: the GPU engine whose readback is awaited, never blocked on: the one
//!   a browser tab uses.
//!
//! All of them hand out the same cache type, [`CacheHandle`]: the engine keeps each sequence's
//! real cache (GPU buffers, or vectors on the compute thread) and the state machines hold a
//! handle whose drop frees it. So the runtime is one non-generic piece of code whatever the
//! engine, and the engine can be chosen at run time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::LocalBoxFuture;
use mdi_core::engine::{CacheSlot, Done, Job, Task};
use mdi_core::{Error, StageEngine, Want};
use mdi_transport::{MaybeSend, MaybeSync};

/// Frees a cache when its handle is dropped.
pub trait CacheOwner: MaybeSend + MaybeSync {
    fn free(&self, id: u64);
}

/// A sequence's KV cache, held by the engine; dropping the handle frees it.
pub struct CacheHandle {
    id: u64,
    owner: Arc<dyn CacheOwner>,
}

impl CacheHandle {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl std::fmt::Debug for CacheHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheHandle({})", self.id)
    }
}

#[cfg(test)]
impl CacheHandle {
    /// A handle owned by nothing, for tests of the drivers.
    pub(crate) fn detached(id: u64) -> Self {
        struct Nobody;
        impl CacheOwner for Nobody {
            fn free(&self, _: u64) {}
        }
        Self {
            id,
            owner: Arc::new(Nobody),
        }
    }
}

impl Drop for CacheHandle {
    fn drop(&mut self) {
        self.owner.free(self.id);
    }
}

/// A job as the runtime passes it around.
pub type RuntimeJob = Job<CacheHandle>;
/// A finished job as the runtime passes it around.
pub type RuntimeDone = Done<CacheHandle>;

/// An engine the runtime can hand jobs to and await.
pub trait Exec {
    /// Start `job`; the future resolves when it is done. Jobs run in submission order.
    fn submit(&self, job: RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone>;

    /// Start several sequences' jobs as one batch: an engine that reads each weight once for
    /// all of them does so; results in the same order. By default they run one by one.
    fn submit_batch(&self, jobs: Vec<RuntimeJob>) -> LocalBoxFuture<'static, Vec<RuntimeDone>> {
        let futures: Vec<_> = jobs.into_iter().map(|j| self.submit(j)).collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(futures.len());
            for f in futures {
                out.push(f.await);
            }
            out
        })
    }

    /// Most jobs worth batching together (1: the engine gains nothing from batches).
    fn max_batch(&self) -> usize {
        1
    }
    /// KV bytes one position of one sequence takes on this stage.
    fn kv_bytes_per_position(&self) -> usize;
    /// Bytes of weights the engine holds, as it allocated them.
    fn weight_bytes(&self) -> u64;
    /// A short name of the engine and device, for profiles and logs.
    fn describe(&self) -> String;
}

/// A boxed executor.
pub type BoxExec = Box<dyn Exec>;

fn failed(seq: u64, message: String) -> RuntimeDone {
    Done {
        seq,
        cache: None,
        output: Err(Error::Engine(message)),
    }
}

/// Caches kept by the engine side, by handle id.
struct Caches<C> {
    map: HashMap<u64, C>,
    next: u64,
}

impl<C> Caches<C> {
    fn new() -> Self {
        Self {
            map: HashMap::new(),
            next: 1,
        }
    }

    /// Runs `job` on a blocking engine whose caches live in `self`.
    fn run<E: StageEngine<Cache = C> + ?Sized>(
        &mut self,
        engine: &mut E,
        job: RuntimeJob,
        owner: &Arc<dyn CacheOwner>,
    ) -> RuntimeDone {
        let seq = job.seq;
        match job.task {
            Task::Head { hidden, want } => Done {
                seq,
                cache: None,
                output: engine.head(&hidden, want),
            },
            Task::Forward { cache, input, want } => {
                let handle = match cache {
                    CacheSlot::Lent(h) => h,
                    CacheSlot::New { positions } => match engine.new_cache(positions) {
                        Ok(c) => {
                            let id = self.next;
                            self.next += 1;
                            self.map.insert(id, c);
                            CacheHandle {
                                id,
                                owner: owner.clone(),
                            }
                        }
                        Err(e) => {
                            return Done {
                                seq,
                                cache: None,
                                output: Err(e),
                            }
                        }
                    },
                };
                let Some(c) = self.map.get_mut(&handle.id) else {
                    return failed(
                        seq,
                        format!("cache {} is not held by this engine", handle.id),
                    );
                };
                let output = engine.forward(c, input.as_stage_input(), want);
                Done {
                    seq,
                    cache: Some(handle),
                    output,
                }
            }
        }
    }
}

impl<C> Caches<C> {
    /// Runs `jobs` as one batch through [`StageEngine::forward_batch`] (forward jobs) and
    /// [`StageEngine::head_batch`] (head jobs); results in the order of `jobs`.
    fn run_batch<E: StageEngine<Cache = C> + ?Sized>(
        &mut self,
        engine: &mut E,
        jobs: Vec<RuntimeJob>,
        owner: &Arc<dyn CacheOwner>,
    ) -> Vec<RuntimeDone> {
        let mut out: Vec<Option<RuntimeDone>> = (0..jobs.len()).map(|_| None).collect();
        // (index, seq, handle, cache taken out of the map, input, want)
        let mut forwards = Vec::new();
        // (index, seq, hidden row, want): run through the head together.
        let mut heads = Vec::new();
        for (i, job) in jobs.into_iter().enumerate() {
            let seq = job.seq;
            match job.task {
                Task::Head { hidden, want } => heads.push((i, seq, hidden, want)),
                Task::Forward { cache, input, want } => {
                    let (handle, c) = match cache {
                        CacheSlot::Lent(h) => match self.map.remove(&h.id) {
                            Some(c) => (h, c),
                            None => {
                                out[i] = Some(failed(seq, format!("cache {} is not held", h.id)));
                                continue;
                            }
                        },
                        CacheSlot::New { positions } => match engine.new_cache(positions) {
                            Ok(c) => {
                                let id = self.next;
                                self.next += 1;
                                (
                                    CacheHandle {
                                        id,
                                        owner: owner.clone(),
                                    },
                                    c,
                                )
                            }
                            Err(e) => {
                                out[i] = Some(Done {
                                    seq,
                                    cache: None,
                                    output: Err(e),
                                });
                                continue;
                            }
                        },
                    };
                    forwards.push((i, seq, handle, c, input, want));
                }
            }
        }
        if !heads.is_empty() {
            let rows: Vec<(&[f32], Want)> = heads
                .iter()
                .map(|(_, _, hidden, want)| (&hidden[..], *want))
                .collect();
            let results = engine.head_batch(&rows);
            for ((i, seq, _, _), output) in heads.iter().zip(results) {
                out[*i] = Some(Done {
                    seq: *seq,
                    cache: None,
                    output,
                });
            }
        }
        if !forwards.is_empty() {
            let results = {
                let mut items: Vec<mdi_core::engine::BatchItem<'_, C>> = forwards
                    .iter_mut()
                    .map(|(_, _, _, c, input, want)| mdi_core::engine::BatchItem {
                        cache: c,
                        input: input.as_stage_input(),
                        want: *want,
                    })
                    .collect();
                engine.forward_batch(&mut items)
            };
            for ((i, seq, handle, c, _, _), output) in forwards.into_iter().zip(results) {
                self.map.insert(handle.id, c);
                out[i] = Some(Done {
                    seq,
                    cache: Some(handle),
                    output,
                });
            }
        }
        out.into_iter()
            .map(|d| d.unwrap_or_else(|| failed(0, "a batched job produced nothing".into())))
            .collect()
    }
}

/// Frees are queued and applied before the next job (the engine may be busy when a handle
/// drops).
#[derive(Default)]
struct FreeList(Mutex<Vec<u64>>);

impl CacheOwner for FreeList {
    fn free(&self, id: u64) {
        crate::lock(&self.0).push(id);
    }
}

impl FreeList {
    fn drain(&self) -> Vec<u64> {
        std::mem::take(&mut *crate::lock(&self.0))
    }
}

/// A blocking engine run in place, on the thread of the loop that submits to it.
pub struct InlineExec<E: StageEngine> {
    max_batch: usize,
    state: std::rc::Rc<std::cell::RefCell<(E, Caches<E::Cache>)>>,
    freed: Arc<FreeList>,
    kv_per_position: usize,
    weight_bytes: u64,
    name: String,
}

impl<E: StageEngine + 'static> InlineExec<E> {
    pub fn new(engine: E, weight_bytes: u64, name: impl Into<String>) -> Self {
        Self::with_batch(engine, weight_bytes, name, 1)
    }

    /// An executor that hands out batches of up to `max_batch` jobs to the engine.
    pub fn with_batch(
        engine: E,
        weight_bytes: u64,
        name: impl Into<String>,
        max_batch: usize,
    ) -> Self {
        Self {
            max_batch: max_batch.max(1),
            kv_per_position: engine.cache_bytes(1),
            state: std::rc::Rc::new(std::cell::RefCell::new((engine, Caches::new()))),
            freed: Arc::new(FreeList::default()),
            weight_bytes,
            name: name.into(),
        }
    }
}

impl<E: StageEngine + 'static> Exec for InlineExec<E> {
    fn submit(&self, job: RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
        let state = self.state.clone();
        let freed = self.freed.clone();
        Box::pin(async move {
            let seq = job.seq;
            let owner: Arc<dyn CacheOwner> = freed.clone();
            let Ok(mut s) = state.try_borrow_mut() else {
                return failed(seq, "the engine is busy with another job".into());
            };
            let (engine, caches) = &mut *s;
            for id in freed.drain() {
                caches.map.remove(&id);
            }
            caches.run(engine, job, &owner)
        })
    }

    fn submit_batch(&self, jobs: Vec<RuntimeJob>) -> LocalBoxFuture<'static, Vec<RuntimeDone>> {
        let state = self.state.clone();
        let freed = self.freed.clone();
        Box::pin(async move {
            let owner: Arc<dyn CacheOwner> = freed.clone();
            let Ok(mut s) = state.try_borrow_mut() else {
                return jobs
                    .iter()
                    .map(|j| failed(j.seq, "the engine is busy with another job".into()))
                    .collect();
            };
            let (engine, caches) = &mut *s;
            for id in freed.drain() {
                caches.map.remove(&id);
            }
            caches.run_batch(engine, jobs, &owner)
        })
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn kv_bytes_per_position(&self) -> usize {
        self.kv_per_position
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The GPU engine with its readback awaited: the executor of browser tabs (it works natively
/// too, where the readback future completes after a device poll).
pub struct GpuAsyncExec {
    engine: std::rc::Rc<std::cell::RefCell<Option<mdi_gpu::GpuEngine>>>,
    caches: std::rc::Rc<std::cell::RefCell<Caches<mdi_gpu::GpuCache>>>,
    freed: Arc<FreeList>,
    kv_per_position: usize,
    weight_bytes: u64,
    name: String,
}

impl GpuAsyncExec {
    pub fn new(engine: mdi_gpu::GpuEngine) -> Self {
        let name = format!("gpu ({})", engine.context().info.name);
        Self {
            kv_per_position: engine.kv_cache_bytes(1),
            weight_bytes: engine.weight_bytes(),
            engine: std::rc::Rc::new(std::cell::RefCell::new(Some(engine))),
            caches: std::rc::Rc::new(std::cell::RefCell::new(Caches::new())),
            freed: Arc::new(FreeList::default()),
            name,
        }
    }
}

impl Exec for GpuAsyncExec {
    fn submit(&self, job: RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
        let engine_slot = self.engine.clone();
        let caches = self.caches.clone();
        let freed = self.freed.clone();
        Box::pin(async move {
            let seq = job.seq;
            // Taken out for the job so no RefCell borrow is held across the await.
            let Some(mut engine) = engine_slot.borrow_mut().take() else {
                return failed(seq, "the GPU engine is busy with another job".into());
            };
            {
                let mut c = caches.borrow_mut();
                for id in freed.drain() {
                    c.map.remove(&id);
                }
            }
            let owner: Arc<dyn CacheOwner> = freed.clone();
            let done = match job.task {
                Task::Head { hidden, want } => Done {
                    seq,
                    cache: None,
                    output: engine.head_async(&hidden, want).await,
                },
                Task::Forward { cache, input, want } => {
                    let (handle, mut cache) = match cache {
                        CacheSlot::Lent(h) => {
                            let taken = caches.borrow_mut().map.remove(&h.id);
                            match taken {
                                Some(c) => (h, c),
                                None => {
                                    engine_slot.borrow_mut().replace(engine);
                                    return failed(seq, format!("cache {} is not held", h.id));
                                }
                            }
                        }
                        CacheSlot::New { positions } => match engine.new_gpu_cache(positions) {
                            Ok(c) => {
                                let mut cs = caches.borrow_mut();
                                let id = cs.next;
                                cs.next += 1;
                                (CacheHandle { id, owner }, c)
                            }
                            Err(e) => {
                                engine_slot.borrow_mut().replace(engine);
                                return failed(seq, format!("GPU: {e}"));
                            }
                        },
                    };
                    let output = engine
                        .forward_async(&mut cache, input.as_stage_input(), want)
                        .await;
                    caches.borrow_mut().map.insert(handle.id, cache);
                    Done {
                        seq,
                        cache: Some(handle),
                        output,
                    }
                }
            };
            engine_slot.borrow_mut().replace(engine);
            done
        })
    }

    fn kv_bytes_per_position(&self) -> usize {
        self.kv_per_position
    }

    fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(not(target_family = "wasm"))]
pub use threaded::ThreadedExec;

#[cfg(not(target_family = "wasm"))]
mod threaded {
    use super::*;
    use std::sync::mpsc;

    enum Msg {
        Job(RuntimeJob, futures::channel::oneshot::Sender<RuntimeDone>),
        Batch(
            Vec<RuntimeJob>,
            futures::channel::oneshot::Sender<Vec<RuntimeDone>>,
        ),
        Free(u64),
        Stop,
    }

    struct ChannelOwner(Mutex<mpsc::Sender<Msg>>);

    impl CacheOwner for ChannelOwner {
        fn free(&self, id: u64) {
            // The thread is gone only when the executor is: nothing left to free.
            let _ = crate::lock(&self.0).send(Msg::Free(id));
        }
    }

    /// A blocking engine on its own compute thread. Dropping the executor (and every handle)
    /// ends the thread.
    pub struct ThreadedExec {
        tx: Mutex<mpsc::Sender<Msg>>,
        max_batch: usize,
        kv_per_position: usize,
        weight_bytes: u64,
        name: String,
    }

    impl ThreadedExec {
        pub fn new<E>(engine: E, weight_bytes: u64, name: impl Into<String>) -> Self
        where
            E: StageEngine + Send + 'static,
            E::Cache: Send,
        {
            Self::with_batch(engine, weight_bytes, name, 1)
        }

        /// An executor that hands out batches of up to `max_batch` jobs to the engine.
        pub fn with_batch<E>(
            engine: E,
            weight_bytes: u64,
            name: impl Into<String>,
            max_batch: usize,
        ) -> Self
        where
            E: StageEngine + Send + 'static,
            E::Cache: Send,
        {
            let (tx, rx) = mpsc::channel::<Msg>();
            let owner: Arc<dyn CacheOwner> = Arc::new(ChannelOwner(Mutex::new(tx.clone())));
            let kv_per_position = engine.cache_bytes(1);
            let name = name.into();
            let thread_name = format!("compute {name}");
            let spawned = std::thread::Builder::new()
                .name(thread_name)
                .spawn(move || {
                    if !mdi_transport::wakeups::yield_to_frames() {
                        tracing::debug!(
                            "the compute thread keeps its priority: {}",
                            std::io::Error::last_os_error()
                        );
                    }
                    let mut engine = engine;
                    let mut caches = Caches::new();
                    // Ends when the executor is dropped (the thread's own cache owner keeps a
                    // sender, so the channel alone would never close).
                    while let Ok(msg) = rx.recv() {
                        match msg {
                            Msg::Stop => break,
                            Msg::Free(id) => {
                                caches.map.remove(&id);
                            }
                            Msg::Job(job, reply) => {
                                let done = caches.run(&mut engine, job, &owner);
                                let _ = reply.send(done);
                            }
                            Msg::Batch(jobs, reply) => {
                                let done = caches.run_batch(&mut engine, jobs, &owner);
                                let _ = reply.send(done);
                            }
                        }
                    }
                    // A re-planned node builds its next stage while this thread may still be
                    // finishing a step: free this stage's weights and caches here, then hand
                    // the pages back, or the process would keep them as free heap.
                    drop(caches);
                    drop(engine);
                    crate::native::release_freed_memory();
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a compute thread: {e}");
            }
            Self {
                tx: Mutex::new(tx),
                max_batch: max_batch.max(1),
                kv_per_position,
                weight_bytes,
                name,
            }
        }
    }

    impl Drop for ThreadedExec {
        fn drop(&mut self) {
            let _ = crate::lock(&self.tx).send(Msg::Stop);
        }
    }

    impl Exec for ThreadedExec {
        fn submit(&self, job: RuntimeJob) -> LocalBoxFuture<'static, RuntimeDone> {
            let seq = job.seq;
            let (reply, done) = futures::channel::oneshot::channel();
            let sent = crate::lock(&self.tx).send(Msg::Job(job, reply));
            Box::pin(async move {
                if sent.is_err() {
                    return failed(seq, "the compute thread has stopped".into());
                }
                done.await
                    .unwrap_or_else(|_| failed(seq, "the compute thread has stopped".into()))
            })
        }

        fn submit_batch(&self, jobs: Vec<RuntimeJob>) -> LocalBoxFuture<'static, Vec<RuntimeDone>> {
            let seqs: Vec<u64> = jobs.iter().map(|j| j.seq).collect();
            let (reply, done) = futures::channel::oneshot::channel();
            let sent = crate::lock(&self.tx).send(Msg::Batch(jobs, reply));
            Box::pin(async move {
                let stopped = || {
                    seqs.iter()
                        .map(|&s| failed(s, "the compute thread has stopped".into()))
                        .collect()
                };
                if sent.is_err() {
                    return stopped();
                }
                done.await.unwrap_or_else(|_| stopped())
            })
        }

        fn max_batch(&self) -> usize {
            self.max_batch
        }

        fn kv_bytes_per_position(&self) -> usize {
            self.kv_per_position
        }

        fn weight_bytes(&self) -> u64 {
            self.weight_bytes
        }

        fn describe(&self) -> String {
            self.name.clone()
        }
    }
}
