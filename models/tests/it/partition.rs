//! Partitioned execution is exact: for every partition branch k, running
//! head(k) on a device and tail(k) on its activation in the cloud gives the
//! same logits as the unpartitioned forward, on real test images with the
//! shipped weights.
use std::path::{Path, PathBuf};

use branchpoint_models::data::{Dataset, DatasetKind, FASHION_MNIST_DEFAULT_DIR};
use branchpoint_models::{load_model, ModelError};
use tch::{Device, Kind, Tensor};

fn shipped_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("balexnet-fmnist.safetensors")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn head_then_tail_equals_the_unpartitioned_forward_at_every_branch() {
    let model = load_model(&shipped_model(), Device::Cpu).expect("shipped model loads");
    let data = Dataset::load(DatasetKind::FashionMnist, Path::new(FASHION_MNIST_DEFAULT_DIR), 5000, 2021).expect("Fashion-MNIST is installed by scripts/setup.sh");
    let xs = data.test.images.narrow(0, 0, 1000);
    let reference = model.net.forward_exits(&xs);
    let final_logits = reference.last().unwrap();
    assert_eq!(model.net.num_branches(), 2, "the shipped model has two side branches");

    for k in 1..=model.net.num_branches() {
        let (branch_logits, activation) = model.net.head(k, &xs).unwrap();
        let pp = &model.net.architecture().partition_points[k - 1];
        let mut want_shape = vec![1000];
        want_shape.extend(&pp.activation_shape);
        assert_eq!(activation.size(), want_shape, "activation shape at branch {k}");
        assert_eq!(pp.activation_bytes, activation.numel() / 1000 * 4);

        let d_branch = max_abs_diff(&branch_logits, &reference[k - 1]);
        assert!(d_branch <= 1e-5, "branch {k} logits differ by {d_branch}");

        let tail_logits = model.net.tail(k, &activation).unwrap();
        let d_final = max_abs_diff(&tail_logits, final_logits);
        assert!(d_final <= 1e-5, "tail({k}) final logits differ by {d_final}");
    }
}

#[test]
fn one_input_at_a_time_matches_the_batch() {
    // A device runs batch 1; the evaluation runs big batches. They must agree.
    let model = load_model(&shipped_model(), Device::Cpu).unwrap();
    let data = Dataset::load(DatasetKind::FashionMnist, Path::new(FASHION_MNIST_DEFAULT_DIR), 5000, 2021).unwrap();
    let xs = data.test.images.narrow(0, 0, 16);
    let batch = model.net.forward_exits(&xs);
    for i in 0..16 {
        let x = xs.narrow(0, i, 1);
        let (b1, act) = model.net.head(1, &x).unwrap();
        assert!(max_abs_diff(&b1, &batch[0].narrow(0, i, 1)) <= 1e-5);
        let fin = model.net.tail(1, &act).unwrap();
        assert!(max_abs_diff(&fin, &batch[2].narrow(0, i, 1)) <= 1e-4);
    }
}

#[test]
fn wrong_shapes_and_branches_are_refused_with_a_clear_error() {
    let model = load_model(&shipped_model(), Device::Cpu).unwrap();
    let net = &model.net;
    let good = Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu));

    let err = net.head(0, &good).unwrap_err().to_string();
    assert!(err.contains("branches 1..=2"), "{err}");
    let err = net.head(3, &good).unwrap_err().to_string();
    assert!(err.contains("3 does not exist"), "{err}");

    let cifar_shaped = Tensor::zeros([2, 3, 32, 32], (Kind::Float, Device::Cpu));
    let err = net.head(1, &cifar_shaped).unwrap_err().to_string();
    assert!(err.contains("expected [N, 1, 28, 28]"), "{err}");

    let (_, act1) = net.head(1, &good).unwrap();
    // Branch 2 expects stage 2's activation, not stage 1's.
    let err = net.tail(2, &act1).unwrap_err();
    assert!(matches!(err, ModelError::InvalidArgument { .. }));
    assert!(err.to_string().contains("activation at branch 2"), "{err}");

    let wrong_kind = act1.to_kind(Kind::Double);
    assert!(net.tail(1, &wrong_kind).is_err());
}

#[test]
fn a_card_with_other_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("m.safetensors");
    std::fs::copy(shipped_model(), &weights).unwrap();
    std::fs::copy(shipped_model().with_extension("json"), dir.path().join("m.json")).unwrap();
    assert!(load_model(&weights, Device::Cpu).is_ok());

    // Flip one byte of the weights: the card's SHA-256 no longer matches.
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    let err = load_model(&weights, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("SHA-256"), "{err}");

    let err = load_model(&dir.path().join("absent.safetensors"), Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not found") && err.contains("--model"), "{err}");
}
