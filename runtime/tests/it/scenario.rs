//! Scenario replay as users meet it: validation errors that name the key
//! and the file, the shipped scenarios, reproducibility, and the acceptance
//! check on the recorded cellular traces in ../shared/traces.
use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use branchpoint::scenario::report::{CodecCounts, ScenarioReport};
use branchpoint::scenario::Scenario;
use branchpoint_messages::{PlanTarget, PlanUpdate};
use common::{alone, branchpoint, output_within, repo_root, shared};

const VALID: &str = r#"
name = "t"
seed = 1
duration_s = 10.0

[[groups]]
name = "g"
devices = 2
rate = 5.0
deadline_ms = 100.0
branch = 1
p_tar = 0.9

[groups.network]
uplink_mbit_s = 10.0
rtt_ms = 20.0
"#;

fn parse(text: &str) -> Result<Scenario, String> {
    Scenario::parse(text, Path::new("scenarios/test.toml"), None).map_err(|e| format!("{e:#}"))
}

fn expect_error(text: &str, needles: &[&str]) {
    let e = parse(text).expect_err("this scenario must be rejected");
    assert!(e.contains("scenarios/test.toml"), "error names the file: {e}");
    for n in needles {
        assert!(e.contains(n), "error {e:?} should mention {n:?}");
    }
}

#[test]
fn a_valid_scenario_parses_with_defaults() {
    let s = parse(VALID).unwrap();
    assert_eq!(s.groups.len(), 1);
    assert_eq!(s.policies.len(), 5);
    assert_eq!(s.workers.count, 2);
    assert_eq!(s.planner.miss_bound, 0.05);
}

#[test]
fn scenario_errors_name_the_key_and_the_file() {
    expect_error(&format!("colour = \"red\"\n{VALID}"), &["unknown field", "colour"]);
    expect_error(&VALID.replace("rtt_ms = 20.0", "rtt_ms = 20.0\nbandwidth = 3"), &["unknown field", "bandwidth"]);
    expect_error(&VALID.replace("rate = 5.0", "rate = -5.0"), &["groups[0] (g).rate", "-5"]);
    expect_error(&VALID.replace("p_tar = 0.9", "p_tar = 1.5"), &["groups[0] (g).p_tar", "outside (0, 1)"]);
    expect_error(&VALID.replace("branch = 1", "branch = 0"), &["groups[0] (g).branch"]);
    expect_error(&VALID.replace("devices = 2", "devices = 0"), &["groups[0] (g).devices"]);
    // Input shifts and the watched policy's settings.
    let shift = |at: &str, c: &str| format!("{VALID}\n[groups.shift]\nat_s = {at}\ncorruption = \"{c}\"\n");
    assert!(parse(&shift("5.0", "contrast:2")).is_ok());
    expect_error(&shift("5.0", "fog:2"), &["groups[0] (g).shift.corruption", "fog", "gaussian-noise"]);
    expect_error(&shift("5.0", "contrast:7"), &["groups[0] (g).shift.corruption", "1 to 5"]);
    expect_error(&shift("12.0", "contrast:2"), &["groups[0] (g).shift.at_s", "duration_s"]);
    assert!(parse(&format!("{}until_s = 8.0\n", shift("5.0", "contrast:2"))).is_ok(), "a shift that ends");
    expect_error(&format!("{}until_s = 4.0\n", shift("5.0", "contrast:2")), &["groups[0] (g).shift.until_s", "after at_s"]);
    expect_error(&format!("{}until_s = 11.0\n", shift("5.0", "contrast:2")), &["groups[0] (g).shift.until_s", "duration_s"]);
    // A service level out of range names its key.
    expect_error(&format!("{VALID}\n[groups.level]\naccuracy = 0.9\ndelta = 0.0\nmiss_bound = 0.05\n"), &["groups.g.level", "delta"]);
    expect_error(&format!("{VALID}\n[groups.level]\naccuracy = 0.9\ndelta = 0.05\n"), &["miss_bound"]);
    assert!(parse(&shift("5.0", "contrast:2").replace("duration_s = 10.0", "duration_s = 10.0\ntime = \"real\"")).is_ok(), "shifts replay in real time too");
    expect_error(&format!("{VALID}\n[watch]\naudit_rate = 0.0\n"), &["watch.audit_rate"]);
    expect_error(&format!("{VALID}\n[watch]\naudit = 0.1\n"), &["unknown field", "audit"]);
    assert!(
        parse(&VALID.replace("duration_s = 10.0", "duration_s = 10.0\npolicies = [\"watched\", \"uncalibrated\"]\ntime = \"real\"")).is_ok(),
        "with --nats, run says otherwise"
    );
    expect_error(&VALID.replace("duration_s = 10.0", "duration_s = 0.0"), &["duration_s"]);
    expect_error(&VALID.replace("seed = 1", "seed = \"one\""), &["seed"]);
    expect_error(&VALID.replace("rtt_ms = 20.0", ""), &["groups[0] (g).network", "rtt_ms"]);
    expect_error(&VALID.replace("rtt_ms = 20.0", "rtt_ms = 20.0\ntrace = \"x.up\""), &["network", "exactly one of"]);
    expect_error(&VALID.replace("uplink_mbit_s = 10.0\nrtt_ms = 20.0", "trace = \"no-such-trace.up\"\nrtt_ms = 20.0"), &["network", "no-such-trace.up"]);
    expect_error(
        &VALID.replace("uplink_mbit_s = 10.0\nrtt_ms = 20.0", "schedule = [{ at_s = 5.0, uplink_mbit_s = 1.0, rtt_ms = 10.0 }]"),
        &["network", "first segment must start at 0"],
    );
    expect_error(&format!("calibration = \"hot\"\n{VALID}"), &["calibration", "hot"]);
    expect_error(&format!("policies = [\"greedy\"]\n{VALID}"), &["policies", "greedy"]);
    expect_error(&format!("{VALID}\n[planner]\nmiss_bound = 2.0\n"), &["planner.miss_bound"]);
    expect_error(&format!("{VALID}\n[planner]\ncodecs = [\"int8\", \"int8\"]\n"), &["planner.codecs", "[\"int8\", \"int8\"]", "once"]);
    expect_error(&format!("{VALID}\n[planner]\ncodecs = [\"bf16\"]\n"), &["bf16"]);
    expect_error(&format!("{VALID}\n[oracle]\nwindow_s = 2.5\n"), &["oracle.window_s", "whole number"]);
    expect_error(&format!("{VALID}\n[workers]\ncount = 0\n"), &["workers.count"]);
    expect_error(&format!("{VALID}{}", VALID.split("[[groups]]").nth(1).map(|g| format!("[[groups]]{g}")).unwrap()), &["groups[1].name", "twice"]);
    expect_error("name = \"t\"\nseed = 1\nduration_s = 5.0\ngroups = []\n", &["groups", "at least one"]);
}

