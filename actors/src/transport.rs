//! The device's side of offloading: send one request, wait for its answer
//! until the deadline, and say exactly what happened otherwise.
//!
//! In-process (the embedded default) the request goes straight to a
//! worker's batcher, without encoding. Over NATS it is encoded with the wire
//! codec and sent as a request to `branchpoint.offload.<branch>`, where the
//! workers' queue group picks one worker.
use std::time::{Duration, Instant};

use actix::Addr;
use branchpoint_messages::{decode, encode, subjects, ErrorReply, OffloadAnswer, OffloadReply, OffloadRequest};

use crate::worker::{Batcher, Job, ReplyTo};

#[derive(Clone)]
pub enum OffloadLink {
    InProcess(Addr<Batcher>),
    Nats(async_nats::Client),
}

/// Why an offload did not produce an answer.
#[derive(Debug, Clone, PartialEq)]
pub enum OffloadFailure {
    /// No answer before the deadline.
    Deadline,
    /// No worker is subscribed (NATS said so at once).
    NoResponders,
    /// A worker answered with a typed error.
    ErrorReply(ErrorReply),
    /// The request could not be sent, or the reply could not be read.
    Transport(String),
}

impl OffloadLink {
    /// Offloads `request` and waits at most `timeout` for the answer.
    pub async fn offload(&self, request: OffloadRequest, timeout: Duration) -> Result<OffloadAnswer, OffloadFailure> {
        let reply = match self {
            OffloadLink::InProcess(batcher) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let job = Job { request, received: Instant::now(), reply: ReplyTo::Local(tx) };
                let exchange = async move {
                    batcher.send(job).await.map_err(|e| OffloadFailure::Transport(e.to_string()))?;
                    rx.await.map_err(|_| OffloadFailure::Transport("the worker dropped the request".into()))
                };
                match tokio::time::timeout(timeout, exchange).await {
                    Ok(r) => r?,
                    Err(_) => return Err(OffloadFailure::Deadline),
                }
            }
            OffloadLink::Nats(client) => {
                let subject = subjects::offload(request.partition_branch);
                let payload = encode(&request).map_err(|e| OffloadFailure::Transport(e.to_string()))?;
                let req = async_nats::Request::new().payload(payload.into()).timeout(Some(timeout));
                match client.send_request(subject, req).await {
                    Ok(msg) => decode::<OffloadReply>(&msg.payload)
                        .map_err(|e| OffloadFailure::Transport(format!("unreadable reply: {e}")))?,
                    Err(e) => {
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
        match reply {
            OffloadReply::Answer(a) => Ok(a),
            OffloadReply::Error(e) => Err(OffloadFailure::ErrorReply(e)),
        }
    }
}
