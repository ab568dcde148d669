//! The live system against a real nats-server: devices and cloud workers in
//! separate processes make exactly the decisions the offline evaluation
//! predicts, lose no input when a worker dies, and survive bad requests.
mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use branchpoint_actors::collector::{Decided, Outcome, Summary};
use branchpoint_messages::{decode, encode, subjects, Deadline, ErrorKind, OffloadReply, OffloadRequest, Tensor};
use branchpoint_models::calibration::predict;
use branchpoint_models::{load_model, Dataset};
use common::*;

const P_TAR: f64 = 0.9;

/// These tests each run a fleet and workers that load the CPU; run them one
/// at a time so that deadlines measure the system, not the test harness.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// (stays on the device, class) per test input, as the offline evaluation
/// decides at partition branch 1 with temperature 1.
fn offline_decisions(n: usize) -> Vec<(bool, u32)> {
    let model = load_model(&shipped_model(), tch::Device::Cpu).unwrap();
    let c = &model.card;
    let data = Dataset::load(c.dataset.name, &c.dataset.name.default_dir(), c.dataset.split.validation, c.dataset.split.seed).unwrap();
    let logits = model.net.logits_for(&data.test.images.narrow(0, 0, n as i64), 500);
    let branch: Vec<f32> = Vec::try_from(logits[0].flatten(0, -1)).unwrap();
    let fin: Vec<f32> = Vec::try_from(logits[2].flatten(0, -1)).unwrap();
    (0..n)
        .map(|i| {
            let (bclass, conf) = predict(&branch[i * 10..(i + 1) * 10], 1.0);
            if conf >= P_TAR {
                (true, bclass as u32)
            } else {
                (false, predict(&fin[i * 10..(i + 1) * 10], 1.0).0 as u32)
            }
        })
        .collect()
}

