//! Virtual-time replay: a discrete-event simulation of the devices, their
//! uplinks, the planner and the cloud workers, driven by the model's real
//! decisions.
//!
//! What is real: every input's branch and final-exit answers and calibrated
//! confidences (computed once by the model on the test split), the
//! planner's code (`crate::planner`), the link emulation
//! (`crate::link`), and compute times (the model's measured
//! profile). What is simulated: the passage of time. So a 10-minute,
//! 100-device scenario replays in seconds, and the same seed gives the same
//! report.
//!
//! One input, as the live device handles it: it arrives (Poisson, per
//! device) and waits for the device's CPU; the head runs; if the calibrated
//! confidence reaches p_tar the device answers. Otherwise the activation
//! queues for the device's uplink; an upload that cannot start before the
//! input's deadline is dropped (the device answers with its branch at the
//! deadline). The upload crosses the link, propagates for half the RTT,
//! queues at the cloud (dynamic batching over a pool of workers, one branch
//! per batch; a request whose deadline passed is rejected unprocessed), and
//! the reply propagates back in half the RTT. A reply after the deadline is
//! a deadline miss: the device has already answered with its branch.
//!
//! Adaptive devices report every `report_interval_s`: their smoothed uplink
//! time per byte and response time (`LinkEstimator`); the planner answers
//! with a plan that reaches the device one RTT after the report was sent. A
//! device whose uplink was idle for a whole interval first sends a probe.
//!
//! With autoscaling, the pool's size follows `crate::autoscale`:
//! every tick the policy sees the pool (serving and starting workers), the
//! mean queue delay of the batches started since the last tick and the
//! requests waiting now. A worker it adds serves after the start delay; one
//! it removes leaves at once if idle, else when its batch is done, so no
//! request in flight is lost.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::autoscale::{AutoscaleConfig, Autoscaler, Load};
use crate::batching::{Finish, Flush, Lane, Offered, QueueConfig, QueueStats, Ticket, Waiting, WorkerQueue};
use crate::calibration::ExitLogits;
use crate::link::Link;
use crate::monitor::{Event as WatchEvent, Interval, Monitor, MonitorConfig, Observation, Refit};
use crate::outcome::{Counted, Counts, Decided, FallbackReason};
use crate::planner::{choose, CloudLoad, Codec, Costs, DeviceUplink, LinkEstimator, ModelStats, OffloadBytes, Plan};
use crate::rng::SplitMix64;

/// The model's answers for every test input, and its costs.
pub struct SimModel {
    /// `[branch - 1][input]`: (class, calibrated confidence).
    pub branch_pred: Vec<Vec<(u32, f64)>>,
    pub final_class: Vec<u32>,
    pub labels: Vec<u32>,
    /// Device compute of head(k), microseconds.
    pub head_us: Vec<f64>,
    /// Bytes of one offload request at branch k under each codec, framing
    /// included.
    pub upload_bytes: Vec<OffloadBytes>,
    /// Per branch: (batch size, microseconds) of the cloud's tail, ascending.
    pub tail_us: Vec<Vec<(usize, f64)>>,
    /// The planner's candidates.
    pub stats: ModelStats,
    /// Predictions for every plan a run can use (the candidates and the
    /// groups' own plans), to check them against what happened.
    pub predictions: ModelStats,
    /// `[branch - 1]`: the raw logits of every test input, for runs whose
    /// confidences are not the prepared ones (uncalibrated, watched).
    pub branch_logits: Vec<ExitLogits>,
    /// The scenario's temperature per branch (the watched run's start).
    pub temperatures: Vec<f64>,
    /// What a watched run's drift test holds inputs to at the start (the
    /// validation split); `None`: on-device audits against the target.
    pub reference: Option<crate::monitor::ReferenceInputs>,
    /// The test inputs as each shift corrupts them (view 1, 2, ...; view 0
    /// is the clean inputs above).
    pub shifted: Vec<View>,
    /// The final exit's class of every test input when its activation
    /// crossed the wire under a codec other than f32.
    pub codec_final: Vec<CodecClasses>,
}

/// The model's answers on one version of the test inputs.
pub struct View {
    pub branch_logits: Vec<ExitLogits>,
    pub branch_pred: Vec<Vec<(u32, f64)>>,
    pub final_class: Vec<u32>,
    pub codec_final: Vec<CodecClasses>,
}

/// The final exit's class of every input, `per_branch[k - 1][input]`,
/// when branch k's activation was sent under `codec`.
#[derive(Debug, Clone)]
pub struct CodecClasses {
    pub codec: Codec,
    pub per_branch: Vec<Vec<u32>>,
}

impl SimModel {
    /// Where an adaptive policy's devices start, before any plan reaches
    /// them: the group's branch and p_tar, with the codec its planner
    /// starts that branch with (`ModelStats::starting_codec`; the group's
    /// own if the planner has no prediction for it).
    pub fn starting_plan(&self, group: Plan, planning: &Planning) -> Plan {
        let codec = self.upload_bytes.get(group.branch - 1).and_then(|bytes| self.predictions.starting_codec(group.branch, &planning.codecs, bytes));
        Plan { codec: codec.unwrap_or(group.codec), ..group }
    }

    pub fn num_branches(&self) -> usize {
        self.branch_pred.len()
    }

    pub fn inputs(&self) -> usize {
        self.labels.len()
    }

    /// (class, prepared confidence) of input i at a branch, in a view.
    fn pred(&self, view: usize, branch: usize, input: usize) -> (u32, f64) {
        match view {
            0 => self.branch_pred[branch - 1][input],
            v => self.shifted[v - 1].branch_pred[branch - 1][input],
        }
    }

    /// The final exit's class of input i in a view.
    pub fn final_of(&self, view: usize, input: usize) -> u32 {
        match view {
            0 => self.final_class[input],
            v => self.shifted[v - 1].final_class[input],
        }
    }

    /// The final exit's class of input i in a view, offloaded at `branch`
    /// under `codec`; f32's for a codec whose answers were not recorded
    /// (no plan of the run uses it).
    pub fn final_under(&self, view: usize, codec: Codec, branch: usize, input: usize) -> u32 {
        let recorded = match view {
            0 => &self.codec_final,
            v => &self.shifted[v - 1].codec_final,
        };
        match recorded.iter().find(|c| c.codec == codec) {
            Some(c) => c.per_branch[branch - 1][input],
            None => self.final_of(view, input),
        }
    }

    /// The codecs whose answers were recorded, f32 first.
    pub fn codecs(&self) -> Vec<Codec> {
        let mut v = vec![Codec::F32];
        v.extend(self.codec_final.iter().map(|c| c.codec));
        v
    }

    fn logits(&self, view: usize, branch: usize) -> &ExitLogits {
        match view {
            0 => &self.branch_logits[branch - 1],
            v => &self.shifted[v - 1].branch_logits[branch - 1],
        }
    }

    /// Tail time of a batch of n at branch k: linear between the profiled
    /// batch sizes, and beyond them.
    pub fn tail_time_us(&self, branch: usize, n: usize) -> f64 {
        crate::costs::batch_time_us(&self.tail_us[branch - 1], n)
    }
}

#[derive(Debug, Clone)]
pub struct GroupSim {
    pub devices: usize,
    /// Inputs per second at each device at time 0 (the real-time replay's
    /// rate, which does not step).
    pub rate: f64,
    /// (start µs, inputs per second at each device), ascending from 0:
    /// one step for a constant rate.
    pub rate_steps: Vec<(u64, f64)>,
    pub deadline_us: u64,
    pub link: Link,
    pub initial: Plan,
    /// The group's p_tar as a target on-device accuracy (the watched run's).
    pub target: f64,
    /// From this time (µs) on, the group's inputs are `SimModel::shifted`'s
    /// view (from 1).
    pub shift: Option<(u64, usize)>,
    /// When the shift ends (µs), if it does: the clean inputs again.
    pub shift_until_us: Option<u64>,
    /// The group's service level and the candidates certified for it; an
    /// adaptive run plans the group's devices under it.
    pub level: Option<LevelPlanning>,
}

/// A service level as an adaptive run plans under it.
#[derive(Debug, Clone)]
pub struct LevelPlanning {
    pub level: crate::guarantee::ServiceLevel,
    /// `ModelStats::for_level`: only plans certified for the level.
    pub stats: ModelStats,
}

impl LevelPlanning {
    /// Where a device of the group starts: the lowest certified threshold
    /// at `initial`'s branch and codec (offloading everything when that
    /// branch certifies nothing).
    pub fn starting_plan(&self, initial: Plan) -> Plan {
        let at = |c: &&crate::planner::ThresholdStats| c.plan.branch == initial.branch && c.plan.codec == initial.codec;
        let p_tar = self.stats.candidates.iter().filter(at).map(|c| c.plan.p_tar).fold(1.0, f64::min);
        Plan { p_tar, ..initial }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub duration_us: u64,
    pub bin_us: u64,
    pub window_us: u64,
    pub groups: Vec<GroupSim>,
    pub workers: usize,
    pub max_batch: usize,
    pub max_wait_us: u64,
    pub report_interval_us: u64,
    pub ewma_alpha: f64,
    pub safety: f64,
    pub probe_bytes: usize,
    pub miss_bound: f64,
    /// Cloud-aware planners: the most of the pool's time the offloads may
    /// take (`Costs::pool_utilisation`).
    pub pool_utilisation: f64,
    pub autoscale: Option<AutoscaleSim>,
    /// Keep every input's latency in its bin too, for per-bin percentiles.
    /// Off unless a report plots them, so that the others' runs keep their
    /// memory and report as they were.
    pub bin_latencies: bool,
    /// The watched runs' monitor settings (the target is each group's).
    pub watch: MonitorConfig,
}

/// The worker pool's autoscaling in virtual time.
#[derive(Debug, Clone)]
pub struct AutoscaleSim {
    pub policy: AutoscaleConfig,
    pub tick_us: u64,
    pub start_delay_us: u64,
}

impl GroupSim {
    /// Inputs per second at each device at time t.
    pub fn rate_at(&self, t: u64) -> f64 {
        rate_at(&self.rate_steps, t)
    }

