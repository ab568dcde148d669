//! Dataset loading: real files load, damaged or missing files give errors
//! that name the file, say what was expected and how to get the data.
use std::io::Write;
use std::path::Path;

use branchpoint_models::data::{read_idx_images, train_validation_indices, Dataset, DatasetKind};
use branchpoint_models::ModelError;

fn idx_images(n: u32, rows: u32, cols: u32, pixels: usize) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0x0000_0803u32, n, rows, cols] {
        v.extend(x.to_be_bytes());
    }
    v.extend((0..pixels).map(|i| (i % 251) as u8));
    v
}

fn idx_labels(magic: u32, labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend(magic.to_be_bytes());
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend(labels);
    v
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// A complete, valid, tiny Fashion-MNIST folder: 10 train and 4 test images.
fn write_tiny_fashion_mnist(dir: &Path, gz: bool) {
    let files = [
        ("train-images-idx3-ubyte", idx_images(10, 28, 28, 10 * 784)),
        ("train-labels-idx1-ubyte", idx_labels(0x0801, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])),
        ("t10k-images-idx3-ubyte", idx_images(4, 28, 28, 4 * 784)),
        ("t10k-labels-idx1-ubyte", idx_labels(0x0801, &[9, 8, 7, 6])),
    ];
    for (name, bytes) in files {
        if gz {
            std::fs::write(dir.join(format!("{name}.gz")), gzip(&bytes)).unwrap();
        } else {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
}

fn load(dir: &Path) -> Result<Dataset, ModelError> {
    Dataset::load(DatasetKind::FashionMnist, dir, 2, 7)
}

#[test]
fn tiny_idx_folders_load_plain_and_gzipped_alike() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_fashion_mnist(dir.path(), gz);
        let data = load(dir.path()).unwrap();
        assert_eq!((data.train.len(), data.validation.len(), data.test.len()), (8, 2, 4));
        assert_eq!(data.test.images.size(), vec![4, 1, 28, 28]);
        assert_eq!(Vec::<i64>::try_from(&data.test.labels).unwrap(), vec![9, 8, 7, 6]);
        // Pixel 0 of test image 0 is raw 0: standardised to (0 - mean) / std.
        let v = data.test.images.double_value(&[0, 0, 0, 0]);
        assert!((v - (-0.2860 / 0.3530)).abs() < 1e-5, "{v}");
    }
}

#[test]
fn a_missing_directory_says_how_to_get_the_data() {
    let err = load(Path::new("/nonexistent/fashion")).unwrap_err();
    assert!(matches!(err, ModelError::MissingDataDir { .. }));
    let msg = err.to_string();
    assert!(msg.contains("/nonexistent/fashion"), "{msg}");
    assert!(msg.contains("apt-get install dataset-fashion-mnist"), "{msg}");
    assert!(msg.contains("--data-dir"), "{msg}");
}

#[test]
fn a_missing_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_fashion_mnist(dir.path(), true);
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte.gz")).unwrap();
    let msg = load(dir.path()).unwrap_err().to_string();
    assert!(msg.contains("t10k-labels-idx1-ubyte.gz is missing"), "{msg}");
}