const AUTOSCALE: &str = r#"
[workers]
count = 1

[workers.autoscale]
min_workers = 1
max_workers = 4
up_queue_delay_us = 10000.0
down_queue_delay_us = 3000.0
"#;

#[test]
fn rate_schedules_and_autoscaling_are_checked_key_by_key() {
    let scaled = format!("{VALID}{AUTOSCALE}");
    let s = parse(&scaled).unwrap();
    let a = s.workers.autoscale.as_ref().unwrap();
    assert_eq!((a.tick_s, a.start_delay_s, a.up_after_ticks), (1.0, 1.0, 2), "unset keys take the defaults");
    let stepped = VALID.replace("rate = 5.0", "rate_schedule = [{ at_s = 0.0, rate = 5.0 }, { at_s = 4.0, rate = 40.0 }]");
    assert_eq!(parse(&stepped).unwrap().groups[0].mean_rate(10.0), 26.0);

    expect_error(&scaled.replace("min_workers = 1", "min_workers = 0"), &["workers.autoscale", "min_workers must be at least 1"]);
    expect_error(&scaled.replace("count = 1", "count = 5"), &["workers.count", "5 is outside", "1..=4"]);
    expect_error(
        &scaled.replace("down_queue_delay_us = 3000.0", "down_queue_delay_us = 20000.0"),
        &["workers.autoscale", "down_queue_delay_us 20000 must be below up_queue_delay_us"],
    );
    expect_error(&format!("{scaled}tick = 2.0\n"), &["unknown field", "tick"]);
    expect_error(&format!("{scaled}tick_s = 0.0\n"), &["workers.autoscale.tick_s"]);
    expect_error(&format!("{scaled}start_delay_s = -1.0\n"), &["workers.autoscale.start_delay_s"]);
    expect_error(&format!("time = \"real\"\n{scaled}"), &["workers.autoscale", "virtual time only"]);

    expect_error(&VALID.replace("rate = 5.0", "rate = 5.0\nrate_schedule = [{ at_s = 0.0, rate = 5.0 }]"), &["groups[0] (g).rate", "exactly one of"]);
    expect_error(&VALID.replace("rate = 5.0", ""), &["groups[0] (g).rate", "exactly one of"]);
    expect_error(&stepped.replace("at_s = 0.0", "at_s = 1.0"), &["groups[0] (g).rate_schedule[0].at_s", "start at 0.0"]);
    expect_error(&stepped.replace("at_s = 4.0", "at_s = 0.0"), &["groups[0] (g).rate_schedule[1].at_s", "time order"]);
    expect_error(&stepped.replace("at_s = 4.0", "at_s = 12.0"), &["rate_schedule[1].at_s", "after the scenario ends"]);
    expect_error(&stepped.replace("rate = 40.0", "rate = 0.0"), &["groups[0] (g).rate_schedule[1].rate", "positive"]);
    expect_error(&stepped.replace("rate = 40.0", "rate = 40.0, burst = 2"), &["unknown field", "burst"]);
    expect_error(&VALID.replace("rate = 5.0", "rate_schedule = []"), &["groups[0] (g).rate_schedule", "is empty"]);

    // The command refuses before it loads anything.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad-autoscale.toml");
    std::fs::write(&bad, scaled.replace("count = 1", "count = 7")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&bad).arg("--out").arg(dir.path()), Duration::from_secs(30));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad-autoscale.toml") && err.contains("workers.count"), "{err}");
}

#[test]
fn the_command_fails_clearly_on_bad_input() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let missing = output_within(branchpoint().args(["run", "scenarios/no-such.toml"]), Duration::from_secs(30));
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("no-such.toml") && err.contains("scenarios/"), "{err}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, VALID.replace("deadline_ms = 100.0", "deadline_ms = \"soon\"")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&bad), Duration::from_secs(30));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.toml") && err.contains("deadline_ms"), "{err}");

    // A model with fewer branches than the scenario asks for.
    let deep = dir.path().join("deep.toml");
    std::fs::write(&deep, VALID.replace("branch = 1", "branch = 3")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&deep).arg("--out").arg(dir.path()), Duration::from_secs(120));
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("groups[0] (g).branch") && err.contains("branches 1..=2"), "{err}");

    let o = output_within(branchpoint().args(["run", "scenarios/wifi-stable.toml", "--trace", "x.up"]), Duration::from_secs(30));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no group whose network is a trace"));
}

fn replay(scenario: &Path, extra: &[&str], out: &Path) -> ScenarioReport {
    let o = output_within(branchpoint().arg("run").arg(scenario).arg("--out").arg(out).args(extra), Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "run {} {extra:?} failed:\n{stdout}\n{}", scenario.display(), String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains(&format!("report: {}", out.join("report.json").display())), "{stdout}");
    for plot in ["network.png", "accuracy-and-misses.png", "summary.png"] {
        let p = out.join(plot);
        assert!(std::fs::metadata(&p).map(|m| m.len() > 10_000).unwrap_or(false), "{} written", p.display());
    }
    serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap()
}

fn policy<'a>(r: &'a ScenarioReport, name: &str) -> &'a branchpoint::scenario::report::PolicyReport {
    r.policies.iter().find(|p| p.policy == name).unwrap_or_else(|| panic!("policy {name} in the report"))
}

#[test]
fn same_seed_same_report_and_every_input_answered_once() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join("scenarios/lte-handover.toml")).unwrap().replace("duration_s = 120.0", "duration_s = 80.0");
    let path = dir.path().join("short.toml");
    std::fs::write(&path, &text).unwrap();
    let a = replay(&path, &[], &dir.path().join("a"));
    replay(&path, &[], &dir.path().join("b"));
    let (ja, jb) = (std::fs::read(dir.path().join("a/report.json")).unwrap(), std::fs::read(dir.path().join("b/report.json")).unwrap());
    assert!(ja == jb, "the same seed must give the same report, byte for byte");
    std::fs::write(&path, text.replace("seed = 2021", "seed = 7")).unwrap();
    let c = replay(&path, &[], &dir.path().join("c"));
    assert_ne!(a.policies[0].totals, c.policies[0].totals, "another seed, other arrivals");

    // Every policy saw the same inputs, and each got exactly one answer.
    let inputs = a.policies[0].totals.inputs;
    assert!(inputs > 10_000, "{inputs}");
    for p in &a.policies {
        assert_eq!(p.totals.inputs, inputs, "{}", p.policy);
        assert_eq!(p.series.inputs.iter().sum::<u64>(), inputs, "{}: series adds up", p.policy);
    }
    // The handover (40 s to 70 s) hurts the fixed plan that offloads.
    let stat = policy(&a, "static");
    let during: f64 = stat.series.deadline_miss_rate[45..60].iter().map(|m| m.unwrap()).sum::<f64>() / 15.0;
    let before: f64 = stat.series.deadline_miss_rate[5..35].iter().map(|m| m.unwrap()).sum::<f64>() / 30.0;
    assert!(during > 0.2 && before < 0.01, "static misses before {before}, during the handover {during}");
    let cloud = policy(&a, "cloud-only");
    assert_eq!(cloud.totals.offload_rate, 1.0);
    let device = policy(&a, "device-only");
    assert_eq!((device.totals.offload_rate, device.totals.deadline_misses), (0.0, 0));
}

