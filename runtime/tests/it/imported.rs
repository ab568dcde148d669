//! A user's own model, exported by python/export.py, through the commands:
//! one worker over a real nats-server serves it next to a built-in model,
//! routing each request by the model's SHA-256, and every input is decided
//! as the offline evaluation of that model decides it; a model the worker
//! does not serve is refused, and the devices fall back. Bad cards and
//! data are clear errors with a failing exit.
use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use branchpoint_actors::collector::{Decided, Outcome, Summary};
use branchpoint_core::calibration::predict;
use branchpoint_models::Model;
use common::*;

const P_TAR: f64 = 0.9;

/// python/test_export.py's small CNN (two side branches, seeded random
/// weights), exported into `dir`: its card's path.
fn export_tiny(dir: &Path) -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(python.is_file(), "{} missing: run `make setup` (the project venv holds torch)", python.display());
    let script = "import sys, warnings; warnings.filterwarnings('ignore'); sys.path.insert(0, sys.argv[1]); import test_export; test_export.write_tiny(sys.argv[2])";
    let out = Command::new(&python).arg("-c").arg(script).arg(repo_root().join("python")).arg(dir).output().expect("the venv's python runs");
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
    dir.join("tiny.json")
}

/// (stays on the device, class) for the first `n` test inputs, as the
/// offline evaluation decides at partition branch 1 with temperature 1.
fn offline_decisions(model: &Path, n: usize) -> Vec<(bool, u32)> {
    let model = Model::load(model, tch::Device::Cpu).unwrap();
    let data = model.load_data(None).unwrap();
    let logits = model.logits_for(&data.test.images.narrow(0, 0, n as i64), 500).unwrap();
    let classes = model.num_classes() as usize;
    let branch: Vec<f32> = Vec::try_from(logits[0].flatten(0, -1)).unwrap();
    let fin: Vec<f32> = Vec::try_from(logits.last().unwrap().flatten(0, -1)).unwrap();
    (0..n)
        .map(|i| {
            let (class, confidence) = predict(&branch[i * classes..(i + 1) * classes], 1.0);
            if confidence >= P_TAR {
                (true, class as u32)
            } else {
                (false, predict(&fin[i * classes..(i + 1) * classes], 1.0).0 as u32)
            }
        })
        .collect()
}

/// A fleet of `model` over NATS, `n` inputs at branch 1: its summary and
/// outcomes by input.
fn fleet(dir: &Path, name: &str, url: &str, model: &Path, n: usize) -> (Summary, HashMap<usize, Outcome>) {
    let (summary, outcomes) = (dir.join(format!("{name}.json")), dir.join(format!("{name}.jsonl")));
    let out = output_within(
        branchpoint()
            .args(["fleet", "--nats", url, "--model", model.to_str().unwrap(), "--devices", "10", "--rate", "50", "--duration", "60", "--inputs", &n.to_string()])
            .args(["--p-tar", &P_TAR.to_string(), "--partition-branch", "1", "--deadline-ms", "5000"])
            .args(["--json", summary.to_str().unwrap(), "--outcomes", outcomes.to_str().unwrap()]),
        std::time::Duration::from_secs(300),
    );
    assert!(out.status.success(), "fleet {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(summary).unwrap()).unwrap();
    let mut by_input = HashMap::new();
    for line in std::fs::read_to_string(outcomes).unwrap().lines() {
        let o: Outcome = serde_json::from_str(line).unwrap();
        assert!(by_input.insert(o.input_index, o).is_none(), "{name}: an input with two outcomes");
    }
    assert_eq!((s.inputs, s.outcomes, by_input.len()), (n, n, n), "{name}: one outcome per input");
    (s, by_input)
}

#[test]
fn one_worker_serves_an_imported_model_next_to_a_built_in_one_as_offline() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let tiny = export_tiny(dir.path());
    let builtin = shipped_model();
    let nats = NatsServer::start();
    let both = format!("{},{}", builtin.display(), tiny.display());
    let _w = start_worker(&nats.url, "both", &["--model", &both]);
    let n = 500;
    for (name, model) in [("imported", &tiny), ("built-in", &builtin)] {
        let expected = offline_decisions(model, n);
        let (s, by_input) = fleet(dir.path(), name, &nats.url, model, n);
        assert_eq!((s.fallbacks, s.errors), (0, 0), "{name}: {s:?}");
        assert!(s.answered_by_cloud > 50, "{name}: the test needs offloads: {s:?}");
        for (i, &(on_device, class)) in expected.iter().enumerate() {
            let o = &by_input[&i];
            assert_eq!((o.decided == Decided::Device, o.class), (on_device, class), "{name}, input {i}: {o:?}");
            if o.decided == Decided::Cloud {
                assert_eq!(o.worker_id.as_deref(), Some("both"));
            }
        }
    }
    // A model the worker does not serve: refused by name (UnknownModel),
    // and every offload falls back on the device's own answer.
    let other = repo_root().join("models/bvgg-fmnist.safetensors");
    let (s, _) = fleet(dir.path(), "not-served", &nats.url, &other, 200);
    assert!(s.offloaded > 0 && s.fallbacks_error_reply == s.offloaded && s.answered_by_cloud == 0, "{s:?}");
}

