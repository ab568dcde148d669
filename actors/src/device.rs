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
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_core::calibration::predict;
use branchpoint_messages::{AuditTag, Codec, Deadline, ErrorKind, Exit, PartitionBranch};

use branchpoint_core::planner::Plan;

use crate::clock::unix_us;
use crate::collector::{Collector, Decided, FallbackReason, InputAccepted, Latency, Outcome, Sent};
use crate::compute::{HeadOutput, LoadedNet};
use crate::emulation::{Emulation, EmulationSpec};
use crate::offload::{Activation, Offload};
pub use crate::plans::ApplyPlan;
use crate::plans::DeviceReport;
use crate::transport::{Answered, OffloadFailure, OffloadLink};

#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub id: String,
    pub partition_branch: PartitionBranch,
    pub p_tar: f64,
    /// One per exit: branches in order, then final.
    pub temperatures: Vec<f64>,
    /// Budget of one input from arrival to answer.
    pub deadline: Duration,
    /// The model's SHA-256 (`Model::sha256`), sent with every offload so
    /// that a worker serving several models runs this one's tail.
    pub model_sha256: Arc<str>,
    /// How offloaded activations are encoded (a plan may change it).
    pub codec: Codec,
    /// Real-time scenario replay: the emulated uplink in front of `link`.
    pub emulation: Option<EmulationSpec>,
    /// Shared by a fleet's devices; see `Interrupt`.
    pub interrupt: Interrupt,
    /// Watched devices: audit a share of the inputs they answer themselves
    /// and tag their offloads, for the calibrator (`AuditSettings`).
    pub audit: Option<AuditSettings>,
}

/// How a watched device audits.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditSettings {
    /// Each input's audit coin comes up with this probability.
    pub rate: f64,
    pub group: String,
    pub model_sha256: String,
    /// The on-device accuracy the plan targets [default: its p_tar].
    pub target_accuracy: Option<f64>,
    /// Most audits a device has in flight; beyond it an audit is skipped.
    pub max_in_flight: usize,
    /// Seeds the coins (with the device's id), so that a run repeats.
    pub seed: u64,
}

/// A fleet's stop switch, shared by its devices. Once set, an input that
/// reaches a device is not run but counted as not run, so that a backlog of
/// inputs in the mailboxes (a device thread far behind its arrivals) cannot
/// hold up a shutdown; inputs already running still get their outcome.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<InterruptState>);

#[derive(Debug, Default)]
struct InterruptState {
    set: AtomicBool,
    not_run: AtomicUsize,
}

impl Interrupt {
    pub fn set(&self) {
        self.0.set.store(true, Ordering::Release);
    }

    pub fn is_set(&self) -> bool {
        self.0.set.load(Ordering::Acquire)
    }

    /// Inputs that reached a device after the switch was set.
    pub fn not_run(&self) -> usize {
        self.0.not_run.load(Ordering::Acquire)
    }
}

pub struct Device {
    cfg: DeviceConfig,
    /// Shared by the devices of one thread; see `fleet::DeviceThreads`.
    net: Rc<LoadedNet>,
    link: OffloadLink,
    collector: Addr<Collector>,
    seq: u64,
    em: Option<Rc<Emulation>>,
    /// Audit coins, and the audits still waiting for their answer.
    coins: branchpoint_core::rng::SplitMix64,
    audits_in_flight: Rc<std::cell::Cell<usize>>,
    /// The on-device accuracy the plan in force was certified for, if it
    /// was (`ApplyPlan::target_accuracy`): what audits say it targets.
    plan_target: Option<f64>,
}

impl Device {
    pub fn new(mut cfg: DeviceConfig, net: Rc<LoadedNet>, link: OffloadLink, collector: Addr<Collector>) -> Self {
        let em = cfg.emulation.take().map(|spec| Rc::new(Emulation::new(spec)));
        // The device's coins: its id mixed into the fleet's seed (FNV-1a).
        let id_hash = cfg.id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        let seed = cfg.audit.as_ref().map_or(0, |a| a.seed) ^ id_hash;
        Self { cfg, net, link, collector, seq: 0, em, coins: branchpoint_core::rng::SplitMix64::new(seed), audits_in_flight: Rc::default(), plan_target: None }
    }

