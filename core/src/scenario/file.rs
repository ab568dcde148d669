//! Scenario files (TOML): what to replay, read and validated in one place.
//! `scenarios/wifi-stable.toml` documents every key. Unknown keys and bad
//! values are errors that name the key and the file.
use std::path::{Path, PathBuf};

use crate::autoscale::AutoscaleConfig;
use crate::calibration::Method;
use crate::link::{Link, Segment};
use crate::planner::Codec;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeMode {
    /// Discrete-event replay: as fast as the CPU allows, same seed, same report.
    Virtual,
    /// The live actors, paced by the wall clock.
    Real,
}

/// How devices choose their partition branch and p_tar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The group's branch and p_tar, fixed: the paper's setting.
    Static,
    /// Every input offloaded at the group's branch.
    CloudOnly,
    /// Every input answered at the group's branch.
    DeviceOnly,
    /// The one control loop (`control::GroupControl`): the planner, from
    /// what devices observe and what the workers report of their load,
    /// choosing among `[planner] codecs` and only among the plans certified
    /// for each group's service level (`[groups.level]`, or the group's
    /// p_tar as its accuracy at `[watch] delta`) on the evidence in force;
    /// every branch watched from audits and offloads (`[watch]`), and a
    /// drift alarm or refit re-plans the group at once.
    Adaptive,
    /// The planner on the validation split's predictions alone, unwatched:
    /// it adapts to the network but not to the inputs (the planner before
    /// the control loop, to compare with).
    AdaptiveNetwork,
    /// `adaptive-network` with f32 activations only (the codec-blind
    /// planner, to compare with).
    AdaptiveF32,
    /// `adaptive-network` blind to the workers' load: it sees only what
    /// devices observe (the planner before cloud load, to compare with).
    AdaptiveCloudBlind,
    /// In hindsight, the best fixed branch and p_tar in each time window.
    Oracle,
    /// The group's branch and p_tar, fixed, on uncalibrated confidences
    /// (T = 1), whatever the scenario's calibration.
    Uncalibrated,
    /// The group's branch and p_tar as a target, watched live: devices audit
    /// a share of their on-device inputs, and the calibrator refits the
    /// branch when its on-device accuracy drifts below the target (`[watch]`).
    Watched,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::Static => "static",
            Policy::CloudOnly => "cloud-only",
            Policy::DeviceOnly => "device-only",
            Policy::Adaptive => "adaptive",
            Policy::AdaptiveNetwork => "adaptive-network",
            Policy::AdaptiveF32 => "adaptive-f32",
            Policy::AdaptiveCloudBlind => "adaptive-cloud-blind",
            Policy::Oracle => "oracle",
            Policy::Uncalibrated => "uncalibrated",
            Policy::Watched => "watched",
        }
    }

    pub fn all() -> Vec<Policy> {
        vec![Policy::Static, Policy::CloudOnly, Policy::DeviceOnly, Policy::Adaptive, Policy::Oracle]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub seed: u64,
    pub duration_s: f64,
    #[serde(default = "default_time")]
    pub time: TimeMode,
    #[serde(default = "Policy::all")]
    pub policies: Vec<Policy>,
    /// uncalibrated, global, per-branch, or certified (per-branch
    /// temperatures, and thresholds certified by Learn-then-Test: every
    /// p_tar, the groups' and the planner's candidates, is then a target
    /// on-device accuracy, with confidence 1 - planner.certify_delta).
    #[serde(default = "default_calibration")]
    pub calibration: String,
    #[serde(default)]
    pub compute: ComputeSection,
    #[serde(default)]
    pub workers: WorkersSection,
    #[serde(default)]
    pub planner: PlannerSection,
    #[serde(default)]
    pub oracle: OracleSection,
    #[serde(default)]
    pub report: ReportSection,
    #[serde(default)]
    pub watch: WatchSection,
    pub groups: Vec<GroupSection>,
    /// The scenario file's folder: relative trace paths start there.
    #[serde(skip)]
    pub dir: PathBuf,
    #[serde(skip)]
    pub path: PathBuf,
}

fn default_time() -> TimeMode {
    TimeMode::Virtual
}

