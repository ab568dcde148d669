//! The command line as a user meets it: help for every flag, clear errors
//! with a non-zero exit for bad input, and a tiny train -> evaluate round trip.
use std::path::Path;
use std::process::{Command, Output};

use clap::CommandFactory;

use crate::common::shared;

fn branchpoint(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_branchpoint"))
        .args(args)
        // The default --model is relative to the repository root.
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap())
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn every_flag_of_every_subcommand_has_help() {
    let _cpu = shared();
    let cli = branchpoint::cli::Cli::command();
    let mut checked = 0;
    for sub in cli.get_subcommands() {
        assert!(sub.get_about().is_some(), "subcommand {} has no description", sub.get_name());
        for arg in sub.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(arg.get_help().is_some(), "{} --{id} has no help text", sub.get_name());
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} flags found");
}

#[test]
fn help_lists_the_subcommands_and_their_flags() {
    let _cpu = shared();
    let top = branchpoint(&["--help"]);
    assert!(top.status.success());
    for sub in ["train", "evaluate", "profile"] {
        assert!(stdout(&top).contains(sub), "top-level help lists {sub}");
    }
    for (sub, flags) in [
        ("train", &["--dataset", "--data-dir", "--epochs", "--seed", "--out", "--exit-weights"][..]),
        ("evaluate", &["--model", "--data-dir", "--json"][..]),
        ("profile", &["--model", "--json", "--batch-sizes", "--repeats"][..]),
    ] {
        let out = branchpoint(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help");
        for f in flags {
            assert!(stdout(&out).contains(f), "{sub} --help mentions {f}");
        }
    }
}

#[test]
fn bad_input_gives_a_clear_error_and_a_failing_exit() {
    let _cpu = shared();
    // (arguments, words the error must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (&["evaluate", "--data-dir", "/nonexistent/fmnist"], &["/nonexistent/fmnist", "does not exist", "apt-get install"]),
        (&["evaluate", "--model", "/nonexistent/m.safetensors"], &["/nonexistent/m.safetensors", "not found", "--model"]),
        (&["profile", "--device", "tpu"], &["unknown --device", "cpu, cuda"]),
        (&["profile", "--batch-sizes", "0"], &["positive batch sizes"]),
        (&["train", "--out", "/tmp/weights.pt"], &["must end in .safetensors"]),
        (&["train", "--dataset", "imagenet", "--out", "/tmp/x.safetensors"], &["unknown dataset", "fashion-mnist"]),
        (&["train", "--exit-weights", "1,1", "--subset", "10", "--out", "/tmp/x.safetensors"], &["exit weights", "3 exits"]),
        (&["planner", "--nats", "nats://127.0.0.1:1", "--certify-delta", "2"], &["--certify-delta 2", "(0, 1)"]),
        // A service level the 5,000 validation inputs cannot certify names the most they can.
        (
            &["planner", "--nats", "nats://127.0.0.1:1", "--level-accuracy", "0.999", "--level-delta", "0.01"],
            &["--level-accuracy", "0.999", "the most it certifies at delta 0.01 is 0."],
        ),
        (&["planner", "--nats", "nats://127.0.0.1:1", "--level-accuracy", "0.9", "--minimise", "fewest"], &["--minimise", "offloads, uplink-bytes or nothing"]),
        // The control loop keeps a service level: it needs one.
        (&["planner", "--nats", "nats://127.0.0.1:1", "--watch"], &["--level-accuracy"]),
        (&["planner", "--nats", "nats://127.0.0.1:1", "--level-accuracy", "0.9", "--watch", "--audit-rate", "2"], &["--audit-rate", "audit_rate", "(0, 1]"]),
        (&["evaluate", "--corrupt", "fog:2"], &["--corrupt", "\"fog\"", "gaussian-noise"]),
        (&["evaluate", "--corrupt", "contrast:9"], &["--corrupt", "contrast severity", "1 to 5"]),
        (&["evaluate", "--corrupt", "contrast"], &["--corrupt", "KIND:SEVERITY"]),
        (&["fleet", "--corrupt", "fog:2"], &["--corrupt", "\"fog\"", "gaussian-noise"]),
    ];
    for (args, words) in cases {
        let out = branchpoint(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for w in *words {
            assert!(err.contains(w), "{args:?}: expected {w:?} in: {err}");
        }
    }
}

#[test]
fn train_then_evaluate_and_profile_through_the_cli() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("tiny.safetensors");
    let w = weights.to_str().unwrap();
    let out = branchpoint(&["train", "--subset", "512", "--epochs", "1", "--batch-size", "64", "--out", w]);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    assert!(stdout(&out).contains("final"), "{}", stdout(&out));

    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("tiny.json")).unwrap()).unwrap();
    assert_eq!(card["weights"], "tiny.safetensors");
    assert_eq!(card["dataset"]["split"]["validation"], 5000);
    assert_eq!(card["architecture"]["partition_points"].as_array().unwrap().len(), 2);
    assert_eq!(card["test_metrics"].as_array().unwrap().len(), 3);

    let json = dir.path().join("report.json");
    let out = branchpoint(&["evaluate", "--model", w, "--json", json.to_str().unwrap(), "--p-tars", "0.6,0.9"]);
    assert!(out.status.success(), "evaluate failed: {}", stderr(&out));
    assert!(stdout(&out).contains("every exit's accuracy equals the model card's"), "{}", stdout(&out));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let uncalibrated = &report["methods"][0];
    assert_eq!(uncalibrated["method"], "uncalibrated");
    for (m, c) in uncalibrated["exits"].as_array().unwrap().iter().zip(card["test_metrics"].as_array().unwrap()) {
        assert_eq!(m["exit"], c["exit"]);
        let (a, b) = (m["before"]["accuracy"].as_f64().unwrap(), c["accuracy"].as_f64().unwrap());
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }

    // An input shift: the test images are corrupted, the validation split
    // (and so every fitted temperature) is not.
    let shifted_json = dir.path().join("shifted.json");
    let out = branchpoint(&["evaluate", "--model", w, "--json", shifted_json.to_str().unwrap(), "--p-tars", "0.6,0.9", "--resplits", "0", "--corrupt", "gaussian-noise:5"]);
    assert!(out.status.success(), "evaluate --corrupt failed: {}", stderr(&out));
    assert!(stdout(&out).contains("test images corrupted: gaussian-noise (severity 5)"), "{}", stdout(&out));
    let shifted: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&shifted_json).unwrap()).unwrap();
    assert_eq!(shifted["test_corruption"], "gaussian-noise (severity 5)");
    assert!(report.get("test_corruption").is_none(), "a clean run says nothing of corruption");
    for (clean, noisy) in report["methods"].as_array().unwrap().iter().zip(shifted["methods"].as_array().unwrap()) {
        assert_eq!(clean["temperatures"], noisy["temperatures"], "calibration fits on the clean validation split");
        for (c, n) in clean["exits"].as_array().unwrap().iter().zip(noisy["exits"].as_array().unwrap()) {
            assert_ne!(c["before"]["nll"], n["before"]["nll"], "the test set is not the same: {c} {n}");
        }
    }

    let pjson = dir.path().join("profile.json");
    let out = branchpoint(&["profile", "--model", w, "--repeats", "3", "--json", pjson.to_str().unwrap()]);
    assert!(out.status.success(), "profile failed: {}", stderr(&out));
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&pjson).unwrap()).unwrap();
    assert_eq!(p["batch_sizes"], serde_json::json!([1, 32]));
    assert_eq!(p["stages"].as_array().unwrap().len(), 3);
    for part in p["partitions"].as_array().unwrap() {
        assert!(part["activation_bytes"].as_u64().unwrap() > 0);
        for ms in part["head_median_ms"].as_array().unwrap().iter().chain(part["tail_median_ms"].as_array().unwrap()) {
            assert!(ms.as_f64().unwrap() > 0.0);
        }
    }
}

