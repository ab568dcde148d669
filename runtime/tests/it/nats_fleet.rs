//! The live system against a real nats-server: devices and cloud workers in
//! separate processes make exactly the decisions the offline evaluation
//! predicts, lose no input when a worker dies, and survive bad requests.
use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use branchpoint_actors::collector::{Decided, Outcome, Summary};
use branchpoint_core::calibration::predict;
use branchpoint_messages::{decode, encode, subjects, Deadline, ErrorKind, OffloadReply, OffloadRequest, Tensor, WorkerStatus};
use branchpoint_models::{load_model, Dataset};
use common::*;

const P_TAR: f64 = 0.9;

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
    run_fleet_with(dir, name, nats, inputs, deadline_ms, &[])
}

fn run_fleet_with(dir: &Path, name: &str, nats: Option<&str>, inputs: usize, deadline_ms: u32, extra: &[&str]) -> (Summary, Vec<Outcome>) {
    let summary = dir.join(format!("{name}-summary.json"));
    let outcomes = dir.join(format!("{name}-outcomes.jsonl"));
    let mut cmd = branchpoint();
    cmd.args(["fleet", "--devices", "20", "--rate", "50", "--duration", "60", "--inputs", &inputs.to_string()])
        .args(["--p-tar", &P_TAR.to_string(), "--branch", "1", "--deadline-ms", &deadline_ms.to_string()])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
        .args(extra);
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

/// Every arrival 0..n has exactly one outcome (a long run feeds a test
/// input more than once: arrivals, not inputs, are unique). A fleet
/// interrupted while inputs were still queued at its devices does not run
/// those: then its output (`said`) counts them, and the n decided arrivals
/// are those of the `arrived` it handed over that were run, each once.
fn exactly_one_per_arrival(outcomes: &[Outcome], n: usize, said: &str) {
    let (arrived, not_run) = interrupted(said).unwrap_or((n, 0));
    assert_eq!(arrived, n + not_run, "decided + not run = handed over: {said}");
    let mut seen = vec![0u32; arrived];
    for o in outcomes {
        assert!((o.arrival as usize) < arrived, "arrival {} beyond the {arrived} that arrived", o.arrival);
        seen[o.arrival as usize] += 1;
    }
    if let Some(a) = seen.iter().position(|&k| k > 1) {
        panic!("arrival {a} has {} outcomes", seen[a]);
    }
    assert_eq!(seen.iter().filter(|&&k| k == 1).count(), n, "every decided arrival has its outcome");
}

/// From an interrupted fleet's output: (inputs handed over, inputs still
/// queued at the devices and not run).
fn interrupted(said: &str) -> Option<(usize, usize)> {
    let line = said.lines().find(|l| l.starts_with("interrupted after "))?;
    let number = |after: &str| line.split(after).nth(1)?.split_whitespace().next()?.parse::<usize>().ok();
    let not_run = line.split(", ").nth(1)?.split_whitespace().next()?.parse::<usize>().ok()?;
    Some((number("interrupted after ")?, not_run))
}

/// A fleet run to its end in the background: stderr is kept for the test.
struct RunningFleet {
    child: std::process::Child,
    stderr: std::thread::JoinHandle<Vec<u8>>,
    stdout: std::thread::JoinHandle<Vec<u8>>,
}

/// What a background reader read, as text.
fn text(read: std::thread::JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&read.join().unwrap()).into_owned()
}

impl RunningFleet {
    /// Starts `fleet ARGS` and returns once it signals readiness (its
    /// `--ready-file`: devices built, inputs flowing).
    fn start(args: &[&str]) -> RunningFleet {
        let dir = tempfile::tempdir().unwrap();
        let ready = dir.path().join("ready");
        let mut child = branchpoint().arg("fleet").args(args).arg("--ready-file").arg(&ready).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = read_in_background(Box::new(child.stderr.take().unwrap()));
        let stdout = read_in_background(Box::new(child.stdout.take().unwrap()));
        if let Err(status) = wait_ready(&mut child, &ready, Duration::from_secs(120)) {
            panic!("the fleet ended ({status}) before it ran: {}", text(stderr));
        }
        RunningFleet { child, stderr, stdout }
    }

    /// Ctrl-C, then waits for it to drain and exit: its stderr, then its
    /// stdout.
    fn interrupt(mut self) -> String {
        send_signal(&self.child, libc::SIGINT);
        let status = self.child.wait().unwrap();
        let said = text(self.stderr) + &text(self.stdout);
        assert!(status.success(), "fleet failed: {said}");
        said
    }
}