    /// Which view of the inputs the group sees at time t.
    pub fn view_at(&self, t: u64) -> usize {
        match self.shift {
            Some((at, view)) if t >= at && self.shift_until_us.is_none_or(|u| t < u) => view,
            _ => 0,
        }
    }
}

impl SimConfig {
    pub fn bins(&self) -> usize {
        self.duration_us.div_ceil(self.bin_us) as usize
    }

    pub fn windows(&self) -> usize {
        self.duration_us.div_ceil(self.window_us) as usize
    }
}

/// How devices get their plans in one run.
#[derive(Debug, Clone)]
pub enum Plans {
    /// One fixed plan per group.
    Fixed(Vec<Plan>),
    /// The planner, from the devices' reports.
    Adaptive(Planning),
    /// One fixed plan per group, on uncalibrated confidences (T = 1).
    Uncalibrated(Vec<Plan>),
    /// One plan per group to start with, watched: audits feed a monitor per
    /// group, whose refits set the group's temperature and threshold.
    Watched(Vec<Plan>),
    /// The one control loop (`control::GroupControl`): the planner, from the
    /// devices' reports, choosing among the candidates certified for each
    /// group's service level (`levels`, one per group) on the evidence in
    /// force, every branch watched, every change of evidence re-planning
    /// the group at once.
    Controlled { planning: Planning, levels: Vec<LevelPlanning> },
}

impl Plans {
    /// The planner's settings, for the policies it plans.
    pub fn planning(&self) -> Option<&Planning> {
        match self {
            Plans::Adaptive(p) | Plans::Controlled { planning: p, .. } => Some(p),
            _ => None,
        }
    }
}

/// What the planner of an adaptive run may choose and what it sees.
#[derive(Debug, Clone, PartialEq)]
pub struct Planning {
    /// The codecs its plans may use (f32 among them or not).
    pub codecs: Vec<Codec>,
    /// Whether it sees the worker pool's backlog (`CloudLoad`), as live
    /// planners read it from the workers' status.
    pub cloud_aware: bool,
}

impl Planning {
    /// f32 only, blind to the cloud: the planner before codecs and cloud
    /// load.
    pub fn f32_blind() -> Self {
        Planning { codecs: vec![Codec::F32], cloud_aware: false }
    }
}

/// How a run computes a branch's confidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Prepared,
    Uncalibrated,
    Watched,
    /// Each device at the temperature its plan came with.
    Controlled,
}

/// Counts of one group in one time bin, by arrival time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bin {
    /// The inputs' outcomes, counted the one way (`outcome::Counts`).
    pub counts: Counts,
    pub p_tar_sum: f64,
    pub branch_sum: u64,
    /// Adaptive runs: the planner's view at the reports in this bin.
    pub reports: u64,
    pub est_mbit_s_sum: f64,
    pub predicted_accuracy_sum: f64,
    pub predicted_miss_sum: f64,
    /// Autoscaled runs: worker-microseconds served in the bin. The pool is
    /// shared by every group, so only the first group's bins count it, and
    /// adding bins over groups counts it once.
    pub worker_us: u64,
    /// With `SimConfig::bin_latencies`: the latency of every input in the bin.
    pub latencies_us: Vec<u32>,
    /// On-device inputs whose branch answer is the final exit's.
    pub edge_agree: u64,
    /// Controlled runs: over the on-device inputs, the sum of what their
    /// plan predicted of its on-device accuracy when it was chosen.
    pub predicted_edge_sum: f64,
    /// Watched runs: audits sent.
    pub audits: u64,
    /// Offloads put on the uplink, per codec (`Codec::index`), and their
    /// bytes.
    pub sent_by_codec: [u64; 3],
    pub uplink_bytes: u64,
}

impl Bin {
    pub fn add(&mut self, o: &Bin) {
        self.counts.merge(&o.counts);
        self.p_tar_sum += o.p_tar_sum;
        self.branch_sum += o.branch_sum;
        self.reports += o.reports;
        self.est_mbit_s_sum += o.est_mbit_s_sum;
        self.predicted_accuracy_sum += o.predicted_accuracy_sum;
        self.predicted_miss_sum += o.predicted_miss_sum;
        self.worker_us += o.worker_us;
        self.latencies_us.extend_from_slice(&o.latencies_us);
        self.edge_agree += o.edge_agree;
        self.predicted_edge_sum += o.predicted_edge_sum;
        self.audits += o.audits;
        for (a, b) in self.sent_by_codec.iter_mut().zip(o.sent_by_codec) {
            *a += b;
        }
        self.uplink_bytes += o.uplink_bytes;
    }

    /// Counts one outcome under the plan it was decided with.
    pub fn count(&mut self, o: &Counted, plan: Plan) {
        self.counts.add(o);
        self.p_tar_sum += plan.p_tar;
        self.branch_sum += plan.branch as u64;
    }
}

/// One run's results: counts per (group, bin) and latencies per (group,
/// window), both by arrival time.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub bins: Vec<Vec<Bin>>,
    pub latencies_us: Vec<Vec<Vec<u32>>>,
    pub arrivals: u64,
    pub outcomes: u64,
    pub batches: u64,
    pub batched_requests: u64,
    /// Per branch: the inputs that exited there by confidence.
    pub edge: Vec<EdgeTally>,
    /// Watched runs: per group, what its monitor saw and did.
    pub watch: Vec<WatchTrace>,
    /// Plans delivered that changed a device's plan (not counting the one
    /// it starts with).
    pub plan_changes: u64,
}

/// One group's monitor over a watched run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchTrace {
    /// At the end of every bin: the live estimate beside the truth.
    pub points: Vec<WatchPoint>,
    pub refits: Vec<Refit>,
    /// Alarms not followed by a refit (a refit also alarmed).
    pub alarms_only: Vec<u64>,
    pub audits: u64,
    pub audit_bytes: u64,
    pub offload_bytes: u64,
    /// Worker time the audits take (their share of full batches).
    pub audit_worker_us: f64,
}

/// The live estimate at one time, and what it estimates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchPoint {
    pub t_us: u64,
    pub temperature: f64,
    pub threshold: f64,
    pub audits: usize,
    /// On-device agreement with the final exit, estimated from the audits.
    pub estimate: Option<Interval>,
    /// On-device accuracy against the labels, estimated from the same
    /// audits (a simulation knows the labels; a real deployment would not).
    pub estimate_accuracy: Option<Interval>,
    /// The same over every on-device input of the window (the simulation
    /// knows them all), and their accuracy against the labels.
    pub true_agreement: Option<f64>,
    pub true_accuracy: Option<f64>,
}

/// The inputs that exited at one branch because their confidence reached
/// the plan's threshold: how many were right, and what the plan in force
/// predicted for them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EdgeTally {
    pub exits: u64,
    pub correct: u64,
    /// Sum over those inputs of the predicted edge accuracy of their plan.
    pub predicted_sum: f64,
}

impl EdgeTally {
    /// Counts one exit under `plan` (`predictions` holds every plan a run
    /// can use; one it lacks adds no prediction, which the report shows).
    pub fn add(&mut self, predictions: &ModelStats, plan: Plan, correct: bool) {
        self.add_predicted(predictions.lookup(plan).map_or(f64::NAN, |s| s.edge_accuracy), correct);
    }

    /// Counts one exit whose plan predicted `predicted`.
    pub fn add_predicted(&mut self, predicted: f64, correct: bool) {
        self.exits += 1;
        self.correct += u64::from(correct);
        self.predicted_sum += predicted;
    }
}

// Event kinds, in the order they are handled within one microsecond.
const REPLY: u8 = 0;
const UPLOAD_DONE: u8 = 1;
const PROBE_DONE: u8 = 2;
const PROBE_ECHO: u8 = 3;
const CLOUD_ARRIVE: u8 = 4;
const WORKER_DONE: u8 = 5;
const BATCH_TIMER: u8 = 6;
const PLAN_ARRIVE: u8 = 7;
const REPORT: u8 = 8;
const ARRIVAL: u8 = 9;
// Autoscaled runs only, so the others' order of events is as it was.
const WORKER_READY: u8 = 10;
const SCALE_TICK: u8 = 11;
// Watched runs only: the live estimates at the end of each bin.
const ESTIMATE: u8 = 12;
// Cloud-aware runs only: the workers' statuses reach the planner.
const POOL_STATUS: u8 = 13;

/// How often workers tell their load (`branchpoint worker
/// --status-interval-ms`'s default): a cloud-aware planner sees the pool as
/// of its last status, in virtual time as live.
pub const WORKER_STATUS_INTERVAL_US: u64 = 1_000_000;

// What a REPLY event brings the device (its `b`).
const ANSWER: u32 = 0;
const EXPIRED: u32 = 1;
const REFUSED: u32 = 2;
const NO_RESPONDERS: u32 = 3;
/// Not sent: nothing was left of its budget when it reached the cloud.
const ANSWER_TOO_LATE: u32 = 4;

/// Ordered by time, then kind, then the ids: never by insertion order, so
/// the order of simultaneous arrivals (and with it which test input each
/// device gets) is the same under every policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Event {
    t: u64,
    kind: u8,
    a: u32,
    b: u32,
    /// A batch timer's generation.
    c: u64,
}

struct Device {
    group: usize,
    arrivals: SplitMix64,
    losses: SplitMix64,
    cpu_free: u64,
    uplink: DeviceUplink,
    /// Start of the probe in flight.
    probe_start: u64,
    plan: Plan,
    /// Controlled runs: the temperature of the plan's branch when the plan
    /// was chosen, and the on-device accuracy it predicted.
    temperature: f64,
    predicted_edge: f64,
    /// Watched runs: each input's audit coin (its own stream, so arrivals
    /// and losses are those of every other run).
    audits: SplitMix64,
}

