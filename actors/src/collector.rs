//! Collector: one outcome per input, and the fleet summary.
//!
//! Owns: the running totals of the `Outcome`s the devices report (and every
//! outcome, only when asked: `keeping_outcomes`), and the count of their
//! audits.
//! Messages in: `Outcome`, `InputAccepted`, `Audited`, `GetSummary`,
//! `GetSnapshot`, `GetAuditCounts`, `TakeOutcomes`. Mailbox: unbounded in practice (devices use
//! `do_send`: an outcome must never be dropped because the collector is
//! briefly busy, and it does O(1) work per message). Restart: none; it lives
//! as long as the fleet. Shutdown: holds its data until the system stops.

use actix::{Actor, Context, Handler, Message, MessageResult};
use branchpoint_messages::Exit;
use serde::{Deserialize, Serialize};

use branchpoint_core::outcome::{Counted, Counts};
/// Where an input was decided, and why an offload fell back: the core's
/// words, so that every count of outcomes means the same.
pub use branchpoint_core::outcome::{Decided, FallbackReason};

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
    /// The exit that produced the answer: a side branch, or the final exit
    /// (a cloud answer). JSON: the branch's number, or `"final"`.
    pub exit: Exit,
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
    /// The input's deadline, µs from its arrival (0: unknown, in files
    /// written before it was recorded).
    #[serde(default)]
    pub deadline_us: u64,
    /// An offload put on the uplink: its activation's codec and the
    /// request's bytes on the wire (`None`: nothing sent, for an input
    /// answered on the device, declined, or dropped before it could start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent: Option<Sent>,
}

/// What one offload put on the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub codec: branchpoint_messages::Codec,
    pub bytes: u64,
}

impl Outcome {
    /// What counting needs of it (`core::outcome::Counts`).
    pub fn counted(&self) -> Counted {
        Counted {
            decided: self.decided,
            fallback: self.fallback,
            declined: self.declined,
            correct: self.correct(),
            latency_us: self.latency.total_us,
            deadline_us: self.deadline_us,
        }
    }

    /// Whether this input missed its deadline, by the one definition
    /// (`branchpoint_core::outcome::deadline_missed`).
    pub fn deadline_missed(&self) -> bool {
        self.counted().missed()
    }
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

/// Latencies in buckets 1 % wide (1 µs to about 1,000 s), for the
/// percentiles of a summary without keeping every latency: a percentile is
/// its bucket's upper bound, at most 1 % above the true value (and never
/// above the largest latency seen).
#[derive(Debug, Clone, Default)]
struct FineHistogram {
    counts: Vec<u64>,
    n: u64,
    max_ms: f64,
}

impl FineHistogram {
    const LOWEST_MS: f64 = 0.001;
    const RATIO: f64 = 1.01;
    const BUCKETS: usize = 2100;

    fn bucket(ms: f64) -> usize {
        if ms <= Self::LOWEST_MS {
            return 0;
        }
        ((ms / Self::LOWEST_MS).ln() / Self::RATIO.ln()).ceil().clamp(0.0, (Self::BUCKETS - 1) as f64) as usize
    }

    fn add(&mut self, ms: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; Self::BUCKETS];
        }
        self.counts[Self::bucket(ms)] += 1;
        self.n += 1;
        self.max_ms = self.max_ms.max(ms);
    }

    /// The latency at rank ceil(q n), as a sorted list would give it.
    fn percentile(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let rank = ((q * self.n as f64).ceil() as u64).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return (Self::LOWEST_MS * Self::RATIO.powi(i as i32)).min(self.max_ms);
            }
        }
        self.max_ms
    }
}

/// The running totals a summary is made of, one outcome at a time.
#[derive(Debug, Clone, Default)]
struct Tally {
    outcomes: usize,
    errors: usize,
    /// The decided outcomes, counted the one way.
    counts: Counts,
    per_exit: Vec<usize>,
    latency: FineHistogram,
}

impl Tally {
    fn new(num_branches: usize) -> Self {
        Self { per_exit: vec![0; num_branches + 1], ..Self::default() }
    }

