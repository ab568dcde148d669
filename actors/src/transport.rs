//! The device's side of offloading: send one request, wait for its answer
//! until the deadline, and say exactly what happened otherwise.
//!
//! In-process (the embedded default) the request goes straight to a
//! worker's batcher as an `Offload`, its activation f32 values, never
//! bytes. Over NATS it is encoded with the wire
//! codec and sent as a request to `branchpoint.offload.<branch>`, where the
//! workers' queue group picks one worker.
//!
//! The deadline covers the whole exchange, sending included: a client whose
//! outgoing buffer is full (a long broker outage) makes sending wait, and
//! that wait counts. The exchange runs on its own thread
//! (`exchange_runtime`), not the device's: a device thread busy with head
//! forwards must neither delay a deadline nor make a late answer look
//! timely, so the moment an answer arrived is taken there, and an answer
//! after the deadline is a miss. A client that knows it is disconnected
//! fails at once: nothing is buffered to reach the workers, stale, after the
//! reconnect.
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use actix::Addr;
use branchpoint_messages::{decode, encode, subjects, ErrorReply, OffloadAnswer, OffloadReply};

use crate::offload::Offload;
use crate::worker::{Batcher, Job, ReplyTo};

#[derive(Clone)]
pub enum OffloadLink {
    InProcess(Addr<Batcher>),
    /// Several workers in this process, one of which takes each request at
    /// random, as a NATS queue group hands it to one member (and as the
    /// virtual-time replay's pool does).
    InProcessPool(Arc<InProcessPool>),
    Nats(async_nats::Client),
    /// A scripted cloud that answers, drops, delays, refuses or garbles each
    /// request as told: for tests of the device's fallbacks and for fault
    /// drills, with no worker behind it.
    Faulty(Arc<FaultyLink>),
}

/// Workers in this process, each its own batcher.
pub struct InProcessPool {
    workers: Vec<Addr<Batcher>>,
    picks: std::sync::atomic::AtomicU64,
}

impl InProcessPool {
    /// A link to `workers` (at least one).
    pub fn link(workers: Vec<Addr<Batcher>>) -> OffloadLink {
        assert!(!workers.is_empty(), "a pool has a worker");
        OffloadLink::InProcessPool(Arc::new(Self { workers, picks: Default::default() }))
    }

    /// The worker for the next request: uniform, from a counter through
    /// SplitMix64, so that no device thread waits on another's generator.
    fn pick(&self) -> Addr<Batcher> {
        let n = self.picks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let i = branchpoint_core::rng::SplitMix64::new(n).below(self.workers.len() as u64) as usize;
        self.workers[i].clone()
    }
}

/// What a `FaultyLink` does with one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answers `class` after `after` (zero: at once).
    Answer { class: u32, after: Duration },
    /// Never answers: the request is lost on the way.
    Drop,
    /// A worker's typed error reply, at once.
    Error(branchpoint_messages::ErrorKind),
    /// The client is not connected: nothing is sent.
    Disconnected,
    /// NATS says no worker is subscribed.
    NoResponders,
    /// Answers, but for another request (`seq + 1`): a confused or rogue
    /// worker.
    WrongRequest,
}

/// A scripted cloud: `script` decides each request's fate from the request.
pub struct FaultyLink {
    script: Box<dyn Fn(&Offload) -> Fault + Send + Sync>,
}

impl FaultyLink {
    pub fn link(script: impl Fn(&Offload) -> Fault + Send + Sync + 'static) -> OffloadLink {
        OffloadLink::Faulty(Arc::new(Self { script: Box::new(script) }))
    }

    async fn exchange(&self, request: Offload, until: tokio::time::Instant) -> Result<OffloadReply, OffloadFailure> {
        let answer = |seq, class| {
            OffloadReply::Answer(OffloadAnswer {
                seq,
                worker_id: "faulty".into(),
                class,
                confidence: 1.0,
                timings: branchpoint_messages::WorkerTimings { queue_us: 0, compute_us: 0, batch_size: 1 },
            })
        };
        match (self.script)(&request) {
            Fault::Answer { class, after } => match tokio::time::timeout_at(until, tokio::time::sleep(after)).await {
                Ok(()) => Ok(answer(request.seq, class)),
                Err(_) => Err(OffloadFailure::Deadline),
            },
            Fault::Drop => {
                tokio::time::sleep_until(until).await;
                Err(OffloadFailure::Deadline)
            }
            Fault::Error(kind) => Ok(OffloadReply::Error(ErrorReply { seq: Some(request.seq), worker_id: "faulty".into(), kind, detail: "injected".into() })),
            Fault::Disconnected => Err(OffloadFailure::Disconnected),
            Fault::NoResponders => Err(OffloadFailure::NoResponders),
            Fault::WrongRequest => Ok(answer(request.seq.wrapping_add(1), 0)),
        }
    }
}

