//! One epoch on a small subset trains, saves, reloads, and the reloaded
//! weights give identical logits.
use std::path::Path;

use branchpoint_models::card::load_weights;
use branchpoint_models::data::{Dataset, DatasetKind, FASHION_MNIST_DEFAULT_DIR};
use branchpoint_models::train::{train, TrainConfig};
use branchpoint_models::EarlyExitNet;
use tch::{nn, Device, Kind, Tensor};

#[test]
fn one_epoch_trains_saves_and_reloads_to_identical_logits() {
    let kind = DatasetKind::FashionMnist;
    let data = Dataset::load(kind, Path::new(FASHION_MNIST_DEFAULT_DIR), 5000, 2021).unwrap();
    let train_split = data.train.head(1024);
    let validation = data.validation.head(256);

    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = EarlyExitNet::new(&vs.root(), kind.input_shape(), kind.num_classes());
    let before = net.forward_exits(&validation.images);
    let cfg = TrainConfig { epochs: 1, batch_size: 64, ..TrainConfig::default() };
    let mut batches_seen = 0;
    let mut epochs_seen = 0;
    let history = train(
        &net,
        &vs,
        &train_split,
        &validation,
        &kind.normalization(),
        &cfg,
        |p| {
            batches_seen += 1;
            assert!(p.loss.is_finite() && p.loss > 0.0);
        },
        |_| epochs_seen += 1,
    )
    .unwrap();
    assert_eq!(batches_seen, 1024 / 64);
    assert_eq!(epochs_seen, 1);
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].validation.len(), 3, "one validation metric per exit");
    // One epoch on 1,024 images already beats chance (10 %) by far.
    let final_acc = history[0].validation[2].accuracy;
    assert!(final_acc > 0.4, "final-exit validation accuracy after one epoch: {final_acc}");

    let after = net.forward_exits(&validation.images);
    assert!((&after[2] - &before[2]).abs().max().double_value(&[]) > 1e-3, "training changed the weights");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    vs.save(&path).unwrap();

    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let net2 = EarlyExitNet::new(&vs2.root(), kind.input_shape(), kind.num_classes());
    load_weights(&mut vs2, &path).unwrap();
    let reloaded = net2.forward_exits(&validation.images);
    for (a, b) in after.iter().zip(&reloaded) {
        assert_eq!(a.size(), b.size());
        assert_eq!((a - b).abs().max().double_value(&[]), 0.0, "reloaded logits are identical");
    }
}

#[test]
fn weights_with_a_wrong_shape_or_missing_tensor_are_refused() {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = EarlyExitNet::new(&vs.root(), DatasetKind::FashionMnist.input_shape(), 10);
    let dir = tempfile::tempdir().unwrap();

    // Every tensor present, but one with a broadcastable wrong shape.
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let i = named.iter().position(|(n, _)| n == "branch1.fc.bias").expect("branch1.fc.bias exists");
    named[i].1 = Tensor::zeros([1], (Kind::Float, Device::Cpu));
    let path = dir.path().join("bad-shape.safetensors");
    Tensor::write_safetensors(&named, &path).unwrap();
    let mut target = nn::VarStore::new(Device::Cpu);
    let _ = EarlyExitNet::new(&target.root(), DatasetKind::FashionMnist.input_shape(), 10);
    let err = load_weights(&mut target, &path).unwrap_err().to_string();
    assert!(err.contains("branch1.fc.bias") && err.contains("shape [1]"), "{err}");

    let _ = named.remove(i);
    let path = dir.path().join("missing.safetensors");
    Tensor::write_safetensors(&named, &path).unwrap();
    let err = load_weights(&mut target, &path).unwrap_err().to_string();
    assert!(err.contains("branch1.fc.bias is missing"), "{err}");

    let path = dir.path().join("garbage.safetensors");
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let err = load_weights(&mut target, &path).unwrap_err().to_string();
    assert!(err.contains("not a readable safetensors file"), "{err}");
}
