//! The paper's offloading analysis, as pure computation on test logits.
//!
//! At partition branch k with temperature T_k and target p_tar, input i stays
//! on the device when max softmax(z_k,i / T_k) >= p_tar (answer argmax z_k,i)
//! and is offloaded otherwise (answer argmax of the final exit's logits).
//!
//! Metrics for one (branch, temperature, p_tar):
//! - `offload_prob`: fraction of inputs offloaded;
//! - `edge_accuracy`: accuracy over the inputs decided on the device (None
//!   when no input stays on the device);
//! - `overall_accuracy`: accuracy over all inputs, wherever decided;
//! - `outage_prob`: the test stream, in its order, is cut into consecutive
//!   batches of `outage_batch` inputs (a final partial batch is dropped); a
//!   batch is in outage when the edge accuracy of its on-device inputs is
//!   below p_tar. A batch with no on-device input makes no on-device decision
//!   and so is not in outage; such batches are counted in
//!   `batches_without_edge_inputs`;
//! - `missed_deadline_prob`: fraction of inputs whose latency under the
//!   latency model exceeds the deadline; `missed_deadline_batch_prob`: the
//!   fraction of batches whose mean latency exceeds it (journal version).
use serde::{Deserialize, Serialize};

use crate::calibration::ExitLogits;
use crate::error::{CoreError, Result};

/// The default p_tar sweep: 0.50 to 0.95 in steps of 0.05, then 0.96 to 0.99.
/// On an easy dataset the effect of miscalibration shows mostly at high targets.
pub fn default_p_tars() -> Vec<f64> {
    let mut v: Vec<f64> = (0..10).map(|i| 0.5 + 0.05 * f64::from(i)).collect();
    v.extend([0.96, 0.97, 0.98, 0.99]);
    v.iter().map(|p| (p * 100.0).round() / 100.0).collect()
}

/// Default outage batch size N.
pub const DEFAULT_OUTAGE_BATCH: usize = 100;

/// The one definition of a deadline miss lives with the outcomes.
pub use crate::outcome::deadline_missed;

/// A target p_tar (`PTar::target`: in (0, 1)).
pub fn check_p_tar(p: f64) -> Result<()> {
    branchpoint_messages::PTar::target(p).map(|_| ()).map_err(|e| CoreError::InvalidArgument { what: "p_tar".into(), reason: format!("{e}; e.g. 0.8") })
}

/// End-to-end latency of one input. Decided on the device: the head (stages
/// up to the branch, plus the branch). Offloaded: that, plus the uplink
/// transfer of the activation, plus the round-trip propagation delay, plus
/// the cloud's tail.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LatencyModel {
    pub head_ms: f64,
    pub tail_ms: f64,
    pub activation_bytes: usize,
    pub uplink_mbit_s: f64,
    pub rtt_ms: f64,
}

impl LatencyModel {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: f64| Err(CoreError::InvalidArgument { what: what.into(), reason: format!("{v} must be a positive finite number") });
        if !(self.uplink_mbit_s.is_finite() && self.uplink_mbit_s > 0.0) {
            return bad("uplink rate (Mbit/s)", self.uplink_mbit_s);
        }
        if !(self.rtt_ms.is_finite() && self.rtt_ms >= 0.0) {
            return bad("round-trip time (ms)", self.rtt_ms);
        }
        Ok(())
    }

    pub fn edge_ms(&self) -> f64 {
        self.head_ms
    }

    pub fn uplink_ms(&self) -> f64 {
        self.activation_bytes as f64 * 8.0 / (self.uplink_mbit_s * 1e6) * 1e3
    }

    pub fn offload_ms(&self) -> f64 {
        self.head_ms + self.uplink_ms() + self.rtt_ms + self.tail_ms
    }
}

/// One row of a p_tar sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRow {
    pub p_tar: f64,
    pub offload_prob: f64,
    pub edge_accuracy: Option<f64>,
    pub overall_accuracy: f64,
    pub outage_prob: f64,
    pub missed_deadline_prob: f64,
    pub missed_deadline_batch_prob: f64,
    /// Whether the edge accuracy reaches p_tar (None: no on-device input).
    pub meets_p_tar: Option<bool>,
    pub edge_inputs: usize,
    pub batches: usize,
    pub batches_without_edge_inputs: usize,
}

