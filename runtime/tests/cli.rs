//! The command line as a user meets it: help for every flag, clear errors
//! with a non-zero exit for bad input, and a tiny train -> evaluate round trip.
use std::path::Path;
use std::process::{Command, Output};

use clap::CommandFactory;

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
    // (arguments, words the error must contain)
    let cases: &[(&[&str], &[&str])] = &[
        (&["evaluate", "--data-dir", "/nonexistent/fmnist"], &["/nonexistent/fmnist", "does not exist", "apt-get install"]),
        (&["evaluate", "--model", "/nonexistent/m.safetensors"], &["/nonexistent/m.safetensors", "not found", "--model"]),
        (&["profile", "--device", "tpu"], &["unknown --device", "cpu, cuda"]),
        (&["profile", "--batch-sizes", "0"], &["positive batch sizes"]),
        (&["train", "--out", "/tmp/weights.pt"], &["must end in .safetensors"]),
        (&["train", "--dataset", "imagenet", "--out", "/tmp/x.safetensors"], &["unknown dataset", "fashion-mnist"]),
        (&["train", "--exit-weights", "1,1", "--subset", "10", "--out", "/tmp/x.safetensors"], &["exit weights", "3 exits"]),
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
