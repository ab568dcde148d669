//! Cloud worker: receives offload requests (over NATS or in-process),
//! batches those that arrive close together, runs one batched tail forward
//! per batch on the compute pool, and answers each request.
//!
//! Owns: the pending batches, one per partition branch (only requests of the
//! same branch have activations of the same shape). Messages in: `Job`,
//! `GetWorkerStats`. A batch is flushed when it holds `max_batch` requests or
//! `max_wait` after its first request arrived, whichever comes first, and
//! runs when a compute thread is free (`with_compute_threads`): under
//! overload requests wait here, where expired ones are answered at once and
//! the others join full batches, rather than queueing at the compute pool.
//! Mailbox: bounded (actix default); the NATS loop awaits `send`, so a busy
//! worker stops pulling from its subscription and NATS's queue group hands
//! new requests to other members. Bad requests get a typed error reply and
//! the worker keeps serving. Restart: state is only in-flight batches; a
//! restarted worker starts empty and devices fall back for what was lost.
//! Shutdown: dropping the service unsubscribes; in-flight requests time out
//! at the devices, which fall back to their own answers.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_messages::{decode, encode, subjects, ErrorKind, ErrorReply, MessageError, OffloadAnswer, OffloadReply, OffloadRequest, WorkerTimings};
use branchpoint_models::net::PartitionPoint;
use futures::future::LocalBoxFuture;
use futures::StreamExt;

use crate::compute::{Executor, RunTail, TailOutput, TensorPool};
use crate::error::ActorError;
use crate::offload::Offload;

fn cfg_queue_default() -> usize {
    512
}

/// How far a device's clock may be behind a worker's before the worker
/// takes the device's requests for stale (`Deadline::sent_at_unix_us`; 0
/// means the sender did not say, and is never taken for stale).
pub const CLOCK_SKEW: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub worker_id: String,
    /// Most requests in one batched forward.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
}

/// Where the answer to one request goes.
pub enum ReplyTo {
    /// In-process: straight back to the waiting device.
    Local(tokio::sync::oneshot::Sender<OffloadReply>),
    /// Over NATS: to the request's reply inbox (boxed: it is much larger
    /// than the in-process sender, and jobs queue by the hundred).
    Nats(Box<NatsReply>),
}

/// A NATS request to answer, and the worker's client and id: an error reply
/// is also counted in the service's `$SRV.STATS` (`num_errors`,
/// `last_error`).
pub struct NatsReply {
    pub request: async_nats::service::Request,
    pub client: async_nats::Client,
    pub worker_id: String,
}

/// The code an error reply is counted under in `$SRV.STATS`: 4xx for what
/// the request got wrong, 5xx for the worker's state.
fn service_code(kind: ErrorKind) -> usize {
    match kind {
        ErrorKind::InvalidRequest | ErrorKind::UnsupportedVersion | ErrorKind::UnknownBranch | ErrorKind::UnknownModel => 400,
        ErrorKind::DeadlineExpired => 408,
        ErrorKind::Overloaded => 503,
        ErrorKind::Internal | ErrorKind::Unknown => 500,
    }
}

impl ReplyTo {
    fn send(self, reply: OffloadReply) {
        match self {
            // The device may have given up (deadline): nobody to tell.
            ReplyTo::Local(tx) => drop(tx.send(reply)),
            ReplyTo::Nats(to) => {
                let NatsReply { mut request, client, worker_id } = *to;
                let bytes = match encode(&reply) {
                    Ok(b) => b,
                    Err(e) => {
                        let err = OffloadReply::Error(ErrorReply {
                            seq: None,
                            worker_id: worker_id.clone(),
                            kind: ErrorKind::Internal,
                            detail: format!("could not encode the reply: {e}"),
                        });
                        encode(&err).unwrap_or_default()
                    }
                };
                actix::spawn(async move {
                    // A lost reply is the device's timeout to handle.
                    match reply {
                        OffloadReply::Answer(_) => drop(request.respond(Ok(bytes.into())).await),
                        OffloadReply::Error(e) => {
                            // The typed reply goes to the device as it is;
                            // the service API's own error response (headers,
                            // no body) goes to the worker's error subject,
                            // where it counts the error in $SRV.STATS and
                            // leaves the device's inbox alone.
                            if let Some(inbox) = request.message.reply.take() {
                                let _ = client.publish(inbox, bytes.into()).await;
                            }
                            request.message.reply = Some(subjects::worker_errors(&worker_id).into());
                            let status = format!("{:?}: {}", e.kind, e.detail);
                            let _ = request.respond(Err(async_nats::service::error::Error { status, code: service_code(e.kind) })).await;
                        }
                    }
                });
            }
        }
    }
}

/// What runs a batch's tails: the compute pool (`TensorPool<Executor>`) in
/// a worker, a fake in the batcher's unit tests.
pub trait RunTails: 'static {
    fn run_tails(&self, run: RunTail) -> LocalBoxFuture<'static, Result<TailOutput, ActorError>>;
}

impl RunTails for TensorPool<Executor> {
    fn run_tails(&self, run: RunTail) -> LocalBoxFuture<'static, Result<TailOutput, ActorError>> {
        let done = self.run(move |e| e.run_tail(run));
        Box::pin(async move { done.await.and_then(|r| r) })
    }
}

