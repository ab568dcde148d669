//! Collector: one outcome per input, and the fleet summary.
//!
//! Owns: every `Outcome` the devices report, and the count of their audits.
//! Messages in: `Outcome`, `InputAccepted`, `Audited`, `GetSummary`,
//! `GetSnapshot`, `GetAuditCounts`, `TakeOutcomes`. Mailbox: unbounded in practice (devices use
//! `do_send`: an outcome must never be dropped because the collector is
//! briefly busy, and it does O(1) work per message). Restart: none; it lives
//! as long as the fleet. Shutdown: holds its data until the system stops.
use std::collections::HashSet;

use actix::{Actor, Context, Handler, Message, MessageResult};
use serde::{Deserialize, Serialize};

/// Where an input's answer was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decided {
    /// The branch was confident enough: answered on the device.
    Device,
    /// Offloaded and answered by a cloud worker with the final exit.
    Cloud,
    /// Offloaded, but no answer came in time (or an error came back): the
    /// device answered with its own branch.
    Fallback,
}

/// Why an offload fell back to the device's own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackReason {
    Deadline,
    /// The device's NATS client was disconnected: nothing was sent.
    Disconnected,
    NoResponders,
    ErrorReply,
    Transport,
}

/// Latency of one input, broken down, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub device_compute_us: u64,
    /// Offload round trip minus the worker's queueing and compute: uplink,
    /// propagation and downlink together (0 when decided on the device).
    pub network_us: u64,
    pub queueing_us: u64,
    pub cloud_compute_us: u64,
    pub total_us: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[rtype(result = "()")]
pub struct Outcome {
    pub device_id: String,
    /// Arrival number in the run: identifies the input across devices (a
    /// long run feeds the same test input more than once).
    #[serde(default)]
    pub arrival: u64,
    /// Index of the input in the test set.
    pub input_index: usize,
    pub label: i64,
    pub class: u32,
    pub decided: Decided,
    /// The exit that produced the answer: a branch number, or 0 for final.
    pub exit: usize,
    pub partition_branch: usize,
    pub p_tar: f64,
    /// Temperature of the partition branch used for the decision.
    pub temperature: f64,
    pub fallback: Option<FallbackReason>,
    pub worker_id: Option<String>,
    pub latency: Latency,
    /// Set when the device could not decide at all (a bug or a bad input,
    /// never the network): the input is counted under `errors`.
    pub error: Option<String>,
    /// When the input arrived at the device, µs since the Unix epoch.
    #[serde(default)]
    pub arrived_unix_us: u64,
    /// Below p_tar, but answered on the device because the device predicted
    /// its offload would miss the deadline (adaptive devices only).
    #[serde(default)]
    pub declined: bool,
}

impl Outcome {
    pub fn correct(&self) -> bool {
        i64::from(self.class) == self.label
    }
}

/// The fleet's totals; a wire type, because fleets publish it.
pub use branchpoint_messages::FleetSummary as Summary;

/// Upper bounds of the latency histogram, ms: from a fast device answer to
/// the longest deadlines.
pub const LATENCY_LE_MS: [f64; 12] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

/// Outcome latencies in `LATENCY_LE_MS` buckets, kept as outcomes arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct LatencyHistogram {
    pub le_ms: Vec<f64>,
    /// Outcomes at or below each bound (cumulative).
    pub counts: Vec<u64>,
    pub sum_ms: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self { le_ms: LATENCY_LE_MS.to_vec(), counts: vec![0; LATENCY_LE_MS.len()], sum_ms: 0.0 }
    }
}

impl LatencyHistogram {
    fn add(&mut self, ms: f64) {
        self.sum_ms += ms;
        for (le, c) in self.le_ms.iter().zip(&mut self.counts) {
            if ms <= *le {
                *c += 1;
            }
        }
    }
}

pub struct Collector {
    num_branches: usize,
    inputs: usize,
    outcomes: Vec<Outcome>,
    seen: HashSet<u64>,
    duplicates: usize,
    latency: LatencyHistogram,
    audits: std::collections::BTreeMap<String, AuditCounts>,
}

impl Collector {
    pub fn new(num_branches: usize) -> Self {
        Self { num_branches, inputs: 0, outcomes: Vec::new(), seen: HashSet::new(), duplicates: 0, latency: LatencyHistogram::default(), audits: Default::default() }
    }
}

/// Audits of watched devices: sent, and skipped because the device had its
/// most in flight already. Audits have no outcome of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditCounts {
    pub sent: u64,
    pub skipped: u64,
    /// Bytes of the activations the sent audits carried.
    pub bytes: u64,
}

/// A device of `group` drew an audit coin that came up for an input it
/// decided itself.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Audited {
    pub group: String,
    pub sent: bool,
    pub bytes: u64,
}

