//! Certified for the plan chosen: every threshold of every branch that a
//! planner may pick is certified at once, so that whichever it picks keeps
//! on-device accuracy `a` with probability at least `1 - delta`.
//!
//! `risk::certify` certifies one branch's threshold. A planner that
//! certifies each branch at `delta` and then picks the branch that looks
//! best has chosen after looking: the chosen plan's chance of breaking `a`
//! is bounded only by the sum over branches. Here the family of hypotheses
//! is every (branch, threshold) on the grid, "the inputs that exit at this
//! threshold are wrong more often than 1 - a", and the family-wise error
//! rate is kept at `delta`:
//!
//! - **Within a branch, fixed-sequence testing** from high thresholds to
//!   low, each test at the branch's level, stopping at the first that is not
//!   rejected. The order (descending confidence) is fixed before any
//!   correctness is seen, and a branch's thresholds are naturally ordered
//!   from safe to risky, so no level is lost to the number of thresholds:
//!   the grid can be as fine as saturated confidences need.
//! - **Across branches, a union bound**: each branch's sequence runs at
//!   `delta / branches`. The branches have no order that is safer to test
//!   first (a shallow branch is not riskier than a deep one at every
//!   threshold), and a fixed sequence across them would stop at the first
//!   branch that certifies nothing; with three branches the bound costs
//!   ln 3 in the exponent, a few more exits' worth of evidence.
//! - **Codecs need no correction**: a codec changes what the cloud sees of
//!   an offloaded input, never which inputs exit or what the device answers,
//!   so (branch, threshold) under every codec is one hypothesis.
//!
//! A sequence starts at the highest grid threshold where its test has
//! power: where errors at half the allowed rate among the exits would be
//! significant. Higher up, too few inputs exit for a test to reject unless
//! they are all right, and a single error there would end the sequence
//! before it reached a threshold worth having. Where it starts depends on
//! how many inputs exit, the confidences alone, never on which inputs were
//! right, so the order of the tests is still fixed before the evidence that
//! decides them is read (exactly so conditional on the confidences). The grid (`plan_grid`)
//! has points up to 1 - 1e-8: 58 % of one shipped branch's raw confidences
//! lie above 1 - 1e-6, and a grid whose top is 0.999 lets all of them exit at
//! once or none.
//!
//! What the evidence is decides what the certificate says: validation
//! labels certify accuracy on inputs exchangeable with the validation split;
//! a deployment's audits (agreement with the final exit, on a uniform sample
//! of its inputs) certify it on the deployment's own inputs.
//!
//! For comparison, `Correction::None` tests every grid threshold on its own
//! at `delta` and lets the planner choose among all that pass: the way to
//! break the promise that `guarantee_study` measures.
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::risk::{binomial_cdf, clopper_pearson_upper, BatchErrorRates, ConfidenceCounts, Target};

/// Thresholds tested for plans, from high to low: 1 - 10^-x for x from 8
/// down to 3.1 in steps of 0.1 (fine where saturated confidences sit), then
/// 0.999 down to 0.001 in steps of 0.001 (`risk::default_grid`).
pub fn plan_grid() -> Vec<f64> {
    let mut grid: Vec<f64> = (31..=80).rev().map(|tenths| 1.0 - 10f64.powf(-f64::from(tenths) / 10.0)).collect();
    grid.extend(crate::risk::default_grid());
    grid
}

/// How a certificate over many candidates accounts for choosing among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Correction {
    /// Fixed-sequence within each branch, a union bound across branches
    /// (module doc): whatever is chosen among the certified keeps the level.
    FixedSequenceUnion,
    /// Every threshold tested on its own at delta: no correction, for
    /// comparison only.
    None,
}

impl Correction {
    /// The level each test runs at when `branches` are certified at once
    /// for an overall `delta`.
    pub fn level(self, delta: f64, branches: usize) -> f64 {
        match self {
            Correction::FixedSequenceUnion => delta / branches.max(1) as f64,
            Correction::None => delta,
        }
    }
}

/// What one branch's evidence certified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchCertificate {
    /// Numbered from 1.
    pub branch: usize,
    /// The level each of its tests ran at.
    pub level: f64,
    /// Every grid threshold certified, descending. Empty: only offloading
    /// everything (p_tar 1) is certified at this branch.
    pub thresholds: Vec<f64>,
    /// At the lowest certified threshold: exits, errors among them, and the
    /// Clopper-Pearson upper bound (confidence 1 - level) on their error
    /// rate (1 when nothing is certified).
    pub exits: usize,
    pub errors: usize,
    pub error_upper_bound: f64,
    /// Inputs of evidence.
    pub inputs: usize,
}

