//! Temperature scaling (Guo et al., ICML 2017) and calibration metrics, as
//! pure computation on plain logits.
//!
//! Fitting: choose T > 0 minimising the mean negative log-likelihood of the
//! validation labels under softmax(z / T). With beta = 1 / T the NLL is
//! f(beta) = mean_i [logsumexp(beta z_i) - beta z_i,y_i], convex in beta, with
//! f'(beta) = mean_i [E_p[z_i] - z_i,y_i] (increasing) and
//! f''(beta) = mean_i Var_p[z_i] >= 0. We find the root of f' on beta > 0 by
//! safeguarded Newton steps inside a bracket that always holds it, so T > 0
//! is enforced by construction, and stop when the bracket (or the Newton
//! step) is below `TOLERANCE` relative to beta.
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// Relative tolerance on beta = 1/T at which the fit stops.
pub const TOLERANCE: f64 = 1e-10;
/// Equal-width confidence bins for ECE, MCE and reliability diagrams.
pub const BINS: usize = 15;

/// Logits of one exit over a dataset, row-major [n, classes], with labels.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitLogits {
    pub classes: usize,
    pub logits: Vec<f32>,
    pub labels: Vec<i64>,
}

impl ExitLogits {
    pub fn new(classes: usize, logits: Vec<f32>, labels: Vec<i64>) -> Result<Self> {
        if classes < 2 || logits.len() != classes * labels.len() {
            return Err(CoreError::InvalidArgument { what: "logits".into(), reason: format!("{} values for {} labels of {classes} classes", logits.len(), labels.len()) });
        }
        if let Some(bad) = labels.iter().find(|&&y| y < 0 || y as usize >= classes) {
            return Err(CoreError::InvalidArgument { what: "labels".into(), reason: format!("label {bad} outside 0..{classes}") });
        }
        Ok(Self { classes, logits, labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.classes..(i + 1) * self.classes]
    }

    /// (predicted class, confidence = max softmax(z / T)) of input i.
    pub fn predict(&self, i: usize, temperature: f64) -> (usize, f64) {
        predict(self.row(i), temperature)
    }
}

/// (predicted class, confidence = max softmax(z / T)) of one input's logits.
/// The one definition of a calibrated confidence: the offline evaluation and
/// the devices both call it, so they make the same decisions.
pub fn predict(logits: &[f32], temperature: f64) -> (usize, f64) {
    let (arg, &max) = logits.iter().enumerate().fold((0, &f32::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
    let max = f64::from(max);
    // max softmax = 1 / sum_j exp((z_j - z_max) / T)
    let denom: f64 = logits.iter().map(|&z| ((f64::from(z) - max) / temperature).exp()).sum();
    (arg, 1.0 / denom)
}

/// Mean NLL of the labels under softmax(beta z), and its first two
/// derivatives in beta.
fn nll_and_derivatives(exits: &[&ExitLogits], beta: f64) -> (f64, f64, f64) {
    let (mut f, mut d1, mut d2, mut n) = (0.0, 0.0, 0.0, 0usize);
    for e in exits {
        for i in 0..e.len() {
            let row = e.row(i);
            let zy = f64::from(row[e.labels[i] as usize]);
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(f64::from(z)));
            let (mut s, mut s_z, mut s_zz) = (0.0, 0.0, 0.0);
            for &z in row {
                let z = f64::from(z);
                let w = (beta * (z - max)).exp();
                s += w;
                s_z += w * z;
                s_zz += w * z * z;
            }
            let mean_z = s_z / s;
            f += beta * max + s.ln() - beta * zy;
            d1 += mean_z - zy;
            d2 += (s_zz / s - mean_z * mean_z).max(0.0);
            n += 1;
        }
    }
    let n = n.max(1) as f64;
    (f / n, d1 / n, d2 / n)
}

/// Mean NLL of the labels under softmax(z / T), pooled over `exits`.
pub fn nll(exits: &[&ExitLogits], temperature: f64) -> f64 {
    nll_and_derivatives(exits, 1.0 / temperature).0
}

/// The temperature minimising the validation NLL pooled over `exits` (one
/// exit for per-branch scaling, all exits for global scaling).
pub fn fit_temperature(exits: &[&ExitLogits]) -> Result<f64> {
    let n: usize = exits.iter().map(|e| e.len()).sum();
    if n == 0 {
        return Err(CoreError::InvalidArgument { what: "validation logits".into(), reason: "none given".into() });
    }
    let grad = |b: f64| nll_and_derivatives(exits, b).1;
    // Bracket the root of the increasing f' in (lo, hi).
    let (mut lo, mut hi) = (1e-3, 1.0);
    if grad(lo) >= 0.0 {
        return Err(CoreError::InvalidArgument {
            what: "validation logits".into(),
            reason: "the NLL keeps falling as T grows without bound (the predictions are no better than chance); no finite temperature fits".into(),
        });
    }
    while grad(hi) < 0.0 {
        lo = hi;
        hi *= 2.0;
        if hi > 1e6 {
            // f' < 0 up to beta = 1e6: the data is perfectly separated and
            // the NLL keeps falling as T -> 0. Return the smallest T tried.
            return Ok(1.0 / hi);
        }
    }
    let mut beta = 1.0f64.clamp(lo, hi);
    for _ in 0..200 {
        let (_, d1, d2) = nll_and_derivatives(exits, beta);
        if d1 < 0.0 {
            lo = beta
        } else {
            hi = beta
        }
        let newton = if d2 > 0.0 { beta - d1 / d2 } else { f64::NAN };
        let next = if newton.is_finite() && newton > lo && newton < hi { newton } else { 0.5 * (lo + hi) };
        let step = (next - beta).abs();
        beta = next;
        if step <= TOLERANCE * beta || (hi - lo) <= TOLERANCE * beta {
            break;
        }
    }
    Ok(1.0 / beta)
}

/// One bin of a reliability diagram, (lo, hi].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    pub lo: f64,
    pub hi: f64,
    pub count: usize,
    /// Mean confidence of the inputs in the bin (0 when empty).
    pub mean_confidence: f64,
    /// Fraction correct of the inputs in the bin (0 when empty).
    pub accuracy: f64,
}

/// Everything the evaluation reports about one exit at one temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationMetrics {
    pub temperature: f64,
    pub accuracy: f64,
    pub nll: f64,
    /// Expected calibration error: sum_b |b|/n * |acc(b) - conf(b)|.
    pub ece: f64,
    /// Maximum calibration error: max over non-empty bins of |acc(b) - conf(b)|.
    pub mce: f64,
    /// Multi-class Brier score: mean_i sum_c (p_ic - 1[c = y_i])^2.
    pub brier: f64,
    pub reliability: Vec<ReliabilityBin>,
}

