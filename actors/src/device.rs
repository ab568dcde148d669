//! Device: runs the head of the network up to its partition branch, decides
//! exit or offload with its calibrated confidence, and reports one outcome
//! per input to the collector.
//!
//! Owns: its partition branch, p_tar and temperatures (changed live by
//! `ApplyPlan` and `ApplyCalibration`), its sequence numbers. Messages in:
//! `Infer`, `ApplyPlan`, `ApplyCalibration`. Tensor work goes to the shared
//! compute pool (sync actors); an input waits for the cloud at most until
//! its deadline, then the device answers with its own branch and counts a
//! fallback, so no input is ever lost. Each input is handled in its own
//! future: the mailbox keeps taking new inputs while others wait on the
//! network. Restart: configuration comes from the plan and calibration
//! sources; in-flight inputs of a stopped device are lost with it.
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use branchpoint_messages::{Deadline, OffloadRequest, Tensor as WireTensor};
use branchpoint_models::calibration::predict;

use crate::collector::{Collector, Decided, FallbackReason, InputAccepted, Latency, Outcome};
use crate::compute::{Executor, RunHead};
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
    executor: Addr<Executor>,
    link: OffloadLink,
    collector: Addr<Collector>,
    seq: u64,
}

impl Device {
    pub fn new(cfg: DeviceConfig, executor: Addr<Executor>, link: OffloadLink, collector: Addr<Collector>) -> Self {
        Self { cfg, executor, link, collector, seq: 0 }
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
        self.seq += 1;
        self.collector.do_send(InputAccepted);
        let seq = self.seq;
        let cfg = self.cfg.clone();
        let executor = self.executor.clone();
        let link = self.link.clone();
        let collector = self.collector.clone();
        Box::pin(async move {
            let outcome = decide(seq, &cfg, msg, &executor, &link).await;
            collector.do_send(outcome);
        })
    }
}

async fn decide(seq: u64, cfg: &DeviceConfig, msg: Infer, executor: &Addr<Executor>, link: &OffloadLink) -> Outcome {
    let arrived = Instant::now();
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
    let head = match executor.send(RunHead { partition_branch: branch, input: msg.input }).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return outcome.failed(e.to_string(), arrived),
        Err(e) => return outcome.failed(format!("compute pool: {e}"), arrived),
    };
    let (class, confidence) = predict(&head.branch_logits, outcome.temperature);
    outcome.class = class as u32;
    outcome.latency.device_compute_us = head.compute.as_micros() as u64;
    if confidence >= cfg.p_tar {
        outcome.latency.total_us = arrived.elapsed().as_micros() as u64;
        return outcome;
    }

    // Offload. The request carries what is left of the budget.
    let remaining = cfg.deadline.saturating_sub(arrived.elapsed());
    let mut shape = vec![1u32];
    shape.extend(head.activation_shape.iter().map(|&d| d as u32));
    let activation = match WireTensor::from_f32(&shape, &head.activation) {
        Ok(t) => t,
        Err(e) => return outcome.failed(format!("activation: {e}"), arrived),
    };
    let request = OffloadRequest {
        device_id: cfg.id.clone(),
        seq,
        partition_branch: branch as u8,
        activation,
        deadline: Deadline { sent_at_unix_us: unix_us(), budget_us: remaining.as_micros().max(1) as u64 },
    };
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