    fn add(&mut self, o: &Outcome) {
        self.outcomes += 1;
        if o.error.is_some() {
            self.errors += 1;
            return;
        }
        self.counts.add(&o.counted());
        let slot = o.exit.index(self.per_exit.len() - 1);
        self.per_exit[slot] += 1;
        self.latency.add(o.latency.total_us as f64 / 1e3);
    }

    fn summary(&self, inputs: usize, duplicates: usize) -> Summary {
        let n = self.outcomes.max(1) as f64;
        let c = &self.counts;
        let reason = |r: FallbackReason| c.fallbacks_for(r) as usize;
        Summary {
            inputs,
            outcomes: self.outcomes,
            duplicates,
            decided_on_device: c.on_device as usize,
            offloaded: c.offloaded as usize,
            answered_by_cloud: c.cloud as usize,
            fallbacks: c.fallbacks as usize,
            fallbacks_deadline: reason(FallbackReason::Deadline),
            fallbacks_no_responders: reason(FallbackReason::NoResponders),
            fallbacks_error_reply: reason(FallbackReason::ErrorReply),
            fallbacks_transport: reason(FallbackReason::Transport),
            fallbacks_disconnected: reason(FallbackReason::Disconnected),
            fallbacks_refused: reason(FallbackReason::Refused),
            fallbacks_expired: reason(FallbackReason::Expired),
            declined: c.declined as usize,
            errors: self.errors,
            deadline_misses: c.misses as usize,
            per_exit: self.per_exit.clone(),
            accuracy: c.correct as f64 / n,
            edge_accuracy: (c.on_device > 0).then(|| c.edge_correct as f64 / c.on_device as f64),
            latency_ms_p50: self.latency.percentile(0.50),
            latency_ms_p95: self.latency.percentile(0.95),
            latency_ms_p99: self.latency.percentile(0.99),
        }
    }
}

pub struct Collector {
    inputs: usize,
    /// Running totals: a summary costs the same after an hour as after a
    /// second, and memory does not grow with the outcomes.
    tally: Tally,
    /// Arrival numbers seen, one bit each (duplicates are counted).
    seen: Vec<u64>,
    duplicates: usize,
    latency: LatencyHistogram,
    /// Every outcome, only when asked (`keeping_outcomes`: an `--outcomes`
    /// file, a replay's report).
    kept: Option<Vec<Outcome>>,
    audits: std::collections::BTreeMap<String, AuditCounts>,
}

impl Collector {
    pub fn new(num_branches: usize) -> Self {
        Self { inputs: 0, tally: Tally::new(num_branches), seen: Vec::new(), duplicates: 0, latency: LatencyHistogram::default(), kept: None, audits: Default::default() }
    }

    /// Also keeps every outcome, for `TakeOutcomes`.
    pub fn keeping_outcomes(mut self) -> Self {
        self.kept = Some(Vec::new());
        self
    }

    /// Marks arrival `a` seen; whether it was already.
    fn seen_before(&mut self, a: u64) -> bool {
        let (word, bit) = ((a / 64) as usize, 1u64 << (a % 64));
        if word >= self.seen.len() {
            // Arrival numbers count up from 0: grow in doublings.
            self.seen.resize((word + 1).next_power_of_two(), 0);
        }
        let before = self.seen[word] & bit != 0;
        self.seen[word] |= bit;
        before
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
        if self.seen_before(msg.arrival) {
            self.duplicates += 1;
        }
        if msg.error.is_none() {
            self.latency.add(msg.latency.total_us as f64 / 1e3);
        }
        self.tally.add(&msg);
        if let Some(kept) = &mut self.kept {
            kept.push(msg);
        }
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
        MessageResult(self.tally.summary(self.inputs, self.duplicates))
    }
}

/// The summary and the latency histogram, for a status report.
#[derive(Message)]
#[rtype(result = "(Summary, LatencyHistogram)")]
pub struct GetSnapshot;

