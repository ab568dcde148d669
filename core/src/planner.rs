//! The partition planner's decision, as pure computation: given what
//! calibration predicts about each branch, threshold and activation codec,
//! the compute costs, what a device observes of its network and what the
//! workers report of their load, choose the partition branch, p_tar and
//! codec with the best predicted accuracy whose predicted deadline-miss
//! rate stays under a bound.
//!
//! Thresholds: an input exits at branch k when its calibrated confidence is
//! at least p_tar. In a plan, p_tar = 0 means every input exits (device
//! only) and p_tar = 1 means every input is offloaded (cloud only); values in
//! between are ordinary targets.
//!
//! Predictions come from the validation split, without its labels: with
//! calibrated branches the mean confidence of the inputs that exit *is* the
//! expected edge accuracy, which is the point of calibrating (Pacheco et al.,
//! ICC 2021). The labels are used only to report how good the predictions
//! were.
use serde::{Deserialize, Serialize};

use crate::calibration::ExitLogits;
use crate::error::{CoreError, Result};
use crate::risk::Target;
pub use branchpoint_messages::Codec;

/// A device's partition branch, threshold and activation codec.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub branch: usize,
    pub p_tar: f64,
    /// How offloaded activations are encoded (f32 in plans from before
    /// codecs).
    #[serde(default)]
    pub codec: Codec,
}

impl Plan {
    /// A plan that offloads f32 activations.
    pub fn f32(branch: usize, p_tar: f64) -> Self {
        Plan { branch, p_tar, codec: Codec::F32 }
    }

    /// Whether an input with this calibrated confidence stays on the device.
    pub fn exits(&self, confidence: f64) -> bool {
        self.p_tar < 1.0 && confidence >= self.p_tar
    }
}

/// What calibration predicts for one (branch, p_tar) on validation inputs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThresholdStats {
    pub plan: Plan,
    pub offload_rate: f64,
    /// Mean calibrated branch confidence of the inputs that exit.
    pub edge_accuracy: f64,
    /// Mean calibrated final-exit confidence of the inputs offloaded, their
    /// activations encoded with the plan's codec.
    pub cloud_accuracy: f64,
    /// Mean calibrated branch confidence of the inputs offloaded: what a
    /// fallback to the branch's answer is worth.
    pub fallback_accuracy: f64,
    /// The same four as measured with the validation labels, for reports.
    pub measured_edge_accuracy: f64,
    pub measured_cloud_accuracy: f64,
    /// Set when `plan.p_tar` is the threshold certified for this target
    /// (`guarantee::certify_plans`) rather than a target in itself.
    #[serde(default)]
    pub certified: Option<Target>,
}

/// Predictions for every candidate plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelStats {
    pub candidates: Vec<ThresholdStats>,
    /// Validation inputs the predictions come from (0: not known).
    #[serde(default)]
    pub validation_inputs: usize,
}

/// The default candidate thresholds: device only (0), 0.5 to 0.95 in steps
/// of 0.05, 0.97, 0.99, and cloud only (1).
pub fn default_candidate_p_tars() -> Vec<f64> {
    let mut v = vec![0.0];
    v.extend((0..10).map(|i| ((0.5 + 0.05 * f64::from(i)) * 100.0).round() / 100.0));
    v.extend([0.97, 0.99, 1.0]);
    v
}

/// A candidate threshold of one branch: a p_tar, or the threshold
/// certified for a target.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub p_tar: f64,
    pub certified: Option<Target>,
}

impl ModelStats {
    /// `validation`: one `ExitLogits` per exit (branches, then final);
    /// `temperatures`: one per exit. The same `p_tars` at every branch;
    /// f32 plans, and plans of every codec in `codecs`.
    pub fn from_validation(validation: &[ExitLogits], temperatures: &[f64], p_tars: &[f64], codecs: &[CodecFinals]) -> Result<Self> {
        let per_branch: Vec<Vec<Candidate>> = (0..validation.len().saturating_sub(1)).map(|_| p_tars.iter().map(|&p_tar| Candidate { p_tar, certified: None }).collect()).collect();
        Self::for_candidates(validation, temperatures, &per_branch, codecs)
    }

    /// Certified candidates: per branch, device only (0), cloud only (1),
    /// and for each target accuracy in `accuracies` at `delta` the lowest
    /// threshold certified on the validation split for every branch at
    /// once (`certified_candidates`; cloud only when none is), on the
    /// temperature-scaled confidences.
    pub fn certified(validation: &[ExitLogits], temperatures: &[f64], accuracies: &[f64], delta: f64, codecs: &[CodecFinals]) -> Result<Self> {
        let per_branch = certified_candidates(validation, temperatures, accuracies, delta)?;
        Self::for_candidates(validation, temperatures, &per_branch, codecs)
    }

    /// The candidates a planner keeping `level` may choose: per branch, the
    /// lowest threshold certified for the level (every branch certified at
    /// once, `guarantee::certify_plans`: the chosen plan keeps the level
    /// whichever it is), the default p_tars above it that are certified
    /// too, and offloading everything. Refused, naming the most the
    /// validation split certifies, when no branch certifies anything.
    pub fn for_level(validation: &[ExitLogits], temperatures: &[f64], level: &crate::guarantee::ServiceLevel, codecs: &[CodecFinals]) -> Result<Self> {
        use crate::guarantee::{certify_plans, plan_grid, require_certifiable, Correction, Promise};
        level.validate()?;
        let exits = validation.len();
        if exits < 2 || temperatures.len() != exits {
            return Err(CoreError::InvalidArgument { what: "service level candidates".into(), reason: format!("{exits} exits and {} temperatures", temperatures.len()) });
        }
        let counts: Vec<crate::risk::ConfidenceCounts> = (0..exits - 1).map(|b| crate::risk::ConfidenceCounts::of_exit(&validation[b], temperatures[b])).collect::<Result<_>>()?;
        let grid = plan_grid();
        let certificate = certify_plans(&counts, level.target(), Promise::Population, Correction::FixedSequenceUnion, &grid)?;
        require_certifiable(&certificate, &counts, &grid, Promise::Population)?;
        let per_branch: Vec<Vec<Candidate>> = certificate
            .branches
            .iter()
            .map(|b| {
                let certified = Some(level.target());
                let mut v: Vec<Candidate> = b.lowest().into_iter().map(|p_tar| Candidate { p_tar, certified }).collect();
                v.extend(
                    default_candidate_p_tars().into_iter().filter(|&p| p < 1.0 && b.lowest().is_some_and(|l| p > l) && b.covers(p)).map(|p_tar| Candidate { p_tar, certified }),
                );
                v.push(Candidate { p_tar: 1.0, certified: None });
                v
            })
            .collect();
        Self::for_candidates(validation, temperatures, &per_branch, codecs)
    }

