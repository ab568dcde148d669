//! Certified thresholds: a branch's exit threshold chosen so that its
//! on-device accuracy is at least a target `a` with probability at least
//! `1 - delta`, whatever the calibration of its confidences.
//!
//! Temperature scaling makes confidence track accuracy on average, with no
//! guarantee. Learn-then-Test (Angelopoulos et al., 2021; for early exits,
//! Jazbec et al., NeurIPS 2024) turns threshold selection into multiple
//! testing on a calibration split: for each threshold `l` of a grid fixed in
//! advance, from high to low, test the null hypothesis "the error rate of
//! the inputs with confidence >= l is above 1 - a" with an exact binomial
//! test, and keep going while it is rejected at level `delta` (fixed-sequence
//! testing needs no correction for the number of thresholds). The lowest
//! threshold rejected is certified; if the first is not rejected, none is
//! and the branch offloads everything.
//!
//! The binomial test rejects exactly when the Clopper-Pearson upper
//! confidence bound on the error rate is at most 1 - a: with k errors among
//! the n inputs that exit, the p-value is P(Binomial(n, 1 - a) <= k).
//! Thresholds at which no input exits have no evidence and are not rejected.
//!
//! That promise is about the population of inputs that exit. A deployment
//! judges a finite batch instead (an outage batch, an evaluation half), and a
//! batch of m exits scatters around the population: a threshold whose
//! population accuracy sits just above `a` leaves almost half its batches
//! below it. A *batch* certificate (`certify_batch`) promises the batch
//! itself: with probability at least `1 - delta`, a fresh batch's exits are
//! right at least a fraction `a` of the time. It splits delta in two
//! (union bound): the population error rate is certified at level delta/2
//! against a stricter rate `alpha*(m)`, the largest at which m exits break
//! the target with probability at most delta/2 (`batch_error_rate`).
use serde::{Deserialize, Serialize};

use crate::calibration::ExitLogits;
use crate::error::{CoreError, Result};

/// ln Gamma(x) for x > 0 (Lanczos approximation, g = 7, 9 coefficients;
/// relative error below 1e-14 over the range used here).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// The regularized incomplete beta function I_x(a, b), for a, b > 0 and
/// 0 <= x <= 1 (continued fraction, modified Lentz; Numerical Recipes 6.4).
pub fn beta_inc(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    // The continued fraction converges fast for x < (a + 1) / (a + b + 2);
    // otherwise use I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(a, b, x) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(b, a, 1.0 - x) / b
    }
}

fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    const EPS: f64 = 1e-15;
    // One step of Lentz's method: the new (c, d) for coefficient `aa`.
    let step = |aa: f64, c: f64, d: f64| -> (f64, f64) {
        let guard = |v: f64| if v.abs() < TINY { TINY } else { v };
        (guard(1.0 + aa / c), 1.0 / guard(1.0 + aa * d))
    };
    let (qab, qap, qam) = (a + b, a + 1.0, a - 1.0);
    let (mut c, mut d) = (1.0, step(-qab * x / qap, f64::INFINITY, 1.0).1);
    let mut h = d;
    for m in 1..10_000 {
        let m = f64::from(m);
        let m2 = 2.0 * m;
        // The even and the odd term of the continued fraction.
        (c, d) = step(m * (b - m) * x / ((qam + m2) * (a + m2)), c, d);
        h *= d * c;
        (c, d) = step(-(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)), c, d);
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < EPS {
            break;
        }
    }
    h
}

/// P(X <= k) for X ~ Binomial(n, p).
pub fn binomial_cdf(k: u64, n: u64, p: f64) -> f64 {
    if k >= n || p <= 0.0 {
        return 1.0;
    }
    if p >= 1.0 {
        return 0.0;
    }
    // P(X <= k) = I_{1-p}(n - k, k + 1), computed directly (not as 1 - I)
    // so that small tails keep their relative precision.
    beta_inc((n - k) as f64, (k + 1) as f64, 1.0 - p)
}