    /// The tag of an input the device decided (on the device or not), if it
    /// is watched and its plan has a target to watch.
    fn audit_tag(&mut self, branch_logits: &[f32], on_device: bool, label: i64) -> Option<(AuditTag, bool)> {
        let a = self.cfg.audit.as_ref()?;
        // An input offloaded because every input is belongs to the
        // uniform sample as much as one whose coin came up.
        let sampled = branchpoint_core::control::sampled(self.coins.next_f64() < a.rate, self.cfg.p_tar);
        let target = self.plan_target.or(a.target_accuracy).unwrap_or(self.cfg.p_tar);
        if !(target > 0.0 && target < 1.0) {
            return None;
        }
        let tag = AuditTag {
            model_sha256: a.model_sha256.clone(),
            group: a.group.clone(),
            branch_logits: branch_logits.to_vec(),
            on_device,
            sampled,
            audit_rate: a.rate,
            p_tar: self.cfg.p_tar,
            target_accuracy: target,
            decided_at_unix_us: unix_us(),
            label: u32::try_from(label).ok().filter(|&y| (y as usize) < branch_logits.len()),
        };
        Some((tag, sampled))
    }
}

impl Actor for Device {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(em) = &self.em {
            if em.spec.reports.is_some() {
                let interval = em.spec.report_interval;
                ctx.run_later(em.spec.report_offset, move |act, ctx| {
                    act.report(ctx);
                    ctx.run_interval(interval, |act, ctx| act.report(ctx));
                });
            }
        }
    }
}

impl Device {
    /// Probes an idle or unmeasured uplink, then reports the conservative
    /// estimate to the planner.
    fn report(&mut self, ctx: &mut Context<Self>) {
        let Some(em) = self.em.clone() else { return };
        let now = em.us(Instant::now());
        let interval = em.spec.report_interval.as_micros() as u64;
        let mut up = em.uplink.borrow_mut();
        up.before_report(now);
        if up.needs_probe(now, interval) {
            let bytes = em.spec.probe_bytes;
            let (start, finish) = up.enqueue(&em.spec.link, now, bytes, &mut em.rng.borrow_mut());
            if let Some(finish) = finish {
                let em2 = em.clone();
                ctx.run_later(Duration::from_micros(finish.saturating_sub(now)), move |_, ctx| {
                    em2.uplink.borrow_mut().finished(finish, start, bytes);
                    // The probe's echo measures the round trip.
                    let rtt = em2.spec.link.rtt_us(finish);
                    ctx.run_later(Duration::from_micros(rtt), move |_, _| em2.uplink.borrow_mut().est.observe_response(rtt as f64));
                });
            }
        }
        let Some(observed) = up.est.conservative(em.spec.safety) else { return };
        let estimated_mbit_s = up.est.mean_mbit_s().unwrap_or(0.0);
        let response = up.est.mean_response_us().unwrap_or(0.0);
        drop(up);
        if let Some(planner) = em.spec.reports.as_ref() {
            planner.do_send(DeviceReport {
                device_id: self.cfg.id.clone(),
                group: em.spec.group.clone(),
                at_us: now,
                observed,
                estimated_mbit_s,
                response_us: response,
                window_us: interval,
                rtt: Duration::from_micros(em.spec.link.rtt_us(now)),
                reply_to: Some(ctx.address().recipient()),
                deadline_us: Some(self.cfg.deadline.as_micros() as f64),
                arrival_rate: Some(branchpoint_core::scenario::sim::rate_at(&em.spec.arrival_rates, now)),
            });
        }
    }
}

/// One input for the device to classify.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Infer {
    /// Arrival number in the run, unique across the fleet.
    pub arrival: u64,
    /// When the input arrived: its deadline and latency count from here,
    /// so time spent queued behind other inputs on a busy device counts.
    pub arrived: Instant,
    pub input_index: usize,
    pub input: Arc<[f32]>,
    pub label: i64,
}