#[test]
fn two_workers_and_twenty_devices_over_nats_make_the_offline_decisions() {
    let _cpu = shared();
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

/// Devices that offload int8 activations: over NATS and in process, every
/// offloaded input gets the class the offline evaluation predicts for the
/// final exit on the int8-decoded activation, and the worker decodes
/// exactly what the device encoded.
#[test]
fn int8_offloads_over_nats_are_answered_as_the_codec_predicts() {
    let _cpu = shared();
    let nats = NatsServer::start();
    let _w1 = start_worker(&nats.url, "w1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let n = 600;
    let expected = offline_decisions(n);
    let model = branchpoint_models::Model::load(&shipped_model(), tch::Device::Cpu).unwrap();
    let data = model.load_data(None).unwrap();
    let first = branchpoint_models::data::Split { images: data.test.images.narrow(0, 0, n as i64), labels: data.test.labels.narrow(0, 0, n as i64) };
    let int8 = branchpoint_models::model::codec_final_logits(&model, &first, branchpoint_messages::Codec::Int8).unwrap();
    let extra = ["--codec", "int8"];
    let (s, outcomes) = run_fleet_with(dir.path(), "int8-nats", Some(&nats.url), n, 5000, &extra);
    assert_eq!((s.inputs, s.outcomes, s.errors, s.fallbacks), (n, n, 0, 0), "{s:?}");
    let (_, local) = run_fleet_with(dir.path(), "int8-local", None, n, 5000, &extra);
    let (by_input, local) = (exactly_one_each(&outcomes, n), exactly_one_each(&local, n));
    let mut offloaded = 0;
    for (i, &(on_device, class)) in expected.iter().enumerate() {
        let o = by_input[&i];
        assert_eq!(o.decided == Decided::Device, on_device, "input {i}: {o:?}");
        let want = if on_device { class } else { int8[0].predict(i, 1.0).0 as u32 };
        assert_eq!(o.class, want, "input {i}: {o:?}");
        assert_eq!((local[&i].class, local[&i].decided), (o.class, o.decided), "input {i}: in process as over NATS");
        offloaded += usize::from(!on_device);
    }
    assert!(offloaded > 30, "the test needs offloads: {offloaded}");
}

/// A watched fleet: devices audit a share of their on-device inputs and tag
/// their offloads; the worker sends the final exit's answers to the
/// calibrator, whose status then estimates the branch's on-device
/// agreement. Audits change no outcome: every input is decided as offline.
#[test]
fn a_watched_fleet_audits_without_changing_an_outcome() {
    use branchpoint_messages::CalibrationStatus;
    let _cpu = shared();
    let nats = NatsServer::start();
    let _w = start_worker(&nats.url, "auditor", &[]);
    let _cal = start_service("calibrator", &["calibrator", "--nats", &nats.url, "--method", "uncalibrated"], Duration::from_secs(60));
    let statuses: Watch<CalibrationStatus> = Watch::new(&nats.url, subjects::CALIBRATION_STATUS);
    let dir = tempfile::tempdir().unwrap();
    let n = 2000;
    let expected = offline_decisions(n);
    let (summary, outcomes) = (dir.path().join("summary.json"), dir.path().join("outcomes.jsonl"));
    let out = branchpoint()
        .args(["fleet", "--nats", &nats.url, "--devices", "20", "--rate", "50", "--duration", "60", "--inputs", &n.to_string()])
        .args(["--p-tar", &P_TAR.to_string(), "--branch", "1", "--deadline-ms", "5000", "--audit-rate", "0.2"])
        .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "fleet failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    assert_eq!((s.inputs, s.outcomes, s.duplicates, s.errors, s.fallbacks), (n, n, 0, 0, 0));
    let outcomes = read_outcomes(&outcomes);
    let by_input = exactly_one_each(&outcomes, n);
    for (i, &(on_device, class)) in expected.iter().enumerate() {
        let o = by_input[&i];
        assert_eq!((o.decided == Decided::Device, o.class), (on_device, class), "input {i}: {o:?}");
    }
    // About 20 % of the on-device inputs were audited; offloads all tagged.
    let on_device = expected.iter().filter(|e| e.0).count();
    let w = statuses.wait("the calibrator's estimate from the audits", Duration::from_secs(60), |seen| {
        seen.iter().rev().find_map(|st| st.watched.iter().find(|w| w.group == "default" && w.audits as usize > on_device / 10).cloned())
    });
    assert_eq!((w.partition_branch, w.threshold, w.target_accuracy), (1, P_TAR, P_TAR));
    assert!((w.audits as usize) < on_device / 2 && w.offloads > 0, "{w:?}");
    let a = w.edge_agreement.unwrap();
    assert!(a > 0.5 && w.edge_agreement_low.unwrap() <= a && a <= w.edge_agreement_high.unwrap(), "{w:?}");
    // --audit-rate is checked.
    let bad = branchpoint().args(["fleet", "--audit-rate", "1.5"]).output().unwrap();
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--audit-rate 1.5"), "{}", String::from_utf8_lossy(&bad.stderr));
}

#[test]
fn killing_a_worker_mid_run_loses_no_input() {
    let _cpu = shared();
    let nats = NatsServer::start();
    let statuses: Watch<WorkerStatus> = Watch::new(&nats.url, subjects::WORKER_STATUS);
    let quick = ["--status-interval-ms", "100"];
    let _w1 = start_worker(&nats.url, "survivor", &quick);
    let mut w2 = start_worker(&nats.url, "victim", &quick);
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    // 20 devices x 50/s until interrupted: the kill lands mid-run by
    // construction, not by timing.
    let fleet = RunningFleet::start(&[
        "--nats",
        &nats.url,
        "--devices",
        "20",
        "--rate",
        "50",
        "--duration",
        "600",
        "--p-tar",
        &P_TAR.to_string(),
        "--deadline-ms",
        "1000",
        "--json",
        summary.to_str().unwrap(),
        "--outcomes",
        outcomes.to_str().unwrap(),
    ]);
    let answered = |id: &'static str| move |seen: &[WorkerStatus]| seen.iter().filter(|s| s.worker_id == id).map(|s| s.requests).max();
    statuses.wait("the victim to answer requests", Duration::from_secs(60), |seen| answered("victim")(seen).filter(|&n| n > 0));
    w2.0.kill().unwrap();
    w2.0.wait().unwrap();
    let killed_unix_us = branchpoint_actors::clock::unix_us();
    // At least what it had answered when the victim died.
    let before = statuses.wait("a status of the survivor", Duration::from_secs(10), answered("survivor"));
    statuses.wait("the survivor to serve 300 more requests after the kill", Duration::from_secs(60), |seen| answered("survivor")(seen).filter(|&n| n >= before + 300));
    let said = fleet.interrupt();
    assert!(said.contains("no more arrivals"), "{said}");

    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    let outcomes = read_outcomes(&outcomes);
    assert_eq!((s.outcomes, s.duplicates, s.errors), (s.inputs, 0, 0), "{s:?}");
    exactly_one_per_arrival(&outcomes, s.inputs, &said);
    // Every offload ended as a cloud answer or a counted fallback.
    assert_eq!(s.answered_by_cloud + s.fallbacks, s.offloaded);
    assert_eq!(s.decided_on_device + s.offloaded, s.inputs);
    assert_eq!(s.fallbacks, s.fallbacks_by_reason().iter().map(|(_, n)| n).sum::<usize>());
    let late_survivor_answers = outcomes.iter().filter(|o| o.worker_id.as_deref() == Some("survivor") && o.arrived_unix_us > killed_unix_us).count();
    assert!(late_survivor_answers > 0, "the surviving worker answered inputs that arrived after the kill");
    let expected = offline_decisions(s.inputs.min(10_000));
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

/// Far more inputs per second than the one device thread can run (on any
/// machine: it emulates a device 20 times slower than this one): the
/// backlog waits in the devices' mailboxes, most inputs are past their
/// deadline before their head runs, and the fleet still ends with exactly
/// one outcome per input and exit status 0.
#[test]
fn an_overloaded_fleet_answers_every_input_once_and_exits_cleanly() {
    let _cpu = shared();
    let nats = NatsServer::start();
    let _w = start_worker(&nats.url, "w", &[]);
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    let n = 1000;
    // 20 devices x 1,000/s = 20,000 inputs/s offered to one thread that
    // runs a few hundred: the last inputs wait seconds for their heads.
    let out = output_within(
        branchpoint().args(["fleet", "--nats", &nats.url, "--threads", "1", "--device-slowdown", "20", "--devices", "20", "--rate", "1000", "--duration", "600"]).args([
            "--inputs",
            &n.to_string(),
            "--deadline-ms",
            "1000",
            "--json",
            summary.to_str().unwrap(),
            "--outcomes",
            outcomes.to_str().unwrap(),
        ]),
        Duration::from_secs(300),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fleet exited {}: {err}", out.status);
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    assert_eq!((s.inputs, s.outcomes, s.duplicates, s.errors), (n, n, 0, 0), "{s:?}");
    exactly_one_per_arrival(&read_outcomes(&outcomes), n, "");
    assert!(s.latency_ms_p99 > 1000.0, "inputs waited past their deadline for the device thread: it was overloaded: {s:?}");
    assert!(!err.contains("panicked"), "{err}");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn malformed_requests_get_typed_error_replies_and_the_worker_keeps_serving() {
    let _cpu = shared();
    let nats = NatsServer::start();
    let _w = start_worker(&nats.url, "sturdy", &[]);
    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(shipped_model().with_extension("json")).unwrap()).unwrap();
    let shape: Vec<u32> =
        std::iter::once(1).chain(card["architecture"]["partition_points"][0]["activation_shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32)).collect();
    let elems: u32 = shape.iter().product();
    let request = |branch: u8, shape: &[u32], n: usize| OffloadRequest {
        device_id: "tester".into(),
        seq: 7,
        partition_branch: branch,
        activation: Tensor::from_f32(shape, &vec![0.5; n]).unwrap(),
        deadline: Deadline { sent_at_unix_us: 0, budget_us: 5_000_000 },
        audit: None,
        model_sha256: None,
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
        let unknown_model = encode(&OffloadRequest { model_sha256: Some("ab".repeat(32)), ..request(1, &shape, elems as usize) }).unwrap();
        let cases: Vec<(String, Vec<u8>, ErrorKind)> = vec![
            (subjects::offload(1), b"\xc1 definitely not msgpack".to_vec(), ErrorKind::InvalidRequest),
            (subjects::offload(1), Vec::new(), ErrorKind::InvalidRequest),
            (subjects::offload(1), newer_version, ErrorKind::UnsupportedVersion),
            (subjects::offload(1), wrong_shape, ErrorKind::InvalidRequest),
            (subjects::offload(9), unknown_branch, ErrorKind::UnknownBranch),
            (subjects::offload(1), unknown_model, ErrorKind::UnknownModel),
        ];
        for (subject, payload, kind) in cases {
            assert_eq!(error_kind(ask(subject, payload).await), kind);
        }
        // Once its seq could be read, an error reply says which request it
        // refuses: a wrong shape, a body whose branch is not its subject's,
        // tensor data sent as numbers instead of bytes.
        let seq_of = |r: OffloadReply| match r {
            OffloadReply::Error(e) => (e.kind, e.seq),
            OffloadReply::Answer(a) => panic!("expected an error reply, got {a:?}"),
        };
        let wrong_shape = encode(&request(1, &[1, 3, 8, 8], 192)).unwrap();
        assert_eq!(seq_of(ask(subjects::offload(1), wrong_shape).await), (ErrorKind::InvalidRequest, Some(7)));
        let branch_one = encode(&request(1, &shape, elems as usize)).unwrap();
        for elsewhere in [2u8, 9] {
            assert_eq!(seq_of(ask(subjects::offload(elsewhere), branch_one.clone()).await), (ErrorKind::InvalidRequest, Some(7)), "a branch-1 body on {}", subjects::offload(elsewhere));
        }
        #[derive(serde::Serialize)]
        struct Loose {
            dtype: branchpoint_messages::DType,
            shape: Vec<u32>,
            data: Vec<u8>,
        }
        #[derive(serde::Serialize)]
        struct LooseRequest {
            device_id: String,
            seq: u64,
            partition_branch: u8,
            activation: Loose,
            deadline: Deadline,
        }
        let numbers = rmp_serde::to_vec_named(&serde_json::json!({
            "wire_version": branchpoint_messages::WIRE_VERSION,
            "body": LooseRequest { device_id: "tester".into(), seq: 8, partition_branch: 1, activation: Loose { dtype: branchpoint_messages::DType::F32, shape: shape.clone(), data: vec![0; elems as usize * 4] }, deadline: Deadline { sent_at_unix_us: 0, budget_us: 5_000_000 } },
        }))
        .unwrap();
        assert_eq!(seq_of(ask(subjects::offload(1), numbers).await), (ErrorKind::InvalidRequest, Some(8)), "tensor data as an array of numbers");

        // Still serving: a valid request gets an answer.
        match ask(subjects::offload(1), encode(&request(1, &shape, elems as usize)).unwrap()).await {
            OffloadReply::Answer(a) => {
                assert_eq!((a.seq, a.worker_id.as_str(), a.timings.batch_size), (7, "sturdy", 1));
                assert!(a.class < 10 && (0.0..=1.0).contains(&a.confidence));
            }
            OffloadReply::Error(e) => panic!("valid request refused: {e:?}"),
        }

        // An audit: answered like any offload, and the final exit's answer
        // goes to the calibrator with the device's tag. A tag out of range
        // is refused like any bad request.
        let mut audits = client.subscribe(subjects::CALIBRATION_AUDIT).await.unwrap();
        client.flush().await.unwrap();
        let tag = branchpoint_messages::AuditTag {
            model_sha256: "ab".repeat(32),
            group: "cameras".into(),
            branch_logits: vec![0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            on_device: true,
            sampled: true,
            audit_rate: 0.1,
            p_tar: 0.8,
            target_accuracy: 0.9,
            decided_at_unix_us: 42,
            label: Some(1),
        };
        let audited = OffloadRequest { audit: Some(tag.clone()), ..request(1, &shape, elems as usize) };
        let class = match ask(subjects::offload(1), encode(&audited).unwrap()).await {
            OffloadReply::Answer(a) => a.class,
            OffloadReply::Error(e) => panic!("audit refused: {e:?}"),
        };
        let msg = tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut audits)).await.expect("an audit result within 5 s").unwrap();
        let result: branchpoint_messages::AuditResult = decode(&msg.payload).unwrap();
        assert_eq!(result, tag.result("tester", 1, class));
        let bad_tag = OffloadRequest { audit: Some(branchpoint_messages::AuditTag { audit_rate: 0.0, ..tag }), ..request(1, &shape, elems as usize) };
        // Encoded by hand: `encode` itself refuses to send it.
        #[derive(serde::Serialize)]
        struct Envelope<'a> {
            wire_version: u16,
            body: &'a OffloadRequest,
        }
        assert!(encode(&bad_tag).is_err());
        let bad = rmp_serde::to_vec_named(&Envelope { wire_version: branchpoint_messages::WIRE_VERSION, body: &bad_tag }).unwrap();
        assert_eq!(error_kind(ask(subjects::offload(1), bad).await), ErrorKind::InvalidRequest);

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
        assert!(stats["endpoints"][0]["num_requests"].as_u64().unwrap() >= 8, "{stats}");
        // Every typed error reply is counted as the service API's error too.
        assert!(stats["endpoints"][0]["num_errors"].as_u64().unwrap() >= 10, "{stats}");
        assert!(stats["endpoints"][0]["last_error"].as_str().is_some_and(|e| !e.is_empty()) || stats["endpoints"][0]["last_error"].is_object(), "{stats}");
    });
}

#[test]
fn without_workers_offloads_fall_back_and_every_input_is_answered() {
    let _cpu = shared();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (s, outcomes) = run_fleet(dir.path(), "orphan", Some(&nats.url), 300, 500);
    assert_eq!((s.inputs, s.outcomes, s.answered_by_cloud), (300, 300, 0));
    assert_eq!(s.fallbacks, s.offloaded);
    assert_eq!(s.fallbacks_no_responders, s.fallbacks, "NATS says at once that nobody listens: {s:?}");
    exactly_one_each(&outcomes, 300);
}

/// A rogue member of the workers' queue group answers every offload with
/// class 999, or with another request's seq: the devices take none of it,
/// and fall back on their own branch instead, counted.
#[test]
fn impossible_answers_from_a_rogue_worker_are_not_taken() {
    use branchpoint_messages::{OffloadAnswer, WorkerTimings};
    use futures::StreamExt;
    let _cpu = shared();
    let nats = NatsServer::start();
    let url = nats.url.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let rogue = std::thread::spawn(move || {
        runtime().block_on(async move {
            let client = async_nats::connect(&url).await.unwrap();
            let mut sub = client.queue_subscribe(subjects::OFFLOAD_ALL, subjects::WORKER_QUEUE_GROUP.into()).await.unwrap();
            client.flush().await.unwrap();
            ready_tx.send(()).unwrap();
            let mut answered = 0u64;
            while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                let Ok(req) = decode::<OffloadRequest>(&msg.payload) else { continue };
                let (class, seq) = if answered.is_multiple_of(2) { (999, req.seq) } else { (1, req.seq + 1_000_000) };
                let timings = WorkerTimings { queue_us: 1, compute_us: 1, batch_size: 1 };
                let answer = OffloadReply::Answer(OffloadAnswer { seq, worker_id: "rogue".into(), class, confidence: 0.99, timings });
                if let Some(reply) = msg.reply {
                    client.publish(reply, encode(&answer).unwrap().into()).await.unwrap();
                }
                answered += 1;
            }
            answered
        })
    });
    ready_rx.recv().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, outcomes) = run_fleet(dir.path(), "rogue", Some(&nats.url), 300, 1000);
    assert!(rogue.join().unwrap() > 0, "the rogue answered");
    assert_eq!((s.inputs, s.outcomes, s.answered_by_cloud), (300, 300, 0), "{s:?}");
    assert_eq!((s.fallbacks, s.fallbacks_transport), (s.offloaded, s.offloaded), "{s:?}");
    assert!(s.offloaded > 0 && outcomes.iter().all(|o| o.class < 10 && o.worker_id.is_none()));
}

#[test]
fn calibration_refits_and_plans_reach_running_devices() {
    use branchpoint_actors::control::ControlStore;
    use branchpoint_messages::{CalibrationMethod, CalibrationRefit, CalibrationUpdate, FleetStatus, PlanTarget, PlanUpdate};
    let _cpu = shared();
    // Plans reach devices only through the control store (JetStream).
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _w = start_worker(&nats.url, "w", &[]);
    // The calibrator starts uncalibrated (T = 1 everywhere).
    let _cal = start_service("calibrator", &["calibrator", "--nats", &nats.url, "--method", "uncalibrated"], Duration::from_secs(60));

    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let outcomes = dir.path().join("outcomes.jsonl");
    let statuses: Watch<FleetStatus> = Watch::new(&nats.url, &subjects::fleet_status("refits"));
    // 10 devices x 40/s until interrupted; updates land while it runs.
    let fleet = RunningFleet::start(&[
        "--nats",
        &nats.url,
        "--fleet-id",
        "refits",
        "--status-interval-ms",
        "100",
        "--devices",
        "10",
        "--rate",
        "40",
        "--duration",
        "600",
        "--p-tar",
        "0.9",
        "--json",
        summary.to_str().unwrap(),
        "--outcomes",
        outcomes.to_str().unwrap(),
    ]);
    let decided = |seen: &[FleetStatus]| seen.iter().map(|s| s.summary.outcomes).max();
    // Refit and plan once some inputs were decided with T = 1.
    statuses.wait("the fleet to decide 50 inputs", Duration::from_secs(60), |seen| decided(seen).filter(|&n| n >= 50));

    let fitted = runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let current = client.request(subjects::CALIBRATION_GET, "".into()).await.unwrap();
        let current: CalibrationUpdate = decode(&current.payload).unwrap();
        assert_eq!(current.method, CalibrationMethod::Uncalibrated);
        assert!(current.temperatures.iter().all(|&t| t == 1.0));

        let refit = encode(&CalibrationRefit { method: CalibrationMethod::PerBranch }).unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(120), client.request(subjects::CALIBRATION_REFIT, refit.into())).await.unwrap().unwrap();
        let fitted: CalibrationUpdate = decode(&reply.payload).unwrap();
        assert_eq!(fitted.method, CalibrationMethod::PerBranch);
        assert!(fitted.temperatures.iter().all(|&t| t > 0.0 && t != 1.0), "{fitted:?}");

        // A malformed refit gets an error reply; the calibrator keeps serving.
        let bad = client.request(subjects::CALIBRATION_REFIT, "nonsense".into()).await.unwrap();
        assert!(decode::<branchpoint_messages::ErrorReply>(&bad.payload).is_ok());

        let plan = PlanUpdate { target: PlanTarget::Group("default".into()), partition_branch: 2, p_tar: 0.75, certified: None, codec: None, temperature: None };
        ControlStore::open(&client).await.unwrap().put_plan(&plan).await.unwrap();
        fitted
    });
    // Evidence that both reached every device, then more inputs decided so.
    let t2 = fitted.temperatures[1];
    let applied_at = statuses.wait("all 10 devices to hold branch 2, p_tar 0.75 and the fitted temperature", Duration::from_secs(60), |seen| {
        seen.iter().find(|s| s.applied.iter().any(|a| (a.partition_branch, a.p_tar, a.temperature, a.devices) == (2, 0.75, t2, 10))).map(|s| s.summary.outcomes)
    });
    statuses.wait("50 more inputs decided after that", Duration::from_secs(60), |seen| decided(seen).filter(|&n| n >= applied_at + 50));
    fleet.interrupt();
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    assert_eq!((s.outcomes, s.duplicates), (s.inputs, 0));

    // Outcomes in arrival order: T = 1 at branch 1 and p_tar 0.9 first; the
    // fitted temperatures, then branch 2 at p_tar 0.75, later.
    let mut outcomes = read_outcomes(&outcomes);
    outcomes.sort_by_key(|o| o.arrival);
    assert_eq!((outcomes[0].temperature, outcomes[0].partition_branch, outcomes[0].p_tar), (1.0, 1, 0.9));
    let last = outcomes.last().unwrap();
    assert_eq!((last.partition_branch, last.p_tar), (2, 0.75));
    assert_eq!(last.temperature, fitted.temperatures[1], "branch 2 decides with its fitted temperature");
    let first_fitted = outcomes.iter().position(|o| o.temperature != 1.0).expect("the refit reached the devices");
    assert!(first_fitted >= 50, "the first 50 inputs were decided with T = 1");
}