struct Request {
    device: u32,
    input: u32,
    arrival: u64,
    deadline_at: u64,
    branch: usize,
    upload_start: u64,
    upload_done: u64,
    /// Half the link's RTT when the upload finished: the request's trip to
    /// the worker, and its answer's back (as the live emulation waits it).
    half_rtt: u64,
    /// The device's p_tar when the input arrived.
    p_tar: f64,
    /// The view of the inputs it came from.
    view: usize,
    /// How its activation was encoded.
    codec: Codec,
}

struct Sim<'a> {
    m: &'a SimModel,
    c: &'a SimConfig,
    events: BinaryHeap<Reverse<Event>>,
    devices: Vec<Device>,
    requests: Vec<Request>,
    pool: Pool,
    /// Plans sent, with the temperature and on-device prediction that go
    /// with each.
    plans: Vec<(Plan, f64, f64)>,
    /// Adaptive devices decline offloads they predict would miss.
    admission: bool,
    /// Adaptive runs: the planner's candidates (the codecs it may use) and
    /// whether it sees the pool's backlog.
    stats: ModelStats,
    /// Per group: the candidates certified for its service level, under an
    /// adaptive run's codecs (`None`: the group has no level).
    level_stats: Vec<Option<ModelStats>>,
    cloud_aware: bool,
    /// The pool as the workers' last statuses told it.
    cloud_seen: Option<CloudLoad>,
    /// Each device's input rate as it last reported it (its group's
    /// starting rate before), and their sum, kept as reports come (a
    /// report costs O(1), not a pass over every device), for the pool's
    /// share.
    reported_rates: Vec<f64>,
    reported_rate_sum: f64,
    next_input: u64,
    out: RunResult,
    costs: Vec<Costs>,
    rule: Rule,
    /// Watched runs, per group: its monitor, when its plan began, and its
    /// on-device decisions since then (time, agrees with the final exit,
    /// right), for the truth beside each estimate.
    monitors: Vec<Monitor>,
    /// Controlled runs, per group: its control loop.
    controls: Vec<crate::control::GroupControl>,
    plan_since: Vec<u64>,
    decided: Vec<VecDeque<(u64, bool, bool)>>,
}

/// The cloud's worker pool: each worker the live worker's batching policy
/// (`batching::WorkerQueue`) on one compute thread, as `branchpoint worker`
/// runs; a request goes to one serving worker at random, as a NATS queue
/// group hands it to one member.
struct Pool {
    scaler: Option<Autoscaler>,
    workers: Vec<SimWorker>,
    /// Which worker each request goes to.
    pick: SplitMix64,
    /// Until when worker time has been counted into the bins.
    counted_until: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WorkerState {
    /// Started, serving after the start delay (cancelled: `Gone` first).
    Starting,
    Serving,
    /// Asked to leave: takes no new request, finishes what it holds.
    Leaving,
    Gone,
}

struct SimWorker {
    queue: WorkerQueue<u32>,
    state: WorkerState,
    /// When its compute thread is free: batches handed to it run one after
    /// another.
    busy_until: u64,
    /// Batches handed to it, in order, with their compute time.
    handed: VecDeque<(Ticket, u64)>,
    /// Its counters at the last autoscaling tick, as its status tells them.
    last: QueueStats,
}

impl SimWorker {
    fn new(c: &SimConfig, state: WorkerState) -> Self {
        SimWorker { queue: WorkerQueue::new(QueueConfig::new(c.max_batch, c.max_wait_us, 1)), state, busy_until: 0, handed: VecDeque::new(), last: QueueStats::default() }
    }

    /// Serving or finishing what it holds: its time counts.
    fn running(&self) -> bool {
        matches!(self.state, WorkerState::Serving | WorkerState::Leaving)
    }
}

/// Seed of a device's streams: depends only on the run's seed and the
/// device's place, so every policy (and a real-time run) sees the same
/// arrivals. The device's loss stream uses it xor 0x5555....
pub fn device_seed(seed: u64, group: usize, index: usize) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((group as u64) << 32 | index as u64)
}

/// The rate in force at `t` of a schedule of `(start µs, rate)` steps,
/// ascending from 0 (0 for an empty one).
pub fn rate_at(steps: &[(u64, f64)], t: u64) -> f64 {
    steps.get(steps.partition_point(|s| s.0 <= t).max(1) - 1).map_or(0.0, |s| s.1)
}

/// Microseconds to the next Poisson arrival.
pub fn interarrival_us(rng: &mut SplitMix64, rate: f64) -> u64 {
    (rng.exponential(rate) * 1e6).round().max(1.0) as u64
}

/// Per group, the candidates its service level allows an adaptive run.
fn level_stats(c: &SimConfig, plans: &Plans) -> Vec<Option<ModelStats>> {
    let codecs: &[Codec] = match plans {
        Plans::Adaptive(p) => &p.codecs,
        _ => &[],
    };
    c.groups.iter().map(|g| g.level.as_ref().map(|l| l.stats.with_codecs(codecs))).collect()
}

/// One monitor per group, each on its group's plan at the scenario's
/// temperature, held to the validation split's reference where there is
/// one.
fn watch_monitors(m: &SimModel, c: &SimConfig, plans: &[Plan]) -> Vec<Monitor> {
    c.groups
        .iter()
        .zip(plans)
        .map(|(g, plan)| {
            let cfg = MonitorConfig { target: crate::risk::Target { accuracy: g.target, ..c.watch.target }, ..c.watch };
            let temperature = m.temperatures[plan.branch - 1];
            let reference = m.reference.as_ref().and_then(|r| r.reference(plan.branch, temperature, &cfg));
            Monitor::new(cfg, temperature, plan.p_tar, reference).expect("validated with the scenario")
        })
        .collect()
}

/// A controlled run's control loop per group, under its service level.
fn controls(m: &SimModel, c: &SimConfig, planning: &Planning, levels: &[LevelPlanning]) -> Vec<crate::control::GroupControl> {
    levels
        .iter()
        .map(|l| crate::control::GroupControl::new(l.level, l.stats.with_codecs(&planning.codecs), &m.temperatures, c.watch, m.reference.as_ref()))
        .collect::<crate::Result<_>>()
        .expect("levels certified with the scenario")
}

/// Where group `gi`'s devices start under `plans`.
fn starting_plan(m: &SimModel, g: &GroupSim, gi: usize, plans: &Plans) -> Plan {
    match plans {
        Plans::Fixed(p) | Plans::Uncalibrated(p) | Plans::Watched(p) => p[gi],
        Plans::Adaptive(planning) => g.level.as_ref().map_or_else(|| m.starting_plan(g.initial, planning), |l| l.starting_plan(m.starting_plan(g.initial, planning))),
        Plans::Controlled { planning, levels } => levels[gi].starting_plan(m.starting_plan(g.initial, planning)),
    }
}

/// Time of the next arrival after `t` of a Poisson process whose rate
/// steps (`(start µs, rate)`, ascending from 0). A draw that crosses into
/// the next step is redrawn from that step's start at its rate: exact, since
/// the process is memoryless. With one step this is `t + interarrival_us`,
/// draw for draw, so constant-rate scenarios keep their arrivals.
pub fn next_arrival_us(rng: &mut SplitMix64, t: u64, steps: &[(u64, f64)]) -> u64 {
    let mut from = t;
    let mut i = steps.partition_point(|s| s.0 <= from).max(1) - 1;
    loop {
        let next = from + interarrival_us(rng, steps[i].1);
        match steps.get(i + 1) {
            Some(&(start, _)) if next >= start => {
                from = start;
                i += 1;
            }
            _ => return next,
        }
    }
}