impl Handler<Infer> for Device {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, msg: Infer, _: &mut Context<Self>) -> Self::Result {
        if self.cfg.interrupt.is_set() {
            self.cfg.interrupt.0.not_run.fetch_add(1, Ordering::AcqRel);
            return Box::pin(std::future::ready(()));
        }
        let arrived = msg.arrived;
        self.seq += 1;
        self.collector.do_send(InputAccepted);
        let cfg = &self.cfg;
        let branch = cfg.partition_branch.get();
        let mut outcome = Outcome {
            device_id: cfg.id.clone(),
            arrival: msg.arrival,
            input_index: msg.input_index,
            label: msg.label,
            class: 0,
            decided: Decided::Device,
            exit: Exit::Branch(branch),
            partition_branch: branch,
            p_tar: cfg.p_tar,
            temperature: cfg.temperatures.get(branch - 1).copied().unwrap_or(1.0),
            fallback: None,
            worker_id: None,
            latency: Latency::default(),
            error: None,
            arrived_unix_us: unix_us().saturating_sub(arrived.elapsed().as_micros() as u64),
            declined: false,
            deadline_us: cfg.deadline.as_micros() as u64,
            sent: None,
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
        if (Plan { branch, p_tar: cfg.p_tar, codec: cfg.codec }).exits(confidence) {
            outcome.latency.total_us = arrived.elapsed().as_micros() as u64;
            self.collector.do_send(outcome);
            // An audit: the cloud sees the input too, and nobody waits for
            // it (the outcome above stands whatever it says).
            if let Some((tag, true)) = self.audit_tag(&head.branch_logits, true, msg.label) {
                self.audit(&head, tag, arrived);
            }
            return Box::pin(std::future::ready(()));
        }
        let tag = self.audit_tag(&head.branch_logits, false, msg.label).map(|t| t.0);
        let cfg = &self.cfg;
        let request = offload_request(self.seq, cfg, &head, arrived).map(|r| Offload { audit: tag, ..r });
        let (link, collector, deadline) = (self.link.clone(), self.collector.clone(), cfg.deadline);
        let classes = head.branch_logits.len();
        if let (Some(em), Ok(request)) = (self.em.clone(), &request) {
            return self.offload_emulated(em, outcome, request.clone(), classes, arrived);
        }
        Box::pin(async move {
            let outcome = match request {
                Ok(request) => {
                    let sent = Sent { codec: request.activation.codec(), bytes: request.wire_len() as u64 };
                    offload(Outcome { sent: Some(sent), ..outcome }, request, classes, &link, deadline, arrived).await
                }
                Err(e) => outcome.failed(format!("activation: {e}"), arrived),
            };
            collector.do_send(outcome);
        })
    }
}

impl Device {
    /// Sends one audit, unless the device has `max_in_flight` already.
    fn audit(&mut self, head: &HeadOutput, tag: AuditTag, arrived: Instant) {
        let (max, group) = self.cfg.audit.as_ref().map_or((0, String::new()), |a| (a.max_in_flight, a.group.clone()));
        if self.audits_in_flight.get() >= max {
            self.collector.do_send(crate::collector::Audited { group, sent: false, bytes: 0 });
            return;
        }
        let Ok(request) = offload_request(self.seq, &self.cfg, head, arrived) else { return };
        let request = Offload { audit: Some(tag), ..request };
        self.collector.do_send(crate::collector::Audited { group, sent: true, bytes: request.activation.payload_bytes() as u64 });
        let (link, in_flight, deadline) = (self.link.clone(), self.audits_in_flight.clone(), self.cfg.deadline);
        in_flight.set(in_flight.get() + 1);
        actix::spawn(async move {
            // The worker answers it like an offload and tells the
            // calibrator; the answer itself is not needed here.
            let _ = link.offload(request, deadline).await;
            in_flight.set(in_flight.get() - 1);
        });
    }
}

/// The request for an input that did not exit: it carries what is left of
/// the input's budget.
fn offload_request(seq: u64, cfg: &DeviceConfig, head: &HeadOutput, arrived: Instant) -> Result<Offload, crate::ActorError> {
    let remaining = cfg.deadline.saturating_sub(arrived.elapsed());
    let (shape, values) = head.activation_values()?;
    let activation = Activation::encode(cfg.codec, &shape, values)?;
    Ok(Offload {
        device_id: cfg.id.clone(),
        seq,
        partition_branch: cfg.partition_branch.byte(),
        shape,
        activation,
        deadline: Deadline { sent_at_unix_us: unix_us(), budget_us: remaining.as_micros().max(1) as u64 },
        audit: None,
        model_sha256: Some(cfg.model_sha256.clone()),
    })
}

