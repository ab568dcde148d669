//! `branchpoint run SCENARIO`: replays a network scenario under each of its
//! policies and writes report.json and plots.
use std::time::Instant;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use branchpoint_actors::compute::ModelSpec;
use branchpoint_actors::fleet::TestInputs;

use crate::cli::RunArgs;
use crate::evaluation::split_logits;
use crate::scenario::{self, report, Scenario, TimeMode};

pub fn run(args: RunArgs) -> Result<()> {
    let started = Instant::now();
    let scenario = Scenario::read(&args.scenario, args.trace.as_deref())?;
    // A broker means live actors: virtual time runs in one process.
    let time = if args.nats.nats.is_some() { TimeMode::Real } else { scenario.time };
    if time == TimeMode::Real && args.nats.nats.is_none() && scenario.policies.contains(&scenario::Policy::Watched) {
        bail!(
            "scenario {}: the watched policy in real time needs --nats URL (a NATS server with JetStream): its refits reach the devices through the control store",
            scenario.path.display()
        );
    }
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get() as i32));
    let model = args.source.load_model(tch::Device::Cpu)?;
    let data = args.source.load_data(&model)?;
    let profile = scenario::read_profile(&scenario, &args.source.model)?;
    tracing::info!(
        "scenario {} ({}): the model's answers on {} test inputs (computed once per model and inputs, then read from {})",
        scenario.name,
        scenario.path.display(),
        data.test.len(),
        branchpoint_models::exits::answers_dir().map_or("nowhere: recording is off".into(), |d| d.display().to_string())
    );
    let logits = split_logits(&model, &data)?;
    // The model's answers on the test inputs as each shift corrupts them.
    let (mut shifted, mut shifted_splits) = (Vec::new(), Vec::new());
    for (corruption, seed) in scenario.shift_views() {
        tracing::info!("scenario {}: the model's answers on the test inputs under {corruption}", scenario.name);
        let images = branchpoint_models::corrupt::apply(&corruption, &data.test.images, model.normalization(), seed, 0)?;
        let split = branchpoint_models::data::Split { images, labels: data.test.labels.shallow_clone() };
        shifted.push(branchpoint_models::model::recorded_split_exit_logits(&model, &split)?);
        shifted_splits.push(split);
    }
    let codecs = scenario::codec_answers(&scenario, &model, &data, &shifted_splits)?;
    let prepared = scenario::prepare(&scenario, &model, &logits.validation, &logits.test, &shifted, &codecs, &profile)?;
    let cfg = scenario::sim_config(&scenario, &prepared)?;

    if let Some(listen) = &args.listen {
        let info = crate::api::ModelInfo { model_sha256: model.sha256().to_string(), branches: model.num_branches() };
        crate::api::spawn_embedded(args.nats.clone(), listen.clone(), args.token.clone(), info)?;
        tracing::info!("api listening on http://{listen} (dashboard at /, metrics at /metrics) while the replay runs");
    }
    let replay_started = Instant::now();
    let runs = match time {
        TimeMode::Virtual => {
            let bar = ProgressBar::new(0);
            bar.set_style(ProgressStyle::with_template("replaying {bar:30} {pos}/{len} runs ({elapsed})").expect("valid template"));
            let progress = |done: usize, total: usize| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            };
            let runs = scenario::replay(&scenario, &prepared, &progress)?;
            bar.finish_and_clear();
            runs
        }
        TimeMode::Real => {
            let inputs = std::sync::Arc::new(TestInputs::from_split(&data.test)?);
            let shifted = shifted_splits.iter().map(|s| TestInputs::from_split(s).map(std::sync::Arc::new)).collect::<Result<Vec<_>, _>>()?;
            let setup = scenario::live::LiveSetup {
                scenario: &scenario,
                cfg: &cfg,
                prepared: &prepared,
                spec: ModelSpec { model: args.source.model.clone(), device: tch::Device::Cpu },
                points: model.partition_points().to_vec(),
                inputs,
                shifted,
                nats: &args.nats,
                model_sha256: model.sha256().to_string(),
                data_dir: args.source.data_dir.clone(),
            };
            let n = scenario.policies.iter().filter(|p| **p != scenario::Policy::Oracle).count();
            tch::set_num_threads(1);
            let bar = ProgressBar::new(scenario.duration_s.round() as u64 * n as u64);
            bar.set_style(ProgressStyle::with_template("live {msg} {bar:30} {pos}/{len} s ({elapsed})").expect("valid template"));
            let ticker = {
                let bar = bar.clone();
                std::thread::spawn(move || {
                    while !bar.is_finished() {
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        bar.inc(1);
                    }
                })
            };
            let on_policy = |p: scenario::Policy| bar.set_message(format!("{} over {}", p.name(), if args.nats.nats.is_some() { "NATS" } else { "in-process links" }));
            let runs = scenario::live::replay_live(&setup, &on_policy);
            bar.finish_and_clear();
            let _ = ticker.join();
            runs?
        }
    };
    let replay_s = replay_started.elapsed().as_secs_f64();
    for r in &runs {
        if r.outcomes != r.arrivals {
            bail!("policy {}: {} inputs but {} outcomes: the replay lost inputs (a bug; please report it)", r.policy.name(), r.arrivals, r.outcomes);
        }
    }
    let rep = report::build(&scenario, &cfg, &prepared, &args.source.model.display().to_string(), model.sha256(), runs, time);

    let out = args.out.clone().unwrap_or_else(|| std::path::Path::new("runs").join(&scenario.name));
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let json = out.join("report.json");
    report::write_json(&rep, &json)?;
    let plots = report::plot(&rep, &out)?;

    print_summary(&rep);
    println!(
        "replayed {} s of {} device(s) in {} time: {:.1} s ({:.1} s replaying)",
        scenario.duration_s,
        scenario.groups.iter().map(|g| g.devices).sum::<usize>(),
        rep.time,
        started.elapsed().as_secs_f64(),
        replay_s,
    );
    println!("report: {}", json.display());
    for p in plots {
        println!("plot:   {}", p.display());
    }
    Ok(())
}