/// The checks of a fleet that lived through a fault: every input exactly
/// one outcome, every offload a cloud answer or a counted fallback, and no
/// outcome later than its deadline plus 50 ms.
fn every_input_answered_in_time(summary: &Path, outcomes: &Path, deadline_ms: u64, said: &str) -> (Summary, Vec<Outcome>) {
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    let outcomes = read_outcomes(outcomes);
    assert_eq!((s.outcomes, s.duplicates, s.errors), (s.inputs, 0, 0), "{s:?}");
    exactly_one_per_arrival(&outcomes, s.inputs, said);
    assert_eq!(s.answered_by_cloud + s.fallbacks, s.offloaded);
    assert_eq!(s.fallbacks, s.fallbacks_by_reason().iter().map(|(_, n)| n).sum::<usize>());
    let bound = (deadline_ms + 50) * 1000;
    let late: Vec<&Outcome> = outcomes.iter().filter(|o| o.latency.total_us > bound).collect();
    assert!(late.is_empty(), "{} outcomes later than the deadline plus 50 ms, e.g. {:?}", late.len(), late.first());
    (s, outcomes)
}

/// A broker outage longer than a client's outgoing buffer lasts (15 s of
/// 200 offloads/s), then the server comes back: while disconnected the
/// devices fall back at once (nothing is buffered to reach the workers,
/// stale, later), after the reconnect the cloud answers again, and every
/// input has exactly one outcome by its deadline. Then an outage that
/// outlasts the fleet: it ends on time, exit 0, nothing lost. (The outage's
/// length is the fault injected; everything else waits for evidence.)
#[test]
fn broker_outages_lose_no_input_and_answer_every_input_by_its_deadline() {
    let _cpu = alone();
    let mut nats = NatsServer::start();
    let statuses: Watch<WorkerStatus> = Watch::new(&nats.url, subjects::WORKER_STATUS);
    let _w = start_worker(&nats.url, "outlasting", &["--status-interval-ms", "100"]);
    let dir = tempfile::tempdir().unwrap();
    let answered = |seen: &[WorkerStatus]| seen.iter().map(|s| s.requests).max();
    let (summary, outcomes) = (dir.path().join("summary.json"), dir.path().join("outcomes.jsonl"));
    let fleet = RunningFleet::start(&[
        "--nats",
        &nats.url,
        "--devices",
        "10",
        "--rate",
        "20",
        "--duration",
        "600",
        "--p-tar",
        &P_TAR.to_string(),
        "--deadline-ms",
        "1000",
        "--json",
        summary.to_str().unwrap(),
        "--outcomes",
        outcomes.to_str().unwrap(),
    ]);
    let before = statuses.wait("200 offloads answered", Duration::from_secs(60), |seen| answered(seen).filter(|&n| n >= 200));
    nats.stop();
    let down_unix_us = branchpoint_actors::clock::unix_us();
    std::thread::sleep(Duration::from_secs(15));
    nats.restart();
    let up_unix_us = branchpoint_actors::clock::unix_us();
    // The worker and the fleet reconnect and the cloud answers again.
    statuses.wait("the worker to answer 200 more after the outage", Duration::from_secs(90), |seen| answered(seen).filter(|&n| n >= before + 200));
    let said = fleet.interrupt();
    let (s, outs) = every_input_answered_in_time(&summary, &outcomes, 1000, &said);
    assert!(s.fallbacks_disconnected > 0, "inputs offloaded during the outage fell back at once: {s:?}\n{said}");
    let during = outs.iter().filter(|o| o.arrived_unix_us > down_unix_us + 1_000_000 && o.arrived_unix_us + 1_000_000 < up_unix_us);
    for o in during {
        assert!(o.decided != Decided::Cloud, "no cloud answers while the server is down: {o:?}");
        if o.decided == Decided::Fallback {
            assert!(o.latency.total_us < 100_000, "a disconnected device does not wait for its deadline: {o:?}");
        }
    }
    assert!(outs.iter().any(|o| o.decided == Decided::Cloud && o.arrived_unix_us > up_unix_us), "cloud answers after the reconnect");

    // An outage that outlasts the fleet: 1,500 inputs at 200/s, the server
    // gone after the fleet's first 100 cloud answers and not back before
    // the fleet ends.
    let so_far = statuses.wait("the worker's count so far", Duration::from_secs(10), answered);
    let (summary, outcomes) = (dir.path().join("summary2.json"), dir.path().join("outcomes2.jsonl"));
    let fleet = RunningFleet::start(&[
        "--nats",
        &nats.url,
        "--devices",
        "10",
        "--rate",
        "20",
        "--duration",
        "600",
        "--inputs",
        "1500",
        "--p-tar",
        &P_TAR.to_string(),
        "--deadline-ms",
        "1000",
        "--json",
        summary.to_str().unwrap(),
        "--outcomes",
        outcomes.to_str().unwrap(),
    ]);
    statuses.wait("100 of the fleet's offloads answered", Duration::from_secs(60), |seen| answered(seen).filter(|&n| n >= so_far + 100));
    nats.stop();
    let mut child = fleet.child;
    let status = wait_for("the fleet to end with its server gone", Duration::from_secs(60), || child.try_wait().unwrap());
    let said = text(fleet.stderr) + &text(fleet.stdout);
    assert!(status.success(), "exit 0 with the server gone: {said}");
    let (s, _) = every_input_answered_in_time(&summary, &outcomes, 1000, &said);
    assert_eq!(s.inputs, 1500, "{said}");
    assert!(s.fallbacks_disconnected > 0, "{s:?}");
}

