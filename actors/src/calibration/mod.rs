//! Calibration actor: owns the model's current temperatures, refits them on
//! the validation split on request, and (over NATS) publishes every change so
//! running devices apply it live.
//!
//! Owns: a copy of the model, the validation split, the current calibration
//! file, all on its own thread (a `TensorPool` of one): a refit runs the
//! network over 5,000 validation inputs and fits temperatures, work that must
//! stay off the event loop. Messages in (`CalibratorHandle`): `current`,
//! `refit`, `certify`, one at a time in arrival order; at most a few wait.
//! A certified threshold holds for the temperatures it was found on, so
//! after a refit the stored certified plans are certified again. Restart: a
//! refit that panics rebuilds the state from the model and the initial
//! method, so temperatures fall back to the initial fit until the next
//! refit (the control store keeps the method an operator asked for).
//! Shutdown: `shutdown`, or the last handle dropped, joins the thread.
use std::path::PathBuf;

use branchpoint_core::calibration::{fit_file, CalibrationFile, ExitLogits, FitSource, Method};
use branchpoint_core::monitor::ReferenceInputs;
use branchpoint_core::risk::{certify, default_grid, ConfidenceCounts, Target};
use branchpoint_messages::{CalibrationMethod, CalibrationUpdate, CertifiedTarget, CertifyReply, PlanTarget, PlanUpdate};
use branchpoint_models::model::recorded_split_exit_logits;
use branchpoint_models::Model;

use crate::clock::unix_us;
use crate::compute::TensorPool;
use crate::error::ActorError;

pub mod nats;

#[derive(Debug, Clone)]
pub struct CalibratorConfig {
    /// The model's file (`Model::load`).
    pub model: PathBuf,
    pub data_dir: Option<PathBuf>,
    /// The calibration to start with: a file, or a fit with this method.
    pub initial: Initial,
    /// How audit results are watched.
    pub watch: WatchSettings,
}

#[derive(Debug, Clone)]
pub enum Initial {
    File(CalibrationFile),
    Fit(Method),
}

pub struct Calibrator {
    model: Model,
    validation: Vec<ExitLogits>,
    /// Where `validation` came from, as calibration files record it.
    validation_source: String,
    split_seed: u64,
    current: CalibrationFile,
    watch: LiveWatch,
    /// The validation split's answers the drift test's references come from.
    reference: Option<ReferenceInputs>,
}

/// Most (group, branch, plan) monitors kept at once; beyond it the least
/// recently heard one makes room (audit results come from the network, and
/// their keys must not grow without bound). Also the most groups whose
/// refit temperatures are kept.
pub const MAX_WATCHED: usize = 256;

/// How a live calibrator watches: `monitor::MonitorConfig` without the
/// per-result parts (audit rate, target), which each result carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchSettings {
    pub window_us: u64,
    pub max_observations: usize,
    pub drift_margin: f64,
    pub alarm_alpha: f64,
    /// Refit thresholds are certified with confidence 1 - delta.
    pub delta: f64,
    pub min_refit_sample: usize,
    /// Refit a branch on a drift alarm; off, alarms are raised and counted.
    pub auto_refit: bool,
    /// Refits of one monitor are at least this far apart.
    pub min_refit_interval_us: u64,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            window_us: 120_000_000,
            max_observations: 50_000,
            drift_margin: 0.03,
            alarm_alpha: 0.01,
            delta: 0.05,
            min_refit_sample: 800,
            auto_refit: true,
            min_refit_interval_us: 60_000_000,
        }
    }
}

impl WatchSettings {
    pub fn validate(&self) -> Result<(), ActorError> {
        let bad = |what: &str, reason: String| Err(ActorError::Invalid { what: what.into(), reason });
        if self.window_us == 0 || self.max_observations == 0 {
            return bad("watch window", "give a positive window and observation limit".into());
        }
        for (what, v) in [("drift margin", self.drift_margin), ("alarm alpha", self.alarm_alpha), ("certificate delta", self.delta)] {
            if !(v > 0.0 && v < 1.0) {
                return bad(what, format!("{v}; give a number in (0, 1)"));
            }
        }
        if self.min_refit_sample < 4 {
            return bad("minimum refit sample", format!("{}; a refit needs at least 4 sampled inputs", self.min_refit_sample));
        }
        Ok(())
    }
}

