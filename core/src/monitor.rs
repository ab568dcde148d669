//! Calibration watched live: what the calibrator learns of one branch from
//! the inputs it hears about, and when it should act.
//!
//! On-device decisions get no label, so nothing in a running system sees a
//! branch go overconfident after an input shift. The cloud's final exit is
//! a better-informed second opinion. A device draws an audit coin for every
//! input, with probability `audit_rate`; the inputs whose coin came up are a
//! uniform random sample of everything the device saw (its *sample*). A
//! sampled input decided on the device is sent to the cloud as well (an
//! *audit*: it never changes the outcome); a sampled offload is marked so.
//! Every offload, sampled or not, and every audit reach the monitor with the
//! branch's logits and the final exit's class.
//!
//! - **Estimates** are of the plan in force, from what was decided under it
//!   (since the last refit, within the window). On-device agreement with the
//!   final exit comes from the audits alone: they are a uniform sample of
//!   the on-device inputs, so the plain rate is unbiased, with an exact
//!   Clopper-Pearson interval. Population quantities (offload rate, ECE, the
//!   reliability diagram) weight each input by the inverse of its chance to
//!   be seen (Horvitz-Thompson): 1 / audit_rate for an audit, 1 for an
//!   offload. Where the simulation knows labels, the label accuracy of the
//!   same audits is estimated beside the agreement.
//! - **Drift**: an e-process (`DriftTest`) on the disagreements of every
//!   input heard under the plan, audits and offloads alike. Its null: an
//!   input of confidence c disagrees with the final exit with probability
//!   at most mu(c), the `Reference`'s rate at that confidence (the
//!   validation split's at the start, the refit's own evidence after a
//!   refit; an upper confidence bound per confidence bin, plus
//!   `drift_margin`). Which inputs are heard depends only on their
//!   confidence and the audit coin, never on whether they disagree, so
//!   every input heard is a fair test of it. The wealth starts at 1 with
//!   each plan and is multiplied by 1 + lambda (d - mu(c)) per input
//!   (d = 1 on a disagreement); the alarm is at wealth 1 / alpha. While
//!   the null holds each factor has expectation at most 1, so by Ville's
//!   inequality the chance of an alarm *ever*, however long the plan runs
//!   and whenever it is read, is at most alpha (plus the chance that the
//!   reference's bounds are too low, at most alpha too). Unlike the CUSUM
//!   it replaces, its false alarms do not accumulate with time. Offloads
//!   come back with the final exit's answer for free, so at a 10 % audit
//!   rate they are most of the evidence: on the shipped shift the branch's
//!   disagreement rises at every confidence (0.15 to 0.46 at 0.7 to 0.9),
//!   and the test sees it within a second or two of inputs. Without a
//!   reference, only on-device audits are tested, against mu = 1 - a.
//!   The same test the other way (each bin's lower bound less the margin)
//!   sees a shift end: inputs that disagree less than the reference allows
//!   raise an alarm too, and the refit that follows relaxes the plan. The
//!   two tests together alarm falsely with probability at most 2 alpha.
//! - **Exchangeability** (`with_exchangeability_test`, the adaptive
//!   policy's monitors): a certificate holds only for inputs exchangeable
//!   with those it was computed on, and a shift can move inputs to other
//!   confidences while each still agrees as often as the reference says
//!   (then the test above is blind, and the certified plan's exit rate and
//!   agreement are not what was certified). Two more e-processes of the
//!   same kind take the sampled inputs (a uniform sample of all inputs)
//!   against the median confidence of the sample the plan was certified
//!   on: more of them below it than half, or more above it, each against
//!   a Clopper-Pearson upper bound on that share plus `drift_margin`.
//! - **Refit**: after an alarm, from the sampled inputs that arrive after
//!   it (the run of disagreements that raised the alarm is worse than the
//!   truth by the way it was picked), once there are `min_refit_sample`,
//!   with final-exit answers as labels. Its even-numbered half fits the branch's temperature;
//!   its odd-numbered half certifies the threshold for the target by
//!   Learn-then-Test (`risk::certify`), on the new temperature, over the
//!   default grid from the threshold where the fit half's own test has its
//!   smallest p-value. The halves are disjoint, so the certificate's data
//!   chose neither the temperature nor where the grid starts.
//!
//! Everything is plain data in, decisions out: no clock, no I/O. Time is
//! the caller's, in microseconds.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::calibration::{fit_temperature, predict, ExitLogits};
use crate::error::{CoreError, Result};
use crate::risk::{certify, clopper_pearson_upper, default_grid, ConfidenceCounts, Target};

/// How one branch is watched.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MonitorConfig {
    /// The probability of each input's audit coin.
    pub audit_rate: f64,
    /// The on-device accuracy the branch must keep, and the confidence of
    /// the thresholds a refit certifies.
    pub target: Target,
    /// Estimates and refits use what arrived in the last `window_us`.
    pub window_us: u64,
    /// At most this many observations are kept (the oldest go first).
    pub max_observations: usize,
    /// The smallest rise in disagreement the drift test is after: added to
    /// the reference's rate at every confidence.
    pub drift_margin: f64,
    /// The drift test's false-alarm bound: at most this chance of an alarm,
    /// ever, while the reference holds (and as much again that it is too
    /// low where it was estimated).
    pub alarm_alpha: f64,
    /// Refit on an alarm; off, the alarm is still raised and counted.
    pub auto_refit: bool,
    /// Refits are at least this far apart.
    pub min_refit_interval_us: u64,
    /// A refit needs this many sampled inputs in the window (half fit the
    /// temperature, half certify the threshold).
    pub min_refit_sample: usize,
}

impl MonitorConfig {
    pub fn validate(&self) -> Result<()> {
        self.target.validate()?;
        let bad = |what: &str, reason: String| Err(CoreError::InvalidArgument { what: what.into(), reason });
        if !(self.audit_rate > 0.0 && self.audit_rate <= 1.0) {
            return bad("audit_rate", format!("{}; give a probability in (0, 1]", self.audit_rate));
        }
        if !(self.drift_margin > 0.0 && self.drift_margin < self.target.accuracy) {
            return bad("drift_margin", format!("{}; give a positive accuracy drop below the target {}", self.drift_margin, self.target.accuracy));
        }
        if !(self.alarm_alpha > 0.0 && self.alarm_alpha < 1.0) {
            return bad("alarm_alpha", format!("{}; give a probability in (0, 1)", self.alarm_alpha));
        }
        if self.window_us == 0 || self.max_observations == 0 {
            return bad("monitor window", "give a positive window and observation limit".into());
        }
        if self.min_refit_sample < 4 {
            return bad("min_refit_sample", format!("{}; a refit needs at least 4 sampled inputs", self.min_refit_sample));
        }
        Ok(())
    }
}