/// Goodput under overload: one worker on emulated hardware 40 times slower
/// than this machine (a batch of 32 takes about 0.4 s on an idle machine
/// here, well inside the 4 s deadline even on a slower or busier one). Offered ten times what it answers at capacity, it still
/// answers in time most of that, because it refuses at once what it cannot
/// finish (the devices fall back at once) and runs full batches of the
/// earliest deadlines that can still be met; its memory is bounded by its
/// queue limit. Both rates are measured in this run, so the ratio holds on
/// any machine; BENCHMARKS.md has the numbers.
#[test]
fn ten_times_overload_keeps_most_of_the_goodput() {
    let _cpu = alone();
    let nats = NatsServer::start();
    let model = repo_root().join("models/bvgg-fmnist.safetensors");
    let model = model.to_str().unwrap();
    let _w = start_worker(&nats.url, "swamped", &["--model", model, "--cloud-slowdown", "40"]);
    let dir = tempfile::tempdir().unwrap();
    // Offloads answered in time per second, offered `offered` per second
    // for SECONDS (p_tar 0.999999: nearly every input offloads).
    const SECONDS: f64 = 6.0;
    let goodput = |name: &str, offered: f64| -> (Summary, f64) {
        let (summary, outcomes) = (dir.path().join(format!("{name}.json")), dir.path().join(format!("{name}.jsonl")));
        let out = branchpoint()
            .args(["fleet", "--nats", &nats.url, "--model", model, "--devices", "10", "--rate", &(offered / 10.0).to_string(), "--duration", &SECONDS.to_string()])
            .args(["--p-tar", "0.999999", "--deadline-ms", "4000", "--threads", "2"])
            .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "fleet {name} failed: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        let (s, _) = every_input_answered_in_time(&summary, &outcomes, 4000, &said);
        let per_s = s.answered_by_cloud as f64 / SECONDS;
        eprintln!("{name}: offered {offered:.0}/s ({} offloads), answered in time {per_s:.1}/s: {s:?}", s.offloaded);
        (s, per_s)
    };
    // Beyond the worker: what it answers is about its capacity.
    let (_, probe) = goodput("probe", 400.0);
    // How much that is depends on the machine and its load; the ratio below
    // is what must hold.
    assert!(probe > 0.0, "the worker answers under overload: {probe}/s");
    let (_, at_capacity) = goodput("at-capacity", probe);
    let (over, overloaded) = goodput("tenfold", 10.0 * at_capacity);
    eprintln!("goodput at 10x overload: {overloaded:.1}/s, {:.2} of the {at_capacity:.1}/s answered at capacity", overloaded / at_capacity);
    assert!(overloaded >= 0.6 * at_capacity, "goodput collapsed under overload: {overloaded:.1}/s vs {at_capacity:.1}/s");
    // What it could not take, it refused at once or expired: fallbacks
    // answered in time, not misses.
    assert!(over.fallbacks_refused + over.fallbacks_expired > 10 * over.fallbacks_deadline, "refused at once rather than missed: {over:?}");
    assert!(over.deadline_misses * 10 < over.fallbacks, "{over:?}");
}