/// The one-sided Clopper-Pearson upper confidence bound, at confidence
/// 1 - delta, on a rate observed as `k` events in `n` trials: the largest p
/// with P(Binomial(n, p) <= k) >= delta. 1 when n is 0.
pub fn clopper_pearson_upper(k: u64, n: u64, delta: f64) -> f64 {
    if n == 0 || k >= n {
        return 1.0;
    }
    // P(Bin(n, p) <= k) falls from 1 to 0 as p goes from k/n to 1: bisect.
    let (mut lo, mut hi) = (k as f64 / n as f64, 1.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if binomial_cdf(k, n, mid) > delta {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo < 1e-13 {
            break;
        }
    }
    hi
}

/// The threshold grid, from high to low, fixed before any data is seen:
/// 0.999 down to 0.001 in steps of 0.001. Its top is where a test can first
/// reject: if no calibration input reaches it, nothing is certified (there is
/// no evidence), so it must not sit above what calibrated confidences
/// reach; 0.999 is reached by a trained network's easy inputs even after
/// temperature scaling has softened them.
pub fn default_grid() -> Vec<f64> {
    (1..1000).rev().map(|i| f64::from(i) / 1000.0).collect()
}

/// A target: on-device accuracy at least `accuracy`, with probability at
/// least `1 - delta` over the calibration split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub accuracy: f64,
    pub delta: f64,
}

impl Target {
    pub fn validate(&self) -> Result<()> {
        if !(self.accuracy > 0.0 && self.accuracy < 1.0) {
            return Err(CoreError::InvalidArgument { what: "certified accuracy".into(), reason: format!("{} is outside (0, 1)", self.accuracy) });
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(CoreError::InvalidArgument { what: "certificate delta".into(), reason: format!("{} is outside (0, 1)", self.delta) });
        }
        Ok(())
    }
}

/// What Learn-then-Test certified for one branch and target.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Certificate {
    pub target: Target,
    /// The lowest grid threshold rejected in sequence; `None` when the first
    /// was not (then the branch should offload every input).
    pub threshold: Option<f64>,
    /// At that threshold, on the calibration split: inputs that exit, and
    /// how many of them are wrong.
    pub exits: usize,
    pub errors: usize,
    /// Clopper-Pearson upper bound (confidence 1 - delta) on their error rate.
    pub error_upper_bound: f64,
    /// Calibration inputs.
    pub inputs: usize,
    /// For a batch certificate, the batch (inputs) it promises; `None` for
    /// the population certificate.
    #[serde(default)]
    pub batch_inputs: Option<usize>,
}

/// Confidences and correctness of one branch on a calibration split, sorted
/// for counting: how many inputs reach a threshold, and how many of those
/// are wrong, in O(log n) per threshold.
#[derive(Debug, Clone)]
pub struct ConfidenceCounts {
    /// Confidences in descending order.
    sorted: Vec<f64>,
    /// wrong_before[i] = errors among the i most confident inputs.
    wrong_before: Vec<u32>,
}

impl ConfidenceCounts {
    pub fn new(confidences: &[f64], correct: &[bool]) -> Result<Self> {
        if confidences.len() != correct.len() {
            return Err(CoreError::InvalidArgument {
                what: "calibration split".into(),
                reason: format!("{} confidences but {} correctness flags", confidences.len(), correct.len()),
            });
        }
        if let Some(c) = confidences.iter().find(|c| !c.is_finite()) {
            return Err(CoreError::InvalidArgument { what: "confidence".into(), reason: format!("{c} is not a number") });
        }
        let mut order: Vec<usize> = (0..confidences.len()).collect();
        // Descending; ties keep input order (the counts do not depend on it).
        order.sort_by(|&i, &j| confidences[j].total_cmp(&confidences[i]));
        let sorted = order.iter().map(|&i| confidences[i]).collect();
        let mut wrong_before = Vec::with_capacity(order.len() + 1);
        wrong_before.push(0);
        for &i in &order {
            wrong_before.push(wrong_before.last().copied().unwrap_or(0) + u32::from(!correct[i]));
        }
        Ok(Self { sorted, wrong_before })
    }