    /// Statistics for explicit candidates, `per_branch[k]` for branch k + 1:
    /// each as an f32 plan, and as a plan of every codec in `codecs` (whose
    /// offloaded inputs get the final exit's answers on the decoded
    /// activation).
    pub fn for_candidates(validation: &[ExitLogits], temperatures: &[f64], per_branch: &[Vec<Candidate>], codecs: &[CodecFinals]) -> Result<Self> {
        let exits = validation.len();
        if exits < 2 || temperatures.len() != exits || per_branch.len() != exits - 1 {
            return Err(CoreError::InvalidArgument {
                what: "planner statistics".into(),
                reason: format!("{exits} exits of validation logits, {} temperatures and {} branches of candidates", temperatures.len(), per_branch.len()),
            });
        }
        let n = validation[exits - 1].len();
        if let Some(c) = codecs.iter().find(|c| c.codec == Codec::F32 || c.per_branch.len() != exits - 1 || c.per_branch.iter().any(|f| f.len() != n)) {
            return Err(CoreError::InvalidArgument {
                what: "codec answers".into(),
                reason: format!("{}: need the final exit's answers on all {n} validation inputs from each of the {} branches (f32 is the plain answers)", c.codec, exits - 1),
            });
        }
        if let Some(c) = per_branch.iter().flatten().find(|c| branchpoint_messages::PTar::plan(c.p_tar).is_err()) {
            return Err(CoreError::InvalidArgument { what: "candidate p_tar".into(), reason: branchpoint_messages::MessageError::PTar(c.p_tar).to_string() });
        }
        let fin = &validation[exits - 1];
        let t_final = temperatures[exits - 1];
        let finals: Vec<(usize, f64)> = (0..n).map(|i| fin.predict(i, t_final)).collect();
        let mut candidates = Vec::new();
        for (b, branch) in validation[..exits - 1].iter().enumerate() {
            let preds: Vec<(usize, f64)> = (0..n).map(|i| branch.predict(i, temperatures[b])).collect();
            let mut by_codec: Vec<(Codec, Vec<(usize, f64)>)> = vec![(Codec::F32, finals.clone())];
            by_codec.extend(codecs.iter().map(|c| (c.codec, (0..n).map(|i| c.per_branch[b].predict(i, t_final)).collect())));
            for (c, (codec, finals)) in per_branch[b].iter().flat_map(|c| by_codec.iter().map(move |f| (c, f))) {
                let plan = Plan { branch: b + 1, p_tar: c.p_tar, codec: *codec };
                let (mut ne, mut conf_e, mut right_e) = (0usize, 0.0, 0usize);
                let (mut no, mut conf_c, mut conf_f, mut right_c) = (0usize, 0.0, 0.0, 0usize);
                for i in 0..n {
                    let (class, conf) = preds[i];
                    if plan.exits(conf) {
                        ne += 1;
                        conf_e += conf;
                        right_e += usize::from(class as i64 == branch.labels[i]);
                    } else {
                        no += 1;
                        conf_c += finals[i].1;
                        conf_f += conf;
                        right_c += usize::from(finals[i].0 as i64 == fin.labels[i]);
                    }
                }
                let mean = |s: f64, k: usize| if k == 0 { 0.0 } else { s / k as f64 };
                candidates.push(ThresholdStats {
                    plan,
                    offload_rate: no as f64 / n.max(1) as f64,
                    edge_accuracy: mean(conf_e, ne),
                    cloud_accuracy: mean(conf_c, no),
                    fallback_accuracy: mean(conf_f, no),
                    measured_edge_accuracy: mean(right_e as f64, ne),
                    measured_cloud_accuracy: mean(right_c as f64, no),
                    certified: c.certified,
                });
            }
        }
        Ok(Self { candidates, validation_inputs: n })
    }

    /// Predicted accuracies closer than this count as equal: the weight of
    /// one validation input (a prediction is a mean over them, so a smaller
    /// difference is less than one input's answer), and never less than
    /// `ACCURACY_TOLERANCE`.
    pub fn accuracy_tolerance(&self) -> f64 {
        match self.validation_inputs {
            0 => ACCURACY_TOLERANCE,
            n => (1.0 / n as f64).max(ACCURACY_TOLERANCE),
        }
    }

    /// The codec a planner choosing among `codecs` starts `branch` with,
    /// before it has seen the link: the fewest bytes (`bytes`, that
    /// branch's) among the codecs whose cloud-only plan predicts an
    /// accuracy within `accuracy_tolerance` of the best one's. On an
    /// unknown link the smaller upload is the safer one, and it costs no
    /// accuracy the planner can tell apart. `None` without a cloud-only
    /// candidate of any of them.
    pub fn starting_codec(&self, branch: usize, codecs: &[Codec], bytes: &OffloadBytes) -> Option<Codec> {
        let accuracy = |codec: Codec| self.lookup(Plan { branch, p_tar: 1.0, codec }).map(|s| s.cloud_accuracy);
        let best = codecs.iter().filter_map(|&c| accuracy(c)).fold(f64::NEG_INFINITY, f64::max);
        let tolerance = self.accuracy_tolerance();
        codecs.iter().copied().filter(|&c| accuracy(c).is_some_and(|a| a >= best - tolerance)).min_by(|a, b| bytes.of(*a).total_cmp(&bytes.of(*b)))
    }

    /// The candidates whose codec is one of `codecs`.
    pub fn with_codecs(&self, codecs: &[Codec]) -> Self {
        Self { candidates: self.candidates.iter().filter(|c| codecs.contains(&c.plan.codec)).cloned().collect(), validation_inputs: self.validation_inputs }
    }

    /// The statistics of `plan`, if it is a candidate.
    pub fn lookup(&self, plan: Plan) -> Option<&ThresholdStats> {
        self.candidates.iter().find(|c| c.plan == plan)
    }
}

/// The final exit's answers on the validation inputs when the activation
/// of each branch crossed the wire under `codec` (`per_branch[k]` for
/// branch k + 1): what a codec does to the cloud's accuracy.
#[derive(Debug, Clone)]
pub struct CodecFinals {
    pub codec: Codec,
    pub per_branch: Vec<ExitLogits>,
}

/// Bytes of one offload request at a branch under each codec, framing
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OffloadBytes {
    pub f32: f64,
    pub f16: f64,
    pub int8: f64,
}

impl OffloadBytes {
    pub fn of(&self, codec: Codec) -> f64 {
        match codec {
            Codec::F32 => self.f32,
            Codec::F16 => self.f16,
            Codec::Int8 => self.int8,
        }
    }

    /// The same bytes under every codec (a model whose codecs are not
    /// measured; tests).
    pub fn same(bytes: f64) -> Self {
        OffloadBytes { f32: bytes, f16: bytes, int8: bytes }
    }
}

/// Per branch: device only, cloud only, and for each target accuracy in
/// `accuracies` at `delta` the lowest threshold of the branch's certified
/// set (see `ModelStats::certified`). Each target's thresholds are certified
/// for every branch at once (`guarantee::certify_plans`: fixed sequence
/// within a branch, union bound across), so the planner may choose among
/// the branches after looking and the chosen plan still keeps its target
/// with probability at least 1 - delta.
pub fn certified_candidates(validation: &[ExitLogits], temperatures: &[f64], accuracies: &[f64], delta: f64) -> Result<Vec<Vec<Candidate>>> {
    use crate::guarantee::{certify_plans, plan_grid, Correction, Promise};
    let grid = plan_grid();
    let exits = validation.len();
    if exits < 2 || temperatures.len() != exits {
        return Err(CoreError::InvalidArgument { what: "certified candidates".into(), reason: format!("{exits} exits and {} temperatures", temperatures.len()) });
    }
    let counts: Vec<crate::risk::ConfidenceCounts> = (0..exits - 1).map(|b| crate::risk::ConfidenceCounts::of_exit(&validation[b], temperatures[b])).collect::<Result<_>>()?;
    let mut per_branch: Vec<Vec<Candidate>> = vec![vec![Candidate { p_tar: 0.0, certified: None }]; exits - 1];
    for &accuracy in accuracies {
        let target = Target { accuracy, delta };
        let certificate = certify_plans(&counts, target, Promise::Population, Correction::FixedSequenceUnion, &grid)?;
        for (candidates, b) in per_branch.iter_mut().zip(&certificate.branches) {
            candidates.push(Candidate { p_tar: b.lowest().unwrap_or(1.0), certified: Some(target) });
        }
    }
    for candidates in &mut per_branch {
        candidates.push(Candidate { p_tar: 1.0, certified: None });
    }
    Ok(per_branch)
}

/// What the planner knows of compute and of the deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Costs {
    /// Device compute of head(k), per branch k (index k - 1), microseconds.
    pub head_us: Vec<f64>,
    /// Bytes sent per offload at branch k under each codec (activation
    /// plus framing), index k - 1.
    pub upload_bytes: Vec<OffloadBytes>,
    pub deadline_us: f64,
    /// Inputs per second arriving at the device.
    pub arrival_rate: f64,
    /// The largest predicted fraction of inputs that may miss the deadline.
    pub miss_bound: f64,
    /// Cloud compute per request at branch k in a full batch (µs, index
    /// k - 1): how fast the workers drain a backlog. Empty: the planner
    /// does not count the workers' backlog.
    #[serde(default)]
    pub tail_us_per_request: Vec<f64>,
    /// The most of the worker pool's time the devices' offloads may take
    /// together, each device its share by its input rate
    /// (`CloudLoad::over_share`); counted only when the planner knows the
    /// pool and the devices' rates.
    #[serde(default = "default_pool_utilisation")]
    pub pool_utilisation: f64,
}

/// Headroom below a pool kept exactly busy, where any burst queues.
pub const DEFAULT_POOL_UTILISATION: f64 = 0.9;

fn default_pool_utilisation() -> f64 {
    DEFAULT_POOL_UTILISATION
}