/// An audit result as a worker sends it: branch logits confident in class
/// 3, the final exit agreeing or not.
fn audit_result(sha: &str, group: &str, i: u64, agrees: bool) -> branchpoint_messages::AuditResult {
    let mut logits = vec![0f32; 10];
    logits[3] = 6.0;
    branchpoint_messages::AuditResult {
        model_sha256: sha.to_string(),
        device_id: "cam-1".into(),
        group: group.into(),
        partition_branch: 1,
        decided_at_unix_us: 1_000_000 + i * 10_000,
        branch_logits: logits,
        final_class: if agrees { 3 } else { 4 },
        on_device: true,
        sampled: true,
        audit_rate: 0.1,
        p_tar: 0.8,
        target_accuracy: 0.9,
        label: Some(3),
    }
}

fn model_sha(url: &str) -> String {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        let current: branchpoint_messages::CalibrationUpdate = decode(&client.request(subjects::CALIBRATION_GET, "".into()).await.unwrap().payload).unwrap();
        current.model_sha256
    })
}

/// Publishes each payload on `subject`, in order, and flushes.
fn publish_all(url: &str, subject: &str, payloads: Vec<Vec<u8>>) {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.unwrap();
        for p in payloads {
            client.publish(subject.to_string(), p.into()).await.unwrap();
        }
        client.flush().await.unwrap();
    });
}