/// A fitted temperature as the wire carries it: a fit on degenerate
/// pseudo-labels can leave the accepted range, beyond which confidences do
/// not change anyway.
fn wire_temperature(t: f64) -> f64 {
    t.clamp(branchpoint_messages::MIN_TEMPERATURE, branchpoint_messages::MAX_TEMPERATURE)
}

/// What one audit result set off in the live watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchOutcome {
    /// Counted in its monitor; nothing to do.
    Quiet,
    /// Decided under a plan that a refit of its group and branch had already
    /// replaced (the device had not applied the refit yet): not counted.
    Stale,
    /// The drift test alarmed and the branch was not refit (refits off,
    /// too soon after the last, or too few sampled inputs yet).
    Alarm { group: String, partition_branch: u8 },
    /// The drift test alarmed and the branch was refit for the group: store
    /// this so that the group's devices apply it.
    Refit(GroupRefit),
}

/// A branch refit for one group: the group's temperatures (the model's,
/// with the refit branch's replaced) and its certified plan.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupRefit {
    pub group: String,
    pub partition_branch: u8,
    pub temperatures: Vec<f64>,
    pub plan: PlanUpdate,
    pub refit: branchpoint_core::monitor::Refit,
}

/// The live calibrator's monitors, one per (group, branch, plan in force):
/// audit results in, estimates, alarms and refits out. A refit changes the
/// group's temperature for that branch and its threshold; the caller stores
/// both (`serve_calibration_nats`), the group's devices apply them, and the
/// same monitor goes on watching the new plan. Results that devices decided
/// under the replaced plan are stale and skipped.
#[derive(Debug, Clone, Default)]
pub struct LiveWatch {
    settings: WatchSettings,
    monitors: Vec<Watched>,
    /// Groups whose temperatures a refit changed: the model's with one
    /// branch replaced (at most `MAX_WATCHED`).
    group_temperatures: std::collections::BTreeMap<String, Vec<f64>>,
    refused: u64,
    alarms_total: u64,
    refits_total: u64,
    clock: u64,
}

#[derive(Debug, Clone)]
struct Watched {
    group: String,
    branch: u8,
    monitor: branchpoint_core::monitor::Monitor,
    /// Thresholds this monitor's refits replaced (the latest few).
    superseded: Vec<f64>,
    last_heard: u64,
    latest_us: u64,
    stale: u64,
    last_refit: Option<branchpoint_messages::RefitSummary>,
}

impl LiveWatch {
    pub fn new(settings: WatchSettings) -> Self {
        Self { settings, ..Self::default() }
    }

    pub fn settings(&self) -> WatchSettings {
        self.settings
    }

    /// Starts from the groups' stored temperatures (a restarted calibrator
    /// keeps watching the refit plans with the temperatures they were
    /// refit with).
    pub fn resume_groups(&mut self, groups: impl IntoIterator<Item = (String, Vec<f64>)>) {
        for (g, t) in groups {
            self.remember_group(g, t);
        }
    }

    fn remember_group(&mut self, group: String, temperatures: Vec<f64>) {
        if !self.group_temperatures.contains_key(&group) && self.group_temperatures.len() >= MAX_WATCHED {
            let first = self.group_temperatures.keys().next().cloned().expect("not empty");
            self.group_temperatures.remove(&first);
        }
        self.group_temperatures.insert(group, temperatures);
    }

    /// Forgets every group's refit and every monitor: the model's
    /// temperatures were refit as a whole, so every plan starts afresh.
    pub fn reset(&mut self) {
        self.group_temperatures.clear();
        self.monitors.clear();
    }

    /// The temperatures a group's devices hold: its refit ones, or the model's.
    pub fn temperatures_of<'a>(&'a self, group: &str, model: &'a [f64]) -> &'a [f64] {
        self.group_temperatures.get(group).map_or(model, Vec::as_slice)
    }