/// One offload request waiting for its answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Job {
    pub request: Offload,
    pub received: Instant,
    pub reply: ReplyTo,
}

impl Job {
    /// When its answer stops being useful, by this worker's clock.
    fn due(&self) -> Instant {
        self.received + Duration::from_micros(self.request.deadline.budget_us)
    }

    fn is_audit(&self) -> bool {
        self.request.audit.as_ref().is_some_and(|t| t.on_device)
    }
}

/// How long a batch of n takes to run at one branch: a least-squares line
/// `a + b n` (a and b at least 0) through the smoothed time of each batch
/// size seen (one point per size, so a run of small batches under light
/// load does not make the worker forget what full ones take), and beyond
/// the largest size seen no steeper than proportional to it. Unknown (0)
/// before the first batch, so nothing is refused on a guess.
#[derive(Debug, Clone, Default)]
pub struct BatchTime {
    /// Smoothed seconds per batch, by batch size (index n).
    by_size: Vec<Option<f64>>,
    a: f64,
    b: f64,
}

impl BatchTime {
    /// Weight of a new batch in its size's smoothed time.
    const ALPHA: f64 = 0.2;
    /// Batch sizes tracked (a worker's max_batch is far below).
    const MAX_SIZE: usize = 4096;

    pub fn observe(&mut self, n: usize, took: Duration) {
        let n = n.clamp(1, Self::MAX_SIZE);
        if self.by_size.len() <= n {
            self.by_size.resize(n + 1, None);
        }
        let t = took.as_secs_f64();
        let slot = &mut self.by_size[n];
        *slot = Some(slot.map_or(t, |old| old + Self::ALPHA * (t - old)));
        let points: Vec<(f64, f64)> = self.by_size.iter().enumerate().filter_map(|(n, t)| t.map(|t| (n as f64, t))).collect();
        let k = points.len() as f64;
        let (mx, my) = points.iter().fold((0.0, 0.0), |(x, y), p| (x + p.0 / k, y + p.1 / k));
        let (sxx, sxy) = points.iter().fold((0.0, 0.0), |(xx, xy), p| (xx + (p.0 - mx).powi(2), xy + (p.0 - mx) * (p.1 - my)));
        if sxx > 0.0 {
            self.b = (sxy / sxx).max(0.0);
            self.a = (my - self.b * mx).max(0.0);
        } else {
            // One batch size so far: all of it per input.
            (self.a, self.b) = (0.0, my / mx.max(1.0));
        }
    }

    pub fn estimate(&self, n: usize) -> Duration {
        let line = (self.a + self.b * n as f64).max(0.0);
        // Beyond the largest batch seen, a line through small ones can
        // climb too steeply (noise in their times); proportional to the
        // largest seen is an upper bound there (batching only amortises).
        let Some((largest, t)) = self.by_size.iter().enumerate().rev().find_map(|(n, t)| t.map(|t| (n as f64, t))) else { return Duration::ZERO };
        let secs = if n as f64 > largest { line.min(t * n as f64 / largest) } else { line };
        Duration::from_secs_f64(secs)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WorkerStats {
    pub requests: u64,
    pub batches: u64,
    pub errors: u64,
    /// Requests waiting: for their batch, or in a batch waiting for compute.
    pub queue_depth: usize,
    pub mean_batch_size: f64,
    /// EWMA (alpha 0.1) of the time requests wait for their batch, µs.
    pub queue_delay_us_ewma: f64,
    /// Requests answered by the tail (not error replies).
    pub answered: u64,
    /// Sum over answered requests of the time their formed batch waited for
    /// a compute thread, µs: divided by `answered` it is the congestion
    /// delay, without the batching window.
    pub compute_wait_us_total: f64,
    /// Audits shed because the worker was busy.
    pub audits_shed: u64,
}

/// How many of a branch's waiting requests (their deadlines `dues`, in
/// earliest-first order, audits after) to run as the next batch: the n up to
/// `max_batch` that answers the most of them in time per second of compute,
/// with `batch_time(n)` the estimated time of a batch of n started `now`;
/// the batch is then the earliest n whose deadlines a batch of n still
/// meets. At least one when any request waits.
pub fn batch_to_run(dues: &[Instant], max_batch: usize, now: Instant, batch_time: impl Fn(usize) -> Duration) -> usize {
    let upto = dues.len().min(max_batch.max(1));
    let mut best = (0.0f64, upto.min(1));
    for n in 1..=upto {
        let t = batch_time(n);
        let in_time = dues.iter().filter(|&&d| d >= now + t).count().min(n);
        // Answers per second of compute; ties go to the larger batch.
        let rate = in_time as f64 / t.as_secs_f64().max(1e-9);
        if in_time > 0 && rate >= best.0 {
            best = (rate, n);
        }
    }
    best.1
}

/// Where in a branch's queue a new request goes, or `None` to shed it:
/// real requests go ahead of every queued audit (an audit never delays an
/// offload), and an audit is shed while the worker holds `shed_at` requests
/// or more (`backlog`: queued and computing). `audits` flags the queue.
pub fn admit(audits: &[bool], is_audit: bool, backlog: usize, shed_at: usize) -> Option<usize> {
    if is_audit {
        return (backlog < shed_at).then_some(audits.len());
    }
    Some(audits.iter().position(|&a| a).unwrap_or(audits.len()))
}

/// A model the worker serves: its SHA-256 (`Model::sha256`, what requests
/// name it by) and what crosses each of its partition points.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub sha256: String,
    pub partition_points: Vec<PartitionPoint>,
}

/// Requests that may share a batch: the same model's tail at the same
/// partition branch (`model` indexes the worker's models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lane {
    pub model: usize,
    pub branch: u8,
}

