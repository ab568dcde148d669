//! Scenario replay: read a scenario, replay it under each policy, and write
//! the report and plots.
//!
//! `file` (reads and validates scenario files) and `sim` (the virtual-time
//! engine) are the pure core's (`branchpoint_core::scenario`); here a model
//! is prepared for them, `live` replays in real time with actors, and
//! `report` turns runs into report.json and PNG plots. Every policy
//! replays the same arrivals on the same links (same seed); the oracle is
//! assembled afterwards from runs with every fixed candidate plan.
pub mod live;
pub mod report;

pub use branchpoint_core::scenario::{file, sim};

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use branchpoint_core::calibration::{self, ExitLogits, Method};
use branchpoint_core::costs::ComputeProfile;
use branchpoint_core::guarantee::{Minimise, ServiceLevel};
use branchpoint_core::monitor::MonitorConfig;
use branchpoint_core::planner::{certified_candidates, default_candidate_p_tars, Candidate, Codec, CodecFinals, ModelStats, OffloadBytes, Plan};
use branchpoint_core::risk::Target;
use branchpoint_core::scenario::sim::LevelPlanning;
use branchpoint_messages::{encode, Deadline, OffloadRequest};
use branchpoint_models::Model;

pub use file::{Policy, Scenario, TimeMode};
use sim::{AutoscaleSim, CodecClasses, GroupSim, Planning, Plans, RunResult, SimConfig, SimModel, View};

/// Everything about the model a replay needs, computed once.
pub struct Prepared {
    pub sim: SimModel,
    pub method: Method,
    pub temperatures: Vec<f64>,
    pub candidate_p_tars: Vec<f64>,
    /// Each group's own plan: its branch, and its p_tar or (certified) the
    /// threshold certified for its p_tar as a target accuracy.
    pub group_plans: Vec<Plan>,
    /// How thresholds were chosen, in words for reports.
    pub threshold_rule: String,
    /// Each group's service level with the candidates certified for it on
    /// the validation split (`None`: no level).
    pub group_levels: Vec<Option<LevelPlanning>>,
    /// The `adaptive` policy's service level per group (`control_levels`);
    /// empty when the scenario does not run it.
    pub control_levels: Vec<LevelPlanning>,
}

/// Reads the compute profile: the scenario's, or the one beside the model.
pub fn read_profile(scenario: &Scenario, weights: &Path) -> Result<ComputeProfile> {
    let path = match &scenario.compute.profile {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => scenario.dir.join(p),
        None => weights.with_extension("profile.json"),
    };
    read_profile_at(&path)
}

