//! Per-exit metrics on logit tensors at temperature 1: accuracy, negative
//! log-likelihood and expected calibration error, as recorded in model cards.
//! The arithmetic lives in `calibration` (one definition of ECE, 15
//! equal-width bins (lo, hi], as Guo et al.).
use serde::{Deserialize, Serialize};
use tch::Tensor;

use branchpoint_core::calibration::calibration_metrics;

use crate::exits::exit_logits;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExitMetrics {
    /// Fraction of inputs whose argmax equals the label.
    pub accuracy: f64,
    /// Mean negative log-likelihood of the labels, in nats.
    pub nll: f64,
    /// Expected calibration error, 15 equal-width bins.
    pub ece: f64,
}

/// Accuracy, NLL and ECE of `logits` [N, C] against `labels` [N], at
/// temperature 1.
pub fn exit_metrics(logits: &Tensor, labels: &Tensor) -> ExitMetrics {
    let e = exit_logits(logits, labels).expect("logits [N, C] with labels [N] in 0..C");
    let m = calibration_metrics(&e, 1.0);
    ExitMetrics { accuracy: m.accuracy, nll: m.nll, ece: m.ece }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_metrics_on_tiny_logits() {
        // Two inputs, both predicted class 0 with probability e/(e+1).
        let logits = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([2, 2]);
        let labels = Tensor::from_slice(&[0i64, 1]);
        let m = exit_metrics(&logits, &labels);
        let p = 1f64.exp() / (1f64.exp() + 1.0);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        assert!((m.nll - (-(p.ln()) - (1.0 - p).ln()) / 2.0).abs() < 1e-6);
        assert!((m.ece - (p - 0.5)).abs() < 1e-6);
    }
}