pub struct Batcher {
    cfg: WorkerConfig,
    /// Over NATS: where audit results go (`branchpoint.calibration.audit`).
    audit_sink: Option<async_nats::Client>,
    executor: Box<dyn RunTails>,
    /// The models served, in the executor's order; a request that names
    /// none goes to the first.
    models: Vec<ServedModel>,
    pending: HashMap<Lane, Vec<Job>>,
    /// Bumped at every flush, so a stale max_wait timer flushes nothing.
    generation: HashMap<Lane, u64>,
    stats: WorkerStats,
    /// Requests in batches handed to the compute pool and not yet answered.
    in_flight: usize,
    /// Batches handed to the compute pool and not yet answered, and how
    /// many may be: one per compute thread, plus one. Beyond that, requests wait here,
    /// where an expired one is answered at once instead of being computed,
    /// and where waiting requests join bigger batches.
    batches_in_flight: usize,
    max_batches_in_flight: usize,
    /// Lanes with requests ready to run, waiting for a compute thread,
    /// and since when: the queue delay starts there, not at arrival, because
    /// the batching window before it is chosen, not congestion.
    deferred: std::collections::BTreeSet<Lane>,
    ready_since: HashMap<Lane, Instant>,
    /// Each lane's batch time, for deadline decisions.
    batch_time: HashMap<Lane, BatchTime>,
    /// Most requests held (waiting and computing); beyond it an offload is
    /// refused at once as Overloaded.
    max_queue: usize,
    compute_threads: usize,
    /// When each compute thread is expected to be free (a batch handed to
    /// the pool may wait for one: its deadline counts from then), and the
    /// estimated times of the batches handed to it and not yet done.
    free_at: Vec<Instant>,
    slot_work: Vec<std::collections::VecDeque<Duration>>,
}

impl Batcher {
    /// A batcher for `models` (at least one), whose tails `executor` runs
    /// (`RunTail::model` indexes `models`).
    pub fn new(cfg: WorkerConfig, executor: impl RunTails, models: Vec<ServedModel>) -> Self {
        assert!(!models.is_empty(), "a worker serves at least one model");
        Self {
            cfg,
            audit_sink: None,
            executor: Box::new(executor),
            models,
            pending: HashMap::new(),
            generation: HashMap::new(),
            stats: WorkerStats::default(),
            in_flight: 0,
            batches_in_flight: 0,
            max_batches_in_flight: usize::MAX,
            deferred: Default::default(),
            ready_since: HashMap::new(),
            batch_time: HashMap::new(),
            max_queue: cfg_queue_default(),
            compute_threads: 1,
            free_at: vec![Instant::now()],
            slot_work: vec![Default::default()],
        }
        .with_default_queue()
    }

    fn with_default_queue(mut self) -> Self {
        self.max_queue = self.cfg.max_batch.max(1) * 16;
        self
    }

    /// Holds at most `n` requests (waiting and computing) [default: 16
    /// batches].
    pub fn with_max_queue(mut self, n: usize) -> Self {
        self.max_queue = n.max(1);
        self
    }

    /// Sends the final exit's answer to every tagged request (audits and
    /// watched offloads) to the calibrator over `client`.
    pub fn with_audit_sink(mut self, client: async_nats::Client) -> Self {
        self.audit_sink = Some(client);
        self
    }

    fn backlog(&self) -> usize {
        self.pending.values().map(Vec::len).sum::<usize>() + self.in_flight
    }

    /// Hands the compute pool (of `threads` threads) at most one batch per
    /// thread plus one waiting behind them: the one waiting keeps a thread
    /// from idling while its next batch is gathered (without it throughput
    /// fell to 0.78x a bare batched forward). Without this call there is no
    /// bound, and under overload batches queue at the executor, where
    /// expired requests are computed anyway.
    pub fn with_compute_threads(mut self, threads: usize) -> Self {
        self.max_batches_in_flight = threads.max(1) + 1;
        self.compute_threads = threads.max(1);
        self.free_at = vec![Instant::now(); self.compute_threads];
        self.slot_work = vec![Default::default(); self.compute_threads];
        self
    }

    /// The compute thread expected free first, and when a batch handed to
    /// the pool now would start.
    fn next_start(&self, now: Instant) -> (usize, Instant) {
        let (slot, at) = self.free_at.iter().enumerate().min_by_key(|(_, t)| **t).map(|(i, t)| (i, *t)).unwrap_or((0, now));
        (slot, at.max(now))
    }