/// Reads a compute profile written by `branchpoint profile --json`.
pub fn read_profile_at(path: &Path) -> Result<ComputeProfile> {
    let path = path.to_path_buf();
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("could not read the compute profile {}; write one with `branchpoint profile --batch-sizes 1,8,32 --json {}`", path.display(), path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a compute profile written by `branchpoint profile --json`", path.display()))
}

/// The final exit's answers when activations cross the wire under each
/// codec a replay may use besides f32 (`codecs_used`), per branch.
#[derive(Debug, Clone, Default)]
pub struct CodecAnswers {
    /// On the validation split: what the planner predicts with.
    pub validation: Vec<CodecFinals>,
    /// On the test split, and on each shift view's corrupted test inputs.
    pub test: Vec<CodecFinals>,
    pub shifted: Vec<Vec<CodecFinals>>,
}

/// The codecs other than f32 a replay of `scenario` may use: the planner's
/// (when a policy plans or an oracle picks) and the groups' own.
pub fn codecs_used(scenario: &Scenario) -> Vec<Codec> {
    let planning = scenario.policies.iter().any(|p| matches!(p, Policy::Adaptive | Policy::AdaptiveNetwork | Policy::AdaptiveCloudBlind | Policy::Oracle));
    let mut v: Vec<Codec> = if planning { scenario.planner.codecs.clone() } else { Vec::new() };
    v.extend(scenario.groups.iter().map(|g| g.codec));
    v.retain(|c| *c != Codec::F32);
    v.sort();
    v.dedup();
    v
}

/// The answers a replay of `scenario` needs under its codecs
/// (`codecs_used`): on the validation and test splits and on each shift
/// view's inputs (`shifted`, in order), recorded once per model, codec and
/// inputs.
pub fn codec_answers(scenario: &Scenario, model: &Model, data: &branchpoint_models::data::ModelData, shifted: &[branchpoint_models::data::Split]) -> Result<CodecAnswers> {
    use branchpoint_models::model::recorded_codec_final_logits;
    let codecs = codecs_used(scenario);
    let on = |split: &branchpoint_models::data::Split| -> Result<Vec<CodecFinals>> {
        codecs.iter().map(|&codec| Ok(CodecFinals { codec, per_branch: recorded_codec_final_logits(model, split, codec)? })).collect()
    };
    if !codecs.is_empty() {
        tracing::info!("scenario {}: the final exit's answers under codecs {codecs:?} (computed once per model and inputs)", scenario.name);
    }
    Ok(CodecAnswers { validation: on(&data.validation)?, test: on(&data.test)?, shifted: shifted.iter().map(on).collect::<Result<_>>()? })
}

/// The final exit's classes of every input from each codec's answers.
fn codec_classes(answers: &[CodecFinals], t_final: f64) -> Vec<CodecClasses> {
    answers
        .iter()
        .map(|c| CodecClasses { codec: c.codec, per_branch: c.per_branch.iter().map(|f| (0..f.len()).map(|i| f.predict(i, t_final).0 as u32).collect()).collect() })
        .collect()
}

/// Computes the model's answers on the test split, its temperatures and
/// the planner's statistics on the validation split, and the costs.
///
/// `shifted` holds the test logits (every exit) of each of the scenario's
/// `shift_views`, in order; `codecs` the answers under the codecs of
/// `codecs_used`.
pub fn prepare(
    scenario: &Scenario,
    model: &Model,
    validation: &[ExitLogits],
    test: &[ExitLogits],
    shifted: &[Vec<ExitLogits>],
    codecs: &CodecAnswers,
    profile: &ComputeProfile,
) -> Result<Prepared> {
    let method = scenario.calibration_method()?;
    let num_exits = test.len();
    let branches = num_exits - 1;
    for (i, g) in scenario.groups.iter().enumerate() {
        if g.branch > branches {
            bail!("scenario {}: groups[{i}] ({}).branch: {} but this model has branches 1..={branches}", scenario.path.display(), g.name, g.branch);
        }
    }
    let temperatures = calibration::fit(method, validation)?;
    let points = model.partition_points();
    if profile.partitions.len() != branches {
        bail!("the compute profile has {} partitions, the model {branches}: profile the same model", profile.partitions.len());
    }
    let (head_us, tail_us) = compute_costs(profile, scenario.compute.device_slowdown, scenario.compute.cloud_slowdown)?;
    let upload_bytes = upload_bytes(points)?;
    let branch_pred = branch_predictions(&test[..branches], &temperatures);
    let fin = &test[num_exits - 1];
    let final_class = (0..fin.len()).map(|i| fin.predict(i, temperatures[num_exits - 1]).0 as u32).collect();
    if shifted.len() != scenario.shift_views().len() || shifted.iter().any(|v| v.len() != num_exits || v.iter().any(|e| e.len() != fin.len())) {
        bail!("scenario {}: the shifted test logits do not match its shifts (a bug)", scenario.path.display());
    }
    let needed = codecs_used(scenario);
    let have = |a: &[CodecFinals]| a.iter().map(|c| c.codec).collect::<Vec<_>>() == needed;
    if !have(&codecs.validation) || !have(&codecs.test) || codecs.shifted.len() != shifted.len() || !codecs.shifted.iter().all(|v| have(v)) {
        bail!("scenario {}: the answers under codecs {needed:?} do not match its codecs (a bug)", scenario.path.display());
    }
    let t_final = temperatures[num_exits - 1];
    let views: Vec<View> = shifted
        .iter()
        .zip(&codecs.shifted)
        .map(|(exits, codec_answers)| View {
            codec_final: codec_classes(codec_answers, t_final),
            branch_pred: branch_predictions(&exits[..branches], &temperatures),
            final_class: (0..fin.len()).map(|i| exits[num_exits - 1].predict(i, temperatures[num_exits - 1]).0 as u32).collect(),
            branch_logits: exits[..branches].to_vec(),
        })
        .collect();
    let labels = fin.labels.iter().map(|&y| y as u32).collect();
    let candidate_p_tars = scenario.planner.p_tars.clone().unwrap_or_else(default_candidate_p_tars);
    let delta = scenario.planner.certify_delta;
    let (stats, group_plans, threshold_rule) = if scenario.certified() {
        // Every p_tar strictly inside (0, 1) is a target accuracy.
        let targets: Vec<f64> = candidate_p_tars.iter().copied().filter(|p| branchpoint_messages::PTar::target(*p).is_ok()).collect();
        let stats = ModelStats::certified(validation, &temperatures, &targets, delta, &codecs.validation)?;
        let mut plans = Vec::new();
        for g in &scenario.groups {
            let own = certified_candidates(validation, &temperatures, &[g.p_tar], delta)?;
            plans.push(Plan { branch: g.branch, p_tar: own[g.branch - 1][1].p_tar, codec: g.codec });
        }
        (
            stats,
            plans,
            format!("certified: each p_tar is a target on-device accuracy, its threshold certified by Learn-then-Test on the validation split with confidence {:.2}", 1.0 - delta),
        )
    } else {
        let stats = ModelStats::from_validation(validation, &temperatures, &candidate_p_tars, &codecs.validation)?;
        let plans = scenario.groups.iter().map(|g| Plan { branch: g.branch, p_tar: g.p_tar, codec: g.codec }).collect();
        (stats, plans, format!("p_tar: exit when the {} confidence reaches it", method.name()))
    };
    // Predictions for every plan a replay can use, so that each report can
    // set what the planner predicted beside what happened.
    let mut extra: Vec<Vec<Candidate>> = vec![Vec::new(); branches];
    for p in &group_plans {
        if stats.lookup(*p).is_none() {
            extra[p.branch - 1].push(Candidate { p_tar: p.p_tar, certified: None });
        }
    }
    let mut predictions = stats.clone();
    predictions.candidates.extend(ModelStats::for_candidates(validation, &temperatures, &extra, &codecs.validation)?.candidates);
    let group_levels = group_levels(scenario, validation, &temperatures, &codecs.validation)?;
    let control_levels =
        if scenario.policies.contains(&Policy::Adaptive) { control_levels(scenario, &group_levels, validation, &temperatures, &codecs.validation)? } else { Vec::new() };
    for l in group_levels.iter().flatten() {
        predictions.candidates.extend(l.stats.candidates.iter().filter(|c| predictions.lookup(c.plan).is_none()).copied().collect::<Vec<_>>());
    }
    Ok(Prepared {
        sim: SimModel {
            branch_pred,
            final_class,
            labels,
            head_us,
            upload_bytes,
            tail_us,
            stats,
            predictions,
            branch_logits: test[..branches].to_vec(),
            temperatures: temperatures.clone(),
            reference: branchpoint_core::monitor::ReferenceInputs::of_exits(validation, t_final),
            shifted: views,
            codec_final: codec_classes(&codecs.test, t_final),
        },
        method,
        temperatures,
        candidate_p_tars,
        group_plans,
        threshold_rule,
        group_levels,
        control_levels,
    })
}

/// Each branch's (class, calibrated confidence) of every input.
fn branch_predictions(branches: &[ExitLogits], temperatures: &[f64]) -> Vec<Vec<(u32, f64)>> {
    branches
        .iter()
        .zip(temperatures)
        .map(|(e, &t)| {
            (0..e.len())
                .map(|i| {
                    let (c, p) = e.predict(i, t);
                    (c as u32, p)
                })
                .collect()
        })
        .collect()
}

/// Each group's service level with the candidates certified for it. A
/// level is certified on the validation split here, once: one it cannot
/// certify stops the replay, naming the most it can.
fn group_levels(scenario: &Scenario, validation: &[ExitLogits], temperatures: &[f64], codecs: &[CodecFinals]) -> Result<Vec<Option<LevelPlanning>>> {
    scenario
        .groups
        .iter()
        .map(|g| {
            g.level
                .map(|level| {
                    let stats = ModelStats::for_level(validation, temperatures, &level, codecs).with_context(|| format!("scenario {}: groups.{}.level", scenario.name, g.name))?;
                    Ok(LevelPlanning { level, stats })
                })
                .transpose()
        })
        .collect()
}

/// The service level the `adaptive` policy keeps for each group: its
/// `[groups.level]`, or else its p_tar as the on-device accuracy at the
/// watch's delta and the planner's miss bound, maximising overall accuracy
/// once kept. Refused, naming the most the validation split certifies, when
/// a group's cannot be certified.
fn control_levels(scenario: &Scenario, explicit: &[Option<LevelPlanning>], validation: &[ExitLogits], temperatures: &[f64], codecs: &[CodecFinals]) -> Result<Vec<LevelPlanning>> {
    scenario
        .groups
        .iter()
        .zip(explicit)
        .map(|(g, level)| match level {
            Some(l) => Ok(l.clone()),
            None => {
                let level = ServiceLevel { accuracy: g.p_tar, delta: scenario.watch.delta, miss_bound: scenario.planner.miss_bound, minimise: Minimise::Nothing };
                let stats = ModelStats::for_level(validation, temperatures, &level, codecs).with_context(|| {
                    format!("scenario {}: the adaptive policy keeps group {}'s p_tar {} as its on-device accuracy at delta {} ([watch] delta); give the group a [groups.level] the model can certify, or a lower p_tar", scenario.name, g.name, g.p_tar, scenario.watch.delta)
                })?;
                Ok(LevelPlanning { level, stats })
            }
        })
        .collect()
}

/// Device head time per branch (batch 1) and cloud tail times per branch
/// (batch size, time), in microseconds, from a profile and slowdowns.
#[allow(clippy::type_complexity)]
pub fn compute_costs(profile: &ComputeProfile, device_slowdown: f64, cloud_slowdown: f64) -> Result<(Vec<f64>, Vec<Vec<(usize, f64)>>)> {
    let batch1 = profile
        .batch_sizes
        .iter()
        .position(|&b| b == 1)
        .context("the compute profile has no batch size 1; write one with `branchpoint profile --batch-sizes 1,8,32 --json FILE`")?;
    let mut head_us = Vec::new();
    let mut tail_us = Vec::new();
    for part in &profile.partitions {
        head_us.push(part.head_median_ms[batch1] * 1e3 * device_slowdown);
        let mut pts: Vec<(usize, f64)> = profile.batch_sizes.iter().zip(&part.tail_median_ms).map(|(&b, &ms)| (b as usize, ms * 1e3 * cloud_slowdown)).collect();
        pts.sort_by_key(|p| p.0);
        tail_us.push(pts);
    }
    Ok((head_us, tail_us))
}

/// The size on the wire of one offload request at each branch under each
/// codec, framing included: exact for f32 and f16; for int8 with the zero
/// points of a ReLU's activation (0, one byte each; a zero point above 127
/// takes two).
pub fn upload_bytes(points: &[branchpoint_models::net::PartitionPoint]) -> Result<Vec<OffloadBytes>> {
    points
        .iter()
        .enumerate()
        .map(|(k, p)| {
            let mut shape = vec![1u32];
            shape.extend(p.activation_shape.iter().map(|&d| d as u32));
            let zeros = vec![0f32; p.activation_bytes / 4];
            let bytes = |codec: Codec| -> Result<f64> {
                let request = OffloadRequest {
                    device_id: "device-00000".into(),
                    seq: u64::MAX,
                    partition_branch: (k + 1) as u8,
                    activation: codec.encode(&shape, &zeros)?,
                    deadline: Deadline { sent_at_unix_us: u64::MAX, budget_us: u64::MAX },
                    audit: None,
                    // Devices name their model in every request.
                    model_sha256: Some("0".repeat(64)),
                };
                Ok(encode(&request)?.len() as f64)
            };
            Ok(OffloadBytes { f32: bytes(Codec::F32)?, f16: bytes(Codec::F16)?, int8: bytes(Codec::Int8)? })
        })
        .collect()
}

pub fn sim_config(s: &Scenario, prepared: &Prepared) -> Result<SimConfig> {
    let groups = s
        .groups
        .iter()
        .zip(&prepared.group_plans)
        .zip(&prepared.group_levels)
        .map(|((g, &initial), level)| {
            let rate_steps: Vec<(u64, f64)> = g.rate_steps().iter().map(|s| ((s.at_s * 1e6).round() as u64, s.rate)).collect();
            Ok(GroupSim {
                devices: g.devices,
                rate: rate_steps[0].1,
                rate_steps,
                deadline_us: (g.deadline_ms * 1e3).round() as u64,
                link: s.link(g)?,
                initial,
                target: g.p_tar,
                shift: s.group_shift(g),
                shift_until_us: g.shift.as_ref().and_then(|sh| sh.until_s).map(|u| (u * 1e6).round() as u64),
                level: level.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(SimConfig {
        seed: s.seed,
        duration_us: (s.duration_s * 1e6).round() as u64,
        bin_us: (s.report.bin_s * 1e6).round() as u64,
        window_us: (s.oracle.window_s * 1e6).round() as u64,
        groups,
        workers: s.workers.count,
        max_batch: s.workers.max_batch,
        max_wait_us: (s.workers.max_wait_ms * 1e3).round() as u64,
        report_interval_us: (s.planner.report_interval_s * 1e6).round() as u64,
        ewma_alpha: s.planner.ewma_alpha,
        safety: s.planner.safety,
        probe_bytes: s.planner.probe_bytes,
        miss_bound: s.planner.miss_bound,
        pool_utilisation: s.planner.pool_utilisation,
        autoscale: s.workers.autoscale.as_ref().map(|a| AutoscaleSim {
            policy: a.policy(),
            tick_us: ((a.tick_s * 1e6).round() as u64).max(1),
            start_delay_us: (a.start_delay_s * 1e6).round() as u64,
        }),
        // Autoscaled reports plot latency per bin beside the pool's size.
        bin_latencies: s.workers.autoscale.is_some(),
        watch: watch_config(s),
    })
}

/// The watched runs' monitor settings; each group's p_tar replaces the
/// target accuracy.
pub fn watch_config(s: &Scenario) -> MonitorConfig {
    let w = &s.watch;
    let secs = |v: f64| (v * 1e6).round() as u64;
    MonitorConfig {
        audit_rate: w.audit_rate,
        target: Target { accuracy: s.groups.first().map_or(0.9, |g| g.p_tar), delta: w.delta },
        window_us: secs(w.window_s).max(1),
        // A window's worth at the groups' peak rates, and never unbounded.
        max_observations: 200_000,
        drift_margin: w.drift_margin,
        alarm_alpha: w.alarm_alpha,
        auto_refit: w.auto_refit,
        min_refit_interval_us: secs(w.min_refit_interval_s),
        min_refit_sample: w.min_refit_sample,
    }
}

/// The plans of one policy that is not the oracle.
pub fn policy_plans(policy: Policy, s: &Scenario, prepared: &Prepared) -> Option<Plans> {
    let fixed = |p_tar: f64| Plans::Fixed(s.groups.iter().map(|g| Plan { branch: g.branch, p_tar, codec: g.codec }).collect());
    let planning = |codecs: &[Codec], cloud_aware: bool| Some(Plans::Adaptive(Planning { codecs: codecs.to_vec(), cloud_aware }));
    match policy {
        Policy::Static => Some(Plans::Fixed(prepared.group_plans.clone())),
        Policy::CloudOnly => Some(fixed(1.0)),
        Policy::DeviceOnly => Some(fixed(0.0)),
        Policy::Adaptive => {
            Some(Plans::Controlled { planning: Planning { codecs: s.planner.codecs.clone(), cloud_aware: s.planner.cloud_aware }, levels: prepared.control_levels.clone() })
        }
        Policy::AdaptiveNetwork => planning(&s.planner.codecs, s.planner.cloud_aware),
        Policy::AdaptiveF32 => planning(&[Codec::F32], s.planner.cloud_aware),
        Policy::AdaptiveCloudBlind => planning(&s.planner.codecs, false),
        Policy::Oracle => None,
        Policy::Uncalibrated => Some(Plans::Uncalibrated(s.groups.iter().map(|g| Plan { branch: g.branch, p_tar: g.p_tar, codec: g.codec }).collect())),
        Policy::Watched => Some(Plans::Watched(prepared.group_plans.clone())),
    }
}

/// The oracle's candidates: the planner's, every branch with every
/// candidate threshold and every codec it may choose (certified thresholds
/// can coincide: each plan once), the same for all groups.
pub fn oracle_candidates(scenario: &Scenario, prepared: &Prepared) -> Vec<Plan> {
    let mut v: Vec<Plan> = Vec::new();
    for c in &prepared.sim.stats.candidates {
        if !v.contains(&c.plan) && scenario.planner.codecs.contains(&c.plan.codec) {
            v.push(c.plan);
        }
    }
    v
}

/// Runs `jobs` on all cores; results come back in job order, so the outcome
/// never depends on scheduling.
pub fn run_all(model: &SimModel, cfg: &SimConfig, jobs: &[Plans], on_done: &(dyn Fn() + Sync)) -> Vec<RunResult> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(jobs.len()).max(1);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<RunResult>>> = Mutex::new(vec![None; jobs.len()]);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= jobs.len() {
                    return;
                }
                let r = sim::simulate(model, cfg, &jobs[i]);
                results.lock().expect("no panics while holding it")[i] = Some(r);
                on_done();
            });
        }
    });
    results.into_inner().expect("threads joined").into_iter().map(|r| r.expect("every job ran")).collect()
}