/// Why an offload did not produce an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum OffloadFailure {
    /// No answer before the deadline (sending included).
    Deadline,
    /// The client is not connected to NATS: nothing was sent.
    Disconnected,
    /// No worker is subscribed (NATS said so at once).
    NoResponders,
    /// A worker answered with a typed error.
    ErrorReply(ErrorReply),
    /// The request could not be sent, or the reply could not be read.
    Transport(String),
}

/// An answer and the moment it arrived (on the exchange thread).
#[derive(Debug, Clone)]
pub struct Answered {
    pub answer: OffloadAnswer,
    pub at: Instant,
}

/// The thread that runs every offload exchange and its deadline timer.
/// Built once; `None` if the OS would not give a thread, and then the
/// exchanges run on the caller's thread as before.
fn exchange_runtime() -> Option<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("offload-exchange")
                .enable_all()
                .build()
                .map_err(|e| tracing::warn!("offload: no thread of its own for deadlines ({e}); they run on the device threads"))
                .ok()
        })
        .as_ref()
}

impl OffloadLink {
    /// Offloads `request` and waits at most `timeout` for the answer, from
    /// now: sending, the worker's queue and the reply all count.
    pub async fn offload(&self, request: Offload, timeout: Duration) -> Result<Answered, OffloadFailure> {
        let until = tokio::time::Instant::now() + timeout;
        let exchange = exchange(self.clone(), request, until);
        match exchange_runtime() {
            Some(rt) => rt.spawn(exchange).await.unwrap_or_else(|e| Err(OffloadFailure::Transport(format!("the exchange failed: {e}")))),
            None => exchange.await,
        }
    }
}

/// One request to a batcher in this process, its answer by `until`.
async fn in_process(batcher: Addr<Batcher>, request: Offload, until: tokio::time::Instant) -> Result<OffloadReply, OffloadFailure> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job = Job { request, received: Instant::now(), reply: ReplyTo::Local(tx) };
    let exchange = async move {
        batcher.send(job).await.map_err(|e| OffloadFailure::Transport(e.to_string()))?;
        rx.await.map_err(|_| OffloadFailure::Transport("the worker dropped the request".into()))
    };
    match tokio::time::timeout_at(until, exchange).await {
        Ok(r) => r,
        Err(_) => Err(OffloadFailure::Deadline),
    }
}

async fn exchange(link: OffloadLink, request: Offload, until: tokio::time::Instant) -> Result<Answered, OffloadFailure> {
    let reply = match link {
        OffloadLink::Faulty(f) => f.exchange(request, until).await?,
        OffloadLink::InProcess(batcher) => in_process(batcher, request, until).await?,
        OffloadLink::InProcessPool(pool) => in_process(pool.pick(), request, until).await?,
        OffloadLink::Nats(client) => {
            if client.connection_state() != async_nats::connection::State::Connected {
                return Err(OffloadFailure::Disconnected);
            }
            // The edge: only here does the activation become bytes.
            let subject = subjects::offload(request.partition_branch);
            let payload = request.to_wire().and_then(|r| encode(&r)).map_err(|e| OffloadFailure::Transport(e.to_string()))?;
            let remaining = until.saturating_duration_since(tokio::time::Instant::now());
            let req = async_nats::Request::new().payload(payload.into()).timeout(Some(remaining));
            // The client's own timeout starts after the request is queued
            // for sending; this one covers the queueing too.
            match tokio::time::timeout_at(until, client.send_request(subject, req)).await {
                Err(_) => return Err(OffloadFailure::Deadline),
                Ok(Ok(msg)) => decode::<OffloadReply>(&msg.payload).map_err(|e| OffloadFailure::Transport(format!("unreadable reply: {e}")))?,
                Ok(Err(e)) => {
                    use async_nats::RequestErrorKind as K;
                    return Err(match e.kind() {
                        K::TimedOut => OffloadFailure::Deadline,
                        K::NoResponders => OffloadFailure::NoResponders,
                        _ => OffloadFailure::Transport(e.to_string()),
                    });
                }
            }
        }
    };
    let at = Instant::now();
    match reply {
        OffloadReply::Answer(answer) => Ok(Answered { answer, at }),
        OffloadReply::Error(e) => Err(OffloadFailure::ErrorReply(e)),
    }
}