impl BranchCertificate {
    /// The lowest certified threshold: the plan that offloads least.
    pub fn lowest(&self) -> Option<f64> {
        self.thresholds.last().copied()
    }

    /// Whether a plan exiting at `p_tar` here is covered: a certified grid
    /// threshold, or offloading everything (p_tar 1, no on-device answer).
    pub fn covers(&self, p_tar: f64) -> bool {
        p_tar >= 1.0 || self.thresholds.contains(&p_tar)
    }
}

/// What an operator asks of a group: on-device answers at least
/// `accuracy` accurate with probability at least 1 - `delta` (measured as
/// agreement with the final exit in a deployed fleet, against labels where
/// a simulation knows them), at most `miss_bound` of inputs past their
/// deadline, and what to spend least of once both hold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceLevel {
    pub accuracy: f64,
    pub delta: f64,
    pub miss_bound: f64,
    #[serde(default)]
    pub minimise: Minimise,
}

/// What a plan that keeps the service level should spend least of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Minimise {
    /// Offloaded inputs (the workers' load).
    #[default]
    Offloads,
    /// Bytes on the uplink (offloads times their codec's bytes).
    UplinkBytes,
    /// Nothing: the best predicted overall accuracy.
    Nothing,
}

impl ServiceLevel {
    pub fn target(&self) -> Target {
        Target { accuracy: self.accuracy, delta: self.delta }
    }

    pub fn validate(&self) -> Result<()> {
        self.target().validate()?;
        if !(0.0..=1.0).contains(&self.miss_bound) {
            return Err(CoreError::InvalidArgument { what: "service level miss bound".into(), reason: format!("{} is outside [0, 1]", self.miss_bound) });
        }
        Ok(())
    }
}

/// Every branch's certified thresholds for one target, certified together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanCertificate {
    pub target: Target,
    pub correction: Correction,
    pub branches: Vec<BranchCertificate>,
}

impl PlanCertificate {
    /// Whether a plan at `branch` (from 1) and `p_tar` is covered.
    pub fn covers(&self, branch: usize, p_tar: f64) -> bool {
        self.branches.get(branch.wrapping_sub(1)).is_some_and(|b| b.covers(p_tar))
    }

    /// Whether anything but offloading everything is certified.
    pub fn certifies_anything(&self) -> bool {
        self.branches.iter().any(|b| !b.thresholds.is_empty())
    }
}

/// What the certificate promises about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Promise {
    /// The population of inputs that exit (`risk::certify`).
    Population,
    /// The exits among a fresh batch of this many inputs (`risk::certify_batch`).
    Batch(usize),
}

/// Certifies every branch's thresholds on `grid` (descending) for `target`,
/// from each branch's evidence (`per_branch[k]` for branch k + 1).
pub fn certify_plans(per_branch: &[ConfidenceCounts], target: Target, promise: Promise, correction: Correction, grid: &[f64]) -> Result<PlanCertificate> {
    let level = correction.level(target.delta, per_branch.len());
    certify_plans_with(per_branch, target, promise, correction, grid, &mut BatchErrorRates::new(Target { delta: level, ..target }))
}

