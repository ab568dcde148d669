//! Device: runs the head of the network up to its partition branch, decides
//! exit or offload with its calibrated confidence, and reports one outcome
//! per input to the collector.
//!
//! Owns: its partition branch, p_tar and temperatures (changed live by
//! `ApplyPlan` and `ApplyCalibration`), its sequence numbers, and a share of
//! its thread's copy of the network. Messages in: `Infer`, `ApplyPlan`,
//! `ApplyCalibration`. The head runs inline in the `Infer` handler, on the
//! device's own thread, like on a real device: an input that exits costs no
//! thread hop and no copy of its activation. An offloaded input waits for the
//! cloud in its own future, at most until its deadline, then the device
//! answers with its own branch and counts a fallback, so no input is ever
//! lost; the mailbox keeps taking new inputs meanwhile. Restart:
//! configuration comes from the plan and calibration sources; in-flight
//! inputs of a stopped device are lost with it.
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use branchpoint_messages::{Deadline, OffloadRequest};
use branchpoint_models::calibration::predict;

use crate::collector::{Collector, Decided, FallbackReason, InputAccepted, Latency, Outcome};
use crate::compute::{HeadOutput, LoadedNet};
use crate::transport::{OffloadFailure, OffloadLink};

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: String,
    pub partition_branch: usize,
    pub p_tar: f64,
    /// One per exit: branches in order, then final.
    pub temperatures: Vec<f64>,
    /// Budget of one input from arrival to answer.
    pub deadline: Duration,
}

pub struct Device {
    cfg: DeviceConfig,
    /// Shared by the devices of one thread; see `fleet::DeviceThreads`.
    net: Rc<LoadedNet>,
    link: OffloadLink,
    collector: Addr<Collector>,
    seq: u64,
}

impl Device {
    pub fn new(cfg: DeviceConfig, net: Rc<LoadedNet>, link: OffloadLink, collector: Addr<Collector>) -> Self {
        Self { cfg, net, link, collector, seq: 0 }
    }
}

impl Actor for Device {
    type Context = Context<Self>;
}

/// One input for the device to classify.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Infer {
    pub input_index: usize,
    pub input: Arc<[f32]>,
    pub label: i64,
}

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Handler<Infer> for Device {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Infer, _: &mut Context<Self>) -> Self::Result {
        let arrived = Instant::now();
        self.seq += 1;
        self.collector.do_send(InputAccepted);
        let cfg = &self.cfg;
        let branch = cfg.partition_branch;
        let mut outcome = Outcome {
            device_id: cfg.id.clone(),
            input_index: msg.input_index,
            label: msg.label,
            class: 0,
            decided: Decided::Device,
            exit: branch,
            partition_branch: branch,
            p_tar: cfg.p_tar,
            temperature: cfg.temperatures.get(branch - 1).copied().unwrap_or(1.0),
            fallback: None,
            worker_id: None,
            latency: Latency::default(),
            error: None,
        };
        let head = match self.net.run_head(branch, &msg.input) {
            Ok(h) => h,
            Err(e) => {
                self.collector.do_send(outcome.failed(e.to_string(), arrived));
                return Box::pin(std::future::ready(()));
            }
        };
        let (class, confidence) = predict(&head.branch_logits, outcome.temperature);
        outcome.class = class as u32;
        outcome.latency.device_compute_us = head.compute.as_micros() as u64;
        if confidence >= cfg.p_tar {
            outcome.latency.total_us = arrived.elapsed().as_micros() as u64;
            self.collector.do_send(outcome);
            return Box::pin(std::future::ready(()));
        }
        let request = offload_request(self.seq, cfg, &head, arrived);
        let (link, collector, deadline) = (self.link.clone(), self.collector.clone(), cfg.deadline);
        Box::pin(async move {
            let outcome = match request {
                Ok(request) => offload(outcome, request, &link, deadline, arrived).await,
                Err(e) => outcome.failed(format!("activation: {e}"), arrived),
            };
            collector.do_send(outcome);
        })
    }
}