/// The calibrator watches audit results live: an outside client of the wire
/// format publishes them (as workers will), the calibrator's status shows
/// the estimate of the plan in force, a run of disagreements raises a drift
/// alarm, and malformed, out-of-range or other models' results are refused
/// and counted without stopping it. With `--alarm-only` an operator sees
/// the alarm and nothing is refit.
#[test]
fn the_calibrator_watches_audit_results_and_alarms_on_drift() {
    use branchpoint_messages::{AuditResult, CalibrationStatus};
    let _cpu = shared();
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _cal = start_service("calibrator", &["calibrator", "--nats", &nats.url, "--alarm-only", "--min-refit-sample", "50"], Duration::from_secs(60));
    let api = format!("127.0.0.1:{}", port());
    let _api = start_service("watch-api", &["serve", "--nats", &nats.url, "--listen", &api], Duration::from_secs(60));
    let statuses: Watch<CalibrationStatus> = Watch::new(&nats.url, subjects::CALIBRATION_STATUS);
    let sha = model_sha(&nats.url);
    let result = |i: u64, agrees: bool| audit_result(&sha, "cameras", i, agrees);
    // 200 audits that agree: no alarm. Refused: bytes that are no message,
    // another model's result, a branch the model lacks, the wrong number of
    // classes.
    let mut payloads: Vec<Vec<u8>> = (0..200).map(|i| encode(&result(i, true)).unwrap()).collect();
    payloads.push(b"nonsense".to_vec());
    let other = AuditResult { model_sha256: "ab".repeat(32), ..result(200, true) };
    let branch = AuditResult { partition_branch: 9, ..result(201, true) };
    let classes = AuditResult { branch_logits: vec![1.0, 0.0, 0.0], final_class: 0, label: None, ..result(202, true) };
    payloads.extend([other, branch, classes].iter().map(|r| encode(r).unwrap()));
    publish_all(&nats.url, subjects::CALIBRATION_AUDIT, payloads);
    let calm = statuses.wait("the status of 200 agreeing audits and 4 refused results", Duration::from_secs(60), |seen| {
        seen.iter().rev().find(|s| s.refused == 4 && s.watched.first().is_some_and(|w| w.audits == 200)).cloned()
    });
    let w = &calm.watched[0];
    assert_eq!((w.group.as_str(), w.partition_branch, w.alarms, w.threshold, w.target_accuracy), ("cameras", 1, 0, 0.8, 0.9));
    assert_eq!(w.edge_agreement, Some(1.0));
    assert_eq!(w.edge_accuracy, Some(1.0), "the results carry labels: the accuracy is estimated beside the agreement");
    assert!(w.edge_agreement_low.unwrap() > 0.97 && w.edge_agreement_high == Some(1.0), "{w:?}");
    assert!(!w.auto_refit, "--alarm-only");
    assert!(!w.reliability.is_empty() && w.reliability.iter().all(|b| b.agreement == 1.0), "a live reliability diagram: {:?}", w.reliability);
    // A run of disagreements, then more than enough for a refit: the drift
    // test alarms, and with --alarm-only nothing is refit.
    publish_all(&nats.url, subjects::CALIBRATION_AUDIT, (203..603).map(|i| encode(&result(i, i % 3 == 0)).unwrap()).collect());
    let drifted =
        statuses.wait("a drift alarm", Duration::from_secs(60), |seen| seen.iter().rev().find(|s| s.watched.first().is_some_and(|w| w.alarms > 0 && w.audits == 600)).cloned());
    let w = &drifted.watched[0];
    assert!(w.edge_agreement.unwrap() < 0.9, "{w:?}");
    assert_eq!((w.refits, drifted.refits_total, w.threshold), (0, 0, 0.8), "alarms only: no refit, the plan stands");
    assert!(drifted.alarms_total >= w.alarms);
    assert!(service_log("calibrator").contains("drift alarm") && service_log("calibrator").contains("automatic refits are off"), "{}", service_log("calibrator"));
    // The control plane shows the same: /api/calibration and /metrics.
    let body = wait_for("the API to show the alarm", Duration::from_secs(60), || {
        let r = http("GET", &api, "/api/calibration", None, None);
        let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
        (v["watch"]["branches"][0]["alarms"].as_u64()? > 0).then_some(v)
    });
    assert_eq!(body["watch"]["refused"], 4, "{body}");
    assert_eq!(body["watch"]["branches"][0]["group"], "cameras");
    assert!(body["watch"]["branches"][0]["reliability"].as_array().is_some_and(|b| !b.is_empty()), "{body}");
    let m = http("GET", &api, "/metrics", None, None).body;
    assert!(metric(&m, "branchpoint_watch_alarms_total{group=\"cameras\",branch=\"1\"").is_some_and(|a| a > 0.0), "{m}");
    assert_eq!(metric(&m, "branchpoint_watch_refused_total"), Some(4.0));
    assert!(metric(&m, "branchpoint_watch_edge_agreement{group=\"cameras\"").is_some_and(|a| a < 0.9), "{m}");
    assert_eq!(metric(&m, "branchpoint_calibrator_drift_refits_total"), Some(0.0));
    promtool_check(&m).unwrap_or_else(|e| panic!("promtool check metrics: {e}"));
    // A forged fleet status whose figures cannot be (100,010 devices, more
    // outcomes than inputs) is refused and counted, never shown.
    #[derive(serde::Serialize)]
    struct Envelope<B> {
        wire_version: u16,
        body: B,
    }
    let summary = branchpoint_messages::FleetSummary { inputs: 10, outcomes: 1_000_000_000_000, ..Default::default() };
    let forged = branchpoint_messages::FleetStatus {
        fleet_id: "forged".into(),
        group: "g".into(),
        devices: 100_010,
        running: true,
        at_unix_us: 2,
        started_unix_us: 1,
        summary,
        latency_le_ms: vec![],
        latency_le_counts: vec![],
        latency_sum_ms: 0.0,
        applied: vec![],
    };
    let bytes = rmp_serde::to_vec_named(&Envelope { wire_version: branchpoint_messages::WIRE_VERSION, body: forged }).unwrap();
    publish_all(&nats.url, &subjects::fleet_status("forged"), vec![bytes]);
    wait_for("the forged status to be refused and counted", Duration::from_secs(30), || {
        metric(&http("GET", &api, "/metrics", None, None).body, "branchpoint_api_refused_statuses_total").filter(|&n| n >= 1.0)
    });
    assert!(!http("GET", &api, "/api/fleet", None, None).body.contains("forged"));
}