/// Offloads one input with what is left of `deadline` (from `arrived`) and
/// returns its outcome: the cloud's answer if it arrived in time, else the
/// branch's own answer as a counted fallback. The request carries the budget
/// left at the moment it is sent. An answer that arrived after the deadline
/// is a miss, whatever the device thread was doing meanwhile; the outcome's
/// latency is when the answer, or the deadline, came.
#[allow(clippy::too_many_arguments)]
async fn offload(mut outcome: Outcome, mut request: Offload, classes: usize, link: &OffloadLink, deadline: Duration, arrived: Instant) -> Outcome {
    let due = arrived + deadline;
    let seq = request.seq;
    let remaining = due.saturating_duration_since(Instant::now());
    request.deadline = Deadline { sent_at_unix_us: unix_us(), budget_us: remaining.as_micros().max(1) as u64 };
    let sent = Instant::now();
    let result = if remaining.is_zero() { Err(OffloadFailure::Deadline) } else { link.offload(request, remaining).await };
    // An answer is checked against what it can mean before it is taken: the
    // request it answers, a class this model has (a rogue member of the
    // workers' queue group must not make devices answer class 999).
    let result = match result {
        Ok(a) if a.at > due => Err(OffloadFailure::Deadline),
        Ok(a) if a.answer.seq != seq => Err(OffloadFailure::Transport(format!("an answer to request {} for request {seq}", a.answer.seq))),
        Ok(a) if a.answer.class as usize >= classes => Err(OffloadFailure::Transport(format!("an answer of class {} from a {classes}-class model", a.answer.class))),
        other => other,
    };
    match result {
        Ok(Answered { answer, at }) => {
            let round_trip = at.duration_since(sent).as_micros() as u64;
            outcome.decided = Decided::Cloud;
            outcome.exit = Exit::Final;
            outcome.class = answer.class;
            outcome.worker_id = Some(answer.worker_id);
            outcome.latency.queueing_us = answer.timings.queue_us;
            outcome.latency.cloud_compute_us = answer.timings.compute_us;
            outcome.latency.network_us = round_trip.saturating_sub(answer.timings.queue_us + answer.timings.compute_us);
            outcome.latency.total_us = at.duration_since(arrived).as_micros() as u64;
        }
        Err(failure) => {
            // The branch's own answer stands: no input is lost.
            outcome.decided = Decided::Fallback;
            outcome.fallback = Some(match failure {
                OffloadFailure::Deadline => FallbackReason::Deadline,
                OffloadFailure::Disconnected => FallbackReason::Disconnected,
                OffloadFailure::NoResponders => FallbackReason::NoResponders,
                OffloadFailure::ErrorReply(e) => match e.kind {
                    ErrorKind::Overloaded => FallbackReason::Refused,
                    ErrorKind::DeadlineExpired => FallbackReason::Expired,
                    _ => FallbackReason::ErrorReply,
                },
                OffloadFailure::Transport(_) => FallbackReason::Transport,
            });
            // A deadline fallback is answered at the deadline; the others
            // as soon as the failure was known.
            let answered = if outcome.fallback == Some(FallbackReason::Deadline) { due.min(Instant::now()) } else { Instant::now() };
            outcome.latency.network_us = answered.saturating_duration_since(sent).as_micros() as u64;
            outcome.latency.total_us = answered.saturating_duration_since(arrived).as_micros() as u64;
        }
    }
    outcome
}