/// Index of the (lo, hi] bin of `bins` equal-width bins that `c` falls in.
pub fn bin_index(c: f64, bins: usize) -> usize {
    ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1
}

pub fn calibration_metrics(e: &ExitLogits, temperature: f64) -> CalibrationMetrics {
    let n = e.len();
    let mut bins: Vec<ReliabilityBin> =
        (0..BINS).map(|b| ReliabilityBin { lo: b as f64 / BINS as f64, hi: (b + 1) as f64 / BINS as f64, count: 0, mean_confidence: 0.0, accuracy: 0.0 }).collect();
    let (mut correct, mut brier) = (0usize, 0.0);
    let mut probs = vec![0.0; e.classes];
    for i in 0..n {
        let row = e.row(i);
        let y = e.labels[i] as usize;
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &z| m.max(f64::from(z)));
        let mut s = 0.0;
        for (p, &z) in probs.iter_mut().zip(row) {
            *p = ((f64::from(z) - max) / temperature).exp();
            s += *p;
        }
        let (mut arg, mut conf) = (0, -1.0);
        for (c, p) in probs.iter_mut().enumerate() {
            *p /= s;
            if *p > conf {
                conf = *p;
                arg = c;
            }
            let t = if c == y { 1.0 } else { 0.0 };
            brier += (*p - t) * (*p - t);
        }
        let ok = arg == y;
        correct += usize::from(ok);
        let b = &mut bins[bin_index(conf, BINS)];
        b.count += 1;
        b.mean_confidence += conf;
        b.accuracy += f64::from(u8::from(ok));
    }
    let (mut ece, mut mce) = (0.0, 0.0f64);
    for b in bins.iter_mut().filter(|b| b.count > 0) {
        b.mean_confidence /= b.count as f64;
        b.accuracy /= b.count as f64;
        let gap = (b.accuracy - b.mean_confidence).abs();
        ece += b.count as f64 / n.max(1) as f64 * gap;
        mce = mce.max(gap);
    }
    CalibrationMetrics { temperature, accuracy: correct as f64 / n.max(1) as f64, nll: nll(&[e], temperature), ece, mce, brier: brier / n.max(1) as f64, reliability: bins }
}