/// `certify_plans` with the batch error rates of its level remembered
/// across calls (a study certifies the same level thousands of times).
fn certify_plans_with(
    per_branch: &[ConfidenceCounts],
    target: Target,
    promise: Promise,
    correction: Correction,
    grid: &[f64],
    batch_rates: &mut BatchErrorRates,
) -> Result<PlanCertificate> {
    target.validate()?;
    if per_branch.is_empty() {
        return Err(CoreError::InvalidArgument { what: "plan certificate".into(), reason: "no branch to certify".into() });
    }
    if grid.is_empty() || grid.windows(2).any(|w| w[0] <= w[1]) || grid.iter().any(|t| !(0.0..1.0).contains(t)) {
        return Err(CoreError::InvalidArgument { what: "threshold grid".into(), reason: "must be non-empty, in [0, 1) and strictly decreasing (tested from high to low)".into() });
    }
    if let Promise::Batch(0) = promise {
        return Err(CoreError::InvalidArgument { what: "certified batch".into(), reason: "0 inputs; a batch needs at least 1".into() });
    }
    let level = correction.level(target.delta, per_branch.len());
    debug_assert_eq!(batch_rates.target.delta, level / 2.0, "the rates of this level");
    let branches = per_branch
        .iter()
        .enumerate()
        .map(|(k, counts)| {
            let scale = match promise {
                Promise::Population => 0.0,
                Promise::Batch(m) => m as f64 / counts.len().max(1) as f64,
            };
            let mut rejected = |n: usize, errors: usize| match promise {
                Promise::Population => binomial_cdf(errors as u64, n as u64, 1.0 - target.accuracy) <= level,
                Promise::Batch(_) => {
                    let exits = (n as f64 * scale).round() as u64;
                    binomial_cdf(errors as u64, n as u64, batch_rates.get(exits)) <= batch_rates.target.delta
                }
            };
            let thresholds = match correction {
                Correction::FixedSequenceUnion => fixed_sequence_from_first_testable(counts, grid, 1.0 - target.accuracy, &mut rejected),
                Correction::None => grid.iter().copied().filter(|&t| counts.at(t).0 > 0 && rejected(counts.at(t).0, counts.at(t).1)).collect(),
            };
            let bound_level = if let Promise::Batch(_) = promise { level / 2.0 } else { level };
            let (exits, errors) = thresholds.last().map_or((0, 0), |&t| counts.at(t));
            BranchCertificate {
                branch: k + 1,
                level,
                error_upper_bound: if thresholds.is_empty() { 1.0 } else { clopper_pearson_upper(errors as u64, exits as u64, bound_level) },
                thresholds,
                exits,
                errors,
                inputs: counts.len(),
            }
        })
        .collect();
    Ok(PlanCertificate { target, correction, branches })
}

/// The grid thresholds rejected in sequence, starting at the first where
/// errors at half the `allowed_error` rate would be rejected (module doc).
fn fixed_sequence_from_first_testable(counts: &ConfidenceCounts, grid: &[f64], allowed_error: f64, rejected: &mut impl FnMut(usize, usize) -> bool) -> Vec<f64> {
    let start = grid.iter().position(|&t| {
        let n = counts.at(t).0;
        n > 0 && rejected(n, (n as f64 * allowed_error / 2.0).floor() as usize)
    });
    let mut certified = Vec::new();
    for &t in start.map_or(&[][..], |s| &grid[s..]) {
        let (n, k) = counts.at(t);
        if !rejected(n, k) {
            break;
        }
        certified.push(t);
    }
    certified
}

/// The highest accuracy target, to 0.001, that `per_branch`'s evidence
/// certifies at `delta` for some plan other than offloading everything
/// (under the plan certificate's correction); `None` when not even 0.001 is.
/// A level above it is refused with this number in the error.
pub fn most_certifiable_accuracy(per_branch: &[ConfidenceCounts], delta: f64, promise: Promise, grid: &[f64]) -> Result<Option<f64>> {
    let certifies = |milli: u32| -> Result<bool> {
        let target = Target { accuracy: f64::from(milli) / 1000.0, delta };
        Ok(certify_plans(per_branch, target, promise, Correction::FixedSequenceUnion, grid)?.certifies_anything())
    };
    // Certifying gets easier as the target falls: bisect on thousandths.
    if !certifies(1)? {
        return Ok(None);
    }
    let (mut lo, mut hi) = (1u32, 1000u32);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if certifies(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(f64::from(lo) / 1000.0))
}

/// Refuses a target the evidence cannot certify for any plan but
/// offloading everything, naming the most it can.
pub fn require_certifiable(certificate: &PlanCertificate, per_branch: &[ConfidenceCounts], grid: &[f64], promise: Promise) -> Result<()> {
    if certificate.certifies_anything() {
        return Ok(());
    }
    let t = certificate.target;
    let inputs = per_branch.first().map_or(0, ConfidenceCounts::len);
    let most = most_certifiable_accuracy(per_branch, t.delta, promise, grid)?;
    Err(CoreError::InvalidArgument {
        what: "service level".into(),
        reason: match most {
            Some(a) => format!(
                "on-device accuracy {} with probability {} cannot be certified for any branch on {inputs} inputs of evidence; the most it certifies at delta {} is {a:.3}: lower the accuracy, raise delta, or gather more evidence",
                t.accuracy,
                1.0 - t.delta,
                t.delta
            ),
            None => format!("nothing can be certified at delta {} on {inputs} inputs of evidence; raise delta or gather more evidence", t.delta),
        },
    })
}