/// One policy's runs, by group and bin, ready for the report.
pub struct PolicyRun {
    pub policy: Policy,
    pub bins: Vec<Vec<sim::Bin>>,
    /// All latencies per group.
    pub latencies_us: Vec<Vec<u32>>,
    pub arrivals: u64,
    pub outcomes: u64,
    pub mean_batch: f64,
    /// Oracle only: per group, per window, the plan chosen.
    pub choices: Option<Vec<Vec<Plan>>>,
    /// Per branch, the inputs that exited there by confidence (not for the
    /// oracle, which mixes runs).
    pub edge: Option<Vec<sim::EdgeTally>>,
    /// Watched runs: per group, what its monitor saw and did.
    pub watch: Vec<sim::WatchTrace>,
    /// Plans delivered that changed a device's plan (`None`: not counted).
    pub plan_changes: Option<u64>,
}

impl PolicyRun {
    fn from_result(policy: Policy, r: RunResult) -> Self {
        Self {
            policy,
            latencies_us: r.latencies_us.into_iter().map(|w| w.concat()).collect(),
            bins: r.bins,
            arrivals: r.arrivals,
            outcomes: r.outcomes,
            mean_batch: r.batched_requests as f64 / r.batches.max(1) as f64,
            choices: None,
            edge: Some(r.edge),
            watch: r.watch,
            plan_changes: Some(r.plan_changes),
        }
    }
}