/// One input the monitor hears about: an audit, or an offload.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub t_us: u64,
    /// The branch's raw logits (before any temperature).
    pub logits: Vec<f32>,
    /// The final exit's class: the label the monitor learns from.
    pub final_class: u32,
    /// The true label, where it is known (simulation); never used to decide.
    pub label: Option<u32>,
    /// Decided on the device (an audit) rather than offloaded.
    pub on_device: bool,
    /// Its audit coin came up: part of the uniform sample. Always true for
    /// an audit.
    pub sampled: bool,
}

/// What the monitor did with an observation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// The drift test alarmed and no refit followed (turned off, too soon
    /// after the last, or too few sampled inputs).
    Alarm { t_us: u64 },
    /// The drift test alarmed and the branch was refit.
    Refit(Refit),
}

/// A refit: the new temperature and the threshold certified on it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Refit {
    pub t_us: u64,
    pub temperature: f64,
    /// The certified threshold; 1 when none is (offload everything).
    pub threshold: f64,
    /// Sampled inputs that fit the temperature, and that certified.
    pub fit_inputs: usize,
    pub certify_inputs: usize,
    /// The certifying inputs' agreement with the final exit among those
    /// that exit under the new plan: what the refit predicts of on-device
    /// agreement from then on (`None`: none exits).
    #[serde(default)]
    pub predicted_agreement: Option<f64>,
}

/// An estimate with its interval at confidence 1 - alpha.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// The monitor's view of the plan in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveEstimate {
    pub audits: usize,
    pub offloads: usize,
    /// On-device agreement with the final exit (from the audits).
    pub edge_agreement: Option<Interval>,
    /// On-device accuracy against labels, where known (the same audits).
    pub edge_accuracy: Option<Interval>,
    /// Weighted share of inputs offloaded.
    pub offload_rate: Option<f64>,
    /// Weighted ECE (15 bins) of the branch's confidence against agreement.
    pub ece: Option<f64>,
    /// (mean confidence, agreement, weight) per non-empty bin.
    pub reliability: Vec<(f64, f64, f64)>,
}

/// One branch, watched.
#[derive(Debug, Clone)]
pub struct Monitor {
    cfg: MonitorConfig,
    temperature: f64,
    threshold: f64,
    /// When the plan in force began (the start, or the last refit).
    plan_since_us: u64,
    window: VecDeque<Observation>,
    /// Observations numbered in arrival order, for the refit's halves.
    seen: u64,
    first_number: u64,
    /// What the drift test holds the inputs to; `None`: the on-device
    /// audits only, against 1 - a.
    reference: Option<Reference>,
    drift: DriftTest,
    /// The same test the other way: inputs that disagree *less* than the
    /// reference allows (a shift ending) also call for a refit, which
    /// relaxes the plan again.
    recovery: DriftTest,
    /// The median confidence of a uniform sample of the inputs the plan in
    /// force was certified for (the validation split, then the refit's
    /// sample), and two tests on the sampled inputs against it: more of
    /// them below it than half (plus the margin), or more above it. Either
    /// says the inputs are no longer exchangeable with those the
    /// certificate was computed on, whatever happens to their agreement:
    /// a certificate says nothing about other inputs.
    median: Option<MedianSplit>,
    /// Whether the two median tests run (`with_exchangeability_test`).
    exchangeability: bool,
    lower: DriftTest,
    upper: DriftTest,
    /// After an alarm: refit from the inputs since this time as soon as
    /// there are enough and the last refit is far enough back.
    pending_since_us: Option<u64>,
    last_refit_us: Option<u64>,
    alarms: u64,
    refits: Vec<Refit>,
    /// What the last refit learned from, for a planner to plan on.
    evidence: Option<RefitEvidence>,
}

/// The inputs a refit learned from, at its new temperature: what a planner
/// predicts the branch's plans with from then on (`control::GroupControl`).
#[derive(Debug, Clone, PartialEq)]
pub struct RefitEvidence {
    /// Every sampled input of the refit (both halves): its confidence at
    /// the new temperature and whether it agreed with the final exit.
    pub inputs: Vec<(f64, bool)>,
    /// The certified thresholds run from `Refit::threshold` up to this one:
    /// the fixed sequence tested (and rejected) every grid point between.
    pub sequence_start: f64,
}

impl RefitEvidence {
    /// Whether `p_tar` is a grid threshold the refit certified.
    pub fn certifies(&self, lowest: f64, p_tar: f64) -> bool {
        lowest < 1.0 && p_tar >= lowest && p_tar <= self.sequence_start && default_grid().contains(&p_tar)
    }
}

