//! Tensor work. Each thread that touches tensors owns its own copy of the
//! network (`LoadedNet`; tch modules are Send but not Sync):
//! - device threads (see `fleet::DeviceThreads`) run heads inline, inside the
//!   device actor's handler, so an input's decision costs no thread hop;
//! - cloud workers run tails on a `TensorPool` of `Executor`s, so the
//!   batcher's event loop never blocks on a forward; the calibrator runs on
//!   a pool of one thread.
//!
//! `TensorPool` is a pool of threads, each with state built on the thread
//! itself, fed from one shared bounded queue: a job goes to whichever thread
//! is free. Every pool thread starts with `prepare_tensor_thread`
//! (subnormals flushed, one intra-op thread: parallelism comes from the
//! pool, and without it each thread would fan every small forward out to
//! all cores and fight its siblings). A job that panics is answered with an
//! error and the thread rebuilds its state. Shutdown: `shutdown` (or
//! dropping the last handle) closes the queue, answers queued jobs with an
//! error, and joins every thread, so no forward still runs when the process
//! tears libtorch down (that crashed: a forward racing libtorch's static
//! destructors).
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use branchpoint_models::subnormal::prepare_tensor_thread;
use branchpoint_models::Model;
use tch::{Device, Kind, Tensor};

use crate::error::ActorError;

/// What a pool thread needs to load its own copy of the model: the file
/// `Model::load` takes (a built-in model's weights or card, or an imported
/// model's card).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: PathBuf,
    pub device: Device,
}

/// One thread's copy of the network, of either kind.
pub struct LoadedNet {
    net: Model,
    /// Emulates slower device hardware: each head holds its thread this
    /// many times as long as it took here (1: this machine as it is).
    slowdown: f64,
}

impl LoadedNet {
    pub fn load(spec: &ModelSpec) -> Result<Self, ActorError> {
        Ok(Self { net: Model::load(&spec.model, spec.device)?, slowdown: 1.0 })
    }

    /// This copy on emulated hardware `slowdown` (at least 1) times slower.
    pub fn with_slowdown(mut self, slowdown: f64) -> Self {
        self.slowdown = slowdown.max(1.0);
        self
    }

    pub fn net(&self) -> &Model {
        &self.net
    }

    /// Runs `head(partition_branch)` on one input [C, H, W] (flattened).
    pub fn run_head(&self, partition_branch: usize, input: &[f32]) -> Result<HeadOutput, ActorError> {
        let started = Instant::now();
        let dims = self.net.input().dims();
        let want = (dims[0] * dims[1] * dims[2]) as usize;
        if input.len() != want {
            return Err(ActorError::Invalid { what: "input".into(), reason: format!("{} values, the model takes {dims:?} = {want}", input.len()) });
        }
        let x = Tensor::from_slice(input).view([1, dims[0], dims[1], dims[2]]).to_device(self.net.device());
        let (logits, activation) = self.net.head(partition_branch, &x)?;
        let branch_logits = to_vec(&logits)?;
        if self.slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(self.slowdown - 1.0));
        }
        Ok(HeadOutput { branch_logits, activation, compute: started.elapsed() })
    }
}

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// Pool threads alive in this process (see `tensor_threads_running`).
static POOL_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Counts a pool thread for as long as it lives.
struct PoolThread;

impl PoolThread {
    fn enter() -> Self {
        POOL_THREADS.fetch_add(1, Ordering::AcqRel);
        PoolThread
    }
}

