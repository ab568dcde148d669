//! The paper's evaluation of one model: logits on the validation and test
//! splits, temperatures per method, calibration quality per exit, and the
//! offloading sweep per partition branch. Shared by `calibrate` and
//! `evaluate`; all the arithmetic lives in `branchpoint_core`.
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use branchpoint_core::calibration::{self, calibration_metrics, CalibrationFile, CalibrationMetrics, ExitLogits, FitSource, Method};
use branchpoint_core::guarantee::{deployment_study, guarantee_study, plan_grid, BranchAnswers, Deployment, DeploymentRow, GuaranteeRow};
use branchpoint_core::offload::{operating_point, sweep, Decisions, LatencyModel, OperatingPoint, SweepRow};
use branchpoint_core::recalibration::{confidences, quality, select, ConfidenceMap, ConfidenceQuality};
use branchpoint_core::risk::{certify, certify_batch, default_grid, resplit_study, Certificate, ConfidenceCounts, ResplitRates, Target};
use branchpoint_models::model::recorded_split_exit_logits;
use branchpoint_models::{Model, ModelData};
use serde::{Deserialize, Serialize};

/// Per-exit logits of the validation and test splits.
pub struct SplitLogits {
    pub validation: Vec<ExitLogits>,
    pub test: Vec<ExitLogits>,
}

/// The model's answers on both splits, recorded once per model and inputs
/// (`model::recorded_split_exit_logits`).
pub fn split_logits(model: &Model, data: &ModelData) -> Result<SplitLogits> {
    Ok(SplitLogits { validation: recorded_split_exit_logits(model, &data.validation)?, test: recorded_split_exit_logits(model, &data.test)? })
}

/// Fits `method` on the validation logits and describes the fit.
pub fn calibrate(model: &Model, data: &ModelData, method: Method, validation: &[ExitLogits]) -> Result<CalibrationFile> {
    let source = FitSource { model: &model.file_name(), model_sha256: model.sha256(), data: &data.validation_source, split_seed: data.split_seed };
    Ok(calibration::fit_file(method, validation, &model.exit_names(), source)?)
}

/// Network and deadline settings of the latency model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetworkSettings {
    pub uplink_mbit_s: f64,
    pub rtt_ms: f64,
    pub deadline_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub model: String,
    #[serde(alias = "weights_sha256")]
    pub model_sha256: String,
    pub dataset: String,
    pub test_inputs: usize,
    /// The corruption applied to the test images, if any (`--corrupt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_corruption: Option<String>,
    pub validation_inputs: usize,
    pub p_tars: Vec<f64>,
    pub outage_batch: usize,
    /// How a batch with no on-device input counts towards outages.
    pub outage_rule: String,
    pub network: NetworkSettings,
    /// p_tar at which the missed-deadline curve over deadlines is drawn.
    pub deadline_curve_p_tar: f64,
    pub latency: Vec<LatencyModel>,
    pub methods: Vec<MethodReport>,
    /// Calibration methods beyond temperature scaling, per exit.
    pub recalibration: Vec<RecalibrationReport>,
    /// Thresholds for target accuracies: p_tar, temperature-scaled p_tar
    /// and certified.
    pub certified: CertifiedReport,
    /// Certified for the plan chosen; `None` without draws
    /// (`--guarantee-draws 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guarantee: Option<GuaranteeReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodReport {
    pub method: String,
    /// Where the temperatures came from: fit here, or a calibration file.
    pub source: String,
    pub temperatures: Vec<f64>,
    /// Calibration quality per exit on the test set.
    pub exits: Vec<ExitReport>,
    pub branches: Vec<BranchReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitReport {
    pub exit: String,
    pub temperature: f64,
    pub ece_before: f64,
    pub ece_after: f64,
    pub nll_before: f64,
    pub nll_after: f64,
    pub before: CalibrationMetrics,
    pub after: CalibrationMetrics,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BranchReport {
    pub branch: usize,
    pub rows: Vec<SweepRow>,
    /// True when the edge accuracy reaches p_tar at every p_tar of the sweep
    /// that keeps at least one input on the device.
    pub edge_accuracy_meets_p_tar: bool,
    /// The p_tars at which it does not.
    pub p_tars_missed: Vec<f64>,
    /// (deadline ms, fraction of inputs missing it) at `deadline_curve_p_tar`.
    pub missed_deadline_curve: Vec<(f64, f64)>,
}

pub struct SweepSettings<'a> {
    pub p_tars: &'a [f64],
    pub outage_batch: usize,
    pub latency: &'a [LatencyModel],
    pub deadline_ms: f64,
    pub deadline_curve_p_tar: f64,
}