#[test]
fn damaged_files_are_named_with_what_was_expected() {
    // (file to damage, its damaged content, words the error must contain)
    let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
        ("train-images-idx3-ubyte", idx_images(10, 28, 28, 10 * 784 - 100), vec!["truncated", "10 images of 28x28", "7840 bytes"]),
        ("train-images-idx3-ubyte", vec![0, 0, 8, 3, 0], vec!["truncated", "16-byte header"]),
        ("train-labels-idx1-ubyte", idx_labels(0x0803, &[0; 10]), vec!["wrong magic number 0x00000803", "expected 0x00000801"]),
        (
            "t10k-images-idx3-ubyte",
            {
                let mut v = idx_images(4, 28, 28, 4 * 784);
                v[3] = 0x01;
                v
            },
            vec!["wrong magic number 0x00000801", "expected 0x00000803"],
        ),
        ("t10k-images-idx3-ubyte", idx_images(4, 32, 32, 4 * 1024), vec!["32x32", "expected 28x28"]),
        ("t10k-labels-idx1-ubyte", idx_labels(0x0801, &[1, 2, 3]), vec!["4 images", "3 labels"]),
        ("t10k-labels-idx1-ubyte", idx_labels(0x0801, &[1, 2, 3, 12]), vec!["label 12"]),
    ];
    for (file, content, words) in cases {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_fashion_mnist(dir.path(), false);
        std::fs::write(dir.path().join(file), &content).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, ModelError::CorruptDataFile { .. }), "{file}: {err}");
        let msg = err.to_string();
        assert!(msg.contains(file), "error names the file {file}: {msg}");
        assert!(msg.contains("reinstall"), "says what to do: {msg}");
        for w in words {
            assert!(msg.contains(w), "{file}: expected {w:?} in: {msg}");
        }
    }
}

#[test]
fn a_damaged_gzip_stream_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_fashion_mnist(dir.path(), true);
    let path = dir.path().join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = read_idx_images(DatasetKind::FashionMnist, &dir.path().join("train-images-idx3-ubyte")).unwrap_err().to_string();
    assert!(msg.contains("train-images-idx3-ubyte.gz") && msg.contains("decompression failed"), "{msg}");
}

fn cifar_records(labels: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        v.push(l);
        // Red plane all i, green all 100, blue all 200.
        v.extend(std::iter::repeat_n(i as u8, 1024));
        v.extend(std::iter::repeat_n(100u8, 1024));
        v.extend(std::iter::repeat_n(200u8, 1024));
    }
    v
}

#[test]
fn cifar10_binary_batches_load_channel_first() {
    let dir = tempfile::tempdir().unwrap();
    for i in 1..=5 {
        std::fs::write(dir.path().join(format!("data_batch_{i}.bin")), cifar_records(&[i as u8, 9 - i as u8])).unwrap();
    }
    std::fs::write(dir.path().join("test_batch.bin"), cifar_records(&[3, 1, 4])).unwrap();
    let data = Dataset::load(DatasetKind::Cifar10, dir.path(), 2, 1).unwrap();
    assert_eq!((data.train.len(), data.validation.len(), data.test.len()), (8, 2, 3));
    assert_eq!(data.test.images.size(), vec![3, 3, 32, 32]);
    assert_eq!(Vec::<i64>::try_from(&data.test.labels).unwrap(), vec![3, 1, 4]);
    let norm = DatasetKind::Cifar10.normalization();
    for (c, raw) in [(0usize, 2.0f64), (1, 100.0), (2, 200.0)] {
        let v = data.test.images.double_value(&[2, c as i64, 5, 7]);
        let want = (raw / 255.0 - norm.mean[c]) / norm.std[c];
        assert!((v - want).abs() < 1e-5, "channel {c}: {v} vs {want}");
    }

    // A truncated batch and a missing batch are named.
    std::fs::write(dir.path().join("data_batch_3.bin"), &cifar_records(&[1])[..3000]).unwrap();
    let msg = Dataset::load(DatasetKind::Cifar10, dir.path(), 2, 1).unwrap_err().to_string();
    assert!(msg.contains("data_batch_3.bin") && msg.contains("3073-byte record"), "{msg}");
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    let msg = Dataset::load(DatasetKind::Cifar10, dir.path(), 2, 1).unwrap_err().to_string();
    assert!(msg.contains("data_batch_3.bin is missing") && msg.contains("CIFAR-10 binary"), "{msg}");
}

#[test]
fn the_split_is_seeded_disjoint_and_complete() {
    let (train, val) = train_validation_indices(60_000, 5_000, 2021).unwrap();
    assert_eq!((train.len(), val.len()), (55_000, 5_000));
    let mut all: Vec<usize> = train.iter().chain(&val).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..60_000).collect::<Vec<_>>());
    assert_eq!(train_validation_indices(60_000, 5_000, 2021).unwrap().1, val, "same seed, same split");
    assert_ne!(train_validation_indices(60_000, 5_000, 2022).unwrap().1, val);
    assert!(train_validation_indices(10, 10, 1).is_err());
}