/// How temperatures are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// T = 1 for every exit.
    Uncalibrated,
    /// One T for all exits, minimising the validation NLL summed over all
    /// exits (every exit's logits of every validation input, pooled).
    Global,
    /// One T per exit, each minimising that exit's validation NLL.
    PerBranch,
}

impl Method {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "uncalibrated" | "none" => Ok(Self::Uncalibrated),
            "global" => Ok(Self::Global),
            "per-branch" => Ok(Self::PerBranch),
            other => Err(CoreError::InvalidArgument { what: "calibration method".into(), reason: format!("{other:?}; use global or per-branch") }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Uncalibrated => "uncalibrated",
            Self::Global => "global",
            Self::PerBranch => "per-branch",
        }
    }
}

/// Temperatures for every exit (branches in order, then final) by `method`,
/// fit on validation logits.
pub fn fit(method: Method, validation: &[ExitLogits]) -> Result<Vec<f64>> {
    match method {
        Method::Uncalibrated => Ok(vec![1.0; validation.len()]),
        Method::Global => {
            let all: Vec<&ExitLogits> = validation.iter().collect();
            Ok(vec![fit_temperature(&all)?; validation.len()])
        }
        Method::PerBranch => validation.iter().map(|e| fit_temperature(&[e])).collect(),
    }
}

/// Checks temperatures supplied from outside (a file, a message).
pub fn check_temperatures(temperatures: &[f64], num_exits: usize) -> Result<()> {
    if temperatures.len() != num_exits {
        return Err(CoreError::InvalidArgument {
            what: "temperatures".into(),
            reason: format!("{} given, the model has {num_exits} exits (branches, then final)", temperatures.len()),
        });
    }
    if let Some(t) = temperatures.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        return Err(CoreError::InvalidArgument { what: "temperature".into(), reason: format!("{t} is not a positive finite number; temperatures must be > 0") });
    }
    Ok(())
}

/// Fits `method` on validation logits and describes the fit: the
/// calibration file for weights `model` (file name) with digest `sha256`.
/// What a calibration file records of the model and the inputs it was fit on.
#[derive(Debug, Clone, Copy)]
pub struct FitSource<'a> {
    /// The model's file name (weights or card).
    pub model: &'a str,
    /// The model's SHA-256, as the wire names it.
    pub model_sha256: &'a str,
    /// The validation inputs, in words.
    pub data: &'a str,
    /// The seed of the train/validation split (0 for data the user brought).
    pub split_seed: u64,
}

pub fn fit_file(method: Method, validation: &[ExitLogits], exit_names: &[String], source: FitSource) -> Result<CalibrationFile> {
    let temperatures = fit(method, validation)?;
    let exits = exit_names
        .iter()
        .zip(validation)
        .zip(&temperatures)
        .map(|((name, e), &t)| {
            let (before, after) = (calibration_metrics(e, 1.0), calibration_metrics(e, t));
            ExitCalibration { exit: name.clone(), temperature: t, nll_before: before.nll, nll_after: after.nll, ece_before: before.ece, ece_after: after.ece }
        })
        .collect();
    Ok(CalibrationFile {
        model: source.model.to_string(),
        model_sha256: source.model_sha256.to_string(),
        method,
        temperatures,
        fit: FitInfo {
            data: source.data.to_string(),
            inputs: validation.first().map_or(0, |e| e.len()),
            split_seed: source.split_seed,
            tolerance: TOLERANCE,
            objective: method.objective().into(),
        },
        exits,
    })
}