impl Handler<GetSnapshot> for Collector {
    type Result = MessageResult<GetSnapshot>;

    fn handle(&mut self, _: GetSnapshot, _: &mut Context<Self>) -> Self::Result {
        MessageResult((self.tally.summary(self.inputs, self.duplicates), self.latency.clone()))
    }
}

#[derive(Message)]
#[rtype(result = "Vec<Outcome>")]
pub struct TakeOutcomes;

impl Handler<TakeOutcomes> for Collector {
    type Result = MessageResult<TakeOutcomes>;

    fn handle(&mut self, _: TakeOutcomes, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.kept.clone().unwrap_or_default())
    }
}

/// The summary of `outcomes` (for outcomes kept elsewhere), as a collector
/// that took them one by one would give it.
pub fn summarize(inputs: usize, duplicates: usize, num_branches: usize, outcomes: &[Outcome]) -> Summary {
    let mut t = Tally::new(num_branches);
    for o in outcomes {
        t.add(o);
    }
    t.summary(inputs, duplicates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(arrival: u64, decided: Decided, total_us: u64, right: bool) -> Outcome {
        Outcome {
            device_id: "d-0".into(),
            arrival,
            input_index: arrival as usize,
            label: 1,
            class: if right { 1 } else { 2 },
            decided,
            exit: if decided == Decided::Cloud { Exit::Final } else { Exit::Branch(1) },
            partition_branch: 1,
            p_tar: 0.9,
            temperature: 1.0,
            fallback: (decided == Decided::Fallback).then_some(FallbackReason::Deadline),
            worker_id: None,
            latency: Latency { total_us, ..Latency::default() },
            error: None,
            arrived_unix_us: 0,
            declined: false,
            deadline_us: 100_000,
            sent: None,
        }
    }

    #[test]
    fn running_totals_match_the_outcomes_and_percentiles_are_within_one_percent() {
        let kinds = [Decided::Device, Decided::Cloud, Decided::Fallback];
        let outcomes: Vec<Outcome> = (0..10_000u64).map(|i| outcome(i, kinds[(i % 3) as usize], 50 + (i * 7919) % 200_000, i % 5 != 0)).collect();
        let mut t = Tally::new(2);
        for o in &outcomes {
            t.add(o);
        }
        let s = t.summary(10_000, 0);
        assert_eq!((s.outcomes, s.decided_on_device, s.answered_by_cloud, s.fallbacks, s.fallbacks_deadline), (10_000, 3334, 3333, 3333, 3333));
        assert_eq!(s.per_exit, vec![6667, 0, 3333]);
        assert!((s.accuracy - 0.8).abs() < 1e-12);
        // Deadline misses, by the one definition: every deadline fallback,
        // and any other input answered after its 100 ms.
        let late = outcomes.iter().filter(|o| o.decided != Decided::Fallback && o.latency.total_us > 100_000).count();
        assert!(late > 0);
        assert_eq!(s.deadline_misses, 3333 + late);
        // Exact percentiles, from the sorted latencies.
        let mut ms: Vec<f64> = outcomes.iter().map(|o| o.latency.total_us as f64 / 1e3).collect();
        ms.sort_by(f64::total_cmp);
        for (q, got) in [(0.5, s.latency_ms_p50), (0.95, s.latency_ms_p95), (0.99, s.latency_ms_p99)] {
            let exact = ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
            assert!(got >= exact - 1e-9 && got <= exact * 1.0101, "p{q}: {got} vs {exact}");
        }
    }

    #[test]
    fn duplicates_are_counted_with_one_bit_per_arrival() {
        let mut c = Collector::new(1);
        for a in [0u64, 5, 64, 5, 1_000_000, 0] {
            if c.seen_before(a) {
                c.duplicates += 1;
            }
        }
        assert_eq!(c.duplicates, 2);
        assert!(c.seen.len() * 64 >= 1_000_001 && c.seen.len() <= 2 * 1_000_001 / 64 + 2, "{}", c.seen.len());
        assert!(c.kept.is_none(), "outcomes are kept only when asked");
    }
}
