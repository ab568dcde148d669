//! Joint training of all exits: loss = sum over exits e of w_e * CE(z_e, y).
//!
//! Deliberately plain: Adam with a cosine-decayed learning rate, dropout in
//! the final exit, batch norm in the convolutions, random crops and
//! horizontal flips. No label smoothing, mixup or other tricks that improve
//! calibration: the project studies miscalibration as it occurs in practice.
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::{Normalization, Split};
use crate::error::{ModelError, Result};
use crate::metrics::{exit_metrics, ExitMetrics};
use crate::net::EarlyExitNet;
use branchpoint_core::rng::SplitMix64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Loss weight of each exit: branches in order, then final.
    pub exit_weights: Vec<f64>,
    /// Seeds weight initialisation, shuffling and augmentation.
    pub seed: u64,
    /// Random crop (pad 2) and horizontal flip of training images.
    pub augment: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self { epochs: 20, batch_size: 128, learning_rate: 2e-3, weight_decay: 1e-4, exit_weights: vec![0.5, 0.5, 1.0], seed: 1, augment: true }
    }
}

impl TrainConfig {
    pub fn validate(&self, num_exits: usize) -> Result<()> {
        let bad = |what: &str, reason: String| Err(ModelError::InvalidArgument { what: what.into(), reason });
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch size", "must be at least 1".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning rate", format!("{} is not a positive number", self.learning_rate));
        }
        if self.exit_weights.len() != num_exits {
            return bad("exit weights", format!("{} given, the model has {num_exits} exits", self.exit_weights.len()));
        }
        if self.exit_weights.iter().any(|w| !w.is_finite() || *w < 0.0) || self.exit_weights.iter().sum::<f64>() <= 0.0 {
            return bad("exit weights", format!("{:?} must be non-negative and not all zero", self.exit_weights));
        }
        Ok(())
    }
}

/// What the training loop reports after every batch.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub epoch: usize,
    pub epochs: usize,
    pub batch: usize,
    pub batches: usize,
    /// Running mean of the weighted loss over this epoch.
    pub loss: f64,
    /// Running training accuracy of the final exit over this epoch.
    pub accuracy: f64,
}

/// What the training loop reports after every epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    pub loss: f64,
    pub train_accuracy: f64,
    /// Per-exit metrics on the validation split (branches, then final).
    pub validation: Vec<ExitMetrics>,
}

/// Trains `net` (whose variables live in `vs`) on `train`, reporting progress
/// after each batch and a summary after each epoch (evaluated on
/// `validation`).
// The data, the settings and two progress callbacks: a struct for them would
// only be unpacked again here.
#[allow(clippy::too_many_arguments)]
pub fn train(
    net: &EarlyExitNet,
    vs: &nn::VarStore,
    train: &Split,
    validation: &Split,
    norm: &Normalization,
    cfg: &TrainConfig,
    mut on_batch: impl FnMut(&Progress),
    mut on_epoch: impl FnMut(&EpochSummary),
) -> Result<Vec<EpochSummary>> {
    cfg.validate(net.num_branches() + 1)?;
    if train.is_empty() {
        return Err(ModelError::InvalidArgument { what: "training set".into(), reason: "it is empty".into() });
    }
    let device = vs.device();
    let mut opt = nn::Adam { wd: cfg.weight_decay, ..Default::default() }.build(vs, cfg.learning_rate)?;
    let n = train.len();
    let batches = n.div_ceil(cfg.batch_size);
    let total_steps = (batches * cfg.epochs) as f64;
    let weights = cfg.exit_weights.clone();
    // Padding value for random crops: a black (0) pixel after standardisation
    // (channel 0's value; for colour images the other channels are close).
    let pad_value = -norm.mean[0] / norm.std[0];
    let mut rng = SplitMix64::new(cfg.seed ^ 0x005E_ED0F_DA7A);
    let mut history = Vec::new();
    let mut step = 0usize;

    for epoch in 1..=cfg.epochs {
        let order = rng.permutation(n);
        let mut loss_sum = 0.0;
        let mut correct = 0i64;
        let mut seen = 0usize;
        for (b, chunk) in order.chunks(cfg.batch_size).enumerate() {
            // Cosine decay from the base rate towards zero over all steps.
            let lr = cfg.learning_rate * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps).cos());
            opt.set_lr(lr);
            let batch = train.select(chunk);
            let mut xs = batch.images;
            if cfg.augment {
                xs = augment(&xs, pad_value, &mut rng);
            }
            let xs = xs.to_device(device);
            let ys = batch.labels.to_device(device);
            let logits = net.forward_exits_t(&xs, true);
            let loss = logits.iter().zip(&weights).map(|(z, &w)| z.cross_entropy_for_logits(&ys) * w).reduce(|a, b| a + b).expect("at least one exit");
            opt.backward_step(&loss);
            step += 1;

            let final_logits = logits.last().expect("final exit");
            loss_sum += loss.double_value(&[]) * chunk.len() as f64;
            correct += final_logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Int64).int64_value(&[]);
            seen += chunk.len();
            on_batch(&Progress { epoch, epochs: cfg.epochs, batch: b + 1, batches, loss: loss_sum / seen as f64, accuracy: correct as f64 / seen as f64 });
        }
        let validation_metrics = if validation.is_empty() {
            Vec::new()
        } else {
            let logits = net.logits_for(&validation.images, 500);
            logits.iter().map(|z| exit_metrics(z, &validation.labels)).collect()
        };
        let summary = EpochSummary { epoch, loss: loss_sum / seen as f64, train_accuracy: correct as f64 / seen as f64, validation: validation_metrics };
        on_epoch(&summary);
        history.push(summary);
    }
    Ok(history)
}

/// Random crop with 2 pixels of padding and random horizontal flip, per
/// image, on the CPU.
fn augment(xs: &Tensor, pad_value: f64, rng: &mut SplitMix64) -> Tensor {
    const PAD: i64 = 2;
    let size = xs.size();
    let (n, h, w) = (size[0], size[2], size[3]);
    let padded = xs.pad([PAD, PAD, PAD, PAD], "constant", pad_value);
    let crops: Vec<Tensor> = (0..n)
        .map(|i| {
            let dy = rng.below(2 * PAD as u64 + 1) as i64;
            let dx = rng.below(2 * PAD as u64 + 1) as i64;
            let img = padded.get(i).narrow(1, dy, h).narrow(2, dx, w);
            if rng.below(2) == 1 {
                img.flip([2])
            } else {
                img
            }
        })
        .collect();
    Tensor::stack(&crops, 0).to_device(Device::Cpu)
}