/// A calibration file: the temperatures of one model, how they were fit,
/// and the per-exit NLL and ECE on the validation split before and after.
/// Written by `branchpoint calibrate`, read by `evaluate` and the devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationFile {
    /// Weights file name the temperatures were fit for.
    pub model: String,
    /// The SHA-256 of the weights it was fit for (older files:
    /// `weights_sha256`).
    #[serde(alias = "weights_sha256")]
    pub model_sha256: String,
    pub method: Method,
    /// One temperature per exit: branches in order, then final.
    pub temperatures: Vec<f64>,
    pub fit: FitInfo,
    pub exits: Vec<ExitCalibration>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitInfo {
    /// Which data the temperatures were fit on.
    pub data: String,
    pub inputs: usize,
    pub split_seed: u64,
    /// Relative tolerance on 1/T at which the fit stopped.
    pub tolerance: f64,
    /// Which logits the fit pooled.
    pub objective: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitCalibration {
    pub exit: String,
    pub temperature: f64,
    pub nll_before: f64,
    pub nll_after: f64,
    pub ece_before: f64,
    pub ece_after: f64,
}

impl Method {
    /// What the fit of this method minimises, in words for files and reports.
    pub fn objective(self) -> &'static str {
        match self {
            Self::Uncalibrated => "none: T = 1 for every exit",
            Self::Global => "one T minimising the validation NLL summed over all exits (every exit's logits of every validation input, pooled)",
            Self::PerBranch => "one T per exit minimising that exit's validation NLL",
        }
    }
}