    /// Takes one audit result, already decoded; a result that does not fit
    /// the model (another model's, a branch it lacks, the wrong number of
    /// classes) is refused and counted. `now_unix_us` is the calibrator's
    /// clock, for the status.
    pub fn observe(
        &mut self,
        r: &branchpoint_messages::AuditResult,
        model_sha256: &str,
        temperatures: &[f64],
        classes: usize,
        reference: Option<&ReferenceInputs>,
        now_unix_us: u64,
    ) -> Result<WatchOutcome, ActorError> {
        let refuse = |w: &mut Self, why: String| {
            w.refused += 1;
            Err(ActorError::Invalid { what: "audit result".into(), reason: format!("it must be {why}") })
        };
        if r.model_sha256 != model_sha256 {
            return refuse(self, "for this calibrator's model".into());
        }
        let b = usize::from(r.partition_branch);
        if b == 0 || b >= temperatures.len() {
            return refuse(self, format!("for a side branch of this model (1 to {})", temperatures.len().saturating_sub(1)));
        }
        if r.branch_logits.len() != classes {
            return refuse(self, format!("{classes} logits, one per class of this model"));
        }
        self.clock += 1;
        let i = match self.monitor_for(r, temperatures, reference) {
            Ok(Some(i)) => i,
            Ok(None) => return Ok(WatchOutcome::Stale),
            Err(why) => return refuse(self, why),
        };
        let w = &mut self.monitors[i];
        w.last_heard = self.clock;
        w.latest_us = w.latest_us.max(r.decided_at_unix_us);
        let obs = branchpoint_core::monitor::Observation {
            t_us: r.decided_at_unix_us,
            logits: r.branch_logits.clone(),
            final_class: r.final_class,
            label: r.label,
            on_device: r.on_device,
            sampled: r.sampled,
        };
        let before = w.monitor.threshold();
        let event = match w.monitor.observe(obs) {
            Ok(event) => event,
            Err(e) => {
                self.refused += 1;
                return Err(e.into());
            }
        };
        use branchpoint_core::monitor::Event;
        match event {
            None => Ok(WatchOutcome::Quiet),
            Some(Event::Alarm { .. }) => {
                self.alarms_total += 1;
                Ok(WatchOutcome::Alarm { group: r.group.clone(), partition_branch: r.partition_branch })
            }
            Some(Event::Refit(refit)) => Ok(self.refitted(i, refit, before, temperatures, now_unix_us)),
        }
    }

    /// The monitor watching the plan `r` was decided under: found, or made
    /// (replacing the one its group and branch were watched under, and the
    /// least recently heard beyond `MAX_WATCHED`). `None` for a result
    /// decided under a plan a refit replaced; `Err` says why a plan cannot
    /// be watched.
    fn monitor_for(&mut self, r: &branchpoint_messages::AuditResult, temperatures: &[f64], reference: Option<&ReferenceInputs>) -> Result<Option<usize>, String> {
        let b = usize::from(r.partition_branch);
        let same = |w: &Watched| w.group == r.group && w.branch == r.partition_branch;
        let found = self.monitors.iter().position(|w| same(w) && w.monitor.threshold() == r.p_tar && w.monitor.target_accuracy() == r.target_accuracy);
        match found {
            Some(i) => Ok(Some(i)),
            None => {
                if let Some(w) = self.monitors.iter_mut().find(|w| same(w) && w.superseded.contains(&r.p_tar)) {
                    w.stale += 1;
                    return Ok(None);
                }
                let s = self.settings;
                let cfg = branchpoint_core::monitor::MonitorConfig {
                    audit_rate: r.audit_rate,
                    target: Target { accuracy: r.target_accuracy, delta: s.delta },
                    window_us: s.window_us,
                    max_observations: s.max_observations,
                    drift_margin: s.drift_margin.min(r.target_accuracy / 2.0),
                    alarm_alpha: s.alarm_alpha,
                    auto_refit: s.auto_refit,
                    min_refit_interval_us: s.min_refit_interval_us,
                    min_refit_sample: s.min_refit_sample,
                };
                let temperature = self.temperatures_of(&r.group, temperatures)[b - 1];
                // Held to the validation split's disagreement at this
                // temperature: every offload is evidence too.
                let reference = reference.and_then(|x| x.reference(b, temperature, &cfg));
                let monitor = match branchpoint_core::monitor::Monitor::new(cfg, temperature, r.p_tar, reference) {
                    Ok(m) => m,
                    Err(e) => return Err(format!("a watchable plan ({e})")),
                };
                // A plan from elsewhere (the planner, an operator) replaces
                // the one this (group, branch) was watched under.
                self.monitors.retain(|w| !same(w));
                if self.monitors.len() >= MAX_WATCHED {
                    let oldest = (0..self.monitors.len()).min_by_key(|&j| self.monitors[j].last_heard).expect("not empty");
                    self.monitors.swap_remove(oldest);
                }
                self.monitors.push(Watched {
                    group: r.group.clone(),
                    branch: r.partition_branch,
                    monitor,
                    superseded: Vec::new(),
                    last_heard: 0,
                    latest_us: 0,
                    stale: 0,
                    last_refit: None,
                });
                Ok(Some(self.monitors.len() - 1))
            }
        }
    }

