//! `branchpoint evaluate`: per-exit test metrics beside the model card, then
//! the paper's evaluation for uncalibrated, global and per-branch
//! temperature scaling: calibration quality per exit and the offloading
//! sweep per partition branch, as a table, a JSON report and PNG plots.
use std::path::Path;

use anyhow::{bail, Context, Result};
use branchpoint_core::calibration::{self, CalibrationFile, Method};
use branchpoint_core::costs::ComputeProfile;
use branchpoint_core::offload::{check_p_tar, default_p_tars, LatencyModel};
use branchpoint_models::profile::profile;
use branchpoint_models::{Model, ModelData};

use crate::cli::EvaluateArgs;
use crate::evaluation::{
    certified_report, dump_logits, guarantee_report, method_report, recalibration_report, split_logits, GuaranteeReport, MethodReport, NetworkSettings, Report, SweepSettings,
};
use branchpoint_core::risk::Target;
use plotters::prelude::SeriesLabelPosition;

use crate::plots::{line_plot, method_color, prepare_dir, reliability_diagram, Curve, LinePlot};
use crate::{parse_device, set_threads};

pub fn run(args: EvaluateArgs) -> Result<()> {
    // Check every number a user gave before any slow work.
    let p_tars = args.p_tars.clone().unwrap_or_else(default_p_tars);
    if p_tars.is_empty() {
        bail!("--p-tars: give at least one target");
    }
    for &p in p_tars.iter().chain([&args.deadline_curve_p_tar]) {
        check_p_tar(p)?;
    }
    if args.outage_batch == 0 {
        bail!("--outage-batch must be at least 1");
    }
    let corruption = args.corrupt.as_deref().map(branchpoint_core::corrupt::Corruption::parse).transpose().context("--corrupt")?;
    if args.certify_accuracy.is_empty() || args.certify_delta.is_empty() {
        bail!("--certify-accuracy and --certify-delta: give at least one value each");
    }
    let mut targets: Vec<Target> = args.certify_accuracy.iter().flat_map(|&accuracy| args.certify_delta.iter().map(move |&delta| Target { accuracy, delta })).collect();
    for t in &targets {
        t.validate().with_context(|| format!("--certify-accuracy {} / --certify-delta {}", t.accuracy, t.delta))?;
    }
    let resplit_targets: Vec<usize> = (0..targets.len()).collect();
    let study_targets = targets.clone();
    // The plot over the sweep: every p_tar as a target, at the smallest delta.
    let plot_delta = args.certify_delta.iter().copied().fold(1.0, f64::min);
    for &accuracy in &p_tars {
        let t = Target { accuracy, delta: plot_delta };
        if !targets.contains(&t) {
            targets.push(t);
        }
    }
    for (flag, v, positive) in [("--uplink-mbit-s", args.uplink_mbit_s, true), ("--rtt-ms", args.rtt_ms, false), ("--deadline-ms", args.deadline_ms, false)] {
        if !v.is_finite() || v < 0.0 || (positive && v == 0.0) {
            bail!("{flag} {v}: give a {} number", if positive { "positive" } else { "non-negative" });
        }
    }
    let device = parse_device(&args.compute.device)?;
    set_threads(args.compute.threads)?;
    let model = args.source.load_model(device)?;
    let num_exits = model.num_exits();
    let calibration_file = match &args.calibration {
        Some(path) => {
            let file = CalibrationFile::read(path)?;
            file.check_fits(num_exits, model.sha256()).with_context(|| format!("calibration file {}", path.display()))?;
            Some((path.clone(), file))
        }
        None => None,
    };
    let latency = latency_models(&model, &args)?;

    let mut data = args.source.load_data(&model)?;
    if let Some(c) = corruption {
        data.test.images = branchpoint_models::corrupt::apply(&c, &data.test.images, model.normalization(), args.corrupt_seed, 0)?;
        println!("test images corrupted: {c}, seed {}; calibration fits on the clean validation split", args.corrupt_seed);
    }
    let logits = split_logits(&model, &data)?;
    let names = model.exit_names();

    print_exit_table(&args.source.model, &model, &data, &logits.test, &names);

    let settings =
        SweepSettings { p_tars: &p_tars, outage_batch: args.outage_batch, latency: &latency, deadline_ms: args.deadline_ms, deadline_curve_p_tar: args.deadline_curve_p_tar };
    let mut methods = Vec::new();
    for method in [Method::Uncalibrated, Method::Global, Method::PerBranch] {
        let (temps, source) = match &calibration_file {
            Some((path, file)) if file.method == method => (file.temperatures.clone(), format!("calibration file {}", path.display())),
            _ if method == Method::Uncalibrated => (vec![1.0; num_exits], "T = 1".to_string()),
            _ => (calibration::fit(method, &logits.validation)?, "fit on the validation split".to_string()),
        };
        methods.push(method_report(method, source, &temps, &logits, &names, &settings)?);
    }
    let report = Report {
        model: model.file_name(),
        model_sha256: model.sha256().to_string(),
        dataset: model.dataset().map_or_else(|| data.test_source.clone(), |kind| kind.name().to_string()),
        test_inputs: data.test.len(),
        test_corruption: corruption.map(|c| c.to_string()),
        validation_inputs: data.validation.len(),
        p_tars: p_tars.clone(),
        outage_batch: args.outage_batch,
        outage_rule: "consecutive batches of outage_batch test inputs in dataset order (a final partial batch is dropped); \
                      a batch is in outage when the accuracy of its on-device inputs is below p_tar; \
                      a batch with no on-device input is not in outage"
            .into(),
        network: NetworkSettings { uplink_mbit_s: args.uplink_mbit_s, rtt_ms: args.rtt_ms, deadline_ms: args.deadline_ms },
        deadline_curve_p_tar: args.deadline_curve_p_tar,
        latency,
        methods,
        recalibration: recalibration_report(&logits, &names, args.seed)?,
        certified: certified_report(&logits, &targets, &resplit_targets, args.resplits, args.seed, args.outage_batch)?,
        guarantee: if args.guarantee_draws > 0 { Some(guarantee_report(&logits, &study_targets, args.guarantee_draws, args.seed)?) } else { None },
    };
    print_calibration(&report);
    print_sweep(&report, 1);
    print_verdicts(&report);
    print_recalibration(&report);
    print_certified(&report, resplit_targets.len());
    if let Some(g) = &report.guarantee {
        print_guarantee(g);
    }

    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    if let Some(dir) = &args.plots {
        let n = write_plots(dir, &report)?;
        println!("{n} plots written to {}", dir.display());
    }
    if let Some(dir) = &args.dump_logits {
        let files = dump_logits(dir, &logits, &names)?;
        println!("{} logit files (CSV: label,z0..z9) written to {}", files.len(), dir.display());
    }
    Ok(())
}

