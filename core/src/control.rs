//! One control loop per device group: the calibration watch owns the
//! evidence, the planner plans on it. This is the `adaptive` policy, in
//! virtual time (`scenario::sim`) and live alike.
//!
//! The group keeps a service level (`guarantee::ServiceLevel`): on-device
//! answers at least `a` in agreement with the final exit, with probability
//! 1 - delta, and at most `miss_bound` of inputs past their deadline. Every
//! branch has its own monitor (`monitor::Monitor`) and its own evidence:
//!
//! - **Validation**: at the start, the candidates certified for the level on
//!   the validation split (`ModelStats::for_level`; every branch at once).
//! - **Void**: the branch's drift test (or any branch's: the inputs are the
//!   group's, and a shift seen at one branch is a shift at all of them)
//!   alarmed. The validation split no longer stands for the inputs, so
//!   nothing on-device is certified there: the branch's only candidate is
//!   to offload everything. Offloads come back with the final exit's
//!   answer, and an input offloaded because everything is
//!   (`sampled`) is as uniform a sample as an audit, so the refit's
//!   evidence arrives at the input rate instead of the audit rate.
//! - **Live**: the branch was refit. Its candidates are the thresholds the
//!   refit certified for the level, their offload rate and on-device
//!   agreement predicted from the refit's own inputs (the deployment's, not
//!   the validation split's). A later alarm voids it again; a recovery
//!   (inputs agreeing more than the refit's evidence allows) refits it
//!   again, which relaxes the plan.
//!
//! A change of evidence (`Change`) is the planner's cue to re-plan every
//! device of the group at once, through the one writer of plans. Each
//! branch certifies at delta / branches (a union bound over the branches a
//! planner may pick from), so whichever certified candidate the planner
//! picks keeps the level with probability 1 - delta.
//!
//! Plain data in, decisions out: no clock, no I/O.
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::guarantee::ServiceLevel;
use crate::monitor::{Event, Monitor, MonitorConfig, Observation, ReferenceInputs, Refit, RefitEvidence};
use crate::planner::{default_candidate_p_tars, ModelStats, Plan, ThresholdStats};
use crate::risk::Target;

/// Where a branch's candidates come from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Evidence {
    Validation,
    Void,
    Live,
}

/// What an observation changed: the planner re-plans the group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Change {
    /// `branch`'s drift test alarmed at `t_us`: every branch on validation
    /// evidence, and this one, are void until refit.
    Void { branch: usize, t_us: u64 },
    /// `branch` was refit: its candidates come from the refit's inputs.
    Live { branch: usize, refit: Refit },
}

/// One group's evidence and the candidates its planner may choose from.
#[derive(Debug, Clone)]
pub struct GroupControl {
    level: ServiceLevel,
    /// The level's candidates certified on the validation split.
    validation: ModelStats,
    /// `[branch - 1]`.
    monitors: Vec<Monitor>,
    evidence: Vec<Evidence>,
    /// The candidates in force, rebuilt on every change.
    candidates: ModelStats,
    changes: u64,
}

/// Whether an input belongs to the uniform sample the refits learn from:
/// its audit coin came up, or its plan's threshold (`p_tar`) offloads every
/// input (so being offloaded says nothing about it).
pub fn sampled(coin: bool, p_tar: f64) -> bool {
    coin || p_tar >= 1.0
}

impl GroupControl {
    /// `validation`: `ModelStats::for_level` for `level` (under the codecs
    /// the planner may use); `temperatures`: the validation split's, one
    /// per branch; `watch`: how every branch is watched (its target is
    /// replaced by the level's, at delta / branches); `references`: the
    /// validation split's inputs the drift tests start from.
    pub fn new(level: ServiceLevel, validation: ModelStats, temperatures: &[f64], watch: MonitorConfig, references: Option<&ReferenceInputs>) -> Result<Self> {
        level.validate()?;
        let branches = validation.candidates.iter().map(|c| c.plan.branch).max().unwrap_or(0);
        if branches == 0 || temperatures.len() < branches {
            return Err(CoreError::InvalidArgument { what: "group control".into(), reason: format!("{} temperatures for candidates at {branches} branches", temperatures.len()) });
        }
        let cfg = MonitorConfig { target: Target { accuracy: level.accuracy, delta: level.delta / branches as f64 }, ..watch };
        let monitors = (1..=branches)
            .map(|b| {
                let t = temperatures[b - 1];
                // The branch starts offloading nothing it has no certificate for.
                Monitor::new(cfg, t, 1.0, references.and_then(|r| r.reference(b, t, &cfg))).map(Monitor::with_exchangeability_test)
            })
            .collect::<Result<Vec<_>>>()?;
        let evidence = vec![Evidence::Validation; branches];
        let mut control = Self { level, candidates: validation.clone(), validation, monitors, evidence, changes: 0 };
        control.rebuild();
        Ok(control)
    }