/// The offline commands on an imported model with data the user brings
/// (tensor files named by its card): `profile`, `calibrate` and `evaluate`
/// give what they give for a built-in model (the same report keys, the
/// same plots), and `run` replays a shipped scenario with it.
#[test]
fn calibrate_evaluate_profile_and_run_take_an_imported_model_and_its_data() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    // The shipped example (trained: a model with random weights has no
    // finite temperature), its card pointing at tensor files instead of
    // Fashion-MNIST: 300 validation and 300 test images, as
    // python/tensorfile.py writes them for a user.
    let shipped = repo_root().join("models/mobilenet-ee-fmnist.json");
    let mut card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&shipped).unwrap()).unwrap();
    for b in card["branches"].as_array().unwrap() {
        for part in ["head", "tail"] {
            let file = b[part].as_str().unwrap();
            std::fs::copy(repo_root().join("models").join(file), dir.path().join(file)).unwrap();
        }
    }
    let python = repo_root().join(".venv/bin/python");
    let script = "import sys; sys.path.insert(0, sys.argv[1]); import fmnist, tensorfile, torch
x, y = fmnist.load()['test']
tensorfile.write(sys.argv[2] + '/validation.safetensors', x[:300], y[:300])
tensorfile.write(sys.argv[2] + '/test.safetensors', x[300:600], y[300:600])";
    let out = Command::new(&python).arg("-c").arg(script).arg(repo_root().join("python")).arg(dir.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    card["data"] = serde_json::json!({"validation": "validation.safetensors", "test": "test.safetensors"});
    let model = dir.path().join("own.json");
    std::fs::write(&model, serde_json::to_string_pretty(&card).unwrap()).unwrap();
    let m = model.to_str().unwrap();
    let run = |args: &[&str]| {
        let o = output_within(branchpoint().args(args), std::time::Duration::from_secs(300));
        assert!(o.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let profile = dir.path().join("own.profile.json");
    run(&["profile", "--model", m, "--batch-sizes", "1,8", "--repeats", "5", "--json", profile.to_str().unwrap()]);
    let calibration = dir.path().join("calibration.json");
    let said = run(&["calibrate", "--model", m, "--method", "per-branch", "--out", calibration.to_str().unwrap()]);
    assert!(said.contains("300 inputs") && said.contains("branch 3"), "{said}");
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&calibration).unwrap()).unwrap();
    assert_eq!(file["fit"]["data"], "tensor file validation.safetensors");
    let sha = branchpoint_models::card::sha256_file(&model).unwrap();
    assert_eq!(file["model_sha256"], sha, "an imported model is named by its card's SHA-256");
    // evaluate, with the calibration file, beside the built-in model's report.
    let (mine, builtin) = (dir.path().join("mine"), dir.path().join("builtin"));
    let said = run(&[
        "evaluate",
        "--model",
        m,
        "--calibration",
        calibration.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--resplits",
        "5",
        "--plots",
        mine.to_str().unwrap(),
        "--json",
        mine.with_extension("json").to_str().unwrap(),
    ]);
    assert!(said.contains("imported TorchScript model mobilenet-ee-fmnist") && said.contains("300 inputs"), "{said}");
    let bvgg = repo_root().join("models/bvgg-fmnist.safetensors");
    run(&["evaluate", "--model", bvgg.to_str().unwrap(), "--resplits", "5", "--plots", builtin.to_str().unwrap(), "--json", builtin.with_extension("json").to_str().unwrap()]);
    let keys = |p: &Path| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.with_extension("json")).unwrap()).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&mine), keys(&builtin), "the same report");
    let plots = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(".png")).collect();
        v.sort();
        v
    };
    assert!(!plots(&mine).is_empty());
    assert_eq!(plots(&mine), plots(&builtin), "the same plots (both models have three side branches)");
    // A shipped scenario, in virtual time, with this model and its profile.
    let scenario = std::fs::read_to_string(repo_root().join("scenarios/wifi-stable.toml")).unwrap().replace("duration_s = 120.0", "duration_s = 20.0");
    let path = dir.path().join("wifi.toml");
    std::fs::write(&path, scenario).unwrap();
    let out = dir.path().join("run");
    let said = run(&["run", path.to_str().unwrap(), "--model", m, "--out", out.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["model"]["model_sha256"].as_str(), Some(sha.as_str()), "{said}");
}