/// A device's network as the planner sees it: conservative figures (mean
/// plus a safety margin of deviations), see `LinkEstimator`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Uplink time per byte, microseconds.
    pub us_per_byte: f64,
    /// From the end of an upload to its reply: propagation both ways plus
    /// the cloud's queueing and compute, microseconds.
    pub response_us: f64,
    /// The worker pool's load now, from the workers' status (`None`: not
    /// known, and the device's own response times are all the planner
    /// has).
    #[serde(default)]
    pub cloud: Option<CloudLoad>,
}

/// The worker pool as the planner sees it: what the workers report
/// (`WorkerStatus`) or, in virtual time, what the pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CloudLoad {
    /// Requests waiting at the workers, all together.
    pub backlog: f64,
    /// Workers serving.
    pub workers: f64,
    /// Inputs per second arriving at all the devices that share the pool,
    /// as they last reported (0: not known, and no share is enforced).
    #[serde(default)]
    pub inputs_per_s: f64,
}

impl CloudLoad {
    /// How long a request sent now waits behind the backlog, at
    /// `per_request_us` of compute each, spread over the workers. A
    /// device's response time shows the cloud's queueing only once its own
    /// offloads come back (and not at all for those that expire there);
    /// the backlog shows it now.
    pub fn wait_us(&self, per_request_us: f64) -> f64 {
        (self.backlog.max(0.0) * per_request_us / self.workers.max(1.0)).max(0.0)
    }

    /// Whether offloading `offload_rate` of its inputs, at `per_request_us`
    /// of cloud compute each, takes more than a device's share of the pool:
    /// were every device sharing it to offload as much, the workers would be
    /// busy more than `utilisation` of the time. The share is proportional
    /// to each device's input rate, so it depends only on the pool and the
    /// devices' rates, never on the plans in force: a device's plan does not
    /// swing with the backlog the other devices' plans left a moment ago
    /// (planned on the backlog alone, devices offload less until it drains,
    /// then all offload more at once and fill it again).
    pub fn over_share(&self, offload_rate: f64, per_request_us: f64, utilisation: f64) -> bool {
        self.inputs_per_s > 0.0 && offload_rate * per_request_us * self.inputs_per_s > utilisation * self.workers.max(1.0) * 1e6
    }
}

/// What the planner expects of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub plan: Plan,
    pub accuracy: f64,
    pub offload_rate: f64,
    pub miss_rate: f64,
    /// The target the plan's threshold was certified for, if it was.
    #[serde(default)]
    pub certified: Option<Target>,
    /// Bytes of one offload under the plan's codec.
    #[serde(default)]
    pub upload_bytes: f64,
    /// What the plan predicts of the inputs answered on the device.
    #[serde(default)]
    pub edge_accuracy: f64,
}

/// Probability that one offloaded input misses its deadline. The device's
/// uplink is a queue fed at rate lambda * offload_rate with deterministic
/// service D = bytes * us_per_byte (M/D/1); its waiting time is taken as
/// P(W > s) = rho * exp(-2 (1 - rho) s / D) (the heavy-traffic exponential
/// approximation, exact in its mean), with s the slack left after the head,
/// the transfer and the response.
pub fn offload_miss_probability(head_us: f64, bytes: f64, costs: &Costs, offload_rate: f64, seen: &Observed) -> f64 {
    let service = bytes * seen.us_per_byte;
    let slack = costs.deadline_us - head_us - service - seen.response_us;
    if slack < 0.0 || !slack.is_finite() {
        return 1.0;
    }
    let rho = costs.arrival_rate * offload_rate * service / 1e6;
    if rho >= 1.0 {
        return 1.0;
    }
    if service <= 0.0 {
        return 0.0;
    }
    (rho * (-2.0 * (1.0 - rho) * slack / service).exp()).clamp(0.0, 1.0)
}

/// Predicted accuracies closer than this always count as equal in `choose`.
/// Two plans can be equally good on paper and differ only by float
/// rounding: when every offload misses, a plan that offloads some inputs
/// (and falls back on them) predicts exactly the accuracy of keeping all of
/// them on the device. Rounding of these sums of a few thousand confidences
/// is about 1e-13. `ModelStats::accuracy_tolerance` widens it to what the
/// validation split can tell apart.
pub const ACCURACY_TOLERANCE: f64 = 1e-9;

/// What the planner predicts for one candidate under these costs and this
/// network: the response time is the device's estimate plus the wait behind
/// the workers' backlog, when the planner knows it.
pub fn predict(c: &ThresholdStats, costs: &Costs, seen: &Observed) -> Prediction {
    let k = c.plan.branch - 1;
    let (head, bytes) = (costs.head_us[k], costs.upload_bytes[k].of(c.plan.codec));
    let wait = match (seen.cloud, costs.tail_us_per_request.get(k)) {
        (Some(load), Some(&per_request)) => load.wait_us(per_request),
        _ => 0.0,
    };
    let seen = &Observed { response_us: seen.response_us + wait, ..*seen };
    // A device whose CPU cannot keep up misses everything.
    let cpu = costs.arrival_rate * head / 1e6;
    let over = match (seen.cloud, costs.tail_us_per_request.get(k)) {
        (Some(load), Some(&per_request)) => load.over_share(c.offload_rate, per_request, costs.pool_utilisation),
        _ => false,
    };
    // Beyond the pool's share the workers' queue grows without bound:
    // every offload misses in the end.
    let m = if over {
        1.0
    } else if c.offload_rate > 0.0 {
        offload_miss_probability(head, bytes, costs, c.offload_rate, seen)
    } else {
        0.0
    };
    let miss_rate = if cpu >= 1.0 || head > costs.deadline_us { 1.0 } else { c.offload_rate * m };
    let accuracy = (1.0 - c.offload_rate) * c.edge_accuracy + c.offload_rate * ((1.0 - m) * c.cloud_accuracy + m * c.fallback_accuracy);
    Prediction { plan: c.plan, accuracy, offload_rate: c.offload_rate, miss_rate, certified: c.certified, upload_bytes: bytes, edge_accuracy: c.edge_accuracy }
}

/// The plan with the best predicted accuracy whose predicted miss rate is
/// within the bound; when none is, the one with the fewest predicted misses
/// (then the least offloading, the fewest bytes, the best accuracy).
///
/// Accuracies within `stats.accuracy_tolerance()` of the best count as
/// equal, and among them fewer predicted misses, then less offloading, then
/// fewer bytes per offload win: the returned plan is within the tolerance of
/// the best feasible accuracy, and no feasible plan within it is cheaper.
/// So a codec whose answers differ from f32's on fewer validation inputs
/// than the split can resolve wins by its bytes, not loses by rounding.
pub fn choose(stats: &ModelStats, costs: &Costs, seen: &Observed) -> Prediction {
    let all: Vec<Prediction> = stats.candidates.iter().map(|c| predict(c, costs, seen)).collect();
    let feasible: Vec<&Prediction> = all.iter().filter(|p| p.miss_rate <= costs.miss_bound).collect();
    if feasible.is_empty() {
        return *all.iter().min_by(|a, b| cheaper(a, b)).expect("at least one candidate");
    }
    let best = feasible.iter().map(|p| p.accuracy).fold(f64::NEG_INFINITY, f64::max);
    let tolerance = stats.accuracy_tolerance();
    // min_by keeps the first of equals: ties beyond these keys go to the
    // candidate listed first.
    **feasible.iter().filter(|p| p.accuracy >= best - tolerance).min_by(|a, b| cheaper(a, b)).expect("the best is among them")
}

/// The plan a planner keeping a service level chooses: among the plans
/// predicted to keep its miss bound (`costs.miss_bound`), the one that
/// spends least of what `minimise` names (then the best accuracy, then the
/// first listed); `Minimise::Nothing` is `choose`. When none keeps the
/// bound, the one with the fewest predicted misses, as `choose`.
pub fn choose_for_level(stats: &ModelStats, costs: &Costs, seen: &Observed, minimise: crate::guarantee::Minimise) -> Prediction {
    use crate::guarantee::Minimise;
    let spend = |p: &Prediction| match minimise {
        Minimise::Offloads => p.offload_rate,
        Minimise::UplinkBytes => p.offload_rate * p.upload_bytes,
        Minimise::Nothing => 0.0,
    };
    if minimise == Minimise::Nothing {
        return choose(stats, costs, seen);
    }
    let all: Vec<Prediction> = stats.candidates.iter().map(|c| predict(c, costs, seen)).collect();
    let feasible = all.iter().filter(|p| p.miss_rate <= costs.miss_bound);
    match feasible.min_by(|a, b| spend(a).total_cmp(&spend(b)).then(b.accuracy.total_cmp(&a.accuracy))) {
        Some(p) => *p,
        None => *all.iter().min_by(|a, b| cheaper(a, b)).expect("at least one candidate"),
    }
}