    /// Flushes deferred lanes while compute threads are free, the lane
    /// whose most urgent offload is due first first.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        while self.batches_in_flight < self.max_batches_in_flight {
            let urgent = |l: &Lane| self.pending.get(l).and_then(|q| q.iter().filter(|j| !j.is_audit()).map(Job::due).min());
            let Some(lane) = self.deferred.iter().copied().min_by_key(|l| (urgent(l).is_none(), urgent(l), *l)) else { return };
            self.deferred.remove(&lane);
            self.flush(lane, ctx);
        }
    }

    fn error(&mut self, seq: Option<u64>, kind: ErrorKind, detail: String) -> OffloadReply {
        self.stats.errors += 1;
        OffloadReply::Error(ErrorReply { seq, worker_id: self.cfg.worker_id.clone(), kind, detail })
    }

    /// Checks what the message crate cannot: that the model and its branch
    /// are served here and the activation has the branch's shape, one input
    /// per request; and that it is not stale: a request whose budget ended
    /// more than `CLOCK_SKEW` ago by this worker's clock was held up on the
    /// way (a client buffering through a broker outage) and nobody waits for
    /// its answer. Gives the request's lane.
    fn check(&self, r: &Offload, now_unix_us: u64) -> Result<Lane, (ErrorKind, String)> {
        let d = r.deadline;
        let ended = d.sent_at_unix_us.saturating_add(d.budget_us);
        if d.sent_at_unix_us != 0 && now_unix_us > ended.saturating_add(CLOCK_SKEW.as_micros() as u64) {
            let late = Duration::from_micros(now_unix_us - ended);
            return Err((ErrorKind::DeadlineExpired, format!("stale: its budget ended {late:?} before it arrived here (by this worker's clock)")));
        }
        let model = match &r.model_sha256 {
            None => 0,
            Some(sha) => self.models.iter().position(|m| m.sha256 == **sha).ok_or_else(|| {
                let served: Vec<&str> = self.models.iter().map(|m| m.sha256.get(..12).unwrap_or(&m.sha256)).collect();
                (ErrorKind::UnknownModel, format!("model {} is not served here; this worker serves {served:?} (SHA-256 prefixes)", sha.get(..12).unwrap_or(sha)))
            })?,
        };
        let points = &self.models[model].partition_points;
        let k = r.partition_branch as usize;
        let Some(pp) = points.get(k.wrapping_sub(1)) else {
            return Err((ErrorKind::UnknownBranch, format!("branch {k} does not exist; this model has branches 1..={}", points.len())));
        };
        let mut want: Vec<u32> = vec![1];
        want.extend(pp.activation_shape.iter().map(|&d| d as u32));
        if r.shape != want || r.activation.len() != want.iter().map(|&d| d as usize).product::<usize>() {
            return Err((ErrorKind::InvalidRequest, format!("activation shape {:?} ({} values), branch {k} needs {want:?}", r.shape, r.activation.len())));
        }
        Ok(Lane { model, branch: r.partition_branch })
    }

    fn flush(&mut self, lane: Lane, ctx: &mut Context<Self>) {
        *self.generation.entry(lane).or_default() += 1;
        if self.pending.get(&lane).is_none_or(Vec::is_empty) {
            return;
        }
        if self.batches_in_flight >= self.max_batches_in_flight {
            // Ready, but every compute thread is busy: runs when one frees.
            self.deferred.insert(lane);
            self.ready_since.entry(lane).or_insert_with(Instant::now);
            return;
        }
        let ready = self.ready_since.remove(&lane);
        // Deadlines count from when the batch will start: now, or when the
        // batch ahead of it at the pool is expected to finish.
        let (slot, now) = self.next_start(Instant::now());
        let estimate = self.batch_time.get(&lane).cloned().unwrap_or_default();
        let queue = self.pending.get_mut(&lane).expect("checked above");
        // Earliest deadline first, offloads ahead of audits; an offload that
        // cannot finish even alone is answered now, not computed late.
        queue.sort_by_key(|j| (j.is_audit(), j.due()));
        let (hopeless, rest): (Vec<Job>, Vec<Job>) = std::mem::take(queue).into_iter().partition(|j| now + estimate.estimate(1) > j.due());
        *queue = rest;
        // The batch that answers the most requests in time per second of
        // compute: under overload a full batch of those that can still make
        // it, rather than a small one shrunk to fit the most urgent.
        let dues: Vec<Instant> = queue.iter().map(Job::due).collect();
        let take = batch_to_run(&dues, self.cfg.max_batch, now, |n| estimate.estimate(n));
        let jobs: Vec<Job> = {
            let fits = |j: &Job| j.due() >= now + estimate.estimate(take.max(1));
            let mut chosen = Vec::with_capacity(take);
            let mut kept = Vec::with_capacity(queue.len());
            for j in std::mem::take(queue) {
                if chosen.len() < take && fits(&j) {
                    chosen.push(j);
                } else {
                    kept.push(j);
                }
            }
            *queue = kept;
            chosen
        };
        for job in hopeless {
            let reply =
                self.error(Some(job.request.seq), ErrorKind::DeadlineExpired, format!("it cannot finish before its deadline (a batch takes about {:?})", estimate.estimate(1)));
            job.reply.send(reply);
        }
        let queue = self.pending.get_mut(&lane).expect("still there");
        if !queue.is_empty() {
            // More arrived while the lane waited for a thread; they have
            // waited too, so they go next.
            self.deferred.insert(lane);
            self.ready_since.insert(lane, Instant::now());
        }
        let started = Instant::now();
        let ready = ready.unwrap_or(started);
        let mut live = Vec::with_capacity(jobs.len());
        let mut activations = Vec::new();
        for job in jobs {
            let budget = Duration::from_micros(job.request.deadline.budget_us);
            if started.duration_since(job.received) >= budget {
                let reply = self.error(Some(job.request.seq), ErrorKind::DeadlineExpired, "the deadline passed while the request waited".into());
                job.reply.send(reply);
                continue;
            }
            // Decoding f16 or int8 here, on the batch's way to compute.
            let before = activations.len();
            if let Err(e) = job.request.activation.append_to(&mut activations) {
                activations.truncate(before);
                let reply = self.error(Some(job.request.seq), ErrorKind::InvalidRequest, format!("activation: {e}"));
                job.reply.send(reply);
                continue;
            }
            live.push(job);
        }
        if live.is_empty() {
            // Nothing left to compute: the thread is still free.
            self.resume(ctx);
            return;
        }
        let n = live.len();
        self.stats.batches += 1;
        self.stats.mean_batch_size += (n as f64 - self.stats.mean_batch_size) / self.stats.batches as f64;
        for job in &live {
            let q = started.duration_since(job.received).as_micros() as f64;
            self.stats.queue_delay_us_ewma = 0.9 * self.stats.queue_delay_us_ewma + 0.1 * q;
        }
        let run = RunTail { model: lane.model, partition_branch: lane.branch as usize, batch: n, activations };
        self.in_flight += n;
        self.batches_in_flight += 1;
        let took = estimate.estimate(n);
        if let (Some(t), Some(w)) = (self.free_at.get_mut(slot), self.slot_work.get_mut(slot)) {
            *t = now + took;
            w.push_back(took);
        }
        self.executor
            .run_tails(run)
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.in_flight -= n;
                act.batches_in_flight -= 1;
                // Done: that thread is free now, but for what was handed
                // to it after this batch.
                if let (Some(t), Some(w)) = (act.free_at.get_mut(slot), act.slot_work.get_mut(slot)) {
                    w.pop_front();
                    *t = Instant::now() + w.iter().sum::<Duration>();
                }
                act.resume(ctx);
                match result {
                    Ok(out) => {
                        act.batch_time.entry(lane).or_default().observe(n, out.compute);
                        // Waiting for a thread: deferred here, then queued at the pool.
                        let waited = (started.elapsed().saturating_sub(out.compute) + started.duration_since(ready)).as_micros() as f64;
                        act.stats.answered += n as u64;
                        act.stats.compute_wait_us_total += waited * n as f64;
                        for (job, (class, confidence)) in live.into_iter().zip(out.answers) {
                            let timings = WorkerTimings {
                                queue_us: started.duration_since(job.received).as_micros() as u64,
                                compute_us: out.compute.as_micros() as u64,
                                batch_size: n as u32,
                            };
                            if let (Some(tag), Some(client)) = (&job.request.audit, &act.audit_sink) {
                                let result = tag.result(&job.request.device_id, job.request.partition_branch, class);
                                if let Ok(bytes) = encode(&result) {
                                    let client = client.clone();
                                    // Best effort: a lost audit result costs the
                                    // calibrator one sample, nothing else.
                                    actix::spawn(async move {
                                        let _ = client.publish(subjects::CALIBRATION_AUDIT, bytes.into()).await;
                                    });
                                }
                            }
                            let answer = OffloadAnswer { seq: job.request.seq, worker_id: act.cfg.worker_id.clone(), class, confidence, timings };
                            job.reply.send(OffloadReply::Answer(answer));
                        }
                    }
                    Err(e) => {
                        for job in live {
                            let reply = act.error(Some(job.request.seq), ErrorKind::Internal, e.to_string());
                            job.reply.send(reply);
                        }
                    }
                }
            })
            .spawn(ctx);
    }
}