/// The recorded traces: ../shared/traces beside the checkout, or
/// BRANCHPOINT_TRACE_DIR.
fn recorded_traces() -> Vec<PathBuf> {
    let dir = std::env::var_os("BRANCHPOINT_TRACE_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("../shared/traces"));
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "up")).collect()).unwrap_or_default();
    v.sort();
    if v.is_empty() {
        eprintln!("NOTE: no recorded traces in {} (set BRANCHPOINT_TRACE_DIR); checking the shipped synthetic trace only", dir.display());
    }
    v
}

/// Issue acceptance: with deadline 150 ms and static p_tar 0.9 at branch 1
/// (scenarios/cellular-trace.toml), on each trace the adaptive planner
/// misses at most 5 % of deadlines and its accuracy is within 1 percentage
/// point of the oracle's.
#[test]
fn adaptive_meets_the_bound_and_tracks_the_oracle_on_every_trace() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let scenario = repo_root().join("scenarios/cellular-trace.toml");
    let mut traces: Vec<Option<PathBuf>> = recorded_traces().into_iter().map(Some).collect();
    traces.push(None);
    for (i, trace) in traces.iter().enumerate() {
        let out = dir.path().join(format!("t{i}"));
        let extra: Vec<&str> = match trace {
            Some(t) => vec!["--trace", t.to_str().unwrap()],
            None => vec![],
        };
        let r = replay(&scenario, &extra, &out);
        let (adaptive, oracle, stat) = (policy(&r, "adaptive"), policy(&r, "oracle"), policy(&r, "static"));
        let name = trace.as_ref().map_or("synthetic-cellular.up".into(), |t| t.display().to_string());
        eprintln!(
            "{name}: static {:.2} % acc {:.2} % misses; adaptive {:.2} % / {:.2} %; oracle {:.2} % / {:.2} %",
            100.0 * stat.totals.accuracy,
            100.0 * stat.totals.deadline_miss_rate,
            100.0 * adaptive.totals.accuracy,
            100.0 * adaptive.totals.deadline_miss_rate,
            100.0 * oracle.totals.accuracy,
            100.0 * oracle.totals.deadline_miss_rate
        );
        assert!(adaptive.totals.deadline_miss_rate <= 0.05, "{name}: adaptive misses {}", adaptive.totals.deadline_miss_rate);
        assert!(oracle.totals.accuracy - adaptive.totals.accuracy <= 0.01, "{name}: adaptive {} vs oracle {}", adaptive.totals.accuracy, oracle.totals.accuracy);
        assert!(oracle.oracle_choices.as_ref().is_some_and(|c| c[0].plans.len() == 14), "{name}: one choice per 10-s window");

        // The planner that chooses codecs against the f32-only one: int8
        // activations, a third of the bytes per offload or less, and no
        // accuracy given up beyond 0.2 points.
        let f32_only = policy(&r, "adaptive-f32");
        let per_offload = |p: &branchpoint::scenario::report::PolicyReport| {
            let c = &p.totals.offloads_by_codec;
            p.totals.uplink_bytes as f64 / (c.f32 + c.f16 + c.int8).max(1) as f64
        };
        eprintln!(
            "{name}: f32-only {:.2} % acc, {} misses, {:.0} B per offload; codecs {:.2} %, {} misses, {:.0} B per offload ({:?})",
            100.0 * f32_only.totals.accuracy,
            f32_only.totals.deadline_misses,
            per_offload(f32_only),
            100.0 * adaptive.totals.accuracy,
            adaptive.totals.deadline_misses,
            per_offload(adaptive),
            adaptive.totals.offloads_by_codec
        );
        assert_eq!((f32_only.totals.offloads_by_codec.f16, f32_only.totals.offloads_by_codec.int8), (0, 0), "{name}: f32 only");
        assert!(adaptive.totals.offloads_by_codec.int8 > adaptive.totals.offloads_by_codec.f32, "{name}: {:?}", adaptive.totals.offloads_by_codec);
        assert!(per_offload(adaptive) < per_offload(f32_only) / 3.0, "{name}: {} vs {} bytes per offload", per_offload(adaptive), per_offload(f32_only));
        assert!(adaptive.totals.accuracy >= f32_only.totals.accuracy - 0.002, "{name}: {} vs {}", adaptive.totals.accuracy, f32_only.totals.accuracy);
    }
}

/// scenarios/load-step-fleet.toml: 1,200 devices step from 600 to 6,000
/// inputs/s for 20 s. The cloud-aware planner leaves no more offloads
/// unanswered during the step (refused, expired or late: fallbacks) than
/// the one blind to the pool, for no more worker-seconds, and both stay far
/// below the fixed plan. With the cloud twice as slow, the step overloads
/// the pool: the cloud-aware planner, keeping each device within its share
/// of the pool as the workers' statuses tell it (a second old at most),
/// leaves at most two thirds as many unanswered as the blind one.
#[test]
fn the_cloud_aware_planner_through_a_load_step() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let shipped = repo_root().join("scenarios/load-step-fleet.toml");
    let step = |r: &ScenarioReport, name: &str| {
        let s = &policy(r, name).series;
        let inputs: u64 = s.inputs[20..40].iter().sum();
        let unanswered: f64 = s.fallback_rate[20..40].iter().zip(&s.inputs[20..40]).map(|(f, &n)| f.unwrap_or(0.0) * n as f64).sum();
        (unanswered.round() as u64, inputs, policy(r, name).worker_seconds.expect("an autoscaled pool"))
    };
    let r = replay(&shipped, &[], &dir.path().join("shipped"));
    let ((aware, n, aware_ws), (blind, _, blind_ws), (fixed, _, _)) = (step(&r, "adaptive-network"), step(&r, "adaptive-cloud-blind"), step(&r, "static"));
    eprintln!("load step, 20-40 s ({n} inputs): unanswered offloads cloud-aware {aware}, blind {blind}, static {fixed}; worker-seconds {aware_ws} and {blind_ws}");
    assert!(aware <= blind, "cloud-aware {aware} vs blind {blind}");
    assert!(aware * 20 < fixed, "the planners against the fixed plan: {aware} vs {fixed}");
    assert!(aware_ws <= blind_ws, "worker-seconds {aware_ws} vs {blind_ws}");

    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("cloud_slowdown = 3.0"), "the test edits this key");
    let slower = dir.path().join("slower.toml");
    std::fs::write(&slower, text.replace("cloud_slowdown = 3.0", "cloud_slowdown = 6.0")).unwrap();
    let r = replay(&slower, &[], &dir.path().join("slower"));
    let ((aware, _, aware_ws), (blind, _, blind_ws)) = (step(&r, "adaptive-network"), step(&r, "adaptive-cloud-blind"));
    eprintln!("load step, cloud twice as slow: unanswered offloads cloud-aware {aware}, blind {blind}; worker-seconds {aware_ws} and {blind_ws}");
    assert!(aware * 3 <= blind * 2 && aware_ws <= blind_ws, "cloud-aware {aware} unanswered, {aware_ws} worker-s; blind {blind}, {blind_ws}");
}