/// Deadlines for the missed-deadline curve: 0 to 1.5x the slowest offload.
pub fn deadline_grid(latency: &[LatencyModel]) -> Vec<f64> {
    let max = latency.iter().map(|l| l.offload_ms()).fold(1.0, f64::max) * 1.5;
    (0..=150).map(|i| max * f64::from(i) / 150.0).collect()
}

pub fn method_report(method: Method, source: String, temperatures: &[f64], logits: &SplitLogits, names: &[String], s: &SweepSettings) -> Result<MethodReport> {
    let exits = names
        .iter()
        .zip(&logits.test)
        .zip(temperatures)
        .map(|((name, e), &t)| {
            let before = calibration_metrics(e, 1.0);
            let after = calibration_metrics(e, t);
            ExitReport { exit: name.clone(), temperature: t, ece_before: before.ece, ece_after: after.ece, nll_before: before.nll, nll_after: after.nll, before, after }
        })
        .collect();
    let final_exit = logits.test.last().expect("a final exit");
    let mut branches = Vec::new();
    for (bi, latency) in s.latency.iter().enumerate() {
        let d = Decisions::new(&logits.test[bi], final_exit, temperatures[bi])?;
        let rows = sweep(&d, s.p_tars, s.outage_batch, latency, s.deadline_ms)?;
        let p_tars_missed: Vec<f64> = rows.iter().filter(|r| r.meets_p_tar == Some(false)).map(|r| r.p_tar).collect();
        let grid = deadline_grid(s.latency);
        let curve = grid.iter().map(|&dl| (dl, branchpoint_core::offload::sweep_row(&d, s.deadline_curve_p_tar, s.outage_batch, latency, dl).missed_deadline_prob)).collect();
        branches.push(BranchReport { branch: bi + 1, edge_accuracy_meets_p_tar: p_tars_missed.is_empty(), p_tars_missed, rows, missed_deadline_curve: curve });
    }
    Ok(MethodReport { method: method.name().into(), source, temperatures: temperatures.to_vec(), exits, branches })
}

/// Writes per-exit logits as CSV: `{split}-{exit}.csv` (exit = branch1,
/// branch2, ..., final), one row per input in dataset order, columns
/// `label,z0,...,z{C-1}` (raw logits, before any temperature).
pub fn dump_logits(dir: &Path, logits: &SplitLogits, names: &[String]) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for (split, exits) in [("validation", &logits.validation), ("test", &logits.test)] {
        for (name, e) in names.iter().zip(exits.iter()) {
            let path = dir.join(format!("{split}-{}.csv", name.replace(' ', "")));
            let file = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let header: Vec<String> = (0..e.classes).map(|c| format!("z{c}")).collect();
            writeln!(w, "label,{}", header.join(","))?;
            for i in 0..e.len() {
                let row: Vec<String> = e.row(i).iter().map(|z| format!("{z:?}")).collect();
                writeln!(w, "{},{}", e.labels[i], row.join(","))?;
            }
            w.flush()?;
            written.push(path);
        }
    }
    Ok(written)
}

/// One exit's calibration methods compared (`models::recalibration`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecalibrationReport {
    pub exit: String,
    /// The method with the lowest two-fold cross-validated ECE on the
    /// validation split.
    pub chosen: String,
    pub methods: Vec<MethodQuality>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodQuality {
    pub method: String,
    /// Mean ECE over the two validation folds, each fit on the other.
    pub cross_validated_ece: f64,
    /// Fit on the whole validation split, judged on the test set.
    pub test: ConfidenceQuality,
    pub fit: ConfidenceMap,
}