    /// Counts a refit of monitor `i` (threshold `before` until now), and
    /// gives the group's new temperatures and certified plan to store.
    fn refitted(&mut self, i: usize, refit: branchpoint_core::monitor::Refit, before: f64, temperatures: &[f64], now_unix_us: u64) -> WatchOutcome {
        let b = usize::from(self.monitors[i].branch);
        let w = &mut self.monitors[i];
        self.alarms_total += 1;
        self.refits_total += 1;
        if refit.threshold != before {
            w.superseded.push(before);
            if w.superseded.len() > 8 {
                w.superseded.remove(0);
            }
        }
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        w.last_refit = Some(branchpoint_messages::RefitSummary {
            at_unix_us: now_unix_us,
            decided_at_unix_us: refit.t_us,
            temperature: wire_temperature(refit.temperature),
            threshold: refit.threshold,
            fit_inputs: count(refit.fit_inputs),
            certify_inputs: count(refit.certify_inputs),
        });
        let target = CertifiedTarget { accuracy: w.monitor.target_accuracy(), delta: self.settings.delta };
        let (group, branch) = (w.group.clone(), w.branch);
        let mut temps = self.temperatures_of(&group, temperatures).to_vec();
        // A fit on degenerate pseudo-labels can leave the range the
        // wire accepts; beyond it confidences do not change anyway.
        temps[b - 1] = wire_temperature(refit.temperature);
        self.remember_group(group.clone(), temps.clone());
        // The threshold travels with the temperature it was certified at:
        // a device applies both at once, whichever bucket it hears first.
        let temperature = Some(temps[b - 1]);
        let plan = PlanUpdate { target: PlanTarget::Group(group.clone()), partition_branch: branch, p_tar: refit.threshold, certified: Some(target), codec: None, temperature };
        WatchOutcome::Refit(GroupRefit { group, partition_branch: branch, temperatures: temps, plan, refit })
    }

    /// Counts a result that could not even be decoded.
    pub fn refuse_undecodable(&mut self) {
        self.refused += 1;
    }

    pub fn status(&self, model_sha256: &str, at_unix_us: u64) -> branchpoint_messages::CalibrationStatus {
        let watched = self
            .monitors
            .iter()
            .map(|w| {
                let e = w.monitor.estimate(w.latest_us, 0.05);
                let (a, l) = (e.edge_agreement, e.edge_accuracy);
                branchpoint_messages::BranchWatch {
                    group: w.group.clone(),
                    partition_branch: w.branch,
                    target_accuracy: w.monitor.target_accuracy(),
                    temperature: wire_temperature(w.monitor.temperature()),
                    threshold: w.monitor.threshold(),
                    audits: u32::try_from(e.audits).unwrap_or(u32::MAX),
                    offloads: u32::try_from(e.offloads).unwrap_or(u32::MAX),
                    edge_agreement: a.map(|a| a.estimate),
                    edge_agreement_low: a.map(|a| a.low),
                    edge_agreement_high: a.map(|a| a.high),
                    offload_rate: e.offload_rate,
                    ece: e.ece,
                    alarms: w.monitor.alarms(),
                    refits: w.monitor.refits().len() as u64,
                    edge_accuracy: l.map(|a| a.estimate),
                    edge_accuracy_low: l.map(|a| a.low),
                    edge_accuracy_high: l.map(|a| a.high),
                    reliability: e.reliability.iter().map(|&(confidence, agreement, weight)| branchpoint_messages::ReliabilityBin { confidence, agreement, weight }).collect(),
                    auto_refit: self.settings.auto_refit,
                    last_refit: w.last_refit,
                    stale: w.stale,
                }
            })
            .collect();
        branchpoint_messages::CalibrationStatus {
            model_sha256: model_sha256.to_string(),
            at_unix_us,
            refused: self.refused,
            watched,
            alarms_total: self.alarms_total,
            refits_total: self.refits_total,
        }
    }
}