/// The order in which equally accurate plans are preferred: fewer misses,
/// then less offloading, then fewer bytes per offload, then better accuracy.
fn cheaper(a: &Prediction, b: &Prediction) -> std::cmp::Ordering {
    a.miss_rate.total_cmp(&b.miss_rate).then(a.offload_rate.total_cmp(&b.offload_rate)).then(a.upload_bytes.total_cmp(&b.upload_bytes)).then(b.accuracy.total_cmp(&a.accuracy))
}

/// A device's running estimate of its uplink and response time: smoothed
/// mean and mean deviation (as TCP estimates its round trip, RFC 6298), so
/// that a conservative figure is mean + safety * deviation.
///
/// Uplink samples are times per byte, capped at `cap_us_per_byte`: a link
/// slower than the cap is as useless as a dead one, and without the cap one
/// outage's enormous sample would take dozens of samples to forget.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkEstimator {
    pub alpha: f64,
    pub cap_us_per_byte: f64,
    us_per_byte: Option<(f64, f64)>,
    response_us: Option<(f64, f64)>,
}

impl LinkEstimator {
    pub fn new(alpha: f64, cap_us_per_byte: f64) -> Self {
        Self { alpha, cap_us_per_byte, us_per_byte: None, response_us: None }
    }

    fn update(slot: &mut Option<(f64, f64)>, alpha: f64, x: f64) {
        *slot = Some(match *slot {
            None => (x, x / 2.0),
            Some((m, d)) => {
                // The deviation moves twice as fast as the mean (RFC 6298's beta = 2 alpha).
                let beta = (2.0 * alpha).min(1.0);
                ((1.0 - alpha) * m + alpha * x, (1.0 - beta) * d + beta * (x - m).abs())
            }
        });
    }

    /// An upload of `bytes` took `us` from its first to its last byte.
    pub fn observe_upload(&mut self, bytes: usize, us: f64) {
        if bytes > 0 && us.is_finite() && us >= 0.0 {
            Self::update(&mut self.us_per_byte, self.alpha, (us / bytes as f64).min(self.cap_us_per_byte));
        }
    }

    /// An upload of `bytes` still in progress after `us`: only raises the
    /// estimate (an outage shows before the upload ends).
    pub fn observe_stalled_upload(&mut self, bytes: usize, us: f64) {
        if let Some((m, _)) = self.us_per_byte {
            let x = (us / bytes.max(1) as f64).min(self.cap_us_per_byte);
            if x > m {
                Self::update(&mut self.us_per_byte, self.alpha, x);
            }
        }
    }

    pub fn observe_response(&mut self, us: f64) {
        if us.is_finite() && us >= 0.0 {
            Self::update(&mut self.response_us, self.alpha, us);
        }
    }

    /// An offload whose answer had not come `us` after its upload ended
    /// (the device gave up at its deadline): the response takes at least
    /// that. Only raises the estimate, as a stalled upload does; without it
    /// a device whose answers all come too late would never see them, and
    /// would go on offloading on the response time of better days.
    pub fn observe_response_at_least(&mut self, us: f64) {
        if !(us.is_finite() && us >= 0.0) {
            return;
        }
        match self.response_us {
            Some((m, _)) if us <= m => {}
            _ => Self::update(&mut self.response_us, self.alpha, us),
        }
    }

    /// Whether both the uplink and the response time have a sample.
    pub fn is_ready(&self) -> bool {
        self.us_per_byte.is_some() && self.response_us.is_some()
    }

    /// Mean + safety * deviation of each; `None` until both have a sample.
    pub fn conservative(&self, safety: f64) -> Option<Observed> {
        Some(Observed { us_per_byte: self.conservative_us_per_byte(safety)?, response_us: self.conservative_response_us(safety)?, cloud: None })
    }

    /// Mean + safety * deviation of the uplink time per byte alone, once an
    /// upload has finished.
    pub fn conservative_us_per_byte(&self, safety: f64) -> Option<f64> {
        self.us_per_byte.map(|(m, d)| m + safety * d)
    }

    /// Mean + safety * deviation of the response time alone, once a reply
    /// has come.
    pub fn conservative_response_us(&self, safety: f64) -> Option<f64> {
        self.response_us.map(|(m, d)| m + safety * d)
    }

    /// Smoothed uplink throughput, Mbit/s (for reports).
    pub fn mean_mbit_s(&self) -> Option<f64> {
        self.us_per_byte.map(|(m, _)| 8.0 / m)
    }

    /// Smoothed response time, microseconds (for reports).
    pub fn mean_response_us(&self) -> Option<f64> {
        self.response_us.map(|(m, _)| m)
    }
}

/// A device's view of its own uplink: the uploads it has queued (the
/// uplink sends one at a time, in order) and its estimate. The same code
/// runs in the virtual-time replay and in live devices, so both decline,
/// probe and report alike. Times are microseconds on the caller's clock.
#[derive(Debug, Clone)]
pub struct DeviceUplink {
    pub est: LinkEstimator,
    free_at: u64,
    /// Uploads not yet known to be finished: (start, finish, bytes).
    uploading: std::collections::VecDeque<(u64, u64, usize)>,
}

impl DeviceUplink {
    pub fn new(est: LinkEstimator) -> Self {
        Self { est, free_at: 0, uploading: Default::default() }
    }

    /// When the uplink is free of everything queued so far.
    pub fn free_at(&self) -> u64 {
        self.free_at
    }

    /// Queues `bytes` ready at `ready`: returns (start, finish), finish
    /// `None` when the link never delivers them.
    pub fn enqueue(&mut self, link: &crate::link::Link, ready: u64, bytes: usize, rng: &mut crate::rng::SplitMix64) -> (u64, Option<u64>) {
        let start = ready.max(self.free_at);
        let finish = link.transmit(start, bytes, rng);
        self.free_at = finish.unwrap_or(u64::MAX);
        self.uploading.push_back((start, self.free_at, bytes));
        (start, finish)
    }

    /// The upload that started at `start` finished at `t`.
    pub fn finished(&mut self, t: u64, start: u64, bytes: usize) {
        self.est.observe_upload(bytes, t.saturating_sub(start) as f64);
        self.uploading.retain(|u| u.1 > t);
    }

    /// Before a report at `t`: forgets finished uploads and lets a stalled
    /// one raise the estimate.
    pub fn before_report(&mut self, t: u64) {
        self.uploading.retain(|u| u.1 > t);
        if let Some(&(start, _, bytes)) = self.uploading.front() {
            if start <= t {
                self.est.observe_stalled_upload(bytes, (t - start) as f64);
            }
        }
    }

    /// Probe when the uplink sat idle for a whole interval, or when the
    /// estimate has no sample yet and nothing is being sent.
    pub fn needs_probe(&self, t: u64, interval: u64) -> bool {
        let sending = self.uploading.iter().any(|u| u.0 <= t && u.1 > t);
        self.free_at.saturating_add(interval) <= t || (!self.est.is_ready() && !sending)
    }