/// Head and tail latency at batch 1 per partition branch: from a saved
/// profile, or measured now.
fn latency_models(model: &Model, args: &EvaluateArgs) -> Result<Vec<LatencyModel>> {
    let profile: ComputeProfile = match &args.profile {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading profile {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{} is not a profile written by `branchpoint profile --json`", path.display()))?
        }
        None => profile(model, &[1], 30)?,
    };
    let Some(b1) = profile.batch_sizes.iter().position(|&b| b == 1) else {
        bail!("the compute profile has no batch-1 timings; run `branchpoint profile --batch-sizes 1,32 --json FILE`");
    };
    let points = model.partition_points();
    if profile.partitions.len() != points.len() {
        bail!("the compute profile has {} partitions, the model {}; profile this model", profile.partitions.len(), points.len());
    }
    Ok(points
        .iter()
        .zip(&profile.partitions)
        .map(|(pp, part)| LatencyModel {
            head_ms: part.head_median_ms[b1],
            tail_ms: part.tail_median_ms[b1],
            activation_bytes: pp.activation_bytes,
            uplink_mbit_s: args.uplink_mbit_s,
            rtt_ms: args.rtt_ms,
        })
        .collect())
}

fn print_exit_table(path: &Path, model: &Model, data: &ModelData, test: &[calibration::ExitLogits], names: &[String]) {
    let n = test.first().map_or(0, |e| e.len());
    println!("model {} ({}), test set: {n} inputs ({})", path.display(), model.description(), data.test_source);
    let card = model.card_test_metrics();
    println!("  {:<9} {:>10} {:>8} {:>8} {:>15}", "exit", "accuracy", "NLL", "ECE", if card.is_some() { "card accuracy" } else { "" });
    let mut differing = 0;
    for (i, (name, e)) in names.iter().zip(test).enumerate() {
        let m = calibration::calibration_metrics(e, 1.0);
        let Some(card) = card.and_then(|c| c.get(i)) else {
            println!("  {:<9} {:>8.2} % {:>8.4} {:>8.4}", name, 100.0 * m.accuracy, m.nll, m.ece);
            continue;
        };
        // Accuracies are counts over the same inputs: compare them as counts.
        let same = (m.accuracy * n as f64).round() == (card.metrics.accuracy * n as f64).round();
        differing += usize::from(!same);
        println!("  {:<9} {:>8.2} % {:>8.4} {:>8.4} {:>13.2} %{}", name, 100.0 * m.accuracy, m.nll, m.ece, 100.0 * card.metrics.accuracy, if same { "" } else { "  (differs)" });
    }
    if card.is_none() {
        println!("(the model's card records no test accuracy to compare with)");
    } else if differing == 0 {
        println!("every exit's accuracy equals the model card's");
    } else {
        println!("{differing} exit(s) differ from the model card (another libtorch build or CPU can flip a few near-ties)");
    }
}

