//! report.json and the plots of a scenario replay.
//!
//! Rates are fractions of inputs by arrival time; accuracy counts an input
//! right when the answer the device gave (its branch's, the cloud's, or its
//! branch's again after a missed deadline) is the label. A deadline miss is
//! an input whose answer came from the fallback because the cloud's reply
//! was late (or never sent), or whose device compute alone overran.
use std::path::Path;

use anyhow::{Context, Result};
use branchpoint_core::outcome::FallbackReason;
use branchpoint_core::planner::{Codec, OffloadBytes, Plan};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::file::{AutoscaleSection, RateStep};
use super::sim::{Bin, SimConfig};
use super::{PolicyRun, Prepared, Scenario};
use crate::plots::{self, Curve, Panel};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScenarioReport {
    pub scenario: String,
    pub file: String,
    pub seed: u64,
    pub duration_s: f64,
    pub time: String,
    pub model: ModelInfo,
    pub settings: Settings,
    pub groups: Vec<GroupInfo>,
    pub policies: Vec<PolicyReport>,
    pub links: Vec<LinkSeries>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelInfo {
    pub weights: String,
    #[serde(alias = "sha256")]
    pub model_sha256: String,
    pub calibration: String,
    /// How thresholds were chosen: plain p_tars, or certified for them as
    /// target accuracies.
    #[serde(default)]
    pub threshold_rule: String,
    pub temperatures: Vec<f64>,
    pub device_head_ms: Vec<f64>,
    /// Bytes of one offload request per branch, f32 activations.
    pub upload_bytes: Vec<usize>,
    /// The same under each codec (int8: with one-byte zero points).
    #[serde(default)]
    pub codec_upload_bytes: Vec<OffloadBytes>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub workers: usize,
    pub max_batch: usize,
    pub max_wait_ms: f64,
    pub miss_bound: f64,
    pub report_interval_s: f64,
    pub ewma_alpha: f64,
    pub safety: f64,
    pub probe_bytes: usize,
    pub candidate_p_tars: Vec<f64>,
    pub oracle_window_s: f64,
    pub bin_s: f64,
    /// The pool's autoscaling, when the scenario has `[workers.autoscale]`
    /// (`workers` is then the pool's size at the start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleSection>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupInfo {
    pub name: String,
    pub devices: usize,
    /// Inputs per second at each device; with a rate schedule, the mean
    /// over the run.
    pub rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_schedule: Option<Vec<RateStep>>,
    pub deadline_ms: f64,
    pub branch: usize,
    pub p_tar: f64,
    pub network: String,
    pub mean_capacity_mbit_s: f64,
    /// The group's input shift, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<super::file::ShiftSection>,
    /// The group's service level, if any: the adaptive planner chose only
    /// among plans certified for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<branchpoint_core::guarantee::ServiceLevel>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub inputs: u64,
    pub accuracy: f64,
    /// Over inputs answered on the device: exits and declined offloads, not fallbacks.
    pub edge_accuracy: Option<f64>,
    /// Inputs sent to the cloud (answered there or fallen back).
    pub offload_rate: f64,
    pub answered_by_cloud: u64,
    pub fallbacks: u64,
    /// The fallbacks by reason (`core::outcome::FallbackReason::name`):
    /// `deadline` (the answer had not come by it: a miss), `refused` and
    /// `expired` (an overloaded worker answered at once: in time, with the
    /// branch's class), and the transport's.
    #[serde(default)]
    pub fallbacks_by_reason: std::collections::BTreeMap<String, u64>,
    pub deadline_misses: u64,
    pub deadline_miss_rate: f64,
    /// Adaptive: inputs below p_tar the device answered itself because it
    /// predicted their offload would miss the deadline (counted on device).
    pub declined_offloads: u64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    /// Bytes the offloads put on the devices' uplinks (virtual time).
    #[serde(default)]
    pub uplink_bytes: u64,
    /// Offloads put on the uplink under each codec (virtual time).
    #[serde(default)]
    pub offloads_by_codec: CodecCounts,
}

/// A count per activation codec.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct CodecCounts {
    pub f32: u64,
    pub f16: u64,
    pub int8: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyReport {
    pub policy: String,
    #[serde(flatten)]
    pub totals: Totals,
    /// Cloud requests per batch (not for the oracle, which mixes runs).
    pub mean_batch: Option<f64>,
    /// Autoscaled pools: worker-seconds served over the run, what the pool
    /// cost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_seconds: Option<f64>,
    pub groups: Vec<GroupTotals>,
    pub series: Series,
    /// Oracle only: the plan chosen for each group and window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oracle_choices: Option<Vec<OracleChoices>>,
    /// Per branch, the inputs that exited there by confidence: their
    /// accuracy beside what the plans in force predicted for them (not for
    /// the oracle, which mixes runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edge_by_branch: Vec<EdgeCheck>,
    /// Watched policy only: per group, the live estimates, the refits and
    /// what the audits cost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub watch: Vec<WatchReport>,
    /// Planned policies in virtual time: plans delivered that changed a
    /// device's plan, per device per hour (how much the plan flaps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_changes_per_device_hour: Option<f64>,
}

/// One group under the watched policy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WatchReport {
    pub group: String,
    /// The target on-device accuracy (the group's p_tar).
    pub target: f64,
    pub audit_rate: f64,
    pub audits: u64,
    /// Audit bytes as a share of all bytes the group's devices uploaded
    /// (offloads and audits).
    pub audit_uplink_share: Option<f64>,
    /// Worker time the audits took, in seconds (their share of full batches).
    pub audit_worker_s: f64,
    /// When the group's inputs shifted, and how long after it the first
    /// alarm (with or without a refit) came.
    pub shift_at_s: Option<f64>,
    pub detection_delay_s: Option<f64>,
    pub refits: Vec<RefitReport>,
    /// Alarms with no refit after them (refits off, too soon, too few samples).
    pub alarms_without_refit_s: Vec<f64>,
    /// Share of the estimates whose 95 % interval holds the true on-device
    /// agreement of the same window.
    pub interval_coverage: Option<f64>,
    /// At the end of every bin: the live estimate of on-device agreement
    /// with the final exit and its 95 % interval, and the truth (agreement,
    /// and accuracy against the labels), over the window of the plan in force.
    pub t_s: Vec<f64>,
    pub estimated_edge_agreement: Vec<Option<f64>>,
    pub estimate_low: Vec<Option<f64>>,
    pub estimate_high: Vec<Option<f64>>,
    /// The same audits' accuracy against the labels (simulation only).
    pub estimated_edge_accuracy: Vec<Option<f64>>,
    pub true_edge_agreement: Vec<Option<f64>>,
    pub true_edge_accuracy: Vec<Option<f64>>,
    pub temperature: Vec<f64>,
    pub threshold: Vec<f64>,
    /// Per 10 s: predicted against measured on-device accuracy.
    #[serde(default)]
    pub windows: Vec<WatchWindow>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RefitReport {
    pub t_s: f64,
    pub temperature: f64,
    pub threshold: f64,
    pub fit_inputs: usize,
    pub certify_inputs: usize,
    /// On-device agreement with the final exit the refit predicts (its
    /// certifying inputs that exit under the new plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_agreement: Option<f64>,
}

/// One 10-s window of a watched group: the plan in force's prediction of
/// on-device accuracy beside what its devices answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WatchWindow {
    pub start_s: f64,
    /// Before the first refit, the validation split's prediction for the
    /// group's plan (mean calibrated confidence of the inputs that exit:
    /// accuracy against labels); after a refit, its predicted agreement
    /// with the final exit.
    pub predicted: Option<f64>,
    /// Inputs answered on the device in the window: their agreement with
    /// the final exit, and their accuracy against the labels.
    pub on_device: u64,
    pub measured_agreement: Option<f64>,
    pub measured_accuracy: Option<f64>,
}