    /// Whether an offload decided at `done` (the input arrived at `t`) would
    /// miss `deadline`, from what the device knows at `t`: its conservative
    /// estimate, the bytes still queued, and how long the current upload
    /// has been going (a stall raises the time per byte).
    ///
    /// Before the estimate has both figures it uses what it has: the uplink
    /// estimate alone once an upload has finished, and in any case the
    /// upload in progress, which has taken at least its elapsed time for its
    /// bytes, so the link is no faster than that. A missing response time
    /// counts as nothing. These are lower bounds, so it declines only
    /// offloads that miss even so: at a device's start on a slow link, the
    /// first upload still going past the deadline says every later one
    /// would miss as well. With nothing sent and nothing measured it cannot
    /// tell and says no.
    pub fn would_miss(&self, t: u64, done: u64, bytes: usize, deadline: u64, safety: f64) -> bool {
        let mut us_per_byte = self.est.conservative_us_per_byte(safety).unwrap_or(0.0);
        let response_us = self.est.conservative_response_us(safety).unwrap_or(0.0);
        let mut pending: f64 = self.uploading.iter().filter(|u| u.1 > t).map(|u| u.2 as f64).sum();
        if let Some(&(start, _, b)) = self.uploading.iter().find(|u| u.1 > t && u.0 <= t) {
            let elapsed = (t - start) as f64;
            us_per_byte = us_per_byte.max(elapsed / b.max(1) as f64);
            // What has probably left already.
            if us_per_byte > 0.0 {
                pending -= (elapsed / us_per_byte).min(b as f64);
            }
        }
        let predicted = done.saturating_sub(t) as f64 + (pending.max(0.0) + bytes as f64) * us_per_byte + response_us;
        predicted > deadline as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats() -> ModelStats {
        // Branch 1: cheap but weak; branch 2: better. Hand-made predictions.
        let mk = |branch, p_tar, offload_rate, edge| ThresholdStats {
            plan: Plan { branch, p_tar, codec: Codec::F32 },
            offload_rate,
            edge_accuracy: edge,
            cloud_accuracy: 0.95,
            fallback_accuracy: 0.6,
            measured_edge_accuracy: edge,
            measured_cloud_accuracy: 0.95,
            certified: None,
        };
        ModelStats {
            candidates: vec![mk(1, 0.0, 0.0, 0.85), mk(1, 0.9, 0.4, 0.97), mk(1, 1.0, 1.0, 0.0), mk(2, 0.0, 0.0, 0.90), mk(2, 0.9, 0.2, 0.97), mk(2, 1.0, 1.0, 0.0)],
            validation_inputs: 0,
        }
    }

    fn costs() -> Costs {
        Costs {
            head_us: vec![2_000.0, 3_000.0],
            upload_bytes: vec![OffloadBytes::same(25_000.0), OffloadBytes::same(12_500.0)],
            deadline_us: 100_000.0,
            arrival_rate: 10.0,
            miss_bound: 0.05,
            pool_utilisation: DEFAULT_POOL_UTILISATION,
            tail_us_per_request: Vec::new(),
        }
    }

    #[test]
    fn a_fast_link_offloads_and_a_dead_link_stays_on_the_device() {
        let s = stats();
        // 100 Mbit/s: 0.08 us per byte; 10 ms response.
        let fast = choose(&s, &costs(), &Observed { us_per_byte: 0.08, response_us: 10_000.0, cloud: None });
        // Branch 2 at 0.9 beats cloud only here: 0.8 * 0.97 + 0.2 * 0.95.
        assert_eq!(fast.plan, Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }, "{fast:?}");
        assert!((fast.accuracy - 0.966).abs() < 1e-9 && fast.miss_rate < 1e-9, "{fast:?}");
        // 0.1 Mbit/s: 80 us per byte, 12,500 bytes take 1 s: nothing can be offloaded.
        let slow = choose(&s, &costs(), &Observed { us_per_byte: 80.0, response_us: 10_000.0, cloud: None });
        assert_eq!(slow.plan, Plan { branch: 2, p_tar: 0.0, codec: Codec::F32 }, "{slow:?}");
        assert_eq!(slow.miss_rate, 0.0);
    }

    #[test]
    fn a_middling_link_offloads_only_what_it_can_carry() {
        let s = stats();
        // 2 Mbit/s = 4 us per byte: 12,500 bytes take 50 ms, 25,000 take 100 ms.
        let seen = Observed { us_per_byte: 4.0, response_us: 20_000.0, cloud: None };
        let p = choose(&s, &costs(), &seen);
        assert_eq!(p.plan, Plan { branch: 2, p_tar: 0.9, codec: Codec::F32 }, "{p:?}");
        assert!(p.miss_rate <= 0.05 && p.miss_rate > 0.001, "{p:?}");
        // A tighter bound than that plan's predicted misses keeps inputs on the device.
        let strict = choose(&s, &Costs { miss_bound: 0.001, ..costs() }, &seen);
        assert_eq!(strict.plan, Plan { branch: 2, p_tar: 0.0, codec: Codec::F32 }, "{strict:?}");
    }

    #[test]
    fn miss_probability_grows_with_load_and_shrinking_slack() {
        let c = costs();
        let seen = Observed { us_per_byte: 4.0, response_us: 20_000.0, cloud: None };
        let light = offload_miss_probability(3_000.0, 12_500.0, &c, 0.1, &seen);
        let heavy = offload_miss_probability(3_000.0, 12_500.0, &c, 1.0, &seen);
        assert!(light < heavy && heavy < 1.0, "{light} {heavy}");
        let late = Observed { us_per_byte: 4.0, response_us: 60_000.0, cloud: None };
        assert_eq!(offload_miss_probability(3_000.0, 12_500.0, &c, 0.1, &late), 1.0);
    }

    #[test]
    fn estimator_is_conservative_and_reacts_to_stalls() {
        let mut e = LinkEstimator::new(0.25, 100.0);
        assert!(e.conservative(2.0).is_none() && !e.is_ready());
        for _ in 0..50 {
            e.observe_upload(1000, 1000.0);
            e.observe_response(10_000.0);
        }
        let calm = e.conservative(2.0).unwrap();
        assert!((calm.us_per_byte - 1.0).abs() < 0.01, "{calm:?}");
        assert!((e.mean_mbit_s().unwrap() - 8.0).abs() < 1e-6);
        e.observe_stalled_upload(1000, 500.0);
        assert_eq!(e.conservative(2.0).unwrap(), calm, "a stall shorter than usual says nothing");
        // A 10 s stall counts as the cap, 100 us per byte: mean 25.75.
        e.observe_stalled_upload(1000, 10_000_000.0);
        let stalled = e.conservative(2.0).unwrap();
        assert!((e.mean_mbit_s().unwrap() - 8.0 / 25.75).abs() < 1e-9);
        assert!(stalled.us_per_byte > 50.0, "{stalled:?}");
        // Good samples bring it back within twenty uploads.
        for _ in 0..20 {
            e.observe_upload(1000, 1000.0);
        }
        assert!(e.conservative(2.0).unwrap().us_per_byte < 2.0, "{:?}", e.conservative(2.0));
    }

    /// Before its estimate is ready, a device declines an offload only on
    /// what it already knows for sure: an upload still going after more
    /// than the deadline means the link is that slow, so a like upload
    /// behind it would miss; a short one still going says nothing. Once an
    /// upload has finished, its time per byte counts even without a reply.
    /// Answers that never come back in time are never seen: the device
    /// learns from giving up at its deadline that the response took at
    /// least that long, and declines what would miss; a shorter bound
    /// than it knows changes nothing.
    #[test]
    fn a_device_learns_from_answers_that_did_not_come_in_time() {
        let mut up = DeviceUplink::new(LinkEstimator::new(0.5, 1e6));
        up.est.observe_upload(1000, 1000.0);
        up.est.observe_response(30_000.0);
        // 1 ms of upload + 30 ms of response: well within 100 ms.
        assert!(!up.would_miss(0, 0, 1000, 100_000, 0.0));
        up.est.observe_response_at_least(20_000.0);
        assert_eq!(up.est.mean_response_us(), Some(30_000.0), "a bound below the estimate says nothing");
        for _ in 0..8 {
            up.est.observe_response_at_least(120_000.0);
        }
        assert!(up.est.mean_response_us().unwrap() > 100_000.0);
        assert!(up.would_miss(0, 0, 1000, 100_000, 0.0), "declines once its answers are known to come too late");
    }