/// The second architecture through the CLI: three side branches, every
/// calibration method compared per exit, and thresholds for target
/// accuracies chosen three ways, with a short re-split study.
#[test]
fn a_three_branch_network_trains_and_evaluates_with_certified_thresholds() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("vgg.safetensors");
    let w = weights.to_str().unwrap();
    let out = branchpoint(&["train", "--architecture", "b-vgg-small", "--no-augment", "--weight-decay", "0", "--subset", "512", "--epochs", "1", "--batch-size", "64", "--out", w]);
    assert!(out.status.success(), "train failed: {}", stderr(&out));
    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("vgg.json")).unwrap()).unwrap();
    assert_eq!((card["architecture"]["name"].as_str(), card["architecture"]["branches"].as_array().unwrap().len()), (Some("b-vgg-small"), 3));
    assert_eq!(card["training"]["config"]["exit_weights"], serde_json::json!([0.5, 0.5, 0.5, 1.0]), "0.5 per branch, 1 for the final exit");
    assert_eq!((card["training"]["config"]["weight_decay"].as_f64(), card["training"]["config"]["augment"].as_bool()), (Some(0.0), Some(false)));

    let json = dir.path().join("report.json");
    let out = branchpoint(&["evaluate", "--model", w, "--json", json.to_str().unwrap(), "--p-tars", "0.6,0.9", "--resplits", "10"]);
    assert!(out.status.success(), "evaluate failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("calibration methods per exit") && text.contains("thresholds for a target on-device accuracy"), "{text}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let recal = report["recalibration"].as_array().unwrap();
    assert_eq!(recal.len(), 4, "branches 1 to 3 and final");
    for r in recal {
        let methods: Vec<&str> = r["methods"].as_array().unwrap().iter().map(|m| m["method"].as_str().unwrap()).collect();
        assert_eq!(methods, ["uncalibrated", "temperature", "vector", "histogram", "isotonic"]);
        assert!(methods.contains(&r["chosen"].as_str().unwrap()));
    }
    let branches = report["certified"]["branches"].as_array().unwrap();
    assert_eq!(branches.len(), 3);
    for b in branches {
        // 3 accuracies x 2 deltas with re-splits, then the plot's p_tars at
        // the smallest delta that are not among them (0.6 at 0.05).
        let rows = b["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 7);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r["resplit"].is_null(), i >= 6, "row {i}: {r}");
            let threshold = &r["certificate"]["threshold"];
            assert!(threshold.is_null() || (0.0..1.0).contains(&threshold.as_f64().unwrap()), "{r}");
            for rule in ["uncalibrated", "temperature", "certified"] {
                let off = r[rule]["offload_prob"].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&off), "{rule}: {r}");
            }
        }
    }
    for (args, says) in [
        (vec!["evaluate", "--model", w, "--certify-accuracy", "1.2"], &["--certify-accuracy 1.2", "outside (0, 1)"][..]),
        (vec!["evaluate", "--model", w, "--certify-delta", "0"], &["--certify-delta 0", "outside (0, 1)"]),
        (vec!["train", "--architecture", "resnet-9000", "--out", w], &["resnet-9000", "b-vgg-small"]),
        (vec!["train", "--weight-decay=-1", "--out", w], &["--weight-decay -1"]),
        (vec!["train", "--architecture", "b-vgg-small", "--exit-weights", "1,1,1", "--out", w], &["--exit-weights", "3 given, the model has 4 exits"]),
    ] {
        let out = branchpoint(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        for s in says {
            assert!(err.contains(s), "{args:?}: {err}");
        }
    }
}