impl Batcher {
    /// Why an offload is refused at once, if it is: the worker holds
    /// `max_queue` requests already, or the offloads due before it make a
    /// queue it cannot get through before its own deadline (a device told
    /// now falls back at once, instead of at its deadline).
    fn refuse_offload(&self, job: &Job, lane: Lane, backlog: usize) -> Option<String> {
        if backlog >= self.max_queue {
            return Some(format!("the worker holds {backlog} requests already (at most {})", self.max_queue));
        }
        let estimate = self.batch_time.get(&lane)?;
        let due = job.due();
        // Waiting here, due before it: full batches ahead of its own, after
        // what the pool holds already.
        let ahead: usize = self.pending.values().flatten().filter(|j| !j.is_audit() && j.due() <= due).count();
        // Full batches of those ahead, then its own with the rest, shared
        // by the compute threads.
        let max_batch = self.cfg.max_batch.max(1);
        let work = estimate.estimate(max_batch) * (ahead / max_batch) as u32 + estimate.estimate(ahead % max_batch + 1);
        let now = Instant::now();
        // `next_start` counts the batches handed to the pool already.
        let (_, start) = self.next_start(now);
        let finish = start + work / self.compute_threads as u32;
        (finish > due).then(|| format!("{ahead} requests are due before it: it would finish about {:?} from now, after its deadline", finish - now))
    }
}