pub fn simulate(m: &SimModel, c: &SimConfig, plans: &Plans) -> RunResult {
    let (bins, windows) = (c.bins(), c.windows());
    let mut sim = Sim {
        m,
        c,
        events: BinaryHeap::new(),
        devices: Vec::new(),
        requests: Vec::new(),
        pool: Pool {
            scaler: c.autoscale.as_ref().map(|a| Autoscaler::new(a.policy.clone())),
            workers: (0..c.workers).map(|_| SimWorker::new(c, WorkerState::Serving)).collect(),
            pick: SplitMix64::new(c.seed ^ 0x9001_9001_9001_9001),
            counted_until: 0,
        },
        plans: Vec::new(),
        admission: plans.planning().is_some(),
        stats: m.stats.with_codecs(plans.planning().map_or(&[], |p| &p.codecs)),
        level_stats: level_stats(c, plans),
        cloud_aware: plans.planning().is_some_and(|p| p.cloud_aware),
        cloud_seen: None,
        reported_rates: c.groups.iter().flat_map(|g| std::iter::repeat_n(g.rate_at(0), g.devices)).collect(),
        reported_rate_sum: c.groups.iter().flat_map(|g| std::iter::repeat_n(g.rate_at(0), g.devices)).sum(),
        next_input: 0,
        out: RunResult {
            plan_changes: 0,
            bins: vec![vec![Bin::default(); bins]; c.groups.len()],
            latencies_us: vec![vec![Vec::new(); windows]; c.groups.len()],
            arrivals: 0,
            outcomes: 0,
            batches: 0,
            batched_requests: 0,
            edge: vec![EdgeTally::default(); m.num_branches()],
            watch: Vec::new(),
        },
        costs: c
            .groups
            .iter()
            .map(|g| Costs {
                head_us: m.head_us.clone(),
                upload_bytes: m.upload_bytes.clone(),
                deadline_us: g.deadline_us as f64,
                arrival_rate: g.rate_at(0),
                miss_bound: g.level.as_ref().map_or(c.miss_bound, |l| l.level.miss_bound),
                pool_utilisation: c.pool_utilisation,
                tail_us_per_request: (1..=m.num_branches()).map(|k| m.tail_time_us(k, c.max_batch) / c.max_batch as f64).collect(),
            })
            .collect(),
        rule: match plans {
            Plans::Uncalibrated(_) => Rule::Uncalibrated,
            Plans::Watched(_) => Rule::Watched,
            Plans::Controlled { .. } => Rule::Controlled,
            _ => Rule::Prepared,
        },
        monitors: Vec::new(),
        controls: Vec::new(),
        plan_since: vec![0; c.groups.len()],
        decided: vec![VecDeque::new(); c.groups.len()],
    };
    if let Plans::Watched(p) = plans {
        sim.monitors = watch_monitors(m, c, p);
        sim.out.watch = vec![WatchTrace::default(); c.groups.len()];
        if c.bin_us <= c.duration_us {
            sim.push(c.bin_us, ESTIMATE, 0, 0);
        }
    }
    if let Plans::Controlled { planning, levels } = plans {
        (sim.controls, sim.out.watch) = (controls(m, c, planning, levels), vec![WatchTrace::default(); c.groups.len()]);
    }
    let mut d = 0u32;
    for (gi, g) in c.groups.iter().enumerate() {
        let plan = starting_plan(m, g, gi, plans);
        let predicted_edge = sim.controls.get(gi).and_then(|c| c.candidates().lookup(plan)).map_or(f64::NAN, |s| s.edge_accuracy);
        for k in 0..g.devices {
            let base = device_seed(c.seed, gi, k);
            let mut arrivals = SplitMix64::new(base);
            let first = next_arrival_us(&mut arrivals, 0, &g.rate_steps);
            sim.devices.push(Device {
                group: gi,
                arrivals,
                losses: SplitMix64::new(base ^ 0x5555_5555_5555_5555),
                audits: SplitMix64::new(base ^ 0xA0D1_7A0D_17A0_D17A),
                cpu_free: 0,
                // Slower than the cap, not even the smallest upload could
                // make the deadline with no response time at all.
                uplink: DeviceUplink::new(LinkEstimator::new(
                    c.ewma_alpha,
                    g.deadline_us as f64 / m.upload_bytes.iter().map(|b| b.int8.min(b.f16).min(b.f32)).fold(f64::INFINITY, f64::min),
                )),
                probe_start: 0,
                plan,
                temperature: m.temperatures[plan.branch - 1],
                predicted_edge,
            });
            if first < c.duration_us {
                sim.push(first, ARRIVAL, d, 0);
            }
            if plans.planning().is_some() {
                // Reports spread over the first interval, not all at once.
                let offset = c.report_interval_us * (u64::from(d) + 1) / (c.groups.iter().map(|g| g.devices).sum::<usize>() as u64 + 1);
                sim.push(offset.max(1), REPORT, d, 0);
            }
            d += 1;
        }
    }
    if let Some(a) = &c.autoscale {
        if a.tick_us <= c.duration_us {
            sim.push(a.tick_us, SCALE_TICK, 0, 0);
        }
    }
    if sim.cloud_aware {
        sim.push(0, POOL_STATUS, 0, 0);
    }
    while let Some(Reverse(e)) = sim.events.pop() {
        sim.handle(e);
    }
    if c.autoscale.is_some() {
        sim.count_workers(c.duration_us);
    }
    sim.out
}

impl<'a> Sim<'a> {
    fn push(&mut self, t: u64, kind: u8, a: u32, b: u32) {
        self.events.push(Reverse(Event { t, kind, a, b, c: 0 }));
    }

    fn handle(&mut self, e: Event) {
        match e.kind {
            ARRIVAL => self.arrival(e.t, e.a),
            UPLOAD_DONE => self.upload_done(e.t, e.a),
            CLOUD_ARRIVE => self.cloud_arrive(e.t, e.a),
            WORKER_DONE => self.worker_done(e.t, e.a as usize),
            WORKER_READY => {
                if self.pool.workers[e.a as usize].state == WorkerState::Starting {
                    self.count_workers(e.t);
                    self.pool.workers[e.a as usize].state = WorkerState::Serving;
                }
            }
            SCALE_TICK => self.scale_tick(e.t),
            ESTIMATE => self.estimate(e.t),
            POOL_STATUS => {
                self.cloud_seen = Some(self.cloud_load());
                if e.t + WORKER_STATUS_INTERVAL_US < self.c.duration_us {
                    self.push(e.t + WORKER_STATUS_INTERVAL_US, POOL_STATUS, 0, 0);
                }
            }
            BATCH_TIMER => {
                let lane = Lane { model: 0, branch: e.b as u8 };
                self.pool.workers[e.a as usize].queue.timer_fired(e.t, lane, e.c);
                self.run_ready(e.t, e.a as usize);
            }
            REPLY => self.reply(e.t, e.a, e.b),
            REPORT => self.report(e.t, e.a),
            PROBE_DONE => {
                let dev = &mut self.devices[e.a as usize];
                dev.uplink.finished(e.t, dev.probe_start, self.c.probe_bytes);
                let rtt = self.c.groups[dev.group].link.rtt_us(e.t);
                self.push(e.t + rtt, PROBE_ECHO, e.a, 0);
            }
            PROBE_ECHO => {
                let dev = &mut self.devices[e.a as usize];
                let rtt = self.c.groups[dev.group].link.rtt_us(e.t);
                dev.uplink.est.observe_response(rtt as f64);
            }
            PLAN_ARRIVE => {
                let (plan, temperature, predicted_edge) = self.plans[e.b as usize];
                let dev = &mut self.devices[e.a as usize];
                self.out.plan_changes += u64::from(dev.plan != plan);
                (dev.plan, dev.temperature, dev.predicted_edge) = (plan, temperature, predicted_edge);
            }
            _ => unreachable!("unknown event kind {}", e.kind),
        }
    }

    fn bin(&mut self, group: usize, arrival: u64) -> &mut Bin {
        let i = ((arrival / self.c.bin_us) as usize).min(self.out.bins[group].len() - 1);
        &mut self.out.bins[group][i]
    }

    /// Records the one outcome of an input that arrived at `arrival`,
    /// decided under `plan`.
    fn record(&mut self, group: usize, arrival: u64, plan: Plan, o: Counted) {
        self.out.outcomes += 1;
        let keep_latency = self.c.bin_latencies;
        let latency = o.latency_us.min(u64::from(u32::MAX)) as u32;
        let b = self.bin(group, arrival);
        b.count(&o, plan);
        if keep_latency {
            b.latencies_us.push(latency);
        }
        let w = ((arrival / self.c.window_us) as usize).min(self.out.latencies_us[group].len() - 1);
        self.out.latencies_us[group][w].push(latency);
    }

    /// An input answered on the device, `latency_us` after it arrived.
    fn on_device(&mut self, group: usize, arrival: u64, plan: Plan, correct: bool, latency_us: u64, declined: bool) {
        let deadline_us = self.c.groups[group].deadline_us;
        self.record(group, arrival, plan, Counted { decided: Decided::Device, fallback: None, declined, correct, latency_us, deadline_us });
    }

    /// An offload the branch answered instead, for `reason`.
    #[allow(clippy::too_many_arguments)]
    fn fell_back(&mut self, group: usize, arrival: u64, plan: Plan, correct: bool, latency_us: u64, reason: FallbackReason) {
        let deadline_us = self.c.groups[group].deadline_us;
        self.record(group, arrival, plan, Counted { decided: Decided::Fallback, fallback: Some(reason), declined: false, correct, latency_us, deadline_us });
    }

    fn arrival(&mut self, t: u64, d: u32) {
        self.out.arrivals += 1;
        let (c, m) = (self.c, self.m);
        let dev = &mut self.devices[d as usize];
        let g = &c.groups[dev.group];
        let next = next_arrival_us(&mut dev.arrivals, t, &g.rate_steps);
        let input = (self.next_input % m.inputs() as u64) as u32;
        self.next_input += 1;
        let mut plan = dev.plan;
        let k = plan.branch;
        let start = t.max(dev.cpu_free);
        let done = start + m.head_us[k - 1].round() as u64;
        dev.cpu_free = done;
        let view = g.view_at(t);
        let (group, deadline) = (dev.group, g.deadline_us);
        let (class, conf) = match self.rule {
            Rule::Prepared => m.pred(view, k, input as usize),
            Rule::Uncalibrated => {
                let (class, conf) = m.logits(view, k).predict(input as usize, 1.0);
                (class as u32, conf)
            }
            Rule::Watched => {
                let monitor = &self.monitors[group];
                plan.p_tar = monitor.threshold();
                let (class, conf) = m.logits(view, k).predict(input as usize, monitor.temperature());
                (class as u32, conf)
            }
            Rule::Controlled => {
                let (class, conf) = m.logits(view, k).predict(input as usize, dev.temperature);
                (class as u32, conf)
            }
        };
        let watching = matches!(self.rule, Rule::Watched | Rule::Controlled);
        let coin = watching && dev.audits.next_f64() < c.watch.audit_rate;
        let sampled = coin && self.rule == Rule::Watched || self.rule == Rule::Controlled && crate::control::sampled(coin, plan.p_tar);
        let predicted_edge = dev.predicted_edge;
        let label = m.labels[input as usize];
        if next < c.duration_us {
            self.push(next, ARRIVAL, d, 0);
        }
        let on_device = plan.exits(conf);
        if watching {
            self.watch(t, group, view, plan, input as usize, on_device, sampled);
        }
        if on_device {
            match self.rule {
                // Its plan came with its own prediction (the evidence in
                // force when it was chosen).
                Rule::Controlled => self.out.edge[k - 1].add_predicted(predicted_edge, class == label),
                _ => self.out.edge[k - 1].add(&m.predictions, plan, class == label),
            }
            self.on_device(group, t, plan, class == label, done - t, false);
            let controlled = self.rule == Rule::Controlled;
            let b = self.bin(group, t);
            b.edge_agree += u64::from(class == m.final_of(view, input as usize));
            if controlled {
                b.predicted_edge_sum += predicted_edge;
            }
            return;
        }
        let bytes = m.upload_bytes[k - 1].of(plan.codec) as usize;
        if self.admission && self.devices[d as usize].uplink.would_miss(t, done, bytes, deadline, c.safety) {
            self.on_device(group, t, plan, class == label, done - t, true);
            return;
        }
        let dev = &mut self.devices[d as usize];
        let deadline_at = t + deadline;
        let up_start = done.max(dev.uplink.free_at());
        if up_start >= deadline_at {
            // Still queued at its deadline: never sent.
            self.fell_back(group, t, plan, class == label, deadline.max(done - t), FallbackReason::Deadline);
            return;
        }
        let (_, finish) = dev.uplink.enqueue(&g.link, up_start, bytes, &mut dev.losses);
        let b = self.bin(group, t);
        b.sent_by_codec[plan.codec.index()] += 1;
        b.uplink_bytes += bytes as u64;
        let finish = finish.unwrap_or(u64::MAX);
        let id = self.requests.len() as u32;
        self.requests.push(Request {
            device: d,
            input,
            arrival: t,
            deadline_at,
            branch: k,
            upload_start: up_start,
            upload_done: finish,
            half_rtt: 0,
            p_tar: plan.p_tar,
            view,
            codec: plan.codec,
        });
        if finish == u64::MAX {
            // The link never delivers it: the device answers at the deadline.
            self.fell_back(group, t, plan, class == label, deadline, FallbackReason::Deadline);
        } else {
            self.push(finish, UPLOAD_DONE, id, 0);
        }
    }

