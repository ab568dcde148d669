//! The control plane end to end: `branchpoint stack up` (a real nats-server
//! with JetStream, workers, calibrator, planner, API and a fleet, each its
//! own process), the HTTP API and its dashboard in headless Chromium, the
//! autoscaler under a load step, and resuming from the key-value store.
use crate::common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use branchpoint_actors::collector::Summary;
use common::*;

struct Stack {
    _proc: Proc,
    api: String,
    nats: String,
    dir: PathBuf,
}

fn stack_up(dir: &Path, extra: &[&str]) -> Stack {
    // Room for a cluster's nodes: --nats-port and the two after it.
    let (nats_port, api_port) = (free_ports(3), port());
    let api = format!("127.0.0.1:{api_port}");
    let log = std::fs::File::create(dir.join("stack.log")).unwrap();
    let child = branchpoint()
        .args(["stack", "up", "--dir"])
        .arg(dir)
        .args(["--nats-port", &nats_port.to_string(), "--listen", &api])
        .args(extra)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("stack up starts");
    let mut stack = Stack { _proc: Proc(child), api, nats: format!("nats://127.0.0.1:{nats_port}"), dir: dir.to_path_buf() };
    // The stack says "stack up" once every service has started.
    wait_for("the stack to start", Duration::from_secs(180), || stack.log().contains("stack up:").then_some(()));
    // Its NATS URLs (every node's, in a cluster), from DIR/stack.json.
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("stack.json")).unwrap()).unwrap();
    stack.nats = file["nats_url"].as_str().expect("stack.json names its NATS URL").to_string();
    wait_for("/readyz to answer 200", Duration::from_secs(60), || {
        std::net::TcpStream::connect(&stack.api).ok()?;
        (http("GET", &stack.api, "/readyz", None, None).status == 200).then_some(())
    });
    stack
}

/// A failed test shows what each service said.
impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- stack.log\n{}", self.log());
            for entry in std::fs::read_dir(self.dir.join("logs")).into_iter().flatten().flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("--- {}\n{}", entry.path().display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
        }
    }
}

impl Stack {
    fn metrics(&self) -> String {
        let r = http("GET", &self.api, "/metrics", None, None);
        assert_eq!(r.status, 200);
        r.body
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("stack.log")).unwrap_or_default()
    }

    /// The environment a client of `role` needs: the user and password
    /// from DIR/credentials.env (the stack made them).
    fn role_env(&self, role: &str) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.dir.join("credentials.env")).expect("the stack wrote its credentials");
        let key = format!("BRANCHPOINT_NATS_{}_PASSWORD=", role.to_uppercase());
        let password = text.lines().find_map(|l| l.strip_prefix(&key)).unwrap_or_else(|| panic!("no password for {role}")).to_string();
        vec![("BRANCHPOINT_NATS__USER".into(), role.into()), ("BRANCHPOINT_NATS__PASSWORD".into(), password)]
    }

    /// Workers the stack runs now, from DIR/stack.json.
    fn workers(&self) -> usize {
        let text = std::fs::read_to_string(self.dir.join("stack.json")).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["services"].as_object().map_or(0, |s| s.keys().filter(|k| k.starts_with("worker-")).count())
    }
}

const TOKEN: &str = "test-token-7f3a";
const FLEET: &str = "branchpoint_devices_on_plan{fleet=\"stack-fleet\",group=\"default\"";

