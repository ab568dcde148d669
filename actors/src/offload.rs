//! One offload as the actors exchange it: the activation as f32 values,
//! shared, never bytes. In process it goes from the device's head to the
//! worker's batch as it is; only the NATS edges turn it into the wire's
//! `OffloadRequest` (`to_wire`, at the device's `OffloadLink`) and back
//! (`from_wire`, at the worker's `serve_nats`).
use std::sync::Arc;

use branchpoint_messages::{AuditTag, Deadline, MessageError, OffloadRequest, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct Offload {
    pub device_id: String,
    /// Per-device sequence number; echoed in the answer.
    pub seq: u64,
    /// The branch the device's head ended with, numbered from 1.
    pub partition_branch: u8,
    /// The activation's shape, batch dimension first (`[1, C, H, W]`).
    pub shape: Vec<u32>,
    /// The activation's values, row-major.
    pub activation: Arc<[f32]>,
    pub deadline: Deadline,
    pub audit: Option<AuditTag>,
    /// The model whose head made the activation (`OffloadRequest::model_sha256`).
    pub model_sha256: Option<Arc<str>>,
}

impl Offload {
    /// From the wire: the tensor's values as f32 (f16 widened).
    pub fn from_wire(r: OffloadRequest) -> Result<Self, MessageError> {
        let activation: Arc<[f32]> = r.activation.to_f32_vec()?.into();
        Ok(Self {
            device_id: r.device_id,
            seq: r.seq,
            partition_branch: r.partition_branch,
            shape: r.activation.shape,
            activation,
            deadline: r.deadline,
            audit: r.audit,
            model_sha256: r.model_sha256.map(Into::into),
        })
    }

    /// To the wire, as f32.
    pub fn to_wire(&self) -> Result<OffloadRequest, MessageError> {
        Ok(OffloadRequest {
            device_id: self.device_id.clone(),
            seq: self.seq,
            partition_branch: self.partition_branch,
            activation: Tensor::from_f32(&self.shape, &self.activation)?,
            deadline: self.deadline,
            audit: self.audit.clone(),
            model_sha256: self.model_sha256.as_deref().map(str::to_string),
        })
    }

    /// Its size on the wire, counted without building the bytes the way
    /// `to_wire` would (an emulated uplink charges every offload this).
    pub fn wire_len(&self) -> usize {
        // The same message with an empty tensor, plus the tensor's bytes
        // and the larger `bin` length prefix they need.
        let bytes = self.activation.len() * 4;
        let empty = OffloadRequest {
            device_id: self.device_id.clone(),
            seq: self.seq,
            partition_branch: self.partition_branch,
            activation: Tensor { dtype: branchpoint_messages::DType::F32, shape: self.shape.clone(), data: Vec::new() },
            deadline: self.deadline,
            audit: self.audit.clone(),
            model_sha256: self.model_sha256.as_deref().map(str::to_string),
        };
        let prefix = |n: usize| match n {
            0..=0xff => 2,
            0x100..=0xffff => 3,
            _ => 5,
        };
        branchpoint_messages::encoded_len(&empty).unwrap_or(0) + bytes + prefix(bytes) - prefix(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offload(n: usize) -> Offload {
        Offload {
            device_id: "cam-1".into(),
            seq: 7,
            partition_branch: 2,
            shape: vec![1, n as u32],
            activation: (0..n).map(|i| i as f32 * 0.5).collect(),
            deadline: Deadline { sent_at_unix_us: 1, budget_us: 1000 },
            audit: None,
            model_sha256: Some("ab".repeat(32).into()),
        }
    }

    #[test]
    fn the_wire_round_trip_keeps_every_value_and_wire_len_is_exact() {
        for n in [1, 10, 100, 20_000] {
            let o = offload(n);
            let wire = o.to_wire().unwrap();
            assert_eq!(Offload::from_wire(wire.clone()).unwrap(), o);
            assert_eq!(o.wire_len(), branchpoint_messages::encode(&wire).unwrap().len(), "{n} values");
        }
    }
}