    /// A watched run's input: an audit (sampled, decided on the device) or
    /// an offload reaches the group's monitor, with the final exit's answer
    /// (at once: virtual time does not model the audit's trip, and audits
    /// take no uplink or worker time from real requests here; their cost is
    /// counted instead).
    #[allow(clippy::too_many_arguments)]
    fn watch(&mut self, t: u64, group: usize, view: usize, plan: Plan, input: usize, on_device: bool, sampled: bool) {
        let (m, k) = (self.m, plan.branch);
        let bytes = m.upload_bytes[k - 1].of(plan.codec) as u64;
        let logits = m.logits(view, k);
        let final_class = m.final_of(view, input);
        let label = m.labels[input];
        let trace = &mut self.out.watch[group];
        if on_device {
            if let Some(monitor) = self.monitors.get(group) {
                let class = logits.predict(input, monitor.temperature()).0 as u32;
                self.decided[group].push_back((t, class == final_class, class == label));
            }
            if !sampled {
                return;
            }
            trace.audits += 1;
            trace.audit_bytes += bytes;
            trace.audit_worker_us += m.tail_time_us(k, self.c.max_batch) / self.c.max_batch as f64;
            self.bin(group, t).audits += 1;
        } else {
            trace.offload_bytes += bytes;
        }
        let obs = Observation { t_us: t, logits: logits.row(input).to_vec(), final_class, label: Some(label), on_device, sampled };
        if self.rule == Rule::Controlled {
            self.control(t, group, k, obs);
            return;
        }
        match self.monitors[group].observe(obs) {
            Ok(Some(WatchEvent::Refit(r))) => {
                self.out.watch[group].refits.push(r);
                self.plan_since[group] = t;
                self.decided[group].clear();
            }
            Ok(Some(WatchEvent::Alarm { t_us })) => self.out.watch[group].alarms_only.push(t_us),
            Ok(None) => {}
            // The model's own logits are finite and well formed.
            Err(e) => unreachable!("a test input the monitor refuses: {e}"),
        }
    }

    /// A controlled run's audit or offload reaches its group's control loop;
    /// a change of evidence re-plans every device of the group at once.
    fn control(&mut self, t: u64, group: usize, branch: usize, obs: Observation) {
        match self.controls[group].observe(branch, obs) {
            Ok(Some(crate::control::Change::Void { t_us, .. })) => self.out.watch[group].alarms_only.push(t_us),
            Ok(Some(crate::control::Change::Live { refit, .. })) => self.out.watch[group].refits.push(refit),
            Ok(None) => return,
            // The model's own logits are finite and well formed.
            Err(e) => unreachable!("a test input the control loop refuses: {e}"),
        }
        let first = self.c.groups[..group].iter().map(|g| g.devices).sum::<usize>();
        for d in first..first + self.c.groups[group].devices {
            self.plan_device(t, d as u32);
        }
    }

    /// The end of a bin in a watched run: every group's live estimate, and
    /// the truth over the same inputs' population.
    fn estimate(&mut self, t: u64) {
        if t + self.c.bin_us <= self.c.duration_us {
            self.push(t + self.c.bin_us, ESTIMATE, 0, 0);
        }
        for g in 0..self.monitors.len() {
            let from = t.saturating_sub(self.c.watch.window_us).max(self.plan_since[g]);
            let decided = &mut self.decided[g];
            while decided.front().is_some_and(|d| d.0 < from) {
                decided.pop_front();
            }
            let n = decided.len();
            let rate = |f: fn(&(u64, bool, bool)) -> bool| (n > 0).then(|| decided.iter().filter(|d| f(d)).count() as f64 / n as f64);
            let (true_agreement, true_accuracy) = (rate(|d| d.1), rate(|d| d.2));
            let monitor = &self.monitors[g];
            let e = monitor.estimate(t, 0.05);
            self.out.watch[g].points.push(WatchPoint {
                t_us: t,
                temperature: monitor.temperature(),
                threshold: monitor.threshold(),
                audits: e.audits,
                estimate: e.edge_agreement,
                estimate_accuracy: e.edge_accuracy,
                true_agreement,
                true_accuracy,
            });
        }
    }

    fn upload_done(&mut self, t: u64, id: u32) {
        let r = &self.requests[id as usize];
        let dev = &mut self.devices[r.device as usize];
        dev.uplink.finished(t, r.upload_start, self.m.upload_bytes[r.branch - 1].of(r.codec) as usize);
        let half_rtt = self.c.groups[dev.group].link.rtt_us(t) / 2;
        self.requests[id as usize].half_rtt = half_rtt;
        self.push(t + half_rtt, CLOUD_ARRIVE, id, 0);
    }

    /// An offload reaches the pool: one serving worker takes it, as NATS
    /// hands a request to one member of the workers' queue group, and its
    /// batching policy queues or refuses it.
    fn cloud_arrive(&mut self, t: u64, id: u32) {
        let serving = self.pool.workers.iter().filter(|w| w.state == WorkerState::Serving).count();
        if serving == 0 {
            self.push(t, REPLY, id, NO_RESPONDERS);
            return;
        }
        let r = &self.requests[id as usize];
        // Its budget is what is left of its deadline when it is sent, less
        // the answer's trip back, as a live device sends it; with nothing
        // left, the device does not send it.
        let due_us = r.deadline_at.saturating_sub(r.half_rtt);
        if t >= due_us {
            self.push(t, REPLY, id, ANSWER_TOO_LATE);
            return;
        }
        let nth = self.pool.pick.below(serving as u64) as usize;
        let w = (0..self.pool.workers.len()).filter(|&w| self.pool.workers[w].state == WorkerState::Serving).nth(nth).expect("nth < serving");
        let lane = Lane { model: 0, branch: r.branch as u8 };
        match self.pool.workers[w].queue.offer(t, lane, Waiting { item: id, received_us: t, due_us, audit: false }) {
            Offered::Refused(..) => {
                let back = self.requests[id as usize].half_rtt;
                self.push(t + back, REPLY, id, REFUSED);
            }
            Offered::Queued(Flush::Now) => {
                self.pool.workers[w].queue.flush(t, lane);
                self.run_ready(t, w);
            }
            Offered::Queued(Flush::At { at_us, generation }) => {
                self.events.push(Reverse(Event { t: at_us, kind: BATCH_TIMER, a: w as u32, b: u32::from(lane.branch), c: generation }));
            }
            Offered::Queued(Flush::Armed) => {}
        }
    }

    /// Hands worker `w`'s ready batches to its compute thread, as its
    /// policy decides; expired requests are answered at once.
    fn run_ready(&mut self, t: u64, w: usize) {
        while let Some(next) = self.pool.workers[w].queue.next_batch(t) {
            for e in &next.expired {
                let back = self.requests[e.item as usize].half_rtt;
                self.push(t + back, REPLY, e.item, EXPIRED);
            }
            let Some(ticket) = next.ticket else { continue };
            let n = next.batch.len();
            let service = self.m.tail_time_us(usize::from(ticket.lane.branch), n).round() as u64;
            let worker = &mut self.pool.workers[w];
            let finish = t.max(worker.busy_until) + service;
            worker.busy_until = finish;
            worker.handed.push_back((ticket, service));
            self.out.batches += 1;
            self.out.batched_requests += n as u64;
            for r in &next.batch {
                let back = self.requests[r.item as usize].half_rtt;
                self.push(finish + back, REPLY, r.item, ANSWER);
            }
            self.push(finish, WORKER_DONE, w as u32, 0);
        }
        self.settle(t, w);
    }

    /// Worker `w`'s oldest batch is done.
    fn worker_done(&mut self, t: u64, w: usize) {
        let worker = &mut self.pool.workers[w];
        let (ticket, service) = worker.handed.pop_front().expect("a batch was handed to it");
        worker.queue.finished(t, ticket, Finish::Ran { took_us: service });
        self.run_ready(t, w);
    }

    /// A leaving worker that holds nothing more is gone.
    fn settle(&mut self, t: u64, w: usize) {
        let worker = &self.pool.workers[w];
        if worker.state == WorkerState::Leaving && worker.queue.is_idle() {
            self.count_workers(t);
            self.pool.workers[w].state = WorkerState::Gone;
        }
    }

    /// Counts the workers serving (leaving ones finishing what they hold
    /// included) from the last count until `t` into the bins; called
    /// before the count changes.
    fn count_workers(&mut self, t: u64) {
        let t = t.min(self.c.duration_us);
        let running = self.pool.workers.iter().filter(|w| w.running()).count() as u64;
        let mut from = self.pool.counted_until;
        while from < t {
            let i = (from / self.c.bin_us) as usize;
            let end = ((i as u64 + 1) * self.c.bin_us).min(t);
            let last = self.out.bins[0].len() - 1;
            self.out.bins[0][i.min(last)].worker_us += running * (end - from);
            from = end;
        }
        self.pool.counted_until = self.pool.counted_until.max(t);
    }