impl Device {
    /// An offload across the emulated uplink: decline it if the device
    /// predicts a miss (adaptive devices), drop it if it cannot start before
    /// the deadline, otherwise wait for the upload and half the RTT, offload,
    /// and wait half the RTT for the reply.
    fn offload_emulated(&mut self, em: Rc<Emulation>, mut outcome: Outcome, request: Offload, classes: usize, arrived: Instant) -> ResponseFuture<()> {
        let collector = self.collector.clone();
        let deadline = self.cfg.deadline;
        let deadline_us = deadline.as_micros() as u64;
        let branch_class = outcome.class;
        let (t_arrival, now) = (em.us(arrived), em.us(Instant::now()));
        let bytes = request.wire_len();
        if em.spec.admission && em.uplink.borrow().would_miss(t_arrival, now, bytes, deadline_us, em.spec.safety) {
            outcome.declined = true;
            outcome.latency.total_us = arrived.elapsed().as_micros() as u64;
            collector.do_send(outcome);
            return Box::pin(std::future::ready(()));
        }
        let queued_behind = em.uplink.borrow().free_at();
        if queued_behind.max(now) >= t_arrival + deadline_us {
            // Still queued at its deadline: never sent.
            return Box::pin(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(arrived + deadline)).await;
                collector.do_send(fallback(outcome, FallbackReason::Deadline, arrived));
            });
        }
        let (start, finish) = em.uplink.borrow_mut().enqueue(&em.spec.link, now, bytes, &mut em.rng.borrow_mut());
        outcome.sent = Some(Sent { codec: request.activation.codec(), bytes: bytes as u64 });
        let link = self.link.clone();
        Box::pin(async move {
            let Some(finish) = finish else {
                tokio::time::sleep_until(tokio::time::Instant::from_std(arrived + deadline)).await;
                collector.do_send(fallback(outcome, FallbackReason::Deadline, arrived));
                return;
            };
            // The upload ends when the link says, whatever happens to the
            // input; its timing feeds the estimate.
            let done_em = em.clone();
            actix::spawn(async move {
                tokio::time::sleep_until(tokio::time::Instant::from_std(done_em.instant(finish))).await;
                done_em.uplink.borrow_mut().finished(finish, start, bytes);
            });
            let half = em.half_rtt(finish);
            let fallback_outcome = outcome.clone();
            let exchange = async {
                tokio::time::sleep_until(tokio::time::Instant::from_std(em.instant(finish) + half)).await;
                let mut out = offload(outcome, request, classes, &link, deadline.saturating_sub(half), arrived).await;
                let from_worker = out.decided == Decided::Cloud || matches!(out.fallback, Some(FallbackReason::Refused | FallbackReason::Expired | FallbackReason::ErrorReply));
                if from_worker {
                    // The reply, an answer or a worker's error, crosses the
                    // emulated link back: it reaches the device half the RTT
                    // after it left, exactly, as in virtual time. The timer
                    // that waits for it may wake later; the emulation does
                    // not count its own timer's slack.
                    let reaches = Instant::now() + half;
                    tokio::time::sleep_until(tokio::time::Instant::from_std(reaches)).await;
                    out.latency.total_us = reaches.saturating_duration_since(arrived).as_micros() as u64;
                }
                out
            };
            // The device answers by the deadline, with its branch if the
            // cloud's reply has not come back (judged on the emulated
            // reply's arrival; the wait allows for the timers' slack).
            let mut out = match tokio::time::timeout_at(tokio::time::Instant::from_std(arrived + deadline + EMULATION_SLACK), exchange).await {
                // The reply's trip back counts: after the deadline it is a
                // miss, answered with the branch.
                Ok(out) if out.latency.total_us > deadline_us && (out.decided == Decided::Cloud || out.fallback != Some(FallbackReason::Deadline)) => {
                    let mut late = fallback(fallback_outcome, FallbackReason::Deadline, arrived);
                    late.class = branch_class;
                    late.latency.total_us = deadline_us;
                    late
                }
                Ok(out) => {
                    if out.decided == Decided::Cloud {
                        let replied = t_arrival + out.latency.total_us;
                        em.uplink.borrow_mut().est.observe_response(replied.saturating_sub(finish) as f64);
                    }
                    out
                }
                Err(_) => {
                    let mut out = fallback(fallback_outcome, FallbackReason::Deadline, arrived);
                    out.class = branch_class;
                    out.latency.total_us = deadline_us;
                    out
                }
            };
            if out.fallback == Some(FallbackReason::Deadline) {
                // No answer by the deadline: the response took at least
                // that long after the upload ended (the same lower bound the
                // virtual-time replay's devices learn from).
                em.uplink.borrow_mut().est.observe_response_at_least((t_arrival + deadline_us).saturating_sub(finish) as f64);
            }
            out.latency.network_us = out.latency.total_us.saturating_sub(out.latency.device_compute_us + out.latency.queueing_us + out.latency.cloud_compute_us);
            collector.do_send(out);
        })
    }
}