fn read_outcomes(path: &Path) -> Vec<Outcome> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn run_fleet(dir: &Path, name: &str, nats: Option<&str>, inputs: usize, deadline_ms: u32) -> (Summary, Vec<Outcome>) {
    let summary = dir.join(format!("{name}-summary.json"));
    let outcomes = dir.join(format!("{name}-outcomes.jsonl"));
    let mut cmd = branchpoint();
    cmd.args(["fleet", "--devices", "20", "--rate", "50", "--duration", "60", "--inputs", &inputs.to_string()])
        .args(["--p-tar", &P_TAR.to_string(), "--branch", "1", "--deadline-ms", &deadline_ms.to_string()])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()]);
    if let Some(url) = nats {
        cmd.args(["--nats", url]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "fleet failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    (s, read_outcomes(&outcomes))
}

/// Every input 0..n has exactly one outcome; returns them by input.
fn exactly_one_each(outcomes: &[Outcome], n: usize) -> HashMap<usize, &Outcome> {
    let mut by_input = HashMap::new();
    for o in outcomes {
        assert!(by_input.insert(o.input_index, o).is_none(), "input {} has two outcomes", o.input_index);
    }
    assert_eq!(by_input.len(), n);
    assert!((0..n).all(|i| by_input.contains_key(&i)));
    by_input
}

#[test]
fn two_workers_and_twenty_devices_over_nats_make_the_offline_decisions() {
    let _serial = serial();
    let nats = NatsServer::start();
    let _w1 = start_worker(&nats.url, "w1", &[]);
    let _w2 = start_worker(&nats.url, "w2", &[]);
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let expected = offline_decisions(n);

    let (s, outcomes) = run_fleet(dir.path(), "nats", Some(&nats.url), n, 5000);
    assert_eq!((s.inputs, s.outcomes, s.duplicates, s.errors, s.fallbacks), (n, n, 0, 0, 0));
    let by_input = exactly_one_each(&outcomes, n);
    let mut served: HashMap<String, usize> = HashMap::new();
    for (i, &(on_device, class)) in expected.iter().enumerate() {
        let o = by_input[&i];
        assert_eq!(o.decided == Decided::Device, on_device, "input {i}: {o:?}");
        assert_eq!(o.class, class, "input {i}: {o:?}");
        if let Some(w) = &o.worker_id {
            *served.entry(w.clone()).or_default() += 1;
        }
    }
    assert!(s.offloaded > 100, "the test needs offloads: {s:?}");
    assert_eq!(served.len(), 2, "both workers of the queue group served: {served:?}");

    // The same run in-process, without NATS, gives the same predictions.
    let (s2, local) = run_fleet(dir.path(), "local", None, n, 5000);
    assert_eq!((s2.outcomes, s2.fallbacks), (n, 0));
    let local = exactly_one_each(&local, n);
    for i in 0..n {
        assert_eq!((local[&i].class, local[&i].decided), (by_input[&i].class, by_input[&i].decided), "input {i}");
    }
}

#[test]
fn killing_a_worker_mid_run_loses_no_input() {
    let _serial = serial();
    let nats = NatsServer::start();
    let _w1 = start_worker(&nats.url, "survivor", &[]);
    let mut w2 = start_worker(&nats.url, "victim", &[]);
    let dir = tempfile::tempdir().unwrap();
    let n = 3000;
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    // 20 devices x 50/s: 3,000 inputs take about 3 s; the kill lands inside.
    let fleet = branchpoint()
        .args(["fleet", "--nats", &nats.url, "--devices", "20", "--rate", "50", "--duration", "60"])
        .args(["--inputs", &n.to_string(), "--p-tar", &P_TAR.to_string(), "--deadline-ms", "1000"])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    w2.0.kill().unwrap();
    let out = fleet.wait_with_output().unwrap();
    assert!(out.status.success(), "fleet failed: {}", String::from_utf8_lossy(&out.stderr));

    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    let outcomes = read_outcomes(&outcomes);
    assert_eq!((s.inputs, s.outcomes, s.duplicates, s.errors), (n, n, 0, 0));
    exactly_one_each(&outcomes, n);
    // Every offload ended as a cloud answer or a counted fallback.
    assert_eq!(s.answered_by_cloud + s.fallbacks, s.offloaded);
    assert_eq!(s.decided_on_device + s.offloaded, n);
    assert_eq!(
        s.fallbacks,
        s.fallbacks_deadline + s.fallbacks_no_responders + s.fallbacks_error_reply + s.fallbacks_transport
    );
    let expected = offline_decisions(n);
    let late_survivor_answers = outcomes
        .iter()
        .filter(|o| o.worker_id.as_deref() == Some("survivor") && o.input_index > 2000)
        .count();
    assert!(late_survivor_answers > 0, "the surviving worker kept serving");
    for o in &outcomes {
        let (on_device, class) = expected[o.input_index];
        match o.decided {
            Decided::Device => assert!(on_device && o.class == class),
            Decided::Cloud => assert!(!on_device && o.class == class, "{o:?}"),
            // A fallback answers with the branch's class, whatever the cloud would have said.
            Decided::Fallback => assert!(!on_device && o.fallback.is_some()),
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn malformed_requests_get_typed_error_replies_and_the_worker_keeps_serving() {
    let _serial = serial();
    let nats = NatsServer::start();
    let _w = start_worker(&nats.url, "sturdy", &[]);
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shipped_model().with_extension("json")).unwrap()).unwrap();
    let shape: Vec<u32> = std::iter::once(1)
        .chain(card["architecture"]["partition_points"][0]["activation_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32))
        .collect();
    let elems: u32 = shape.iter().product();
    let request = |branch: u8, shape: &[u32], n: usize| OffloadRequest {
        device_id: "tester".into(),
        seq: 7,
        partition_branch: branch,
        activation: Tensor::from_f32(shape, &vec![0.5; n]).unwrap(),
        deadline: Deadline { sent_at_unix_us: 0, budget_us: 5_000_000 },
    };

    runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let ask = |subject: String, payload: Vec<u8>| {
            let client = client.clone();
            async move {
                let msg = tokio::time::timeout(Duration::from_secs(5), client.request(subject, payload.into()))
                    .await
                    .expect("an answer within 5 s")
                    .expect("a reply");
                decode::<OffloadReply>(&msg.payload).expect("a well-formed reply")
            }
        };
        let error_kind = |r: OffloadReply| match r {
            OffloadReply::Error(e) => {
                assert_eq!(e.worker_id, "sturdy");
                e.kind
            }
            OffloadReply::Answer(a) => panic!("expected an error reply, got {a:?}"),
        };

        // (subject, payload, expected error kind)
        let newer_version = rmp_serde::to_vec_named(&serde_json::json!({"wire_version": 99, "body": {}})).unwrap();
        let wrong_shape = encode(&request(1, &[1, 3, 8, 8], 192)).unwrap();
        let unknown_branch = encode(&request(9, &shape, elems as usize)).unwrap();
        let cases: Vec<(String, Vec<u8>, ErrorKind)> = vec![
            (subjects::offload(1), b"\xc1 definitely not msgpack".to_vec(), ErrorKind::InvalidRequest),
            (subjects::offload(1), Vec::new(), ErrorKind::InvalidRequest),
            (subjects::offload(1), newer_version, ErrorKind::UnsupportedVersion),
            (subjects::offload(1), wrong_shape, ErrorKind::InvalidRequest),
            (subjects::offload(9), unknown_branch, ErrorKind::UnknownBranch),
        ];
        for (subject, payload, kind) in cases {
            assert_eq!(error_kind(ask(subject, payload).await), kind);
        }

        // Still serving: a valid request gets an answer.
        match ask(subjects::offload(1), encode(&request(1, &shape, elems as usize)).unwrap()).await {
            OffloadReply::Answer(a) => {
                assert_eq!((a.seq, a.worker_id.as_str(), a.timings.batch_size), (7, "sturdy", 1));
                assert!(a.class < 10 && (0.0..=1.0).contains(&a.confidence));
            }
            OffloadReply::Error(e) => panic!("valid request refused: {e:?}"),
        }

        // Discoverable through the NATS service API.
        let ping = client.request("$SRV.PING.branchpoint-worker", "".into()).await.unwrap();
        let ping: serde_json::Value = serde_json::from_slice(&ping.payload).unwrap();
        assert_eq!(ping["name"], "branchpoint-worker");
        let info = client.request("$SRV.INFO.branchpoint-worker", "".into()).await.unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.payload).unwrap();
        assert_eq!(info["endpoints"][0]["subject"], subjects::OFFLOAD_ALL);
        assert_eq!(info["metadata"]["worker_id"], "sturdy");
        let stats = client.request("$SRV.STATS.branchpoint-worker", "".into()).await.unwrap();
        let stats: serde_json::Value = serde_json::from_slice(&stats.payload).unwrap();
        assert!(stats["endpoints"][0]["num_requests"].as_u64().unwrap() >= 6, "{stats}");
    });
}

#[test]
fn without_workers_offloads_fall_back_and_every_input_is_answered() {
    let _serial = serial();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (s, outcomes) = run_fleet(dir.path(), "orphan", Some(&nats.url), 300, 500);
    assert_eq!((s.inputs, s.outcomes, s.answered_by_cloud), (300, 300, 0));
    assert_eq!(s.fallbacks, s.offloaded);
    assert_eq!(s.fallbacks_no_responders, s.fallbacks, "NATS says at once that nobody listens: {s:?}");
    exactly_one_each(&outcomes, 300);
}

#[test]
fn calibration_refits_and_plans_reach_running_devices() {
    use branchpoint_messages::{CalibrationMethod, CalibrationRefit, CalibrationUpdate, PlanTarget, PlanUpdate};
    let _serial = serial();
    let nats = NatsServer::start();
    let _w = start_worker(&nats.url, "w", &[]);
    // The calibrator starts uncalibrated (T = 1 everywhere).
    let _cal = start_service("calibrator", &["calibrator", "--nats", &nats.url, "--method", "uncalibrated"], "calibrator serving", Duration::from_secs(60));

    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    // 10 devices x 40/s for 4 s; updates land in the middle.
    let fleet = branchpoint()
        .args(["fleet", "--nats", &nats.url, "--devices", "10", "--rate", "40", "--duration", "4", "--p-tar", "0.9"])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Updates are not stored (that is the control plane's key-value store):
    // publish them once the fleet is running and listening.
    let mut fleet = fleet;
    let mut stderr = std::io::BufReader::new(fleet.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("fleet running") {
        line.clear();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0, "fleet ended before running");
    }

    let fitted = runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let current = client.request(subjects::CALIBRATION_GET, "".into()).await.unwrap();
        let current: CalibrationUpdate = decode(&current.payload).unwrap();
        assert_eq!(current.method, CalibrationMethod::Uncalibrated);
        assert!(current.temperatures.iter().all(|&t| t == 1.0));

        let refit = encode(&CalibrationRefit { method: CalibrationMethod::PerBranch }).unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(30), client.request(subjects::CALIBRATION_REFIT, refit.into()))
            .await
            .unwrap()
            .unwrap();
        let fitted: CalibrationUpdate = decode(&reply.payload).unwrap();
        assert_eq!(fitted.method, CalibrationMethod::PerBranch);
        assert!(fitted.temperatures.iter().all(|&t| t > 0.0 && t != 1.0), "{fitted:?}");

        // A malformed refit gets an error reply; the calibrator keeps serving.
        let bad = client.request(subjects::CALIBRATION_REFIT, "nonsense".into()).await.unwrap();
        assert!(decode::<branchpoint_messages::ErrorReply>(&bad.payload).is_ok());

        let plan = PlanUpdate { target: PlanTarget::Group("default".into()), partition_branch: 2, p_tar: 0.75 };
        client.publish(plan.target.subject(), encode(&plan).unwrap().into()).await.unwrap();
        client.flush().await.unwrap();
        fitted
    });
    let status = fleet.wait().unwrap();
    assert!(status.success(), "fleet failed");
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    assert_eq!((s.outcomes, s.duplicates), (s.inputs, 0));

    // Outcomes in arrival order: T = 1 at branch 1 and p_tar 0.9 first; the
    // fitted temperatures, then branch 2 at p_tar 0.75, later.
    let mut outcomes = read_outcomes(&outcomes);
    outcomes.sort_by_key(|o| o.input_index);
    assert_eq!((outcomes[0].temperature, outcomes[0].partition_branch, outcomes[0].p_tar), (1.0, 1, 0.9));
    let last = outcomes.last().unwrap();
    assert_eq!((last.partition_branch, last.p_tar), (2, 0.75));
    assert_eq!(last.temperature, fitted.temperatures[1], "branch 2 decides with its fitted temperature");
    let first_fitted = outcomes.iter().position(|o| o.temperature != 1.0).expect("the refit reached the devices");
    assert!(first_fitted > 0);
}

