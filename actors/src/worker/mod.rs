//! Cloud worker: receives offload requests (over NATS or in-process),
//! batches those that arrive close together, runs one batched tail forward
//! per batch on the compute pool, and answers each request.
//!
//! Owns: the batching policy's state (`branchpoint_core::batching::
//! WorkerQueue`, the same code the virtual-time replay runs): the waiting
//! requests per lane (model and partition branch: only those share a
//! batch's shape), the compute slots, the learned batch times. This actor
//! only carries its decisions out on the wall clock: it arms the max_wait
//! timers, replies to what the policy refuses or expires, decodes a batch
//! into one buffer and hands it to the compute pool. Messages in: `Job`,
//! `GetWorkerStats`.
//! Mailbox: bounded (actix default); the NATS loop awaits `send`, so a busy
//! worker stops pulling from its subscription and NATS's queue group hands
//! new requests to other members. Bad requests get a typed error reply and
//! the worker keeps serving. Restart: state is only in-flight batches; a
//! restarted worker starts empty and devices fall back for what was lost.
//! Shutdown: dropping the service unsubscribes; in-flight requests time out
//! at the devices, which fall back to their own answers.
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_core::batching::{Finish, Flush, Lane, Offered, QueueConfig, Ticket, Waiting, WorkerQueue};
use branchpoint_messages::{AuditResult, ErrorKind, ErrorReply, OffloadAnswer, OffloadReply, WorkerTimings};
use branchpoint_models::net::PartitionPoint;
use futures::future::LocalBoxFuture;

use crate::compute::{Executor, RunTail, TailOutput, TensorPool};
use crate::error::ActorError;
use crate::offload::Offload;

pub mod nats;

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
    /// Through a transport's edge (over NATS: `nats::respond`, to the
    /// request's reply inbox).
    Remote(Box<dyn FnOnce(OffloadReply) + Send>),
}

impl ReplyTo {
    fn send(self, reply: OffloadReply) {
        match self {
            // The device may have given up (deadline): nobody to tell.
            ReplyTo::Local(tx) => drop(tx.send(reply)),
            ReplyTo::Remote(respond) => respond(reply),
        }
    }
}

/// Where the final exit's answers to tagged requests (audits and watched
/// offloads) go: over NATS, the calibrator's audit subject
/// (`nats::NatsAudits`). Best effort: a lost result costs the calibrator
/// one sample.
pub trait AuditSink: 'static {
    fn send(&self, result: AuditResult);
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
    fn is_audit(&self) -> bool {
        self.request.audit.as_ref().is_some_and(|t| t.on_device)
    }
}

/// The worker's counters: the batching policy's (`core::batching`).
pub use branchpoint_core::batching::QueueStats as WorkerStats;

/// A model the worker serves: its SHA-256 (`Model::sha256`, what requests
/// name it by) and what crosses each of its partition points.
#[derive(Debug, Clone)]
pub struct ServedModel {
    pub model_sha256: String,
    pub partition_points: Vec<PartitionPoint>,
}

/// The batching policy's decisions (`core::batching::WorkerQueue`), carried
/// out on the wall clock: this actor arms its timers, hands its batches to
/// the compute pool and sends its replies.
pub struct Batcher {
    cfg: WorkerConfig,
    /// Where audit results go (over NATS: `branchpoint.calibration.audit`).
    audit_sink: Option<Box<dyn AuditSink>>,
    executor: Box<dyn RunTails>,
    /// The models served, in the executor's order; a request that names
    /// none goes to the first.
    models: Vec<ServedModel>,
    queue: WorkerQueue<Job>,
    /// Time 0 of the policy's microseconds.
    epoch: Instant,
}

impl Batcher {
    /// A batcher for `models` (at least one), whose tails `executor` runs
    /// (`RunTail::model` indexes `models`).
    pub fn new(cfg: WorkerConfig, executor: impl RunTails, models: Vec<ServedModel>) -> Self {
        assert!(!models.is_empty(), "a worker serves at least one model");
        let queue = WorkerQueue::new(QueueConfig::new(cfg.max_batch, cfg.max_wait.as_micros() as u64, 1));
        Self { cfg, audit_sink: None, executor: Box::new(executor), models, queue, epoch: Instant::now() }
    }

    fn reconfigure(mut self, f: impl FnOnce(&mut QueueConfig)) -> Self {
        let mut qc = *self.queue.config();
        f(&mut qc);
        self.queue = WorkerQueue::new(qc);
        self
    }

    /// Holds at most `n` requests (waiting and computing) [default: 16
    /// batches].
    pub fn with_max_queue(self, n: usize) -> Self {
        self.reconfigure(|c| c.max_queue = n.max(1))
    }

    /// Runs batches on a compute pool of `threads` threads (at most one
    /// batch per thread plus one waiting behind them are handed to it).
    pub fn with_compute_threads(self, threads: usize) -> Self {
        self.reconfigure(|c| c.compute_threads = threads.max(1))
    }

    /// Sends the final exit's answer to every tagged request (audits and
    /// watched offloads) to `sink`.
    pub fn with_audit_sink(mut self, sink: impl AuditSink) -> Self {
        self.audit_sink = Some(Box::new(sink));
        self
    }

    /// Now, in the policy's microseconds.
    fn now_us(&self) -> u64 {
        self.us(Instant::now())
    }

    fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn error(&self, seq: Option<u64>, kind: ErrorKind, detail: String) -> OffloadReply {
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
            Some(sha) => self.models.iter().position(|m| m.model_sha256 == **sha).ok_or_else(|| {
                let served: Vec<&str> = self.models.iter().map(|m| m.model_sha256.get(..12).unwrap_or(&m.model_sha256)).collect();
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

    /// Hands every batch the policy has ready to the compute pool, while it
    /// has room for them.
    fn run_ready(&mut self, ctx: &mut Context<Self>) {
        while let Some(next) = self.queue.next_batch(self.now_us()) {
            for w in next.expired {
                let detail = format!("it cannot finish before its deadline (a batch takes about {:.1} ms)", next.one_us as f64 / 1e3);
                let reply = self.error(Some(w.item.request.seq), ErrorKind::DeadlineExpired, detail);
                w.item.reply.send(reply);
            }
            let Some(mut ticket) = next.ticket else { continue };
            // Decoding f16 or int8 here, on the batch's way to compute.
            let mut live = Vec::with_capacity(next.batch.len());
            let mut activations = Vec::new();
            for w in next.batch {
                let job = w.item;
                let before = activations.len();
                if let Err(e) = job.request.activation.append_to(&mut activations) {
                    activations.truncate(before);
                    self.queue.count_error();
                    let reply = self.error(Some(job.request.seq), ErrorKind::InvalidRequest, format!("activation: {e}"));
                    job.reply.send(reply);
                    continue;
                }
                live.push(job);
            }
            self.queue.shrink(&mut ticket, live.len());
            if live.is_empty() {
                // Nothing left to compute: the slot is free again.
                self.queue.finished(self.now_us(), ticket, Finish::Failed);
                continue;
            }
            self.start(ticket, live, activations, ctx);
        }
    }

    fn start(&mut self, ticket: Ticket, live: Vec<Job>, activations: Vec<f32>, ctx: &mut Context<Self>) {
        let (lane, n) = (ticket.lane, live.len());
        let started = Instant::now();
        let run = RunTail { model: lane.model, partition_branch: lane.branch as usize, batch: n, activations };
        self.executor
            .run_tails(run)
            .into_actor(self)
            .map(move |result, act, ctx| {
                let now = act.now_us();
                match result {
                    Ok(out) => {
                        act.queue.finished(now, ticket, Finish::Ran { took_us: out.compute.as_micros() as u64 });
                        act.run_ready(ctx);
                        for (job, (class, confidence)) in live.into_iter().zip(out.answers) {
                            let timings = WorkerTimings {
                                queue_us: started.duration_since(job.received).as_micros() as u64,
                                compute_us: out.compute.as_micros() as u64,
                                batch_size: n as u32,
                            };
                            act.send_audit(&job, class);
                            let answer = OffloadAnswer { seq: job.request.seq, worker_id: act.cfg.worker_id.clone(), class, confidence, timings };
                            job.reply.send(OffloadReply::Answer(answer));
                        }
                    }
                    Err(e) => {
                        act.queue.finished(now, ticket, Finish::Failed);
                        act.run_ready(ctx);
                        for job in live {
                            let reply = act.error(Some(job.request.seq), ErrorKind::Internal, e.to_string());
                            job.reply.send(reply);
                        }
                    }
                }
            })
            .spawn(ctx);
    }

    /// A tagged request's final-exit answer, to the audit sink.
    fn send_audit(&self, job: &Job, class: u32) {
        if let (Some(tag), Some(sink)) = (&job.request.audit, &self.audit_sink) {
            sink.send(tag.result(&job.request.device_id, job.request.partition_branch, class));
        }
    }
}

impl Actor for Batcher {
    type Context = Context<Self>;
}

impl Handler<Job> for Batcher {
    type Result = ();

    fn handle(&mut self, job: Job, ctx: &mut Context<Self>) {
        let now_unix_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        let lane = match self.check(&job.request, now_unix_us) {
            Ok(lane) => lane,
            Err((kind, detail)) => {
                self.queue.count_invalid();
                let reply = self.error(Some(job.request.seq), kind, detail);
                job.reply.send(reply);
                return;
            }
        };
        let received_us = self.us(job.received);
        let due_us = received_us + job.request.deadline.budget_us;
        let audit = job.is_audit();
        let now = self.now_us();
        match self.queue.offer(now, lane, Waiting { item: job, received_us, due_us, audit }) {
            Offered::Refused(w, why) => {
                let reply = self.error(Some(w.item.request.seq), ErrorKind::Overloaded, why.to_string());
                w.item.reply.send(reply);
            }
            Offered::Queued(Flush::Now) => {
                self.queue.flush(now, lane);
                self.run_ready(ctx);
            }
            Offered::Queued(Flush::At { at_us, generation }) => {
                ctx.run_later(Duration::from_micros(at_us.saturating_sub(now)), move |act, ctx| {
                    act.queue.timer_fired(act.now_us(), lane, generation);
                    act.run_ready(ctx);
                });
            }
            Offered::Queued(Flush::Armed) => {}
        }
    }
}

#[derive(Message)]
#[rtype(result = "WorkerStats")]
pub struct GetWorkerStats;

impl Handler<GetWorkerStats> for Batcher {
    type Result = MessageResult<GetWorkerStats>;

    fn handle(&mut self, _: GetWorkerStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.queue.stats())
    }
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
        Batcher::new(cfg, tails, vec![ServedModel { model_sha256: "ab".repeat(32), partition_points: points }]).start()
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