/// `calibration = "certified"`: every p_tar is a target on-device accuracy
/// whose threshold is certified on the validation split. The report says
/// so, the static plan runs the certified threshold (far below the target
/// on a calibrated branch), and every policy's on-device accuracy stands
/// beside what its plans predicted.
#[test]
fn a_certified_scenario_runs_certified_thresholds_and_checks_its_predictions() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo_root().join("scenarios/lte-handover.toml"))
        .unwrap()
        .replace("duration_s = 120.0", "duration_s = 30.0\ncalibration = \"certified\"\npolicies = [\"static\", \"adaptive-network\", \"adaptive\"]");
    assert!(text.contains("p_tar = 0.9") && text.contains("branch = 1"), "the test reads the static plan");
    let path = dir.path().join("certified.toml");
    std::fs::write(&path, &text).unwrap();
    let r = replay(&path, &[], &dir.path().join("out"));
    assert!(r.model.threshold_rule.starts_with("certified"), "{}", r.model.threshold_rule);
    let stat = policy(&r, "static");
    let p_tar = stat.series.p_tar.iter().flatten().next().copied().unwrap();
    assert!(p_tar < 0.8, "the threshold certified for 90 % on-device accuracy at branch 1 ({p_tar}) sits well below 0.9");
    let edge = stat.totals.edge_accuracy.unwrap();
    assert!(edge >= 0.89, "the static plan's on-device accuracy {edge} is close to its target or above");
    for name in ["static", "adaptive-network", "adaptive"] {
        let checks = &policy(&r, name).edge_by_branch;
        let used: Vec<_> = checks.iter().filter(|c| c.exits > 0).collect();
        assert!(!used.is_empty(), "{name}: inputs exited somewhere: {checks:?}");
        for c in used {
            let (m, p) = (c.measured_edge_accuracy.unwrap(), c.predicted_edge_accuracy.unwrap());
            assert!((m - p).abs() < 0.05, "{name}, branch {}: measured {m} vs predicted {p}", c.branch);
        }
    }
    // A delta outside (0, 1) is refused, naming the key.
    std::fs::write(&path, format!("{text}\n[planner]\ncertify_delta = 1.5\n")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&path), Duration::from_secs(30));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("planner.certify_delta"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A group with a service level: the adaptive planner chooses only among
/// plans certified for it on the validation split (every branch at once),
/// spending the fewest offloads, and predicts on-device accuracy at or
/// above the level wherever its devices kept inputs; a level the model
/// cannot certify is refused before anything runs, naming the most it can,
/// and so is a level in a real-time scenario.
#[test]
fn a_service_level_plans_only_among_certified_plans_and_a_level_beyond_reach_is_refused() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let level = "\n[groups.level]\naccuracy = 0.9\ndelta = 0.05\nmiss_bound = 0.01\nminimise = \"offloads\"\n";
    let text = std::fs::read_to_string(repo_root().join("scenarios/lte-handover.toml"))
        .unwrap()
        .replace("duration_s = 120.0", "duration_s = 30.0\npolicies = [\"adaptive\"]")
        .replacen("p_tar = 0.9\n", &format!("p_tar = 0.9{level}"), 1);
    assert!(text.contains("[groups.level]"), "the test adds the level to the group");
    let path = dir.path().join("level.toml");
    std::fs::write(&path, &text).unwrap();
    let r = replay(&path, &[], &dir.path().join("out"));
    let adaptive = policy(&r, "adaptive");
    let used: Vec<_> = adaptive.edge_by_branch.iter().filter(|c| c.exits > 0).collect();
    assert!(!used.is_empty(), "inputs stayed on the device somewhere: {:?}", adaptive.edge_by_branch);
    for c in used {
        let p = c.predicted_edge_accuracy.unwrap();
        assert!(p >= 0.9, "branch {}: every plan used was certified for 0.9 on validation, predicted {p}", c.branch);
    }
    assert!(adaptive.totals.deadline_miss_rate <= 0.05, "{}", adaptive.totals.deadline_miss_rate);
    // Beyond what 5,000 validation inputs certify.
    std::fs::write(&path, text.replace("accuracy = 0.9\ndelta = 0.05", "accuracy = 0.999\ndelta = 0.01")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&path), Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("groups.phones.level") && err.contains("the most it certifies at delta 0.01 is 0."), "{err}");
    // Out of range, and in real time.
    std::fs::write(&path, text.replace("delta = 0.05", "delta = 1.5")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&path), Duration::from_secs(30));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("level"), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::write(&path, text.replace("duration_s = 30.0", "duration_s = 30.0\ntime = \"real\"")).unwrap();
    let o = output_within(branchpoint().arg("run").arg(&path), Duration::from_secs(30));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("virtual time only"), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The shipped input-shift scenario on the overconfident model: the
