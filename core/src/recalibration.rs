//! Calibration methods beyond the paper's temperature scaling, compared per
//! exit on the same validation split:
//!
//! - temperature scaling (`calibration::fit_temperature`): softmax(z / T);
//! - vector scaling (Guo et al., ICML 2017): softmax(w * z + b), one weight
//!   and one bias per class, fit by Newton's method on the validation NLL
//!   (convex in w and b); it can change which class wins;
//! - histogram binning (Zadrozny and Elkan, 2001): the max-softmax
//!   confidence is replaced by the validation accuracy of its bin, with 15
//!   bins of equal validation mass; not monotone, so it can reorder inputs;
//! - isotonic regression (pool-adjacent-violators) of correctness on the
//!   max-softmax confidence: the best non-decreasing map; it can tie inputs
//!   but never reorders them.
//!
//! Scaling that reorders confidences changes which inputs exit, so besides
//! ECE we report failure prediction: the AUROC of confidence for telling
//! correct answers from wrong ones. Each exit's method is chosen by its ECE
//! under two-fold cross-validation within the validation split (a method is
//! never judged on the inputs it was fit on: binning has no error there),
//! then refit on the whole split. Every fit is deterministic.
use serde::{Deserialize, Serialize};

use crate::calibration::{bin_index, fit_temperature, predict, ExitLogits, ReliabilityBin, BINS};
use crate::error::{CoreError, Result};
use crate::rng::SplitMix64;

/// A fitted way of turning one exit's logits into (class, confidence).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum ConfidenceMap {
    /// max softmax(z), as trained.
    Uncalibrated,
    /// max softmax(z / T).
    Temperature { temperature: f64 },
    /// max softmax(w * z + b), elementwise per class.
    Vector { weights: Vec<f64>, biases: Vec<f64> },
    /// max softmax(z) mapped to the accuracy of its bin; `upper[i]` is the
    /// upper edge of bin i (the last is 1).
    Histogram { upper: Vec<f64>, accuracy: Vec<f64> },
    /// max softmax(z) mapped through a non-decreasing step function: the
    /// value of the last knot at or below it (the first knot's below all).
    Isotonic { knots: Vec<f64>, values: Vec<f64> },
}

/// The methods compared, in report order.
pub const METHODS: [&str; 5] = ["uncalibrated", "temperature", "vector", "histogram", "isotonic"];

impl ConfidenceMap {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Uncalibrated => "uncalibrated",
            Self::Temperature { .. } => "temperature",
            Self::Vector { .. } => "vector",
            Self::Histogram { .. } => "histogram",
            Self::Isotonic { .. } => "isotonic",
        }
    }

    /// Fits method `name` (one of `METHODS`) on validation logits.
    pub fn fit(name: &str, validation: &ExitLogits) -> Result<Self> {
        if validation.is_empty() {
            return Err(CoreError::InvalidArgument { what: "validation logits".into(), reason: "none given".into() });
        }
        match name {
            "uncalibrated" => Ok(Self::Uncalibrated),
            "temperature" => Ok(Self::Temperature { temperature: fit_temperature(&[validation])? }),
            "vector" => fit_vector(validation),
            "histogram" => Ok(fit_histogram(&raw_confidences(validation))),
            "isotonic" => Ok(fit_isotonic(&raw_confidences(validation))),
            other => Err(CoreError::InvalidArgument { what: "calibration method".into(), reason: format!("{other:?}; use one of {METHODS:?}") }),
        }
    }

    /// (predicted class, confidence) of one input's logits.
    pub fn apply(&self, logits: &[f32]) -> (usize, f64) {
        match self {
            Self::Uncalibrated => predict(logits, 1.0),
            Self::Temperature { temperature } => predict(logits, *temperature),
            Self::Vector { weights, biases } => {
                let z: Vec<f64> = logits.iter().zip(weights).zip(biases).map(|((&z, w), b)| w * f64::from(z) + b).collect();
                max_softmax(&z)
            }
            Self::Histogram { upper, accuracy } => {
                let (class, c) = predict(logits, 1.0);
                let bin = upper.partition_point(|&u| u < c).min(accuracy.len() - 1);
                (class, accuracy[bin])
            }
            Self::Isotonic { knots, values } => {
                let (class, c) = predict(logits, 1.0);
                let i = knots.partition_point(|&k| k <= c).saturating_sub(1);
                (class, values[i])
            }
        }
    }
}

