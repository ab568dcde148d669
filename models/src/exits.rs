//! A network's answers as plain numbers: the bridge from tensors to the pure
//! core, which takes a model as its recorded logits (`ExitLogits`).
use branchpoint_core::calibration::ExitLogits;
use tch::{Kind, Tensor};

use crate::data::Split;
use crate::error::Result;
use crate::net::EarlyExitNet;

/// From a [n, classes] float tensor and [n] label tensor.
pub fn exit_logits(logits: &Tensor, labels: &Tensor) -> Result<ExitLogits> {
    let size = logits.size();
    let classes = *size.last().unwrap_or(&0) as usize;
    let flat: Vec<f32> = Vec::try_from(logits.to_kind(Kind::Float).flatten(0, -1))?;
    let labels: Vec<i64> = Vec::try_from(labels.to_kind(Kind::Int64))?;
    Ok(ExitLogits::new(classes, flat, labels)?)
}

/// Logits of every exit over a split, as plain `ExitLogits` (branches in
/// order, then final).
pub fn split_exit_logits(net: &EarlyExitNet, split: &Split) -> Result<Vec<ExitLogits>> {
    net.logits_for(&split.images, 500).iter().map(|z| exit_logits(z, &split.labels)).collect()
}