    /// The counts of one exit's logits: confidence max softmax(z / T), and
    /// whether the predicted class is the label.
    pub fn of_exit(e: &ExitLogits, temperature: f64) -> Result<Self> {
        let (conf, correct): (Vec<f64>, Vec<bool>) = (0..e.len())
            .map(|i| {
                let (class, c) = e.predict(i, temperature);
                (c, class as i64 == e.labels[i])
            })
            .unzip();
        Self::new(&conf, &correct)
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// (inputs with confidence >= `threshold`, errors among them).
    pub fn at(&self, threshold: f64) -> (usize, usize) {
        let n = self.sorted.partition_point(|&c| c >= threshold);
        (n, self.wrong_before[n] as usize)
    }
}

/// Learn-then-Test with fixed-sequence testing over `grid` (descending; see
/// the module doc) on one branch's calibration counts: the population
/// certificate.
pub fn certify(counts: &ConfidenceCounts, target: Target, grid: &[f64]) -> Result<Certificate> {
    let allowed_error = 1.0 - target.accuracy;
    // Reject "error rate > allowed" when seeing at most k errors would be
    // unlikely (<= delta) if the rate were exactly the allowed one.
    let certificate = fixed_sequence(counts, target, grid, |n, k| binomial_cdf(k as u64, n as u64, allowed_error) <= target.delta)?;
    Ok(Certificate { error_upper_bound: clopper_pearson_upper(certificate.errors as u64, certificate.exits as u64, target.delta), ..certificate })
}

/// The batch certificate (module doc): with probability at least
/// `1 - delta`, the inputs that exit among a fresh batch of `batch_inputs`
/// are right at least a fraction `target.accuracy` of the time.
///
/// The exits a batch will have at a threshold are estimated as the
/// calibration split's exit rate there times `batch_inputs`; the batch's own
/// count scatters around that, which the promise does not cover exactly
/// (`resplit_study` measures how well it holds).
pub fn certify_batch(counts: &ConfidenceCounts, target: Target, batch_inputs: usize, grid: &[f64]) -> Result<Certificate> {
    if batch_inputs == 0 {
        return Err(CoreError::InvalidArgument { what: "certified batch".into(), reason: "0 inputs; a batch needs at least 1".into() });
    }
    certify_batch_with(&mut BatchErrorRates::new(target), counts, batch_inputs, grid)
}

fn certify_batch_with(rates: &mut BatchErrorRates, counts: &ConfidenceCounts, batch_inputs: usize, grid: &[f64]) -> Result<Certificate> {
    let target = rates.certified;
    let half = rates.target;
    let scale = batch_inputs as f64 / counts.len().max(1) as f64;
    let certificate = fixed_sequence(counts, target, grid, |n, k| {
        let exits = (n as f64 * scale).round() as u64;
        binomial_cdf(k as u64, n as u64, rates.get(exits)) <= half.delta
    })?;
    Ok(Certificate { error_upper_bound: clopper_pearson_upper(certificate.errors as u64, certificate.exits as u64, half.delta), batch_inputs: Some(batch_inputs), ..certificate })
}

/// Walks `grid` from high to low while `rejected(exits, errors)` holds;
/// the last threshold rejected is certified. Thresholds where nothing exits
/// are never rejected (no evidence).
fn fixed_sequence(counts: &ConfidenceCounts, target: Target, grid: &[f64], mut rejected: impl FnMut(usize, usize) -> bool) -> Result<Certificate> {
    target.validate()?;
    if grid.windows(2).any(|w| w[0] <= w[1]) {
        return Err(CoreError::InvalidArgument { what: "threshold grid".into(), reason: "must be strictly decreasing (tested from high to low)".into() });
    }
    let mut certified: Option<(f64, usize, usize)> = None;
    for &threshold in grid {
        let (n, k) = counts.at(threshold);
        if n == 0 || !rejected(n, k) {
            break;
        }
        certified = Some((threshold, n, k));
    }
    let (threshold, exits, errors) = match certified {
        Some((t, n, k)) => (Some(t), n, k),
        None => (None, 0, 0),
    };
    Ok(Certificate { target, threshold, exits, errors, error_upper_bound: 1.0, inputs: counts.len(), batch_inputs: None })
}

/// The largest population error rate p at which a batch of `exits` inputs,
/// each wrong independently with probability p, still reaches
/// `target.accuracy` with probability at least `1 - target.delta`: the
/// batch may hold at most e errors, the most `offload::reaches_target`
/// allows, so p is where P(Binomial(exits, p) <= e) = 1 - delta. 1 for an
/// empty batch (nothing to break).
pub fn batch_error_rate(exits: u64, target: Target) -> f64 {
    let allowed = exits - crate::offload::fewest_correct(exits as usize, target.accuracy) as u64;
    if exits == 0 || allowed >= exits {
        return 1.0;
    }
    // f(p) = P(Bin(m, p) <= e) - (1 - delta) falls as p grows, and is
    // negative at p = e / m (the median is about e there): Newton's method,
    // kept inside the bracket by bisection, with f'(p) = -m P(Bin(m - 1, p) = e).
    let (m, e) = (exits as f64, allowed as f64);
    let f = |p: f64| binomial_cdf(allowed, exits, p) - (1.0 - target.delta);
    let slope = |p: f64| -(m.ln() + ln_gamma(m) - ln_gamma(e + 1.0) - ln_gamma(m - e) + e * p.ln() + (m - 1.0 - e) * (1.0 - p).ln()).exp();
    let (mut lo, mut hi) = (0.0f64, (e + 1.0) / m);
    let mut p = 0.5 * hi;
    for _ in 0..200 {
        let v = f(p);
        if v >= 0.0 {
            lo = p;
        } else {
            hi = p;
        }
        if hi - lo < 1e-12 {
            break;
        }
        let step = v / slope(p);
        // Newton closes in from one side; once its step is tiny, cross the
        // root on purpose so that the bracket collapses.
        let next = if step.abs() < 1e-13 { p + if v >= 0.0 { 1e-13 } else { -1e-13 } } else { p - step };
        p = if next > lo && next < hi { next } else { 0.5 * (lo + hi) };
    }
    lo
}

/// `batch_error_rate` for one target, remembered per batch size (a
/// certificate asks for many sizes, a re-split study for the same ones
/// again).
pub(crate) struct BatchErrorRates {
    /// The batch certificate's target.
    certified: Target,
    /// Its batch half: delta / 2.
    pub(crate) target: Target,
    known: std::collections::HashMap<u64, f64>,
}

impl BatchErrorRates {
    pub(crate) fn new(certified: Target) -> Self {
        Self { certified, target: Target { delta: certified.delta / 2.0, ..certified }, known: std::collections::HashMap::new() }
    }