impl Drop for PoolThread {
    fn drop(&mut self) {
        POOL_THREADS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tensor-pool threads still alive: a shutdown that could not join one (a
/// forward longer than its bound) leaves it running, and then the process
/// must end without running libtorch's static destructors (`_exit`), or
/// they race the forward and crash.
pub fn tensor_threads_running() -> usize {
    POOL_THREADS.load(Ordering::Acquire)
}

/// Threads that run tensors, each owning state `S` built on the thread (see
/// the module doc). Cloning shares the pool; the last handle dropped shuts
/// it down.
pub struct TensorPool<S> {
    inner: Arc<PoolInner<S>>,
}

impl<S> Clone for TensorPool<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct PoolInner<S> {
    name: String,
    queue: Mutex<Option<crossbeam_channel::Sender<Job<S>>>>,
    closing: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    size: usize,
}

impl<S: 'static> TensorPool<S> {
    /// Starts `threads` threads named `name-i`; each builds its state with
    /// `build` on itself. Returns once every thread has built it, or with the
    /// first thread's error (a bad model or dataset is a clear error at
    /// start, not a dead thread later). At most `queue` jobs wait.
    pub fn start(name: &str, threads: usize, queue: usize, build: impl Fn() -> Result<S, ActorError> + Send + Sync + 'static) -> Result<Self, ActorError> {
        let threads = threads.max(1);
        let (tx, rx) = crossbeam_channel::bounded::<Job<S>>(queue.max(1));
        let (built_tx, built_rx) = std::sync::mpsc::channel::<Result<(), ActorError>>();
        let build = Arc::new(build);
        let closing = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, build, built_tx, closing) = (rx.clone(), build.clone(), built_tx.clone(), closing.clone());
            let thread_name = format!("{name}-{i}");
            let spawned = std::thread::Builder::new().name(thread_name.clone()).spawn(move || {
                let _alive = PoolThread::enter();
                prepare_tensor_thread(1);
                let mut state = match build() {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                        return;
                    }
                };
                let _ = built_tx.send(Ok(()));
                drop(built_tx);
                // Ends when the queue is closed and drained.
                for job in rx.iter() {
                    if closing.load(Ordering::Acquire) {
                        // Dropping the job answers its caller with an error.
                        continue;
                    }
                    if std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut state))).is_err() {
                        tracing::warn!("{thread_name}: a job panicked (its caller gets an error); rebuilding this thread's state");
                        match build() {
                            Ok(s) => state = s,
                            Err(e) => {
                                tracing::warn!("{thread_name}: could not rebuild its state, so this thread stops: {e}");
                                return;
                            }
                        }
                    }
                }
            });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => return Err(ActorError::Invalid { what: format!("{name} thread"), reason: format!("could not start: {e}") }),
            }
        }
        drop(built_tx);
        let pool = Self { inner: Arc::new(PoolInner { name: name.into(), queue: Mutex::new(Some(tx)), closing, threads: Mutex::new(handles), size: threads }) };
        for _ in 0..threads {
            match built_rx.recv() {
                Ok(Ok(())) => {}
                // The pool is dropped on the way out: its threads are joined.
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(ActorError::Invalid { what: format!("{name} thread"), reason: "ended while starting".into() }),
            }
        }
        Ok(pool)
    }

    /// `start` from async code: the wait for the threads to build their
    /// state (a model load, a forward over a split) happens off the event
    /// loop, which meanwhile keeps driving its NATS client and timers.
    pub async fn start_async(name: &str, threads: usize, queue: usize, build: impl Fn() -> Result<S, ActorError> + Send + Sync + 'static) -> Result<Self, ActorError>
    where
        S: 'static,
    {
        let owned = name.to_string();
        tokio::task::spawn_blocking(move || Self::start(&owned, threads, queue, build))
            .await
            .unwrap_or_else(|e| Err(ActorError::Invalid { what: format!("{name} thread"), reason: format!("the start failed: {e}") }))
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.inner.size
    }

    /// Runs `f` on a free thread with its state; resolves to its result, or
    /// to an error when the queue is full, the pool shut down, or `f`
    /// panicked.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce(&mut S) -> R + Send + 'static) -> impl std::future::Future<Output = Result<R, ActorError>> + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job<S> = Box::new(move |state| {
            let _ = tx.send(f(state));
        });
        let name = self.inner.name.clone();
        let queued = match self.inner.queue.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(q) => q.try_send(job).map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => format!("{name}: every thread is busy and its queue is full"),
                crossbeam_channel::TrySendError::Disconnected(_) => format!("{name}: shut down"),
            }),
            None => Err(format!("{name}: shut down")),
        };
        async move {
            queued.map_err(ActorError::Compute)?;
            rx.await.map_err(|_| ActorError::Compute(format!("{name}: the job was dropped (it panicked, or the pool shut down)")))
        }
    }

    /// Closes the queue, answers the jobs still queued with an error, and
    /// waits for every thread to finish its current job and exit. Waits at
    /// most `within` in all; returns the names of threads still running
    /// then (they are left running, detached). Idempotent.
    pub fn shutdown(&self, within: Duration) -> Vec<String> {
        self.inner.shutdown(within)
    }
}