/// A drift alarm refits the group's branch from the sampled inputs that
/// arrive after it, and stores the group's temperatures and certified plan
/// in the control store (where running devices pick them up); results
/// decided under the replaced plan are stale and skipped; another group
/// keeps the model's temperatures.
#[test]
fn a_drift_refit_is_stored_for_the_group() {
    use branchpoint_actors::control::{group_calibration_key, ControlStore};
    use branchpoint_messages::{AuditResult, CalibrationStatus, PlanTarget};
    let _cpu = shared();
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _cal = start_service("refitting-calibrator", &["calibrator", "--nats", &nats.url, "--min-refit-sample", "200", "--min-refit-interval-s", "1"], Duration::from_secs(60));
    let statuses: Watch<CalibrationStatus> = Watch::new(&nats.url, subjects::CALIBRATION_STATUS);
    let sha = model_sha(&nats.url);
    // Group "night": agreeing, then only one in three agrees. Group "day"
    // agrees throughout.
    let mut payloads = Vec::new();
    for i in 0..800u64 {
        payloads.push(encode(&audit_result(&sha, "night", i, i < 100 || i % 3 == 0)).unwrap());
        payloads.push(encode(&audit_result(&sha, "day", i, true)).unwrap());
    }
    publish_all(&nats.url, subjects::CALIBRATION_AUDIT, payloads);
    // Every result taken (they arrive in order, day's last).
    let refit = statuses.wait("a refit of group night, and every result taken", Duration::from_secs(60), |seen| {
        seen.iter().rev().find(|s| s.watched.iter().any(|w| w.group == "night" && w.refits == 1) && s.watched.iter().any(|w| w.group == "day" && w.audits == 800)).cloned()
    });
    let night = refit.watched.iter().find(|w| w.group == "night").unwrap();
    let last = night.last_refit.expect("the refit is reported");
    assert!(last.fit_inputs + last.certify_inputs >= 200, "{last:?}");
    assert!(night.temperature > 1.0 && night.temperature == last.temperature, "agreement far below confidence: a higher temperature: {night:?}");
    assert_eq!(refit.refits_total, 1);
    let day = refit.watched.iter().find(|w| w.group == "day").unwrap();
    assert_eq!((day.alarms, day.refits), (0, 0), "{day:?}");
    // The store holds the group's temperatures and its certified plan.
    let (plans, temps, model) = runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let store = ControlStore::open(&client).await.unwrap();
        let model = store.calibration(&sha).await.unwrap().unwrap().value;
        (store.plans().await.unwrap(), store.calibrations(&sha).await.unwrap(), model)
    });
    let plan = plans.iter().find(|p| p.value.target == PlanTarget::Group("night".into())).expect("the group's plan is stored").value.clone();
    assert_eq!((plan.partition_branch, plan.p_tar), (1, last.threshold));
    let target = plan.certified.expect("a certified plan");
    assert_eq!((target.accuracy, target.delta), (0.9, 0.05));
    let group = temps.iter().find(|t| t.value.group.as_deref() == Some("night")).expect("the group's temperatures are stored").value.clone();
    assert_eq!(group.temperatures[0], last.temperature);
    assert_eq!(group.temperatures[1..], model.temperatures[1..], "only the refit branch changes");
    assert!(!plans.iter().any(|p| p.value.target == PlanTarget::Group("day".into())) && temps.iter().all(|t| t.value.group.as_deref() != Some("day")));
    assert!(group_calibration_key(&sha, "night").ends_with(".group.night"));
    let log = service_log("refitting-calibrator");
    assert!(log.contains("drift refit for group night, branch 1") && log.contains("stored for the group's devices"), "{log}");
    // Results still decided under the old plan (p_tar 0.8) are stale: they
    // neither count nor start another monitor.
    let stale = night.stale;
    assert!(stale > 0, "the night results after the refit were decided under the replaced plan: {night:?}");
    publish_all(&nats.url, subjects::CALIBRATION_AUDIT, (800..850).map(|i| encode(&audit_result(&sha, "night", i, false)).unwrap()).collect());
    let after = statuses.wait("the stale results counted", Duration::from_secs(60), |seen| {
        seen.iter().rev().find(|s| s.watched.iter().any(|w| w.group == "night" && w.stale == stale + 50)).cloned()
    });
    let night_after = after.watched.iter().filter(|w| w.group == "night").collect::<Vec<_>>();
    assert_eq!(night_after.len(), 1, "one monitor per group and branch: {night_after:?}");
    assert_eq!(night_after[0].refits, 1);
    // The refit plan's own results count.
    let under_refit = |i: u64| AuditResult { p_tar: last.threshold, ..audit_result(&sha, "night", i, true) };
    publish_all(&nats.url, subjects::CALIBRATION_AUDIT, (850..860).map(|i| encode(&under_refit(i)).unwrap()).collect());
    statuses.wait("results under the refit plan", Duration::from_secs(60), |seen| {
        seen.iter().rev().find(|s| s.watched.iter().any(|w| w.group == "night" && w.threshold == last.threshold && w.audits > 0 && w.stale == stale + 50)).cloned()
    });
}

/// `branchpoint planner --certify-delta`: its candidates are certified
/// thresholds, and a plan that offloads says which target it certifies.
#[test]
fn a_certifying_planner_says_which_target_its_plans_certify() {
    use branchpoint_messages::{subjects, PlanUpdate};
    let _cpu = shared();
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _planner = start_service("certifying-planner", &["planner", "--nats", &nats.url, "--device-slowdown", "4", "--certify-delta", "0.05"], Duration::from_secs(90));
    let plans: Watch<PlanUpdate> = Watch::new(&nats.url, &stored_plan("device.phone-8"));
    runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        client.publish(subjects::NETWORK_REPORT, encode(&network_report("phone-8", 0.08)).unwrap().into()).await.unwrap();
        client.flush().await.unwrap();
    });
    let plan = plans.wait("a plan for a fast link", Duration::from_secs(30), |seen| seen.first().cloned());
    assert!(plan.p_tar > 0.0 && plan.p_tar < 1.0, "a fast link is worth offloading to: {plan:?}");
    let target = plan.certified.expect("the threshold says which target it certifies");
    assert_eq!(target.delta, 0.05);
    assert!((0.5..1.0).contains(&target.accuracy), "{plan:?}");
}

/// `branchpoint planner --watch`: the adaptive policy's control loop in the
/// stack's planner. A device's report gets a plan certified for the level,
/// stored with the temperature it was chosen at; audit results from its
/// group whose branch now disagrees with the final exit set off a drift
/// alarm, and the planner at once stores a plan that offloads everything
/// (nothing on the device is certified until a refit). Every plan stored
/// is the planner's (a calibrator runs beside it, alarms only, and stores
/// none).
#[test]
fn a_watching_planner_voids_its_plans_on_drift() {
    use branchpoint_messages::{encode, subjects, AuditResult, PlanTarget, PlanUpdate};
    let _cpu = shared();
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _cal = start_service("watching-calibrator", &["calibrator", "--nats", &nats.url, "--alarm-only"], Duration::from_secs(60));
    let args = ["planner", "--nats", &nats.url, "--device-slowdown", "4", "--level-accuracy", "0.9", "--watch", "--min-refit-sample", "100000"];
    let _planner = start_service("watching-planner", &args, Duration::from_secs(90));
    let plans: Watch<PlanUpdate> = Watch::new(&nats.url, &stored_plan(">"));
    let sha = model_sha(&nats.url);
    let rt = runtime();
    let client = rt.block_on(async_nats::connect(&nats.url)).unwrap();
    let publish = |subject: &'static str, payloads: Vec<Vec<u8>>| {
        rt.block_on(async {
            for p in payloads {
                client.publish(subject, p.into()).await.unwrap();
            }
            client.flush().await.unwrap();
        })
    };
    publish(subjects::NETWORK_REPORT, vec![encode(&network_report("phone-9", 0.08)).unwrap()]);
    let first = plans.wait("a plan for phone-9", Duration::from_secs(30), |seen| seen.first().cloned());
    assert_eq!(first.target, PlanTarget::Device("phone-9".into()));
    assert!(first.p_tar < 1.0 && first.certified.is_some_and(|c| c.accuracy == 0.9) && first.temperature.is_some(), "{first:?}");
    // The group's inputs at that branch now disagree with the final exit.
    let result = |i: u64| AuditResult { group: "phones".into(), partition_branch: first.partition_branch, ..audit_result(&sha, "phones", i, false) };
    publish(subjects::CALIBRATION_AUDIT, (0..200).map(|i| encode(&result(i)).unwrap()).collect());
    let void = plans.wait("the plan that offloads everything", Duration::from_secs(30), |seen| seen.iter().find(|p| p.p_tar == 1.0).cloned());
    assert_eq!(void.target, PlanTarget::Device("phone-9".into()), "{void:?}");
    assert!(void.temperature.is_some() && void.certified.is_none(), "{void:?}");
    let all = plans.wait("the plans so far", Duration::from_secs(5), |seen| Some(seen.to_vec()));
    assert!(all.iter().all(|p| matches!(p.target, PlanTarget::Device(_)) && p.temperature.is_some()), "only the planner stores plans: {all:?}");
    assert!(service_log("watching-planner").contains("drift alarm, group phones"));
}

/// The subject a write to the plans bucket's `key` is published on: a
/// plain subscription to it sees every plan stored there, as it is stored.
fn stored_plan(key: &str) -> String {
    format!("$KV.{}.{key}", branchpoint_actors::control::PLANS_BUCKET)
}