#[test]
fn calibration_files_and_targets_that_do_not_fit_are_refused() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/balexnet-fmnist.json")).unwrap()).unwrap();
    let sha = card["model_sha256"].as_str().unwrap();
    // Written with the key files had before the model id was named
    // `model_sha256` everywhere: such files still read.
    let calibration = |name: &str, temps: &str, sha: &str| {
        let path = dir.path().join(name);
        let text = format!(
            r#"{{"model": "balexnet-fmnist.safetensors", "weights_sha256": "{sha}", "method": "per-branch",
                "temperatures": {temps},
                "fit": {{"data": "validation", "inputs": 5000, "split_seed": 2021, "tolerance": 1e-10, "objective": "x"}},
                "exits": []}}"#
        );
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let two_exits = calibration("two.json", "[1.5, 1.2]", sha);
    let negative = calibration("neg.json", "[1.5, -1.0, 1.1]", sha);
    let zero = calibration("zero.json", "[1.5, 0.0, 1.1]", sha);
    let other_model = calibration("other.json", "[1.5, 1.2, 1.1]", "00ff");
    let not_json = dir.path().join("garbage.json");
    std::fs::write(&not_json, "temperatures = 3").unwrap();
    let not_json = not_json.to_str().unwrap().to_string();

    let cases: Vec<(Vec<&str>, &[&str])> = vec![
        (vec!["evaluate", "--calibration", &two_exits], &["2 given", "3 exits"]),
        (vec!["evaluate", "--calibration", &negative], &["-1", "must be > 0"]),
        (vec!["evaluate", "--calibration", &zero], &["must be > 0"]),
        (vec!["evaluate", "--calibration", &other_model], &["SHA-256", "refit with `branchpoint calibrate`"]),
        (vec!["evaluate", "--calibration", &not_json], &["not a calibration file"]),
        (vec!["evaluate", "--calibration", "/nonexistent/cal.json"], &["/nonexistent/cal.json", "branchpoint calibrate"]),
        (vec!["evaluate", "--p-tars", "0.5,1.2"], &["1.2 is outside (0, 1)"]),
        (vec!["evaluate", "--p-tars", "0"], &["0 is outside (0, 1)"]),
        (vec!["evaluate", "--deadline-curve-p-tar", "1"], &["outside (0, 1)"]),
        (vec!["evaluate", "--uplink-mbit-s", "0"], &["--uplink-mbit-s", "positive"]),
        (vec!["evaluate", "--outage-batch", "0"], &["--outage-batch"]),
        (vec!["calibrate", "--method", "isotonic", "--out", "/tmp/c.json"], &["isotonic", "global or per-branch"]),
    ];
    for (args, words) in cases {
        let out = branchpoint(&args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for w in words {
            assert!(err.contains(w), "{args:?}: expected {w:?} in: {err}");
        }
    }
}