/// Predicted against measured on-device accuracy at one branch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeCheck {
    pub branch: usize,
    pub exits: u64,
    pub measured_edge_accuracy: Option<f64>,
    /// Mean over those inputs of their plan's predicted edge accuracy (the
    /// mean calibrated confidence of the validation inputs it keeps).
    pub predicted_edge_accuracy: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GroupTotals {
    pub group: String,
    #[serde(flatten)]
    pub totals: Totals,
}

/// Per time bin, all groups together; `null` where a bin had no input.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Series {
    pub t_s: Vec<f64>,
    pub inputs: Vec<u64>,
    pub accuracy: Vec<Option<f64>>,
    pub deadline_miss_rate: Vec<Option<f64>>,
    pub offload_rate: Vec<Option<f64>>,
    /// Offloads the branch answered instead (every reason: late, refused,
    /// expired, ...), per input.
    #[serde(default)]
    pub fallback_rate: Vec<Option<f64>>,
    /// Accuracy of the inputs answered on the device because their
    /// confidence reached p_tar (or the device declined the offload).
    #[serde(default)]
    pub edge_accuracy: Vec<Option<f64>>,
    /// Mean p_tar and branch of the plans the inputs were decided with.
    pub p_tar: Vec<Option<f64>>,
    pub branch: Vec<Option<f64>>,
    /// Adaptive only: the devices' smoothed uplink estimate and the
    /// planner's predictions, averaged over the reports in the bin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_uplink_mbit_s: Option<Vec<Option<f64>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_accuracy: Option<Vec<Option<f64>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predicted_miss_rate: Option<Vec<Option<f64>>>,
    /// Autoscaled pools only: the mean number of workers serving over the
    /// bin (one leaving counts until its last batch is done; one starting
    /// does not count yet). The pool serves every group; the oracle's is
    /// that of the runs it chose for the first group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers: Option<Vec<f64>>,
    /// Autoscaled pools only: the 95th percentile latency of the bin's
    /// inputs, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms_p95: Option<Vec<Option<f64>>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OracleChoices {
    pub group: String,
    pub window_start_s: Vec<f64>,
    pub plans: Vec<Plan>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LinkSeries {
    pub group: String,
    pub t_s: Vec<f64>,
    pub capacity_mbit_s: Vec<f64>,
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Nearest-rank percentile, in ms.
fn percentile_ms(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1e3
}

fn totals(bins: &[&Bin], latencies: &mut [u32]) -> Totals {
    let mut t = Bin::default();
    for b in bins {
        t.add(b);
    }
    latencies.sort_unstable();
    let (sent_by_codec, uplink_bytes) = (t.sent_by_codec, t.uplink_bytes);
    let t = t.counts;
    Totals {
        inputs: t.inputs,
        accuracy: ratio(t.correct, t.inputs).unwrap_or(0.0),
        edge_accuracy: ratio(t.edge_correct, t.on_device),
        offload_rate: ratio(t.offloaded, t.inputs).unwrap_or(0.0),
        answered_by_cloud: t.cloud,
        fallbacks: t.fallbacks,
        fallbacks_by_reason: FallbackReason::ALL.iter().map(|&r| (r.name().to_string(), t.fallbacks_for(r))).filter(|(_, n)| *n > 0).collect(),
        deadline_misses: t.misses,
        deadline_miss_rate: ratio(t.misses, t.inputs).unwrap_or(0.0),
        declined_offloads: t.declined,
        latency_ms_p50: percentile_ms(latencies, 0.5),
        latency_ms_p95: percentile_ms(latencies, 0.95),
        latency_ms_p99: percentile_ms(latencies, 0.99),
        uplink_bytes,
        offloads_by_codec: CodecCounts { f32: sent_by_codec[Codec::F32.index()], f16: sent_by_codec[Codec::F16.index()], int8: sent_by_codec[Codec::Int8.index()] },
    }
}

fn describe_network(s: &Scenario, g: &super::file::GroupSection) -> String {
    let n = &g.network;
    if let Some(rate) = n.uplink_mbit_s {
        format!("constant {rate} Mbit/s, RTT {} ms, loss {}", n.rtt_ms.unwrap_or(0.0), n.loss.unwrap_or(0.0))
    } else if let Some(steps) = &n.schedule {
        let parts: Vec<String> = steps.iter().map(|st| format!("{} s: {} Mbit/s, RTT {} ms", st.at_s, st.uplink_mbit_s, st.rtt_ms)).collect();
        format!("schedule [{}]", parts.join("; "))
    } else if let Some(t) = &n.trace {
        let path = if t.is_absolute() { t.clone() } else { s.dir.join(t) };
        let name = path.file_name().map_or_else(|| path.display().to_string(), |f| f.to_string_lossy().into_owned());
        format!("trace {name}, RTT {} ms, loss {}", n.rtt_ms.unwrap_or(0.0), n.loss.unwrap_or(0.0))
    } else {
        String::new()
    }
}

pub fn build(scenario: &Scenario, cfg: &SimConfig, prepared: &Prepared, weights: &str, sha256: &str, runs: Vec<PolicyRun>, time: super::TimeMode) -> ScenarioReport {
    let bin_s = cfg.bin_us as f64 / 1e6;
    let t_s: Vec<f64> = (0..cfg.bins()).map(|i| i as f64 * bin_s).collect();
    let groups = scenario
        .groups
        .iter()
        .zip(&cfg.groups)
        .map(|(g, sim)| GroupInfo {
            name: g.name.clone(),
            devices: g.devices,
            // A schedule's mean rounded: 15.8333... reads better as 15.833.
            rate: g.rate.unwrap_or_else(|| (g.mean_rate(scenario.duration_s) * 1e3).round() / 1e3),
            rate_schedule: g.rate_schedule.clone(),
            deadline_ms: g.deadline_ms,
            branch: g.branch,
            p_tar: g.p_tar,
            network: describe_network(scenario, g),
            mean_capacity_mbit_s: sim.link.mean_capacity_mbit_s(0, cfg.duration_us),
            shift: g.shift.clone(),
            level: g.level,
        })
        .collect();
    let links = scenario
        .groups
        .iter()
        .zip(&cfg.groups)
        .map(|(g, sim)| LinkSeries {
            group: g.name.clone(),
            t_s: t_s.clone(),
            capacity_mbit_s: (0..cfg.bins() as u64).map(|i| sim.link.mean_capacity_mbit_s(i * cfg.bin_us, ((i + 1) * cfg.bin_us).min(cfg.duration_us))).collect(),
        })
        .collect();
    // What the validation split predicts of each group's own plan: the
    // watched windows' prediction until a refit replaces it.
    let starting: Vec<Option<f64>> = prepared.group_plans.iter().map(|p| prepared.sim.predictions.lookup(*p).map(|s| s.edge_accuracy)).collect();
    let policies = runs.into_iter().map(|run| policy_report(scenario, cfg, &t_s, run, time, &starting)).collect();
    let p = &scenario.planner;
    ScenarioReport {
        scenario: scenario.name.clone(),
        file: scenario.path.display().to_string(),
        seed: scenario.seed,
        duration_s: scenario.duration_s,
        time: match time {
            super::TimeMode::Virtual => "virtual".into(),
            super::TimeMode::Real => "real".into(),
        },
        model: ModelInfo {
            weights: weights.into(),
            model_sha256: sha256.into(),
            calibration: prepared.method.name().into(),
            threshold_rule: prepared.threshold_rule.clone(),
            temperatures: prepared.temperatures.clone(),
            device_head_ms: prepared.sim.head_us.iter().map(|u| u / 1e3).collect(),
            upload_bytes: prepared.sim.upload_bytes.iter().map(|b| b.f32 as usize).collect(),
            codec_upload_bytes: prepared.sim.upload_bytes.clone(),
        },
        settings: Settings {
            workers: cfg.workers,
            max_batch: cfg.max_batch,
            max_wait_ms: cfg.max_wait_us as f64 / 1e3,
            miss_bound: p.miss_bound,
            report_interval_s: p.report_interval_s,
            ewma_alpha: p.ewma_alpha,
            safety: p.safety,
            probe_bytes: p.probe_bytes,
            candidate_p_tars: prepared.candidate_p_tars.clone(),
            oracle_window_s: scenario.oracle.window_s,
            bin_s: scenario.report.bin_s,
            autoscale: scenario.workers.autoscale.clone().filter(|_| time == super::TimeMode::Virtual),
        },
        groups,
        policies,
        links,
    }
}

/// One policy's report: its totals, per group and over all, its series in
/// bins of `t_s`, and what it chose and watched.
fn policy_report(scenario: &Scenario, cfg: &SimConfig, t_s: &[f64], mut run: PolicyRun, time: super::TimeMode, starting: &[Option<f64>]) -> PolicyReport {
    let all_bins: Vec<&Bin> = run.bins.iter().flatten().collect();
    let mut all_lat: Vec<u32> = run.latencies_us.concat();
    let overall = totals(&all_bins, &mut all_lat);
    let per_group = scenario
        .groups
        .iter()
        .enumerate()
        .map(|(g, gs)| GroupTotals { group: gs.name.clone(), totals: totals(&run.bins[g].iter().collect::<Vec<_>>(), &mut run.latencies_us[g]) })
        .collect();
    let mut merged = vec![Bin::default(); cfg.bins()];
    for g in &run.bins {
        for (m, b) in merged.iter_mut().zip(g) {
            m.add(b);
        }
    }
    let adaptive = matches!(run.policy, super::Policy::Adaptive | super::Policy::AdaptiveNetwork | super::Policy::AdaptiveF32 | super::Policy::AdaptiveCloudBlind);
    // Live runs cannot autoscale: their bins hold no pool.
    let autoscaled = scenario.workers.autoscale.is_some() && time == super::TimeMode::Virtual;
    let bin_width_s = |i: usize| ((((i as u64 + 1) * cfg.bin_us).min(cfg.duration_us) - i as u64 * cfg.bin_us) as f64 / 1e6).max(1e-9);
    let per_report = |f: fn(&Bin) -> f64| -> Option<Vec<Option<f64>>> { adaptive.then(|| merged.iter().map(|b| (b.reports > 0).then(|| f(b) / b.reports as f64)).collect()) };
    let series = Series {
        t_s: t_s.to_vec(),
        inputs: merged.iter().map(|b| b.counts.inputs).collect(),
        accuracy: merged.iter().map(|b| ratio(b.counts.correct, b.counts.inputs)).collect(),
        deadline_miss_rate: merged.iter().map(|b| ratio(b.counts.misses, b.counts.inputs)).collect(),
        offload_rate: merged.iter().map(|b| ratio(b.counts.offloaded, b.counts.inputs)).collect(),
        fallback_rate: merged.iter().map(|b| ratio(b.counts.fallbacks, b.counts.inputs)).collect(),
        edge_accuracy: merged.iter().map(|b| ratio(b.counts.edge_correct, b.counts.on_device)).collect(),
        p_tar: merged.iter().map(|b| (b.counts.inputs > 0).then(|| b.p_tar_sum / b.counts.inputs as f64)).collect(),
        branch: merged.iter().map(|b| (b.counts.inputs > 0).then(|| b.branch_sum as f64 / b.counts.inputs as f64)).collect(),
        estimated_uplink_mbit_s: per_report(|b| b.est_mbit_s_sum),
        predicted_accuracy: per_report(|b| b.predicted_accuracy_sum),
        predicted_miss_rate: per_report(|b| b.predicted_miss_sum),
        workers: autoscaled.then(|| merged.iter().enumerate().map(|(i, b)| b.worker_us as f64 / 1e6 / bin_width_s(i)).collect()),
        latency_ms_p95: autoscaled.then(|| {
            merged
                .iter_mut()
                .map(|b| {
                    b.latencies_us.sort_unstable();
                    (!b.latencies_us.is_empty()).then(|| percentile_ms(&b.latencies_us, 0.95))
                })
                .collect()
        }),
    };
    let window_s = cfg.window_us as f64 / 1e6;
    let oracle_choices = run.choices.map(|choices| {
        choices
            .into_iter()
            .zip(&scenario.groups)
            .map(|(plans, g)| OracleChoices { group: g.name.clone(), window_start_s: (0..plans.len()).map(|w| w as f64 * window_s).collect(), plans })
            .collect()
    });
    let edge_by_branch = run
        .edge
        .iter()
        .flatten()
        .enumerate()
        .map(|(k, e)| EdgeCheck {
            branch: k + 1,
            exits: e.exits,
            measured_edge_accuracy: (e.exits > 0).then(|| e.correct as f64 / e.exits as f64),
            predicted_edge_accuracy: (e.exits > 0 && e.predicted_sum.is_finite()).then(|| e.predicted_sum / e.exits as f64),
        })
        .collect();
    let watch = run
        .watch
        .iter()
        .zip(&scenario.groups)
        .enumerate()
        .map(|(gi, (w, g))| {
            let controlled = run.policy == super::Policy::Adaptive;
            // The adaptive policy keeps the group's service level.
            let target = if controlled { g.level.map_or(g.p_tar, |l| l.accuracy) } else { g.p_tar };
            WatchReport { windows: watch_windows(&run.bins[gi], cfg.bin_us, &w.refits, starting[gi], controlled), target, ..watch_report(scenario, g, w) }
        })
        .collect();
    let devices: usize = cfg.groups.iter().map(|g| g.devices).sum();
    let hours = cfg.duration_us as f64 / 3.6e9;
    let planned = matches!(run.policy, super::Policy::Adaptive | super::Policy::AdaptiveNetwork | super::Policy::AdaptiveF32 | super::Policy::AdaptiveCloudBlind);
    PolicyReport {
        plan_changes_per_device_hour: run.plan_changes.filter(|_| planned && devices > 0).map(|n| n as f64 / devices as f64 / hours),
        watch,
        policy: run.policy.name().into(),
        totals: overall,
        mean_batch: run.mean_batch.is_finite().then_some(run.mean_batch),
        worker_seconds: autoscaled.then(|| merged.iter().map(|b| b.worker_us).sum::<u64>() as f64 / 1e6),
        groups: per_group,
        series,
        oracle_choices,
        edge_by_branch,
    }
}

fn watch_report(scenario: &Scenario, g: &super::file::GroupSection, w: &super::sim::WatchTrace) -> WatchReport {
    let s = |us: u64| us as f64 / 1e6;
    let shift_at_s = g.shift.as_ref().map(|sh| sh.at_s);
    let first_alarm = w.refits.iter().map(|r| r.t_us).chain(w.alarms_only.iter().copied()).filter(|&t| shift_at_s.is_none_or(|at| s(t) >= at)).min();
    let detection_delay_s = shift_at_s.and_then(|at| first_alarm.map(|t| s(t) - at));
    let judged: Vec<bool> = w.points.iter().filter_map(|p| Some(p.estimate.zip(p.true_agreement).map(|(e, t)| e.low <= t && t <= e.high)).flatten()).collect();
    let bytes = w.audit_bytes + w.offload_bytes;
    WatchReport {
        group: g.name.clone(),
        target: g.p_tar,
        audit_rate: scenario.watch.audit_rate,
        audits: w.audits,
        audit_uplink_share: (bytes > 0).then(|| w.audit_bytes as f64 / bytes as f64),
        audit_worker_s: w.audit_worker_us / 1e6,
        shift_at_s,
        detection_delay_s,
        refits: w
            .refits
            .iter()
            .map(|r| RefitReport {
                t_s: s(r.t_us),
                temperature: r.temperature,
                threshold: r.threshold,
                fit_inputs: r.fit_inputs,
                certify_inputs: r.certify_inputs,
                predicted_agreement: r.predicted_agreement,
            })
            .collect(),
        alarms_without_refit_s: w.alarms_only.iter().map(|&t| s(t)).collect(),
        interval_coverage: (!judged.is_empty()).then(|| judged.iter().filter(|&&c| c).count() as f64 / judged.len() as f64),
        t_s: w.points.iter().map(|p| s(p.t_us)).collect(),
        estimated_edge_agreement: w.points.iter().map(|p| p.estimate.map(|e| e.estimate)).collect(),
        estimate_low: w.points.iter().map(|p| p.estimate.map(|e| e.low)).collect(),
        estimate_high: w.points.iter().map(|p| p.estimate.map(|e| e.high)).collect(),
        estimated_edge_accuracy: w.points.iter().map(|p| p.estimate_accuracy.map(|e| e.estimate)).collect(),
        true_edge_agreement: w.points.iter().map(|p| p.true_agreement).collect(),
        true_edge_accuracy: w.points.iter().map(|p| p.true_accuracy).collect(),
        temperature: w.points.iter().map(|p| p.temperature).collect(),
        threshold: w.points.iter().map(|p| p.threshold).collect(),
        windows: Vec::new(),
    }
}

/// A watched group's 10-s windows (`WatchWindow`) from its bins.
fn watch_windows(bins: &[Bin], bin_us: u64, refits: &[branchpoint_core::monitor::Refit], starting: Option<f64>, controlled: bool) -> Vec<WatchWindow> {
    let per = (10_000_000 / bin_us.max(1)).max(1) as usize;
    bins.chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let start_us = i as u64 * per as u64 * bin_us;
            let in_force = refits.iter().rfind(|r| r.t_us <= start_us);
            let (n, agree, right) = chunk.iter().fold((0, 0, 0), |(n, a, r), b| (n + b.counts.on_device, a + b.edge_agree, r + b.counts.edge_correct));
            let rate = |k: u64| (n > 0).then(|| k as f64 / n as f64);
            // Controlled runs count each on-device input's own prediction
            // (devices of a group may be on different plans).
            let predicted_sum: f64 = chunk.iter().map(|b| b.predicted_edge_sum).sum();
            let predicted = if controlled { (n > 0).then(|| predicted_sum / n as f64) } else { in_force.map_or(starting, |r| r.predicted_agreement) };
            WatchWindow { start_s: start_us as f64 / 1e6, predicted, on_device: n, measured_agreement: rate(agree), measured_accuracy: rate(right) }
        })
        .collect()
}