impl Monitor {
    /// `reference`: the disagreement expected at each confidence at this
    /// `temperature` (`Reference::of_exit` on the validation split).
    pub fn new(cfg: MonitorConfig, temperature: f64, threshold: f64, reference: Option<Reference>) -> Result<Self> {
        cfg.validate()?;
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(CoreError::InvalidArgument { what: "temperature".into(), reason: format!("{temperature}; give a positive number") });
        }
        Ok(Self {
            cfg,
            temperature,
            threshold,
            plan_since_us: 0,
            window: VecDeque::new(),
            seen: 0,
            first_number: 0,
            median: reference.as_ref().and_then(|r| r.median),
            exchangeability: false,
            reference,
            drift: DriftTest::new(),
            recovery: DriftTest::new(),
            lower: DriftTest::new(),
            upper: DriftTest::new(),
            pending_since_us: None,
            last_refit_us: None,
            alarms: 0,
            refits: Vec::new(),
            evidence: None,
        })
    }

    /// Also tests whether the sampled inputs are still exchangeable with
    /// those the plan was certified on (the median tests): what a planner
    /// that plans on certificates needs. Off, the monitor watches
    /// agreement alone (the watched policy).
    pub fn with_exchangeability_test(self) -> Self {
        Self { exchangeability: true, ..self }
    }

    pub fn temperature(&self) -> f64 {
        self.temperature
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    pub fn target_accuracy(&self) -> f64 {
        self.cfg.target.accuracy
    }

    /// Drift alarms raised so far (those followed by a refit included).
    pub fn alarms(&self) -> u64 {
        self.alarms
    }

    pub fn refits(&self) -> &[Refit] {
        &self.refits
    }

    /// Asks for a refit from the sampled inputs that arrive from `now` on
    /// (as after an alarm), unless one is pending already: what a branch
    /// whose evidence was voided by another branch's alarm needs.
    pub fn request_refit(&mut self, now: u64) {
        self.pending_since_us.get_or_insert(now);
    }

    /// What the last refit learned from (`None` before the first).
    pub fn refit_evidence(&self) -> Option<&RefitEvidence> {
        self.evidence.as_ref()
    }

    /// Takes one observation; returns what it set off, if anything.
    pub fn observe(&mut self, obs: Observation) -> Result<Option<Event>> {
        if obs.logits.len() < 2 || obs.logits.iter().any(|z| !z.is_finite()) {
            return Err(CoreError::InvalidArgument { what: "observation".into(), reason: format!("{} logits, or one not finite", obs.logits.len()) });
        }
        if obs.final_class as usize >= obs.logits.len() || obs.label.is_some_and(|y| y as usize >= obs.logits.len()) {
            return Err(CoreError::InvalidArgument { what: "observation".into(), reason: format!("a class outside the {} classes", obs.logits.len()) });
        }
        let now = obs.t_us;
        let (class, confidence) = predict(&obs.logits, self.temperature);
        let sampled = obs.sampled && obs.t_us >= self.plan_since_us;
        let disagrees = class as u32 != obs.final_class;
        // The null rate for this input: the reference's at its confidence;
        // without one, the target's, for on-device inputs only.
        let null = match (&self.reference, obs.on_device) {
            _ if obs.t_us < self.plan_since_us => None,
            (Some(r), _) => Some(r.null_at(confidence)),
            (None, true) => Some((0, 1.0 - self.cfg.target.accuracy)),
            (None, false) => None,
        };
        self.push(obs);
        if let Some(since) = self.pending_since_us {
            if let Some(refit) = self.try_refit(now, since)? {
                return Ok(Some(Event::Refit(refit)));
            }
        }
        // Once a refit is pending the alarm has done its work: the tests
        // wait for the refit's new plan.
        if self.pending_since_us.is_some() {
            return Ok(None);
        }
        // The sampled inputs' confidences against the median, each way.
        let moved = match self.median.filter(|_| sampled && self.exchangeability) {
            Some(m) => {
                let lower = self.lower.observe(confidence < m.median, m.below + self.cfg.drift_margin, 0, self.cfg.alarm_alpha);
                self.upper.observe(confidence > m.median, m.above + self.cfg.drift_margin, 0, self.cfg.alarm_alpha) || lower
            }
            None => false,
        };
        let (drifted, recovered) = match null {
            Some((bin, null)) => {
                let drifted = self.drift.observe(disagrees, null, bin, self.cfg.alarm_alpha);
                // Recovery: "agrees" tested against at most 1 - low.
                let low = self.reference.as_ref().map_or(0.0, |r| r.low_in(bin));
                (drifted, low > 0.0 && self.recovery.observe(!disagrees, 1.0 - low, bin, self.cfg.alarm_alpha))
            }
            None => (false, false),
        };
        if !(drifted || recovered || moved) {
            return Ok(None);
        }
        self.alarms += 1;
        // An alarm is raised once; counting goes on from fresh wealth.
        self.fresh_tests();
        if self.cfg.auto_refit {
            // A refit learns from inputs that arrive after the alarm: those
            // before it describe the old inputs, and the run of
            // disagreements that raised the alarm is worse than the truth
            // by the way it was picked (a refit on it would overshoot).
            let since = self.pending_since_us.unwrap_or(now);
            self.pending_since_us = Some(since);
            if let Some(refit) = self.try_refit(now, since)? {
                return Ok(Some(Event::Refit(refit)));
            }
        }
        Ok(Some(Event::Alarm { t_us: now }))
    }

    /// A refit from the inputs since `since`, if the interval since the last
    /// refit allows one and there are enough.
    fn try_refit(&mut self, now: u64, since: u64) -> Result<Option<Refit>> {
        if self.last_refit_us.is_some_and(|t| now < t + self.cfg.min_refit_interval_us) {
            return Ok(None);
        }
        let refit = self.refit_since(now, since)?;
        if refit.is_some() {
            self.pending_since_us = None;
        }
        Ok(refit)
    }

    fn push(&mut self, obs: Observation) {
        let horizon = obs.t_us.saturating_sub(self.cfg.window_us);
        self.window.push_back(obs);
        self.seen += 1;
        while self.window.len() > self.cfg.max_observations || self.window.front().is_some_and(|o| o.t_us < horizon) {
            self.window.pop_front();
            self.first_number += 1;
        }
    }

    /// Every test starts again from wealth 1.
    fn fresh_tests(&mut self) {
        (self.drift, self.recovery, self.lower, self.upper) = (DriftTest::new(), DriftTest::new(), DriftTest::new(), DriftTest::new());
    }

    /// Refits now from the window's sample, if it holds enough; the new
    /// temperature and threshold become the plan in force.
    pub fn refit(&mut self, now: u64) -> Result<Option<Refit>> {
        self.refit_since(now, 0)
    }

    fn refit_since(&mut self, now: u64, since: u64) -> Result<Option<Refit>> {
        let numbered = self.window.iter().enumerate().map(|(i, o)| (self.first_number + i as u64, o));
        let sample: Vec<(u64, &Observation)> = numbered.filter(|(_, o)| o.sampled && o.t_us >= since).collect();
        if sample.len() < self.cfg.min_refit_sample {
            return Ok(None);
        }
        let classes = sample[0].1.logits.len();
        let half = |parity: u64| -> Vec<&Observation> { sample.iter().filter(|(n, _)| n % 2 == parity).map(|(_, o)| *o).collect() };
        let (fit, check) = (half(0), half(1));
        let as_logits =
            |obs: &[&Observation]| ExitLogits::new(classes, obs.iter().flat_map(|o| o.logits.iter().copied()).collect(), obs.iter().map(|o| i64::from(o.final_class)).collect());
        let temperature = match fit_temperature(&[&as_logits(&fit)?]) {
            Ok(t) => t,
            // Pseudo-labels no better than chance: keep the temperature.
            Err(_) => self.temperature,
        };
        // The grid starts where the fit half, at the new temperature, holds
        // the strongest evidence (the smallest p-value of the same test):
        // above it the certifying half would likely fail at once, and the
        // first test not rejected ends the sequence. Chosen on the fit half
        // alone, the start is fixed before the certifying half is looked at.
        let fit_counts = ConfidenceCounts::of_exit(&as_logits(&fit)?, temperature)?;
        let Target { accuracy, .. } = self.cfg.target;
        let full = default_grid();
        let p_value = |t: f64| {
            let (n, k) = fit_counts.at(t);
            if n == 0 {
                1.0
            } else {
                crate::risk::binomial_cdf(k as u64, n as u64, 1.0 - accuracy)
            }
        };
        // Each p-value once; the first of equal ones: the highest such threshold.
        let p_values: Vec<f64> = full.iter().map(|&t| p_value(t)).collect();
        let start = (0..p_values.len()).fold(0, |best, i| if p_values[i] < p_values[best] { i } else { best });
        let counts = ConfidenceCounts::of_exit(&as_logits(&check)?, temperature)?;
        let cert = certify(&counts, self.cfg.target, &full[start..])?;
        let threshold = cert.threshold.unwrap_or(1.0);
        let inputs = sample
            .iter()
            .map(|(_, o)| {
                let (class, c) = predict(&o.logits, temperature);
                (c, class as u32 == o.final_class)
            })
            .collect();
        self.evidence = Some(RefitEvidence { inputs, sequence_start: full[start] });
        let predicted_agreement = (cert.exits > 0).then(|| (cert.exits - cert.errors) as f64 / cert.exits as f64);
        let refit = Refit { t_us: now, temperature, threshold, fit_inputs: fit.len(), certify_inputs: check.len(), predicted_agreement };
        self.temperature = temperature;
        self.threshold = threshold;
        self.plan_since_us = now;
        self.last_refit_us = Some(now);
        // A new plan is a new hypothesis, held to what the inputs since the
        // alarm look like at the new temperature (every input heard, at
        // least `Reference::MIN_INPUTS` of them).
        let since_alarm: Vec<&Observation> = self.window.iter().filter(|o| o.t_us >= since).collect();
        let (conf, disagree): (Vec<f64>, Vec<bool>) = since_alarm
            .iter()
            .map(|o| {
                let (class, c) = predict(&o.logits, temperature);
                (c, class as u32 != o.final_class)
            })
            .unzip();
        self.reference = Reference::new(&conf, &disagree, self.cfg.drift_margin, self.cfg.alarm_alpha).ok();
        // The sample is uniform: its median is the inputs'.
        self.median = self.evidence.as_ref().and_then(|e| MedianSplit::new(e.inputs.iter().map(|i| i.0).collect(), self.cfg.alarm_alpha));
        self.fresh_tests();
        self.refits.push(refit);
        Ok(Some(refit))
    }

    /// The estimates of the plan in force at `now`, at confidence
    /// 1 - `alpha` for the intervals.
    pub fn estimate(&self, now: u64, alpha: f64) -> LiveEstimate {
        let horizon = now.saturating_sub(self.cfg.window_us).max(self.plan_since_us);
        let current: Vec<&Observation> = self.window.iter().filter(|o| o.t_us >= horizon && o.t_us <= now).collect();
        let audits: Vec<&Observation> = current.iter().copied().filter(|o| o.on_device).collect();
        let offloads = current.len() - audits.len();
        let agree = |o: &&Observation| predict(&o.logits, self.temperature).0 as u32 == o.final_class;
        let edge_agreement = proportion(audits.iter().filter(|o| agree(o)).count(), audits.len(), alpha);
        let labelled: Vec<&&Observation> = audits.iter().filter(|o| o.label.is_some()).collect();
        let right = labelled.iter().filter(|o| o.label == Some(predict(&o.logits, self.temperature).0 as u32)).count();
        let edge_accuracy = proportion(right, labelled.len(), alpha);
        // Horvitz-Thompson weights: an audit stands for 1 / audit_rate
        // on-device inputs, an offload for itself.
        let weight = |o: &Observation| if o.on_device { 1.0 / self.cfg.audit_rate } else { 1.0 };
        let total: f64 = current.iter().map(|o| weight(o)).sum();
        let offload_rate = (total > 0.0).then(|| offloads as f64 / total);
        const BINS: usize = 15;
        let mut bins = [(0.0f64, 0.0f64, 0.0f64); BINS];
        for o in &current {
            let (class, conf) = predict(&o.logits, self.temperature);
            let b = ((conf * BINS as f64).ceil() as usize).clamp(1, BINS) - 1;
            let w = weight(o);
            bins[b].0 += w * conf;
            bins[b].1 += w * f64::from(u8::from(class as u32 == o.final_class));
            bins[b].2 += w;
        }
        let reliability: Vec<(f64, f64, f64)> = bins.iter().filter(|b| b.2 > 0.0).map(|b| (b.0 / b.2, b.1 / b.2, b.2)).collect();
        let ece = (total > 0.0).then(|| reliability.iter().map(|(c, a, w)| w / total * (c - a).abs()).sum());
        LiveEstimate { audits: audits.len(), offloads, edge_agreement, edge_accuracy, offload_rate, ece, reliability }
    }
}