impl<S> PoolInner<S> {
    fn shutdown(&self, within: Duration) -> Vec<String> {
        self.closing.store(true, Ordering::Release);
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        let handles: Vec<JoinHandle<()>> = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        join_within(handles, within)
    }
}

impl<S> Drop for PoolInner<S> {
    fn drop(&mut self) {
        let still = self.shutdown(Duration::from_secs(10));
        if !still.is_empty() {
            tracing::warn!("{}: threads {still:?} still computing 10 s after shutdown; left running", self.name);
        }
    }
}

/// Joins `handles` within `within` in all (never the calling thread itself);
/// returns the names of the threads still running then.
pub fn join_within(handles: Vec<JoinHandle<()>>, within: Duration) -> Vec<String> {
    let until = Instant::now() + within;
    let me = std::thread::current().id();
    let mut still = Vec::new();
    for h in handles {
        if h.thread().id() == me {
            continue;
        }
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        if h.is_finished() {
            let _ = h.join();
        } else {
            still.push(h.thread().name().unwrap_or("unnamed").to_string());
        }
    }
    still
}

/// Measured batch times: `[model][branch - 1]`, (batch size, µs) points in
/// ascending batch order.
pub type TailTimes = Vec<Vec<Vec<(usize, f64)>>>;

/// One tail-pool thread's state: its copy of each model the worker serves.
pub struct Executor {
    nets: Vec<LoadedNet>,
    /// Emulates slower cloud hardware: each tail holds its thread this many
    /// times as long as it took here (1: this machine as it is).
    slowdown: f64,
    /// Or paces each batch to a profile: `[model][branch - 1]` (batch size,
    /// µs) points; a batch holds its thread at least that long.
    paced: Option<Arc<TailTimes>>,
}

impl Executor {
    /// Starts `threads` executors, each with its own copy of every model
    /// in `specs` (`RunTail::model` indexes them).
    pub fn start(specs: Vec<ModelSpec>, threads: usize) -> Result<TensorPool<Executor>, ActorError> {
        Self::start_with_slowdown(specs, threads, 1.0)
    }

    /// `start`, on emulated hardware `slowdown` times slower than this
    /// machine: the thread stays busy for the difference, as a slower CPU
    /// would, so queues and batching react to it like to real load.
    pub fn start_with_slowdown(specs: Vec<ModelSpec>, threads: usize, slowdown: f64) -> Result<TensorPool<Executor>, ActorError> {
        if !(slowdown.is_finite() && slowdown >= 1.0) {
            return Err(ActorError::Invalid { what: "cloud slowdown".into(), reason: format!("{slowdown} must be a number at least 1") });
        }
        // The batcher keeps at most one batch per thread plus one in flight
        // (`Batcher::with_compute_threads`); the queue leaves room for more.
        TensorPool::start("tail", threads, 2 * threads.max(1) + 2, move || {
            let cold = Executor { nets: specs.iter().map(LoadedNet::load).collect::<Result<_, _>>()?, slowdown: 1.0, paced: None };
            Ok(Executor { slowdown, ..cold.warmed()? })
        })
    }