/// Colours by policy, the same in every plot.
fn policy_color(name: &str) -> RGBColor {
    match name {
        "static" => RGBColor(214, 39, 40),
        "cloud-only" => RGBColor(31, 119, 180),
        "device-only" => RGBColor(127, 127, 127),
        "adaptive" => RGBColor(44, 160, 44),
        "adaptive-f32" => RGBColor(140, 86, 75),
        "adaptive-cloud-blind" => RGBColor(188, 189, 34),
        "uncalibrated" => RGBColor(255, 127, 14),
        "watched" => RGBColor(23, 190, 207),
        _ => RGBColor(148, 103, 189),
    }
}

fn points(t: &[f64], v: &[Option<f64>], scale: f64) -> Vec<(f64, f64)> {
    t.iter().zip(v).filter_map(|(&t, v)| v.map(|v| (t, v * scale))).collect()
}

/// Writes the plots; returns their paths.
pub fn plot(report: &ScenarioReport, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    plots::prepare_dir(dir)?;
    let mut written = vec![plot_network(report, dir)?, plot_accuracy(report, dir)?, plot_summary(report, dir)?];
    let shifted = report.groups.iter().any(|g| g.shift.is_some());
    if shifted || report.policies.iter().any(|p| p.policy == "watched") {
        written.push(plot_watched(report, dir)?);
    }
    // Autoscaling: the offered load, the pool's size and the latency it
    // gave, every policy.
    if let Some(a) = &report.settings.autoscale {
        let path = dir.join("workers.png");
        plot_workers(report, a, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// The network and the plans: capacity (and what adaptive devices
/// estimated), p_tar and branch over time.
fn plot_network(report: &ScenarioReport, dir: &Path) -> Result<std::path::PathBuf> {
    let x_range = (0.0, report.duration_s);
    let policy = |name: &str| report.policies.iter().find(|p| p.policy == name);
    let mut cap_curves: Vec<Curve> = report
        .links
        .iter()
        .enumerate()
        .map(|(i, l)| Curve {
            label: format!("capacity ({})", l.group),
            color: [RGBColor(0, 0, 0), RGBColor(140, 86, 75), RGBColor(23, 190, 207)][i % 3],
            points: l.t_s.iter().copied().zip(l.capacity_mbit_s.iter().copied()).collect(),
            dashed: false,
        })
        .collect();
    if let Some(est) = policy("adaptive").and_then(|p| p.series.estimated_uplink_mbit_s.as_ref()) {
        cap_curves.push(Curve { label: "adaptive devices' estimate".into(), color: policy_color("adaptive"), points: points(&report.links[0].t_s, est, 1.0), dashed: true });
    }
    let cap_max = cap_curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    let plan_policies = ["static", "adaptive", "oracle"];
    let p_tar_curves: Vec<Curve> = plan_policies
        .iter()
        .filter_map(|&n| policy(n).map(|p| Curve { label: n.into(), color: policy_color(n), points: points(&p.series.t_s, &p.series.p_tar, 1.0), dashed: false }))
        .collect();
    let branch_curves: Vec<Curve> = plan_policies
        .iter()
        .filter_map(|&n| policy(n).map(|p| Curve { label: n.into(), color: policy_color(n), points: points(&p.series.t_s, &p.series.branch, 1.0), dashed: false }))
        .collect();
    let branches = report.model.upload_bytes.len() as f64;
    let path = dir.join("network.png");
    plots::time_panels(
        &path,
        &format!("{}: uplink and plans", report.scenario),
        x_range,
        &[
            Panel { y_label: "uplink (Mbit/s)", y_range: (0.0, cap_max), curves: cap_curves },
            Panel { y_label: "p_tar (mean)", y_range: (0.0, 1.05), curves: p_tar_curves },
            Panel { y_label: "branch (mean)", y_range: (0.5, branches + 0.5), curves: branch_curves },
        ],
    )?;
    Ok(path)
}

/// Accuracy and deadline misses over time, every policy.
fn plot_accuracy(report: &ScenarioReport, dir: &Path) -> Result<std::path::PathBuf> {
    let x_range = (0.0, report.duration_s);
    let acc: Vec<Curve> = report
        .policies
        .iter()
        .map(|p| Curve { label: p.policy.clone(), color: policy_color(&p.policy), points: points(&p.series.t_s, &p.series.accuracy, 100.0), dashed: false })
        .collect();
    let acc_min = acc.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(100.0, f64::min);
    let miss: Vec<Curve> = report
        .policies
        .iter()
        .map(|p| Curve { label: p.policy.clone(), color: policy_color(&p.policy), points: points(&p.series.t_s, &p.series.deadline_miss_rate, 100.0), dashed: false })
        .collect();
    let miss_max = miss.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(5.0, f64::max) * 1.1;
    let path = dir.join("accuracy-and-misses.png");
    plots::time_panels(
        &path,
        &format!("{}: accuracy and deadline misses per {} s", report.scenario, report.settings.bin_s),
        x_range,
        &[
            Panel { y_label: "accuracy (%)", y_range: ((acc_min - 1.0).max(0.0).floor(), 100.0), curves: acc },
            Panel { y_label: "deadline misses (%)", y_range: (0.0, miss_max.min(100.0)), curves: miss },
        ],
    )?;
    Ok(path)
}

/// Summary per policy.
fn plot_summary(report: &ScenarioReport, dir: &Path) -> Result<std::path::PathBuf> {
    let path = dir.join("summary.png");
    let names: Vec<String> = report.policies.iter().map(|p| p.policy.clone()).collect();
    plots::grouped_bars(
        &path,
        &format!("{}: per policy", report.scenario),
        &names,
        &names.iter().map(|n| policy_color(n)).collect::<Vec<_>>(),
        &[
            ("accuracy (%)", report.policies.iter().map(|p| 100.0 * p.totals.accuracy).collect()),
            ("deadline misses (%)", report.policies.iter().map(|p| 100.0 * p.totals.deadline_miss_rate).collect()),
            ("offloaded (%)", report.policies.iter().map(|p| 100.0 * p.totals.offload_rate).collect()),
        ],
    )?;
    Ok(path)
}

/// Calibration watched: on-device accuracy against the target for the
/// policies with a fixed branch, and the watched run's live estimate beside
/// the truth.
fn plot_watched(report: &ScenarioReport, dir: &Path) -> Result<std::path::PathBuf> {
    let x_range = (0.0, report.duration_s);
    let policy = |name: &str| report.policies.iter().find(|p| p.policy == name);
    let target = report.groups.first().map_or(0.9, |g| g.p_tar);
    let mut edge: Vec<Curve> = ["static", "uncalibrated", "watched"]
        .iter()
        .filter_map(|&n| policy(n).map(|p| Curve { label: n.into(), color: policy_color(n), points: points(&p.series.t_s, &p.series.edge_accuracy, 100.0), dashed: false }))
        .collect();
    edge.push(Curve {
        label: format!("target {:.0} %", 100.0 * target),
        color: RGBColor(0, 0, 0),
        points: vec![(0.0, 100.0 * target), (report.duration_s, 100.0 * target)],
        dashed: true,
    });
    let low = edge.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(100.0, f64::min);
    let mut panels = vec![Panel { y_label: "on-device accuracy (%)", y_range: ((low - 2.0).max(0.0).floor(), 100.0), curves: edge }];
    if let Some(w) = policy("watched").and_then(|p| p.watch.first()) {
        let pct = |v: &[Option<f64>]| points(&w.t_s, v, 100.0);
        let curves = vec![
            Curve { label: "estimated agreement (audits)".into(), color: policy_color("watched"), points: pct(&w.estimated_edge_agreement), dashed: false },
            Curve { label: "95 % interval".into(), color: RGBColor(158, 218, 229), points: pct(&w.estimate_low), dashed: true },
            Curve { label: String::new(), color: RGBColor(158, 218, 229), points: pct(&w.estimate_high), dashed: true },
            Curve { label: "true agreement".into(), color: RGBColor(0, 0, 0), points: pct(&w.true_edge_agreement), dashed: false },
            Curve { label: "true accuracy (labels)".into(), color: RGBColor(127, 127, 127), points: pct(&w.true_edge_accuracy), dashed: false },
        ];
        let low = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(100.0, f64::min);
        panels.push(Panel { y_label: "watched: on-device (%)", y_range: ((low - 2.0).max(0.0).floor(), 100.0), curves });
    }
    let path = dir.join("calibration-watched.png");
    plots::time_panels(&path, &format!("{}: on-device accuracy and its live estimate per {} s", report.scenario, report.settings.bin_s), x_range, &panels)?;
    Ok(path)
}

fn plot_workers(report: &ScenarioReport, a: &AutoscaleSection, path: &Path) -> Result<()> {
    let x_range = (0.0, report.duration_s);
    let bin_s = report.settings.bin_s;
    let offered: Vec<Curve> = report
        .policies
        .first()
        .map(|p| Curve {
            label: "inputs arriving".into(),
            color: RGBColor(0, 0, 0),
            points: p.series.t_s.iter().zip(&p.series.inputs).map(|(&t, &n)| (t, n as f64 / bin_s)).collect(),
            dashed: false,
        })
        .into_iter()
        .collect();
    let offered_max = offered.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    let workers: Vec<Curve> = report
        .policies
        .iter()
        .filter_map(|p| {
            let w = p.series.workers.as_ref()?;
            Some(Curve { label: p.policy.clone(), color: policy_color(&p.policy), points: p.series.t_s.iter().copied().zip(w.iter().copied()).collect(), dashed: false })
        })
        .collect();
    let mut latency: Vec<Curve> = report
        .policies
        .iter()
        .filter_map(|p| {
            let l = p.series.latency_ms_p95.as_ref()?;
            Some(Curve { label: p.policy.clone(), color: policy_color(&p.policy), points: points(&p.series.t_s, l, 1.0), dashed: false })
        })
        .collect();
    let mut deadlines: Vec<f64> = report.groups.iter().map(|g| g.deadline_ms).collect();
    deadlines.sort_by(f64::total_cmp);
    deadlines.dedup();
    for d in deadlines {
        latency.push(Curve { label: format!("deadline {d} ms"), color: RGBColor(0, 0, 0), points: vec![(x_range.0, d), (x_range.1, d)], dashed: true });
    }
    let latency_max = latency.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(1.0, f64::max) * 1.1;
    plots::time_panels(
        path,
        &format!("{}: autoscaled workers ({}..={}) per {} s", report.scenario, a.min_workers, a.max_workers, bin_s),
        x_range,
        &[
            Panel { y_label: "offered (inputs/s)", y_range: (0.0, offered_max), curves: offered },
            Panel { y_label: "workers serving (mean)", y_range: (0.0, a.max_workers as f64 + 0.5), curves: workers },
            Panel { y_label: "latency p95 (ms)", y_range: (0.0, latency_max), curves: latency },
        ],
    )
}

pub fn write_json(report: &ScenarioReport, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(report)? + "\n";
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