/// fixed plans fall below the target after the shift, the watched one
/// detects it, refits on inputs from after its alarm, and ends with its
/// on-device accuracy at or above the target (or nothing left on the
/// device); audits change no outcome, and the live interval covers the truth.
#[test]
fn the_watched_policy_detects_an_input_shift_and_refits() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let model = repo_root().join("models/bvgg-fmnist.safetensors");
    let r = replay(&repo_root().join("scenarios/input-shift.toml"), &["--model", model.to_str().unwrap()], &dir.path().join("out"));
    assert!(std::fs::metadata(dir.path().join("out/calibration-watched.png")).map(|m| m.len() > 10_000).unwrap_or(false));
    let shift_bin = 90;
    let edge_after = |name: &str| {
        let p = policy(&r, name);
        let (mut right, mut n) = (0.0, 0.0);
        for (i, (a, inputs)) in p.series.edge_accuracy.iter().zip(&p.series.inputs).enumerate().skip(shift_bin) {
            let on_device = *inputs as f64 * (1.0 - p.series.offload_rate[i].unwrap_or(1.0));
            if let Some(a) = a {
                right += a * on_device;
                n += on_device;
            }
        }
        (n > 0.0).then(|| right / n)
    };
    for name in ["static", "uncalibrated"] {
        let a = edge_after(name).unwrap();
        assert!(a < 0.9, "{name}: on-device accuracy {a} after the shift is below the 0.9 target");
    }
    let watched = policy(&r, "watched");
    let w = &watched.watch[0];
    let delay = w.detection_delay_s.expect("the shift is detected");
    assert!(delay > 0.0 && delay < 120.0, "detected {delay} s after the shift");
    let refit = w.refits.first().expect("and the branch refit");
    assert!(refit.t_s > 90.0 + delay - 1e-9, "the refit learns from inputs after the alarm: {refit:?}");
    assert!(refit.temperature > r.model.temperatures[0], "the shifted branch is more overconfident: {refit:?}");
    // After the refit, what stays on the device meets the target.
    let from = refit.t_s.ceil() as usize + 1;
    let (mut right, mut n) = (0.0, 0.0);
    for (i, a) in watched.series.edge_accuracy.iter().enumerate().skip(from) {
        if let Some(a) = a {
            let on_device = watched.series.inputs[i] as f64 * (1.0 - watched.series.offload_rate[i].unwrap_or(1.0));
            right += a * on_device;
            n += on_device;
        }
    }
    assert!(n == 0.0 || right / n >= 0.9, "after the refit: {} on the device, accuracy {}", n, right / n);
    // Audits never change an outcome: before the shift (no refit yet) the
    // watched run's bins are the static run's.
    let stat = policy(&r, "static");
    assert_eq!(watched.series.accuracy[..shift_bin], stat.series.accuracy[..shift_bin]);
    assert_eq!(watched.series.offload_rate[..shift_bin], stat.series.offload_rate[..shift_bin]);
    assert!(w.audits > 0 && w.audit_uplink_share.unwrap() > 0.0 && w.audit_uplink_share.unwrap() < 0.2, "{:?}", w.audit_uplink_share);
    assert!(w.interval_coverage.unwrap() >= 0.9, "the live interval holds the truth in {:?} of windows", w.interval_coverage);
    // Per 10 s, the plan in force's prediction beside what happened: the
    // refit's predicted agreement holds, within sampling error, in every
    // window after it.
    assert_eq!(w.windows.len(), 30);
    let predicted = refit.predicted_agreement.expect("the refit certified a threshold inputs exit at");
    let after: Vec<_> = w.windows.iter().filter(|x| x.start_s >= refit.t_s).collect();
    assert!(!after.is_empty());
    for x in after {
        assert_eq!(x.predicted, Some(predicted));
        let m = x.measured_agreement.unwrap();
        assert!((m - predicted).abs() < 0.05, "window from {} s: measured agreement {m}, predicted {predicted}", x.start_s);
    }
}

#[test]
fn the_trace_command_regenerates_the_shipped_trace() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t.up");
    let o = output_within(branchpoint().args(["trace", "--out"]).arg(&out), Duration::from_secs(30));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shipped = std::fs::read(repo_root().join("scenarios/traces/synthetic-cellular.up")).unwrap();
    assert!(std::fs::read(&out).unwrap() == shipped, "scenarios/traces/synthetic-cellular.up is `branchpoint trace` with its defaults");
}