impl Calibrator {
    fn build(cfg: &CalibratorConfig) -> Result<Self, ActorError> {
        let model = Model::load(&cfg.model, tch::Device::Cpu)?;
        let data = model.load_data(cfg.data_dir.as_deref())?;
        let validation = recorded_split_exit_logits(&model, &data.validation)?;
        let current = match &cfg.initial {
            Initial::File(f) => {
                f.check_fits(model.num_exits(), model.sha256())?;
                f.clone()
            }
            Initial::Fit(method) => Self::fit(&model, &validation, &data.validation_source, data.split_seed, *method)?,
        };
        let reference = ReferenceInputs::of_exits(&validation, 1.0);
        Ok(Self { model, validation, validation_source: data.validation_source, split_seed: data.split_seed, current, watch: LiveWatch::new(cfg.watch), reference })
    }

    fn fit(model: &Model, validation: &[ExitLogits], data: &str, split_seed: u64, method: Method) -> Result<CalibrationFile, ActorError> {
        let source = FitSource { model: &model.file_name(), model_sha256: model.sha256(), data, split_seed };
        Ok(fit_file(method, validation, &model.exit_names(), source)?)
    }

    /// Starts the calibrator's thread, which builds its state (a bad model,
    /// dataset or file is a clear error here); returns its handle and the
    /// initial calibration.
    pub async fn start(cfg: CalibratorConfig) -> Result<(CalibratorHandle, CalibrationFile), ActorError> {
        // Off the event loop: the model load and the answers on the
        // validation split take seconds, while NATS waits for pongs.
        let handle = CalibratorHandle(TensorPool::start_async("calibrator", 1, 8, move || Calibrator::build(&cfg)).await?);
        let initial = handle.current().await?;
        Ok((handle, initial))
    }
}

/// The calibrator's address: its thread and mailbox.
#[derive(Clone)]
pub struct CalibratorHandle(TensorPool<Calibrator>);

impl CalibratorHandle {
    /// The current calibration.
    pub async fn current(&self) -> Result<CalibrationFile, ActorError> {
        self.0.run(|c: &mut Calibrator| c.current.clone()).await
    }

    /// Fits again with `method`; the result becomes current, for every
    /// group (groups' drift refits are forgotten, their monitors restart).
    pub async fn refit(&self, method: Method) -> Result<CalibrationFile, ActorError> {
        self.0
            .run(move |c: &mut Calibrator| {
                c.current = Calibrator::fit(&c.model, &c.validation, &c.validation_source, c.split_seed, method)?;
                c.watch.reset();
                Ok(c.current.clone())
            })
            .await?
    }

    /// Resumes the groups' stored refit temperatures (see `LiveWatch::resume_groups`).
    pub async fn resume_groups(&self, groups: Vec<(String, Vec<f64>)>) -> Result<(), ActorError> {
        self.0.run(move |c: &mut Calibrator| c.watch.resume_groups(groups)).await
    }

    /// The live watch's settings.
    pub async fn watch_settings(&self) -> Result<WatchSettings, ActorError> {
        self.0.run(|c: &mut Calibrator| c.watch.settings()).await
    }

    /// Turns automatic refits off (alarms only), e.g. when there is no
    /// control store to deliver them.
    pub async fn alarms_only(&self) -> Result<(), ActorError> {
        self.0.run(|c: &mut Calibrator| c.watch.settings.auto_refit = false).await
    }

    /// The threshold certified for side branch `partition_branch` (from 1)
    /// and `target`, on the validation split and the current temperatures.
    pub async fn certify(&self, partition_branch: u8, target: CertifiedTarget) -> Result<CertifyReply, ActorError> {
        self.0
            .run(move |c: &mut Calibrator| {
                let branches = c.validation.len().saturating_sub(1);
                let b = usize::from(partition_branch);
                if b == 0 || b > branches {
                    return Err(ActorError::Invalid { what: "partition_branch".into(), reason: format!("{partition_branch}: this model has side branches 1 to {branches}") });
                }
                let temperature = c.current.temperatures[b - 1];
                let counts = ConfidenceCounts::of_exit(&c.validation[b - 1], temperature)?;
                let cert = certify(&counts, Target { accuracy: target.accuracy, delta: target.delta }, &default_grid())?;
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                Ok(CertifyReply {
                    model_sha256: c.current.model_sha256.clone(),
                    temperature,
                    partition_branch,
                    target,
                    threshold: cert.threshold,
                    inputs: count(cert.inputs),
                    exits: count(cert.exits),
                    errors: count(cert.errors),
                    error_upper_bound: cert.error_upper_bound,
                })
            })
            .await?
    }