impl Actor for Batcher {
    type Context = Context<Self>;
}

impl Handler<Job> for Batcher {
    type Result = ();

    fn handle(&mut self, job: Job, ctx: &mut Context<Self>) {
        self.stats.requests += 1;
        let now_unix_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let lane = match self.check(&job.request, now_unix_us) {
            Ok(lane) => lane,
            Err((kind, detail)) => {
                let reply = self.error(Some(job.request.seq), kind, detail);
                job.reply.send(reply);
                return;
            }
        };
        let is_audit = job.is_audit();
        let backlog = self.backlog();
        if !is_audit {
            if let Some(why) = self.refuse_offload(&job, lane, backlog) {
                let reply = self.error(Some(job.request.seq), ErrorKind::Overloaded, why);
                job.reply.send(reply);
                return;
            }
        }
        let flags: Vec<bool> = self.pending.get(&lane).map_or(Vec::new(), |q| q.iter().map(|j| j.request.audit.as_ref().is_some_and(|t| t.on_device)).collect());
        let Some(at) = admit(&flags, is_audit, backlog, self.cfg.max_batch) else {
            self.stats.audits_shed += 1;
            let reply = self.error(Some(job.request.seq), ErrorKind::Overloaded, "an audit, shed: the worker is busy with offloads".into());
            job.reply.send(reply);
            return;
        };
        let queue = self.pending.entry(lane).or_default();
        queue.insert(at, job);
        let len = queue.len();
        if len >= self.cfg.max_batch {
            self.flush(lane, ctx);
        } else if len == 1 {
            let generation = *self.generation.entry(lane).or_default();
            ctx.run_later(self.cfg.max_wait, move |act, ctx| {
                if act.generation.get(&lane) == Some(&generation) {
                    act.flush(lane, ctx);
                }
            });
        }
    }
}

#[derive(Message)]
#[rtype(result = "WorkerStats")]
pub struct GetWorkerStats;

impl Handler<GetWorkerStats> for Batcher {
    type Result = MessageResult<GetWorkerStats>;

    fn handle(&mut self, _: GetWorkerStats, _: &mut Context<Self>) -> Self::Result {
        let mut s = self.stats;
        s.queue_depth = self.backlog();
        MessageResult(s)
    }
}

/// Publishes the worker's `WorkerStatus` on `branchpoint.worker.status`
/// every `every`, for the autoscaler and the control plane, until the
/// batcher stops. Interval figures are differences of the batcher's
/// cumulative counters between two statuses.
pub async fn publish_status(client: async_nats::Client, batcher: Addr<Batcher>, worker_id: String, every: Duration) {
    use branchpoint_messages::WorkerStatus;
    let mut tick = tokio::time::interval(every);
    let mut last = WorkerStats::default();
    loop {
        tick.tick().await;
        let Ok(s) = batcher.send(GetWorkerStats).await else { return };
        let answered = s.answered - last.answered;
        let batches = s.batches - last.batches;
        // Requests batched since the last status: the mean batch size times
        // the batch count, before and after.
        let batched = s.mean_batch_size * s.batches as f64 - last.mean_batch_size * last.batches as f64;
        let status = WorkerStatus {
            worker_id: worker_id.clone(),
            queue_depth: s.queue_depth as u32,
            batches_served: s.batches,
            mean_batch_size: s.mean_batch_size,
            queue_delay_us_ewma: s.queue_delay_us_ewma,
            at_unix_us: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64),
            requests: s.requests,
            errors: s.errors,
            queue_delay_us_interval: if answered > 0 { (s.compute_wait_us_total - last.compute_wait_us_total) / answered as f64 } else { 0.0 },
            batch_size_interval: if batches > 0 { (batched / batches as f64).max(0.0) } else { 0.0 },
        };
        last = s;
        match encode(&status) {
            Ok(bytes) => {
                if let Err(e) = client.publish(subjects::WORKER_STATUS, bytes.into()).await {
                    tracing::warn!("worker {worker_id}: could not publish its status: {e}");
                }
            }
            Err(e) => tracing::warn!("worker {worker_id}: could not encode its status: {e}"),
        }
    }
}

/// Name of the NATS service the workers register (`$SRV.PING.branchpoint-worker`).
pub const SERVICE_NAME: &str = "branchpoint-worker";