/// The input shift in real time across a real NATS server (the shipped
/// input-shift-live scenario): the watched devices audit, the workers send
/// the final exit's answers to the run's calibrator, its drift test alarms
/// after the shift, and its refit reaches the running devices through the
/// control store: they decide with the refit threshold from then on. The
/// live estimate's interval holds the truth, and the calibrated-once
/// devices stay below the target. Without --nats the run refuses at once.
/// The calibrated-once baseline is the same scenario's static policy in
/// virtual time (the same arrivals and decisions as live, which
/// `real_time_over_nats_agrees_with_virtual_time` checks), so that only the
/// watched policy spends wall-clock time: 25 s, not the shipped 30 (the
/// refit comes about 10 s after the shift at 8 s, and the test needs a few
/// bins after it).
#[test]
fn a_live_shift_is_detected_and_the_refit_reaches_the_devices_through_the_store() {
    let _cpu = alone();
    let shipped = repo_root().join("scenarios/input-shift-live.toml");
    let model = repo_root().join("models/bvgg-fmnist.safetensors");
    let model = model.to_str().unwrap();
    let o = output_within(branchpoint().arg("run").arg(&shipped).args(["--model", model]), Duration::from_secs(30));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("needs --nats") && err.contains("input-shift-live.toml"), "{err}");

    let store = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("policies = [\"static\", \"watched\"]") && text.contains("time = \"real\"") && text.contains("duration_s = 30.0"), "the test edits these keys");
    let variant = |name: &str, time: &str, policy: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            text.replace("policies = [\"static\", \"watched\"]", &format!("policies = [\"{policy}\"]"))
                .replace("time = \"real\"", &format!("time = \"{time}\""))
                .replace("duration_s = 30.0", "duration_s = 25.0"),
        )
        .unwrap();
        path
    };
    let r = replay(&variant("input-shift-live.toml", "real", "watched"), &["--nats", &nats.url, "--model", model], &dir.path().join("out"));
    assert_eq!(r.time, "real");
    let once = replay(&variant("static.toml", "virtual", "static"), &["--model", model], &dir.path().join("static"));
    let (stat, watched) = (policy(&once, "static"), policy(&r, "watched"));
    assert_eq!(stat.totals.inputs, watched.totals.inputs, "the same arrivals");
    let shift_s = 8.0;
    // Per-second on-device accuracy, weighted by on-device inputs, from `from` s on.
    let edge_from = |p: &branchpoint::scenario::report::PolicyReport, from: usize| {
        let (mut right, mut n) = (0.0, 0.0);
        for (i, a) in p.series.edge_accuracy.iter().enumerate().skip(from) {
            if let Some(a) = a {
                let on_device = p.series.inputs[i] as f64 * (1.0 - p.series.offload_rate[i].unwrap_or(1.0));
                right += a * on_device;
                n += on_device;
            }
        }
        right / n
    };
    let before = edge_from(stat, 0).min(1.0);
    let after_static = edge_from(stat, shift_s as usize + 1);
    assert!(after_static < 0.9, "calibrated once, the on-device accuracy falls below the 0.9 target after the shift: {after_static} (before: {before})");
    let w = &watched.watch[0];
    let delay = w.detection_delay_s.expect("the shift is detected live");
    assert!(delay > 0.0, "{delay}");
    // The virtual-time twin runs the same watch on the same audits and
    // alarms too, within seconds of the live run: 0.24 s apart on an idle
    // 2-core machine, 2.25 s with a build running beside it (live, audits
    // reach the calibrator later when the devices fall behind), so 5 s is
    // the bound checked. (Its refit threshold is not compared: the refit
    // splits its sample in the order audits reach the calibrator, which
    // the network reorders, and at ~400 inputs a half moves the certified
    // threshold by 0.1; see the README.)
    let twin = replay(&variant("watched-virtual.toml", "virtual", "watched"), &["--model", model], &dir.path().join("twin"));
    let twin_delay = policy(&twin, "watched").watch[0].detection_delay_s.expect("the twin detects the shift");
    assert!((twin_delay - delay).abs() <= 5.0, "alarm {delay} s after the shift live, {twin_delay} s in virtual time");
    let refit = w.refits.first().expect("and the branch refit");
    assert!(refit.t_s > shift_s + delay - 1e-6 && refit.temperature > r.model.temperatures[0], "{refit:?}");
    // The refit reached the running devices through the control store: the
    // bins after it hold the refit threshold (the only way it gets to them).
    let from = refit.t_s.ceil() as usize + 1;
    assert!(from + 2 < watched.series.p_tar.len(), "the refit at {} s leaves time to see it applied", refit.t_s);
    let p_tars: Vec<f64> = watched.series.p_tar[from + 1..].iter().flatten().copied().collect();
    assert!(!p_tars.is_empty() && p_tars.iter().all(|p| (p - refit.threshold).abs() < 1e-9), "the devices decide with the refit threshold {}: {p_tars:?}", refit.threshold);
    // The refit plan keeps the devices near the target: the on-device
    // agreement with the final exit of every input decided under it (the
    // last point: each point pools the window since the refit) and every
    // point after the first few seconds (which hold few inputs) stay
    // within about twice the drift margin of it; the accuracy against the
    // labels rises above the calibrated-once one. Not the certificate's
    // promise: six live runs on 2026-12-07 gave 0.872 to 0.942 pooled
    // against the certified 0.9 (thresholds 0.77 to 0.84; half fell short).
    // The watched refit certifies on the ~400 inputs of the three seconds
    // after the alarm, and those are not exchangeable with the inputs that
    // follow (BENCHMARKS.md); the adaptive policy's refit is checked in
    // `the_adaptive_control_loop_runs_live_and_its_planner_is_the_one_writer_of_plans`.
    let agreement: Vec<f64> = w.true_edge_agreement[from..].iter().flatten().copied().collect();
    let pooled = *agreement.last().expect("points after the refit");
    assert!(pooled > 0.86 && agreement.iter().skip(3).all(|&a| a > 0.84), "{agreement:?}");
    if refit.threshold < 1.0 {
        let after_watched = edge_from(watched, from);
        assert!(after_watched > after_static, "watched {after_watched} vs calibrated once {after_static} after the shift: {refit:?}");
    } else {
        // The sample certified no threshold below 1 (which sample the
        // refit gets depends on when audits arrive): the certificate then
        // keeps nothing on the device, and the devices offload every input.
        let rates: Vec<f64> = watched.series.offload_rate[from + 1..].iter().flatten().copied().collect();
        assert!(!rates.is_empty() && rates.iter().all(|&r| r == 1.0), "threshold 1 offloads every input: {rates:?}");
    }
    assert!(w.interval_coverage.unwrap() >= 0.9, "the live interval holds the truth in {:?} of windows", w.interval_coverage);
    assert!(w.audits > 0 && w.audit_uplink_share.is_some_and(|s| s > 0.0 && s < 0.5), "{:?}", w.audit_uplink_share);
    let shift_bin = shift_s as usize;
    let calm: Vec<f64> = w.true_edge_agreement[..shift_bin].iter().flatten().copied().collect();
    assert!(calm.iter().all(|&a| a > 0.95), "before the shift the branch keeps its target: {calm:?}");
}

/// scenarios/stationary-hour.toml: an hour of virtual time, 200 devices,
/// clean inputs and a steady link. The adaptive policy's tests never alarm,
/// and its plans do not flap: at most two plan changes per device-hour
/// (the first plan, and one more).
#[test]
fn a_stationary_hour_raises_no_alarm_and_the_plans_do_not_flap() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let model = repo_root().join("models/bvgg-fmnist.safetensors");
    let r = replay(&repo_root().join("scenarios/stationary-hour.toml"), &["--model", model.to_str().unwrap()], dir.path());
    let adaptive = policy(&r, "adaptive");
    assert_eq!(adaptive.totals.inputs, r.policies[0].totals.inputs);
    assert!(adaptive.totals.inputs > 1_400_000, "{}", adaptive.totals.inputs);
    let w = &adaptive.watch[0];
    assert!(w.refits.is_empty() && w.alarms_without_refit_s.is_empty(), "alarms {:?}, refits {:?}", w.alarms_without_refit_s, w.refits);
    let changes = adaptive.plan_changes_per_device_hour.expect("counted");
    assert!(changes > 0.0 && changes <= 2.0, "{changes} plan changes per device-hour");
}