fn max_softmax(z: &[f64]) -> (usize, f64) {
    let (arg, max) = z.iter().enumerate().fold((0, f64::NEG_INFINITY), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
    let denom: f64 = z.iter().map(|&v| (v - max).exp()).sum();
    (arg, 1.0 / denom)
}

/// (max softmax(z), correct) of every input.
fn raw_confidences(e: &ExitLogits) -> Vec<(f64, bool)> {
    (0..e.len())
        .map(|i| {
            let (class, c) = e.predict(i, 1.0);
            (c, class as i64 == e.labels[i])
        })
        .collect()
}

/// Equal-mass bins of the validation confidences, each mapped to its
/// accuracy.
fn fit_histogram(points: &[(f64, bool)]) -> ConfidenceMap {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = sorted.len();
    let bins = BINS.min(n).max(1);
    let (mut upper, mut accuracy) = (Vec::with_capacity(bins), Vec::with_capacity(bins));
    let mut start = 0;
    for b in 0..bins {
        let mut end = ((b + 1) * n) / bins;
        // A bin ends between two different confidences, so equal ones share it.
        while end < n && end > start && sorted[end].0 == sorted[end - 1].0 {
            end += 1;
        }
        if end <= start {
            continue;
        }
        let right = sorted[start..end].iter().filter(|p| p.1).count();
        upper.push(if end == n { 1.0 } else { sorted[end - 1].0 });
        accuracy.push(right as f64 / (end - start) as f64);
        start = end;
        if start >= n {
            break;
        }
    }
    if let Some(last) = upper.last_mut() {
        *last = 1.0;
    }
    ConfidenceMap::Histogram { upper, accuracy }
}

/// Pool-adjacent-violators: the non-decreasing fit of correctness on
/// confidence that minimises squared error; equal confidences are pooled
/// first, so they always share a value.
fn fit_isotonic(points: &[(f64, bool)]) -> ConfidenceMap {
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Blocks: (lowest confidence, sum of correct, count).
    let mut blocks: Vec<(f64, f64, f64)> = Vec::new();
    for (c, ok) in sorted {
        let y = f64::from(u8::from(ok));
        match blocks.last_mut() {
            Some(last) if last.0 == c => {
                last.1 += y;
                last.2 += 1.0;
            }
            _ => blocks.push((c, y, 1.0)),
        }
        while blocks.len() >= 2 {
            let (a, b) = (blocks[blocks.len() - 2], blocks[blocks.len() - 1]);
            if a.1 / a.2 <= b.1 / b.2 {
                break;
            }
            blocks.pop();
            let merged = blocks.last_mut().expect("two blocks");
            merged.1 += b.1;
            merged.2 += b.2;
        }
    }
    ConfidenceMap::Isotonic { knots: blocks.iter().map(|b| b.0).collect(), values: blocks.iter().map(|b| b.1 / b.2).collect() }
}

/// Vector scaling by damped Newton steps on the mean validation NLL of
/// softmax(w * z + b), from w = 1, b = 0; a tiny ridge (1e-6) keeps the
/// Hessian invertible when a class never occurs.
fn fit_vector(e: &ExitLogits) -> Result<ConfidenceMap> {
    const RIDGE: f64 = 1e-6;
    let c = e.classes;
    let dim = 2 * c;
    let mut theta: Vec<f64> = std::iter::repeat_n(1.0, c).chain(std::iter::repeat_n(0.0, c)).collect();
    let objective = |theta: &[f64]| -> f64 {
        let mut f = 0.0;
        for i in 0..e.len() {
            let row = e.row(i);
            let z: Vec<f64> = (0..c).map(|k| theta[k] * f64::from(row[k]) + theta[c + k]).collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + z.iter().map(|v| (v - max).exp()).sum::<f64>().ln();
            f += lse - z[e.labels[i] as usize];
        }
        let ridge: f64 = (0..c).map(|k| (theta[k] - 1.0).powi(2) + theta[c + k].powi(2)).sum();
        f / e.len() as f64 + 0.5 * RIDGE * ridge
    };
    let mut value = objective(&theta);
    for _ in 0..100 {
        // Gradient and Hessian of the mean NLL in (w, b).
        let mut g = vec![0.0; dim];
        let mut h = vec![0.0; dim * dim];
        for i in 0..e.len() {
            let row = e.row(i);
            let x: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
            let z: Vec<f64> = (0..c).map(|k| theta[k] * x[k] + theta[c + k]).collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut p: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
            let s: f64 = p.iter().sum();
            p.iter_mut().for_each(|v| *v /= s);
            let y = e.labels[i] as usize;
            // d z_k / d w_k = x_k, d z_k / d b_k = 1.
            for k in 0..c {
                let r = p[k] - f64::from(u8::from(k == y));
                g[k] += r * x[k];
                g[c + k] += r;
            }
            for k in 0..c {
                for l in 0..c {
                    let cov = p[k] * (f64::from(u8::from(k == l)) - p[l]);
                    h[k * dim + l] += cov * x[k] * x[l];
                    h[k * dim + c + l] += cov * x[k];
                    h[(c + k) * dim + l] += cov * x[l];
                    h[(c + k) * dim + c + l] += cov;
                }
            }
        }
        let n = e.len() as f64;
        for k in 0..dim {
            g[k] = g[k] / n + RIDGE * (theta[k] - if k < c { 1.0 } else { 0.0 });
        }
        for (idx, v) in h.iter_mut().enumerate() {
            *v /= n;
            if idx / dim == idx % dim {
                *v += RIDGE;
            }
        }
        let Some(step) = solve(&mut h, &g, dim) else { break };
        // Backtracking line search on the objective.
        let mut t = 1.0;
        let mut improved = false;
        while t > 1e-8 {
            let next: Vec<f64> = theta.iter().zip(&step).map(|(a, d)| a - t * d).collect();
            let v = objective(&next);
            if v < value {
                theta = next;
                let gain = value - v;
                value = v;
                improved = gain > 1e-13;
                break;
            }
            t *= 0.5;
        }
        if !improved {
            break;
        }
    }
    if theta.iter().any(|v| !v.is_finite()) {
        return Err(CoreError::InvalidArgument { what: "vector scaling".into(), reason: "the fit diverged".into() });
    }
    Ok(ConfidenceMap::Vector { weights: theta[..c].to_vec(), biases: theta[c..].to_vec() })
}

/// Solves the symmetric system `a x = b` (a is overwritten) by Gaussian
/// elimination with partial pivoting; `None` if it is singular.
fn solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    let mut x = b.to_vec();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i * n + col].abs().total_cmp(&a[j * n + col].abs()))?;
        if a[pivot * n + col].abs() < 1e-300 {
            return None;
        }
        if pivot != col {
            for k in 0..n {
                a.swap(col * n + k, pivot * n + k);
            }
            x.swap(col, pivot);
        }
        for row in col + 1..n {
            let f = a[row * n + col] / a[col * n + col];
            for k in col..n {
                a[row * n + k] -= f * a[col * n + k];
            }
            x[row] -= f * x[col];
        }
    }
    for col in (0..n).rev() {
        let mut v = x[col];
        for k in col + 1..n {
            v -= a[col * n + k] * x[k];
        }
        x[col] = v / a[col * n + col];
    }
    Some(x)
}