    /// Takes one audit result off the network (`None`: it did not decode);
    /// returns what it set off.
    pub async fn audit(&self, result: Option<branchpoint_messages::AuditResult>) -> Result<WatchOutcome, ActorError> {
        let now = unix_us();
        self.0
            .run(move |c: &mut Calibrator| match result {
                Some(r) => {
                    let classes = c.validation.first().map_or(0, |e| e.classes);
                    c.watch.observe(&r, &c.current.model_sha256, &c.current.temperatures, classes, c.reference.as_ref(), now)
                }
                None => {
                    c.watch.refuse_undecodable();
                    Ok(WatchOutcome::Quiet)
                }
            })
            .await?
    }

    /// What the calibrator sees of every watched group and branch.
    pub async fn watch_status(&self, at_unix_us: u64) -> Result<branchpoint_messages::CalibrationStatus, ActorError> {
        self.0.run(move |c: &mut Calibrator| c.watch.status(&c.current.model_sha256, at_unix_us)).await
    }

    /// Stops the thread (a refit in progress finishes first); see
    /// `TensorPool::shutdown`.
    pub fn shutdown(&self, within: std::time::Duration) -> Vec<String> {
        self.0.shutdown(within)
    }
}

/// The wire form of a calibration file.
pub fn to_update(file: &CalibrationFile) -> CalibrationUpdate {
    CalibrationUpdate {
        model_sha256: file.model_sha256.clone(),
        method: match file.method {
            Method::Uncalibrated => CalibrationMethod::Uncalibrated,
            Method::Global => CalibrationMethod::Global,
            Method::PerBranch => CalibrationMethod::PerBranch,
        },
        temperatures: file.temperatures.clone(),
        group: None,
    }
}