/// The disagreement with the final exit expected at each confidence: the
/// drift test's null. Confidences are cut into bins of equal counts; a
/// bin's rate is the Clopper-Pearson upper bound on its disagreements
/// (confidence 1 - beta / bins: all bins at once with probability
/// 1 - beta), plus the margin.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// Upper confidence edge of each bin but the last, ascending.
    edges: Vec<f64>,
    null: Vec<f64>,
    /// Per bin: the Clopper-Pearson lower bound on its disagreements, less
    /// the margin: the recovery test's null (at least this rate).
    low: Vec<f64>,
    /// The inputs' median confidence (they are a uniform sample when the
    /// reference comes from the validation split).
    pub median: Option<MedianSplit>,
}

/// A uniform sample's median confidence, and upper confidence bounds
/// (Clopper-Pearson, 1 - beta each) on the shares of inputs strictly below
/// it and strictly above it: the sample estimates the median, and the tests
/// must hold whatever its error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MedianSplit {
    pub median: f64,
    pub below: f64,
    pub above: f64,
}

impl MedianSplit {
    /// `None` for an empty sample.
    pub fn new(mut confidences: Vec<f64>, beta: f64) -> Option<Self> {
        if confidences.is_empty() {
            return None;
        }
        confidences.sort_by(f64::total_cmp);
        let n = confidences.len();
        let median = confidences[(n - 1) / 2];
        let below = confidences.partition_point(|&c| c < median) as u64;
        let above = (n - confidences.partition_point(|&c| c <= median)) as u64;
        let bound = |k: u64| clopper_pearson_upper(k, n as u64, beta);
        Some(Self { median, below: bound(below), above: bound(above) })
    }
}

impl Reference {
    /// Inputs a reference needs: fewer make bins too wide to test with.
    pub const MIN_INPUTS: usize = 100;