fn print_summary(r: &report::ScenarioReport) {
    println!("scenario {} (seed {}, {} s in {} time, calibration {})", r.scenario, r.seed, r.duration_s, r.time, r.model.calibration);
    for g in &r.groups {
        println!(
            "  group {}: {} devices x {} inputs/s, deadline {} ms, static plan branch {} p_tar {}; network {} (mean {:.2} Mbit/s)",
            g.name, g.devices, g.rate, g.deadline_ms, g.branch, g.p_tar, g.network, g.mean_capacity_mbit_s
        );
        if let Some(l) = &g.level {
            println!(
                "    service level: on-device accuracy >= {} with probability {}, misses <= {}, minimise {:?}; the adaptive planner chooses among plans certified for it",
                l.accuracy,
                1.0 - l.delta,
                l.miss_bound,
                l.minimise
            );
        }
    }
    println!("  {:<20} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}", "policy", "inputs", "accuracy", "edge acc", "offload", "misses", "p50 ms", "p95 ms", "p99 ms");
    for p in &r.policies {
        let t = &p.totals;
        println!(
            "  {:<20} {:>8} {:>8.2}% {:>9} {:>8.1}% {:>8.2}% {:>9.1} {:>9.1} {:>9.1}",
            p.policy,
            t.inputs,
            100.0 * t.accuracy,
            t.edge_accuracy.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a)),
            100.0 * t.offload_rate,
            100.0 * t.deadline_miss_rate,
            t.latency_ms_p50,
            t.latency_ms_p95,
            t.latency_ms_p99
        );
    }
    println!("  thresholds: {}", r.model.threshold_rule);
    println!("  on-device accuracy of the inputs that exited by confidence, measured / as the plans predicted, per branch:");
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |a| format!("{:.2}%", 100.0 * a));
    for p in r.policies.iter().filter(|p| !p.edge_by_branch.is_empty()) {
        let per: Vec<String> = p
            .edge_by_branch
            .iter()
            .filter(|e| e.exits > 0)
            .map(|e| format!("branch {} {} / {} ({} exits)", e.branch, pct(e.measured_edge_accuracy), pct(e.predicted_edge_accuracy), e.exits))
            .collect();
        println!("  {:<20} {}", p.policy, if per.is_empty() { "nothing exited by confidence".into() } else { per.join("; ") });
    }
    for p in r.policies.iter().filter(|p| p.policy == "adaptive") {
        print_control(p);
    }
}

/// What the adaptive policy's control loop did for each group: its alarms
/// and refits, and how the on-device answers kept the target per 10 s.
fn print_control(p: &crate::scenario::report::PolicyReport) {
    let secs = |v: &[f64]| v.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>().join(", ");
    for w in &p.watch {
        let refits: Vec<f64> = w.refits.iter().map(|r| r.t_s).collect();
        let judged: Vec<&crate::scenario::report::WatchWindow> = w.windows.iter().filter(|x| x.measured_agreement.is_some()).collect();
        let kept = judged.iter().filter(|x| x.measured_agreement.is_some_and(|a| a >= w.target)).count();
        // Until the first alarm the plans predict accuracy against labels
        // (the validation split's); after the first refit, agreement with
        // the final exit (the deployment's own evidence). Windows between
        // are judged by neither.
        let first_alarm = w.alarms_without_refit_s.first().copied().unwrap_or(f64::INFINITY);
        let first_refit = refits.first().copied().unwrap_or(f64::INFINITY);
        let gap = |windows: &mut dyn Iterator<Item = &&crate::scenario::report::WatchWindow>, measured: fn(&crate::scenario::report::WatchWindow) -> Option<f64>| {
            windows.filter_map(|x| Some((x.predicted? - measured(x)?).abs())).fold(0.0, f64::max)
        };
        let before = gap(&mut judged.iter().filter(|x| x.start_s + 10.0 <= first_alarm), |x| x.measured_accuracy);
        let after = gap(&mut judged.iter().filter(|x| x.start_s >= first_refit), |x| x.measured_agreement);
        println!(
            "  adaptive, group {}: alarms at [{}] s, refits at [{}] s; on-device agreement with the final exit >= {} in {kept} of {} 10-s windows; predicted vs measured on-device accuracy at most {:.1} points apart before the first alarm, agreement {:.1} after the first refit{}",
            w.group,
            secs(&w.alarms_without_refit_s),
            secs(&refits),
            w.target,
            judged.len(),
            100.0 * before,
            100.0 * after,
            p.plan_changes_per_device_hour.map_or(String::new(), |c| format!("; {c:.1} plan changes per device-hour"))
        );
    }
}