impl CalibrationFile {
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let bad = |reason: String| CoreError::InvalidArgument { what: format!("calibration file {}", path.display()), reason };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("{e}; write one with `branchpoint calibrate`")))?;
        let file: CalibrationFile = serde_json::from_str(&text).map_err(|e| bad(format!("not a calibration file ({e})")))?;
        check_temperatures(&file.temperatures, file.temperatures.len().max(1)).map_err(|e| bad(e.to_string()))?;
        Ok(file)
    }

    /// Checks that this file fits a model with `num_exits` exits and weights
    /// digest `sha256`.
    pub fn check_fits(&self, num_exits: usize, sha256: &str) -> Result<()> {
        check_temperatures(&self.temperatures, num_exits)?;
        if self.model_sha256 != sha256 {
            return Err(CoreError::InvalidArgument {
                what: "calibration file".into(),
                reason: format!("it was fit for weights {} with SHA-256 {}, not this model's {sha256}; refit with `branchpoint calibrate`", self.model, self.model_sha256),
            });
        }
        Ok(())
    }

    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).expect("calibration file serialises");
        std::fs::write(path, text + "\n").map_err(|error| CoreError::Io { action: "write", path: path.to_path_buf(), error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Labels drawn from softmax(u) for random u, while the model reports
    /// z = u * T_true: softmax(z / T_true) is the true distribution, so the
    /// NLL-optimal temperature is T_true.
    fn synthetic(n: usize, classes: usize, t_true: f64, seed: u64) -> ExitLogits {
        let mut rng = SplitMix64::new(seed);
        let mut unif = move || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for _ in 0..n {
            let u: Vec<f64> = (0..classes).map(|_| 4.0 * (unif() - 0.5) * 2.0).collect();
            let m = u.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = u.iter().map(|x| (x - m).exp()).collect();
            let s: f64 = p.iter().sum();
            let mut r = unif() * s;
            let mut y = classes - 1;
            for (c, pc) in p.iter().enumerate() {
                if r < *pc {
                    y = c;
                    break;
                }
                r -= pc;
            }
            labels.push(y as i64);
            logits.extend(u.iter().map(|x| (x * t_true) as f32));
        }
        ExitLogits::new(classes, logits, labels).unwrap()
    }

    #[test]
    fn fitting_recovers_a_known_temperature_within_one_percent() {
        for (t_true, seed) in [(2.5, 1), (0.6, 2), (1.0, 3)] {
            let e = synthetic(50_000, 10, t_true, seed);
            let t = fit_temperature(&[&e]).unwrap();
            assert!((t / t_true - 1.0).abs() < 0.01, "true T {t_true}, fitted {t}");
        }
    }

    #[test]
    fn the_fit_is_a_minimum_of_the_nll() {
        let e = synthetic(5_000, 10, 1.7, 9);
        let t = fit_temperature(&[&e]).unwrap();
        let at = nll(&[&e], t);
        for f in [0.9, 0.99, 0.999, 1.001, 1.01, 1.1] {
            assert!(nll(&[&e], t * f) >= at - 1e-12, "T*{f} beats the fit");
        }
    }

    #[test]
    fn per_branch_scaling_never_raises_validation_nll() {
        let exits = vec![synthetic(3_000, 10, 3.0, 4), synthetic(3_000, 10, 0.5, 5), synthetic(3_000, 10, 1.0, 6)];
        let temps = fit(Method::PerBranch, &exits).unwrap();
        for (e, t) in exits.iter().zip(&temps) {
            assert!(nll(&[e], *t) <= nll(&[e], 1.0) + 1e-12, "T = {t}");
        }
        // Global scaling never raises the NLL pooled over the exits.
        let global = fit(Method::Global, &exits).unwrap();
        assert!(global.iter().all(|t| *t == global[0]), "one T for all exits");
        let all: Vec<&ExitLogits> = exits.iter().collect();
        assert!(nll(&all, global[0]) <= nll(&all, 1.0) + 1e-12);
    }

    #[test]
    fn metrics_of_a_hand_computed_case() {
        // Two classes. Input 0: logits (ln 3, 0) -> p = (0.75, 0.25), label 0.
        // Input 1: same logits, label 1. Confidence 0.75 for both, one right.
        let l = 3f32.ln();
        let e = ExitLogits::new(2, vec![l, 0.0, l, 0.0], vec![0, 1]).unwrap();
        let m = calibration_metrics(&e, 1.0);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        assert!((m.ece - 0.25).abs() < 1e-6, "{}", m.ece);
        assert!((m.mce - 0.25).abs() < 1e-6);
        // Brier: (0.25^2 + 0.25^2 + 0.75^2 + 0.75^2) / 2 = 0.625
        assert!((m.brier - 0.625).abs() < 1e-6, "{}", m.brier);
        assert!((m.nll - (-(0.75f64.ln()) - 0.25f64.ln()) / 2.0).abs() < 1e-6);
        let b = &m.reliability[bin_index(0.75, BINS)];
        assert_eq!(b.count, 2);
        assert!((b.mean_confidence - 0.75).abs() < 1e-6 && (b.accuracy - 0.5).abs() < 1e-12);
        assert_eq!(m.reliability.iter().map(|b| b.count).sum::<usize>(), 2);
    }

    #[test]
    fn bins_are_left_open_right_closed() {
        assert_eq!(bin_index(1.0, 15), 14);
        assert_eq!(bin_index(1.0 / 15.0, 15), 0);
        assert_eq!(bin_index(1.0 / 15.0 + 1e-12, 15), 1);
        assert_eq!(bin_index(0.5, 10), 4);
        assert_eq!(bin_index(0.0, 15), 0);
    }

    #[test]
    fn a_calibrated_synthetic_model_has_near_zero_ece() {
        let e = synthetic(50_000, 10, 1.0, 11);
        let m = calibration_metrics(&e, 1.0);
        assert!(m.ece < 0.01, "ECE {}", m.ece);
    }

    #[test]
    fn bad_temperatures_are_refused() {
        assert!(check_temperatures(&[1.0, 2.0, 0.5], 3).is_ok());
        let e = check_temperatures(&[1.0, 2.0], 3).unwrap_err().to_string();
        assert!(e.contains("2 given") && e.contains("3 exits"), "{e}");
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let e = check_temperatures(&[1.0, bad, 1.0], 3).unwrap_err().to_string();
            assert!(e.contains("must be > 0"), "{e}");
        }
    }
}