fn default_calibration() -> String {
    "per-branch".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComputeSection {
    /// Device compute = this machine's measured head time times this.
    pub device_slowdown: f64,
    /// Cloud compute = this machine's measured tail time times this.
    pub cloud_slowdown: f64,
    /// Compute profile (`branchpoint profile --json`); default: beside the model.
    pub profile: Option<PathBuf>,
}

impl Default for ComputeSection {
    fn default() -> Self {
        Self { device_slowdown: 1.0, cloud_slowdown: 1.0, profile: None }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersSection {
    /// The pool's size; with `autoscale`, its size at the start.
    pub count: usize,
    pub max_batch: usize,
    pub max_wait_ms: f64,
    /// Virtual time only: `crate::autoscale` resizes the pool
    /// from the load it sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSection>,
}

impl Default for WorkersSection {
    fn default() -> Self {
        Self { count: 2, max_batch: 32, max_wait_ms: 2.0, autoscale: None }
    }
}

/// `[workers.autoscale]`: the policy's settings (`AutoscaleConfig`, same
/// names and defaults) and how the engine applies them. The fields are
/// spelled out rather than flattened because serde cannot deny unknown keys
/// through `flatten`, and a typo here must not pass silently.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleSection {
    pub min_workers: usize,
    pub max_workers: usize,
    pub up_queue_delay_us: f64,
    pub up_backlog_per_worker: f64,
    pub down_queue_delay_us: f64,
    pub down_backlog_per_worker: f64,
    pub up_after_ticks: u32,
    pub down_after_ticks: u32,
    /// How often the policy samples the load, in seconds.
    pub tick_s: f64,
    /// How long a started worker takes before it serves, in seconds.
    pub start_delay_s: f64,
}

impl Default for AutoscaleSection {
    fn default() -> Self {
        let p = AutoscaleConfig::default();
        Self {
            min_workers: p.min_workers,
            max_workers: p.max_workers,
            up_queue_delay_us: p.up_queue_delay_us,
            up_backlog_per_worker: p.up_backlog_per_worker,
            down_queue_delay_us: p.down_queue_delay_us,
            down_backlog_per_worker: p.down_backlog_per_worker,
            up_after_ticks: p.up_after_ticks,
            down_after_ticks: p.down_after_ticks,
            tick_s: 1.0,
            start_delay_s: 1.0,
        }
    }
}

impl AutoscaleSection {
    /// The policy's settings. Every field is named (no `..`), so a field
    /// added to `AutoscaleConfig` fails to compile here until the section
    /// has it too.
    pub fn policy(&self) -> AutoscaleConfig {
        AutoscaleConfig {
            min_workers: self.min_workers,
            max_workers: self.max_workers,
            up_queue_delay_us: self.up_queue_delay_us,
            up_backlog_per_worker: self.up_backlog_per_worker,
            down_queue_delay_us: self.down_queue_delay_us,
            down_backlog_per_worker: self.down_backlog_per_worker,
            up_after_ticks: self.up_after_ticks,
            down_after_ticks: self.down_after_ticks,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlannerSection {
    /// Most deadline misses to accept, as a fraction of inputs: the adaptive
    /// planner's bound on its predictions, and the oracle's on what happened.
    pub miss_bound: f64,
    /// How often each device reports what it observed; the planner answers
    /// each report with a plan.
    pub report_interval_s: f64,
    /// Weight of a new sample in the devices' smoothed estimates.
    pub ewma_alpha: f64,
    /// Deviations added to the smoothed estimates to be conservative.
    pub safety: f64,
    /// A device that sent nothing for a report interval probes its uplink
    /// with this many bytes, so the planner can learn the link came back.
    pub probe_bytes: usize,
    /// Candidate thresholds (0: device only, 1: cloud only).
    pub p_tars: Option<Vec<f64>>,
    /// With `calibration = "certified"`: each certificate holds with
    /// probability at least 1 - certify_delta.
    pub certify_delta: f64,
    /// Activation codecs the adaptive planner may choose (f32, f16, int8),
    /// by their measured accuracy and bytes. Default f32 and int8: f16 ties
    /// int8 in accuracy on the shipped models at twice the bytes, and each
    /// codec costs a replay its answers on every split, once per model.
    pub codecs: Vec<Codec>,
    /// Whether the adaptive planner counts the workers' backlog in an
    /// offload's predicted response time, and keeps each device's offloads
    /// within its share of the pool.
    pub cloud_aware: bool,
    /// The most of the worker pool's time the devices' offloads may take
    /// together (`Costs::pool_utilisation`), with `cloud_aware`.
    pub pool_utilisation: f64,
}

impl Default for PlannerSection {
    fn default() -> Self {
        Self {
            miss_bound: 0.05,
            report_interval_s: 1.0,
            ewma_alpha: 0.25,
            safety: 2.0,
            probe_bytes: 15_000,
            p_tars: None,
            certify_delta: 0.05,
            codecs: vec![Codec::F32, Codec::Int8],
            cloud_aware: true,
            pool_utilisation: crate::planner::DEFAULT_POOL_UTILISATION,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OracleSection {
    pub window_s: f64,
}

impl Default for OracleSection {
    fn default() -> Self {
        Self { window_s: 10.0 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSection {
    /// Width of one time-series bin.
    pub bin_s: f64,
}

impl Default for ReportSection {
    fn default() -> Self {
        Self { bin_s: 1.0 }
    }
}

/// `[watch]`: how the watched policy's calibrator watches each group's
/// branch (`crate::monitor`); the group's p_tar is the target
/// on-device accuracy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchSection {
    /// Share of inputs whose audit coin comes up: the on-device ones among
    /// them are sent to the cloud too.
    pub audit_rate: f64,
    /// Estimates and refits use the last window_s seconds.
    pub window_s: f64,
    /// The drift test alarms at on-device accuracy target - drift_margin ...
    pub drift_margin: f64,
    /// ... with at most this false-alarm probability per run of the test.
    pub alarm_alpha: f64,
    /// Off: the alarm is raised and counted, the branch is not refit.
    pub auto_refit: bool,
    pub min_refit_interval_s: f64,
    /// Sampled inputs a refit needs (half fit, half certify).
    pub min_refit_sample: usize,
    /// A refit certifies its threshold with confidence 1 - delta.
    pub delta: f64,
}

impl Default for WatchSection {
    fn default() -> Self {
        Self { audit_rate: 0.05, window_s: 60.0, drift_margin: 0.03, alarm_alpha: 0.01, auto_refit: true, min_refit_interval_s: 30.0, min_refit_sample: 200, delta: 0.05 }
    }
}

/// `[groups.shift]`: from `at_s` on, the group's inputs are corrupted
/// (`crate::corrupt`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShiftSection {
    pub at_s: f64,
    /// The shift ends here (the clean inputs come back); none: it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until_s: Option<f64>,
    /// KIND:SEVERITY, e.g. "gaussian-noise:3".
    pub corruption: String,
    #[serde(default = "default_shift_seed")]
    pub seed: u64,
}

fn default_shift_seed() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSection {
    pub name: String,
    pub devices: usize,
    /// Mean inputs per second at each device (Poisson) ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// ... or a rate that steps over time: exactly one of the two.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_schedule: Option<Vec<RateStep>>,
    pub deadline_ms: f64,
    /// Initial partition branch (and the static policy's).
    pub branch: usize,
    /// Initial p_tar (and the static policy's).
    pub p_tar: f64,
    /// Initial activation codec (and the fixed policies').
    #[serde(default)]
    pub codec: Codec,
    pub network: NetworkSection,
    /// An input shift from some point in time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<ShiftSection>,
    /// The group's service level (`guarantee::ServiceLevel`): the adaptive
    /// planner chooses only among plans certified for it, by what it
    /// minimises, under its miss bound. Without one it plans on the
    /// candidate p_tars by predicted accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<crate::guarantee::ServiceLevel>,
}

/// Exactly one of: `uplink_mbit_s` (constant), `schedule`, or `trace`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    pub uplink_mbit_s: Option<f64>,
    pub rtt_ms: Option<f64>,
    pub loss: Option<f64>,
    pub schedule: Option<Vec<ScheduleStep>>,
    pub trace: Option<PathBuf>,
}

/// From `at_s` on (until the next step), each device's mean inputs per second.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateStep {
    pub at_s: f64,
    pub rate: f64,
}

impl GroupSection {
    /// The arrival rate as steps: a constant `rate` is one step at 0.
    /// Validation guarantees exactly one of `rate` and `rate_schedule`.
    pub fn rate_steps(&self) -> Vec<RateStep> {
        match (&self.rate_schedule, self.rate) {
            (Some(steps), _) => steps.clone(),
            (None, rate) => vec![RateStep { at_s: 0.0, rate: rate.unwrap_or(0.0) }],
        }
    }

    /// Mean inputs per second at each device over the first `duration_s`.
    pub fn mean_rate(&self, duration_s: f64) -> f64 {
        let steps = self.rate_steps();
        let mut inputs = 0.0;
        for (i, s) in steps.iter().enumerate() {
            let end = steps.get(i + 1).map_or(duration_s, |n| n.at_s).min(duration_s);
            inputs += s.rate * (end - s.at_s).max(0.0);
        }
        inputs / duration_s
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleStep {
    pub at_s: f64,
    pub uplink_mbit_s: f64,
    pub rtt_ms: f64,
    #[serde(default)]
    pub loss: f64,
}

impl Scenario {
    /// The distinct input shifts of the groups, in group order: shifted view
    /// i + 1 of the test inputs is the i-th.
    pub fn shift_views(&self) -> Vec<(crate::corrupt::Corruption, u64)> {
        let mut views = Vec::new();
        for g in &self.groups {
            if let Some(shift) = &g.shift {
                if let Ok(c) = crate::corrupt::Corruption::parse(&shift.corruption) {
                    if !views.contains(&(c, shift.seed)) {
                        views.push((c, shift.seed));
                    }
                }
            }
        }
        views
    }

    /// A group's shift: (from µs, its view).
    pub fn group_shift(&self, g: &GroupSection) -> Option<(u64, usize)> {
        let shift = g.shift.as_ref()?;
        let c = crate::corrupt::Corruption::parse(&shift.corruption).ok()?;
        let view = self.shift_views().iter().position(|v| *v == (c, shift.seed))? + 1;
        Some(((shift.at_s * 1e6).round() as u64, view))
    }

    /// Reads and validates a scenario file; `trace` replaces the trace of
    /// every group whose network is a trace.
    pub fn read(path: &Path, trace: Option<&Path>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("could not read scenario {}; the project's scenarios are in scenarios/", path.display()))?;
        Self::parse(&text, path, trace)
    }

    pub fn parse(text: &str, path: &Path, trace: Option<&Path>) -> Result<Self> {
        let mut s: Scenario = toml::from_str(text).map_err(|e| anyhow::anyhow!("scenario {}: {e}", path.display()))?;
        s.path = path.to_path_buf();
        s.dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if let Some(t) = trace {
            s.override_trace(t)?;
        }
        s.validate()?;
        Ok(s)
    }

    fn override_trace(&mut self, trace: &Path) -> Result<()> {
        let mut any = false;
        for g in &mut self.groups {
            if g.network.trace.is_some() {
                // Absolute, so that it is not read relative to the scenario's folder.
                g.network.trace = Some(std::path::absolute(trace).unwrap_or_else(|_| trace.to_path_buf()));
                any = true;
            }
        }
        if !any {
            bail!("--trace {}: scenario {} has no group whose network is a trace", trace.display(), self.path.display());
        }
        Ok(())
    }

    pub fn calibration_method(&self) -> Result<Method> {
        if self.certified() {
            return Ok(Method::PerBranch);
        }
        Method::parse(&self.calibration)
            .map_err(|e| anyhow::anyhow!("scenario {}: calibration: {e}, or certified (thresholds certified for target accuracies)", self.path.display()))
    }

    /// Whether p_tars are target accuracies whose thresholds are certified.
    pub fn certified(&self) -> bool {
        self.calibration == "certified"
    }

    fn err(&self, key: &str, reason: impl std::fmt::Display) -> anyhow::Error {
        anyhow::anyhow!("scenario {}: {key}: {reason}", self.path.display())
    }

    fn validate(&self) -> Result<()> {
        let positive = |key: &str, v: f64| -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(self.err(key, format!("{v} must be a positive number")))
            }
        };
        if self.name.trim().is_empty() {
            return Err(self.err("name", "must not be empty"));
        }
        positive("duration_s", self.duration_s)?;
        if self.duration_s > 86_400.0 {
            return Err(self.err("duration_s", format!("{} s is more than a day", self.duration_s)));
        }
        if self.policies.is_empty() {
            return Err(self.err("policies", "name at least one of static, cloud-only, device-only, adaptive, adaptive-f32, adaptive-cloud-blind, oracle, uncalibrated, watched"));
        }
        let codecs = &self.planner.codecs;
        if codecs.is_empty() || (1..codecs.len()).any(|i| codecs[..i].contains(&codecs[i])) {
            let named: Vec<&str> = codecs.iter().map(|c| c.name()).collect();
            return Err(self.err("planner.codecs", format!("{named:?}: name each codec the planner may choose once, from f32, f16, int8")));
        }
        self.calibration_method()?;
        positive("compute.device_slowdown", self.compute.device_slowdown)?;
        positive("compute.cloud_slowdown", self.compute.cloud_slowdown)?;
        if self.workers.count == 0 {
            return Err(self.err("workers.count", "must be at least 1"));
        }
        if self.workers.max_batch == 0 {
            return Err(self.err("workers.max_batch", "must be at least 1"));
        }
        if !(self.workers.max_wait_ms.is_finite() && self.workers.max_wait_ms >= 0.0) {
            return Err(self.err("workers.max_wait_ms", format!("{} must be at least 0", self.workers.max_wait_ms)));
        }
        if let Some(a) = &self.workers.autoscale {
            self.validate_autoscale(a)?;
        }
        let p = &self.planner;
        if !(p.miss_bound > 0.0 && p.miss_bound < 1.0) {
            return Err(self.err("planner.miss_bound", format!("{} must be in (0, 1)", p.miss_bound)));
        }
        if !(p.pool_utilisation > 0.0 && p.pool_utilisation <= 1.0) {
            return Err(self.err("planner.pool_utilisation", format!("{} must be in (0, 1], e.g. 0.9", p.pool_utilisation)));
        }
        positive("planner.report_interval_s", p.report_interval_s)?;
        if !(p.ewma_alpha > 0.0 && p.ewma_alpha <= 1.0) {
            return Err(self.err("planner.ewma_alpha", format!("{} must be in (0, 1]", p.ewma_alpha)));
        }
        if !(p.safety.is_finite() && p.safety >= 0.0) {
            return Err(self.err("planner.safety", format!("{} must be at least 0", p.safety)));
        }
        if p.probe_bytes == 0 {
            return Err(self.err("planner.probe_bytes", "must be at least 1"));
        }
        if !(p.certify_delta > 0.0 && p.certify_delta < 1.0) {
            return Err(self.err("planner.certify_delta", format!("{} must be in (0, 1)", p.certify_delta)));
        }
        if let Some(ps) = &p.p_tars {
            if ps.is_empty() || ps.iter().any(|x| !(0.0..=1.0).contains(x)) {
                return Err(self.err("planner.p_tars", format!("{ps:?}: give one or more thresholds in [0, 1]")));
            }
        }
        positive("oracle.window_s", self.oracle.window_s)?;
        positive("report.bin_s", self.report.bin_s)?;
        let ratio = self.oracle.window_s / self.report.bin_s;
        if (ratio - ratio.round()).abs() > 1e-9 {
            return Err(self.err("oracle.window_s", format!("{} s must be a whole number of report.bin_s ({} s)", self.oracle.window_s, self.report.bin_s)));
        }
        if self.duration_s / self.report.bin_s > 100_000.0 {
            return Err(self.err("report.bin_s", "more than 100,000 bins: use wider bins"));
        }
        if self.groups.is_empty() {
            return Err(self.err("groups", "define at least one [[groups]]"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            let key = |k: &str| format!("groups[{i}] ({}).{k}", g.name);
            if !branchpoint_messages::subjects::is_valid_id(&g.name) {
                return Err(self.err(&format!("groups[{i}].name"), format!("{:?}: use 1 to 64 letters, digits, '-' or '_'", g.name)));
            }
            if !names.insert(g.name.clone()) {
                return Err(self.err(&format!("groups[{i}].name"), format!("{:?} is used twice", g.name)));
            }
            if g.devices == 0 || g.devices > 100_000 {
                return Err(self.err(&key("devices"), format!("{} must be between 1 and 100000", g.devices)));
            }
            match (g.rate, &g.rate_schedule) {
                (Some(rate), None) => positive(&key("rate"), rate)?,
                (None, Some(steps)) => self.validate_rate_schedule(steps, &key("rate_schedule"))?,
                _ => {
                    return Err(self.err(
                        &key("rate"),
                        "give exactly one of rate (inputs/s per device) or rate_schedule (steps over time, e.g. [{ at_s = 0.0, rate = 5.0 }, { at_s = 20.0, rate = 40.0 }])",
                    ))
                }
            }
            positive(&key("deadline_ms"), g.deadline_ms)?;
            if let Err(e) = branchpoint_messages::PartitionBranch::new(g.branch) {
                return Err(self.err(&key("branch"), e.to_string()));
            }
            if let Err(e) = branchpoint_messages::PTar::target(g.p_tar) {
                return Err(self.err(&key("p_tar"), e.to_string()));
            }
            self.link(g).map_err(|e| self.err(&key("network"), format!("{e:#}")))?;
            if let Some(shift) = &g.shift {
                crate::corrupt::Corruption::parse(&shift.corruption).map_err(|e| self.err(&key("shift.corruption"), e))?;
                if !(shift.at_s.is_finite() && shift.at_s >= 0.0 && shift.at_s < self.duration_s) {
                    return Err(self.err(&key("shift.at_s"), format!("{} must be in [0, duration_s = {})", shift.at_s, self.duration_s)));
                }
                if let Some(until) = shift.until_s.filter(|u| !(u.is_finite() && *u > shift.at_s && *u <= self.duration_s)) {
                    return Err(self.err(&key("shift.until_s"), format!("{until} must be after at_s = {} and at most duration_s = {}", shift.at_s, self.duration_s)));
                }
            }
        }
        self.validate_levels()?;
        self.validate_watch()
    }

    fn validate_levels(&self) -> Result<()> {
        for g in &self.groups {
            if let Some(level) = &g.level {
                level.validate().map_err(|e| self.err(&format!("groups.{}.level", g.name), e))?;
                if self.time == TimeMode::Real {
                    return Err(self.err(
                        &format!("groups.{}.level", g.name),
                        "service levels are planned in virtual time only so far (the live replay's planner plans on p_tars): remove the level or set time = \"virtual\"",
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_watch(&self) -> Result<()> {
        let w = &self.watch;
        if !(w.audit_rate > 0.0 && w.audit_rate <= 1.0) {
            return Err(self.err("watch.audit_rate", format!("{} must be in (0, 1]", w.audit_rate)));
        }
        for (key, v) in [("watch.window_s", w.window_s), ("watch.min_refit_interval_s", w.min_refit_interval_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(self.err(key, format!("{v} must be a positive number of seconds")));
            }
        }
        for (key, v) in [("watch.drift_margin", w.drift_margin), ("watch.alarm_alpha", w.alarm_alpha), ("watch.delta", w.delta)] {
            if !(v > 0.0 && v < 1.0) {
                return Err(self.err(key, format!("{v} must be in (0, 1)")));
            }
        }
        if w.min_refit_sample < 4 {
            return Err(self.err("watch.min_refit_sample", format!("{} must be at least 4", w.min_refit_sample)));
        }
        for g in &self.groups {
            if self.policies.contains(&Policy::Watched) && g.p_tar <= w.drift_margin {
                return Err(self.err("watch.drift_margin", format!("{} must be below every group's p_tar (the target), {} for {}", w.drift_margin, g.p_tar, g.name)));
            }
        }
        Ok(())
    }

    fn validate_autoscale(&self, a: &AutoscaleSection) -> Result<()> {
        a.policy().validate().map_err(|e| self.err("workers.autoscale", e))?;
        if !(a.tick_s.is_finite() && a.tick_s > 0.0) {
            return Err(self.err("workers.autoscale.tick_s", format!("{} must be a positive number of seconds", a.tick_s)));
        }
        if self.duration_s / a.tick_s > 1_000_000.0 {
            return Err(self.err("workers.autoscale.tick_s", format!("{} s makes more than 1,000,000 ticks in {} s: use a longer tick", a.tick_s, self.duration_s)));
        }
        if !(a.start_delay_s.is_finite() && a.start_delay_s >= 0.0) {
            return Err(self.err("workers.autoscale.start_delay_s", format!("{} must be at least 0 seconds", a.start_delay_s)));
        }
        let count = self.workers.count;
        if count < a.min_workers || count > a.max_workers {
            return Err(self.err(
                "workers.count",
                format!(
                    "{count} is outside workers.autoscale's min_workers..=max_workers ({}..={}): with autoscaling it is the pool's size at the start",
                    a.min_workers, a.max_workers
                ),
            ));
        }
        if self.time == TimeMode::Real {
            return Err(self.err("workers.autoscale", "autoscaling is replayed in virtual time only: remove the table or set time = \"virtual\""));
        }
        Ok(())
    }

    fn validate_rate_schedule(&self, steps: &[RateStep], key: &str) -> Result<()> {
        let Some(first) = steps.first() else {
            return Err(self.err(key, "is empty: give at least one step, the first at_s = 0.0"));
        };
        if first.at_s != 0.0 {
            return Err(self.err(&format!("{key}[0].at_s"), format!("{}: the first step must start at 0.0", first.at_s)));
        }
        for (j, s) in steps.iter().enumerate() {
            if !(s.rate.is_finite() && s.rate > 0.0) {
                return Err(self.err(&format!("{key}[{j}].rate"), format!("{} must be a positive number of inputs/s", s.rate)));
            }
            if j > 0 && !(s.at_s.is_finite() && s.at_s > steps[j - 1].at_s) {
                return Err(self.err(&format!("{key}[{j}].at_s"), format!("{} must be after the step before ({}): list steps in time order", s.at_s, steps[j - 1].at_s)));
            }
            if s.at_s >= self.duration_s {
                return Err(self.err(&format!("{key}[{j}].at_s"), format!("{} starts after the scenario ends (duration_s = {})", s.at_s, self.duration_s)));
            }
        }
        Ok(())
    }

    /// The group's uplink, from its `network` section.
    pub fn link(&self, g: &GroupSection) -> Result<Link> {
        let n = &g.network;
        let loss = n.loss.unwrap_or(0.0);
        let us = |ms: f64, key: &str| -> Result<u64> {
            if ms.is_finite() && ms >= 0.0 {
                Ok((ms * 1e3).round() as u64)
            } else {
                bail!("{key} = {ms} must be at least 0 ms")
            }
        };
        match (n.uplink_mbit_s, &n.schedule, &n.trace) {
            (Some(rate), None, None) => {
                if !(rate.is_finite() && rate > 0.0) {
                    bail!("uplink_mbit_s = {rate} must be a positive rate");
                }
                let rtt = n.rtt_ms.context("a constant link needs rtt_ms")?;
                Ok(Link::constant(rate, us(rtt, "rtt_ms")?, loss)?)
            }
            (None, Some(steps), None) => {
                if n.rtt_ms.is_some() || n.loss.is_some() {
                    bail!("with a schedule, give rtt_ms and loss in each step, not beside it");
                }
                let mut segs = Vec::new();
                for (j, s) in steps.iter().enumerate() {
                    if !(s.at_s.is_finite() && s.at_s >= 0.0) {
                        bail!("schedule[{j}].at_s = {} must be at least 0", s.at_s);
                    }
                    segs.push(Segment {
                        at_us: (s.at_s * 1e6).round() as u64,
                        uplink_mbit_s: s.uplink_mbit_s,
                        rtt_us: us(s.rtt_ms, &format!("schedule[{j}].rtt_ms"))?,
                        loss: s.loss,
                    });
                }
                Ok(Link::schedule(segs)?)
            }
            (None, None, Some(trace)) => {
                let rtt = n.rtt_ms.context("a trace link needs rtt_ms (the trace gives only capacity)")?;
                let path = if trace.is_absolute() { trace.clone() } else { self.dir.join(trace) };
                Ok(Link::trace(&path, us(rtt, "rtt_ms")?, loss)?)
            }
            _ => bail!("give exactly one of uplink_mbit_s (a constant link), schedule (steps over time) or trace (a Mahimahi file)"),
        }
    }
}