/// How well one exit's confidences predict its answers, on one split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfidenceQuality {
    pub accuracy: f64,
    /// Expected calibration error, 15 equal-width bins, (lo, hi].
    pub ece: f64,
    /// Mean (confidence - correct)^2.
    pub brier: f64,
    /// P(a random correct answer has higher confidence than a random wrong
    /// one), ties counting one half: failure prediction. `None` when every
    /// answer is right or every one is wrong.
    pub auroc: Option<f64>,
    /// The reliability diagram's bins (the same 15 as the ECE).
    pub reliability: Vec<ReliabilityBin>,
}

/// (confidence, correct) of every input of `e` under `map`.
pub fn confidences(map: &ConfidenceMap, e: &ExitLogits) -> Vec<(f64, bool)> {
    (0..e.len())
        .map(|i| {
            let (class, c) = map.apply(e.row(i));
            (c, class as i64 == e.labels[i])
        })
        .collect()
}

pub fn quality(points: &[(f64, bool)]) -> ConfidenceQuality {
    let n = points.len().max(1) as f64;
    let mut bins: Vec<ReliabilityBin> =
        (0..BINS).map(|b| ReliabilityBin { lo: b as f64 / BINS as f64, hi: (b + 1) as f64 / BINS as f64, count: 0, mean_confidence: 0.0, accuracy: 0.0 }).collect();
    let (mut right, mut brier) = (0usize, 0.0);
    for &(c, ok) in points {
        let b = &mut bins[bin_index(c, BINS)];
        b.count += 1;
        b.mean_confidence += c;
        b.accuracy += f64::from(u8::from(ok));
        right += usize::from(ok);
        brier += (c - f64::from(u8::from(ok))).powi(2);
    }
    let mut ece = 0.0;
    for b in bins.iter_mut().filter(|b| b.count > 0) {
        b.mean_confidence /= b.count as f64;
        b.accuracy /= b.count as f64;
        ece += b.count as f64 / n * (b.accuracy - b.mean_confidence).abs();
    }
    ConfidenceQuality { accuracy: right as f64 / n, ece, brier: brier / n, auroc: auroc(points), reliability: bins }
}