/// How much longer than its deadline an emulated offload's timer may
/// wait for a reply whose emulated arrival is in time: tokio's timers wake
/// on millisecond ticks, and a busy machine wakes them later still.
const EMULATION_SLACK: Duration = Duration::from_millis(20);

/// The branch's own answer stands for an offload that did not come back.
fn fallback(mut o: Outcome, reason: FallbackReason, arrived: Instant) -> Outcome {
    o.decided = Decided::Fallback;
    o.fallback = Some(reason);
    o.exit = Exit::Branch(o.partition_branch);
    o.worker_id = None;
    o.latency.total_us = arrived.elapsed().as_micros() as u64;
    o
}

impl Outcome {
    fn failed(mut self, error: String, arrived: Instant) -> Outcome {
        self.error = Some(error);
        self.latency.total_us = arrived.elapsed().as_micros() as u64;
        self
    }
}

impl Handler<ApplyPlan> for Device {
    type Result = ();

    fn handle(&mut self, msg: ApplyPlan, _: &mut Context<Self>) {
        // temperatures has one entry per exit: branches 1..len-1, then final.
        let branches = self.cfg.temperatures.len().saturating_sub(1);
        if let Err(e) = msg.partition_branch.within(branches).and_then(|_| branchpoint_messages::PTar::plan(msg.p_tar)) {
            tracing::warn!(device_id = %self.cfg.id, "device {}: ignored plan {msg:?}: {e}", self.cfg.id);
            return;
        }
        if msg.temperature.is_some_and(|t| !branchpoint_messages::is_valid_temperature(t)) {
            tracing::warn!(device_id = %self.cfg.id, "device {}: ignored plan {msg:?}: its temperature is outside [1e-3, 1e3]", self.cfg.id);
            return;
        }
        if let Some(t) = msg.temperature {
            self.cfg.temperatures[msg.partition_branch.get() - 1] = t;
        }
        self.cfg.partition_branch = msg.partition_branch;
        self.cfg.p_tar = msg.p_tar;
        if let Some(codec) = msg.codec {
            self.cfg.codec = codec;
        }
        self.plan_target = msg.target_accuracy.filter(|a| *a > 0.0 && *a < 1.0);
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
        if msg.temperatures.len() != n || !msg.temperatures.iter().all(|t| branchpoint_messages::is_valid_temperature(*t)) {
            tracing::warn!(device_id = %self.cfg.id, "device {}: ignored calibration {:?}: need {n} temperatures in [1e-3, 1e3]", self.cfg.id, msg.temperatures);
            return;
        }
        self.cfg.temperatures = msg.temperatures;
    }
}

/// The plan a device holds now: partition branch, p_tar, and the
/// temperature of that branch.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "(usize, f64, f64)")]
pub struct GetPlan;

impl Handler<GetPlan> for Device {
    type Result = MessageResult<GetPlan>;

    fn handle(&mut self, _: GetPlan, _: &mut Context<Self>) -> Self::Result {
        let b = self.cfg.partition_branch.get();
        MessageResult((b, self.cfg.p_tar, self.cfg.temperatures.get(b - 1).copied().unwrap_or(1.0)))
    }
}

/// The device's offload, against a scripted cloud (`FaultyLink`): every
/// way an offload can fail leaves the branch's answer standing as a
/// fallback with its reason, answered by the deadline, and only a timely
/// answer to this very request, of a class the model has, is the cloud's.
#[cfg(test)]
mod tests {
    use branchpoint_messages::ErrorKind;

    use super::*;
    use crate::transport::{Fault, FaultyLink};

    const DEADLINE: Duration = Duration::from_millis(60);