/// Per-input facts the sweep needs, computed once per temperature.
#[derive(Debug, Clone)]
pub struct Decisions {
    pub confidence: Vec<f64>,
    pub branch_correct: Vec<bool>,
    pub final_correct: Vec<bool>,
}

impl Decisions {
    pub fn new(branch: &ExitLogits, final_exit: &ExitLogits, temperature: f64) -> Result<Self> {
        if branch.labels != final_exit.labels {
            return Err(CoreError::InvalidArgument { what: "logits".into(), reason: "branch and final logits are not over the same labelled inputs".into() });
        }
        let mut d = Decisions { confidence: Vec::new(), branch_correct: Vec::new(), final_correct: Vec::new() };
        for i in 0..branch.len() {
            let (bp, conf) = branch.predict(i, temperature);
            let (fp, _) = final_exit.predict(i, 1.0);
            d.confidence.push(conf);
            d.branch_correct.push(bp as i64 == branch.labels[i]);
            d.final_correct.push(fp as i64 == final_exit.labels[i]);
        }
        Ok(d)
    }

    /// Whether input i stays on the device at target p_tar.
    pub fn on_device(&self, i: usize, p_tar: f64) -> bool {
        self.confidence[i] >= p_tar
    }
}

/// Whether `correct` right answers out of `total` reach the accuracy target
/// `p_tar`, i.e. correct / total >= p_tar, decided exactly in integers. The
/// target counts as the decimal it was written as, to the nearest millionth:
/// p_tar 0.55 means 55/100, so 55 right out of 100 reach it, although the
/// float product 0.55 * 100 is 55.000000000000007. `total` 0 reaches any
/// target (there is nothing to be wrong about).
pub fn reaches_target(correct: usize, total: usize, p_tar: f64) -> bool {
    correct as u128 * TARGET_PARTS >= target_millionths(p_tar) * total as u128
}

/// The fewest right answers out of `total` that reach `p_tar`, by the same
/// exact rule as `reaches_target`.
pub fn fewest_correct(total: usize, p_tar: f64) -> usize {
    (target_millionths(p_tar) * total as u128).div_ceil(TARGET_PARTS) as usize
}

const TARGET_PARTS: u128 = 1_000_000;

fn target_millionths(p_tar: f64) -> u128 {
    (p_tar.clamp(0.0, 1.0) * TARGET_PARTS as f64).round() as u128
}

/// Where one exit threshold puts a branch, judged against an accuracy
/// target that need not equal the threshold (a certified threshold is chosen
/// for a target, not equal to it; for a plain p_tar the two are the same).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OperatingPoint {
    /// Inputs with confidence >= threshold stay on the device; infinite
    /// means none does.
    pub threshold: f64,
    pub target: f64,
    pub offload_prob: f64,
    pub edge_accuracy: Option<f64>,
    pub overall_accuracy: f64,
    /// Fraction of batches of `outage_batch` inputs whose on-device
    /// accuracy is below the target (a batch without on-device input is not).
    pub outage_prob: f64,
    pub edge_inputs: usize,
    /// Whether the edge accuracy reaches the target (None: nothing exits).
    pub meets_target: Option<bool>,
}