    #[test]
    fn a_device_declines_before_its_estimate_is_ready_only_on_what_it_has_seen() {
        let link = crate::link::Link::constant(0.2, 40_000, 0.0).unwrap();
        let mut rng = crate::rng::SplitMix64::new(1);
        let (deadline, bytes) = (150_000, 6_000);
        let mut up = DeviceUplink::new(LinkEstimator::new(0.25, 1_000.0));
        assert!(!up.would_miss(0, 1_000, bytes, deadline, 2.0), "nothing sent, nothing known");
        // 6,000 bytes at 0.2 Mbit/s: 240 ms.
        let (start, finish) = up.enqueue(&link, 1_000, bytes, &mut rng);
        let finish = finish.unwrap();
        assert!(finish - start >= 240_000, "{start} {finish}");
        assert!(!up.would_miss(50_000, 51_000, bytes, deadline, 2.0), "50 ms into an upload: the link may still be fast");
        assert!(up.would_miss(200_000, 201_000, bytes, deadline, 2.0), "200 ms into a 6,000-byte upload: another takes as long");
        assert!(!up.would_miss(200_000, 201_000, 100, deadline, 2.0), "a tiny upload may still make it");
        up.finished(finish, start, bytes);
        assert!(!up.est.is_ready(), "no reply yet");
        assert!(up.would_miss(finish + 1, finish + 2_000, bytes, deadline, 2.0), "the uplink's own estimate is enough");
        // A fast link: its first upload finished quickly says yes to the next.
        let mut fast = DeviceUplink::new(LinkEstimator::new(0.25, 1_000.0));
        let fast_link = crate::link::Link::constant(50.0, 20_000, 0.0).unwrap();
        let (s, f) = fast.enqueue(&fast_link, 0, bytes, &mut rng);
        fast.finished(f.unwrap(), s, bytes);
        assert!(!fast.would_miss(f.unwrap() + 1, f.unwrap() + 2_000, bytes, deadline, 2.0));
    }