    /// From inputs' confidences and whether each disagreed.
    pub fn new(confidences: &[f64], disagrees: &[bool], margin: f64, beta: f64) -> Result<Self> {
        let n = confidences.len();
        if n < Self::MIN_INPUTS || disagrees.len() != n || confidences.iter().any(|c| !c.is_finite()) {
            return Err(CoreError::InvalidArgument {
                what: "drift reference".into(),
                reason: format!("{n} confidences and {} disagreement flags; need at least {} finite pairs", disagrees.len(), Self::MIN_INPUTS),
            });
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&i, &j| confidences[i].total_cmp(&confidences[j]));
        // Ten bins, or fewer while a bin would hold under 100 inputs.
        let bins = (n / Self::MIN_INPUTS).clamp(1, 10);
        let (mut edges, mut null, mut low) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..bins {
            let part = &order[b * n / bins..(b + 1) * n / bins];
            let k = part.iter().filter(|&&i| disagrees[i]).count() as u64;
            let m = part.len() as u64;
            null.push((clopper_pearson_upper(k, m, beta / bins as f64) + margin).min(1.0));
            low.push((1.0 - clopper_pearson_upper(m - k, m, beta / bins as f64) - margin).max(0.0));
            if b + 1 < bins {
                edges.push(confidences[*part.last().expect("bins are not empty")]);
            }
        }
        Ok(Self { edges, null, low, median: MedianSplit::new(confidences.to_vec(), beta) })
    }

    /// From one branch's logits on labelled-free inputs (the validation
    /// split) and the final exit's class of each, at `temperature`.
    pub fn of_exit(branch: &ExitLogits, final_classes: &[u32], temperature: f64, margin: f64, beta: f64) -> Result<Self> {
        if final_classes.len() != branch.len() {
            return Err(CoreError::InvalidArgument { what: "drift reference".into(), reason: format!("{} inputs but {} final classes", branch.len(), final_classes.len()) });
        }
        let (conf, disagree): (Vec<f64>, Vec<bool>) = (0..branch.len())
            .map(|i| {
                let (class, c) = branch.predict(i, temperature);
                (c, class as u32 != final_classes[i])
            })
            .unzip();
        Self::new(&conf, &disagree, margin, beta)
    }

    /// The bin of `confidence` and its null rate.
    pub fn null_at(&self, confidence: f64) -> (usize, f64) {
        let bin = self.edges.partition_point(|&e| e < confidence);
        (bin, self.null[bin])
    }

    /// The recovery test's null in `bin`: disagreement at least this rate
    /// (0: the bin cannot show a recovery).
    pub fn low_in(&self, bin: usize) -> f64 {
        self.low.get(bin).copied().unwrap_or(0.0)
    }
}

/// The inputs references are estimated from at the start: each branch's
/// logits on the validation split and the final exit's class of each
/// input (agreement needs no label).
#[derive(Debug, Clone)]
pub struct ReferenceInputs {
    /// `[branch - 1]`.
    pub branch_logits: Vec<ExitLogits>,
    pub final_class: Vec<u32>,
}

impl ReferenceInputs {
    /// From every exit's logits (branches, then the final exit) at the
    /// final exit's `final_temperature` (a temperature never changes a
    /// class; it is there for the one definition of a prediction).
    pub fn of_exits(exits: &[ExitLogits], final_temperature: f64) -> Option<Self> {
        let (fin, branches) = exits.split_last()?;
        Some(Self { branch_logits: branches.to_vec(), final_class: (0..fin.len()).map(|i| fin.predict(i, final_temperature).0 as u32).collect() })
    }

    /// The reference of `branch` (from 1) at `temperature` for a monitor
    /// of `cfg`; `None` when there is no such branch or too few inputs.
    pub fn reference(&self, branch: usize, temperature: f64, cfg: &MonitorConfig) -> Option<Reference> {
        let logits = self.branch_logits.get(branch.checked_sub(1)?)?;
        Reference::of_exit(logits, &self.final_class, temperature, cfg.drift_margin, cfg.alarm_alpha).ok()
    }
}

/// The drift test (module doc): a betting e-process on disagreements, each
/// input against its own null rate.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftTest {
    /// ln of each bettor's wealth (one per stake in `STAKES`).
    log_wealth: [f64; STAKES.len()],
    /// Per reference bin: (d - mu, mu (1 - mu)) of its last `RECENT`
    /// inputs, oldest first, and their sums.
    recent: Vec<Recent>,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct Recent {
    inputs: VecDeque<(f64, f64)>,
    excess: f64,
    variance: f64,
}

/// Inputs of one confidence bin that decide whether to bet on the next.
const RECENT: usize = 40;

/// The bettors' stakes, as fractions of what one agreement could lose
/// (lambda = stake / mu): from a small rise's best bet to a large jump's.
/// Averaging their wealths costs ln 5 of evidence against knowing the best
/// stake in advance; choosing one from the recent rate instead overbets
/// whenever that rate is overestimated, as it always is right after a run
/// of disagreements.
const STAKES: [f64; 5] = [1.0 / 32.0, 1.0 / 16.0, 1.0 / 8.0, 1.0 / 4.0, 1.0 / 2.0];

impl Default for DriftTest {
    fn default() -> Self {
        Self::new()
    }
}

impl DriftTest {
    pub fn new() -> Self {
        Self { log_wealth: [0.0; STAKES.len()], recent: Vec::new() }
    }

    /// Whether the next input of reference bin `bin` is bet on: only while
    /// that bin's recent inputs disagreed more than their null rates add up
    /// to, by a standard deviation of the null. Decided from the inputs
    /// before it, so the bound holds; a bin that keeps inside its null is
    /// seldom bet on and costs the wealth little, and a bin that drifts is
    /// bet on whatever the others do.
    pub fn betting(&self, bin: usize) -> bool {
        self.recent.get(bin).is_some_and(|r| r.excess > r.variance.sqrt())
    }

    /// Takes one input of reference bin `bin` and null rate `null` (in
    /// (0, 1)); true when the wealth reaches 1 / alpha.
    pub fn observe(&mut self, disagrees: bool, null: f64, bin: usize, alpha: f64) -> bool {
        let null = null.clamp(1e-6, 1.0 - 1e-6);
        let excess = f64::from(u8::from(disagrees)) - null;
        if self.betting(bin) {
            for (w, stake) in self.log_wealth.iter_mut().zip(STAKES) {
                *w += (1.0 + stake / null * excess).ln();
            }
        }
        if self.recent.len() <= bin {
            self.recent.resize(bin + 1, Recent::default());
        }
        let r = &mut self.recent[bin];
        let variance = null * (1.0 - null);
        r.inputs.push_back((excess, variance));
        r.excess += excess;
        r.variance += variance;
        if r.inputs.len() > RECENT {
            let (e, v) = r.inputs.pop_front().unwrap_or((0.0, 0.0));
            r.excess -= e;
            r.variance = (r.variance - v).max(0.0);
        }
        self.wealth() >= 1.0 / alpha
    }

