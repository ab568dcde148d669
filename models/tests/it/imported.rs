//! A user's model through `python/export.py` into Rust: the exported heads
//! and tails, loaded through their card, give PyTorch's own answers; files
//! that do not fit their card are refused, naming the file.
use std::path::{Path, PathBuf};
use std::process::Command;

use branchpoint_models::{ImportedNet, ModelError};
use tch::{Device, Tensor};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Exports python/test_export.py's small CNN (two side branches, random
/// weights) into `dir` as `tiny`, and writes 5 sample inputs and PyTorch's
/// logits of every exit on them as raw f32 (`x.f32`, `exit<i>.f32`).
fn export_tiny(dir: &Path) {
    let python = root().join(".venv/bin/python");
    assert!(python.is_file(), "{} missing: run `make setup` (the project venv holds torch)", python.display());
    let script = r#"
import pathlib, struct, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import torch, export, test_export
d = pathlib.Path(sys.argv[2])
test_export.write_tiny(d)
desc = export.read_description(d / "exits.toml")
model = export.build_model(desc).eval()
x = export.sample_inputs(desc, 5, seed=42)
def raw(t, name):
    v = t.detach().contiguous().flatten().tolist()
    (d / name).write_bytes(struct.pack(f"<{len(v)}f", *v))
with torch.no_grad():
    raw(x, "x.f32")
    for i, e in enumerate(model(x)):
        raw(e, f"exit{i}.f32")
"#;
    let out = Command::new(&python).arg("-c").arg(script).arg(root().join("python")).arg(dir).output().expect("the venv's python runs");
    assert!(out.status.success(), "export failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn read_f32(path: &Path, shape: &[i64]) -> Tensor {
    let bytes = std::fs::read(path).unwrap();
    let values: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Tensor::from_slice(&values).view(shape)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn exported_heads_and_tails_give_pytorchs_answers() {
    let dir = tempfile::tempdir().unwrap();
    export_tiny(dir.path());
    let net = ImportedNet::load(&dir.path().join("tiny.json"), Device::Cpu).unwrap();
    assert_eq!(net.num_branches(), 2);
    let x = read_f32(&dir.path().join("x.f32"), &[5, 1, 28, 28]);
    let exits: Vec<Tensor> = (0..3).map(|i| read_f32(&dir.path().join(format!("exit{i}.f32")), &[5, 10])).collect();
    for k in 1..=2 {
        let (logits, activation) = net.head(k, &x).unwrap();
        assert!(max_diff(&logits, &exits[k - 1]) <= 1e-5, "branch {k}: {}", max_diff(&logits, &exits[k - 1]));
        let fin = net.tail(k, &activation).unwrap();
        assert!(max_diff(&fin, &exits[2]) <= 1e-5, "tail {k}: {}", max_diff(&fin, &exits[2]));
    }
    let all = net.forward_exits(&x).unwrap();
    assert_eq!(all.len(), 3);
    for (got, want) in all.iter().zip(&exits) {
        assert!(max_diff(got, want) <= 1e-5);
    }
    // Wrong shapes are refused with what was expected, not run.
    let err = net.head(1, &Tensor::zeros([2, 3, 28, 28], (tch::Kind::Float, Device::Cpu))).unwrap_err().to_string();
    assert!(err.contains("[N, 1, 28, 28]"), "{err}");
    let (_, second) = net.head(2, &x).unwrap();
    let err = net.tail(1, &second).unwrap_err().to_string();
    assert!(err.contains("branch 1 of this model offloads [N, 8, 14, 14]"), "{err}");
    assert!(net.head(3, &x).unwrap_err().to_string().contains("3 does not exist"));
}

#[test]
fn files_that_do_not_fit_their_card_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    export_tiny(dir.path());
    let card_path = dir.path().join("tiny.json");
    let card: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&card_path).unwrap()).unwrap();
    let write = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = card.clone();
        edit(&mut c);
        let path = dir.path().join(name);
        std::fs::write(&path, serde_json::to_string(&c).unwrap()).unwrap();
        path
    };
    let load_err = |path: &Path| ImportedNet::load(path, Device::Cpu).unwrap_err();

    // A card whose SHA-256 does not match its file.
    let wrong_sha = write("sha.json", &|c| c["branches"][1]["tail_sha256"] = "0".repeat(64).into());
    let e = load_err(&wrong_sha);
    assert!(matches!(e, ModelError::WeightsMismatch { .. }) && e.to_string().contains("tiny.tail2.pt") && e.to_string().contains("SHA-256"), "{e}");
    // A file that is not there.
    let missing = write("missing.json", &|c| c["branches"][0]["head"] = "gone.pt".into());
    assert!(load_err(&missing).to_string().contains("gone.pt"), "{}", load_err(&missing));
    // Another format.
    let other = write("other.json", &|c| c["format"] = "onnx".into());
    assert!(load_err(&other).to_string().contains("branchpoint-torchscript/1"), "{}", load_err(&other));
    // Shapes that disagree.
    let shapes = write("shapes.json", &|c| c["branches"][0]["activation_bytes"] = 12.into());
    assert!(load_err(&shapes).to_string().contains("do not agree"), "{}", load_err(&shapes));

    // A tail that refuses its head's activation: branch 1's tail swapped
    // for branch 2's (with its true SHA-256, so it loads).
    let swapped = write("swapped.json", &|c| {
        c["branches"][0]["tail"] = c["branches"][1]["tail"].clone();
        c["branches"][0]["tail_sha256"] = c["branches"][1]["tail_sha256"].clone();
    });
    let net = ImportedNet::load(&swapped, Device::Cpu).unwrap();
    let x = read_f32(&dir.path().join("x.f32"), &[5, 1, 28, 28]);
    let (_, activation) = net.head(1, &x).unwrap();
    let e = net.tail(1, &activation).unwrap_err().to_string();
    assert!(e.contains("tiny.tail2.pt") && e.contains("refused branch 1's activation"), "{e}");

    // A head whose file is not TorchScript at all (its SHA-256 recorded).
    std::fs::write(dir.path().join("junk.pt"), b"not a module").unwrap();
    let sha = branchpoint_models::card::sha256_file(&dir.path().join("junk.pt")).unwrap();
    let junk = write("junk.json", &|c| {
        c["branches"][0]["head"] = "junk.pt".into();
        c["branches"][0]["head_sha256"] = sha.clone().into();
    });
    let e = load_err(&junk).to_string();
    assert!(e.contains("junk.pt") && e.contains("not a TorchScript module"), "{e}");
}
