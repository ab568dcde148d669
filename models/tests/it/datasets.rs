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
