//! One offload as the actors exchange it. In process it goes from the
//! device's head to the worker's batch as it is: f32 values, shared, never
//! bytes, or the encoded tensor when the plan's codec is f16 or int8 (the
//! device pays the encoding, the worker the decoding, as over NATS). Only
//! the NATS edges turn it into the wire's `OffloadRequest` (`to_wire`, at
//! the device's `OffloadLink`) and back (`from_wire`, at the worker's
//! `serve_nats`).
use std::sync::Arc;

use branchpoint_messages::{AuditTag, Codec, DType, Deadline, MessageError, OffloadRequest, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct Offload {
    pub device_id: String,
    /// Per-device sequence number; echoed in the answer.
    pub seq: u64,
    /// The branch the device's head ended with, numbered from 1.
    pub partition_branch: u8,
    /// The activation's shape, batch dimension first (`[1, C, H, W]`).
    pub shape: Vec<u32>,
    pub activation: Activation,
    pub deadline: Deadline,
    pub audit: Option<AuditTag>,
    /// The model whose head made the activation (`OffloadRequest::model_sha256`).
    pub model_sha256: Option<Arc<str>>,
}

/// An activation's values: as computed (f32), or as a codec encoded them.
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    F32(Arc<[f32]>),
    /// A f16 or u8 tensor (`Codec::encode`), validated.
    Encoded(Arc<Tensor>),
}

impl Activation {
    /// `values` of `shape` under `codec`. A value f16 cannot hold (beyond
    /// +-65504) sends this activation as f32 rather than lose the input.
    pub fn encode(codec: Codec, shape: &[u32], values: Arc<[f32]>) -> Result<Self, MessageError> {
        match codec {
            Codec::F32 => Ok(Activation::F32(values)),
            _ => match codec.encode(shape, &values) {
                Ok(t) => Ok(Activation::Encoded(Arc::new(t))),
                Err(MessageError::NonFinite { .. }) if values.iter().all(|v| v.is_finite()) => Ok(Activation::F32(values)),
                Err(e) => Err(e),
            },
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            Activation::F32(v) => v.len(),
            Activation::Encoded(t) => t.num_elements().unwrap_or(0) as usize,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The codec it travels under.
    pub fn codec(&self) -> Codec {
        match self {
            Activation::F32(_) => Codec::F32,
            Activation::Encoded(t) => match t.dtype {
                DType::F32 => Codec::F32,
                DType::F16 => Codec::F16,
                DType::U8 => Codec::Int8,
            },
        }
    }

    /// Appends the values, decoded, to a batch being built.
    pub fn append_to(&self, batch: &mut Vec<f32>) -> Result<(), MessageError> {
        match self {
            Activation::F32(v) => {
                batch.extend_from_slice(v);
                Ok(())
            }
            Activation::Encoded(t) => t.append_f32(batch),
        }
    }

    /// Bytes of the payload on the wire: values, scales and zero points.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Activation::F32(v) => v.len() * 4,
            Activation::Encoded(t) => t.data.len() + t.scale.len() * 4 + t.zero_point.len(),
        }
    }
}

impl Offload {
    /// From the wire: a f32 tensor as its values, another kept encoded
    /// until the batch decodes it.
    pub fn from_wire(r: OffloadRequest) -> Result<Self, MessageError> {
        let shape = r.activation.shape.clone();
        let activation = match r.activation.dtype {
            DType::F32 => Activation::F32(r.activation.to_f32_vec()?.into()),
            _ => {
                r.activation.validate()?;
                Activation::Encoded(Arc::new(r.activation))
            }
        };
        Ok(Self {
            device_id: r.device_id,
            seq: r.seq,
            partition_branch: r.partition_branch,
            shape,
            activation,
            deadline: r.deadline,
            audit: r.audit,
            model_sha256: r.model_sha256.map(Into::into),
        })
    }

    /// To the wire, under the codec it was encoded with.
    pub fn to_wire(&self) -> Result<OffloadRequest, MessageError> {
        let activation = match &self.activation {
            Activation::F32(v) => Tensor::from_f32(&self.shape, v)?,
            Activation::Encoded(t) => Tensor::clone(t),
        };
        Ok(OffloadRequest {
            device_id: self.device_id.clone(),
            seq: self.seq,
            partition_branch: self.partition_branch,
            activation,
            deadline: self.deadline,
            audit: self.audit.clone(),
            model_sha256: self.model_sha256.as_deref().map(str::to_string),
        })
    }

    /// Its size on the wire, counted without building the bytes the way
    /// `to_wire` would (an emulated uplink charges every offload this).
    pub fn wire_len(&self) -> usize {
        // The same message with the tensor's bytes left out, plus those
        // bytes and the larger `bin` length prefix they need.
        let (template, bytes) = match &self.activation {
            Activation::F32(v) => (Tensor { dtype: DType::F32, shape: self.shape.clone(), data: Vec::new(), scale: Vec::new(), zero_point: Vec::new() }, v.len() * 4),
            Activation::Encoded(t) => (Tensor { data: Vec::new(), ..Tensor::clone(t) }, t.data.len()),
        };
        let empty = OffloadRequest {
            device_id: self.device_id.clone(),
            seq: self.seq,
            partition_branch: self.partition_branch,
            activation: template,
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
            activation: Activation::F32((0..n).map(|i| i as f32 * 0.5).collect()),
            deadline: Deadline { sent_at_unix_us: 1, budget_us: 1000 },
            audit: None,
            model_sha256: Some("ab".repeat(32).into()),
        }
    }

    #[test]
    fn the_wire_round_trip_keeps_every_value_and_wire_len_is_exact() {
        for n in [1, 10, 100, 20_000] {
            for codec in Codec::ALL {
                let mut o = offload(n);
                let Activation::F32(values) = o.activation.clone() else { unreachable!() };
                o.activation = Activation::encode(codec, &o.shape, values.clone()).unwrap();
                assert_eq!(o.activation.codec(), codec);
                let wire = o.to_wire().unwrap();
                assert_eq!(Offload::from_wire(wire.clone()).unwrap(), o, "{codec}");
                assert_eq!(o.wire_len(), branchpoint_messages::encode(&wire).unwrap().len(), "{n} values, {codec}");
                let mut decoded = Vec::new();
                o.activation.append_to(&mut decoded).unwrap();
                assert_eq!(decoded, codec.round_trip(&o.shape, &values).unwrap(), "the batch gets what the wire carries");
            }
        }
    }

    #[test]
    fn a_value_f16_cannot_hold_goes_as_f32_and_int8_is_a_quarter() {
        let values: Arc<[f32]> = vec![1.0, 1e6].into();
        assert_eq!(Activation::encode(Codec::F16, &[1, 2], values.clone()).unwrap(), Activation::F32(values));
        let big = offload(6272);
        let Activation::F32(v) = big.activation.clone() else { unreachable!() };
        let shaped = Offload { shape: vec![1, 32, 14, 14], activation: Activation::encode(Codec::Int8, &[1, 32, 14, 14], v).unwrap(), ..big.clone() };
        let ratio = shaped.wire_len() as f64 / Offload { shape: vec![1, 32, 14, 14], ..big }.wire_len() as f64;
        assert!(ratio < 0.27, "int8 offload is {ratio} of f32");
    }
}