/// Every method of `recalibration::METHODS` fit per exit on the validation
/// split and judged on the test set, and the method each exit would choose.
pub fn recalibration_report(logits: &SplitLogits, names: &[String], seed: u64) -> Result<Vec<RecalibrationReport>> {
    names
        .iter()
        .zip(logits.validation.iter().zip(&logits.test))
        .map(|(name, (validation, test))| {
            let selection = select(validation, seed)?;
            let methods = selection
                .cross_validated_ece
                .iter()
                .map(|(method, cv)| {
                    let fit = ConfidenceMap::fit(method, validation)?;
                    Ok(MethodQuality { method: method.clone(), cross_validated_ece: *cv, test: quality(&confidences(&fit, test)), fit })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(RecalibrationReport { exit: name.clone(), chosen: selection.chosen.name().to_string(), methods })
        })
        .collect()
}

/// Thresholds for a target on-device accuracy, three ways, per branch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertifiedReport {
    pub grid: String,
    pub calibration_split: String,
    pub resplits: usize,
    pub resplit_seed: u64,
    pub branches: Vec<CertifiedBranch>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertifiedBranch {
    pub branch: usize,
    /// Per-branch temperature fit on the validation split.
    pub temperature: f64,
    pub rows: Vec<CertifiedRow>,
}

/// One target on one branch: on the test set, p_tar = a uncalibrated and
/// temperature-scaled, and the threshold certified on the validation split;
/// then how often each broke the target over random re-splits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertifiedRow {
    pub target: Target,
    pub uncalibrated: OperatingPoint,
    pub temperature: OperatingPoint,
    pub certificate: Certificate,
    pub certified: OperatingPoint,
    /// The batch certificate for a batch the size of the test set: its
    /// promise is about the test set's own edge accuracy.
    pub batch_certificate: Certificate,
    pub batch_certified: OperatingPoint,
    /// `None` when the report was made without re-splits.
    pub resplit: Option<ResplitRates>,
}

/// Certified for the plan chosen (`core::guarantee`): how often a planner
/// choosing among every certified (branch, threshold) broke its target, and
/// what certifying on the deployment's own audits changes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuaranteeReport {
    pub grid: String,
    /// Per-branch temperatures, fit on the validation split (fixed for
    /// every draw).
    pub temperatures: Vec<f64>,
    pub pool: String,
    pub calibration_inputs: usize,
    pub chooser: String,
    pub draws: usize,
    pub seed: u64,
    pub rows: Vec<GuaranteeRow>,
    pub deployment: String,
    pub audit_rate: f64,
    pub deployment_rows: Vec<DeploymentRow>,
}

/// Audits in the deployment study: the fraction of the test split a
/// watched fleet sends to the cloud as well.
pub const STUDY_AUDIT_RATE: f64 = 0.1;