/// The oracle: per group and window, the candidate run with the best
/// accuracy whose deadline-miss rate in that window is within the bound
/// (the fewest misses when none is); ties go to fewer misses, then to less
/// offloading.
pub fn assemble_oracle(cfg: &SimConfig, candidates: &[Plan], runs: &[RunResult], miss_bound: f64) -> PolicyRun {
    let bins_per_window = (cfg.window_us / cfg.bin_us) as usize;
    let groups = cfg.groups.len();
    let mut bins = vec![vec![sim::Bin::default(); cfg.bins()]; groups];
    let mut latencies = vec![Vec::new(); groups];
    let mut choices = vec![Vec::new(); groups];
    let (mut arrivals, mut outcomes) = (0, 0);
    for g in 0..groups {
        for w in 0..cfg.windows() {
            let range = w * bins_per_window..((w + 1) * bins_per_window).min(cfg.bins());
            let mut best: Option<(usize, bool, f64, f64, f64)> = None;
            for (c, r) in runs.iter().enumerate() {
                let mut t = sim::Bin::default();
                for b in &r.bins[g][range.clone()] {
                    t.add(b);
                }
                let n = t.counts.inputs.max(1) as f64;
                let (acc, miss, off) = (t.counts.correct as f64 / n, t.counts.misses as f64 / n, t.counts.offloaded as f64 / n);
                let ok = miss <= miss_bound;
                let better = match best {
                    None => true,
                    Some((_, bok, bacc, bmiss, boff)) => match (ok, bok) {
                        (true, false) => true,
                        (false, true) => false,
                        (true, true) => (acc, -miss, -off) > (bacc, -bmiss, -boff),
                        (false, false) => (-miss, acc) > (-bmiss, bacc),
                    },
                };
                if better {
                    best = Some((c, ok, acc, miss, off));
                }
            }
            let c = best.expect("at least one candidate").0;
            choices[g].push(candidates[c]);
            for i in range {
                bins[g][i] = runs[c].bins[g][i].clone();
                arrivals += runs[c].bins[g][i].counts.inputs;
                outcomes += runs[c].bins[g][i].counts.inputs;
            }
            latencies[g].extend_from_slice(&runs[c].latencies_us[g][w]);
        }
    }
    PolicyRun {
        policy: Policy::Oracle,
        bins,
        latencies_us: latencies,
        arrivals,
        outcomes,
        mean_batch: f64::NAN,
        choices: Some(choices),
        edge: None,
        watch: Vec::new(),
        plan_changes: None,
    }
}