    pub fn level(&self) -> &ServiceLevel {
        &self.level
    }

    /// The candidates the planner may choose from now.
    pub fn candidates(&self) -> &ModelStats {
        &self.candidates
    }

    /// The temperature devices scale `branch`'s logits with now.
    pub fn temperature(&self, branch: usize) -> f64 {
        self.monitors[branch - 1].temperature()
    }

    pub fn evidence(&self, branch: usize) -> Evidence {
        self.evidence[branch - 1]
    }

    pub fn monitor(&self, branch: usize) -> &Monitor {
        &self.monitors[branch - 1]
    }

    /// Changes of evidence so far.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// An audit or an offload decided at `branch`; returns the change it set
    /// off, if any (re-plan the group on one).
    pub fn observe(&mut self, branch: usize, obs: Observation) -> Result<Option<Change>> {
        if branch == 0 || branch > self.monitors.len() {
            return Err(CoreError::InvalidArgument { what: "observation branch".into(), reason: format!("{branch}; this group's branches are 1..={}", self.monitors.len()) });
        }
        let change = match self.monitors[branch - 1].observe(obs)? {
            None => return Ok(None),
            Some(Event::Alarm { t_us }) => {
                self.evidence[branch - 1] = Evidence::Void;
                // Whichever branch the planner now offloads at refits from
                // what it offloads.
                for (e, monitor) in self.evidence.iter_mut().zip(&mut self.monitors) {
                    if *e != Evidence::Live {
                        *e = Evidence::Void;
                        monitor.request_refit(t_us);
                    }
                }
                Change::Void { branch, t_us }
            }
            Some(Event::Refit(refit)) => {
                self.evidence[branch - 1] = Evidence::Live;
                Change::Live { branch, refit }
            }
        };
        self.changes += 1;
        self.rebuild();
        Ok(Some(change))
    }

    fn rebuild(&mut self) {
        let mut candidates = Vec::new();
        for (b, evidence) in self.evidence.iter().enumerate() {
            let at = |c: &&ThresholdStats| c.plan.branch == b + 1;
            let offload_all = self.validation.candidates.iter().filter(at).filter(|c| c.plan.p_tar >= 1.0);
            match evidence {
                Evidence::Validation => candidates.extend(self.validation.candidates.iter().filter(at).copied()),
                Evidence::Void => candidates.extend(offload_all.copied()),
                Evidence::Live => {
                    let monitor = &self.monitors[b];
                    let (Some(e), Some(refit)) = (monitor.refit_evidence(), monitor.refits().last()) else { continue };
                    candidates.extend(offload_all.clone().copied());
                    candidates.extend(offload_all.flat_map(|cloud| live_candidates(cloud, e, refit.threshold, &self.level)));
                }
            }
        }
        self.candidates = ModelStats { candidates, validation_inputs: self.validation.validation_inputs };
    }
}

/// A live branch's certified thresholds under `cloud`'s codec (the branch's
/// offload-everything candidate, whose cloud accuracy they keep): the
/// lowest the refit certified and the default p_tars it certified above it,
/// predicted from the refit's inputs.
fn live_candidates(cloud: &ThresholdStats, e: &RefitEvidence, lowest: f64, level: &ServiceLevel) -> Vec<ThresholdStats> {
    let mut p_tars = vec![lowest];
    p_tars.extend(default_candidate_p_tars().into_iter().filter(|&p| p > lowest && e.certifies(lowest, p)));
    p_tars
        .into_iter()
        .filter(|&p| p < 1.0)
        .map(|p_tar| {
            let plan = Plan { p_tar, ..cloud.plan };
            let (mut exits, mut agree, mut offloads, mut fallback_agree) = (0usize, 0usize, 0usize, 0usize);
            for &(confidence, agrees) in &e.inputs {
                if plan.exits(confidence) {
                    exits += 1;
                    agree += usize::from(agrees);
                } else {
                    offloads += 1;
                    fallback_agree += usize::from(agrees);
                }
            }
            let rate = |k: usize, n: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
            let edge = rate(agree, exits);
            ThresholdStats {
                plan,
                offload_rate: rate(offloads, e.inputs.len()),
                edge_accuracy: edge,
                cloud_accuracy: cloud.cloud_accuracy,
                fallback_accuracy: rate(fallback_agree, offloads),
                measured_edge_accuracy: edge,
                measured_cloud_accuracy: cloud.measured_cloud_accuracy,
                certified: Some(level.target()),
            }
        })
        .collect()
}