pub fn operating_point(d: &Decisions, threshold: f64, target: f64, outage_batch: usize) -> OperatingPoint {
    let n = d.confidence.len();
    let (mut edge, mut edge_ok, mut all_ok) = (0usize, 0usize, 0usize);
    for i in 0..n {
        let on = d.on_device(i, threshold);
        let ok = if on { d.branch_correct[i] } else { d.final_correct[i] };
        edge += usize::from(on);
        edge_ok += usize::from(on && ok);
        all_ok += usize::from(ok);
    }
    let batch = outage_batch.max(1);
    let batches = n / batch;
    let mut outages = 0usize;
    for b in 0..batches {
        let (mut e, mut e_ok) = (0usize, 0usize);
        for i in b * batch..(b + 1) * batch {
            let on = d.on_device(i, threshold);
            e += usize::from(on);
            e_ok += usize::from(on && d.branch_correct[i]);
        }
        outages += usize::from(e > 0 && !reaches_target(e_ok, e, target));
    }
    OperatingPoint {
        threshold,
        target,
        offload_prob: (n - edge) as f64 / n.max(1) as f64,
        edge_accuracy: (edge > 0).then(|| edge_ok as f64 / edge as f64),
        overall_accuracy: all_ok as f64 / n.max(1) as f64,
        outage_prob: outages as f64 / batches.max(1) as f64,
        edge_inputs: edge,
        meets_target: (edge > 0).then(|| reaches_target(edge_ok, edge, target)),
    }
}

pub fn sweep_row(d: &Decisions, p_tar: f64, outage_batch: usize, latency: &LatencyModel, deadline_ms: f64) -> SweepRow {
    let op = operating_point(d, p_tar, p_tar, outage_batch);
    let n = d.confidence.len();
    let lat = |i: usize| if d.on_device(i, p_tar) { latency.edge_ms() } else { latency.offload_ms() };
    let missed = (0..n).filter(|&i| lat(i) > deadline_ms).count();
    let batch = outage_batch.max(1);
    let batches = n / batch;
    let (mut empty, mut late_batches) = (0usize, 0usize);
    for b in 0..batches {
        let range = b * batch..(b + 1) * batch;
        empty += usize::from(!range.clone().any(|i| d.on_device(i, p_tar)));
        late_batches += usize::from(range.map(lat).sum::<f64>() / batch as f64 > deadline_ms);
    }
    SweepRow {
        p_tar,
        offload_prob: op.offload_prob,
        edge_accuracy: op.edge_accuracy,
        overall_accuracy: op.overall_accuracy,
        outage_prob: op.outage_prob,
        missed_deadline_prob: missed as f64 / n.max(1) as f64,
        missed_deadline_batch_prob: late_batches as f64 / batches.max(1) as f64,
        meets_p_tar: op.meets_target,
        edge_inputs: op.edge_inputs,
        batches,
        batches_without_edge_inputs: empty,
    }
}