fn print_calibration(report: &Report) {
    println!("\ncalibration on the test set (temperatures fit on the validation split):");
    println!("  {:<13} {:<9} {:>12} {:>11} {:>10} {:>11} {:>10}", "method", "exit", "temperature", "ECE before", "ECE after", "NLL before", "NLL after");
    for m in &report.methods {
        for e in &m.exits {
            println!("  {:<13} {:<9} {:>12.4} {:>11.4} {:>10.4} {:>11.4} {:>10.4}", m.method, e.exit, e.temperature, e.ece_before, e.ece_after, e.nll_before, e.nll_after);
        }
    }
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.2}", 100.0 * v))
}

fn print_sweep(report: &Report, branch: usize) {
    let lat = &report.latency[branch - 1];
    println!(
        "\nsweep at partition branch {branch} (on device {:.3} ms; offloaded {:.2} ms = uplink {:.2} + RTT {:.1} + cloud {:.3}; deadline {} ms), values in %:",
        lat.edge_ms(),
        lat.offload_ms(),
        lat.uplink_ms(),
        lat.rtt_ms,
        lat.tail_ms,
        report.network.deadline_ms
    );
    println!("  {:<13} {:>5} {:>9} {:>9} {:>9} {:>8} {:>8}  edge acc >= p_tar", "method", "p_tar", "offload", "edge acc", "overall", "outage", "missed");
    for m in &report.methods {
        for r in &m.branches[branch - 1].rows {
            println!(
                "  {:<13} {:>5.2} {:>9.2} {:>9} {:>9.2} {:>8.1} {:>8.2}  {}",
                m.method,
                r.p_tar,
                100.0 * r.offload_prob,
                pct(r.edge_accuracy),
                100.0 * r.overall_accuracy,
                100.0 * r.outage_prob,
                100.0 * r.missed_deadline_prob,
                match r.meets_p_tar {
                    Some(true) => "yes",
                    Some(false) => "NO",
                    None => "(nothing on device)",
                }
            );
        }
    }
}

fn print_verdicts(report: &Report) {
    println!("\ndoes the on-device accuracy meet p_tar over the sweep?");
    for m in &report.methods {
        for b in &m.branches {
            if b.edge_accuracy_meets_p_tar {
                println!("  {:<13} branch {}: yes, at every p_tar", m.method, b.branch);
            } else {
                let list: Vec<String> = b.p_tars_missed.iter().map(|p| format!("{p:.2}")).collect();
                println!("  {:<13} branch {}: no, below p_tar at {}", m.method, b.branch, list.join(", "));
            }
        }
    }
}

fn print_recalibration(report: &Report) {
    println!("\ncalibration methods per exit (fit on the validation split; ECE cross-validated there, the rest on the test set):");
    println!("  {:<9} {:<13} {:>9} {:>9} {:>9} {:>9} {:>8}", "exit", "method", "CV ECE", "test ECE", "accuracy", "Brier", "AUROC");
    for r in &report.recalibration {
        for m in &r.methods {
            println!(
                "  {:<9} {:<13} {:>9.4} {:>9.4} {:>8.2} % {:>9.4} {:>8}{}",
                r.exit,
                m.method,
                m.cross_validated_ece,
                m.test.ece,
                100.0 * m.test.accuracy,
                m.test.brier,
                m.test.auroc.map_or("-".into(), |a| format!("{a:.4}")),
                if m.method == r.chosen { "  <- chosen" } else { "" }
            );
        }
    }
}