/// Most groups whose audits are counted apart (the rest under "other").
const MAX_AUDIT_GROUPS: usize = 1024;

impl Handler<Audited> for Collector {
    type Result = ();

    fn handle(&mut self, msg: Audited, _: &mut Context<Self>) {
        let key = if self.audits.len() < MAX_AUDIT_GROUPS || self.audits.contains_key(&msg.group) { msg.group } else { "other".into() };
        let c = self.audits.entry(key).or_default();
        if msg.sent {
            c.sent += 1;
            c.bytes += msg.bytes;
        } else {
            c.skipped += 1;
        }
    }
}

/// The audit counts per group.
#[derive(Message)]
#[rtype(result = "std::collections::BTreeMap<String, AuditCounts>")]
pub struct GetAuditCounts;

impl Handler<GetAuditCounts> for Collector {
    type Result = MessageResult<GetAuditCounts>;

    fn handle(&mut self, _: GetAuditCounts, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.audits.clone())
    }
}

impl Actor for Collector {
    type Context = Context<Self>;
}

impl Handler<Outcome> for Collector {
    type Result = ();

    fn handle(&mut self, msg: Outcome, _: &mut Context<Self>) {
        if !self.seen.insert(msg.arrival) {
            self.duplicates += 1;
        }
        if msg.error.is_none() {
            self.latency.add(msg.latency.total_us as f64 / 1e3);
        }
        self.outcomes.push(msg);
    }
}

/// A device counts an input it accepted, before deciding it, so inputs and
/// outcomes can be compared at the end.
#[derive(Message)]
#[rtype(result = "()")]
pub struct InputAccepted;

impl Handler<InputAccepted> for Collector {
    type Result = ();

    fn handle(&mut self, _: InputAccepted, _: &mut Context<Self>) {
        self.inputs += 1;
    }
}

#[derive(Message)]
#[rtype(result = "Summary")]
pub struct GetSummary;

impl Handler<GetSummary> for Collector {
    type Result = MessageResult<GetSummary>;

    fn handle(&mut self, _: GetSummary, _: &mut Context<Self>) -> Self::Result {
        MessageResult(summarize(self.inputs, self.duplicates, self.num_branches, &self.outcomes))
    }
}

/// The summary and the latency histogram, for a status report.
#[derive(Message)]
#[rtype(result = "(Summary, LatencyHistogram)")]
pub struct GetSnapshot;

impl Handler<GetSnapshot> for Collector {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult((summarize(self.inputs, self.duplicates, self.num_branches, &self.outcomes), self.latency.clone()))
    }
}

#[derive(Message)]
#[rtype(result = "Vec<Outcome>")]
pub struct TakeOutcomes;

impl Handler<TakeOutcomes> for Collector {
    type Result = MessageResult<TakeOutcomes>;

    fn handle(&mut self, _: TakeOutcomes, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.outcomes.clone())
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub fn summarize(inputs: usize, duplicates: usize, num_branches: usize, outcomes: &[Outcome]) -> Summary {
    let mut s = Summary { inputs, outcomes: outcomes.len(), duplicates, per_exit: vec![0; num_branches + 1], ..Default::default() };
    let (mut right, mut edge, mut edge_right) = (0usize, 0usize, 0usize);
    let mut lat: Vec<f64> = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        if o.error.is_some() {
            s.errors += 1;
            continue;
        }
        right += usize::from(o.correct());
        match o.decided {
            Decided::Device => {
                s.decided_on_device += 1;
                edge += 1;
                edge_right += usize::from(o.correct());
            }
            Decided::Cloud => {
                s.offloaded += 1;
                s.answered_by_cloud += 1;
            }
            Decided::Fallback => {
                s.offloaded += 1;
                s.fallbacks += 1;
                match o.fallback {
                    Some(FallbackReason::Deadline) => s.fallbacks_deadline += 1,
                    Some(FallbackReason::Disconnected) => s.fallbacks_disconnected += 1,
                    Some(FallbackReason::NoResponders) => s.fallbacks_no_responders += 1,
                    Some(FallbackReason::ErrorReply) => s.fallbacks_error_reply += 1,
                    Some(FallbackReason::Transport) | None => s.fallbacks_transport += 1,
                }
            }
        }
        let slot = if o.exit == 0 { num_branches } else { (o.exit - 1).min(num_branches) };
        s.per_exit[slot] += 1;
        lat.push(o.latency.total_us as f64 / 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let n = outcomes.len().max(1) as f64;
    s.accuracy = right as f64 / n;
    s.edge_accuracy = (edge > 0).then(|| edge_right as f64 / edge as f64);
    s.latency_ms_p50 = percentile(&lat, 0.50);
    s.latency_ms_p95 = percentile(&lat, 0.95);
    s.latency_ms_p99 = percentile(&lat, 0.99);
    s
}