    fn outcome() -> Outcome {
        Outcome {
            device_id: "d".into(),
            arrival: 0,
            input_index: 0,
            label: 3,
            class: 3,
            decided: Decided::Fallback,
            exit: Exit::Branch(1),
            partition_branch: 1,
            p_tar: 0.9,
            temperature: 1.0,
            fallback: None,
            worker_id: None,
            latency: Latency::default(),
            error: None,
            arrived_unix_us: 0,
            declined: false,
            deadline_us: DEADLINE.as_micros() as u64,
            sent: None,
        }
    }

    fn request(seq: u64) -> Offload {
        Offload {
            device_id: "d".into(),
            seq,
            partition_branch: 1,
            shape: vec![1, 2],
            activation: Activation::F32(vec![0.0, 1.0].into()),
            deadline: Deadline::default(),
            audit: None,
            model_sha256: None,
        }
    }

    /// The outcome of offloading request 5 to a cloud that does `fault`.
    fn offloaded(fault: Fault) -> Outcome {
        let link = FaultyLink::link(move |_| fault.clone());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(offload(outcome(), request(5), 10, &link, DEADLINE, Instant::now()))
    }

    fn fell_back(o: &Outcome, reason: FallbackReason) {
        assert_eq!((o.decided, o.fallback, o.class, o.worker_id.as_deref()), (Decided::Fallback, Some(reason), 3, None), "{o:?}");
        assert!(o.latency.total_us <= DEADLINE.as_micros() as u64, "answered by the deadline: {o:?}");
    }

    #[test]
    fn a_timely_answer_is_the_clouds() {
        let o = offloaded(Fault::Answer { class: 7, after: Duration::ZERO });
        assert_eq!((o.decided, o.fallback, o.class, o.exit, o.worker_id.as_deref()), (Decided::Cloud, None, 7, Exit::Final, Some("faulty")), "{o:?}");
    }

    #[test]
    fn a_lost_request_or_a_late_answer_falls_back_at_the_deadline() {
        for fault in [Fault::Drop, Fault::Answer { class: 7, after: 2 * DEADLINE }] {
            let o = offloaded(fault.clone());
            fell_back(&o, FallbackReason::Deadline);
            assert_eq!(o.latency.total_us, DEADLINE.as_micros() as u64, "{fault:?}: a deadline fallback is answered at the deadline: {o:?}");
        }
    }

    #[test]
    fn an_error_reply_falls_back_at_once() {
        let reasons = [
            (ErrorKind::Overloaded, FallbackReason::Refused),
            (ErrorKind::DeadlineExpired, FallbackReason::Expired),
            (ErrorKind::Internal, FallbackReason::ErrorReply),
            (ErrorKind::UnknownModel, FallbackReason::ErrorReply),
        ];
        for (kind, reason) in reasons {
            let o = offloaded(Fault::Error(kind));
            fell_back(&o, reason);
            assert!(!o.deadline_missed(), "{kind:?}: answered by the branch in time: {o:?}");
        }
    }

    #[test]
    fn a_disconnected_client_or_no_worker_falls_back_at_once() {
        fell_back(&offloaded(Fault::Disconnected), FallbackReason::Disconnected);
        fell_back(&offloaded(Fault::NoResponders), FallbackReason::NoResponders);
    }

    #[test]
    fn an_answer_to_another_request_or_of_a_class_the_model_lacks_is_not_taken() {
        fell_back(&offloaded(Fault::WrongRequest), FallbackReason::Transport);
        fell_back(&offloaded(Fault::Answer { class: 10, after: Duration::ZERO }), FallbackReason::Transport);
    }

    #[test]
    fn an_offload_with_no_time_left_is_never_sent() {
        let sent = Arc::new(AtomicUsize::new(0));
        let counter = sent.clone();
        let link = FaultyLink::link(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Fault::Answer { class: 7, after: Duration::ZERO }
        });
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let arrived = Instant::now() - 2 * DEADLINE;
        let o = rt.block_on(offload(outcome(), request(5), 10, &link, DEADLINE, arrived));
        assert_eq!((o.decided, o.fallback), (Decided::Fallback, Some(FallbackReason::Deadline)), "{o:?}");
        assert_eq!(sent.load(Ordering::SeqCst), 0, "nothing sent");
    }
}