fn print_guarantee(g: &GuaranteeReport) {
    use branchpoint_core::guarantee::{Correction, Promise};
    println!("\ncertified for the plan chosen ({} draws of {} calibration inputs from {}; {}):", g.draws, g.calibration_inputs, g.pool, g.chooser);
    println!("  {:<6} {:>5}  {:<10}  {:<22}  {:>10}  {:>14}  {:>8}  chosen per branch", "a", "delta", "promise", "correction", "violations", "delta + 2 s.e.", "offload");
    for r in &g.rows {
        let promise = match r.promise {
            Promise::Population => "population".to_string(),
            Promise::Batch(m) => format!("batch {m}"),
        };
        let correction = match r.correction {
            Correction::FixedSequenceUnion => "fixed sequence + union",
            Correction::None => "none (each alone)",
        };
        println!(
            "  {:<6} {:>5}  {:<10}  {:<22}  {:>9.1}%  {:>13.1}%  {:>7.1}%  {:?}",
            r.target.accuracy,
            r.target.delta,
            promise,
            correction,
            100.0 * r.violation_rate,
            100.0 * (r.target.delta + r.sampling_error),
            100.0 * r.mean_offload_rate,
            r.chosen_branch
        );
    }
    println!("\ndeployment ({}; audits {:.0} % of it, {} draws):", g.deployment, 100.0 * g.audit_rate, g.draws);
    println!("  {:<6} {:>5} {:>6}  {:>22}  {:>32}", "branch", "a", "delta", "validation: threshold", "audits: certified / broken, offload");
    for r in &g.deployment_rows {
        let validation = r.validation_threshold.map_or("none".into(), |t| format!("{t:.4}{}", if r.validation_violated { " broken" } else { "" }));
        println!(
            "  {:<6} {:>5} {:>6}  {:>22}  {:>14} / {:<4} (<= {:.1} by chance), {:.1}%",
            r.branch,
            r.target.accuracy,
            r.target.delta,
            validation,
            r.audit_certified,
            r.audit_violations,
            r.level * r.audit_certified as f64,
            100.0 * r.audit_mean_offload_rate
        );
    }
}

fn print_certified(report: &Report, with_resplits: usize) {
    let c = &report.certified;
    println!("\nthresholds for a target on-device accuracy a (test set; certified on the validation split by Learn-then-Test, grid {}):", c.grid);
    println!(
        "  {:<6} {:>5} {:>5}  {:>17}  {:>17}  {:>25}  {:>25}  re-splits broken (uncal / TS / empirical / certified / batch-certified), offload",
        "branch", "a", "delta", "p_tar = a, T = 1", "p_tar = a, TS", "certified: threshold", "batch-certified"
    );
    let point = |p: &branchpoint_core::offload::OperatingPoint| format!("{:>5.1} % off {:>6}", 100.0 * p.offload_prob, pct(p.edge_accuracy));
    for b in &c.branches {
        for r in b.rows.iter().take(with_resplits) {
            let resplit = r.resplit.map_or("-".into(), |s| {
                format!(
                    "{:.3} / {:.3} / {:.3} / {:.3} / {:.3} of {}; offload {:.1} / {:.1} / {:.1} / {:.1} / {:.1} %",
                    s.uncalibrated.violation_rate,
                    s.temperature.violation_rate,
                    s.empirical.violation_rate,
                    s.certified.violation_rate,
                    s.certified_batch.violation_rate,
                    s.splits,
                    100.0 * s.uncalibrated.mean_offload_rate,
                    100.0 * s.temperature.mean_offload_rate,
                    100.0 * s.empirical.mean_offload_rate,
                    100.0 * s.certified.mean_offload_rate,
                    100.0 * s.certified_batch.mean_offload_rate
                )
            });
            let threshold = |c: &branchpoint_core::risk::Certificate| c.threshold.map_or("none".into(), |t| format!("{t:.3}"));
            println!(
                "  {:<6} {:>5.2} {:>5.2}  {}  {}  {:>7} {}  {:>7} {}  {}",
                b.branch,
                r.target.accuracy,
                r.target.delta,
                point(&r.uncalibrated),
                point(&r.temperature),
                threshold(&r.certificate),
                point(&r.certified),
                threshold(&r.batch_certificate),
                point(&r.batch_certified),
                resplit
            );
        }
    }
    println!("  (edge accuracies in %; \"off\" is the offload rate; a re-split is broken when its evaluation half's edge accuracy is below a;");
    println!("   \"empirical\" is the lowest threshold whose calibration-half edge accuracy reaches a, with no bound;");
    println!("   \"certified\" promises the population of inputs that exit, \"batch-certified\" the batch itself: the test set, or the evaluation half)");
}