/// The adaptive policy live, across a real NATS server (the shipped
/// input-shift-live scenario, adaptive only, 20 s): the devices audit, the
/// workers send the final exit's answers to the planner's control loop, the
/// shift sets off its alarm, a refit follows, and the re-plans reach the
/// running devices through the control store. The planner is the one
/// writer of their plans, counted on the store's own subject: every plan
/// written in the run is a device's, each carries the temperature it was
/// chosen at (which only the control loop's planner sets), and no group
/// plan is written.
#[test]
fn the_adaptive_control_loop_runs_live_and_its_planner_is_the_one_writer_of_plans() {
    let _cpu = alone();
    let shipped = repo_root().join("scenarios/input-shift-live.toml");
    let model = repo_root().join("models/bvgg-fmnist.safetensors");
    let store = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("policies = [\"static\", \"watched\"]") && text.contains("duration_s = 30.0") && text.contains("at_s = 8.0"), "the test edits these keys");
    let path = dir.path().join("adaptive.toml");
    std::fs::write(&path, text.replace("policies = [\"static\", \"watched\"]", "policies = [\"adaptive\"]").replace("duration_s = 30.0", "duration_s = 20.0")).unwrap();
    let writes = common::Watch::<PlanUpdate>::new(&nats.url, "$KV.branchpoint-plans.>");
    let r = replay(&path, &["--nats", &nats.url, "--model", model.to_str().unwrap()], &dir.path().join("out"));
    let adaptive = policy(&r, "adaptive");
    let w = &adaptive.watch[0];
    let delay = w.detection_delay_s.expect("the shift is detected live");
    assert!(delay > 0.0 && delay < 10.0, "alarm {delay} s after the shift");
    let refit = w.refits.first().expect("a refit follows the alarm");
    assert!(refit.t_s >= 8.0 + delay - 1e-6 && refit.t_s < 8.0 + delay + 5.0, "refit at {} s, alarm {delay} s after the shift at 8 s", refit.t_s);
    assert!(adaptive.totals.deadline_miss_rate <= 0.01, "{:?}", adaptive.totals);
    // The writes to the plans bucket: the planner's, to devices only.
    let plans = writes.wait("the plans written in the run", Duration::from_secs(10), |v| (!v.is_empty()).then(|| v.to_vec()));
    assert!(
        plans.iter().all(|p| matches!(p.target, PlanTarget::Device(_)) && p.temperature.is_some()),
        "a plan not from the control loop's planner: {:?}",
        plans.iter().find(|p| !matches!(p.target, PlanTarget::Device(_)) || p.temperature.is_none())
    );
    let devices: std::collections::BTreeSet<String> = plans.iter().filter_map(|p| if let PlanTarget::Device(d) = &p.target { Some(d.clone()) } else { None }).collect();
    assert_eq!(devices.len(), 20, "every device got its plans through the store");
    // After the refit every device was re-planned on its evidence: a plan at
    // the refit temperature for each, and the devices answer on the device
    // in agreement with the final exit at the target.
    let replanned: std::collections::BTreeSet<String> =
        plans.iter().filter(|p| p.temperature.is_some_and(|t| (t - refit.temperature).abs() < 1e-9)).map(|p| format!("{:?}", p.target)).collect();
    assert_eq!(replanned.len(), 20, "every device re-planned at the refit's temperature {}", refit.temperature);
    let after: Vec<&branchpoint::scenario::report::WatchWindow> = w.windows.iter().filter(|x| x.start_s >= refit.t_s && x.on_device > 100).collect();
    assert!(after.iter().all(|x| x.measured_agreement.is_some_and(|a| a >= w.target - 0.03)), "{after:?}");
}

/// Real time, across a real NATS server: the live devices, workers and
/// planner make the same arrivals and nearly the same decisions as the
/// virtual-time replay of the same scenario. Only the adaptive policy runs
/// live (it uses every live part the static one does, and the planner
/// besides); the static baseline it is compared with runs in virtual time.
#[test]
fn real_time_over_nats_agrees_with_virtual_time() {
    let _cpu = alone();
    let store = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let dir = tempfile::tempdir().unwrap();
    // lte-handover squeezed into 16 s: the link drops at 6 s and returns at 12 s.
    let squeezed = |policies: &str| {
        std::fs::read_to_string(repo_root().join("scenarios/lte-handover.toml"))
            .unwrap()
            .replace("duration_s = 120.0", &format!("duration_s = 16.0\npolicies = {policies}"))
            .replace("devices = 20", "devices = 10")
            .replace("at_s = 40.0", "at_s = 6.0")
            .replace("at_s = 60.0", "at_s = 9.0")
            .replace("at_s = 65.0", "at_s = 10.0")
            .replace("at_s = 70.0", "at_s = 12.0")
    };
    let (live_path, virtual_path) = (dir.path().join("live.toml"), dir.path().join("virtual.toml"));
    std::fs::write(&live_path, squeezed("[\"adaptive-network\"]")).unwrap();
    std::fs::write(&virtual_path, squeezed("[\"static\", \"adaptive-network\"]")).unwrap();
    // The live replay embeds the HTTP API (--listen): a poller records which
    // fleets and workers it shows while the policy runs.
    let api = format!("127.0.0.1:{}", common::port());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::<String, u64>::new()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (api, seen, done) = (api.clone(), seen.clone(), done.clone());
        std::thread::spawn(move || {
            let mut workers = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(r) = common::try_http("GET", &api, "/api/fleet", None, None) {
                    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
                    for f in v["fleets"].as_array().into_iter().flatten() {
                        let inputs = f["summary"]["inputs"].as_u64().unwrap_or(0);
                        let mut seen = seen.lock().unwrap();
                        let e = seen.entry(f["fleet_id"].as_str().unwrap_or("?").to_string()).or_default();
                        *e = (*e).max(inputs);
                    }
                    workers = workers.max(v["totals"]["workers"].as_u64().unwrap_or(0));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            workers
        })
    };
    let live = replay(&live_path, &["--nats", &nats.url, "--listen", &api], &dir.path().join("live"));
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let workers = poller.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let inputs = seen.get("lte-handover-adaptive-network").copied();
    assert!(inputs.is_some_and(|n| n > 100), "the embedded API showed the adaptive run as a fleet: {seen:?}");
    assert!(workers >= 1, "the embedded API showed the run's workers");
    let virt = replay(&virtual_path, &[], &dir.path().join("virtual"));
    assert_eq!((live.time.as_str(), virt.time.as_str()), ("real", "virtual"));
    let (l, v) = (&policy(&live, "adaptive-network").totals, &policy(&virt, "adaptive-network").totals);
    eprintln!("adaptive: live {l:?}\nadaptive: virtual {v:?}");
    assert_eq!(l.inputs, v.inputs, "the same arrivals");
    assert!((l.accuracy - v.accuracy).abs() < 0.02, "accuracy live {} virtual {}", l.accuracy, v.accuracy);
    assert!((l.deadline_miss_rate - v.deadline_miss_rate).abs() < 0.03, "misses live {} virtual {}", l.deadline_miss_rate, v.deadline_miss_rate);
    // The live devices count what they put on the uplink, per codec, as
    // the virtual replay does: its planner starts them on int8.
    let sent = |c: &CodecCounts| c.f32 + c.f16 + c.int8;
    let (l_sent, v_sent) = (sent(&l.offloads_by_codec), sent(&v.offloads_by_codec));
    assert!(l.offloads_by_codec.int8 > 0 && l_sent > 0, "live offloads by codec: {:?}", l.offloads_by_codec);
    let (l_per, v_per) = (l.uplink_bytes as f64 / l_sent as f64, v.uplink_bytes as f64 / v_sent.max(1) as f64);
    assert!((l_per / v_per - 1.0).abs() < 0.15, "bytes per offload live {l_per:.0}, virtual {v_per:.0}");
    // The live planner got reports over NATS and its plans reached the devices.
    let adaptive = policy(&live, "adaptive-network");
    assert!(adaptive.series.estimated_uplink_mbit_s.as_ref().unwrap().iter().flatten().count() > 5, "reports reached the planner");
    let p_tar_late: Vec<f64> = adaptive.series.p_tar[10..14].iter().flatten().copied().collect();
    assert!(p_tar_late.iter().all(|&p| p < 0.5), "during the outage the devices run the planner's low p_tar: {p_tar_late:?}");
    // What the planner saves the devices from: the fixed plan misses during the drop.
    assert!(policy(&virt, "static").totals.deadline_miss_rate > 0.05, "{:?}", policy(&virt, "static").totals);
}