/// The sweep over `p_tars` for one branch and temperature.
pub fn sweep(d: &Decisions, p_tars: &[f64], outage_batch: usize, latency: &LatencyModel, deadline_ms: f64) -> Result<Vec<SweepRow>> {
    for &p in p_tars {
        check_p_tar(p)?;
    }
    if outage_batch == 0 {
        return Err(CoreError::InvalidArgument { what: "outage batch size".into(), reason: "must be at least 1".into() });
    }
    latency.validate()?;
    Ok(p_tars.iter().map(|&p| sweep_row(d, p, outage_batch, latency, deadline_ms)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decisions(conf: &[f64], branch_ok: &[bool], final_ok: &[bool]) -> Decisions {
        Decisions { confidence: conf.to_vec(), branch_correct: branch_ok.to_vec(), final_correct: final_ok.to_vec() }
    }

    const LAT: LatencyModel = LatencyModel { head_ms: 1.0, tail_ms: 2.0, activation_bytes: 12_500, uplink_mbit_s: 10.0, rtt_ms: 7.0 };

    #[test]
    fn latency_model_adds_up() {
        // 12,500 bytes at 10 Mbit/s = 10 ms.
        assert!((LAT.uplink_ms() - 10.0).abs() < 1e-12);
        assert!((LAT.offload_ms() - 20.0).abs() < 1e-12);
        assert_eq!(LAT.edge_ms(), 1.0);
    }

    #[test]
    fn a_hand_worked_sweep_row() {
        // Four inputs, two batches of 2.
        //   input: conf  branch ok  final ok
        //   0:     0.9   yes        yes
        //   1:     0.6   yes        no
        //   2:     0.95  no         yes
        //   3:     0.5   no         yes
        let d = decisions(&[0.9, 0.6, 0.95, 0.5], &[true, true, false, false], &[true, false, true, true]);
        let r = sweep_row(&d, 0.8, 2, &LAT, 5.0);
        // On device: 0 and 2 (one right); offloaded: 1 (wrong), 3 (right).
        assert_eq!(r.edge_inputs, 2);
        assert!((r.offload_prob - 0.5).abs() < 1e-12);
        assert_eq!(r.edge_accuracy, Some(0.5));
        assert!((r.overall_accuracy - 0.5).abs() < 1e-12);
        assert_eq!(r.meets_p_tar, Some(false));
        // Batch 0: on-device {0}, accuracy 1 -> fine. Batch 1: {2}, accuracy 0 -> outage.
        assert!((r.outage_prob - 0.5).abs() < 1e-12);
        // Offloaded inputs take 20 ms > 5 ms deadline: 2 of 4 miss; each batch's
        // mean latency (1+20)/2 = 10.5 > 5: both batches late.
        assert!((r.missed_deadline_prob - 0.5).abs() < 1e-12);
        assert!((r.missed_deadline_batch_prob - 1.0).abs() < 1e-12);

        // Target 0.99: nothing stays on the device; no batch is in outage.
        let r = sweep_row(&d, 0.99, 2, &LAT, 5.0);
        assert_eq!((r.edge_accuracy, r.meets_p_tar, r.outage_prob), (None, None, 0.0));
        assert_eq!(r.batches_without_edge_inputs, 2);
        assert!((r.overall_accuracy - 0.75).abs() < 1e-12);
    }

    #[test]
    fn the_outage_rule_is_exact_at_the_boundary() {
        // (right, of, p_tar, reaches): the float products would say 55 of
        // 100 misses 0.55 (0.55 * 100 = 55.000000000000007), 7 of 10 misses
        // 0.7, and 29 of 100 misses 0.29.
        let table = [
            (55, 100, 0.55, true),
            (54, 100, 0.55, false),
            (7, 10, 0.7, true),
            (29, 100, 0.29, true),
            (28, 100, 0.29, false),
            (99, 100, 0.99, true),
            (98, 100, 0.99, false),
            (1, 1, 1.0, true),
            (0, 3, 0.0, true),
            (0, 0, 0.9, true),
        ];
        for (right, of, p_tar, reaches) in table {
            assert_eq!(reaches_target(right, of, p_tar), reaches, "{right} of {of} at p_tar {p_tar}");
            // The fewest that reach it reach it, one fewer does not.
            let fewest = fewest_correct(of, p_tar);
            assert!(reaches_target(fewest, of, p_tar) && (fewest == 0 || !reaches_target(fewest - 1, of, p_tar)), "{of} at {p_tar}: {fewest}");
        }
        assert_eq!((fewest_correct(100, 0.55), fewest_correct(10, 0.7), fewest_correct(7, 0.9), fewest_correct(0, 0.9)), (55, 7, 7, 0));

        // A batch of 100 decided on the device, 55 right: at 0.55 it is not in
        // outage and meets the target; at 0.56 it is in outage.
        let conf = vec![0.99; 100];
        let right: Vec<bool> = (0..100).map(|i| i < 55).collect();
        let d = decisions(&conf, &right, &[true; 100]);
        let at = |p: f64| sweep_row(&d, p, 100, &LAT, 100.0);
        assert_eq!((at(0.55).outage_prob, at(0.55).meets_p_tar), (0.0, Some(true)));
        assert_eq!((at(0.56).outage_prob, at(0.56).meets_p_tar), (1.0, Some(false)));
    }

    #[test]
    fn p_tar_outside_the_open_unit_interval_is_refused() {
        let d = decisions(&[0.9], &[true], &[true]);
        for bad in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
            let e = sweep(&d, &[0.5, bad], 100, &LAT, 10.0).unwrap_err().to_string();
            assert!(e.contains("outside (0, 1)"), "{e}");
        }
    }

    #[test]
    fn the_default_sweep_is_the_documented_one() {
        let p = default_p_tars();
        assert_eq!(p.len(), 14);
        assert_eq!((p[0], p[9], p[10], p[13]), (0.5, 0.95, 0.96, 0.99));
    }
}