    /// The wealth, averaged over the bettors: the evidence against the
    /// null (1: none).
    pub fn wealth(&self) -> f64 {
        self.log_wealth.iter().map(|w| w.exp()).sum::<f64>() / STAKES.len() as f64
    }
}

/// k of n with its two-sided Clopper-Pearson interval at 1 - alpha.
fn proportion(k: usize, n: usize, alpha: f64) -> Option<Interval> {
    (n > 0).then(|| {
        let (k, n) = (k as u64, n as u64);
        let high = clopper_pearson_upper(k, n, alpha / 2.0);
        let low = if k == 0 { 0.0 } else { 1.0 - clopper_pearson_upper(n - k, n, alpha / 2.0) };
        Interval { estimate: k as f64 / n as f64, low, high }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn config() -> MonitorConfig {
        MonitorConfig {
            audit_rate: 0.1,
            target: Target { accuracy: 0.9, delta: 0.05 },
            window_us: 60_000_000,
            max_observations: 50_000,
            drift_margin: 0.05,
            alarm_alpha: 0.01,
            auto_refit: true,
            min_refit_interval_us: 10_000_000,
            min_refit_sample: 200,
        }
    }

    /// Two classes; the branch's logit gap is `gap`, so its confidence at
    /// T = 1 is sigmoid(gap). The final exit agrees with probability
    /// `agree(confidence)`.
    struct Stream {
        rng: SplitMix64,
        t: u64,
    }

    impl Stream {
        fn next(&mut self, agree: impl Fn(f64) -> f64, threshold: f64, temperature: f64, rate: f64) -> Option<Observation> {
            self.t += 10_000; // 100 inputs per second
            let gap = (8.0 * self.rng.next_f64()) as f32;
            let logits = vec![gap, 0.0];
            let (_, conf) = predict(&logits, temperature);
            let agrees = self.rng.next_f64() < agree(predict(&logits, 1.0).1);
            let sampled = self.rng.next_f64() < rate;
            let on_device = conf >= threshold;
            let class = u32::from(!agrees);
            (sampled || !on_device).then_some(Observation { t_us: self.t, logits, final_class: class, label: Some(class), on_device, sampled })
        }
    }

    /// The reference of `Stream`'s clean inputs at T = 1: 5,000 of them,
    /// as a validation split would give it.
    fn clean_reference(seed: u64) -> Reference {
        let mut rng = SplitMix64::new(seed);
        let (conf, disagree): (Vec<f64>, Vec<bool>) = (0..5000)
            .map(|_| {
                let c = predict(&[(8.0 * rng.next_f64()) as f32, 0.0], 1.0).1;
                (c, rng.next_f64() >= c)
            })
            .unzip();
        Reference::new(&conf, &disagree, 0.03, 0.01).unwrap()
    }

    #[test]
    fn proportions_have_exact_intervals() {
        let i = proportion(0, 10, 0.05).unwrap();
        assert_eq!((i.estimate, i.low), (0.0, 0.0));
        assert!((i.high - (1.0 - 0.025f64.powf(0.1))).abs() < 1e-10, "{i:?}");
        let i = proportion(10, 10, 0.05).unwrap();
        assert!((i.low - 0.025f64.powf(0.1)).abs() < 1e-10 && i.high == 1.0, "{i:?}");
        assert!(proportion(0, 0, 0.05).is_none());
    }

    #[test]
    fn a_calibrated_branch_raises_no_alarm_and_its_estimate_covers_the_truth() {
        // Agreement equals confidence: calibrated. At threshold 0.8 the
        // on-device agreement is well above 0.9.
        let mut m = Monitor::new(config(), 1.0, 0.8, None).unwrap();
        let mut s = Stream { rng: SplitMix64::new(3), t: 0 };
        for _ in 0..60_000 {
            if let Some(o) = s.next(|c| c, 0.8, 1.0, 0.1) {
                assert_eq!(m.observe(o).unwrap(), None);
            }
        }
        let e = m.estimate(s.t, 0.05);
        let a = e.edge_agreement.unwrap();
        // Truth: mean of c over c = sigmoid(gap) >= 0.8, gap uniform in [0, 8].
        let truth = {
            let (lo, n) = ((0.8f64 / 0.2).ln(), 100_000);
            (0..n).map(|i| lo + (8.0 - lo) * (i as f64 + 0.5) / n as f64).map(|g| 1.0 / (1.0 + (-g).exp())).sum::<f64>() / n as f64
        };
        assert!(a.low <= truth && truth <= a.high, "{a:?} vs {truth}");
        assert!(e.audits > 300 && e.offloads > 1000, "{e:?}");
        // The weighted offload rate: P(sigmoid(gap) < 0.8) = ln 4 / 8.
        let want = (4.0f64).ln() / 8.0;
        assert!((e.offload_rate.unwrap() - want).abs() < 0.03, "{:?} vs {want}", e.offload_rate);
        assert!(e.ece.unwrap() < 0.03, "{e:?}");
        assert_eq!(m.alarms(), 0);
    }

    /// The acceptance's coverage: over 200 windows of 10 s, the live
    /// interval (95 %) holds the true on-device agreement in at least 90 %.
    #[test]
    fn the_interval_covers_the_truth_in_most_windows() {
        let cfg = MonitorConfig { window_us: 10_000_000, ..config() };
        let mut m = Monitor::new(cfg, 1.0, 0.8, None).unwrap();
        let mut s = Stream { rng: SplitMix64::new(13), t: 0 };
        let (lo, n) = ((0.8f64 / 0.2).ln(), 100_000);
        let truth = (0..n).map(|i| lo + (8.0 - lo) * (i as f64 + 0.5) / n as f64).map(|g| 1.0 / (1.0 + (-g).exp())).sum::<f64>() / n as f64;
        let (mut covered, mut windows) = (0, 0);
        for w in 1..=200u64 {
            while s.t < w * 10_000_000 {
                if let Some(o) = s.next(|c| c, 0.8, 1.0, 0.1) {
                    m.observe(o).unwrap();
                }
            }
            let a = m.estimate(s.t, 0.05).edge_agreement.unwrap();
            windows += 1;
            covered += usize::from(a.low <= truth && truth <= a.high);
        }
        assert!(covered * 10 >= windows * 9, "covered in {covered} of {windows} windows");
    }

    #[test]
    fn a_shift_is_detected_refit_and_the_target_met_again() {
        // A refit waits for 1,000 sampled inputs after the alarm: enough to
        // fit a temperature on one half and certify on the other.
        let mut m = Monitor::new(MonitorConfig { min_refit_sample: 1000, window_us: 200_000_000, ..config() }, 1.0, 0.8, Some(clean_reference(8))).unwrap();
        let mut s = Stream { rng: SplitMix64::new(5), t: 0 };
        // Overconfident after the shift: the final exit agrees as if the
        // branch's temperature were 2, sigmoid(gap / 2): on the inputs above
        // 0.8 about 0.86 of the time, below the 0.9 target.
        let shifted = |c: f64| 1.0 / (1.0 + ((1.0 - c) / c).sqrt());
        let mut refit = None;
        for i in 0..200_000 {
            let (t, th) = (m.temperature(), m.threshold());
            let Some(o) = s.next(|c| if i < 20_000 { c } else { shifted(c) }, th, t, 0.1) else { continue };
            if let Some(Event::Refit(r)) = m.observe(o).unwrap() {
                assert!(i >= 20_000, "no refit before the shift");
                refit = Some((i, r));
                break;
            }
        }
        let (at, r) = refit.expect("the shift is detected and refit");
        assert!(at < 20_000 + 60_000, "within 600 s of inputs: at {at}");
        assert!((r.temperature - 2.0).abs() < 0.3, "the temperature of the shifted stream is found: {r:?}");
        // Fewer inputs exit: the smallest logit gap that does,
        // T ln(th / (1 - th)), is above the old plan's (T = 1, p_tar 0.8).
        let gap = |t: f64, th: f64| t * (th / (1.0 - th)).ln();
        assert!(gap(r.temperature, r.threshold) > gap(1.0, 0.8), "the certified plan keeps fewer inputs: {r:?}");
        assert!(r.fit_inputs + r.certify_inputs >= 200);
        // Under the refit plan, the on-device agreement is back above 0.9.
        for _ in 0..60_000 {
            let (t, th) = (m.temperature(), m.threshold());
            if let Some(o) = s.next(shifted, th, t, 0.1) {
                m.observe(o).unwrap();
            }
        }
        let a = m.estimate(s.t, 0.05).edge_agreement.unwrap_or_else(|| panic!("{r:?} {:?}", m.estimate(s.t, 0.05)));
        assert!(a.estimate >= 0.9, "{a:?}");
        assert_eq!(m.refits().len(), 1, "no further refit once the target is met: {:?}", m.refits());
    }

    #[test]
    fn with_refits_off_the_alarm_is_still_raised() {
        let mut m = Monitor::new(MonitorConfig { auto_refit: false, ..config() }, 1.0, 0.8, None).unwrap();
        let mut s = Stream { rng: SplitMix64::new(7), t: 0 };
        let mut alarms = 0;
        for _ in 0..50_000 {
            if let Some(o) = s.next(|c| c - 0.2, 0.8, 1.0, 0.1) {
                match m.observe(o).unwrap() {
                    Some(Event::Alarm { .. }) => alarms += 1,
                    Some(Event::Refit(_)) => panic!("refits are off"),
                    None => {}
                }
            }
        }
        assert!(alarms > 0 && alarms as u64 == m.alarms());
        assert_eq!((m.temperature(), m.threshold()), (1.0, 0.8));
    }

    #[test]
    fn bad_observations_and_settings_are_refused() {
        let mut m = Monitor::new(config(), 1.0, 0.8, None).unwrap();
        let o = Observation { t_us: 1, logits: vec![1.0, 0.0], final_class: 0, label: None, on_device: true, sampled: true };
        assert!(m.observe(Observation { logits: vec![f32::NAN, 0.0], ..o.clone() }).is_err());
        assert!(m.observe(Observation { final_class: 2, ..o.clone() }).is_err());
        assert!(m.observe(Observation { logits: vec![1.0], ..o.clone() }).is_err());
        assert!(m.observe(o).is_ok());
        for bad in [
            MonitorConfig { audit_rate: 0.0, ..config() },
            MonitorConfig { drift_margin: 0.0, ..config() },
            MonitorConfig { alarm_alpha: 1.0, ..config() },
            MonitorConfig { min_refit_sample: 2, ..config() },
        ] {
            assert!(Monitor::new(bad, 1.0, 0.8, None).is_err(), "{bad:?}");
        }
        assert!(Monitor::new(config(), 0.0, 0.8, None).is_err());
    }

    #[test]
    fn the_window_is_bounded() {
        let mut m = Monitor::new(MonitorConfig { max_observations: 100, ..config() }, 1.0, 0.8, None).unwrap();
        for t in 0..1000u64 {
            m.observe(Observation { t_us: t, logits: vec![0.1, 0.0], final_class: 0, label: None, on_device: false, sampled: false }).unwrap();
        }
        assert_eq!(m.window.len(), 100);
        assert_eq!(m.estimate(999, 0.05).offloads, 100);
    }

    #[test]
    fn the_drift_test_seldom_alarms_however_long_the_null_holds() {
        // Every input disagrees at exactly its null rate (the hardest
        // null), rates varying from input to input as confidences do;
        // 20,000 inputs a run: at most alpha of the runs ever alarm, up to
        // sampling error.
        let (runs, alpha) = (300, 0.05);
        let mut rng = SplitMix64::new(3);
        let alarmed = (0..runs)
            .filter(|_| {
                let mut test = DriftTest::new();
                (0..20_000).any(|_| {
                    let bin = rng.below(4) as usize;
                    let null = [0.01, 0.05, 0.2, 0.5][bin];
                    test.observe(rng.next_f64() < null, null, bin, alpha)
                })
            })
            .count();
        let bound = alpha + 2.0 * (alpha * (1.0 - alpha) / runs as f64).sqrt();
        assert!((alarmed as f64 / runs as f64) <= bound, "{alarmed} of {runs} runs alarmed");
    }

    #[test]
    fn the_drift_test_sees_a_jump_within_dozens_of_inputs_and_a_long_clean_stretch_slows_it_little() {
        // Disagreements jump from 2 % to 35 % against a null of 13 %: on a
        // fresh plan, and after 50,000 inputs that kept well inside the
        // null. Medians over 21 seeded streams.
        let (mut fresh, mut late) = (Vec::new(), Vec::new());
        for seed in 0..21 {
            let mut rng = SplitMix64::new(seed);
            let mut test = DriftTest::new();
            fresh.push((1..=2000).find(|_| test.observe(rng.next_f64() < 0.35, 0.13, 0, 0.01)).expect("the jump is seen"));
            let mut test = DriftTest::new();
            for _ in 0..50_000 {
                assert!(!test.observe(rng.next_f64() < 0.02, 0.13, 0, 0.01), "a clean stream alarmed");
            }
            assert!(test.wealth() > 0.1, "{}", test.wealth());
            late.push((1..=2000).find(|_| test.observe(rng.next_f64() < 0.35, 0.13, 0, 0.01)).expect("the jump is seen"));
        }
        fresh.sort_unstable();
        late.sort_unstable();
        assert!(fresh[10] <= 80, "fresh: {fresh:?}");
        assert!(late[10] <= 120, "after a clean stretch: {late:?}");
    }

    #[test]
    fn a_reference_bins_confidences_and_bounds_each_bin() {
        // 1,000 inputs, confidence i / 1000; those below 0.5 disagree
        // every other time, the rest never.
        let conf: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let disagree: Vec<bool> = (0..1000).map(|i| i < 500 && i % 2 == 0).collect();
        let r = Reference::new(&conf, &disagree, 0.03, 0.01).unwrap();
        assert_eq!(r.null.len(), 10);
        let (bin, low) = r.null_at(0.05);
        assert!(bin == 0 && low > 0.5 + 0.03 && low < 0.7, "{low}");
        // No disagreement in 100 inputs: the bound at 0.001 is 1 - 0.001^(1/100).
        let clean = 1.0 - 0.001f64.powf(0.01) + 0.03;
        assert_eq!((r.null_at(0.95).0, r.null_at(1.0).0), (9, 9));
        assert!((r.null_at(0.95).1 - clean).abs() < 1e-9, "{:?}", r.null_at(0.95));
        assert!(Reference::new(&conf[..99], &disagree[..99], 0.03, 0.01).is_err(), "too few inputs");
        assert_eq!(Reference::new(&conf[..250], &disagree[..250], 0.03, 0.01).unwrap().null.len(), 2, "fewer bins for fewer inputs");
    }

    /// Inputs that move to lower confidences while each stays exactly as
    /// likely to agree as the reference says (a shift a per-confidence
    /// test cannot see) are no longer the inputs the plan was certified on:
    /// the median test on the sampled inputs alarms within seconds; inputs
    /// drawn as the reference's do not alarm in an hour of them.
    #[test]
    fn inputs_that_move_to_lower_confidences_alarm_though_each_agrees_as_expected() {
        let run = |gap_scale: f64, inputs: usize| {
            let mut m = Monitor::new(MonitorConfig { auto_refit: false, ..config() }, 1.0, 0.8, Some(clean_reference(8))).unwrap().with_exchangeability_test();
            let mut rng = SplitMix64::new(11);
            for i in 0..inputs {
                let logits = vec![(gap_scale * 8.0 * rng.next_f64()) as f32, 0.0];
                let c = predict(&logits, 1.0).1;
                let class = u32::from(rng.next_f64() >= c);
                // 10 inputs a second are sampled (audits and offloads alike).
                let o = Observation { t_us: i as u64 * 100_000, logits, final_class: class, label: None, on_device: c >= 0.8, sampled: true };
                if let Some(Event::Alarm { t_us }) = m.observe(o).unwrap() {
                    return Some(t_us);
                }
            }
            None
        };
        assert_eq!(run(1.0, 36_000), None, "an hour of the reference's inputs");
        let t = run(0.5, 36_000).expect("the move to lower confidences is seen");
        assert!(t < 10_000_000, "alarm after {t} us");
    }

    #[test]
    fn with_a_reference_offloads_see_a_shift_that_audits_alone_see_late() {
        // Confidence sigmoid(gap) at T = 1, uniform gaps. Before the shift
        // the final exit agrees with probability c; after it, c^8 (0.43 at
        // 0.9; the shipped shift takes the overconfident model's branch 1
        // from 0.85 to 0.54 agreement at 0.7 to 0.9), and the exits'
        // disagreement, about 0.18, breaks the 0.1 allowed. The plan
        // (threshold 0.8) keeps about 80 % of inputs; 10 % are audited,
        // every offload is heard.
        let shifted = |c: f64| c.powi(8);
        let detect = |r: Option<Reference>| {
            let mut m = Monitor::new(MonitorConfig { auto_refit: false, ..config() }, 1.0, 0.8, r).unwrap();
            let mut s = Stream { rng: SplitMix64::new(9), t: 0 };
            for i in 0..200_000 {
                let Some(o) = s.next(|c| if i < 20_000 { c } else { shifted(c) }, 0.8, 1.0, 0.1) else { continue };
                if let Some(Event::Alarm { t_us }) = m.observe(o).unwrap() {
                    assert!(i >= 20_000, "no alarm before the shift (input {i})");
                    return t_us - 200_000_000;
                }
            }
            panic!("the shift is never seen (reference: {})", m.reference.is_some());
        };
        let (with, without) = (detect(Some(clean_reference(8))), detect(None));
        // 100 inputs a second: offloads make the evidence ten times as fast.
        assert!(with < 5_000_000, "with the reference: {with} us");
        assert!(with * 3 < without, "with {with} us, audits alone {without} us");
    }

    #[test]
    fn a_shift_that_ends_is_seen_too_and_the_plan_relaxes_again() {
        // Clean, then from input 20,000 the final exit agrees c^8 of the
        // time, then from input 80,000 clean again (100 inputs a second).
        let mut m = Monitor::new(MonitorConfig { min_refit_sample: 1000, window_us: 200_000_000, ..config() }, 1.0, 0.8, Some(clean_reference(8))).unwrap();
        let mut s = Stream { rng: SplitMix64::new(12), t: 0 };
        for i in 0..160_000 {
            let (t, th) = (m.temperature(), m.threshold());
            let shifted = (20_000..80_000).contains(&i);
            if let Some(o) = s.next(|c| if shifted { c.powi(8) } else { c }, th, t, 0.1) {
                m.observe(o).unwrap();
            }
        }
        let refits = m.refits();
        assert!(refits.len() >= 2, "a refit for the shift and one for its end: {refits:?}");
        let (first, last) = (refits[0], *refits.last().unwrap());
        assert!(first.t_us > 200_000_000 && first.t_us < 800_000_000, "{first:?}");
        assert!(last.t_us > 800_000_000, "the last refit follows the end of the shift: {last:?}");
        // The smallest logit gap that exits, T ln(th / (1 - th)): higher
        // under the shift, lower again after it.
        let gap = |r: Refit| r.temperature * (r.threshold / (1.0 - r.threshold)).ln();
        let start = Refit { t_us: 0, temperature: 1.0, threshold: 0.8, fit_inputs: 0, certify_inputs: 0, predicted_agreement: None };
        assert!(gap(first) > gap(start), "the shift's plan keeps fewer inputs: {first:?}");
        assert!(gap(last) < gap(first), "the plan relaxes after the shift: {first:?} then {last:?}");
    }
}