/// `branchpoint planner` over NATS: a report of a fast link gets a plan that
/// offloads, one of a crawling link a plan that keeps every input on the
/// device; malformed reports do not stop it.
#[test]
fn the_planner_answers_network_reports_with_plans() {
    use branchpoint_messages::{encode, subjects, PlanTarget, PlanUpdate};
    use futures::StreamExt;
    let _serial = serial();
    let nats = NatsServer::start();
    let _planner = start_service("planner", &["planner", "--nats", &nats.url, "--device-slowdown", "4"], "planner serving", Duration::from_secs(90));
    let report = |us_per_byte: f64| network_report("phone-7", us_per_byte);
    let plans: Vec<PlanUpdate> = runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let mut sub = client.subscribe(subjects::plan_device("phone-7")).await.unwrap();
        client.flush().await.unwrap();
        let mut plans = Vec::new();
        // 100 Mbit/s, then garbage, then 0.05 Mbit/s.
        for payload in [encode(&report(0.08)).unwrap(), b"not a report".to_vec(), encode(&report(160.0)).unwrap()] {
            client.publish(subjects::NETWORK_REPORT, payload.into()).await.unwrap();
            client.flush().await.unwrap();
        }
        for _ in 0..2 {
            let msg = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("a plan within 20 s").unwrap();
            plans.push(branchpoint_messages::decode::<PlanUpdate>(&msg.payload).unwrap());
        }
        plans
    });
    assert_eq!(plans[0].target, PlanTarget::Device("phone-7".into()));
    assert!(plans[0].p_tar > 0.0, "a fast link is worth offloading to: {:?}", plans[0]);
    assert_eq!(plans[1].p_tar, 0.0, "nothing can cross a 0.05 Mbit/s link in 100 ms: {:?}", plans[1]);
    assert!(service_log("planner").contains("malformed network report"));
}
