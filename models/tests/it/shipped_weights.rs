//! The weights the project ships are safe on every CPU: no subnormal value
//! (they take a 10-100x slow path on some CPUs, see `subnormal`), and each
//! file is the one its card describes.
use std::path::{Path, PathBuf};

use branchpoint_models::subnormal::count_in_safetensors;

fn weights_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() && path.file_name().is_some_and(|n| n != "target" && n != ".git" && n != ".venv" && n != "runs") {
            weights_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            found.push(path);
        }
    }
}

#[test]
fn every_shipped_weights_file_holds_no_subnormal_value() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    weights_files(repo, &mut files);
    assert!(files.iter().any(|f| f.ends_with("models/balexnet-fmnist.safetensors")), "the shipped model is among {files:?}");
    for f in &files {
        let subnormal = count_in_safetensors(f).unwrap();
        assert!(subnormal.is_empty(), "{} holds subnormal values (tensor, count): {subnormal:?}", f.display());
        branchpoint_models::load_model(f, tch::Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}
