//! The worker's NATS edge: offload requests in from the service endpoint
//! (`serve_nats`), decoded and checked into `Job`s for the `Batcher`; its
//! replies out to each request's inbox (`respond`), audit results out to
//! the calibrator (`NatsAudits`), and its load out (`publish_status`). The
//! batcher sees no NATS client.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_messages::{decode, encode, subjects, AuditResult, ErrorKind, ErrorReply, MessageError, OffloadReply, OffloadRequest};
use futures::StreamExt;

use super::{AuditSink, Batcher, GetWorkerStats, Job, ReplyTo, WorkerStats};
use crate::error::ActorError;
use crate::offload::Offload;

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

/// Sends `reply` to a NATS request: an error reply is also counted in the
/// service's `$SRV.STATS` (`num_errors`, `last_error`).
fn respond(mut request: async_nats::service::Request, client: async_nats::Client, worker_id: String, reply: OffloadReply) {
    let bytes = match encode(&reply) {
        Ok(b) => b,
        Err(e) => {
            let err = OffloadReply::Error(ErrorReply { seq: None, worker_id: worker_id.clone(), kind: ErrorKind::Internal, detail: format!("could not encode the reply: {e}") });
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

/// Audit results to the calibrator, on `branchpoint.calibration.audit`.
pub struct NatsAudits(pub async_nats::Client);

impl AuditSink for NatsAudits {
    fn send(&self, result: AuditResult) {
        if let Ok(bytes) = encode(&result) {
            let client = self.0.clone();
            actix::spawn(async move {
                let _ = client.publish(subjects::CALIBRATION_AUDIT, bytes.into()).await;
            });
        }
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
pub async fn serve_nats(
    client: async_nats::Client,
    batcher: Addr<Batcher>,
    worker_id: String,
    on_ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
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
    tokio::pin!(shutdown);
    loop {
        // A request being handed over is handed over: shutdown is seen only
        // between requests, and ends the subscription with the endpoint.
        let request = tokio::select! {
            _ = &mut shutdown => break,
            next = endpoint.next() => match next {
                Some(r) => r,
                None => break,
            },
        };
        let received = Instant::now();
        let reply_to = |request| {
            let (client, worker_id) = (client.clone(), worker_id.clone());
            ReplyTo::Remote(Box::new(move |reply| respond(request, client, worker_id, reply)))
        };
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