    /// One autoscaling tick: the policy sees the load as the workers'
    /// statuses tell it live (`stack up`): the pool (serving and starting),
    /// the mean over the workers of each one's congestion delay since the
    /// last tick, and the requests they hold; the pool moves toward its
    /// answer.
    fn scale_tick(&mut self, t: u64) {
        let c = self.c;
        let Some(a) = &c.autoscale else { return };
        if t + a.tick_us <= c.duration_us {
            self.push(t + a.tick_us, SCALE_TICK, 0, 0);
        }
        let (mut delay_sum, mut reporting, mut backlog) = (0.0, 0usize, 0usize);
        for w in self.pool.workers.iter_mut().filter(|w| w.running()) {
            let s = w.queue.stats();
            let answered = s.answered - w.last.answered;
            delay_sum += if answered > 0 { (s.compute_wait_us_total - w.last.compute_wait_us_total) / answered as f64 } else { 0.0 };
            reporting += 1;
            backlog += s.queue_depth;
            w.last = s;
        }
        let queue_delay_us = if reporting > 0 { delay_sum / reporting as f64 } else { 0.0 };
        let workers = self.pool.workers.iter().filter(|w| matches!(w.state, WorkerState::Serving | WorkerState::Starting)).count();
        let scaler = self.pool.scaler.as_mut().expect("autoscaled runs have a policy");
        let target = scaler.tick(Load { workers, queue_delay_us, backlog: backlog as f64 });
        for _ in workers..target {
            self.add_worker(t);
        }
        for _ in target..workers {
            self.remove_worker(t);
        }
    }

    fn add_worker(&mut self, t: u64) {
        // A worker asked to leave is still running: keeping it serves
        // sooner than starting another.
        if let Some(w) = self.pool.workers.iter_mut().rev().find(|w| w.state == WorkerState::Leaving) {
            w.state = WorkerState::Serving;
            return;
        }
        let id = self.pool.workers.len() as u32;
        self.pool.workers.push(SimWorker::new(self.c, WorkerState::Starting));
        let delay = self.c.autoscale.as_ref().map_or(0, |a| a.start_delay_us);
        self.push(t + delay, WORKER_READY, id, 0);
    }

    /// Cancels the newest start, else asks the serving worker that holds
    /// the least (the newest of those) to leave: it takes no new request,
    /// and is gone once it has answered what it holds, so work in flight is
    /// never dropped.
    fn remove_worker(&mut self, t: u64) {
        let workers = &mut self.pool.workers;
        if let Some(w) = workers.iter_mut().rev().find(|w| w.state == WorkerState::Starting) {
            w.state = WorkerState::Gone;
            return;
        }
        let Some(w) = (0..workers.len()).filter(|&w| workers[w].state == WorkerState::Serving).min_by_key(|&w| (workers[w].queue.backlog(), std::cmp::Reverse(w))) else { return };
        self.count_workers(t);
        self.pool.workers[w].state = WorkerState::Leaving;
        self.settle(t, w);
    }

    /// The pool as its workers' statuses tell it at `t`: the requests the
    /// workers hold and the workers serving (the input rates come from the
    /// devices' reports when the planner plans). The planner plans on the
    /// last status, up to one status interval old, as live planners do.
    fn cloud_load(&self) -> CloudLoad {
        let running = self.pool.workers.iter().filter(|w| w.running());
        let backlog: usize = running.clone().map(|w| w.queue.backlog()).sum();
        let workers = self.pool.workers.iter().filter(|w| w.state == WorkerState::Serving).count();
        CloudLoad { backlog: backlog as f64, workers: workers as f64, inputs_per_s: self.reported_rate_sum }
    }

    /// What reaches the device for request `id` at `t`: the cloud's answer,
    /// or a worker's refusal or expiry, or NATS's "no responders". The device
    /// answers with its branch unless the cloud's answer came in time; a
    /// reply after the deadline finds the device answered at its deadline.
    fn reply(&mut self, t: u64, id: u32, what: u32) {
        let r = &self.requests[id as usize];
        let d = r.device as usize;
        let (arrival, deadline_at, branch, input, upload_done, view, half_rtt) = (r.arrival, r.deadline_at, r.branch, r.input as usize, r.upload_done, r.view, r.half_rtt);
        let plan = Plan { branch, p_tar: r.p_tar, codec: r.codec };
        let group = self.devices[d].group;
        let deadline = self.c.groups[group].deadline_us;
        let label = self.m.labels[input];
        let branch_right = self.m.pred(view, branch, input).0 == label;
        if t > deadline_at || what == ANSWER_TOO_LATE {
            // The device stopped waiting for the worker when a reply could
            // no longer come back in time: half the RTT before its deadline.
            // All it knows is that the response took longer than that.
            self.devices[d].uplink.est.observe_response_at_least(deadline_at.saturating_sub(upload_done) as f64);
            self.fell_back(group, arrival, plan, branch_right, deadline.saturating_sub(half_rtt), FallbackReason::Deadline);
            return;
        }
        let reason = match what {
            ANSWER => {
                self.devices[d].uplink.est.observe_response((t - upload_done) as f64);
                let correct = self.m.final_under(view, plan.codec, branch, input) == label;
                let o = Counted { decided: Decided::Cloud, fallback: None, declined: false, correct, latency_us: t - arrival, deadline_us: deadline };
                self.record(group, arrival, plan, o);
                return;
            }
            EXPIRED => FallbackReason::Expired,
            REFUSED => FallbackReason::Refused,
            _ => FallbackReason::NoResponders,
        };
        self.fell_back(group, arrival, plan, branch_right, t - arrival, reason);
    }

    fn report(&mut self, t: u64, d: u32) {
        let interval = self.c.report_interval_us;
        if t + interval < self.c.duration_us {
            self.push(t + interval, REPORT, d, 0);
        }
        let dev = &mut self.devices[d as usize];
        let g = &self.c.groups[dev.group];
        dev.uplink.before_report(t);
        // Probe an uplink idle for a whole interval, or one the device has
        // not measured yet (no plan can be made without it).
        if dev.uplink.needs_probe(t, interval) {
            let (start, finish) = dev.uplink.enqueue(&g.link, t, self.c.probe_bytes, &mut dev.losses);
            dev.probe_start = start;
            if let Some(finish) = finish {
                self.push(finish, PROBE_DONE, d, 0);
            }
        }
        let group = self.devices[d as usize].group;
        // Nothing to report before the device has measured its link.
        if !self.devices[d as usize].uplink.est.is_ready() {
            return;
        }
        // The device knows the rate its inputs arrive at now.
        self.costs[group].arrival_rate = self.c.groups[group].rate_at(t);
        let rate = self.costs[group].arrival_rate;
        self.reported_rate_sum += rate - std::mem::replace(&mut self.reported_rates[d as usize], rate);
        let Some(prediction) = self.plan_device(t, d) else { return };
        let mbit = self.devices[d as usize].uplink.est.mean_mbit_s().unwrap_or(0.0);
        let b = self.bin(group, t);
        b.reports += 1;
        b.est_mbit_s_sum += mbit;
        b.predicted_accuracy_sum += prediction.accuracy;
        b.predicted_miss_sum += prediction.miss_rate;
    }