/// The request for an input that did not exit: it carries what is left of
/// the input's budget.
fn offload_request(seq: u64, cfg: &DeviceConfig, head: &HeadOutput, arrived: Instant) -> Result<OffloadRequest, crate::ActorError> {
    let remaining = cfg.deadline.saturating_sub(arrived.elapsed());
    Ok(OffloadRequest {
        device_id: cfg.id.clone(),
        seq,
        partition_branch: cfg.partition_branch as u8,
        activation: head.wire_activation()?,
        deadline: Deadline { sent_at_unix_us: unix_us(), budget_us: remaining.as_micros().max(1) as u64 },
    })
}

async fn offload(mut outcome: Outcome, request: OffloadRequest, link: &OffloadLink, deadline: Duration, arrived: Instant) -> Outcome {
    let remaining = deadline.saturating_sub(arrived.elapsed());
    let sent = Instant::now();
    let result = if remaining.is_zero() { Err(OffloadFailure::Deadline) } else { link.offload(request, remaining).await };
    let round_trip = sent.elapsed().as_micros() as u64;
    match result {
        Ok(answer) => {
            outcome.decided = Decided::Cloud;
            outcome.exit = 0;
            outcome.class = answer.class;
            outcome.worker_id = Some(answer.worker_id);
            outcome.latency.queueing_us = answer.timings.queue_us;
            outcome.latency.cloud_compute_us = answer.timings.compute_us;
            outcome.latency.network_us = round_trip.saturating_sub(answer.timings.queue_us + answer.timings.compute_us);
        }
        Err(failure) => {
            // The branch's own answer stands: no input is lost.
            outcome.decided = Decided::Fallback;
            outcome.fallback = Some(match failure {
                OffloadFailure::Deadline => FallbackReason::Deadline,
                OffloadFailure::NoResponders => FallbackReason::NoResponders,
                OffloadFailure::ErrorReply(_) => FallbackReason::ErrorReply,
                OffloadFailure::Transport(_) => FallbackReason::Transport,
            });
            outcome.latency.network_us = round_trip;
        }
    }
    outcome.latency.total_us = arrived.elapsed().as_micros() as u64;
    outcome
}

impl Outcome {
    fn failed(mut self, error: String, arrived: Instant) -> Outcome {
        self.error = Some(error);
        self.latency.total_us = arrived.elapsed().as_micros() as u64;
        self
    }
}

/// New partition branch and p_tar, applied to inputs that arrive from now on.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ApplyPlan {
    pub partition_branch: usize,
    pub p_tar: f64,
}

impl Handler<ApplyPlan> for Device {
    type Result = ();

    fn handle(&mut self, msg: ApplyPlan, _: &mut Context<Self>) {
        // temperatures has one entry per exit: branches 1..len-1, then final.
        let branches = self.cfg.temperatures.len().saturating_sub(1);
        if msg.partition_branch == 0 || msg.partition_branch > branches || !(msg.p_tar > 0.0 && msg.p_tar < 1.0) {
            eprintln!("device {}: ignored plan {msg:?}: this model has branches 1..={branches}, p_tar must be in (0, 1)", self.cfg.id);
            return;
        }
        self.cfg.partition_branch = msg.partition_branch;
        self.cfg.p_tar = msg.p_tar;
    }
}

/// New temperatures, applied to inputs that arrive from now on.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ApplyCalibration {
    pub temperatures: Vec<f64>,
}

impl Handler<ApplyCalibration> for Device {
    type Result = ();

    fn handle(&mut self, msg: ApplyCalibration, _: &mut Context<Self>) {
        let n = self.cfg.temperatures.len();
        if msg.temperatures.len() != n || msg.temperatures.iter().any(|t| !(t.is_finite() && *t > 0.0)) {
            eprintln!("device {}: ignored calibration {:?}: need {n} positive temperatures", self.cfg.id, msg.temperatures);
            return;
        }
        self.cfg.temperatures = msg.temperatures;
    }
}