/// The guarantee study (`core::guarantee::guarantee_study`) on validation +
/// test pooled, and the deployment study with the test split as the
/// deployment, for `targets` over `draws` seeded draws.
pub fn guarantee_report(logits: &SplitLogits, targets: &[Target], draws: usize, seed: u64) -> Result<GuaranteeReport> {
    let branches = logits.test.len() - 1;
    let temperatures: Vec<f64> = logits.validation[..branches].iter().map(|v| calibration::fit_temperature(&[v])).collect::<std::result::Result<_, _>>()?;
    let (final_test, t_final) = (logits.test.last().context("a final exit")?, 1.0);
    let answers = |e: &ExitLogits, t: f64, truth: &dyn Fn(usize) -> i64| {
        let (confidences, correct) = (0..e.len()).map(|i| e.predict(i, t)).enumerate().map(|(i, (class, c))| (c, class as i64 == truth(i))).unzip();
        BranchAnswers { confidences, correct }
    };
    let validation: Vec<BranchAnswers> = (0..branches).map(|b| answers(&logits.validation[b], temperatures[b], &|i| logits.validation[b].labels[i])).collect();
    let test_labels: Vec<BranchAnswers> = (0..branches).map(|b| answers(&logits.test[b], temperatures[b], &|i| logits.test[b].labels[i])).collect();
    let finals: Vec<i64> = (0..final_test.len()).map(|i| final_test.predict(i, t_final).0 as i64).collect();
    let test_agreement: Vec<BranchAnswers> = (0..branches).map(|b| answers(&logits.test[b], temperatures[b], &|i| finals[i])).collect();
    let pool: Vec<BranchAnswers> = validation
        .iter()
        .zip(&test_labels)
        .map(|(v, t)| BranchAnswers { confidences: v.confidences.iter().chain(&t.confidences).copied().collect(), correct: v.correct.iter().chain(&t.correct).copied().collect() })
        .collect();
    let grid = plan_grid();
    let calibration_inputs = logits.validation[0].len();
    Ok(GuaranteeReport {
        grid: "1 - 10^-x for x from 8 down to 3.1 in steps of 0.1, then 0.999 down to 0.001 in steps of 0.001; each branch tested from high to low".into(),
        temperatures,
        pool: format!("validation + test splits, {} labelled inputs", pool[0].confidences.len()),
        calibration_inputs,
        chooser: "the lowest certified threshold of the branch that offloads least on the draw (cloud only when nothing is certified)".into(),
        draws,
        seed,
        rows: guarantee_study(&pool, targets, calibration_inputs, draws, seed, &grid)?,
        deployment: "the test split: certified on the validation split's labels and judged on the test split's; recertified on audits (agreement with the final exit) and judged on the test split's agreement".into(),
        audit_rate: STUDY_AUDIT_RATE,
        deployment_rows: deployment_study(&validation, &Deployment { labels: test_labels, agreement: test_agreement }, targets, STUDY_AUDIT_RATE, draws, seed, &grid)?,
    })
}

/// The certified-threshold comparison for every branch and target.
/// `resplit_targets` selects the targets (by index) that also get the
/// re-split study (it is the slow part).
pub fn certified_report(logits: &SplitLogits, targets: &[Target], resplit_targets: &[usize], resplits: usize, seed: u64, outage_batch: usize) -> Result<CertifiedReport> {
    let grid = default_grid();
    let final_test = logits.test.last().context("a final exit")?;
    let mut branches = Vec::new();
    for b in 0..logits.test.len() - 1 {
        let (validation, test) = (&logits.validation[b], &logits.test[b]);
        let temperature = calibration::fit_temperature(&[validation])?;
        let counts = ConfidenceCounts::of_exit(validation, temperature)?;
        let (raw, scaled) = (Decisions::new(test, final_test, 1.0)?, Decisions::new(test, final_test, temperature)?);
        let pooled = ExitLogits {
            classes: test.classes,
            logits: validation.logits.iter().chain(&test.logits).copied().collect(),
            labels: validation.labels.iter().chain(&test.labels).copied().collect(),
        };
        let chosen: Vec<Target> = resplit_targets.iter().filter_map(|&i| targets.get(i).copied()).collect();
        let study = if resplits > 0 && !chosen.is_empty() { resplit_study(&pooled, &chosen, resplits, seed.wrapping_add(b as u64), &grid)? } else { Vec::new() };
        let mut rows = Vec::new();
        for &target in targets {
            let certificate = certify(&counts, target, &grid)?;
            let batch_certificate = certify_batch(&counts, target, test.len(), &grid)?;
            let a = target.accuracy;
            rows.push(CertifiedRow {
                target,
                uncalibrated: operating_point(&raw, a, a, outage_batch),
                temperature: operating_point(&scaled, a, a, outage_batch),
                certified: operating_point(&scaled, certificate.threshold.unwrap_or(f64::INFINITY), a, outage_batch),
                certificate,
                batch_certified: operating_point(&scaled, batch_certificate.threshold.unwrap_or(f64::INFINITY), a, outage_batch),
                batch_certificate,
                resplit: study.iter().find(|r| r.target == target).copied(),
            });
        }
        branches.push(CertifiedBranch { branch: b + 1, temperature, rows });
    }
    Ok(CertifiedReport {
        grid: "0.999 down to 0.001 in steps of 0.001, tested from high to low".into(),
        calibration_split: "validation split (the per-branch temperature is fit on it too)".into(),
        resplits,
        resplit_seed: seed,
        branches,
    })
}