/// The points of one method's curve at one branch.
type CurveOf<'a> = &'a dyn Fn(&MethodReport, usize) -> Vec<(f64, f64)>;

fn write_plots(dir: &Path, report: &Report) -> Result<usize> {
    prepare_dir(dir)?;
    let (pmin, pmax) = (report.p_tars.iter().cloned().fold(1.0, f64::min), report.p_tars.iter().cloned().fold(0.0, f64::max));
    let x_range = (pmin - 0.01, pmax + 0.01);
    Ok(plot_sweeps(dir, report, x_range)? + plot_reliability(dir, report)? + plot_certified(dir, report, x_range)?)
}

/// Per branch, against p_tar: on-device accuracy, offloading and outage
/// probabilities; and missed deadlines against the deadline.
fn plot_sweeps(dir: &Path, report: &Report, x_range: (f64, f64)) -> Result<usize> {
    let mut n = 0;
    let pmin = report.p_tars.iter().cloned().fold(1.0, f64::min);
    let method_curves = |f: CurveOf, branch: usize| -> Vec<Curve> {
        report.methods.iter().enumerate().map(|(i, m)| Curve { label: m.method.clone(), color: method_color(i), points: f(m, branch), dashed: false }).collect()
    };
    for b in 1..=report.latency.len() {
        // Edge accuracy vs p_tar, with the line y = p_tar.
        let mut curves = method_curves(&|m, b| m.branches[b - 1].rows.iter().filter_map(|r| r.edge_accuracy.map(|a| (r.p_tar, a))).collect(), b);
        let lowest = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(pmin, f64::min);
        curves.push(Curve {
            label: "target: edge accuracy = p_tar".into(),
            color: plotters::style::RGBColor(0, 0, 0),
            points: vec![(x_range.0, x_range.0), (x_range.1, x_range.1)],
            dashed: true,
        });
        line_plot(
            &dir.join(format!("edge-accuracy-branch{b}.png")),
            &LinePlot {
                title: &format!("On-device accuracy vs p_tar, branch {b}"),
                x_label: "p_tar",
                y_label: "on-device (edge) accuracy",
                x_range,
                y_range: ((lowest - 0.02).max(0.0), 1.0),
                curves,
                legend: SeriesLabelPosition::LowerRight,
            },
        )?;
        line_plot(
            &dir.join(format!("offload-prob-branch{b}.png")),
            &LinePlot {
                title: &format!("Offloading probability vs p_tar, branch {b}"),
                x_label: "p_tar",
                y_label: "offloading probability",
                x_range,
                y_range: (0.0, 1.0),
                curves: method_curves(&|m, b| m.branches[b - 1].rows.iter().map(|r| (r.p_tar, r.offload_prob)).collect(), b),
                legend: SeriesLabelPosition::UpperLeft,
            },
        )?;
        line_plot(
            &dir.join(format!("outage-prob-branch{b}.png")),
            &LinePlot {
                title: &format!("Inference outage probability vs p_tar, branch {b} (batches of {})", report.outage_batch),
                x_label: "p_tar",
                y_label: "outage probability",
                x_range,
                y_range: (0.0, 1.0),
                curves: method_curves(&|m, b| m.branches[b - 1].rows.iter().map(|r| (r.p_tar, r.outage_prob)).collect(), b),
                legend: SeriesLabelPosition::UpperLeft,
            },
        )?;
        let curves = method_curves(&|m, b| m.branches[b - 1].missed_deadline_curve.clone(), b);
        let xmax = curves.iter().flat_map(|c| c.points.iter().map(|p| p.0)).fold(1.0, f64::max);
        line_plot(
            &dir.join(format!("missed-deadline-branch{b}.png")),
            &LinePlot {
                title: &format!("Missed-deadline probability vs deadline, branch {b}, p_tar {:.2}", report.deadline_curve_p_tar),
                x_label: "deadline t_tar (ms)",
                y_label: "missed-deadline probability",
                x_range: (0.0, xmax),
                y_range: (0.0, 1.0),
                curves,
                legend: SeriesLabelPosition::UpperRight,
            },
        )?;
        n += 4;
    }
    Ok(n)
}

