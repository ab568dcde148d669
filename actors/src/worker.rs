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
use branchpoint_messages::{
    decode, encode, subjects, ErrorKind, ErrorReply, MessageError, OffloadAnswer, OffloadReply, OffloadRequest, WorkerTimings,
};
use branchpoint_models::net::PartitionPoint;
use futures::StreamExt;

use crate::compute::{Executor, RunTail, TensorPool};
use crate::error::ActorError;

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
    /// Over NATS: to the request's reply inbox.
    Nats(NatsReply),
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
        ErrorKind::InvalidRequest | ErrorKind::UnsupportedVersion | ErrorKind::UnknownBranch => 400,
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
            ReplyTo::Nats(NatsReply { mut request, client, worker_id }) => {
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

/// One offload request waiting for its answer.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Job {
    pub request: OffloadRequest,
    pub received: Instant,
    pub reply: ReplyTo,
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

pub struct Batcher {
    cfg: WorkerConfig,
    /// Over NATS: where audit results go (`branchpoint.calibration.audit`).
    audit_sink: Option<async_nats::Client>,
    executor: TensorPool<Executor>,
    partition_points: Vec<PartitionPoint>,
    pending: HashMap<u8, Vec<Job>>,
    /// Bumped at every flush, so a stale max_wait timer flushes nothing.
    generation: HashMap<u8, u64>,
    stats: WorkerStats,
    /// Requests in batches handed to the compute pool and not yet answered.
    in_flight: usize,
    /// Batches handed to the compute pool and not yet answered, and how
    /// many may be: one per compute thread, plus one. Beyond that, requests wait here,
    /// where an expired one is answered at once instead of being computed,
    /// and where waiting requests join bigger batches.
    batches_in_flight: usize,
    max_batches_in_flight: usize,
    /// Branches with requests ready to run, waiting for a compute thread,
    /// and since when: the queue delay starts there, not at arrival, because
    /// the batching window before it is chosen, not congestion.
    deferred: std::collections::BTreeSet<u8>,
    ready_since: HashMap<u8, Instant>,
}

impl Batcher {
    pub fn new(cfg: WorkerConfig, executor: TensorPool<Executor>, partition_points: Vec<PartitionPoint>) -> Self {
        Self {
            cfg,
            audit_sink: None,
            executor,
            partition_points,
            pending: HashMap::new(),
            generation: HashMap::new(),
            stats: WorkerStats::default(),
            in_flight: 0,
            batches_in_flight: 0,
            max_batches_in_flight: usize::MAX,
            deferred: Default::default(),
            ready_since: HashMap::new(),
        }
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
        self
    }

    /// Flushes deferred branches while compute threads are free.
    fn resume(&mut self, ctx: &mut Context<Self>) {
        while self.batches_in_flight < self.max_batches_in_flight {
            let Some(branch) = self.deferred.pop_first() else { return };
            self.flush(branch, ctx);
        }
    }

    fn error(&mut self, seq: Option<u64>, kind: ErrorKind, detail: String) -> OffloadReply {
        self.stats.errors += 1;
        OffloadReply::Error(ErrorReply { seq, worker_id: self.cfg.worker_id.clone(), kind, detail })
    }

    /// Checks what the message crate cannot: that the branch exists here and
    /// the activation has its shape, one input per request; and that it is
    /// not stale: a request whose budget ended more than `CLOCK_SKEW` ago by
    /// this worker's clock was held up on the way (a client buffering
    /// through a broker outage) and nobody waits for its answer.
    fn check(&self, r: &OffloadRequest, now_unix_us: u64) -> Result<(), (ErrorKind, String)> {
        let d = r.deadline;
        let ended = d.sent_at_unix_us.saturating_add(d.budget_us);
        if d.sent_at_unix_us != 0 && now_unix_us > ended.saturating_add(CLOCK_SKEW.as_micros() as u64) {
            let late = Duration::from_micros(now_unix_us - ended);
            return Err((ErrorKind::DeadlineExpired, format!("stale: its budget ended {late:?} before it arrived here (by this worker's clock)")));
        }
        let k = r.partition_branch as usize;
        let Some(pp) = self.partition_points.get(k.wrapping_sub(1)) else {
            return Err((ErrorKind::UnknownBranch, format!("branch {k} does not exist; this model has branches 1..={}", self.partition_points.len())));
        };
        let mut want: Vec<u32> = vec![1];
        want.extend(pp.activation_shape.iter().map(|&d| d as u32));
        if r.activation.shape != want {
            return Err((ErrorKind::InvalidRequest, format!("activation shape {:?}, branch {k} needs {want:?}", r.activation.shape)));
        }
        Ok(())
    }

    fn flush(&mut self, branch: u8, ctx: &mut Context<Self>) {
        *self.generation.entry(branch).or_default() += 1;
        if self.pending.get(&branch).is_none_or(Vec::is_empty) {
            return;
        }
        if self.batches_in_flight >= self.max_batches_in_flight {
            // Ready, but every compute thread is busy: runs when one frees.
            self.deferred.insert(branch);
            self.ready_since.entry(branch).or_insert_with(Instant::now);
            return;
        }
        let ready = self.ready_since.remove(&branch);
        let queue = self.pending.get_mut(&branch).expect("checked above");
        let take = queue.len().min(self.cfg.max_batch);
        let jobs: Vec<Job> = queue.drain(..take).collect();
        if !queue.is_empty() {
            // More arrived while the branch waited for a thread; they have
            // waited too, so they go next.
            self.deferred.insert(branch);
            self.ready_since.insert(branch, Instant::now());
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
            match job.request.activation.to_f32_vec() {
                Ok(v) => {
                    activations.extend(v);
                    live.push(job);
                }
                Err(e) => {
                    let reply = self.error(Some(job.request.seq), ErrorKind::InvalidRequest, e.to_string());
                    job.reply.send(reply);
                }
            }
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
        let run = RunTail { partition_branch: branch as usize, batch: n, activations };
        self.in_flight += n;
        self.batches_in_flight += 1;
        self.executor
            .run(move |e| e.run_tail(run))
            .into_actor(self)
            .map(move |result, act, ctx| {
                act.in_flight -= n;
                act.batches_in_flight -= 1;
                act.resume(ctx);
                let result = result.and_then(|r| r);
                match result {
                    Ok(out) => {
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

impl Actor for Batcher {
    type Context = Context<Self>;
}

impl Handler<Job> for Batcher {
    type Result = ();

    fn handle(&mut self, job: Job, ctx: &mut Context<Self>) {
        self.stats.requests += 1;
        let now_unix_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        if let Err((kind, detail)) = self.check(&job.request, now_unix_us) {
            let reply = self.error(Some(job.request.seq), kind, detail);
            job.reply.send(reply);
            return;
        }
        let branch = job.request.partition_branch;
        let is_audit = job.request.audit.as_ref().is_some_and(|t| t.on_device);
        let backlog = self.backlog();
        let flags: Vec<bool> = self.pending.get(&branch).map_or(Vec::new(), |q| q.iter().map(|j| j.request.audit.as_ref().is_some_and(|t| t.on_device)).collect());
        let Some(at) = admit(&flags, is_audit, backlog, self.cfg.max_batch) else {
            self.stats.audits_shed += 1;
            let reply = self.error(Some(job.request.seq), ErrorKind::Overloaded, "an audit, shed: the worker is busy with offloads".into());
            job.reply.send(reply);
            return;
        };
        let queue = self.pending.entry(branch).or_default();
        queue.insert(at, job);
        let len = queue.len();
        if len >= self.cfg.max_batch {
            self.flush(branch, ctx);
        } else if len == 1 {
            let generation = *self.generation.entry(branch).or_default();
            ctx.run_later(self.cfg.max_wait, move |act, ctx| {
                if act.generation.get(&branch) == Some(&generation) {
                    act.flush(branch, ctx);
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
                    eprintln!("worker {worker_id}: could not publish its status: {e}");
                }
            }
            Err(e) => eprintln!("worker {worker_id}: could not encode its status: {e}"),
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
pub async fn serve_nats(
    client: async_nats::Client,
    batcher: Addr<Batcher>,
    worker_id: String,
    on_ready: impl FnOnce(),
) -> Result<(), ActorError> {
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
        let reply_to = |request| ReplyTo::Nats(NatsReply { request, client: client.clone(), worker_id: worker_id.clone() });
        let refuse = |request, seq, kind, detail: String| reply_to(request).send(OffloadReply::Error(ErrorReply { seq, worker_id: worker_id.clone(), kind, detail }));
        match decode::<OffloadRequest>(&request.message.payload) {
            Ok(offload) => {
                // The subject names the branch, and so must the body: a
                // request for one branch is never run as another's.
                let on = request.message.subject.as_str().rsplit('.').next().unwrap_or("");
                if on != offload.partition_branch.to_string() {
                    let detail = format!("sent on {} but for branch {}; send it on {}", request.message.subject, offload.partition_branch, subjects::offload(offload.partition_branch));
                    refuse(request, Some(offload.seq), ErrorKind::InvalidRequest, detail);
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::admit;

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