/// One branch's answers on a pool of labelled inputs: confidence at a
/// fixed temperature, and whether each answer counts as right.
#[derive(Debug, Clone)]
pub struct BranchAnswers {
    pub confidences: Vec<f64>,
    pub correct: Vec<bool>,
}

impl BranchAnswers {
    fn counts_of(&self, inputs: &[usize]) -> Result<ConfidenceCounts> {
        ConfidenceCounts::new(&inputs.iter().map(|&i| self.confidences[i]).collect::<Vec<_>>(), &inputs.iter().map(|&i| self.correct[i]).collect::<Vec<_>>())
    }
}

/// How often the plan a planner chose broke the target, over random draws
/// of calibration evidence from a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuaranteeRow {
    pub target: Target,
    pub promise: Promise,
    pub correction: Correction,
    pub draws: usize,
    /// Draws whose chosen plan's on-device accuracy fell below `a`, judged
    /// as the promise says: on the whole pool (population) or on the
    /// inputs not drawn (batch).
    pub violations: usize,
    pub violation_rate: f64,
    /// Two standard errors of a rate of exactly delta over this many
    /// draws: a violation rate up to delta plus this is what chance allows.
    pub sampling_error: f64,
    /// Mean over draws of the chosen plan's offload rate where judged.
    pub mean_offload_rate: f64,
    /// How often each branch (from 1) was chosen; cloud only not counted.
    pub chosen_branch: Vec<usize>,
}

/// The guarantee study: `draws` times, `calibration_inputs` drawn at random
/// (seeded) from the pool certify every branch's thresholds at once, and a
/// planner that minimises offloading chooses among every certified
/// (branch, threshold): the lowest certified threshold of the branch that
/// offloads least on the draw. Each target is studied under both promises
/// and both corrections.
pub fn guarantee_study(pool: &[BranchAnswers], targets: &[Target], calibration_inputs: usize, draws: usize, seed: u64, grid: &[f64]) -> Result<Vec<GuaranteeRow>> {
    let n = pool.first().map_or(0, |b| b.confidences.len());
    if pool.is_empty() || pool.iter().any(|b| b.confidences.len() != n || b.correct.len() != n) {
        return Err(CoreError::InvalidArgument { what: "guarantee study".into(), reason: "every branch needs a confidence and a correctness flag for each pooled input".into() });
    }
    if calibration_inputs == 0 || calibration_inputs >= n || draws == 0 {
        return Err(CoreError::InvalidArgument {
            what: "guarantee study".into(),
            reason: format!("{calibration_inputs} calibration inputs from a pool of {n}, {draws} draws: need at least 1 drawn, 1 left and 1 draw"),
        });
    }
    let whole: Vec<ConfidenceCounts> = pool.iter().map(|b| b.counts_of(&(0..n).collect::<Vec<_>>())).collect::<Result<_>>()?;
    let held_out = n - calibration_inputs;
    let mut rows = Vec::new();
    let mut cells = Vec::new();
    for &target in targets {
        target.validate()?;
        for promise in [Promise::Population, Promise::Batch(held_out)] {
            for correction in [Correction::FixedSequenceUnion, Correction::None] {
                let level = correction.level(target.delta, pool.len());
                cells.push((BatchErrorRates::new(Target { delta: level, ..target }), rows.len()));
                rows.push(GuaranteeRow {
                    target,
                    promise,
                    correction,
                    draws,
                    violations: 0,
                    violation_rate: 0.0,
                    sampling_error: 0.0,
                    mean_offload_rate: 0.0,
                    chosen_branch: vec![0; pool.len()],
                });
            }
        }
    }
    for d in 0..draws {
        let order = crate::rng::SplitMix64::new(seed.wrapping_add(d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).permutation(n);
        let (drawn, rest) = order.split_at(calibration_inputs);
        let evidence: Vec<ConfidenceCounts> = pool.iter().map(|b| b.counts_of(drawn)).collect::<Result<_>>()?;
        let rest_counts: Vec<ConfidenceCounts> = pool.iter().map(|b| b.counts_of(rest)).collect::<Result<_>>()?;
        for (rates, r) in &mut cells {
            let row = &mut rows[*r];
            let certificate = certify_plans_with(&evidence, row.target, row.promise, row.correction, grid, rates)?;
            // The lowest certified threshold of the branch that offloads
            // least on the evidence; ties to the shallower branch.
            let chosen =
                certificate.branches.iter().filter_map(|b| b.lowest().map(|t| (b.branch, t, b.exits))).max_by_key(|&(branch, _, exits)| (exits, std::cmp::Reverse(branch)));
            let judged = if row.promise == Promise::Population { &whole } else { &rest_counts };
            let size = judged[0].len();
            let (exits, errors) = chosen.map_or((0, 0), |(branch, t, _)| judged[branch - 1].at(t));
            if let Some((branch, _, _)) = chosen {
                row.chosen_branch[branch - 1] += 1;
            }
            row.violations += usize::from(exits > 0 && !crate::offload::reaches_target(exits - errors, exits, row.target.accuracy));
            row.mean_offload_rate += (1.0 - exits as f64 / size as f64) / draws as f64;
        }
    }
    for row in &mut rows {
        row.violation_rate = row.violations as f64 / draws as f64;
        row.sampling_error = 2.0 * (row.target.delta * (1.0 - row.target.delta) / draws as f64).sqrt();
    }
    Ok(rows)
}

/// One branch and target of the deployment study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRow {
    pub target: Target,
    pub branch: usize,
    /// Each test's level in the plan certificate (delta / branches).
    pub level: f64,
    /// Certified on the validation split's labels, judged on the
    /// deployment's labels: the lowest certified threshold (`None`: nothing
    /// certified) and whether the deployment's exits there fell below `a`.
    pub validation_threshold: Option<f64>,
    pub validation_violated: bool,
    /// Recertified, over `draws` samples of the deployment at the audit
    /// rate, on the audits' agreement with the final exit, and judged on the
    /// whole deployment's agreement: how many draws certified a threshold
    /// here, and how many of those fell below `a`.
    pub draws: usize,
    pub audit_certified: usize,
    pub audit_violations: usize,
    /// The mean over draws of the audit-certified threshold's offload rate
    /// on the deployment (1 where nothing was certified).
    pub audit_mean_offload_rate: f64,
}