    /// `start`, each batch taking at least the time `times` gives it
    /// (`[model][branch - 1]`: (batch size, µs) points, interpolated as the
    /// virtual-time replay does): a live replay's workers then take the
    /// scenario's compute times, not this machine's under its load.
    pub fn start_paced(specs: Vec<ModelSpec>, threads: usize, times: TailTimes) -> Result<TensorPool<Executor>, ActorError> {
        let times = Arc::new(times);
        TensorPool::start("tail", threads, 2 * threads.max(1) + 2, move || {
            let cold = Executor { nets: specs.iter().map(LoadedNet::load).collect::<Result<_, _>>()?, slowdown: 1.0, paced: None };
            Ok(Executor { paced: Some(times.clone()), ..cold.warmed()? })
        })
    }

    /// Runs every tail once on zeros: a first forward is many times slower
    /// than the next (libtorch sets its kernels up), and the batcher learns
    /// its batch times from what it measures, so a cold first batch would
    /// make it refuse what it can serve.
    fn warmed(self) -> Result<Self, ActorError> {
        for (model, loaded) in self.nets.iter().enumerate() {
            for (k, point) in loaded.net.partition_points().iter().enumerate() {
                let values = point.activation_shape.iter().product::<i64>().max(0) as usize;
                self.run_tail(RunTail { model, partition_branch: k + 1, batch: 1, activations: vec![0.0; values] })?;
            }
        }
        Ok(self)
    }

    /// Runs model `msg.model`'s `tail(partition_branch)` on a batch.
    pub fn run_tail(&self, msg: RunTail) -> Result<TailOutput, ActorError> {
        let started = Instant::now();
        let net = &self.nets.get(msg.model).ok_or_else(|| ActorError::Invalid { what: "model".into(), reason: format!("{} of the {} served", msg.model, self.nets.len()) })?.net;
        net.check_branch(msg.partition_branch)?;
        let shape = net.partition_points()[msg.partition_branch - 1].activation_shape.clone();
        let per_input: i64 = shape.iter().product();
        if msg.activations.len() as i64 != per_input * msg.batch as i64 {
            return Err(ActorError::Invalid { what: "activation batch".into(), reason: format!("{} values for {} inputs of shape {shape:?}", msg.activations.len(), msg.batch) });
        }
        let mut dims = vec![msg.batch as i64];
        dims.extend(&shape);
        let x = Tensor::from_slice(&msg.activations).view(dims.as_slice()).to_device(net.device());
        let logits = net.tail(msg.partition_branch, &x)?;
        let (conf, class) = logits.softmax(-1, Kind::Float).max_dim(1, false);
        let conf: Vec<f32> = to_vec(&conf)?;
        let class: Vec<i64> = Vec::try_from(class.to_device(Device::Cpu)).map_err(branchpoint_models::ModelError::from)?;
        if self.slowdown > 1.0 {
            std::thread::sleep(started.elapsed().mul_f64(self.slowdown - 1.0));
        }
        if let Some(points) = self.paced.as_ref().and_then(|p| p.get(msg.model)).and_then(|m| m.get(msg.partition_branch - 1)) {
            let target = Duration::from_secs_f64(branchpoint_core::costs::batch_time_us(points, msg.batch).round() / 1e6);
            std::thread::sleep(target.saturating_sub(started.elapsed()));
        }
        Ok(TailOutput { answers: class.into_iter().map(|c| c as u32).zip(conf).collect(), compute: started.elapsed() })
    }
}

pub struct HeadOutput {
    pub branch_logits: Vec<f32>,
    /// The activation [1, ...], left as a tensor: it is copied out only for
    /// an input that is offloaded.
    pub activation: Tensor,
    pub compute: Duration,
}

impl HeadOutput {
    /// The activation's shape (batch dimension included) and values, copied
    /// out of the tensor once, for an input that is offloaded.
    pub fn activation_values(&self) -> Result<(Vec<u32>, std::sync::Arc<[f32]>), ActorError> {
        let shape: Vec<u32> = self.activation.size().iter().map(|&d| d as u32).collect();
        Ok((shape, to_vec(&self.activation)?.into()))
    }
}

