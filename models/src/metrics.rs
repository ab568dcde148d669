//! Per-exit metrics on logits: accuracy, negative log-likelihood and expected
//! calibration error.
//!
//! ECE follows Guo et al. (ICML 2017): confidences (max softmax probability)
//! fall into 15 equal-width bins (lo, hi]; ECE = sum over bins of
//! |bin| / N * |accuracy(bin) - mean confidence(bin)|.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Number of equal-width confidence bins for ECE and reliability diagrams.
pub const ECE_BINS: usize = 15;

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
    let logits = logits.to_kind(Kind::Double);
    let log_probs = logits.log_softmax(-1, Kind::Double);
    let nll = -log_probs.gather(1, &labels.unsqueeze(1), false).mean(Kind::Double).double_value(&[]);
    let (conf, pred) = log_probs.exp().max_dim(1, false);
    let correct: Vec<bool> = Vec::<bool>::try_from(pred.eq_tensor(labels)).expect("bool tensor");
    let conf: Vec<f64> = Vec::<f64>::try_from(conf).expect("f64 tensor");
    let accuracy = correct.iter().filter(|&&c| c).count() as f64 / correct.len().max(1) as f64;
    ExitMetrics { accuracy, nll, ece: ece(&conf, &correct, ECE_BINS) }
}

/// Index of the (lo, hi] bin that confidence `c` in [0, 1] falls into.
pub fn bin_index(c: f64, bins: usize) -> usize {
    // (lo, hi]: c = k/bins belongs to bin k-1; c = 0 (impossible for a max
    // softmax) goes to the first bin.
    ((c * bins as f64).ceil() as usize).clamp(1, bins) - 1
}

/// Expected calibration error of predictions with confidences `conf` and
/// correctness `correct`, over `bins` equal-width bins (lo, hi].
pub fn ece(conf: &[f64], correct: &[bool], bins: usize) -> f64 {
    assert_eq!(conf.len(), correct.len(), "one correctness flag per confidence");
    if conf.is_empty() {
        return 0.0;
    }
    let mut count = vec![0usize; bins];
    let mut sum_conf = vec![0f64; bins];
    let mut sum_correct = vec![0f64; bins];
    for (&c, &ok) in conf.iter().zip(correct) {
        let b = bin_index(c, bins);
        count[b] += 1;
        sum_conf[b] += c;
        sum_correct[b] += f64::from(u8::from(ok));
    }
    let n = conf.len() as f64;
    (0..bins)
        .filter(|&b| count[b] > 0)
        .map(|b| (sum_correct[b] - sum_conf[b]).abs() / n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_left_open_right_closed() {
        assert_eq!(bin_index(1.0, 15), 14);
        assert_eq!(bin_index(1.0 / 15.0, 15), 0);
        assert_eq!(bin_index(1.0 / 15.0 + 1e-12, 15), 1);
        assert_eq!(bin_index(0.5, 10), 4);
        assert_eq!(bin_index(0.0, 15), 0);
    }

    #[test]
    fn ece_of_a_hand_computed_case() {
        // Bin (0.6, 0.7]: confidences 0.65, 0.65, accuracy 1/2 -> |0.5-0.65| * 2/4
        // Bin (0.9, 1.0]: confidences 0.95, 0.95, accuracy 2/2 -> |1-0.95| * 2/4
        let conf = [0.65, 0.65, 0.95, 0.95];
        let correct = [true, false, true, true];
        let expected = 0.15 * 0.5 + 0.05 * 0.5;
        assert!((ece(&conf, &correct, 10) - expected).abs() < 1e-12);
    }

    #[test]
    fn ece_of_a_calibrated_case_is_zero() {
        // In each bin the fraction correct equals the confidence exactly.
        let mut conf = Vec::new();
        let mut correct = Vec::new();
        for (c, n_right) in [(0.6, 6), (0.8, 8), (1.0, 10)] {
            for i in 0..10 {
                conf.push(c);
                correct.push(i < n_right);
            }
        }
        assert!(ece(&conf, &correct, ECE_BINS).abs() < 1e-12);
    }

    #[test]
    fn exit_metrics_on_tiny_logits() {
        // Two inputs, both predicted class 0 with probability e/(e+1).
        let logits = Tensor::from_slice(&[1.0f32, 0.0, 1.0, 0.0]).view([2, 2]);
        let labels = Tensor::from_slice(&[0i64, 1]);
        let m = exit_metrics(&logits, &labels);
        let p = 1f64.exp() / (1f64.exp() + 1.0);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        assert!((m.nll - (-(p.ln()) - (1.0 - p).ln()) / 2.0).abs() < 1e-9);
        assert!((m.ece - (p - 0.5)).abs() < 1e-9);
    }
}