/// scenarios/load-step.toml: 200 inputs/s, 2,000 from 20 s to 40 s, 200
/// again. The autoscaled pool grows within seconds of the step, never
/// beyond max_workers, shrinks back to one worker after it, and during the
/// step answers faster than one worker does, for less than a fixed pool of
/// four costs.
#[test]
fn the_pool_follows_a_load_step_out_and_back_in() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let shipped = repo_root().join("scenarios/load-step.toml");
    let scaled = replay(&shipped, &[], &dir.path().join("scaled"));
    assert!(std::fs::metadata(dir.path().join("scaled/workers.png")).is_ok_and(|m| m.len() > 10_000), "workers.png written");
    // The same scenario with a pool of one.
    let text = std::fs::read_to_string(&shipped).unwrap();
    assert!(text.contains("max_workers = 4") && text.contains("count = 1"), "the test edits these keys");
    let one_path = dir.path().join("one-worker.toml");
    std::fs::write(&one_path, text.replace("max_workers = 4", "max_workers = 1")).unwrap();
    let one = replay(&one_path, &[], &dir.path().join("one"));

    let mean = |v: &[Option<f64>]| v.iter().map(|x| x.expect("every second has inputs")).sum::<f64>() / v.len() as f64;
    for name in ["static", "cloud-only"] {
        let (p, q) = (policy(&scaled, name), policy(&one, name));
        let workers = p.series.workers.as_ref().expect("autoscaled runs report their pool");
        eprintln!("{name}: workers {workers:?}");
        assert!(workers.iter().all(|&w| (1.0..=4.0).contains(&w)), "{name}: within min_workers..=max_workers: {workers:?}");
        assert!(workers[..20].iter().all(|&w| w == 1.0), "{name}: one worker serves the light load: {workers:?}");
        assert!(workers[20..25].iter().any(|&w| w > 1.0), "{name}: the pool grows within 5 s of the step at 20 s: {workers:?}");
        assert!(workers[55..].iter().all(|&w| w == 1.0), "{name}: back to one worker after the step: {workers:?}");
        assert!(p.worker_seconds.unwrap() < 4.0 * scaled.duration_s, "{name}: cheaper than four workers throughout");

        // Once the new workers serve and the backlog is gone (27 s to 40 s),
        // latency is lower than with one worker, which never catches up,
        // and nearly every offload is answered: the lone worker refuses or
        // expires (fallbacks, answered by the branch in time) what it
        // cannot answer before the deadline.
        let (p95, p95_one) = (mean(&p.series.latency_ms_p95.as_ref().unwrap()[27..40]), mean(&q.series.latency_ms_p95.as_ref().unwrap()[27..40]));
        let (unanswered, unanswered_one) = (mean(&p.series.fallback_rate[27..40]), mean(&q.series.fallback_rate[27..40]));
        eprintln!("{name}, 27-40 s: p95 {p95:.1} ms, fallbacks {:.2} % autoscaled; one worker {p95_one:.1} ms, {:.2} %", 100.0 * unanswered, 100.0 * unanswered_one);
        assert!(p95 + 10.0 < p95_one, "{name}: p95 {p95} ms autoscaled vs {p95_one} ms with one worker");
        assert!(unanswered < 0.01 && unanswered_one > 0.01 + 2.0 * unanswered, "{name}: fallbacks {unanswered} autoscaled vs {unanswered_one} with one worker");
        assert!(mean(&q.series.deadline_miss_rate[27..40]) < 0.01, "{name}: the lone worker's overload is not answered late");
        assert_eq!(p.totals.inputs, q.totals.inputs, "{name}: the same arrivals");
    }
}

/// The replay is the live system's twin, overload included:
/// scenarios/load-step-live.toml (a load step that overloads the one
/// worker) run live over a real NATS server and in virtual time, with the
/// same seed. Its workers are paced to the profile's batch times (60 times
/// slower hardware), and the devices' heads take a fraction of a
/// millisecond against a 200 ms deadline, so the comparison holds on any
/// machine that keeps up. Per policy, cloud answers, fallbacks by reason,
/// deadline misses, offloads and the mean batch agree within 10 % (or 20
/// inputs, whichever is larger): the live worker and the replay's run the
/// same batching policy (`core::batching`), and count outcomes the same
/// way (`core::outcome`).
#[test]
fn an_overloaded_pool_runs_live_as_its_virtual_time_twin_predicts() {
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    let path = repo_root().join("scenarios/load-step-live.toml");
    let store = tempfile::tempdir().unwrap();
    let nats = common::NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let live = replay(&path, &["--nats", &nats.url], &dir.path().join("live"));
    let virt = replay(&path, &[], &dir.path().join("virtual"));
    assert_eq!((live.time.as_str(), virt.time.as_str()), ("real", "virtual"));
    let close = |what: &str, policy: &str, l: f64, v: f64| {
        assert!((l - v).abs() <= (0.1 * v.abs()).max(20.0), "{policy}: {what} live {l}, virtual {v}");
    };
    for name in ["static", "adaptive-network"] {
        let (l, v) = (policy(&live, name), policy(&virt, name));
        eprintln!("{name}: live {:?} {:?}\n{name}: virtual {:?} {:?}", l.totals, l.mean_batch, v.totals, v.mean_batch);
        assert_eq!(l.totals.inputs, v.totals.inputs, "the same arrivals");
        let n = v.totals.inputs as f64;
        close("offloads", name, l.totals.offload_rate * n, v.totals.offload_rate * n);
        close("cloud answers", name, l.totals.answered_by_cloud as f64, v.totals.answered_by_cloud as f64);
        close("deadline misses", name, l.totals.deadline_misses as f64, v.totals.deadline_misses as f64);
        for reason in ["deadline", "refused", "expired", "no-responders", "error-reply", "transport", "disconnected"] {
            let count = |p: &branchpoint::scenario::report::PolicyReport| p.totals.fallbacks_by_reason.get(reason).copied().unwrap_or(0) as f64;
            close(&format!("{reason} fallbacks"), name, count(l), count(v));
        }
        let (lb, vb) = (l.mean_batch.unwrap(), v.mean_batch.unwrap());
        assert!((lb / vb - 1.0).abs() <= 0.1, "{name}: mean batch live {lb}, virtual {vb}");
    }
    // The step overloads the worker under the fixed plan: it refuses and
    // expires offloads (fallbacks answered in time), and the adaptive
    // planner keeps within what the worker serves.
    let s = &policy(&virt, "static").totals;
    assert!(s.fallbacks_by_reason.get("refused").copied().unwrap_or(0) > 100, "{s:?}");
    assert!(policy(&virt, "adaptive-network").totals.fallbacks * 10 < s.fallbacks, "{:?}", policy(&virt, "adaptive-network").totals);
}