/// Replays the scenario under each of its policies in virtual time.
pub fn replay(scenario: &Scenario, prepared: &Prepared, on_progress: &(dyn Fn(usize, usize) + Sync)) -> Result<Vec<PolicyRun>> {
    let cfg = sim_config(scenario, prepared)?;
    let mut jobs: Vec<Plans> = Vec::new();
    let mut owners: Vec<Policy> = Vec::new();
    for &p in &scenario.policies {
        if let Some(plans) = policy_plans(p, scenario, prepared) {
            jobs.push(plans);
            owners.push(p);
        }
    }
    let named = jobs.len();
    let candidates = if scenario.policies.contains(&Policy::Oracle) { oracle_candidates(scenario, prepared) } else { Vec::new() };
    for c in &candidates {
        jobs.push(Plans::Fixed(vec![*c; cfg.groups.len()]));
    }
    let total = jobs.len();
    let done = AtomicUsize::new(0);
    let tick = || {
        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
        on_progress(n, total);
    };
    let mut results = run_all(&prepared.sim, &cfg, &jobs, &tick);
    let oracle_runs = results.split_off(named);
    let mut runs: Vec<PolicyRun> = owners.into_iter().zip(results).map(|(p, r)| PolicyRun::from_result(p, r)).collect();
    if !candidates.is_empty() {
        runs.push(assemble_oracle(&cfg, &candidates, &oracle_runs, scenario.planner.miss_bound));
    }
    // The report lists policies in the scenario's order.
    runs.sort_by_key(|r| scenario.policies.iter().position(|&p| p == r.policy));
    Ok(runs)
}