pub fn method_of(m: CalibrationMethod) -> Method {
    match m {
        CalibrationMethod::Uncalibrated => Method::Uncalibrated,
        CalibrationMethod::Global => Method::Global,
        CalibrationMethod::PerBranch => Method::PerBranch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchpoint_messages::AuditResult;

    const SHA: &str = "abababababababababababababababababababababababababababababababab";

    fn settings() -> WatchSettings {
        WatchSettings { min_refit_sample: 100, min_refit_interval_us: 1_000_000, window_us: 600_000_000, ..WatchSettings::default() }
    }

    /// An audit of group `group` at input i: the branch is confident in
    /// class 3; the final exit agrees or not.
    fn audit(group: &str, i: u64, agrees: bool, p_tar: f64) -> AuditResult {
        let mut logits = vec![0f32; 4];
        logits[3] = 4.0;
        AuditResult {
            model_sha256: SHA.into(),
            device_id: "cam-1".into(),
            group: group.into(),
            partition_branch: 1,
            decided_at_unix_us: i * 10_000,
            branch_logits: logits,
            final_class: if agrees { 3 } else { 2 },
            on_device: true,
            sampled: true,
            audit_rate: 0.2,
            p_tar,
            target_accuracy: 0.9,
            label: None,
        }
    }

    fn feed(w: &mut LiveWatch, r: &AuditResult) -> WatchOutcome {
        w.observe(r, SHA, &[1.0, 1.5, 1.2], 4, None, 7).unwrap()
    }

    #[test]
    fn a_drift_refits_the_group_and_later_results_of_the_old_plan_are_stale() {
        let mut w = LiveWatch::new(settings());
        for i in 0..200 {
            assert_eq!(feed(&mut w, &audit("night", i, true, 0.8)), WatchOutcome::Quiet);
        }
        // One in three agrees: an alarm, then a refit once 100 sampled
        // inputs have arrived after it.
        let mut outcomes = Vec::new();
        for i in 200..600 {
            match feed(&mut w, &audit("night", i, i % 3 == 0, 0.8)) {
                WatchOutcome::Refit(r) => {
                    outcomes.push(i);
                    assert_eq!((r.group.as_str(), r.partition_branch), ("night", 1));
                    assert_eq!(r.temperatures[1..], [1.5, 1.2], "only the refit branch changes");
                    assert!(r.temperatures[0] > 1.0 && r.temperatures[0] == r.refit.temperature, "{r:?}");
                    assert_eq!(r.plan.target, PlanTarget::Group("night".into()));
                    assert_eq!((r.plan.partition_branch, r.plan.p_tar), (1, r.refit.threshold));
                    assert_eq!(r.plan.certified, Some(CertifiedTarget { accuracy: 0.9, delta: 0.05 }));
                    assert!(r.refit.fit_inputs + r.refit.certify_inputs >= 100);
                    break;
                }
                WatchOutcome::Alarm { group, partition_branch } => assert_eq!((group.as_str(), partition_branch), ("night", 1)),
                o => assert_eq!(o, WatchOutcome::Quiet),
            }
        }
        assert_eq!(outcomes.len(), 1, "a refit");
        let threshold = w.status(SHA, 0).watched[0].threshold;
        assert_ne!(threshold, 0.8);
        // Devices that have not applied the refit yet: stale, not counted.
        assert_eq!(feed(&mut w, &audit("night", 700, false, 0.8)), WatchOutcome::Stale);
        // Under the refit plan: counted by the same monitor.
        assert_eq!(feed(&mut w, &audit("night", 701, true, threshold)), WatchOutcome::Quiet);
        let s = w.status(SHA, 0);
        assert_eq!(s.watched.len(), 1);
        let night = &s.watched[0];
        assert_eq!((night.stale, night.refits, s.refits_total), (1, 1, 1));
        assert!(s.alarms_total >= 1 && night.last_refit.is_some_and(|r| r.at_unix_us == 7));
        // Another group starts with the model's temperatures; this one with
        // its refit temperature; an operator's refit of the model resets both.
        assert_eq!(w.temperatures_of("day", &[1.0, 1.5, 1.2]), &[1.0, 1.5, 1.2]);
        assert!(w.temperatures_of("night", &[1.0, 1.5, 1.2])[0] > 1.0);
        w.reset();
        assert_eq!(w.temperatures_of("night", &[1.0, 1.5, 1.2]), &[1.0, 1.5, 1.2]);
        assert!(w.status(SHA, 0).watched.is_empty());
    }

    #[test]
    fn alarms_only_never_refits_and_a_new_plan_replaces_the_monitor() {
        let mut w = LiveWatch::new(WatchSettings { auto_refit: false, ..settings() });
        let mut alarms = 0;
        for i in 0..1000 {
            match feed(&mut w, &audit("night", i, i % 3 == 0, 0.8)) {
                WatchOutcome::Alarm { .. } => alarms += 1,
                WatchOutcome::Refit(r) => panic!("refits are off: {r:?}"),
                _ => {}
            }
        }
        assert!(alarms > 0);
        let s = w.status(SHA, 0);
        assert_eq!((s.watched[0].threshold, s.watched[0].refits, s.watched[0].auto_refit, s.refits_total), (0.8, 0, false, 0));
        // The planner or an operator sets another threshold: a fresh monitor.
        assert_eq!(feed(&mut w, &audit("night", 2000, true, 0.7)), WatchOutcome::Quiet);
        let s = w.status(SHA, 0);
        assert_eq!((s.watched.len(), s.watched[0].threshold, s.watched[0].alarms, s.watched[0].audits), (1, 0.7, 0, 1));
    }

    #[test]
    fn results_that_do_not_fit_the_model_are_refused_and_the_monitors_are_bounded() {
        let mut w = LiveWatch::new(settings());
        let good = audit("night", 1, true, 0.8);
        let temps = [1.0, 1.5, 1.2];
        assert!(w.observe(&AuditResult { model_sha256: "cd".repeat(32), ..good.clone() }, SHA, &temps, 4, None, 0).is_err());
        assert!(w.observe(&AuditResult { partition_branch: 3, ..good.clone() }, SHA, &temps, 4, None, 0).is_err(), "branch 3 is the final exit here");
        assert!(w.observe(&good, SHA, &temps, 5, None, 0).is_err(), "4 logits for a 5-class model");
        w.refuse_undecodable();
        assert_eq!(w.status(SHA, 0).refused, 4);
        for g in 0..(MAX_WATCHED + 10) {
            w.observe(&audit(&format!("g{g}"), g as u64, true, 0.8), SHA, &temps, 4, None, 0).unwrap();
        }
        assert_eq!(w.status(SHA, 0).watched.len(), MAX_WATCHED);
    }
}