/// AUROC of confidence for correct vs wrong (Mann-Whitney, ties one half).
pub fn auroc(points: &[(f64, bool)]) -> Option<f64> {
    let positives = points.iter().filter(|p| p.1).count();
    let negatives = points.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut sorted = points.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    // For each group of equal confidences: wrong ones below it count fully
    // for each correct one in it, the wrong ones in it one half.
    let (mut wins, mut wrong_below, mut i) = (0.0, 0usize, 0);
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        let right_here = sorted[i..j].iter().filter(|p| p.1).count();
        let wrong_here = (j - i) - right_here;
        wins += right_here as f64 * (wrong_below as f64 + 0.5 * wrong_here as f64);
        wrong_below += wrong_here;
        i = j;
    }
    Some(wins / (positives as f64 * negatives as f64))
}

/// One exit's comparison: each method's cross-validated ECE on the
/// validation split, the chosen method refit on all of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// (method, mean ECE over the two folds, each fit on the other fold).
    pub cross_validated_ece: Vec<(String, f64)>,
    pub chosen: ConfidenceMap,
}

/// Chooses one exit's method by two-fold cross-validated ECE on its
/// validation logits (folds from a seeded shuffle), then refits it on all of
/// them. Ties go to the method listed first in `METHODS` (the simpler one).
pub fn select(validation: &ExitLogits, seed: u64) -> Result<Selection> {
    let n = validation.len();
    if n < 4 {
        return Err(CoreError::InvalidArgument { what: "validation logits".into(), reason: format!("{n} inputs; need at least 4 to cross-validate") });
    }
    let order = SplitMix64::new(seed).permutation(n);
    let subset = |idx: &[usize]| -> ExitLogits {
        let logits = idx.iter().flat_map(|&i| validation.row(i).iter().copied()).collect();
        let labels = idx.iter().map(|&i| validation.labels[i]).collect();
        ExitLogits { classes: validation.classes, logits, labels }
    };
    let (a, b) = order.split_at(n / 2);
    let folds = [(subset(a), subset(b)), (subset(b), subset(a))];
    let mut cross_validated_ece = Vec::new();
    for name in METHODS {
        let mut sum = 0.0;
        for (fit_on, judge_on) in &folds {
            let map = ConfidenceMap::fit(name, fit_on)?;
            sum += quality(&confidences(&map, judge_on)).ece;
        }
        cross_validated_ece.push((name.to_string(), sum / 2.0));
    }
    let best = cross_validated_ece.iter().enumerate().min_by(|x, y| x.1 .1.total_cmp(&y.1 .1).then(x.0.cmp(&y.0))).map(|(i, _)| i).expect("methods");
    Ok(Selection { chosen: ConfidenceMap::fit(METHODS[best], validation)?, cross_validated_ece })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_by_hand() {
        // Correct at 0.9 and 0.6, wrong at 0.7 and 0.6: pairs (0.9 > 0.7: 1),
        // (0.9 > 0.6: 1), (0.6 < 0.7: 0), (0.6 = 0.6: 1/2): 2.5 / 4.
        let p = [(0.9, true), (0.6, true), (0.7, false), (0.6, false)];
        assert_eq!(auroc(&p), Some(0.625));
        assert_eq!(auroc(&[(0.9, true), (0.1, false)]), Some(1.0));
        assert_eq!(auroc(&[(0.1, true), (0.9, false)]), Some(0.0));
        assert_eq!(auroc(&[(0.9, true), (0.8, true)]), None);
    }

    #[test]
    fn quality_agrees_with_the_calibration_metrics_for_temperatures() {
        let mut rng = SplitMix64::new(4);
        let logits: Vec<f32> = (0..5000).map(|_| (rng.next_f64() * 6.0) as f32).collect();
        let labels: Vec<i64> = (0..500).map(|_| rng.below(10) as i64).collect();
        let e = ExitLogits::new(10, logits, labels).unwrap();
        for t in [1.0, 0.7, 2.5] {
            let q = quality(&confidences(&ConfidenceMap::Temperature { temperature: t }, &e));
            let m = crate::calibration::calibration_metrics(&e, t);
            assert!((q.ece - m.ece).abs() < 1e-12 && (q.accuracy - m.accuracy).abs() < 1e-12, "T {t}: {} vs {}", q.ece, m.ece);
            assert_eq!(q.reliability.iter().map(|b| b.count).collect::<Vec<_>>(), m.reliability.iter().map(|b| b.count).collect::<Vec<_>>());
        }
    }

    #[test]
    fn quality_by_hand() {
        // Two inputs in bin (0.8, 0.8667]: confidence 0.85 each, one right:
        // ECE |0.5 - 0.85| = 0.35; Brier ((0.15)^2 + (0.85)^2) / 2.
        let q = quality(&[(0.85, true), (0.85, false)]);
        assert!((q.ece - 0.35).abs() < 1e-12 && (q.brier - (0.0225 + 0.7225) / 2.0).abs() < 1e-12 && q.accuracy == 0.5, "{q:?}");
    }

    #[test]
    fn isotonic_pools_violators() {
        // (0.6, wrong), (0.7, right), (0.8, wrong), (0.9, right): 0.7 and 0.8
        // violate; pooled to 0.5.
        let m = fit_isotonic(&[(0.8, false), (0.6, false), (0.9, true), (0.7, true)]);
        assert_eq!(m, ConfidenceMap::Isotonic { knots: vec![0.6, 0.7, 0.9], values: vec![0.0, 0.5, 1.0] });
        // Applied through the logits' confidence: two classes, softmax.
        let logit_for = |c: f64| [((c / (1.0 - c)).ln()) as f32, 0.0];
        assert_eq!(m.apply(&logit_for(0.75)).1, 0.5, "between knots 0.7 and 0.9: the value at 0.7");
        assert_eq!(m.apply(&logit_for(0.95)).1, 1.0);
        assert_eq!(m.apply(&logit_for(0.55)).1, 0.0, "below the first knot: its value");
    }

    #[test]
    fn histogram_bins_have_equal_mass_and_their_accuracy() {
        // 30 inputs: confidences 0.01..0.30; the top 10 right. 15 bins of 2.
        let pts: Vec<(f64, bool)> = (1..=30).map(|i| (f64::from(i) / 100.0, i > 20)).collect();
        let ConfidenceMap::Histogram { upper, accuracy } = fit_histogram(&pts) else { panic!() };
        assert_eq!(upper.len(), 15);
        assert!((upper[0] - 0.02).abs() < 1e-12 && upper[14] == 1.0, "{upper:?}");
        assert_eq!(&accuracy[9..], &[0.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn vector_scaling_fixes_a_class_bias_and_is_deterministic() {
        // Class 1's logit is inflated by 2: vector scaling learns to remove
        // it; temperature scaling cannot.
        let mut rng = SplitMix64::new(3);
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..2000 {
            let y = rng.below(3) as usize;
            let mut z = [0.0f32; 3];
            for (k, v) in z.iter_mut().enumerate() {
                *v = (rng.next_f64() * 2.0) as f32 + if k == y { 2.0 } else { 0.0 };
            }
            z[1] += 2.0;
            logits.extend(z);
            labels.push(y as i64);
        }
        let e = ExitLogits::new(3, logits, labels).unwrap();
        let v = ConfidenceMap::fit("vector", &e).unwrap();
        let ConfidenceMap::Vector { biases, .. } = &v else { panic!() };
        assert!(biases[1] - biases[0] < -1.0 && biases[1] - biases[2] < -1.0, "class 1 is pushed down: {biases:?}");
        let acc = |m: &ConfidenceMap| quality(&confidences(m, &e)).accuracy;
        assert!(acc(&v) > acc(&ConfidenceMap::Uncalibrated) + 0.05, "{} vs {}", acc(&v), acc(&ConfidenceMap::Uncalibrated));
        assert_eq!(v, ConfidenceMap::fit("vector", &e).unwrap(), "the same fit twice");
    }

    #[test]
    fn selection_is_cross_validated_and_deterministic() {
        // An overconfident exit: logits twice as sharp as the truth.
        let mut rng = SplitMix64::new(9);
        let (mut logits, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..3000 {
            let z: Vec<f32> = (0..4).map(|_| (rng.next_f64() * 3.0) as f32).collect();
            // Sample the label from softmax(z), then report 2z.
            let w: Vec<f64> = z.iter().map(|&v| f64::from(v).exp()).collect();
            let mut u = rng.next_f64() * w.iter().sum::<f64>();
            let y = w.iter().position(|&x| {
                u -= x;
                u <= 0.0
            });
            labels.push(y.unwrap_or(3) as i64);
            logits.extend(z.iter().map(|v| 2.0 * v));
        }
        let e = ExitLogits::new(4, logits, labels).unwrap();
        let s = select(&e, 1).unwrap();
        let ece = |name: &str| s.cross_validated_ece.iter().find(|(n, _)| n == name).unwrap().1;
        assert!(ece("temperature") < ece("uncalibrated") / 2.0, "{:?}", s.cross_validated_ece);
        assert_ne!(s.chosen.name(), "uncalibrated");
        assert_eq!(s, select(&e, 1).unwrap());
        if let ConfidenceMap::Temperature { temperature } = ConfidenceMap::fit("temperature", &e).unwrap() {
            assert!((temperature - 2.0).abs() < 0.2, "T recovers the sharpening: {temperature}");
        }
    }
}