    /// The planner plans device `d` on what it last reported (nothing
    /// before it has measured its link) and sends it the plan.
    fn plan_device(&mut self, t: u64, d: u32) -> Option<crate::planner::Prediction> {
        let dev = &self.devices[d as usize];
        let seen = dev.uplink.est.conservative(self.c.safety)?;
        let group = dev.group;
        let cloud = self.cloud_seen.filter(|_| self.cloud_aware).map(|c| CloudLoad { inputs_per_s: self.reported_rate_sum, ..c });
        let seen = crate::planner::Observed { cloud, ..seen };
        let costs = &self.costs[group];
        let (prediction, temperature, predicted_edge) = match (self.controls.get(group), &self.level_stats[group], &self.c.groups[group].level) {
            (Some(control), _, _) => {
                let p = crate::planner::choose_for_level(control.candidates(), costs, &seen, control.level().minimise);
                (p, control.temperature(p.plan.branch), p.edge_accuracy)
            }
            (None, Some(stats), Some(l)) => (crate::planner::choose_for_level(stats, costs, &seen, l.level.minimise), f64::NAN, f64::NAN),
            _ => (choose(&self.stats, costs, &seen), f64::NAN, f64::NAN),
        };
        let rtt = self.c.groups[group].link.rtt_us(t);
        let idx = self.plans.len() as u32;
        self.plans.push((prediction.plan, temperature, predicted_edge));
        self.push(t + rtt.max(1), PLAN_ARRIVE, d, idx);
        Some(prediction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Segment;
    use crate::planner::ThresholdStats;

    /// 100 inputs: even ones confident at both branches and right
    /// everywhere; odd ones unsure at the branches, wrong there, right at
    /// the final exit.
    fn model() -> SimModel {
        let n = 100;
        let labels: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
        let pred = |i: usize| if i.is_multiple_of(2) { (labels[i], 0.99) } else { ((labels[i] + 1) % 10, 0.5) };
        let stat = |branch, p_tar: f64, off: f64| ThresholdStats {
            plan: Plan { branch, p_tar, codec: Codec::F32 },
            offload_rate: off,
            edge_accuracy: if off < 1.0 { 0.99 } else { 0.0 },
            cloud_accuracy: 1.0,
            fallback_accuracy: 0.0,
            measured_edge_accuracy: 1.0,
            measured_cloud_accuracy: 1.0,
            certified: None,
        };
        let stats = ModelStats { candidates: vec![stat(2, 0.0, 0.0), stat(2, 0.9, 0.5), stat(2, 1.0, 1.0)], validation_inputs: 0 };
        let branch_logits = vec![logits_of(&(0..n).map(pred).collect::<Vec<_>>(), &labels); 2];
        // After a shift, every input is confident at the branches, and
        // the odd ones are still wrong there.
        let confident: Vec<(u32, f64)> = (0..n).map(|i| (pred(i).0, 0.99)).collect();
        let shifted =
            View { branch_logits: vec![logits_of(&confident, &labels); 2], branch_pred: vec![confident.clone(), confident], final_class: labels.clone(), codec_final: Vec::new() };
        SimModel {
            branch_pred: vec![(0..n).map(pred).collect(), (0..n).map(pred).collect()],
            final_class: labels.clone(),
            labels: labels.clone(),
            head_us: vec![1_000.0, 2_000.0],
            upload_bytes: vec![OffloadBytes::same(25_000.0), OffloadBytes::same(12_500.0)],
            codec_final: Vec::new(),
            tail_us: vec![vec![(1, 500.0), (32, 8_000.0)], vec![(1, 400.0), (32, 6_000.0)]],
            predictions: stats.clone(),
            stats,
            branch_logits,
            temperatures: vec![1.0, 1.0],
            reference: None,
            shifted: vec![shifted],
        }
    }

    /// Ten-class logits whose softmax puts `conf` on `class`.
    fn logits_of(pred: &[(u32, f64)], labels: &[u32]) -> ExitLogits {
        let mut z = Vec::new();
        for &(class, conf) in pred {
            let mut row = [0f32; 10];
            row[class as usize] = (conf * 9.0 / (1.0 - conf)).ln() as f32;
            z.extend(row);
        }
        ExitLogits::new(10, z, labels.iter().map(|&y| i64::from(y)).collect()).unwrap()
    }

    fn config(link: Link) -> SimConfig {
        SimConfig {
            seed: 3,
            duration_us: 20_000_000,
            bin_us: 1_000_000,
            window_us: 5_000_000,
            groups: vec![GroupSim {
                devices: 4,
                rate: 5.0,
                rate_steps: vec![(0, 5.0)],
                deadline_us: 100_000,
                link,
                initial: Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 },
                target: 0.9,
                shift: None,
                shift_until_us: None,
                level: None,
            }],
            workers: 2,
            max_batch: 8,
            max_wait_us: 2_000,
            report_interval_us: 1_000_000,
            ewma_alpha: 0.25,
            safety: 2.0,
            probe_bytes: 15_000,
            miss_bound: 0.05,
            pool_utilisation: 0.9,
            autoscale: None,
            bin_latencies: false,
            watch: MonitorConfig {
                audit_rate: 0.5,
                target: crate::risk::Target { accuracy: 0.9, delta: 0.1 },
                window_us: 10_000_000,
                max_observations: 10_000,
                drift_margin: 0.1,
                alarm_alpha: 0.01,
                auto_refit: true,
                min_refit_interval_us: 5_000_000,
                min_refit_sample: 40,
            },
        }
    }

    /// The watched run sees the shift, refits, and stops keeping the wrong
    /// inputs; the static and uncalibrated runs keep them on the device.
    /// Without a shift, nothing is refit and the runs decide alike.
    #[test]
    fn a_watched_run_detects_a_shift_and_refits() {
        let m = model();
        let mut c = config(Link::constant(100.0, 10_000, 0.0).unwrap());
        let plans = vec![Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }];
        let calm = simulate(&m, &c, &Plans::Watched(plans.clone()));
        assert!(calm.watch[0].refits.is_empty() && calm.watch[0].alarms_only.is_empty(), "{:?}", calm.watch[0].refits);
        assert_eq!(total(&calm).counts.on_device, total(&simulate(&m, &c, &Plans::Fixed(plans.clone()))).counts.on_device, "audits change no outcome");
        assert!(calm.watch[0].audits > 0 && calm.watch[0].audit_bytes > 0);
        c.groups[0].shift = Some((5_000_000, 1));
        let watched = simulate(&m, &c, &Plans::Watched(plans.clone()));
        let fixed = simulate(&m, &c, &Plans::Fixed(plans.clone()));
        let refit = *watched.watch[0].refits.first().expect("the shift is detected and refit");
        assert!(refit.t_us > 5_000_000 && refit.t_us < 12_000_000, "{refit:?}");
        // After the refit, the watched devices keep (nearly) nothing wrong;
        // the fixed plan keeps every input, half of them wrong.
        let after = |r: &RunResult| {
            let mut t = Bin::default();
            r.bins[0][(refit.t_us / c.bin_us) as usize + 1..].iter().for_each(|b| t.add(b));
            t
        };
        let (w, f) = (after(&watched), after(&fixed));
        assert!(f.counts.on_device > 0 && (f.counts.edge_correct as f64) < 0.6 * f.counts.on_device as f64, "{f:?}");
        assert!(w.counts.on_device == 0 || w.counts.edge_correct as f64 >= 0.9 * w.counts.on_device as f64, "{w:?}");
        assert_eq!(watched.arrivals, watched.outcomes);
        // Estimates at the end of every bin, each beside its truth.
        assert_eq!(watched.watch[0].points.len(), c.bins());
        let before: Vec<&WatchPoint> = watched.watch[0].points.iter().filter(|p| p.t_us <= 5_000_000 && p.estimate.is_some()).collect();
        assert!(before.iter().all(|p| p.true_agreement == Some(0.5) || p.true_agreement == Some(1.0)), "{before:?}");
        // The uncalibrated run reads the same logits at T = 1: the same decisions here.
        assert_eq!(total(&simulate(&m, &c, &Plans::Uncalibrated(plans))).counts.on_device, total(&fixed).counts.on_device);
    }

    /// The adaptive policy's control loop: calm, it plans once per device
    /// and never alarms; after a shift its alarm voids the validation
    /// evidence (every device offloads everything at once), the refit
    /// follows within a few seconds (every offload a sample), and nothing
    /// is then answered on the device that its evidence does not certify.
    #[test]
    fn a_controlled_run_voids_its_evidence_on_a_shift_and_replans_on_the_refit() {
        let m = model();
        let mut c = config(Link::constant(100.0, 10_000, 0.0).unwrap());
        let level = crate::guarantee::ServiceLevel { accuracy: 0.9, delta: 0.1, miss_bound: 0.05, minimise: crate::guarantee::Minimise::Offloads };
        let stats = ModelStats { candidates: m.stats.candidates.iter().filter(|s| s.plan.p_tar > 0.0).copied().collect(), validation_inputs: 0 };
        let plans = Plans::Controlled { planning: Planning::f32_blind(), levels: vec![LevelPlanning { level, stats }] };
        let devices = c.groups[0].devices as u64;
        let calm = simulate(&m, &c, &plans);
        assert!(calm.watch[0].refits.is_empty() && calm.watch[0].alarms_only.is_empty(), "{:?}", calm.watch[0]);
        assert!(calm.plan_changes <= devices, "calm, the plan does not flap: {} changes", calm.plan_changes);
        c.groups[0].shift = Some((5_000_000, 1));
        let r = simulate(&m, &c, &plans);
        let alarm = *r.watch[0].alarms_only.first().expect("the shift is detected");
        let refit = *r.watch[0].refits.first().expect("and refit");
        assert!(alarm > 5_000_000 && alarm < 12_000_000, "alarm at {alarm} us");
        assert!(refit.t_us >= alarm && refit.t_us < alarm + 3_000_000, "refit at {} us, alarm at {alarm}", refit.t_us);
        assert!(r.plan_changes >= devices, "every device re-planned: {} changes", r.plan_changes);
        // Half the shifted inputs are wrong at any confidence: the refit
        // certifies nothing, and no device answers on its own after it.
        assert_eq!(refit.threshold, 1.0, "{refit:?}");
        let mut after = Bin::default();
        r.bins[0][(refit.t_us / c.bin_us) as usize + 1..].iter().for_each(|b| after.add(b));
        assert!(after.counts.inputs > 0 && after.counts.on_device == 0, "{:?}", after.counts);
        assert_eq!(r.arrivals, r.outcomes);
    }

    fn total(r: &RunResult) -> Bin {
        let mut t = Bin::default();
        r.bins.iter().flatten().for_each(|b| t.add(b));
        t
    }

    /// A plan's codec decides the bytes on the uplink and which final
    /// answers come back: int8 here sends a quarter of f32's bytes, misses
    /// less on a 2 Mbit/s link, and its final exit is wrong on the inputs
    /// the codec damaged (input 1 mod 4).
    #[test]
    fn a_plans_codec_sets_its_bytes_and_its_answers() {
        let mut m = model();
        m.upload_bytes = vec![OffloadBytes { f32: 25_000.0, f16: 12_500.0, int8: 6_250.0 }, OffloadBytes { f32: 12_500.0, f16: 6_250.0, int8: 3_125.0 }];
        let damaged: Vec<u32> = (0..m.inputs()).map(|i| if i % 4 == 1 { (m.final_class[i] + 1) % 10 } else { m.final_class[i] }).collect();
        m.codec_final = vec![CodecClasses { codec: Codec::Int8, per_branch: vec![damaged.clone(), damaged] }];
        let c = config(Link::constant(2.0, 10_000, 0.0).unwrap());
        let run = |codec| total(&simulate(&m, &c, &Plans::Fixed(vec![Plan { branch: 2, p_tar: 0.9, codec }])));
        let (f32, int8) = (run(Codec::F32), run(Codec::Int8));
        assert_eq!((f32.counts.inputs, f32.counts.offloaded), (int8.counts.inputs, int8.counts.offloaded), "the same inputs offloaded");
        assert_eq!(f32.uplink_bytes, 12_500 * f32.sent_by_codec[Codec::F32.index()]);
        assert_eq!(int8.uplink_bytes, 3_125 * int8.sent_by_codec[Codec::Int8.index()]);
        assert_eq!((f32.sent_by_codec[Codec::Int8.index()], int8.sent_by_codec[Codec::F32.index()]), (0, 0));
        assert!(int8.counts.misses < f32.counts.misses, "a quarter of the bytes misses less: {int8:?} vs {f32:?}");
        // Every odd input is offloaded; half of those (1 mod 4) come back
        // wrong under int8.
        assert!(int8.counts.cloud > 20 && int8.counts.correct < int8.counts.inputs - int8.counts.cloud / 3, "{int8:?}");
        assert!(f32.counts.correct + f32.counts.fallbacks >= f32.counts.inputs, "f32's cloud answers are right: {f32:?}");
    }