#[test]
fn calibrate_then_evaluate_with_the_file_reproduces_the_fit() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let cal = dir.path().join("per-branch.json");
    let out = branchpoint(&["calibrate", "--method", "per-branch", "--out", cal.to_str().unwrap()]);
    assert!(out.status.success(), "calibrate failed: {}", stderr(&out));
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cal).unwrap()).unwrap();
    assert_eq!(file["method"], "per-branch");
    assert_eq!(file["fit"]["inputs"], 5000);
    let exits = file["exits"].as_array().unwrap();
    assert_eq!(exits.len(), 3);
    for e in exits {
        // Fitting minimises the validation NLL, so it never rises.
        assert!(e["nll_after"].as_f64().unwrap() <= e["nll_before"].as_f64().unwrap() + 1e-12, "{e}");
        assert!(e["temperature"].as_f64().unwrap() > 0.0);
    }

    let report = dir.path().join("report.json");
    let plots = dir.path().join("plots");
    let logits = dir.path().join("logits");
    let out = branchpoint(&[
        "evaluate",
        "--calibration",
        cal.to_str().unwrap(),
        "--json",
        report.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
        "--dump-logits",
        logits.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "evaluate failed: {}", stderr(&out));
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let methods: Vec<&str> = r["methods"].as_array().unwrap().iter().map(|m| m["method"].as_str().unwrap()).collect();
    assert_eq!(methods, ["uncalibrated", "global", "per-branch"]);
    let per_branch = &r["methods"][2];
    assert!(per_branch["source"].as_str().unwrap().contains("calibration file"));
    assert_eq!(per_branch["temperatures"], file["temperatures"]);
    for m in r["methods"].as_array().unwrap() {
        for b in m["branches"].as_array().unwrap() {
            let rows = b["rows"].as_array().unwrap();
            assert_eq!(rows.len(), 14, "the default sweep");
            for row in rows {
                for key in ["p_tar", "offload_prob", "edge_accuracy", "overall_accuracy", "outage_prob", "missed_deadline_prob"] {
                    assert!(row.get(key).is_some(), "row lacks {key}: {row}");
                }
            }
            // A higher target never keeps more inputs on the device.
            let offload: Vec<f64> = rows.iter().map(|r| r["offload_prob"].as_f64().unwrap()).collect();
            assert!(offload.windows(2).all(|w| w[0] <= w[1]), "{offload:?}");
        }
        for e in m["exits"].as_array().unwrap() {
            for key in ["temperature", "ece_before", "ece_after", "nll_before", "nll_after"] {
                assert!(e[key].is_number(), "exit lacks {key}");
            }
        }
    }
    for f in ["edge-accuracy-branch1.png", "offload-prob-branch2.png", "outage-prob-branch1.png", "missed-deadline-branch1.png", "reliability-final.png"] {
        let bytes = std::fs::read(plots.join(f)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{f} is a PNG");
    }
    // The dumped logits reproduce the report's uncalibrated test accuracy of branch 1.
    let csv = std::fs::read_to_string(logits.join("test-branch1.csv")).unwrap();
    let mut lines = csv.lines();
    assert_eq!(lines.next().unwrap(), "label,z0,z1,z2,z3,z4,z5,z6,z7,z8,z9");
    let (mut n, mut right) = (0usize, 0usize);
    for line in lines {
        let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap()).collect();
        let arg = (1..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap() - 1;
        n += 1;
        right += usize::from(arg == v[0] as usize);
    }
    assert_eq!(n, 10_000);
    let acc = r["methods"][0]["exits"][0]["before"]["accuracy"].as_f64().unwrap();
    assert!((right as f64 / n as f64 - acc).abs() < 1e-9);
}

/// Layered configuration end to end: the file, then the environment, then
/// flags; the [nats] section reaches a command that connects.
#[test]
fn configuration_layers_file_environment_and_flags() {
    let _cpu = shared();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.toml");
    let json = dir.path().join("s.json");
    std::fs::write(&file, format!("[fleet]\ndevices = 2\nrate = 200.0\ninputs = 40\njson = {:?}\n", json.to_str().unwrap())).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let run = |env: &[(&str, &str)], extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_branchpoint"));
        c.current_dir(root).arg("--config").arg(&file).arg("fleet").args(extra);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        s["inputs"].as_u64().unwrap()
    };
    assert_eq!(run(&[], &[]), 40, "from the file");
    assert_eq!(run(&[("BRANCHPOINT_FLEET__INPUTS", "30")], &[]), 30, "the environment beats the file");
    assert_eq!(run(&[("BRANCHPOINT_FLEET__INPUTS", "30")], &["--inputs", "20"]), 20, "a flag beats both");

    // The [nats] section, on a port where nothing listens.
    std::fs::write(&file, "[nats]\nurl = \"nats://127.0.0.1:1\"\n[fleet]\ninputs = 10\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_branchpoint")).current_dir(root).arg("--config").arg(&file).arg("fleet").output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("could not connect to NATS at nats://127.0.0.1:1"), "{}", stderr(&o));

    // A list: the worker's models. Both load (one of each kind) before it
    // tries to connect; the same model twice is refused.
    let models = "[\"models/balexnet-fmnist.safetensors\", \"models/mobilenet-ee-fmnist.json\"]";
    std::fs::write(&file, format!("[nats]\nurl = \"nats://127.0.0.1:1\"\n[worker]\nmodel = {models}\n")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_branchpoint")).current_dir(root).arg("--config").arg(&file).arg("worker").output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("could not connect to NATS at nats://127.0.0.1:1"), "{}", stderr(&o));
    std::fs::write(&file, "[nats]\nurl = \"nats://127.0.0.1:1\"\n[worker]\nmodel = [\"models/bvgg-fmnist.safetensors\", \"models/bvgg-fmnist.json\"]\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_branchpoint")).current_dir(root).arg("--config").arg(&file).arg("worker").output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("the same model as --model models/bvgg-fmnist.safetensors"), "{}", stderr(&o));

    // Bad configuration: non-zero exit, the key and its origin named.
    std::fs::write(&file, "[fleet]\nrate = \"fast\"\n").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_branchpoint")).current_dir(root).arg("--config").arg(&file).arg("fleet").output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("fleet.rate") && stderr(&o).contains("b.toml"), "{}", stderr(&o));
    let o = branchpoint(&["--config", "no-such.toml", "fleet"]);
    assert!(!o.status.success() && stderr(&o).contains("no-such.toml"));
}