    #[test]
    fn stats_from_validation_predict_with_confidences() {
        // Two exits, three inputs, two classes.
        let branch = ExitLogits::new(2, vec![5.0, 0.0, 0.0, 0.1, 0.0, 5.0], vec![0, 1, 0]).unwrap();
        let fin = ExitLogits::new(2, vec![5.0, 0.0, 0.0, 5.0, 5.0, 0.0], vec![0, 1, 0]).unwrap();
        let s = ModelStats::from_validation(&[branch, fin], &[1.0, 1.0], &[0.0, 0.9, 1.0], &[]).unwrap();
        let at = |p: f64| s.candidates.iter().find(|c| c.plan.p_tar == p).unwrap();
        assert_eq!(at(0.0).offload_rate, 0.0);
        assert_eq!(at(1.0).offload_rate, 1.0);
        let mid = at(0.9);
        assert!((mid.offload_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((mid.measured_edge_accuracy - 0.5).abs() < 1e-12, "inputs 0 and 2 exit; input 2 is wrong");
        assert!((mid.measured_cloud_accuracy - 1.0).abs() < 1e-12);
        let conf = 1.0 / (1.0 + (-5.0f64).exp());
        assert!((mid.edge_accuracy - conf).abs() < 1e-6);
        assert!(ModelStats::from_validation(&s_exits(), &[1.0], &[0.5], &[]).is_err());
    }

    /// Random validation logits: `n` inputs, 10 classes, each exit with one
    /// class raised by a random margin, so that most confidences are high and
    /// a few are low, as with a trained network: at p_tar 0.5 to 0.99 a few
    /// percent to a third of the inputs are offloaded.
    fn random_validation(seed: u64, n: usize, exits: usize) -> Vec<ExitLogits> {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let labels: Vec<i64> = (0..n).map(|_| rng.below(10) as i64).collect();
        (0..exits)
            .map(|e| {
                let mut z: Vec<f32> = (0..n * 10).map(|_| rng.next_f64() as f32).collect();
                for i in 0..n {
                    let top = if rng.next_f64() < 0.9 { labels[i] as usize } else { rng.below(10) as usize };
                    z[i * 10 + top] += (3.0 + e as f64 + 9.0 * rng.next_f64()) as f32;
                }
                ExitLogits::new(10, z, labels.clone()).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_service_level_plans_only_among_thresholds_certified_for_it_and_spends_least() {
        use crate::guarantee::{Minimise, ServiceLevel};
        let validation = random_validation(5, 4000, 3);
        let temps = [1.0, 1.0, 1.0];
        let level = ServiceLevel { accuracy: 0.85, delta: 0.05, miss_bound: 0.05, minimise: Minimise::Offloads };
        let stats = ModelStats::for_level(&validation, &temps, &level, &[]).unwrap();
        let counts: Vec<_> = (0..2).map(|k| crate::risk::ConfidenceCounts::of_exit(&validation[k], temps[k]).unwrap()).collect();
        let joint = crate::guarantee::certify_plans(
            &counts,
            level.target(),
            crate::guarantee::Promise::Population,
            crate::guarantee::Correction::FixedSequenceUnion,
            &crate::guarantee::plan_grid(),
        )
        .unwrap();
        for c in &stats.candidates {
            assert!(joint.covers(c.plan.branch, c.plan.p_tar), "{c:?} is certified for the level");
            if c.plan.p_tar < 1.0 {
                assert_eq!(c.certified, Some(level.target()));
                assert!(c.measured_edge_accuracy >= 0.85, "on the data it was certified on: {c:?}");
            }
        }
        for b in 1..=2 {
            let lowest = joint.branches[b - 1].lowest().unwrap();
            assert!(stats.lookup(Plan::f32(b, lowest)).is_some() && stats.lookup(Plan::f32(b, 1.0)).is_some());
            assert!(stats.lookup(Plan::f32(b, 0.0)).is_none(), "device only is not certified here");
        }
        // A fast link: minimising offloads takes the lowest certified
        // threshold of the branch that offloads least; `Nothing` offloads
        // more for accuracy.
        let seen = Observed { us_per_byte: 0.08, response_us: 10_000.0, cloud: None };
        let costs = costs_for(3);
        let fewest = choose_for_level(&stats, &costs, &seen, Minimise::Offloads);
        let least = stats.candidates.iter().map(|c| c.offload_rate).fold(f64::INFINITY, f64::min);
        assert_eq!(fewest.offload_rate, least, "{fewest:?}");
        let best = choose_for_level(&stats, &costs, &seen, Minimise::Nothing);
        assert!(best.offload_rate > fewest.offload_rate && best.accuracy > fewest.accuracy, "{best:?} vs {fewest:?}");
        assert_eq!(best, choose(&stats, &costs, &seen));
        // Bytes: int8 offloads cost a quarter of f32's.
        let int8 = FinalsOf::int8(&validation);
        let with_codecs = ModelStats::for_level(&validation, &temps, &level, &[int8]).unwrap();
        let bytes = choose_for_level(&with_codecs, &costs, &seen, Minimise::UplinkBytes);
        assert!(bytes.plan.codec == Codec::Int8 || bytes.offload_rate == 0.0, "{bytes:?}");
    }

    #[test]
    fn a_service_level_the_validation_split_cannot_certify_is_refused_naming_the_most_it_can() {
        use crate::guarantee::{Minimise, ServiceLevel};
        let validation = random_validation(5, 5000, 3);
        let level = ServiceLevel { accuracy: 0.999, delta: 0.01, miss_bound: 0.05, minimise: Minimise::Offloads };
        let err = ModelStats::for_level(&validation, &[1.0, 1.0, 1.0], &level, &[]).unwrap_err().to_string();
        assert!(err.contains("0.999") && err.contains("the most it certifies at delta 0.01 is 0."), "{err}");
        assert!(ModelStats::for_level(&validation, &[1.0, 1.0, 1.0], &ServiceLevel { delta: 0.0, ..level }, &[]).is_err());
        assert!(ModelStats::for_level(&validation, &[1.0, 1.0, 1.0], &ServiceLevel { miss_bound: 1.5, accuracy: 0.9, ..level }, &[]).is_err());
    }

    /// The final exit's answers when a branch's activation crossed the wire:
    /// here as if int8 changed nothing.
    struct FinalsOf;

    impl FinalsOf {
        fn int8(validation: &[ExitLogits]) -> CodecFinals {
            let fin = validation.last().unwrap().clone();
            CodecFinals { codec: Codec::Int8, per_branch: vec![fin; validation.len() - 1] }
        }
    }

    fn costs_for(exits: usize) -> Costs {
        let branches = exits - 1;
        Costs {
            head_us: (0..branches).map(|b| 1_000.0 * (b + 1) as f64).collect(),
            upload_bytes: (0..branches).map(|b| 25_000.0 / (b + 1) as f64).map(|f32| OffloadBytes { f32, f16: f32 / 2.0, int8: f32 / 4.0 }).collect(),
            ..costs()
        }
    }

    /// The failure the issue saw: on a link where every offload misses, an
    /// offloading plan predicts the same accuracy as device-only on paper
    /// (its fallbacks are worth their branch confidence), so only rounding
    /// told them apart. Device-only must win: no misses for nothing gained.
    #[test]
    fn when_every_offload_misses_the_device_keeps_every_input() {
        for seed in 0..20 {
            let validation = random_validation(seed, 2_000, 3);
            let stats = ModelStats::from_validation(&validation, &[1.3, 1.1, 1.0], &default_candidate_p_tars(), &[]).unwrap();
            let dead = Observed { us_per_byte: 160.0, response_us: 20_000.0, cloud: None };
            let p = choose(&stats, &costs_for(3), &dead);
            assert_eq!((p.plan.p_tar, p.miss_rate, p.offload_rate), (0.0, 0.0, 0.0), "seed {seed}: {p:?}");
            let best_device_only = stats.candidates.iter().filter(|c| c.offload_rate == 0.0).map(|c| predict(c, &costs_for(3), &dead).accuracy).fold(f64::MIN, f64::max);
            assert!(p.accuracy >= best_device_only - ACCURACY_TOLERANCE, "seed {seed}: {p:?}");
        }
    }

    #[test]
    fn certified_candidates_are_the_certified_thresholds_with_their_targets() {
        let validation = random_validation(3, 3000, 3);
        let temps = [1.2, 1.1, 1.0];
        let stats = ModelStats::certified(&validation, &temps, &[0.9, 0.95], 0.05, &[]).unwrap();
        assert_eq!(stats.candidates.len(), 2 * 4, "per branch: device only, two certified, cloud only");
        for b in 1..=2 {
            let of_branch: Vec<&ThresholdStats> = stats.candidates.iter().filter(|c| c.plan.branch == b).collect();
            assert_eq!((of_branch[0].plan.p_tar, of_branch[3].plan.p_tar), (0.0, 1.0));
            for c in &of_branch[1..3] {
                let target = c.certified.expect("certified");
                // Certified with both branches at once: each at delta / 2.
                let counts: Vec<_> = (0..2).map(|k| crate::risk::ConfidenceCounts::of_exit(&validation[k], temps[k]).unwrap()).collect();
                let joint = crate::guarantee::certify_plans(
                    &counts,
                    target,
                    crate::guarantee::Promise::Population,
                    crate::guarantee::Correction::FixedSequenceUnion,
                    &crate::guarantee::plan_grid(),
                )
                .unwrap();
                assert_eq!(joint.branches[b - 1].level, 0.025);
                assert_eq!(c.plan.p_tar, joint.branches[b - 1].lowest().unwrap_or(1.0));
                if c.plan.p_tar < 1.0 {
                    assert!(c.measured_edge_accuracy >= target.accuracy, "on the data it was certified on: {c:?}");
                }
            }
        }
        assert_eq!(stats.lookup(Plan { branch: 1, p_tar: 0.0, codec: Codec::F32 }).map(|c| c.offload_rate), Some(0.0));
        assert!(stats.lookup(Plan { branch: 1, p_tar: 0.123, codec: Codec::F32 }).is_none());
    }

    fn check_choice(stats: &ModelStats, costs: &Costs, seen: &Observed) -> Result<(), String> {
        let chosen = choose(stats, costs, seen);
        let all: Vec<Prediction> = stats.candidates.iter().map(|c| predict(c, costs, seen)).collect();
        let feasible: Vec<&Prediction> = all.iter().filter(|p| p.miss_rate <= costs.miss_bound).collect();
        if feasible.is_empty() {
            let fewest = all.iter().map(|p| p.miss_rate).fold(f64::INFINITY, f64::min);
            return if chosen.miss_rate == fewest { Ok(()) } else { Err(format!("{chosen:?} misses more than {fewest}")) };
        }
        if chosen.miss_rate > costs.miss_bound {
            return Err(format!("{chosen:?} breaks the bound while {} plans meet it", feasible.len()));
        }
        let best = feasible.iter().map(|p| p.accuracy).fold(f64::MIN, f64::max);
        let tolerance = stats.accuracy_tolerance();
        if chosen.accuracy < best - tolerance {
            return Err(format!("{chosen:?} gives up accuracy: the best plan within the bound predicts {best}"));
        }
        for c in feasible.iter().filter(|c| c.accuracy >= best - tolerance) {
            if c.miss_rate < chosen.miss_rate {
                return Err(format!("{chosen:?} was chosen over {c:?}: as accurate, fewer misses"));
            }
            if c.miss_rate == chosen.miss_rate && (c.offload_rate, c.upload_bytes) < (chosen.offload_rate, chosen.upload_bytes) {
                return Err(format!("{chosen:?} was chosen over {c:?}: as accurate, as many misses, less offloading or fewer bytes"));
            }
        }
        Ok(())
    }

    fn arbitrary_candidates() -> impl proptest::strategy::Strategy<Value = ModelStats> {
        use proptest::prelude::*;
        // Accuracies on a coarse grid, so exact ties (and sums that tie only
        // on paper) are common, as with real statistics.
        let level = (0u32..=20).prop_map(|k| f64::from(k) / 20.0);
        let one =
            (1usize..=3, 0usize..14, 0usize..3, level.clone(), level.clone(), level.clone(), level).prop_map(|(branch, p, codec, offload, edge, cloud, fallback)| ThresholdStats {
                plan: Plan { branch, p_tar: default_candidate_p_tars()[p], codec: Codec::ALL[codec] },
                offload_rate: offload,
                edge_accuracy: edge,
                cloud_accuracy: cloud,
                fallback_accuracy: fallback,
                measured_edge_accuracy: edge,
                measured_cloud_accuracy: cloud,
                certified: None,
            });
        // Tolerances from none to one input in 100, coarser ones merging
        // nearby accuracies.
        (proptest::collection::vec(one, 1..30), proptest::sample::select(vec![0usize, 100, 5_000]))
            .prop_map(|(candidates, validation_inputs)| ModelStats { candidates, validation_inputs })
    }

    proptest::proptest! {
        #[test]
        fn choose_never_prefers_more_misses_at_equal_accuracy(
            stats in arbitrary_candidates(),
            us_per_byte in 0.0f64..200.0,
            response_us in 0.0f64..150_000.0,
            rate in 0.5f64..200.0,
            bound in 0.0f64..0.2,
        ) {
            let costs = Costs { arrival_rate: rate, miss_bound: bound, ..costs_for(4) };
            let seen = Observed { us_per_byte, response_us, cloud: None };
            if let Err(e) = check_choice(&stats, &costs, &seen) {
                return Err(proptest::test_runner::TestCaseError::fail(e));
            }
        }

        #[test]
        fn choose_never_prefers_more_misses_on_statistics_from_logits(
            seed in 0u64..1_000,
            us_per_byte in 0.0f64..200.0,
            rate in 0.5f64..100.0,
        ) {
            let validation = random_validation(seed, 300, 3);
            let stats = ModelStats::from_validation(&validation, &[1.0, 1.0, 1.0], &default_candidate_p_tars(), &[]).unwrap();
            let seen = Observed { us_per_byte, response_us: 20_000.0, cloud: None };
            if let Err(e) = check_choice(&stats, &Costs { arrival_rate: rate, ..costs_for(3) }, &seen) {
                return Err(proptest::test_runner::TestCaseError::fail(e));
            }
        }
    }

    /// Every (branch, p_tar) comes as a plan of each codec given; a codec's
    /// cloud accuracy is its own final answers', and the rest is the same.
    #[test]
    fn codec_plans_predict_with_the_codec_answers() {
        let validation = random_validation(5, 1_000, 3);
        // int8 answers: the final exit's, with one input in ten made wrong.
        let damaged = |f: &ExitLogits| {
            let mut logits = f.logits.clone();
            for i in (0..f.len()).step_by(10) {
                let right = f.labels[i] as usize;
                logits[i * 10 + right] = -50.0;
            }
            ExitLogits::new(10, logits, f.labels.clone()).unwrap()
        };
        let fin = &validation[2];
        let int8 = CodecFinals { codec: Codec::Int8, per_branch: vec![damaged(fin), fin.clone()] };
        let p_tars = [0.0, 0.9, 1.0];
        let stats = ModelStats::from_validation(&validation, &[1.0; 3], &p_tars, std::slice::from_ref(&int8)).unwrap();
        assert_eq!(stats.candidates.len(), 2 * 3 * 2, "two branches, three thresholds, two codecs");
        for c in stats.candidates.iter().filter(|c| c.plan.codec == Codec::Int8) {
            let f32 = stats.lookup(Plan { codec: Codec::F32, ..c.plan }).unwrap();
            assert_eq!((c.offload_rate, c.edge_accuracy, c.fallback_accuracy), (f32.offload_rate, f32.edge_accuracy, f32.fallback_accuracy));
            if c.plan.branch == 1 && c.offload_rate > 0.05 {
                assert!(c.measured_cloud_accuracy < f32.measured_cloud_accuracy - 0.05, "{c:?} vs {f32:?}");
            } else if c.plan.branch == 2 {
                assert_eq!(c.cloud_accuracy, f32.cloud_accuracy);
            }
        }
        let short = CodecFinals { codec: Codec::Int8, per_branch: vec![fin.clone()] };
        assert!(ModelStats::from_validation(&validation, &[1.0; 3], &p_tars, &[short]).is_err(), "answers for every branch");
        let f32_again = CodecFinals { codec: Codec::F32, per_branch: vec![fin.clone(), fin.clone()] };
        assert!(ModelStats::from_validation(&validation, &[1.0; 3], &p_tars, &[f32_again]).is_err(), "f32 is the plain answers");
    }

    /// On a link too slow for f32 activations in time, the planner offloads
    /// int8 ones when they cost it nothing in accuracy.
    #[test]
    fn a_slow_link_offloads_the_smaller_codec() {
        let validation = random_validation(6, 2_000, 3);
        let same = CodecFinals { codec: Codec::Int8, per_branch: vec![validation[2].clone(), validation[2].clone()] };
        let stats = ModelStats::from_validation(&validation, &[1.0; 3], &default_candidate_p_tars(), &[same]).unwrap();
        let costs =
            Costs { upload_bytes: vec![OffloadBytes { f32: 25_000.0, f16: 12_600.0, int8: 6_600.0 }, OffloadBytes { f32: 12_800.0, f16: 6_500.0, int8: 3_800.0 }], ..costs_for(3) };
        // 1 Mbit/s: 8 us per byte. f32 takes 100 ms or more, int8 30 to 53 ms.
        let seen = Observed { us_per_byte: 8.0, response_us: 20_000.0, cloud: None };
        let with_codecs = choose(&stats, &costs, &seen);
        let f32_only = stats.with_codecs(&[Codec::F32]);
        let plain = choose(&f32_only, &costs, &seen);
        assert_eq!(with_codecs.plan.codec, Codec::Int8, "{with_codecs:?}");
        assert!(with_codecs.offload_rate > plain.offload_rate && with_codecs.accuracy > plain.accuracy, "{with_codecs:?} vs {plain:?}");
    }

    /// Before it has seen the link, a planner starts a branch with the
    /// smallest codec that costs no accuracy it can tell apart; a codec
    /// that does cost accuracy is passed over, and f32 alone stays f32.
    #[test]
    fn the_starting_codec_is_the_smallest_that_costs_no_accuracy() {
        let validation = random_validation(8, 1_000, 3);
        let fin = &validation[2];
        let mut wrong = fin.logits.clone();
        for i in (0..fin.len()).step_by(10) {
            wrong[i * 10 + fin.labels[i] as usize] = -50.0;
        }
        let damaged = ExitLogits::new(10, wrong, fin.labels.clone()).unwrap();
        let codecs = [CodecFinals { codec: Codec::F16, per_branch: vec![fin.clone(), fin.clone()] }, CodecFinals { codec: Codec::Int8, per_branch: vec![damaged, fin.clone()] }];
        let stats = ModelStats::from_validation(&validation, &[1.0; 3], &default_candidate_p_tars(), &codecs).unwrap();
        let bytes = OffloadBytes { f32: 25_000.0, f16: 12_600.0, int8: 6_600.0 };
        let all = [Codec::F32, Codec::F16, Codec::Int8];
        assert_eq!(stats.starting_codec(2, &all, &bytes), Some(Codec::Int8), "int8 answers as f32 does at branch 2");
        assert_eq!(stats.starting_codec(1, &all, &bytes), Some(Codec::F16), "int8 costs a tenth of the answers at branch 1");
        assert_eq!(stats.starting_codec(1, &[Codec::F32], &bytes), Some(Codec::F32));
        assert_eq!(stats.starting_codec(3, &all, &bytes), None, "no branch 3");
    }

    /// A backlog at the workers is a wait the device's own response times
    /// do not show yet: it raises the predicted misses, and the planner
    /// offloads less; an idle pool changes nothing.
    #[test]
    fn a_backlog_at_the_workers_makes_the_planner_offload_less() {
        let validation = random_validation(7, 2_000, 3);
        let stats = ModelStats::from_validation(&validation, &[1.0; 3], &default_candidate_p_tars(), &[]).unwrap();
        let costs = Costs { tail_us_per_request: vec![1_000.0, 800.0], ..costs_for(3) };
        let seen = Observed { us_per_byte: 0.08, response_us: 10_000.0, cloud: None };
        let blind = choose(&stats, &costs, &seen);
        let idle = choose(&stats, &costs, &Observed { cloud: Some(CloudLoad { backlog: 0.0, workers: 2.0, inputs_per_s: 0.0 }), ..seen });
        assert_eq!(idle, blind);
        assert!(blind.offload_rate > 0.0, "{blind:?}");
        // 400 requests ahead at about 1 ms each over two workers: 200 ms.
        let swamped = choose(&stats, &costs, &Observed { cloud: Some(CloudLoad { backlog: 400.0, workers: 2.0, inputs_per_s: 0.0 }), ..seen });
        assert!(swamped.offload_rate < blind.offload_rate, "{swamped:?} vs {blind:?}");
        assert_eq!(swamped.offload_rate, 0.0, "no offload makes 100 ms behind 200 ms of backlog: {swamped:?}");
        assert!((CloudLoad { backlog: 400.0, workers: 2.0, inputs_per_s: 0.0 }.wait_us(1_000.0) - 200_000.0).abs() < 1e-9);
    }

    /// Each device may take its share of the pool by its input rate: with
    /// 10,000 inputs a second sharing two workers of 1 ms a request (0.8 ms
    /// at branch 2), no plan offloads more than 0.9 x 2 s / 10,000 of
    /// compute per input, whatever the backlog now; a pool with room
    /// changes nothing, and more workers widen the share.
    #[test]
    fn no_plan_takes_more_than_its_share_of_the_pool() {
        let validation = random_validation(7, 2_000, 3);
        let stats = ModelStats::from_validation(&validation, &[1.0; 3], &default_candidate_p_tars(), &[]).unwrap();
        let costs = Costs { tail_us_per_request: vec![1_000.0, 800.0], ..costs_for(3) };
        let seen = Observed { us_per_byte: 0.08, response_us: 10_000.0, cloud: None };
        let load = |workers: f64, inputs_per_s: f64| Observed { cloud: Some(CloudLoad { backlog: 0.0, workers, inputs_per_s }), ..seen };
        let free = choose(&stats, &costs, &seen);
        assert_eq!(choose(&stats, &costs, &load(2.0, 100.0)), free, "a pool with room");
        assert!(free.offload_rate > 0.0, "{free:?}");
        let per_request = |p: &Prediction| costs.tail_us_per_request[p.plan.branch - 1];
        let shared = choose(&stats, &costs, &load(2.0, 10_000.0));
        assert!(per_request(&free) * free.offload_rate > 0.9 * 2.0 * 1e6 / 10_000.0, "the share binds: {free:?}");
        assert!(shared.offload_rate * per_request(&shared) <= 0.9 * 2.0 * 1e6 / 10_000.0, "{shared:?}");
        assert!(shared.offload_rate > 0.0 && shared.offload_rate < free.offload_rate, "{shared:?} vs {free:?}");
        let wider = choose(&stats, &costs, &load(4.0, 10_000.0));
        assert!(wider.offload_rate > shared.offload_rate, "{wider:?} vs {shared:?}");
        // The bound itself.
        let pool = CloudLoad { backlog: 0.0, workers: 2.0, inputs_per_s: 4_000.0 };
        assert!(!pool.over_share(0.45, 1_000.0, 0.9) && pool.over_share(0.46, 1_000.0, 0.9));
        assert!(!CloudLoad { inputs_per_s: 0.0, ..pool }.over_share(1.0, 1_000.0, 0.9), "rates unknown: no share");
    }

    fn s_exits() -> Vec<ExitLogits> {
        vec![ExitLogits::new(2, vec![1.0, 0.0], vec![0]).unwrap(), ExitLogits::new(2, vec![1.0, 0.0], vec![0]).unwrap()]
    }
}