/// A deployment's inputs as each branch answered them, judged two ways.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Right when the branch's class is the label.
    pub labels: Vec<BranchAnswers>,
    /// Right when it is the final exit's class.
    pub agreement: Vec<BranchAnswers>,
}

/// The non-exchangeable deployment: thresholds certified on the
/// validation split (`validation`, labels) judged on a deployment's labels,
/// beside the same plans recertified from audits (a uniform sample of the
/// deployment at `audit_rate`, drawn `draws` times) judged on its agreement
/// with the final exit.
pub fn deployment_study(
    validation: &[BranchAnswers],
    deployment: &Deployment,
    targets: &[Target],
    audit_rate: f64,
    draws: usize,
    seed: u64,
    grid: &[f64],
) -> Result<Vec<DeploymentRow>> {
    let (deployment_labels, deployment_agreement) = (&deployment.labels, &deployment.agreement);
    let branches = validation.len();
    let m = deployment_labels.first().map_or(0, |b| b.confidences.len());
    let audits = (audit_rate * m as f64).round() as usize;
    if branches == 0 || deployment_labels.len() != branches || deployment_agreement.len() != branches || !(audits > 0 && audits < m) || draws == 0 {
        return Err(CoreError::InvalidArgument {
            what: "deployment study".into(),
            reason: format!(
                "{branches} validation branches, {} and {} deployment branches, {audits} audits of {m} inputs, {draws} draws",
                deployment_labels.len(),
                deployment_agreement.len()
            ),
        });
    }
    let all = |pool: &[BranchAnswers]| -> Result<Vec<ConfidenceCounts>> { pool.iter().map(|b| b.counts_of(&(0..b.confidences.len()).collect::<Vec<_>>())).collect() };
    let (on_validation, judged_labels, judged_agreement) = (all(validation)?, all(deployment_labels)?, all(deployment_agreement)?);
    let violated = |counts: &ConfidenceCounts, t: f64, a: f64| {
        let (exits, errors) = counts.at(t);
        exits > 0 && !crate::offload::reaches_target(exits - errors, exits, a)
    };
    let mut rows = Vec::new();
    for &target in targets {
        let before = certify_plans(&on_validation, target, Promise::Population, Correction::FixedSequenceUnion, grid)?;
        let first = rows.len();
        for b in &before.branches {
            let validation_threshold = b.lowest();
            rows.push(DeploymentRow {
                target,
                branch: b.branch,
                level: b.level,
                validation_threshold,
                validation_violated: validation_threshold.is_some_and(|t| violated(&judged_labels[b.branch - 1], t, target.accuracy)),
                draws,
                audit_certified: 0,
                audit_violations: 0,
                audit_mean_offload_rate: 0.0,
            });
        }
        for d in 0..draws {
            let order = crate::rng::SplitMix64::new(seed.wrapping_add(d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).permutation(m);
            let sample: Vec<ConfidenceCounts> = deployment_agreement.iter().map(|b| b.counts_of(&order[..audits])).collect::<Result<_>>()?;
            let after = certify_plans(&sample, target, Promise::Population, Correction::FixedSequenceUnion, grid)?;
            for (b, row) in after.branches.iter().zip(&mut rows[first..]) {
                let exits = b.lowest().map_or(0, |t| judged_agreement[b.branch - 1].at(t).0);
                row.audit_mean_offload_rate += (1.0 - exits as f64 / m as f64) / draws as f64;
                if let Some(t) = b.lowest() {
                    row.audit_certified += 1;
                    row.audit_violations += usize::from(violated(&judged_agreement[b.branch - 1], t, target.accuracy));
                }
            }
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A branch whose inputs with confidence c are right with probability
    /// exactly c (calibrated), confidences spread evenly over [lo, 1).
    fn calibrated(n: usize, lo: f64, seed: u64) -> ConfidenceCounts {
        let mut rng = crate::rng::SplitMix64::new(seed);
        let (conf, correct): (Vec<f64>, Vec<bool>) = (0..n)
            .map(|_| {
                let c = lo + (1.0 - lo) * rng.next_f64();
                (c, rng.next_f64() < c)
            })
            .unzip();
        ConfidenceCounts::new(&conf, &correct).unwrap()
    }

    #[test]
    fn the_grid_descends_from_near_one_through_the_default_grid() {
        let g = plan_grid();
        assert!(g.windows(2).all(|w| w[0] > w[1]));
        assert!((g[0] - (1.0 - 1e-8)).abs() < 1e-15 && g[0] < 1.0);
        assert_eq!(*g.last().unwrap(), 0.001);
        assert_eq!(g.len(), 50 + 999);
    }

    #[test]
    fn saturated_confidences_certify_on_the_fine_top_where_the_coarse_grid_certifies_nothing() {
        // 60 % saturated at 1 - 1e-7 and right 99.5 % of the time; the rest
        // at 0.9995 and right half the time: at 0.999 everything exits and
        // the error rate (20 %) breaks a = 0.95.
        let n = 5000;
        let saturated = 1.0 - 10f64.powf(-7.0);
        let conf: Vec<f64> = (0..n).map(|i| if i % 5 < 3 { saturated } else { 0.9995 }).collect();
        let correct: Vec<bool> = (0..n).map(|i| if i % 5 < 3 { i % 200 != 0 } else { i % 2 == 0 }).collect();
        let counts = ConfidenceCounts::new(&conf, &correct).unwrap();
        let target = Target { accuracy: 0.95, delta: 0.05 };
        let coarse = certify_plans(std::slice::from_ref(&counts), target, Promise::Population, Correction::FixedSequenceUnion, &crate::risk::default_grid()).unwrap();
        assert!(!coarse.certifies_anything(), "{coarse:?}");
        let fine = certify_plans(&[counts], target, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).unwrap();
        let b = &fine.branches[0];
        // Tested from 1 - 1e-7 (where the saturated inputs first exit) down
        // to the last grid point above 0.9995, 1 - 10^-3.4.
        assert_eq!(b.thresholds[0], saturated, "{b:?}");
        assert_eq!(b.lowest(), Some(1.0 - 10f64.powf(-3.4)), "{b:?}");
        assert_eq!((b.exits, b.errors), (3000, 25));
        assert!(b.error_upper_bound <= 0.05);
    }

    #[test]
    fn the_union_bound_splits_delta_across_branches_and_codecs_need_none() {
        let branches = [calibrated(3000, 0.5, 1), calibrated(3000, 0.6, 2), calibrated(3000, 0.7, 3)];
        let target = Target { accuracy: 0.9, delta: 0.06 };
        let c = certify_plans(&branches, target, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).unwrap();
        assert!(c.branches.iter().all(|b| (b.level - 0.02).abs() < 1e-15));
        let alone = certify_plans(&branches[..1], target, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).unwrap();
        // Less level, less certified: the joint lowest threshold is not
        // below the one certified alone.
        assert!(c.branches[0].lowest().unwrap() >= alone.branches[0].lowest().unwrap());
        for b in &c.branches {
            // Every certified threshold was rejected: its bound is at most 1 - a.
            let lowest = b.lowest().unwrap();
            assert!(b.error_upper_bound <= 0.1 + 1e-12, "{b:?}");
            assert!(c.covers(b.branch, lowest) && c.covers(b.branch, 1.0) && !c.covers(b.branch, lowest - 1e-4));
        }
        assert!(!c.covers(4, 1.0), "no fourth branch");
    }

    #[test]
    fn a_sequence_starts_where_a_test_can_first_reject_and_stops_at_its_first_failure() {
        // Confidence i/n; right iff confidence above 0.3: the error rate of
        // the exits stays 0 down to 0.3, then grows.
        let n = 1000;
        let conf: Vec<f64> = (0..n).map(|i| i as f64 / n as f64).collect();
        let correct: Vec<bool> = conf.iter().map(|&c| c > 0.3).collect();
        let counts = ConfidenceCounts::new(&conf, &correct).unwrap();
        let target = Target { accuracy: 0.9, delta: 0.05 };
        let c = certify_plans(std::slice::from_ref(&counts), target, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).unwrap();
        let b = &c.branches[0];
        // It starts where 5 % errors among the exits would be rejected,
        // and not higher.
        let powerful = |t: f64| {
            let n = counts.at(t).0 as u64;
            n > 0 && binomial_cdf(n / 20, n, 0.1) <= 0.05
        };
        let grid = plan_grid();
        let start = grid.iter().position(|&t| t == b.thresholds[0]).unwrap();
        assert!(powerful(grid[start]) && !powerful(grid[start - 1]), "{}", b.thresholds[0]);
        assert!(b.thresholds[0] < 0.95, "needs dozens of exits: {}", b.thresholds[0]);
        let (exits, errors) = counts.at(b.lowest().unwrap());
        assert_eq!((b.exits, b.errors), (exits, errors));
        assert!(errors as f64 / exits as f64 <= 0.1);
        // The next threshold down is not rejected.
        let next = plan_grid().into_iter().find(|&t| t < b.lowest().unwrap()).unwrap();
        let (n2, k2) = counts.at(next);
        assert!(binomial_cdf(k2 as u64, n2 as u64, 0.1) > 0.05);
    }

    #[test]
    fn uncorrected_certification_passes_thresholds_the_sequence_never_reaches() {
        // Right iff not in a band of low-confidence errors, then right again
        // below it: the sequence stops at the band, testing each threshold
        // alone passes the ones below it too.
        let n = 10_000;
        let conf: Vec<f64> = (0..n).map(|i| i as f64 / n as f64).collect();
        let correct: Vec<bool> = conf.iter().map(|&c| !(0.50..0.51).contains(&c)).collect();
        let counts = ConfidenceCounts::new(&conf, &correct).unwrap();
        let target = Target { accuracy: 0.98, delta: 0.05 };
        let seq = certify_plans(std::slice::from_ref(&counts), target, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).unwrap();
        let each = certify_plans(&[counts], target, Promise::Population, Correction::None, &plan_grid()).unwrap();
        assert!(seq.branches[0].lowest().unwrap() >= 0.5, "{:?}", seq.branches[0].lowest());
        assert!(each.branches[0].lowest().unwrap() < seq.branches[0].lowest().unwrap());
    }

    #[test]
    fn a_level_the_evidence_cannot_certify_is_refused_naming_the_most_it_can() {
        let branches = [calibrated(5000, 0.5, 7), calibrated(5000, 0.7, 8)];
        let grid = plan_grid();
        let target = Target { accuracy: 0.999, delta: 0.01 };
        let c = certify_plans(&branches, target, Promise::Population, Correction::FixedSequenceUnion, &grid).unwrap();
        let err = require_certifiable(&c, &branches, &grid, Promise::Population).unwrap_err().to_string();
        let most = most_certifiable_accuracy(&branches, 0.01, Promise::Population, &grid).unwrap().unwrap();
        assert!(most < 0.999 && most > 0.9, "{most}");
        assert!(err.contains(&format!("{most:.3}")) && err.contains("0.999"), "{err}");
        // The most it names is certified, a thousandth more is not.
        let at = |a: f64| certify_plans(&branches, Target { accuracy: a, delta: 0.01 }, Promise::Population, Correction::FixedSequenceUnion, &grid).unwrap().certifies_anything();
        assert!(at(most) && !at(most + 0.001));
        assert!(require_certifiable(
            &certify_plans(&branches, Target { accuracy: most, delta: 0.01 }, Promise::Population, Correction::FixedSequenceUnion, &grid).unwrap(),
            &branches,
            &grid,
            Promise::Population
        )
        .is_ok());
    }

    #[test]
    fn the_chosen_plan_keeps_the_level_over_draws_where_uncorrected_choice_does_not() {
        // Three branches whose exits are right with probability
        // 0.5 + c / 2 at confidence c (uniform): the exits above a threshold
        // t are right 0.75 + t / 4 of the time, which crosses a = 0.9 at
        // t = 0.6 with a shallow slope. Choosing the lowest threshold that
        // passes, among many tested alone and three branches, lands below
        // 0.6 often; the joint certificate does not.
        let n = 20_000;
        let mut rng = crate::rng::SplitMix64::new(11);
        let pool: Vec<BranchAnswers> = (0..3)
            .map(|_| {
                let (confidences, correct) = (0..n)
                    .map(|_| {
                        let c = rng.next_f64();
                        (c, rng.next_f64() < 0.5 + c / 2.0)
                    })
                    .unzip();
                BranchAnswers { confidences, correct }
            })
            .collect();
        let target = Target { accuracy: 0.9, delta: 0.1 };
        let rows = guarantee_study(&pool, &[target], 1000, 200, 5, &plan_grid()).unwrap();
        let row = |p: Promise, c: Correction| rows.iter().find(|r| r.promise == p && r.correction == c).unwrap();
        let joint = row(Promise::Population, Correction::FixedSequenceUnion);
        let alone = row(Promise::Population, Correction::None);
        assert!(joint.violation_rate <= target.delta + joint.sampling_error, "{joint:?}");
        assert!(alone.violation_rate > target.delta + alone.sampling_error, "{alone:?}");
        assert!(joint.mean_offload_rate > alone.mean_offload_rate, "the guarantee costs offloads: {joint:?} vs {alone:?}");
        assert_eq!(joint.chosen_branch.iter().sum::<usize>(), 200, "something certified every draw: {joint:?}");
        let batch = row(Promise::Batch(19_000), Correction::FixedSequenceUnion);
        assert!(batch.violation_rate <= target.delta + batch.sampling_error, "{batch:?}");
    }

    #[test]
    fn audits_recertify_a_deployment_that_validation_misjudges() {
        // Validation: right with probability 0.5 + c / 2. The deployment is
        // harder: right with probability c, so thresholds certified on
        // validation break a there; audits of the deployment itself do not.
        let answers = |n: usize, seed: u64, p: fn(f64) -> f64| {
            let mut rng = crate::rng::SplitMix64::new(seed);
            let (confidences, correct) = (0..n)
                .map(|_| {
                    let c = rng.next_f64();
                    (c, rng.next_f64() < p(c))
                })
                .unzip();
            vec![BranchAnswers { confidences, correct }]
        };
        let validation = answers(5000, 1, |c| 0.5 + c / 2.0);
        let harder = answers(10_000, 2, |c| c);
        let deployment = Deployment { labels: harder.clone(), agreement: harder };
        let target = Target { accuracy: 0.9, delta: 0.1 };
        let rows = deployment_study(&validation, &deployment, &[target], 0.1, 100, 3, &plan_grid()).unwrap();
        let r = &rows[0];
        assert!(r.validation_violated, "{r:?}");
        assert!(r.audit_certified > 50, "most draws certify a threshold: {r:?}");
        // At most delta of the draws break it, up to sampling error.
        assert!((r.audit_violations as f64) <= 0.1 * 100.0 + 2.0 * (100.0f64 * 0.1 * 0.9).sqrt(), "{r:?}");
        assert!(r.audit_mean_offload_rate > 0.2, "the harder deployment offloads more: {r:?}");
    }

    #[test]
    fn bad_arguments_are_refused() {
        let b = [calibrated(100, 0.5, 1)];
        let t = Target { accuracy: 0.9, delta: 0.1 };
        assert!(certify_plans(&[], t, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).is_err());
        assert!(certify_plans(&b, t, Promise::Population, Correction::FixedSequenceUnion, &[0.5, 0.9]).is_err());
        assert!(certify_plans(&b, t, Promise::Batch(0), Correction::FixedSequenceUnion, &plan_grid()).is_err());
        assert!(certify_plans(&b, Target { accuracy: 1.0, delta: 0.1 }, Promise::Population, Correction::FixedSequenceUnion, &plan_grid()).is_err());
    }
}