/// A split the user brings as a tensor file: python/tensorfile.py writes
/// it (the documented format, without the safetensors package), Rust reads
/// it back exactly; a file with the wrong shape, dtype, labels or tensors
/// is refused naming the file, the tensor and what was expected.
#[test]
fn a_split_the_user_brings_reads_from_a_tensor_file() {
    use branchpoint_models::data::read_tensor_split;
    use branchpoint_models::InputShape;
    use tch::{Kind, Tensor};

    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(python.is_file(), "{} missing: run `make setup`", python.display());
    let good = dir.path().join("validation.safetensors");
    let script = r#"
import sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, sys.argv[1])
import torch, tensorfile
g = torch.Generator().manual_seed(3)
x = torch.randn(6, 1, 28, 28, generator=g)
tensorfile.write(sys.argv[2], x, torch.tensor([0, 9, 3, 3, 1, 7]))
print(repr(float(x[0, 0, 0, 0])), repr(float(x[5, 0, 27, 27])), repr(float(x.abs().sum())))
"#;
    let out = std::process::Command::new(&python).arg("-c").arg(script).arg(root.join("python")).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fmnist = InputShape { channels: 1, height: 28, width: 28 };
    let split = read_tensor_split(&good, fmnist, 10).unwrap();
    assert_eq!((split.images.size(), split.labels.size()), (vec![6, 1, 28, 28], vec![6]));
    assert_eq!(Vec::<i64>::try_from(&split.labels).unwrap(), vec![0, 9, 3, 3, 1, 7]);
    // Python's values, exactly: two of them and the sum of magnitudes.
    let said: Vec<f64> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse().unwrap()).collect();
    let at = |i: &[i64]| split.images.double_value(i);
    assert_eq!((at(&[0, 0, 0, 0]), at(&[5, 0, 27, 27])), (said[0], said[1]));
    assert!((split.images.abs().sum(Kind::Double).double_value(&[]) - said[2]).abs() < 1e-3 * said[2], "{said:?}");

    let write = |name: &str, tensors: Vec<(&str, Tensor)>| {
        let path = dir.path().join(name);
        Tensor::write_safetensors(&tensors, &path).unwrap();
        path
    };
    // Round trip through tch's writer keeps every value.
    let written = write("same.safetensors", vec![("inputs", split.images.shallow_clone()), ("labels", split.labels.shallow_clone())]);
    let again = read_tensor_split(&written, fmnist, 10).unwrap();
    assert_eq!(f64::try_from((&again.images - &split.images).abs().max()).unwrap(), 0.0);

    let x = |n: i64| Tensor::zeros([n, 1, 28, 28], (Kind::Float, tch::Device::Cpu));
    let y = |v: &[i64]| Tensor::from_slice(v);
    let refused = |path: &Path, needles: &[&str]| {
        let e = read_tensor_split(path, fmnist, 10).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "names the file: {text}");
        for n in needles {
            assert!(text.contains(n), "{n:?} in {text}");
        }
    };
    refused(
        &write("shape.safetensors", vec![("inputs", Tensor::zeros([2, 3, 32, 32], (Kind::Float, tch::Device::Cpu))), ("labels", y(&[0, 1]))]),
        &["`inputs` has shape [2, 3, 32, 32]", "[N, 1, 28, 28]"],
    );
    refused(&write("nolabels.safetensors", vec![("inputs", x(2))]), &["no tensor named `labels`"]);
    refused(&write("count.safetensors", vec![("inputs", x(2)), ("labels", y(&[0, 1, 2]))]), &["`labels` has shape [3]", "expected [2]"]);
    refused(&write("range.safetensors", vec![("inputs", x(2)), ("labels", y(&[0, 10]))]), &["`labels` range from 0 to 10", "0 to 9"]);
    refused(&write("dtype.safetensors", vec![("inputs", x(2).to_kind(Kind::Double)), ("labels", y(&[0, 1]))]), &["`inputs` is Double", "f32"]);
    refused(&write("floats.safetensors", vec![("inputs", x(2)), ("labels", Tensor::from_slice(&[0.0f32, 1.0]))]), &["`labels` is Float", "integers"]);
    let nan = x(2);
    let _ = nan.get(0).get(0).get(0).get(0).fill_(f64::NAN);
    refused(&write("nan.safetensors", vec![("inputs", nan), ("labels", y(&[0, 1]))]), &["NaN"]);
    std::fs::write(dir.path().join("junk.safetensors"), b"junk").unwrap();
    refused(&dir.path().join("junk.safetensors"), &["not a readable safetensors file"]);
    let e = read_tensor_split(&dir.path().join("absent.safetensors"), fmnist, 10).unwrap_err();
    assert!(matches!(e, ModelError::MissingDataFile { .. }) && e.to_string().contains("absent.safetensors"), "{e}");
}