/// Serves offload requests from NATS until the subscription ends: the
/// service API endpoint subscribes to every branch's offload subject in the
/// workers' queue group, so each request goes to one worker of the pool.
/// `on_ready` runs once the endpoint is subscribed, i.e. once requests can
/// reach this worker.
pub async fn serve_nats(client: async_nats::Client, batcher: Addr<Batcher>, worker_id: String, on_ready: impl FnOnce()) -> Result<(), ActorError> {
    use async_nats::service::ServiceExt;
    let nats = |e: async_nats::Error| ActorError::Nats(e.to_string());
    let service = client
        .service_builder()
        .description("branchpoint cloud worker: runs the tails of offloaded inputs")
        .queue_group(subjects::WORKER_QUEUE_GROUP)
        .metadata(HashMap::from([("worker_id".to_string(), worker_id.clone())]))
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(nats)?;
    let mut endpoint = service.endpoint_builder().name("offload").add(subjects::OFFLOAD_ALL).await.map_err(nats)?;
    // Make sure the server has the subscription before saying we are ready.
    client.flush().await.map_err(|e| ActorError::Nats(e.to_string()))?;
    on_ready();
    while let Some(request) = endpoint.next().await {
        let received = Instant::now();
        let reply_to = |request| ReplyTo::Nats(Box::new(NatsReply { request, client: client.clone(), worker_id: worker_id.clone() }));
        let refuse = |request, seq, kind, detail: String| reply_to(request).send(OffloadReply::Error(ErrorReply { seq, worker_id: worker_id.clone(), kind, detail }));
        match decode::<OffloadRequest>(&request.message.payload) {
            Ok(offload) => {
                // The subject names the branch, and so must the body: a
                // request for one branch is never run as another's.
                let on = request.message.subject.as_str().rsplit('.').next().unwrap_or("");
                if on != offload.partition_branch.to_string() {
                    let detail =
                        format!("sent on {} but for branch {}; send it on {}", request.message.subject, offload.partition_branch, subjects::offload(offload.partition_branch));
                    refuse(request, Some(offload.seq), ErrorKind::InvalidRequest, detail);
                    continue;
                }
                // The edge: from here on the activation is f32 values.
                let (seq, offload) = (offload.seq, Offload::from_wire(offload));
                let offload = match offload {
                    Ok(o) => o,
                    Err(e) => {
                        refuse(request, Some(seq), ErrorKind::InvalidRequest, e.to_string());
                        continue;
                    }
                };
                if batcher.send(Job { request: offload, received, reply: reply_to(request) }).await.is_err() {
                    break; // the batcher stopped: so does this worker
                }
            }
            Err(e) => {
                let kind = match e {
                    MessageError::VersionMismatch { .. } => ErrorKind::UnsupportedVersion,
                    _ => ErrorKind::InvalidRequest,
                };
                // The seq, if the body got that far: the device can tell
                // which request was refused.
                let seq = branchpoint_messages::decode_seq(&request.message.payload);
                refuse(request, seq, kind, e.to_string());
            }
        }
    }
    Ok(())
}