#[test]
fn stack_up_serves_metrics_plans_refits_and_the_dashboard() {
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_up(dir.path(), &["--workers", "2", "--devices", "50", "--rate", "5", "--duration", "20", "--token", TOKEN]);
    assert_eq!(http("GET", &stack.api, "/healthz", None, None).status, 200);

    // The fleet reports, with all 50 devices on the starting plan.
    wait_for("the fleet's first status", Duration::from_secs(120), || {
        let m = stack.metrics();
        (metric(&m, "branchpoint_fleet_devices{fleet=\"stack-fleet\"") == Some(50.0)).then_some(())
    });
    // Workers report every second and the fleet every 250 ms, so the
    // fleet's first status may come before a worker's first one reaches the
    // API: wait for both workers' statuses, as evidence, not for a time.
    wait_for("both workers report their load", Duration::from_secs(60), || (metric(&stack.metrics(), "branchpoint_workers ") == Some(2.0)).then_some(()));
    // Prometheus's own linter accepts the exposition (names, base units, types).
    promtool_check(&stack.metrics()).unwrap_or_else(|e| panic!("promtool check metrics: {e}"));

    // Mutations need the token.
    let plan = r#"{"group": "default", "partition_branch": 1, "p_tar": 0.75}"#;
    let r = http("PUT", &stack.api, "/api/plan", None, Some(plan));
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(http("PUT", &stack.api, "/api/plan", Some("wrong"), Some(plan)).status, 401);
    assert_eq!(http("POST", &stack.api, "/api/calibration/refit", None, Some(r#"{"method":"global"}"#)).status, 401);
    // Bodies are validated, with errors that say what to send.
    let r = http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some("{\"group\": "));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("partition_branch"), "{}", r.body);
    for (bad, says) in [
        (r#"{"group": "default", "partition_branch": 3, "p_tar": 0.5}"#, "branches 1 to 2"),
        (r#"{"group": "default", "partition_branch": 1, "p_tar": 1.5}"#, "p_tar"),
        (r#"{"group": "a b", "partition_branch": 1, "p_tar": 0.5}"#, "group name"),
        (r#"{"partition_branch": 1, "p_tar": 0.5}"#, "is the operator's to set"),
        (r#"{"device": "phone-1", "partition_branch": 1, "p_tar": 0.5}"#, "the planner's to write"),
    ] {
        let r = http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(bad));
        assert_eq!(r.status, 422, "{bad}: {}", r.body);
        assert!(r.body.contains(says), "{bad}: {}", r.body);
    }
    let r = http("POST", &stack.api, "/api/calibration/refit", Some(TOKEN), Some(r#"{"method":"isotonic"}"#));
    assert_eq!(r.status, 422, "{}", r.body);

    // With the token, every device holds the new p_tar within a second.
    let put = Instant::now();
    let r = http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(plan));
    assert_eq!(r.status, 200, "{}", r.body);
    let applied = wait_for("devices to hold p_tar 0.75", Duration::from_secs(60), || {
        let m = stack.metrics();
        let on_new: f64 = m.lines().filter(|l| l.starts_with(FLEET) && l.contains("p_tar=\"0.75\"")).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        (on_new == 50.0).then(|| put.elapsed())
    });
    // How fast is the machine's business (BENCHMARKS.md), not the test's.
    eprintln!("all 50 devices reported p_tar 0.75 {applied:?} after the PUT");
    let plans = http("GET", &stack.api, "/api/plan", None, None);
    assert!(plans.body.contains("\"p_tar\":0.75"), "{}", plans.body);

    // A refit through the API reaches the devices: they report the new
    // temperature of their partition branch.
    let before = wait_for("the calibrator's first fit", Duration::from_secs(120), || {
        let r = http("GET", &stack.api, "/api/calibration", None, None);
        (r.status == 200).then_some(r)
    });
    let r = http("POST", &stack.api, "/api/calibration/refit", Some(TOKEN), Some(r#"{"method":"global"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let refit: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(refit["method"], "global");
    let t1 = refit["temperatures"][0].as_f64().unwrap();
    let before: serde_json::Value = serde_json::from_str(&before.body).unwrap();
    assert_ne!(before["temperatures"][0].as_f64().unwrap(), t1, "the refit must change branch 1's temperature for this check to mean anything");
    wait_for("devices to use the refit temperature", Duration::from_secs(60), || {
        let m = stack.metrics();
        let want = format!("temperature=\"{t1}\"");
        let on_new: f64 = m.lines().filter(|l| l.starts_with(FLEET) && l.contains(&want)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        (on_new == 50.0).then_some(())
    });
    let stored = http("GET", &stack.api, "/api/calibration", None, None);
    assert!(stored.body.contains("\"method\":\"global\""), "{}", stored.body);

    // A certified plan: the calibrator finds the threshold, devices hold it,
    // and a refit certifies it again on the new temperatures.
    for (bad, says) in [
        (r#"{"group": "default", "partition_branch": 1, "p_tar": 0.5, "certified": {"accuracy": 0.95, "delta": 0.05}}"#, "(a threshold) and"),
        (r#"{"group": "default", "partition_branch": 1}"#, "(a threshold) and"),
        (r#"{"group": "default", "partition_branch": 1, "certified": {"accuracy": 1.5, "delta": 0.05}}"#, "certified accuracy"),
        (r#"{"group": "default", "partition_branch": 3, "certified": {"accuracy": 0.9, "delta": 0.05}}"#, "branches 1 to 2"),
    ] {
        let r = http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(bad));
        assert_eq!(r.status, 422, "{bad}: {}", r.body);
        assert!(r.body.contains(says), "{bad}: {}", r.body);
    }
    let certified_plan = r#"{"group": "default", "partition_branch": 1, "certified": {"accuracy": 0.95, "delta": 0.05}}"#;
    let r = http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(certified_plan));
    assert_eq!(r.status, 200, "{}", r.body);
    let plan: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((plan["certified"]["accuracy"].as_f64(), plan["certified"]["delta"].as_f64()), (Some(0.95), Some(0.05)), "{plan}");
    let certified_p_tar = plan["p_tar"].as_f64().unwrap();
    assert!(certified_p_tar > 0.0 && certified_p_tar < 1.0, "a threshold is certified at 0.95 on branch 1: {plan}");
    wait_for("devices to hold the certified threshold", Duration::from_secs(60), || {
        let m = stack.metrics();
        let want = format!("p_tar=\"{certified_p_tar}\"");
        let on_new: f64 = m.lines().filter(|l| l.starts_with(FLEET) && l.contains(&want)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum();
        (on_new == 50.0).then_some(())
    });
    let r = http("POST", &stack.api, "/api/calibration/refit", Some(TOKEN), Some(r#"{"method":"per-branch"}"#));
    assert_eq!(r.status, 200, "{}", r.body);
    let plans = http("GET", &stack.api, "/api/plan", None, None);
    let plans: serde_json::Value = serde_json::from_str(&plans.body).unwrap();
    let group = plans["plans"].as_array().unwrap().iter().find(|p| p["group"] == "default").cloned().unwrap();
    assert_eq!(group["certified"]["accuracy"].as_f64(), Some(0.95), "{group}");
    // The refit's reply is sent after the stored plans are certified again.
    assert_ne!(group["p_tar"].as_f64(), Some(certified_p_tar), "per-branch temperatures move the certified threshold: {group}");

    dashboard_in_chromium(&stack.api, dir.path());

    // When the fleet ends, /metrics holds exactly its summary's counts.
    let summary_path = dir.path().join("fleet-summary.json");
    wait_for("the fleet to finish", Duration::from_secs(60), || summary_path.is_file().then_some(()));
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(&summary_path).unwrap()).unwrap();
    assert!(s.inputs > 2_500, "50 devices at 5 inputs/s for 20 s: {} inputs", s.inputs);
    assert_eq!((s.outcomes, s.duplicates), (s.inputs, 0), "nothing lost, nothing twice");
    let m = wait_for("the fleet's final status", Duration::from_secs(5), || {
        let m = stack.metrics();
        (metric(&m, "branchpoint_fleet_running{fleet=\"stack-fleet\"") == Some(0.0)).then_some(m)
    });
    let label = "{fleet=\"stack-fleet\",group=\"default\"}";
    for (name, want) in [
        ("branchpoint_inputs_total", s.inputs),
        ("branchpoint_outcomes_total", s.outcomes),
        ("branchpoint_decided_on_device_total", s.decided_on_device),
        ("branchpoint_offloads_total", s.offloaded),
        ("branchpoint_cloud_answers_total", s.answered_by_cloud),
        ("branchpoint_deadline_misses_total", s.deadline_misses),
        ("branchpoint_errors_total", s.errors),
    ] {
        assert_eq!(metric(&m, &format!("{name}{label}")), Some(want as f64), "{name} against the fleet's summary");
    }
    for (exit, want) in ["branch1", "branch2", "final"].iter().zip(&s.per_exit) {
        let got = metric(&m, &format!("branchpoint_exits_total{{fleet=\"stack-fleet\",group=\"default\",exit=\"{exit}\"}}"));
        assert_eq!(got, Some(*want as f64), "exit {exit}");
    }
    assert!(s.decided_on_device > 0 && s.answered_by_cloud > 0, "both paths were used: {s:?}");
    assert!(!stack.log().contains("exited"), "no service died: {}", stack.log());
}

/// Loads the dashboard in headless Chromium, checks that its script filled
/// in the live numbers, and takes a screenshot (kept under docs/ when
/// BRANCHPOINT_DOCS_SCREENSHOT is set).
fn dashboard_in_chromium(api: &str, dir: &Path) {
    let chromium = Path::new("/usr/bin/chromium");
    assert!(chromium.is_file(), "{} is missing: run scripts/setup.sh (it installs Debian's chromium)", chromium.display());
    let profile = dir.join("chromium-profile");
    let base = |extra: &[&str]| {
        let mut c = std::process::Command::new(chromium);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,860",
            // Long enough for two refreshes of the page's one-second poll.
            "--virtual-time-budget=2500",
        ]);
        c.arg(format!("--user-data-dir={}", profile.display())).args(extra).arg(format!("http://{api}/")).stdin(Stdio::null());
        c
    };
    let dom = output_within(base(&["--dump-dom"]).stderr(Stdio::null()), Duration::from_secs(60));
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains("id=\"devices\">50<"), "the dashboard shows the fleet's 50 devices: {dom}");
    assert!(dom.contains("id=\"workers\">2<"), "and the 2 workers");
    assert!(dom.contains("<td>stack-fleet</td>"), "and the plans the devices hold");
    assert!(dom.contains("id=\"error\"></div>"), "the page reached the API: {dom}");
    let shot = dir.join("dashboard.png");
    let out = output_within(&mut base(&[&format!("--screenshot={}", shot.display())]), Duration::from_secs(60));
    assert!(out.status.success(), "chromium: {}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).expect("chromium wrote the screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (u32::from_be_bytes(png[16..20].try_into().unwrap()), u32::from_be_bytes(png[20..24].try_into().unwrap()));
    assert_eq!((w, h), (1280, 860));
    if std::env::var_os("BRANCHPOINT_DOCS_SCREENSHOT").is_some() {
        std::fs::copy(&shot, repo_root().join("docs/dashboard.png")).unwrap();
    }
}

/// DIR/workers.csv: per autoscaler tick, the load it saw (workers, queue
/// delay, backlog).
fn timeline(dir: &Path) -> Vec<branchpoint_core::autoscale::Load> {
    let text = std::fs::read_to_string(dir.join("workers.csv")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            Some(branchpoint_core::autoscale::Load { workers: f.get(1)?.parse().ok()?, queue_delay_us: f.get(2)?.parse().ok()?, backlog: f.get(3)?.parse().ok()? })
        })
        .collect()
}

#[test]
fn autoscaler_adds_workers_under_a_load_step_and_removes_them_after() {
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    // Workers emulate cloud hardware 10x slower than this machine, so that
    // one saturates under a load two cores can also generate.
    let args = ["--workers", "1", "--min-workers", "1", "--max-workers", "3", "--devices", "0", "--scale-down-after", "3", "--cloud-slowdown", "10", "--token", TOKEN];
    let stack = stack_up(dir.path(), &args);
    // The idle stack stays at one worker, tick after tick.
    let idle = wait_for("five autoscaler ticks of the idle stack", Duration::from_secs(60), || {
        let rows = timeline(dir.path());
        (rows.len() >= 5).then_some(rows)
    });
    assert!(idle.iter().all(|l| l.workers == 1), "{idle:?}");
    assert_eq!(stack.workers(), 1, "{}", stack.log());
    // The step: 20 devices at 20 inputs/s, nearly all offloaded at branch 1,
    // for 7 s: 400 requests/s, more than one (slowed) worker can serve
    // (about 230/s at batch 32). The second worker comes about 2 s in.
    let load_log = dir.path().join("load-step.log");
    let load_ready = dir.path().join("load-step.ready");
    let mut load = branchpoint()
        .envs(stack.role_env("device"))
        .args(["fleet", "--nats", &stack.nats, "--fleet-id", "load-step", "--devices", "20", "--rate", "20", "--duration", "7"])
        .args(["--p-tar", "0.999", "--branch", "1", "--threads", "1", "--deadline-ms", "2000"])
        .arg("--ready-file")
        .arg(&load_ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&load_log).unwrap())
        .spawn()
        .unwrap();
    // The step starts when the fleet has loaded its model and data.
    wait_for("the load fleet to start", Duration::from_secs(60), || load_ready.exists().then_some(()));
    let step = Instant::now();
    let up = wait_for("a second worker", Duration::from_secs(60), || (stack.workers() >= 2).then(|| step.elapsed()));
    let load_status = load.wait().unwrap();
    assert!(load_status.success(), "every input of the load step got its outcome: {}", std::fs::read_to_string(&load_log).unwrap_or_default());
    let ended = Instant::now();
    let down = wait_for("the pool to shrink back to one worker", Duration::from_secs(60), || (stack.workers() == 1).then(|| ended.elapsed()));
    let log = stack.log();
    // Times depend on the machine and are reported, not asserted (see
    // BENCHMARKS.md); what the stack did with the load it saw is checked
    // below, tick by tick.
    eprintln!("autoscaler: second worker {up:?} after the step; back to one {down:?} after the load ended\n{log}");
    assert!(log.contains("autoscaler: 1 -> 2 workers"), "{log}");

    // Replayed through the same policy, the recorded loads give exactly the
    // pool the stack ran at the next tick.
    let cli = match branchpoint::parse_with_config(["branchpoint", "stack", "up"].iter().chain(&args).map(Into::into).collect()) {
        Ok(cli) => cli,
        Err(_) => panic!("the test's stack arguments parse"),
    };
    let branchpoint::cli::Command::Stack(up_args) = cli.command else { panic!("stack up") };
    let mut policy = branchpoint_core::autoscale::Autoscaler::new(branchpoint::cmd::stack::autoscale_config(&up_args.autoscale, up_args.workers).unwrap());
    let rows = timeline(dir.path());
    for (k, pair) in rows.windows(2).enumerate() {
        let target = policy.tick(pair[0]);
        assert_eq!(pair[1].workers, target, "tick {k}: the policy, fed {:?}, says {target} workers; the stack ran {}: {rows:?}", pair[0], pair[1].workers);
    }
    assert!(rows.iter().all(|l| (1..=3).contains(&l.workers)), "{rows:?}");
    assert!(rows.iter().any(|l| l.workers >= 2), "the pool grew under the step: {rows:?}");

    // SIGTERM stops the whole stack, every service with it, within the bound.
    let mut stack = stack;
    let (status, took) = stop_with(&mut stack._proc.0, libc::SIGTERM, 2 * branchpoint::shutdown::BOUND);
    let log = stack.log();
    eprintln!("stack up stopped {} ms after SIGTERM", took.as_millis());
    assert!(took <= branchpoint::shutdown::BOUND && status.success(), "stack exited {status} after {took:?}: {log}");
    assert!(log.contains("stack: SIGTERM: stopping") && log.contains("stack: stopped in"), "{log}");
}

#[test]
fn a_restarted_planner_resumes_its_plans_and_a_new_fleet_starts_from_stored_plans() {
    use branchpoint_messages::{encode, subjects, NetworkReport, PlanTarget, PlanUpdate};
    let _cpu = shared();
    let store_dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store_dir.path().to_str().unwrap()]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = rt.block_on(async_nats::connect(&nats.url)).unwrap();
    let kv = rt.block_on(branchpoint_actors::control::ControlStore::open(&client)).unwrap();
    let report = |us_per_byte: f64| network_report("phone-3", us_per_byte);
    let send = |r: NetworkReport| {
        rt.block_on(async {
            client.publish(subjects::NETWORK_REPORT, encode(&r).unwrap().into()).await.unwrap();
            client.flush().await.unwrap();
        })
    };
    let stored_for = |device: &str| -> Option<(PlanUpdate, u64)> { rt.block_on(kv.plan(&PlanTarget::Device(device.into()))).unwrap().map(|p| (p.value, p.revision)) };
    let stored = || stored_for("phone-3");
    let planner_args = ["planner", "--nats", &nats.url];
    let planner = start_service("planner-1", &planner_args, Duration::from_secs(60));
    send(report(0.08)); // 100 Mbit/s
    let (first, revision) = wait_for("the planner to store a plan", Duration::from_secs(10), stored);
    assert!(first.p_tar > 0.0, "a fast link gets an offloading plan: {first:?}");
    drop(planner); // SIGKILL: no chance to save anything on the way out

    let _planner = start_service("planner-2", &planner_args, Duration::from_secs(60));
    assert!(service_log("planner-2").contains("resumed 1 device plan(s)"), "{}", service_log("planner-2"));
    // The same conditions give the same plan, which the restarted planner
    // knows it stored already: it does not write it again.
    // The planner takes reports in the order they were sent: once a later
    // report from a new device has its plan stored, a rewrite of phone-3's
    // would have been stored too.
    send(report(0.08));
    send(network_report("phone-4", 0.08));
    wait_for("the restarted planner to plan for the next report", Duration::from_secs(30), || stored_for("phone-4"));
    assert_eq!(stored().map(|(_, r)| r), Some(revision), "the restarted planner rewrote a plan it had resumed");
    // A collapsed link changes the plan, which it stores.
    send(report(160.0));
    let (second, _) = wait_for("a new plan for a slow link", Duration::from_secs(10), || stored().filter(|(_, r)| *r > revision));
    assert_eq!(second.p_tar, 0.0, "0.05 Mbit/s: answer everything on the device");

    // A fleet that starts later starts from the stored plan of its group.
    let plan = PlanUpdate { target: PlanTarget::Group("default".into()), partition_branch: 2, p_tar: 0.6, certified: None, codec: None, temperature: None };
    rt.block_on(kv.put_plan(&plan)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outcomes = dir.path().join("outcomes.jsonl");
    let out =
        output_within(branchpoint().args(["fleet", "--nats", &nats.url, "--devices", "4", "--inputs", "40", "--rate", "40", "--outcomes"]).arg(&outcomes), Duration::from_secs(60));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&outcomes).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 40);
    for o in &lines {
        assert_eq!((o["partition_branch"].as_u64(), o["p_tar"].as_f64()), (Some(2), Some(0.6)), "input decided with {o}");
    }
}

#[test]
fn bad_setups_fail_with_what_to_do() {
    let _cpu = shared();
    // The control plane needs JetStream: a plain server is refused, with the fix.
    let plain = NatsServer::start();
    let out = output_within(branchpoint().args(["serve", "--nats", &plain.url, "--listen", &format!("127.0.0.1:{}", port())]), Duration::from_secs(60));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("JetStream") && err.contains("-js"), "{err}");
    // A taken port, an impossible pool, a missing nats-server: each a clear error.
    let taken = plain.url.rsplit(':').next().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let stack = |extra: &[&str]| {
        let out = output_within(branchpoint().args(["stack", "up", "--dir"]).arg(dir.path()).args(extra), Duration::from_secs(30));
        assert!(!out.status.success(), "{extra:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(stack(&["--nats-port", &taken]).contains("is taken"));
    let e = stack(&["--nats-port", &port().to_string(), "--workers", "3", "--max-workers", "2"]);
    assert!(e.contains("--workers 3") || e.contains("max_workers"), "{e}");
    let e = stack(&["--nats-port", &port().to_string(), "--nats-server", "/no/such/nats-server"]);
    assert!(e.contains("/no/such/nats-server") && e.contains("no such file"), "{e}");
    // An API without calibrator: each endpoint says what is missing.
    let store = tempfile::tempdir().unwrap();
    let js = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let api = format!("127.0.0.1:{}", port());
    let _serve = start_service("lonely-api", &["serve", "--nats", &js.url, "--listen", &api, "--token", TOKEN], Duration::from_secs(60));
    let r = http("GET", &api, "/nope", None, None);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/api/plan"), "{}", r.body);
    let r = http("GET", &api, "/api/calibration", None, None);
    assert_eq!(r.status, 404);
    assert!(r.body.contains("branchpoint calibrator"), "{}", r.body);
    let r = http("POST", &api, "/api/calibration/refit", Some(TOKEN), Some(r#"{"method": "global"}"#));
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no calibrator is running"), "{}", r.body);
    let huge = format!(r#"{{"group": "{}", "partition_branch": 1, "p_tar": 0.5}}"#, "g".repeat(100_000));
    assert_eq!(http("PUT", &api, "/api/plan", Some(TOKEN), Some(&huge)).status, 413, "bodies are bounded");
    assert_eq!(http("GET", &api, "/api/plan", None, None).body, r#"{"plans":[]}"#, "nothing was stored");
}

/// A flood of slow clients: 1,000 connections that each send a mutating
/// request's head and then hold back its body, half without a token and half
/// with one. The API answers the unauthenticated ones 401 before reading any
/// body, cuts the others off after its body timeout (408), and /healthz
/// answers throughout.
#[test]
fn healthz_answers_through_a_flood_of_slow_bodies() {
    use std::io::{Read, Write};
    let _cpu = alone();
    // The test holds 1,000 sockets itself.
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    let nats = NatsServer::start_with(&["-js"]);
    let api = format!("127.0.0.1:{}", port());
    let _api = start_service("flooded-api", &["serve", "--nats", &nats.url, "--listen", &api, "--token", "t0ken"], Duration::from_secs(60));
    let mut flood = Vec::new();
    for i in 0..1000 {
        let mut s = std::net::TcpStream::connect(&api).unwrap();
        let auth = if i % 2 == 0 { "" } else { "Authorization: Bearer t0ken\r\n" };
        write!(s, "PUT /api/plan HTTP/1.1\r\nHost: {api}\r\n{auth}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"gro").unwrap();
        flood.push((i % 2 == 1, s));
    }
    let opened = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        let r = http("GET", &api, "/healthz", None, None);
        slowest = slowest.max(t.elapsed());
        assert_eq!(r.status, 200);
    }
    eprintln!("/healthz during the flood: slowest of 20 in {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "/healthz took {slowest:?} during the flood");
    let (mut denied, mut timed_out) = (0, 0);
    for (authenticated, mut s) in flood {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        let status = String::from_utf8_lossy(&head[9..12]).to_string();
        match (authenticated, status.as_str()) {
            (false, "401") => denied += 1,
            (true, "408") => timed_out += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!((denied, timed_out), (500, 500));
    assert!(opened.elapsed() < Duration::from_secs(30), "every slow body was cut off by the body timeout");
}

/// `stack up --cluster 3`: a three-node JetStream cluster with the control
/// store at three replicas and every service given every node's URL; a
/// fleet runs against it and one node is killed mid-run. No input is lost
/// or late, the buckets keep their replicas (no service lowers them), and
/// plans are still written and read.
#[test]
fn a_stack_cluster_loses_a_node_and_nothing_is_lost() {
    use branchpoint_actors::control::PLANS_BUCKET;
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_up(dir.path(), &["--cluster", "3", "--workers", "1", "--devices", "0", "--token", TOKEN]);
    let urls = stack.nats.clone();
    assert_eq!(urls.split(',').count(), 3, "{urls}");
    let operator = stack.role_env("operator");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let replicas_of_plans = |rt: &tokio::runtime::Runtime, urls: &str| {
        rt.block_on(async {
            let client =
                async_nats::ConnectOptions::new().user_and_password(operator[0].1.clone(), operator[1].1.clone()).connect(urls.split(',').collect::<Vec<_>>()).await.ok()?;
            let js = async_nats::jetstream::new(client);
            let mut kv = js.get_key_value(PLANS_BUCKET).await.ok()?;
            Some(kv.stream.info().await.ok()?.config.num_replicas)
        })
    };
    assert_eq!(replicas_of_plans(&rt, &urls), Some(3), "the stack made the buckets at three replicas");
    let plan = |p: f64| format!(r#"{{"group": "night", "partition_branch": 1, "p_tar": {p}}}"#);
    assert_eq!(http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(&plan(0.8))).status, 200);
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    let mut fleet = branchpoint()
        .envs(stack.role_env("device"))
        .args(["fleet", "--nats", &urls, "--devices", "10", "--rate", "20", "--duration", "600", "--deadline-ms", "1000", "--status-interval-ms", "200"])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("fleet.log")).unwrap())
        .spawn()
        .unwrap();
    let fleet_inputs = || -> Option<u64> {
        let r = try_http("GET", &stack.api, "/api/fleet", None, None).ok()?;
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        v["totals"]["inputs"].as_u64()
    };
    let before = wait_for("the fleet to decide 500 inputs", Duration::from_secs(60), || fleet_inputs().filter(|&n| n >= 500));
    assert_eq!(replicas_of_plans(&rt, &urls), Some(3), "a fleet opening the store does not lower its replicas");
    // Kill the first node, as an outage would.
    let text = std::fs::read_to_string(dir.path().join("stack.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pid = v["services"]["nats-1"].as_u64().expect("the stack lists its nodes") as i32;
    // SAFETY: kill only sends a signal to the stack's own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // The others keep serving: more inputs decided, plans written and read.
    wait_for("the fleet to decide 1,000 more inputs after the node died", Duration::from_secs(90), || fleet_inputs().filter(|&n| n >= before + 1000));
    let put = wait_for("a plan written after the node died", Duration::from_secs(60), || {
        let r = try_http("PUT", &stack.api, "/api/plan", Some(TOKEN), Some(&plan(0.85))).ok()?;
        (r.status == 200).then_some(r)
    });
    assert!(put.body.contains("0.85"), "{}", put.body);
    wait_for("the plans read after the node died", Duration::from_secs(60), || {
        let r = try_http("GET", &stack.api, "/api/plan", None, None).ok()?;
        (r.status == 200 && r.body.contains("\"p_tar\":0.85")).then_some(())
    });
    wait_for("/readyz after the node died", Duration::from_secs(60), || (try_http("GET", &stack.api, "/readyz", None, None).ok()?.status == 200).then_some(()));
    let alive = urls.split(',').skip(1).collect::<Vec<_>>().join(",");
    assert_eq!(replicas_of_plans(&rt, &alive), Some(3));
    assert!(stack.log().contains("nats-1 exited") && stack.log().contains("goes on without it"), "{}", stack.log());
    send_signal(&fleet, libc::SIGINT);
    assert!(fleet.wait().unwrap().success(), "{}", std::fs::read_to_string(dir.path().join("fleet.log")).unwrap());
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!((s.outcomes, s.duplicates, s.errors), (s.inputs, 0, 0), "{s:?}");
    let late = std::fs::read_to_string(&outcomes)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<branchpoint_actors::collector::Outcome>(l).unwrap())
        .filter(|o| o.latency.total_us > 1_050_000)
        .count();
    assert_eq!(late, 0, "no outcome later than its deadline plus 50 ms");
    assert!(s.answered_by_cloud > 0);
}

/// Under the default `stack up` every service connects as its role's user.
/// A client with no credentials is refused at once; one with a device's
/// may read the control store, but the server refuses each attempt to
/// change a plan or temperatures (on their subjects, or by writing a
/// key-value key) and to join the workers' queue group, and says so; the
/// stored plans stay as they were.
#[test]
fn a_device_cannot_change_plans_or_temperatures_or_join_the_workers() {
    use branchpoint_actors::control::ControlStore;
    use branchpoint_messages::{encode, subjects, CalibrationMethod, CalibrationUpdate, PlanTarget, PlanUpdate};
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_up(dir.path(), &["--workers", "1", "--devices", "2", "--rate", "2", "--token", TOKEN]);
    let mode = std::fs::metadata(dir.path().join("credentials.env")).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077, 0, "the credentials are private to their owner");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // No credentials: refused at connect.
    let anonymous = rt.block_on(async_nats::ConnectOptions::new().connect(stack.nats.as_str()));
    assert!(anonymous.is_err(), "a client without credentials connects");
    let env = stack.role_env("device");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let refused = rt.block_on(async {
        let tx = std::sync::Mutex::new(tx);
        let client = async_nats::ConnectOptions::new()
            .user_and_password(env[0].1.clone(), env[1].1.clone())
            .event_callback(move |e| {
                let _ = tx.lock().unwrap().send(e.to_string());
                async {}
            })
            .connect(stack.nats.as_str())
            .await
            .expect("a device connects");
        // Reading the control store is allowed.
        let store = ControlStore::open(&client).await.expect("a device reads the control store");
        let before = store.plans().await.unwrap().len();
        let forged = PlanUpdate { target: PlanTarget::Group("default".into()), partition_branch: 1, p_tar: 0.0, certified: None, codec: None, temperature: None };
        let temps = CalibrationUpdate { model_sha256: "ab".repeat(32), method: CalibrationMethod::Global, temperatures: vec![1e-2; 3], group: None };
        client.publish(subjects::CALIBRATION_UPDATE, encode(&temps).unwrap().into()).await.unwrap();
        client.publish(subjects::CALIBRATION_REFIT, "{}".into()).await.unwrap();
        let _sub = client.queue_subscribe(subjects::OFFLOAD_ALL, subjects::WORKER_QUEUE_GROUP.into()).await.unwrap();
        let _all = client.subscribe(subjects::OFFLOAD_ALL).await.unwrap();
        let put = tokio::time::timeout(Duration::from_secs(10), store.put_plan(&forged)).await;
        assert!(!matches!(put, Ok(Ok(_))), "a device wrote a key: {put:?}");
        client.flush().await.unwrap();
        (before, store)
    });
    let (before, store) = refused;
    let mut said = Vec::new();
    let wanted = [
        "Publish to \"branchpoint.calibration.update\"",
        "Publish to \"branchpoint.calibration.refit\"",
        "Subscription to \"branchpoint.offload.*\"",
        "Publish to \"$KV.branchpoint-plans.group.default\"",
    ];
    wait_for("the server to refuse each attempt", Duration::from_secs(30), || {
        while let Ok(e) = rx.try_recv() {
            said.push(e);
        }
        wanted.iter().all(|w| said.iter().any(|e| e.contains(w) && e.to_lowercase().contains("permission"))).then_some(())
    });
    let after = rt.block_on(store.plans()).unwrap();
    assert_eq!(after.len(), before, "no plan stored: {after:?}");
    assert!(!after.iter().any(|p| p.value.p_tar == 0.0), "{after:?}");
    // A worker started with a device's credentials may not join the
    // workers' queue group: it says so and exits 1, rather than run on
    // looking healthy and serving nothing.
    let o = output_within(branchpoint().envs(stack.role_env("device")).args(["worker", "--nats", &stack.nats, "--worker-id", "impostor"]), Duration::from_secs(90));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("denied a subscription"), "{:?}: {err}", o.status);

    // One writer per key: the planner writes devices' plans, never a
    // group's (the operator's and the calibrator's).
    let env = stack.role_env("planner");
    rt.block_on(async {
        let client = async_nats::ConnectOptions::new().user_and_password(env[0].1.clone(), env[1].1.clone()).connect(stack.nats.as_str()).await.expect("the planner connects");
        let store = ControlStore::open(&client).await.expect("the planner opens the control store");
        let device = PlanUpdate { target: PlanTarget::Device("phone-1".into()), partition_branch: 1, p_tar: 0.5, certified: None, codec: None, temperature: None };
        store.put_plan(&device).await.expect("the planner stores a device's plan");
        let group = PlanUpdate { target: PlanTarget::Group("default".into()), ..device };
        let put = tokio::time::timeout(Duration::from_secs(10), store.put_plan(&group)).await;
        assert!(!matches!(put, Ok(Ok(_))), "the planner wrote a group's plan: {put:?}");
    });
}

/// `stack up --uplink-trace`: the fleet's devices emulate their uplinks from
/// a shipped trace and report what they observe; the stack's planner plans
/// for them, its plans are stored in the control store (as `/metrics` reads
/// them back), change as the trace does, and the devices hold them (as
/// their fleet reports it, and the dashboard shows).
#[test]
fn the_stacks_planner_plans_for_a_fleet_on_a_trace() {
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    let trace = repo_root().join("scenarios/traces/synthetic-cellular.up");
    let stack = stack_up(dir.path(), &["--workers", "1", "--devices", "10", "--rate", "5", "--duration", "180", "--deadline-ms", "150", "--uplink-trace", trace.to_str().unwrap()]);
    let label = |line: &str, key: &str| -> Option<String> {
        let from = line.find(&format!("{key}=\""))? + key.len() + 2;
        Some(line[from..].split('"').next()?.to_string())
    };
    let mut stored: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    let mut held: std::collections::BTreeSet<(String, String)> = Default::default();
    wait_for("a stored plan to change with the trace, and devices to hold the planner's plans", Duration::from_secs(150), || {
        let m = stack.metrics();
        for line in m.lines().filter(|l| l.starts_with("branchpoint_plan_p_tar{device=")) {
            if let (Some(device), Some(p_tar)) = (label(line, "device"), line.rsplit(' ').next()) {
                stored.entry(device).or_default().insert(p_tar.to_string());
            }
        }
        for line in m.lines().filter(|l| l.starts_with(FLEET) && !l.ends_with(" 0")) {
            if let (Some(branch), Some(p_tar)) = (label(line, "partition_branch"), label(line, "p_tar")) {
                held.insert((branch, p_tar));
            }
        }
        let changed = stored.values().any(|plans| plans.len() >= 2);
        let planned = held.iter().any(|(b, p)| (b.as_str(), p.as_str()) != ("1", "0.9"));
        (changed && planned).then_some(())
    });
    eprintln!("stored p_tars per device: {stored:?}\nplans held: {held:?}");
    assert!(stack.log().contains("stack up:"));
}