/// Reliability diagrams per exit: before, then after each calibration, and
/// for every calibration method compared.
fn plot_reliability(dir: &Path, report: &Report) -> Result<usize> {
    let mut n = 0;
    // Reliability diagrams per exit: before, then after each calibration.
    let uncal = &report.methods[0];
    for (ei, exit) in uncal.exits.iter().enumerate() {
        let mut panels = vec![("uncalibrated (T = 1)".to_string(), exit.before.ece, exit.before.reliability.as_slice())];
        for m in &report.methods[1..] {
            let e = &m.exits[ei];
            panels.push((format!("{} (T = {:.3})", m.method, e.temperature), e.after.ece, e.after.reliability.as_slice()));
        }
        let file = format!("reliability-{}.png", exit.exit.replace(' ', ""));
        reliability_diagram(&dir.join(file), &format!("Reliability diagram, {} (test set)", exit.exit), &panels)?;
        n += 1;
    }
    // The same, for every calibration method compared.
    for r in &report.recalibration {
        let panels: Vec<(String, f64, &[branchpoint_core::calibration::ReliabilityBin])> =
            r.methods.iter().map(|m| (format!("{}{}", m.method, if m.method == r.chosen { " (chosen)" } else { "" }), m.test.ece, m.test.reliability.as_slice())).collect();
        let file = format!("reliability-methods-{}.png", r.exit.replace(' ', ""));
        reliability_diagram(&dir.join(file), &format!("Reliability diagram per calibration method, {} (test set)", r.exit), &panels)?;
        n += 1;
    }
    Ok(n)
}

/// Edge accuracy against the target for the ways of choosing the
/// threshold, over the rows certified at the plot's delta.
fn plot_certified(dir: &Path, report: &Report, x_range: (f64, f64)) -> Result<usize> {
    let mut n = 0;
    // Edge accuracy against the target for the ways of choosing the
    // threshold, over the rows certified at the plot's delta.
    let delta = report.certified.branches.first().and_then(|b| b.rows.last()).map_or(0.05, |r| r.target.delta);
    for b in &report.certified.branches {
        let mut rows: Vec<&crate::evaluation::CertifiedRow> = b.rows.iter().filter(|r| r.target.delta == delta && report.p_tars.contains(&r.target.accuracy)).collect();
        // The rows hold the --certify-accuracy targets first, then the sweep:
        // a line is drawn in order of its target.
        rows.sort_by(|x, y| x.target.accuracy.total_cmp(&y.target.accuracy));
        let curve = |label: &str, color: usize, f: &dyn Fn(&crate::evaluation::CertifiedRow) -> Option<f64>| Curve {
            label: label.into(),
            color: method_color(color),
            points: rows.iter().filter_map(|r| f(r).map(|y| (r.target.accuracy, y))).collect(),
            dashed: false,
        };
        let mut curves = vec![
            curve("p_tar = a, uncalibrated", 0, &|r| r.uncalibrated.edge_accuracy),
            curve("p_tar = a, temperature-scaled", 1, &|r| r.temperature.edge_accuracy),
            curve(&format!("certified (1 - delta = {:.2})", 1.0 - delta), 2, &|r| r.certified.edge_accuracy),
            curve(&format!("batch-certified (1 - delta = {:.2})", 1.0 - delta), 3, &|r| r.batch_certified.edge_accuracy),
        ];
        let lowest = curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)).fold(x_range.0, f64::min);
        curves.push(Curve {
            label: "target: edge accuracy = a".into(),
            color: plotters::style::RGBColor(0, 0, 0),
            points: vec![(x_range.0, x_range.0), (x_range.1, x_range.1)],
            dashed: true,
        });
        line_plot(
            &dir.join(format!("certified-branch{}.png", b.branch)),
            &LinePlot {
                title: &format!("On-device accuracy vs target a, branch {} (test set)", b.branch),
                x_label: "target on-device accuracy a",
                y_label: "on-device (edge) accuracy",
                x_range,
                y_range: ((lowest - 0.02).max(0.0), 1.0),
                curves,
                legend: SeriesLabelPosition::LowerRight,
            },
        )?;
        n += 1;
    }
    Ok(n)
}