    #[test]
    fn a_fast_link_answers_every_offload_in_the_cloud() {
        let m = model();
        let c = config(Link::constant(100.0, 10_000, 0.0).unwrap());
        let r = simulate(&m, &c, &Plans::Fixed(vec![Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }]));
        let t = total(&r);
        assert_eq!(r.arrivals, r.outcomes);
        assert_eq!(t.counts.inputs, r.arrivals);
        assert!(t.counts.inputs > 300, "4 devices x 5/s x 20 s: {}", t.counts.inputs);
        assert_eq!(t.counts.offloaded, t.counts.cloud, "every offload answered");
        assert_eq!((t.counts.misses, t.counts.fallbacks), (0, 0));
        assert_eq!(t.counts.correct, t.counts.inputs, "confident inputs right on the device, the rest right in the cloud");
        assert!(t.counts.offloaded * 3 > t.counts.inputs && t.counts.offloaded * 3 < 2 * t.counts.inputs, "about half offloaded: {t:?}");
        assert!(r.batches > 0 && r.batched_requests == t.counts.cloud);
        // The same seed, the same run.
        assert_eq!(simulate(&m, &c, &Plans::Fixed(vec![Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }])).bins, r.bins);
    }

    #[test]
    fn a_dead_link_turns_offloads_into_fallbacks_and_the_planner_stops_offloading() {
        let m = model();
        let dead = Link::schedule(vec![
            Segment { at_us: 0, uplink_mbit_s: 100.0, rtt_us: 10_000, loss: 0.0 },
            Segment { at_us: 5_000_000, uplink_mbit_s: 0.0, rtt_us: 10_000, loss: 0.0 },
        ])
        .unwrap();
        let c = config(dead);
        let fixed = total(&simulate(&m, &c, &Plans::Fixed(vec![Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }])));
        assert_eq!(fixed.counts.misses, fixed.counts.fallbacks);
        assert!(fixed.counts.fallbacks * 2 > fixed.counts.offloaded, "after 5 s nothing gets through: {fixed:?}");
        let r = simulate(&m, &c, &Plans::Adaptive(Planning::f32_blind()));
        let late: Bin = r.bins[0][10..].iter().fold(Bin::default(), |mut a, b| {
            a.add(b);
            a
        });
        assert_eq!(r.arrivals, r.outcomes);
        assert_eq!(late.counts.offloaded, 0, "the planner keeps inputs on the device once the link is dead: {late:?}");
        assert!(total(&r).counts.misses < fixed.counts.misses / 4, "adaptive {:?} vs fixed {fixed:?}", total(&r));
        // Stalls count as the cap: 100 ms / 12,500 bytes = 8 us per byte = 1 Mbit/s.
        assert!(late.reports > 0 && late.est_mbit_s_sum / (late.reports as f64) < 1.5);
    }

    #[test]
    fn a_single_rate_step_draws_the_same_arrivals_as_a_constant_rate() {
        let (mut a, mut b) = (SplitMix64::new(9), SplitMix64::new(9));
        let mut t = 0;
        for _ in 0..1_000 {
            let next = next_arrival_us(&mut a, t, &[(0, 7.0)]);
            assert_eq!(next, t + interarrival_us(&mut b, 7.0));
            t = next;
        }
    }

    #[test]
    fn arrivals_follow_the_rate_of_each_step() {
        // 5/s for 100 s, then 50/s for 100 s, then 5/s again.
        let steps = [(0, 5.0), (100_000_000, 50.0), (200_000_000, 5.0)];
        let mut rng = SplitMix64::new(4);
        let mut counts = [0u32; 3];
        let mut t = next_arrival_us(&mut rng, 0, &steps);
        while t < 300_000_000 {
            counts[(t / 100_000_000) as usize] += 1;
            t = next_arrival_us(&mut rng, t, &steps);
        }
        assert!((400..600).contains(&counts[0]) && (400..600).contains(&counts[2]), "{counts:?}");
        assert!((4_700..5_300).contains(&counts[1]), "{counts:?}");
    }

    /// A cloud that one worker cannot keep up with at 1,000 inputs/s, and
    /// a load that steps from 40/s to 1,000/s at 5 s and back at 15 s.
    fn load_step(max_workers: usize) -> (SimModel, SimConfig) {
        let mut m = model();
        m.tail_us = vec![vec![(1, 5_000.0), (32, 60_000.0)], vec![(1, 5_000.0), (32, 60_000.0)]];
        let mut c = config(Link::constant(100.0, 10_000, 0.0).unwrap());
        c.duration_us = 30_000_000;
        c.workers = 1;
        c.groups[0].devices = 20;
        c.groups[0].deadline_us = 200_000;
        c.groups[0].rate_steps = vec![(0, 2.0), (5_000_000, 50.0), (15_000_000, 2.0)];
        c.groups[0].rate = 2.0;
        c.bin_latencies = true;
        c.autoscale = Some(AutoscaleSim {
            policy: AutoscaleConfig { min_workers: 1, max_workers, up_queue_delay_us: 10_000.0, down_queue_delay_us: 3_000.0, down_after_ticks: 3, ..AutoscaleConfig::default() },
            tick_us: 1_000_000,
            start_delay_us: 1_000_000,
        });
        (m, c)
    }

    #[test]
    fn the_pool_grows_with_the_load_step_and_shrinks_back_without_losing_work() {
        let (m, c) = load_step(4);
        let cloud_only = Plans::Fixed(vec![Plan { branch: 2, p_tar: 1.0, codec: Codec::F32 }]);
        let r = simulate(&m, &c, &cloud_only);
        assert_eq!(r.arrivals, r.outcomes, "workers leave only when idle: no request is lost");
        let workers: Vec<f64> = r.bins[0].iter().map(|b| b.worker_us as f64 / 1e6).collect();
        assert!(workers.iter().all(|&w| (1.0..=4.0).contains(&w)), "{workers:?}");
        assert_eq!(workers[..5], [1.0; 5], "the light load needs one worker: {workers:?}");
        assert!(workers[5..10].iter().any(|&w| w > 1.0), "the pool grows within 5 s of the step: {workers:?}");
        assert_eq!(workers[29], 1.0, "back to min_workers after the step: {workers:?}");
        assert!(r.bins[0].iter().map(|b| b.latencies_us.len() as u64).sum::<u64>() == r.outcomes);

        // One worker throughout: the same arrivals, far more offloads the
        // pool could not answer (refused at once or expired: the workers'
        // policy answers them before their deadline, so they fall back
        // rather than miss).
        let (m, fixed) = load_step(1);
        let one = simulate(&m, &fixed, &cloud_only);
        assert_eq!(one.arrivals, r.arrivals);
        assert!(one.bins[0].iter().all(|b| b.worker_us == 1_000_000));
        let (scaled, single) = (total(&r).counts.fallbacks, total(&one).counts.fallbacks);
        assert!(scaled * 2 < single, "autoscaled fallbacks {scaled}, one worker {single}");
        let t = total(&one).counts;
        assert!(t.fallbacks_for(FallbackReason::Refused) + t.fallbacks_for(FallbackReason::Expired) > t.fallbacks / 2, "the overloaded worker refuses and expires: {t:?}");
        // The same seed, the same run.
        assert_eq!(simulate(&m, &c, &cloud_only).bins, r.bins);
    }

    /// A step to twice what one worker serves: the planner blind to the
    /// cloud keeps offloading half the inputs into a queue that grows; the
    /// cloud-aware one keeps each device within its share of the pool and
    /// misses far less, at the same arrivals.
    #[test]
    fn the_cloud_aware_planner_keeps_offloads_within_the_pools_share() {
        // A fleet: 500 devices, each offloading about once a second or
        // less, so that its own response times say little about the pool.
        let (m, mut c) = load_step(1);
        c.groups[0].devices = 500;
        c.groups[0].rate_steps = vec![(0, 0.1), (5_000_000, 2.0), (15_000_000, 0.1)];
        c.groups[0].rate = 0.1;
        // Offloads the pool did not answer in time, whether it refused them,
        // expired them or answered late.
        let step = |r: &RunResult| r.bins[0][5..15].iter().map(|b| b.counts.fallbacks + b.counts.misses - b.counts.fallbacks_for(FallbackReason::Deadline)).sum::<u64>();
        let blind = simulate(&m, &c, &Plans::Adaptive(Planning::f32_blind()));
        let aware = simulate(&m, &c, &Plans::Adaptive(Planning { codecs: vec![Codec::F32], cloud_aware: true }));
        assert_eq!(blind.arrivals, aware.arrivals);
        let (b, a) = (step(&blind), step(&aware));
        // Planning on the workers' statuses, up to a second old, as live
        // planners do: about a third fewer (two thirds fewer when the
        // planner saw the pool at every report, fresher than a status can).
        assert!(b > 100 && a * 4 < b * 3, "offloads not answered in the step: blind {b}, cloud-aware {a}");
        // Before the step both offload alike: the share binds only beyond
        // what the pool serves.
        let offloaded = |r: &RunResult| r.bins[0][..5].iter().map(|b| b.counts.offloaded).sum::<u64>();
        assert_eq!(offloaded(&blind), offloaded(&aware));
        // With a share no pool reaches, the cloud-aware planner is back to
        // the backlog alone.
        let mut unlimited = c.clone();
        unlimited.pool_utilisation = 1e9;
        let backlog_only = simulate(&m, &unlimited, &Plans::Adaptive(Planning { codecs: vec![Codec::F32], cloud_aware: true }));
        assert!(step(&backlog_only) > a, "the share, not the backlog, made the difference: {} vs {a}", step(&backlog_only));
    }

    #[test]
    fn tail_time_interpolates_between_profiled_batches() {
        let m = model();
        assert_eq!(m.tail_time_us(1, 1), 500.0);
        assert_eq!(m.tail_time_us(1, 32), 8_000.0);
        assert!((m.tail_time_us(1, 16) - (500.0 + 7_500.0 * 15.0 / 31.0)).abs() < 1e-9);
        assert!(m.tail_time_us(1, 64) > 8_000.0);
    }
}