/// `branchpoint planner` over NATS: a report of a fast link gets a plan that
/// offloads, one of a crawling link a plan that keeps every input on the
/// device, each stored where devices learn plans (the control store);
/// malformed reports do not stop it.
#[test]
fn the_planner_answers_network_reports_with_plans() {
    use branchpoint_messages::{encode, subjects, PlanTarget, PlanUpdate};
    let _cpu = shared();
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]);
    let _planner = start_service("planner", &["planner", "--nats", &nats.url, "--device-slowdown", "4"], Duration::from_secs(90));
    let plans: Watch<PlanUpdate> = Watch::new(&nats.url, &stored_plan("device.>"));
    let of = |seen: &[PlanUpdate], device: &str| seen.iter().filter(|p| p.target == PlanTarget::Device(device.into())).cloned().collect::<Vec<_>>();
    let rt = runtime();
    let client = rt.block_on(async_nats::connect(&nats.url)).unwrap();
    let publish = |subject: &'static str, payload: Vec<u8>| {
        rt.block_on(async {
            client.publish(subject, payload.into()).await.unwrap();
            client.flush().await.unwrap();
        })
    };
    // 100 Mbit/s, then garbage, then 0.05 Mbit/s: a plan is stored when it
    // changes, so each report's answer is a new write.
    publish(subjects::NETWORK_REPORT, encode(&network_report("phone-7", 0.08)).unwrap());
    let fast = plans.wait("a plan for a fast link", Duration::from_secs(30), |seen| of(seen, "phone-7").first().cloned());
    publish(subjects::NETWORK_REPORT, b"not a report".to_vec());
    publish(subjects::NETWORK_REPORT, encode(&network_report("phone-7", 160.0)).unwrap());
    let crawling = plans.wait("a plan for a crawling link", Duration::from_secs(30), |seen| of(seen, "phone-7").get(1).cloned());
    // A worker reports 5,000 requests waiting: on a fast link, no offload
    // can make its deadline behind them. The status and the reports arrive
    // on two subscriptions, so the planner may take a report first: each
    // report comes from a new device (whose first plan is always stored)
    // until a plan says device only.
    let status = WorkerStatus { worker_id: "w-busy".into(), queue_depth: 5_000, ..Default::default() };
    let mut swamped = None;
    for k in 0..20 {
        publish(subjects::WORKER_STATUS, encode(&status).unwrap());
        let device = format!("phone-swamped-{k}");
        publish(subjects::NETWORK_REPORT, encode(&network_report(&device, 0.08)).unwrap());
        let plan = plans.wait("a plan behind the backlog", Duration::from_secs(30), |seen| of(seen, &device).first().cloned());
        if plan.p_tar == 0.0 {
            swamped = Some(plan);
            break;
        }
    }
    let swamped = swamped.expect("a device-only plan behind the backlog");
    assert_eq!(fast.target, PlanTarget::Device("phone-7".into()));
    assert!(fast.p_tar > 0.0, "a fast link is worth offloading to: {fast:?}");
    assert!(fast.codec.is_some(), "a plan names its codec: {fast:?}");
    assert_eq!(crawling.p_tar, 0.0, "nothing can cross a 0.05 Mbit/s link in 100 ms: {crawling:?}");
    assert_eq!(swamped.p_tar, 0.0, "a swamped pool keeps inputs on the device: {swamped:?}");
    assert!(service_log("planner").contains("malformed network report"));
}

/// `fleet --uplink-schedule`: each device emulates its uplink as steps over
/// time. On a fast link nothing is declined; when it collapses at 3 s the
/// devices see it and decline offloads that cannot make the deadline, none
/// in the first second of arrivals (the links start before the first
/// arrival, by the time devices take to spawn: far less than 2 s); every
/// input still gets exactly one outcome.
#[test]
fn a_fleet_on_a_scheduled_uplink_declines_what_a_collapse_cannot_carry() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let fleet = |name: &str, schedule: &str| {
        let summary = dir.path().join(format!("{name}-summary.json"));
        let outcomes = dir.path().join(format!("{name}-outcomes.jsonl"));
        let out = branchpoint()
            .args(["fleet", "--devices", "20", "--rate", "5", "--duration", "60", "--inputs", "600", "--deadline-ms", "100", "--uplink-schedule", schedule])
            .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "fleet failed: {}", String::from_utf8_lossy(&out.stderr));
        let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
        (s, read_outcomes(&outcomes))
    };
    let (fast, _) = fleet("fast", "0:100");
    assert_eq!((fast.inputs, fast.outcomes, fast.declined), (600, 600, 0), "{fast:?}");
    assert!(fast.offloaded > 0, "{fast:?}");
    let (s, outcomes) = fleet("collapse", "0:100,3:0.2");
    assert_eq!((s.inputs, s.outcomes, s.duplicates), (600, 600, 0), "{s:?}");
    exactly_one_each(&outcomes, 600);
    assert!(s.declined > 0, "the devices saw the collapse: {s:?}");
    let start = outcomes.iter().map(|o| o.arrived_unix_us).min().unwrap();
    let early: Vec<&Outcome> = outcomes.iter().filter(|o| o.declined && o.arrived_unix_us < start + 1_000_000).collect();
    assert!(early.is_empty(), "declined before the collapse: {:?}", early.first());
}

/// One writer per key, kept by the store: a writer that derives a plan from
/// the one it read (the calibrator's refit) never overwrites a plan another
/// writer (the operator) stored meanwhile.
#[test]
fn a_plan_replaced_meanwhile_is_not_overwritten() {
    use branchpoint_actors::control::ControlStore;
    use branchpoint_messages::{PlanTarget, PlanUpdate};
    let _cpu = shared();
    let store_dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store_dir.path().to_str().unwrap()]);
    runtime().block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let store = ControlStore::open(&client).await.unwrap();
        let plan = |p_tar| PlanUpdate { target: PlanTarget::Group("lab".into()), partition_branch: 1, p_tar, certified: None, codec: None, temperature: None };
        let first = store.replace_plan(&plan(0.8), 0).await.unwrap().expect("an absent key is created");
        assert_eq!(store.replace_plan(&plan(0.7), 0).await.unwrap(), None, "a create does not overwrite");
        let operators = store.put_plan(&plan(0.6)).await.unwrap();
        assert_eq!(store.replace_plan(&plan(0.5), first).await.unwrap(), None, "a replace at an old revision does not overwrite");
        let stored = store.plan(&PlanTarget::Group("lab".into())).await.unwrap().unwrap();
        assert_eq!((stored.value.p_tar, stored.revision), (0.6, operators));
        let replaced = store.replace_plan(&plan(0.5), operators).await.unwrap().expect("a replace at the revision read is stored");
        assert!(replaced > operators);
        assert_eq!(store.plan(&PlanTarget::Group("lab".into())).await.unwrap().unwrap().value.p_tar, 0.5);
    });
}

/// A plan stored for one device expires its TTL after it was last written
/// (a gone device leaves no key behind); a group's plan stays.
#[test]
fn a_device_plan_expires_and_a_group_plan_stays() {
    use branchpoint_actors::control::{ControlStore, StoreSettings};
    use branchpoint_messages::{PlanTarget, PlanUpdate};
    let _cpu = shared();
    let store_dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with(&["-js", "-sd", store_dir.path().to_str().unwrap()]);
    let settings = StoreSettings { device_plan_ttl: Duration::from_secs(1), ..StoreSettings::default() };
    let rt = runtime();
    let store = rt.block_on(async {
        let client = async_nats::connect(&nats.url).await.unwrap();
        let store = ControlStore::open_with(&client, settings).await.unwrap();
        for target in [PlanTarget::Device("gone-1".into()), PlanTarget::Group("stays".into())] {
            store.put_plan(&PlanUpdate { target, partition_branch: 1, p_tar: 0.8, certified: None, codec: None, temperature: None }).await.unwrap();
        }
        store
    });
    let listed = |rt: &tokio::runtime::Runtime| rt.block_on(store.plans()).unwrap().into_iter().map(|p| p.value.target).collect::<Vec<_>>();
    assert_eq!(listed(&rt).len(), 2);
    wait_for("the device's plan to expire", Duration::from_secs(30), || (listed(&rt) == [PlanTarget::Group("stays".into())]).then_some(()));
}