/// The batcher on its own: a fake tail runner stands in for the compute
/// pool, and tokio's time is paused, so `max_wait` passes without waiting.
#[cfg(test)]
mod batcher_tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use branchpoint_messages::{Deadline, OffloadReply};

    use super::*;

    /// Answers every batch at once with class 7, and records its size.
    #[derive(Clone, Default)]
    struct FakeTails(Rc<RefCell<Vec<usize>>>);

    impl RunTails for FakeTails {
        fn run_tails(&self, run: RunTail) -> LocalBoxFuture<'static, Result<TailOutput, ActorError>> {
            self.0.borrow_mut().push(run.batch);
            let answers = vec![(7, 0.9); run.batch];
            Box::pin(async move { Ok(TailOutput { answers, compute: Duration::from_millis(1) }) })
        }
    }

    fn batcher(tails: FakeTails) -> Addr<Batcher> {
        let cfg = WorkerConfig { worker_id: "w".into(), max_batch: 4, max_wait: Duration::from_millis(10) };
        let points = vec![PartitionPoint { branch: 1, activation_shape: vec![2], activation_bytes: 8 }];
        Batcher::new(cfg, tails, vec![ServedModel { sha256: "ab".repeat(32), partition_points: points }]).start()
    }

    fn job(seq: u64, shape: &[u32], budget_ms: u64) -> (Job, tokio::sync::oneshot::Receiver<OffloadReply>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let request = Offload {
            device_id: "d".into(),
            seq,
            partition_branch: 1,
            shape: shape.to_vec(),
            activation: crate::offload::Activation::F32(vec![0.5; shape.iter().product::<u32>() as usize].into()),
            deadline: Deadline { sent_at_unix_us: 0, budget_us: budget_ms * 1000 },
            audit: None,
            model_sha256: None,
        };
        (Job { request, received: Instant::now(), reply: ReplyTo::Local(tx) }, rx)
    }

    fn answered(reply: OffloadReply, seq: u64) {
        match reply {
            OffloadReply::Answer(a) => assert_eq!((a.seq, a.class), (seq, 7)),
            OffloadReply::Error(e) => panic!("request {seq}: {e:?}"),
        }
    }

    /// `max_batch` requests flush at once, as one batch; fewer wait
    /// `max_wait` for company and then run as they are.
    #[test]
    fn a_full_batch_runs_at_once_and_a_partial_one_after_max_wait() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let tails = FakeTails::default();
            let b = batcher(tails.clone());
            let start = tokio::time::Instant::now();
            let mut replies = Vec::new();
            for seq in 0..4 {
                let (j, rx) = job(seq, &[1, 2], 5_000);
                b.send(j).await.unwrap();
                replies.push(rx);
            }
            for (seq, rx) in replies.into_iter().enumerate() {
                answered(rx.await.unwrap(), seq as u64);
            }
            assert_eq!(*tails.0.borrow(), vec![4], "one full batch");
            assert!(start.elapsed() < Duration::from_millis(10), "without waiting for max_wait: {:?}", start.elapsed());

            let start = tokio::time::Instant::now();
            let (j, rx) = job(9, &[1, 2], 5_000);
            b.send(j).await.unwrap();
            answered(rx.await.unwrap(), 9);
            assert!(start.elapsed() >= Duration::from_millis(10), "a lone request waits max_wait: {:?}", start.elapsed());
            assert_eq!(*tails.0.borrow(), vec![4, 1]);
        });
    }

    /// Bad requests get a typed error at once and never reach the tails.
    #[test]
    fn a_request_of_the_wrong_shape_or_branch_is_refused_without_computing() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let tails = FakeTails::default();
            let b = batcher(tails.clone());
            let (j, rx) = job(1, &[1, 3], 5_000);
            b.send(j).await.unwrap();
            match rx.await.unwrap() {
                OffloadReply::Error(e) => assert_eq!((e.seq, e.kind), (Some(1), ErrorKind::InvalidRequest), "{e:?}"),
                other => panic!("{other:?}"),
            }
            let (mut j, rx) = job(2, &[1, 2], 5_000);
            j.request.partition_branch = 2;
            b.send(j).await.unwrap();
            match rx.await.unwrap() {
                OffloadReply::Error(e) => assert_eq!((e.seq, e.kind), (Some(2), ErrorKind::UnknownBranch), "{e:?}"),
                other => panic!("{other:?}"),
            }
            let stats = b.send(GetWorkerStats).await.unwrap();
            assert_eq!((stats.requests, stats.errors, stats.batches), (2, 2, 0));
            assert!(tails.0.borrow().is_empty());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{admit, batch_to_run, BatchTime};
    use std::time::{Duration, Instant};

    #[test]
    fn batch_times_follow_the_batches_seen() {
        let mut t = BatchTime::default();
        assert_eq!(t.estimate(32), Duration::ZERO, "nothing refused on a guess");
        // 2 ms + 0.5 ms per input.
        for n in [1, 4, 8, 16, 32, 8, 1] {
            t.observe(n, Duration::from_micros(2000 + 500 * n as u64));
        }
        for n in [1, 10, 32] {
            let want = 2000.0 + 500.0 * n as f64;
            assert!((t.estimate(n).as_micros() as f64 - want).abs() < 2.0, "{n}: {:?}", t.estimate(n));
        }
        // A long run of small batches (light load) does not make it forget
        // what a full one takes.
        for _ in 0..500 {
            t.observe(2, Duration::from_micros(3000));
        }
        assert!((t.estimate(32).as_micros() as f64 - 18_000.0).abs() < 1_000.0, "{:?}", t.estimate(32));
        // Only small batches seen: beyond them, no steeper than proportional.
        let mut small = BatchTime::default();
        small.observe(1, Duration::from_millis(30));
        small.observe(2, Duration::from_millis(70));
        assert!(small.estimate(32) <= Duration::from_millis(70 * 16), "{:?}", small.estimate(32));
    }

    #[test]
    fn under_overload_a_full_batch_of_what_can_still_make_it() {
        let now = Instant::now();
        let ms = |m: u64| now + Duration::from_millis(m);
        // A batch of n takes 10 + n ms.
        let time = |n: usize| Duration::from_millis(10 + n as u64);
        // Plenty of slack: everything, up to max_batch.
        let relaxed: Vec<Instant> = (0..50).map(|i| ms(1000 + i)).collect();
        assert_eq!(batch_to_run(&relaxed, 32, now, time), 32);
        // Two urgent ones (due in 15 ms) and 40 with room: a full batch of
        // those that make it beats a batch of 2 shrunk to fit the urgent.
        let mut mixed = vec![ms(15), ms(15)];
        mixed.extend((0..40).map(|i| ms(500 + i)));
        assert_eq!(batch_to_run(&mixed, 32, now, time), 32);
        // Only the urgent ones: a small batch that saves them.
        assert_eq!(batch_to_run(&[ms(15), ms(15)], 32, now, time), 2);
        assert_eq!(batch_to_run(&[ms(11)], 32, now, time), 1);
        assert_eq!(batch_to_run(&[], 32, now, time), 0);
    }

    #[test]
    fn audits_wait_behind_offloads_and_are_shed_first() {
        // An offload goes ahead of every queued audit, however many.
        assert_eq!(admit(&[false, false, true, true], false, 4, 32), Some(2));
        assert_eq!(admit(&[true; 100], false, 1000, 32), Some(0), "a burst of audits cannot delay an offload, let alone refuse it");
        assert_eq!(admit(&[false, false], false, 1000, 32), Some(2), "offloads are never shed here");
        // An audit goes last, while the worker has room.
        assert_eq!(admit(&[false, true], true, 2, 32), Some(2));
        assert_eq!(admit(&[], true, 31, 32), Some(0));
        assert_eq!(admit(&[], true, 32, 32), None, "shed at the limit");
    }
}