/// Model `model`'s `tail(partition_branch)` on `batch` activations laid end
/// to end.
pub struct RunTail {
    /// Which of the executor's models (their order when it started).
    pub model: usize,
    pub partition_branch: usize,
    pub batch: usize,
    pub activations: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TailOutput {
    /// (predicted class, max softmax probability) per input, in order.
    pub answers: Vec<(u32, f32)>,
    pub compute: Duration,
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>, ActorError> {
    Ok(Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1)).map_err(branchpoint_models::ModelError::from)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::executor::block_on;

    #[test]
    fn jobs_run_on_pool_threads_with_their_own_state() {
        let pool = TensorPool::start("t", 2, 8, || Ok(Vec::<u32>::new())).unwrap();
        let results: Vec<(String, usize)> = (0..20)
            .map(|i| {
                block_on(pool.run(move |seen: &mut Vec<u32>| {
                    seen.push(i);
                    (std::thread::current().name().unwrap_or("").to_string(), seen.len())
                }))
                .unwrap()
            })
            .collect();
        assert!(results.iter().all(|(name, _)| name.starts_with("t-")), "{results:?}");
        // Each thread counts only the jobs it ran itself.
        assert_eq!(results.iter().filter(|(_, n)| *n == 1).count(), results.iter().map(|(t, _)| t).collect::<std::collections::BTreeSet<_>>().len());
        assert!(subnormal_flag_on_pool(&pool), "pool threads flush subnormals");
    }

    fn subnormal_flag_on_pool<S: 'static>(pool: &TensorPool<S>) -> bool {
        block_on(pool.run(|_| branchpoint_models::subnormal::subnormals_flushed())).unwrap()
    }

    #[test]
    fn a_panicking_job_is_an_error_and_the_pool_keeps_serving() {
        let pool = TensorPool::start("p", 1, 4, || Ok(0u32)).unwrap();
        let e = block_on(pool.run(|_: &mut u32| -> u32 { panic!("boom") })).unwrap_err();
        assert!(e.to_string().contains("dropped"), "{e}");
        assert_eq!(block_on(pool.run(|n: &mut u32| *n + 7)).unwrap(), 7, "state rebuilt, still serving");
    }

    #[test]
    fn shutdown_waits_for_the_job_in_progress_and_refuses_new_ones() {
        let pool = TensorPool::start("s", 1, 4, || Ok(())).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let running = pool.run(move |_| {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
            flag.store(true, Ordering::Release);
        });
        started_rx.recv().unwrap();
        let queued = pool.run(|_| ());
        let stopper = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.shutdown(Duration::from_secs(60)))
        };
        // The queue closes first (probes queued meanwhile are dropped with
        // the rest): then release the running job.
        use futures::FutureExt;
        while !matches!(pool.run(|_| ()).now_or_never(), Some(Err(e)) if e.to_string().contains("shut down")) {
            std::thread::yield_now();
        }
        release_tx.send(()).unwrap();
        assert!(stopper.join().unwrap().is_empty(), "joined within the bound");
        assert!(done.load(Ordering::Acquire), "shutdown returned only after the running job ended");
        assert!(block_on(running).is_ok());
        assert!(block_on(queued).is_err(), "a job still queued at shutdown is answered with an error");
    }

    #[test]
    fn a_full_queue_is_refused_at_once() {
        let pool = TensorPool::start("q", 1, 1, || Ok(())).unwrap();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let blocker = pool.run(move |_| {
            started_tx.send(()).unwrap();
            let _ = release_rx.recv();
        });
        started_rx.recv().unwrap();
        let waiting = pool.run(|_| ());
        let refused = block_on(pool.run(|_| ())).unwrap_err();
        assert!(refused.to_string().contains("queue is full"), "{refused}");
        release_tx.send(()).unwrap();
        assert!(block_on(blocker).is_ok() && block_on(waiting).is_ok());
    }

    #[test]
    fn a_thread_that_cannot_build_its_state_fails_the_start() {
        let e = TensorPool::<()>::start("b", 2, 2, || Err(ActorError::Invalid { what: "model".into(), reason: "no such file".into() })).err().unwrap();
        assert!(e.to_string().contains("no such file"), "{e}");
    }
}