/// Rows are chosen on the raw bytes and only the chosen ones are
/// standardised, in place: on the real Fashion-MNIST files, `load` and
/// `load_held_out` give bit for bit what standardising every image out of
/// place and then choosing rows gives.
#[test]
fn choosing_rows_before_standardising_changes_no_value() {
    use branchpoint_models::data::{read_idx_images, read_idx_labels, FASHION_MNIST_DEFAULT_DIR};
    use tch::{Kind, Tensor};
    let (kind, dir, validation, seed) = (DatasetKind::FashionMnist, Path::new(FASHION_MNIST_DEFAULT_DIR), 5000, 2021);
    let data = Dataset::load(kind, dir, validation, seed).expect("Fashion-MNIST is installed by scripts/setup.sh");
    let (held_out, test, info) = Dataset::load_held_out(kind, dir, validation, seed).unwrap();
    assert_eq!(info, data.split);
    // The straightforward computation: every image to f32, three
    // out-of-place steps, then the rows.
    let norm = kind.normalization();
    let mean = Tensor::from_slice(&norm.mean).to_kind(Kind::Float).view([1, 1, 1, 1]);
    let std = Tensor::from_slice(&norm.std).to_kind(Kind::Float).view([1, 1, 1, 1]);
    let standardised = |prefix: &str| {
        let (pixels, n, rows, cols) = read_idx_images(kind, &dir.join(format!("{prefix}-images-idx3-ubyte"))).unwrap();
        let labels = read_idx_labels(kind, &dir.join(format!("{prefix}-labels-idx1-ubyte"))).unwrap();
        let raw = Tensor::from_slice(&pixels).view([n as i64, 1, rows as i64, cols as i64]);
        ((raw.to_kind(Kind::Float) / 255.0 - &mean) / &std, Tensor::from_slice(&labels.iter().map(|&y| i64::from(y)).collect::<Vec<_>>()))
    };
    let (train_images, train_labels) = standardised("train");
    let (test_images, test_labels) = standardised("t10k");
    let (train_idx, val_idx) = train_validation_indices(train_labels.size()[0] as usize, validation, seed).unwrap();
    let rows = |idx: &[usize]| Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let same = |a: &Tensor, b: &Tensor| a.size() == b.size() && a.kind() == b.kind() && a.equal(b);
    for (what, got, images, labels) in [
        ("train", &data.train, train_images.index_select(0, &rows(&train_idx)), train_labels.index_select(0, &rows(&train_idx))),
        ("validation", &data.validation, train_images.index_select(0, &rows(&val_idx)), train_labels.index_select(0, &rows(&val_idx))),
        ("held-out validation", &held_out, train_images.index_select(0, &rows(&val_idx)), train_labels.index_select(0, &rows(&val_idx))),
        ("test", &data.test, test_images.shallow_clone(), test_labels.shallow_clone()),
        ("held-out test", &test, test_images.shallow_clone(), test_labels.shallow_clone()),
    ] {
        assert!(same(&got.images, &images), "{what}: images differ");
        assert!(same(&got.labels, &labels), "{what}: labels differ");
    }
}