    pub(crate) fn get(&mut self, exits: u64) -> f64 {
        let target = self.target;
        *self.known.entry(exits).or_insert_with(|| batch_error_rate(exits, target))
    }
}

/// How often each way of choosing a branch's threshold for a target
/// accuracy `a` broke it, over random re-splits of labelled inputs into a
/// calibration half (where the threshold is chosen) and an evaluation half
/// (where it is judged). A split breaks the target when the evaluation
/// half's edge accuracy is below `a` (decided exactly; a split where
/// nothing exits breaks nothing).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResplitRates {
    pub target: Target,
    pub splits: usize,
    pub uncalibrated: RuleRates,
    pub temperature: RuleRates,
    /// The lowest grid threshold (in sequence) whose calibration-half edge
    /// accuracy reaches `a`, with no bound: tuned on the split, certified by
    /// nothing.
    pub empirical: RuleRates,
    pub certified: RuleRates,
    /// The batch certificate, for a batch the size of the evaluation half.
    pub certified_batch: RuleRates,
}

/// One rule over the re-splits.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RuleRates {
    /// Fraction of splits that broke the target.
    pub violation_rate: f64,
    /// Mean over the splits of the evaluation half's offload rate.
    pub mean_offload_rate: f64,
}

/// The re-split study for one branch: `splits` random halvings (seeded) of
/// `branch`'s labelled inputs. Per split, on the calibration half: the
/// branch's temperature is fit, and the threshold is certified on the
/// temperature-scaled confidences. Rules compared: uncalibrated p_tar = a,
/// temperature-scaled p_tar = a, the empirical threshold (no bound), the
/// certified threshold, and the batch certificate for a batch the size of
/// the evaluation half.
pub fn resplit_study(branch: &ExitLogits, targets: &[Target], splits: usize, seed: u64, grid: &[f64]) -> Result<Vec<ResplitRates>> {
    for t in targets {
        t.validate()?;
    }
    let n = branch.len();
    if n < 4 || splits == 0 {
        return Err(CoreError::InvalidArgument { what: "re-split study".into(), reason: format!("{n} inputs and {splits} splits; need at least 4 and 1") });
    }
    let raw: Vec<(usize, f64)> = (0..n).map(|i| branch.predict(i, 1.0)).collect();
    let correct: Vec<bool> = raw.iter().zip(&branch.labels).map(|(p, &y)| p.0 as i64 == y).collect();
    #[derive(Default, Clone, Copy)]
    struct Tally {
        broken: usize,
        offload: f64,
    }
    let mut tallies = vec![[Tally::default(); 5]; targets.len()];
    let mut batch_rates: Vec<BatchErrorRates> = targets.iter().map(|&t| BatchErrorRates::new(t)).collect();
    for s in 0..splits {
        let order = crate::rng::SplitMix64::new(seed.wrapping_add(s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).permutation(n);
        let (calib, eval) = order.split_at(n / 2);
        let half = ExitLogits {
            classes: branch.classes,
            logits: calib.iter().flat_map(|&i| branch.row(i).iter().copied()).collect(),
            labels: calib.iter().map(|&i| branch.labels[i]).collect(),
        };
        let temperature = crate::calibration::fit_temperature(&[&half])?;
        let scaled: Vec<f64> = (0..n).map(|i| branch.predict(i, temperature).1).collect();
        let counts = ConfidenceCounts::new(&calib.iter().map(|&i| scaled[i]).collect::<Vec<_>>(), &calib.iter().map(|&i| correct[i]).collect::<Vec<_>>())?;
        for (ti, &target) in targets.iter().enumerate() {
            let certified = certify(&counts, target, grid)?.threshold.unwrap_or(f64::INFINITY);
            let batch = certify_batch_with(&mut batch_rates[ti], &counts, eval.len(), grid)?.threshold.unwrap_or(f64::INFINITY);
            let empirical = fixed_sequence(&counts, target, grid, |n, k| crate::offload::reaches_target(n - k, n, target.accuracy))?.threshold.unwrap_or(f64::INFINITY);
            let rules: [(&[f64], f64); 5] = [(&[], target.accuracy), (&scaled, target.accuracy), (&scaled, empirical), (&scaled, certified), (&scaled, batch)];
            for (ri, (conf, threshold)) in rules.iter().enumerate() {
                let (mut e, mut e_ok) = (0usize, 0usize);
                for &i in eval {
                    let c = if conf.is_empty() { raw[i].1 } else { conf[i] };
                    if c >= *threshold {
                        e += 1;
                        e_ok += usize::from(correct[i]);
                    }
                }
                let t = &mut tallies[ti][ri];
                t.broken += usize::from(e > 0 && !crate::offload::reaches_target(e_ok, e, target.accuracy));
                t.offload += 1.0 - e as f64 / eval.len() as f64;
            }
        }
    }
    let rates = |t: Tally| RuleRates { violation_rate: t.broken as f64 / splits as f64, mean_offload_rate: t.offload / splits as f64 };
    Ok(targets
        .iter()
        .zip(tallies)
        .map(|(&target, t)| ResplitRates {
            target,
            splits,
            uncalibrated: rates(t[0]),
            temperature: rates(t[1]),
            empirical: rates(t[2]),
            certified: rates(t[3]),
            certified_batch: rates(t[4]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials_and_half_integers() {
        // Gamma(n) = (n - 1)!; Gamma(1/2) = sqrt(pi).
        let mut fact = 1.0f64;
        for n in 1..30u32 {
            let got = ln_gamma(f64::from(n));
            assert!((got - fact.ln()).abs() < 1e-12 * fact.ln().abs().max(1.0), "n {n}: {got} vs {}", fact.ln());
            fact *= f64::from(n);
        }
        assert!((ln_gamma(0.5) - std::f64::consts::PI.sqrt().ln()).abs() < 1e-13);
        assert!((ln_gamma(1e4) - 82_099.717_496_442_37).abs() < 1e-7, "{}", ln_gamma(1e4));
    }

    #[test]
    fn incomplete_beta_matches_closed_forms() {
        // I_x(1, b) = 1 - (1 - x)^b; I_x(a, 1) = x^a; I_x(a, b) + I_{1-x}(b, a) = 1.
        for &(a, b, x) in &[(1.0f64, 5.0f64, 0.3f64), (1.0, 40.0, 0.01), (7.0, 1.0, 0.8), (3.5, 2.5, 0.6)] {
            let got = beta_inc(a, b, x);
            if a == 1.0 {
                assert!((got - (1.0 - (1.0f64 - x).powf(b))).abs() < 1e-14, "{a} {b} {x}: {got}");
            }
            if b == 1.0 {
                assert!((got - x.powf(a)).abs() < 1e-14, "{a} {b} {x}: {got}");
            }
            assert!((got + beta_inc(b, a, 1.0 - x) - 1.0).abs() < 1e-14);
        }
    }

    /// The binomial CDF as a plain sum of terms, exact enough for checks.
    fn cdf_by_sum(k: u64, n: u64, p: f64) -> f64 {
        let ln_choose = |n: u64, i: u64| ln_gamma(n as f64 + 1.0) - ln_gamma(i as f64 + 1.0) - ln_gamma((n - i) as f64 + 1.0);
        (0..=k).map(|i| (ln_choose(n, i) + i as f64 * p.ln() + (n - i) as f64 * (1.0 - p).ln()).exp()).sum()
    }

    #[test]
    fn the_binomial_cdf_is_the_sum_of_its_terms() {
        for &(k, n, p) in &[(0u64, 10u64, 0.1), (3, 10, 0.25), (5, 100, 0.05), (12, 200, 0.1), (40, 1000, 0.05), (999, 1000, 0.999)] {
            let (got, want) = (binomial_cdf(k, n, p), cdf_by_sum(k, n, p));
            assert!((got - want).abs() < 1e-12 * want.max(1e-300) + 1e-15, "P(Bin({n}, {p}) <= {k}) = {got}, by the sum {want}");
        }
        // Hand-computed: P(Bin(2, 1/2) <= 0) = 1/4, <= 1 = 3/4.
        assert!((binomial_cdf(0, 2, 0.5) - 0.25).abs() < 1e-15 && (binomial_cdf(1, 2, 0.5) - 0.75).abs() < 1e-15);
        assert_eq!((binomial_cdf(5, 5, 0.3), binomial_cdf(0, 5, 0.0), binomial_cdf(2, 5, 1.0)), (1.0, 1.0, 0.0));
    }

    #[test]
    fn clopper_pearson_has_its_closed_forms() {
        // 0 events in n: P(Bin(n, u) <= 0) = (1 - u)^n = delta.
        for &(n, delta) in &[(10u64, 0.05f64), (100, 0.1), (3000, 0.05)] {
            let want = 1.0 - delta.powf(1.0 / n as f64);
            assert!((clopper_pearson_upper(0, n, delta) - want).abs() < 1e-11, "n {n}");
        }
        // n - 1 events in n: 1 - u^n = delta.
        let want = (1.0f64 - 0.05).powf(1.0 / 20.0);
        assert!((clopper_pearson_upper(19, 20, 0.05) - want).abs() < 1e-11);
        assert_eq!((clopper_pearson_upper(0, 0, 0.05), clopper_pearson_upper(7, 7, 0.05)), (1.0, 1.0));
        // The bound is where the tail equals delta.
        let u = clopper_pearson_upper(5, 100, 0.05);
        assert!((cdf_by_sum(5, 100, u) - 0.05).abs() < 1e-9 && u > 0.05, "{u}");
    }

    #[test]
    fn learn_then_test_by_hand() {
        // 20 inputs: confidences 1.00, 0.95, ..., 0.05; the 4 least confident
        // of the top 10 are wrong (0.70, 0.65, 0.60, 0.55), and all below 0.5.
        let conf: Vec<f64> = (0..20).map(|i| 1.0 - 0.05 * f64::from(i)).collect();
        let correct: Vec<bool> = (0..20).map(|i| i < 6).collect();
        let counts = ConfidenceCounts::new(&conf, &correct).unwrap();
        // Thresholds between the confidences, so no count hinges on rounding.
        assert_eq!(counts.at(0.875), (3, 0));
        assert_eq!(counts.at(0.575), (9, 3));
        // Target accuracy 0.5, delta 0.2; grid 0.925, 0.825, 0.725, 0.625.
        // At 0.925: n 2, k 0: P(Bin(2, 0.5) <= 0) = 0.25 > 0.2, not rejected:
        // nothing is certified, however good the lower thresholds look.
        let grid = [0.925, 0.825, 0.725, 0.625];
        let c = certify(&counts, Target { accuracy: 0.5, delta: 0.2 }, &grid).unwrap();
        assert_eq!((c.threshold, c.exits), (None, 0));
        // delta 0.3: 0.925 rejected (0.25); 0.825: n 4, k 0, 1/16; 0.725:
        // n 6, k 0, 1/64; 0.625: n 8, k 2, P(Bin(8, 0.5) <= 2) = 37/256 =
        // 0.1445: all rejected, 0.625 is certified.
        let c = certify(&counts, Target { accuracy: 0.5, delta: 0.3 }, &grid).unwrap();
        assert_eq!((c.threshold, c.exits, c.errors), (Some(0.625), 8, 2));
        assert!((binomial_cdf(2, 8, 0.5) - 37.0 / 256.0).abs() < 1e-15);
        // Accuracy 0.9 (error 0.1), delta 0.3: at 0.925, P(Bin(2, 0.1) <= 0)
        // = 0.81, not rejected.
        assert_eq!(certify(&counts, Target { accuracy: 0.9, delta: 0.3 }, &grid).unwrap().threshold, None);
        assert!(certify(&counts, Target { accuracy: 0.5, delta: 0.3 }, &[0.5, 0.9]).is_err(), "an ascending grid is refused");
        assert!(certify(&counts, Target { accuracy: 1.5, delta: 0.3 }, &grid).is_err());
    }

    /// Inputs of an overconfident branch, two classes: 3 % are easy
    /// (confidence 0.99999, always right); the others have confidence
    /// uniform in [0.5, 0.999) and are right 8 points less often than it
    /// says. At p_tar = 0.9 the edge accuracy is about 0.89, at 0.95 about
    /// 0.92.
    fn overconfident(rng: &mut crate::rng::SplitMix64, n: usize) -> ExitLogits {
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (c, right) = if rng.next_f64() < 0.03 {
                (0.99999, true)
            } else {
                let c = 0.5 + 0.499 * rng.next_f64();
                (c, rng.next_f64() < c - 0.08)
            };
            logits.extend([((c / (1.0 - c)).ln()) as f32, 0.0]);
            labels.push(if right { 0 } else { 1 });
        }
        ExitLogits::new(2, logits, labels).unwrap()
    }

    fn counts_of(e: &ExitLogits) -> ConfidenceCounts {
        ConfidenceCounts::of_exit(e, 1.0).unwrap()
    }

    /// The promise itself: over 200 fresh calibration sets, the certified
    /// threshold's accuracy on a 200,000-input population (standard error
    /// about 0.001) falls below the target in at most delta of them, plus
    /// the sampling error of 200 trials; p_tar = a on the same confidences
    /// misses nearly always.
    #[test]
    fn certificates_hold_against_a_large_population() {
        let mut rng = crate::rng::SplitMix64::new(11);
        let population = counts_of(&overconfident(&mut rng, 200_000));
        let accuracy_at = |t: f64| {
            let (n, k) = population.at(t);
            (n > 0).then(|| 1.0 - k as f64 / n as f64)
        };
        let grid = default_grid();
        for target in [Target { accuracy: 0.9, delta: 0.1 }, Target { accuracy: 0.95, delta: 0.05 }] {
            let trials = 200;
            let (mut broken, mut certified) = (0, 0);
            for _ in 0..trials {
                let calibration = counts_of(&overconfident(&mut rng, 2000));
                let c = certify(&calibration, target, &grid).unwrap();
                if let Some(t) = c.threshold {
                    certified += 1;
                    broken += usize::from(accuracy_at(t).is_some_and(|a| a < target.accuracy));
                }
            }
            let rate = broken as f64 / trials as f64;
            let slack = 2.0 * (target.delta * (1.0 - target.delta) / trials as f64).sqrt();
            assert!(rate <= target.delta + slack, "{target:?}: broken in {broken} of {trials}");
            assert!(certified > trials / 2, "{target:?}: certified in only {certified} of {trials}");
            assert!(accuracy_at(target.accuracy).unwrap() < target.accuracy, "p_tar = a misses on this branch");
        }
    }

    #[test]
    fn batch_error_rates_by_hand() {
        // 5 exits at a = 0.9 may hold no error (4 of 5 is 0.8): (1 - p)^5 = 1 - delta.
        let t = Target { accuracy: 0.9, delta: 0.05 };
        let want = 1.0 - 0.95f64.powf(0.2);
        assert!((batch_error_rate(5, t) - want).abs() < 1e-11, "{} vs {want}", batch_error_rate(5, t));
        // 10 exits may hold 1 error: (1 - p)^10 + 10 p (1 - p)^9 = 0.95 at
        // p = 0.036_771_44 (the closed form solved by bisection, in Python).
        let p = batch_error_rate(10, t);
        assert!(((1.0 - p).powi(10) + 10.0 * p * (1.0 - p).powi(9) - 0.95).abs() < 1e-10, "{p}");
        assert!((p - 0.036_771_44).abs() < 1e-8, "{p}");
        // Large batches tend to the target's own error rate from below.
        let big = [100u64, 1000, 10_000].map(|m| batch_error_rate(m, t));
        assert!(big[0] < big[1] && big[1] < big[2] && big[2] < 0.1 && big[2] > 0.09, "{big:?}");
        for m in [1u64, 37, 400, 7500] {
            let p = batch_error_rate(m, t);
            let allowed = m - crate::offload::fewest_correct(m as usize, 0.9) as u64;
            assert!(binomial_cdf(allowed, m, p) >= 0.95 - 1e-12 && binomial_cdf(allowed, m, p + 1e-9) < 0.95, "m {m}: {p}");
        }
        assert_eq!(batch_error_rate(0, t), 1.0, "an empty batch cannot break the target");
    }

    /// The batch promise: over 200 fresh calibration sets, the batch
    /// certificate's threshold judged on a fresh batch of the same size
    /// breaks the target in at most delta of them, plus the sampling error;
    /// it is never looser than the population certificate.
    #[test]
    fn batch_certificates_hold_on_fresh_batches() {
        let mut rng = crate::rng::SplitMix64::new(23);
        let grid = default_grid();
        // (At a = 0.95 only this branch's easy 3 % qualify, about 120 exits
        // of a batch: too few to promise the batch anything, and nothing is
        // certified.)
        for target in [Target { accuracy: 0.9, delta: 0.1 }, Target { accuracy: 0.9, delta: 0.05 }] {
            let trials = 200;
            let (mut broken, mut certified) = (0, 0);
            for _ in 0..trials {
                let calibration = counts_of(&overconfident(&mut rng, 4000));
                let batch = counts_of(&overconfident(&mut rng, 4000));
                let c = certify_batch(&calibration, target, 4000, &grid).unwrap();
                let population = certify(&calibration, target, &grid).unwrap();
                assert!(c.threshold.unwrap_or(f64::INFINITY) >= population.threshold.unwrap_or(f64::INFINITY), "{c:?} vs {population:?}");
                assert_eq!(c.batch_inputs, Some(4000));
                if let Some(t) = c.threshold {
                    certified += 1;
                    let (n, k) = batch.at(t);
                    broken += usize::from(n > 0 && !crate::offload::reaches_target(n - k, n, target.accuracy));
                }
            }
            let rate = broken as f64 / trials as f64;
            let slack = 2.0 * (target.delta * (1.0 - target.delta) / trials as f64).sqrt();
            assert!(rate <= target.delta + slack, "{target:?}: broken in {broken} of {trials}");
            assert!(certified > trials / 2, "{target:?}: certified in only {certified} of {trials}");
        }
        assert!(certify_batch(&counts_of(&overconfident(&mut rng, 10)), Target { accuracy: 0.9, delta: 0.1 }, 0, &grid).is_err());
    }

    #[test]
    fn the_re_split_study_is_seeded_and_compares_the_rules() {
        let e = overconfident(&mut crate::rng::SplitMix64::new(5), 6000);
        let targets = [Target { accuracy: 0.9, delta: 0.1 }, Target { accuracy: 0.95, delta: 0.05 }];
        let rates = resplit_study(&e, &targets, 50, 5, &default_grid()).unwrap();
        for r in &rates {
            assert!(r.uncalibrated.violation_rate > 0.5, "the overconfident branch misses its target at p_tar = a: {r:?}");
            assert!(r.certified.violation_rate < r.uncalibrated.violation_rate, "{r:?}");
            assert!(r.certified.mean_offload_rate < 1.0, "something is certified: {r:?}");
            let slack = 2.0 * (r.target.delta * (1.0 - r.target.delta) / 50.0).sqrt();
            assert!(r.certified_batch.violation_rate <= r.target.delta + slack, "the batch certificate holds on the evaluation halves: {r:?}");
            assert!(r.certified_batch.mean_offload_rate >= r.certified.mean_offload_rate, "and costs offloading: {r:?}");
            assert!(r.empirical.violation_rate > r.certified.violation_rate, "a threshold tuned on the split with no bound breaks more often: {r:?}");
            assert_eq!(r.splits, 50);
        }
        assert_eq!(rates, resplit_study(&e, &targets, 50, 5, &default_grid()).unwrap(), "seeded: the same study twice");
        assert!(resplit_study(&e, &targets, 0, 5, &default_grid()).is_err());
    }

    #[test]
    fn the_default_grid_falls_from_0_999() {
        let g = default_grid();
        assert_eq!((g.len(), g[0], g[1], g[998]), (999, 0.999, 0.998, 0.001));
        assert!(g.windows(2).all(|w| w[0] > w[1]));
    }
}