/// Cards and data that do not fit: each a clear error naming the file and
/// a failing exit, from the commands users run.
#[test]
fn bad_cards_and_data_fail_the_command_with_what_is_wrong() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let tiny = export_tiny(dir.path());
    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&tiny).unwrap()).unwrap();
    let write = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = card.clone();
        edit(&mut c);
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
        path
    };
    let fails = |model: &Path, says: &[&str]| {
        let o = output_within(branchpoint().args(["evaluate", "--model", model.to_str().unwrap()]), std::time::Duration::from_secs(120));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "evaluate --model {} should fail: {err}", model.display());
        for s in says {
            assert!(err.contains(s), "expected {s:?} in: {err}");
        }
    };
    // A head file whose SHA-256 is not the card's.
    fails(&write("sha.json", &|c| c["branches"][0]["head_sha256"] = "0".repeat(64).into()), &["tiny.head1.pt", "SHA-256"]);
    // Another format.
    fails(&write("onnx.json", &|c| c["format"] = "onnx".into()), &["onnx", "branchpoint-torchscript/1"]);
    // No data to evaluate on.
    fails(&write("nodata.json", &|c| c["data"] = serde_json::Value::Null), &["names no validation and test data"]);
    // A validation file of the wrong shape.
    let python = repo_root().join(".venv/bin/python");
    let script =
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import tensorfile; tensorfile.write(sys.argv[2], torch.zeros(3, 1, 32, 32), torch.zeros(3, dtype=torch.int64))";
    let bad = dir.path().join("bad.safetensors");
    let out = Command::new(&python).arg("-c").arg(script).arg(repo_root().join("python")).arg(&bad).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    fails(&write("badshape.json", &|c| c["data"]["validation"] = "bad.safetensors".into()), &["bad.safetensors", "`inputs` has shape [3, 1, 32, 32], expected [N, 1, 28, 28]"]);
    // A fleet at a branch the model lacks.
    let o = output_within(branchpoint().args(["fleet", "--model", tiny.to_str().unwrap(), "--partition-branch", "3", "--inputs", "10"]), std::time::Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--partition-branch") && err.contains("3 does not exist"), "{err}");
}
