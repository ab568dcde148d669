//! Tensors on the wire: dtype + shape + raw little-endian bytes, and for
//! the 8-bit dtype its scales and zero points.
//!
//! Bytes rather than a MessagePack array of numbers because an activation is
//! tens of kilobytes to megabytes: as `bin` it is one memcpy to encode and can
//! be borrowed when decoding, while an array costs a type tag per element.
//! Little-endian is fixed so the wire never depends on the sender's CPU.

use std::fmt;

use half::f16;
use serde::{Deserialize, Serialize};

use crate::MessageError;

/// Most dimensions a tensor may have. Activations are NCHW; 8 leaves room.
pub const MAX_DIMS: usize = 8;
/// Most bytes a tensor payload may hold (64 MiB). Note that a NATS server
/// refuses payloads above its `max_payload` (1 MiB unless configured).
pub const MAX_TENSOR_BYTES: u64 = 64 * 1024 * 1024;

/// Element type of a tensor payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE 754 binary32, 4 bytes.
    F32,
    /// IEEE 754 binary16, 2 bytes: halves the uplink bytes of an activation.
    F16,
    /// Unsigned 8-bit integers with an affine map to real values, 1 byte:
    /// the elements (row-major) split into `scale.len()` equal consecutive
    /// groups, and element x of group g stands for
    /// `(x - zero_point[g]) * scale[g]`. The `int8` codec (`codec::Codec`)
    /// makes one group per channel of each item of an NCHW activation.
    U8,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::U8 => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::U8 => "u8",
        })
    }
}

/// A dense tensor in row-major order, as it travels on the wire.
///
/// Fields are public so tests and peers can inspect them, but build tensors
/// with [`Tensor::from_f32`] or [`Tensor::from_f32_as_f16`], which validate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<u32>,
    /// `product(shape) * dtype.size()` little-endian bytes, as MessagePack
    /// `bin`: an array of numbers or a string is refused, not converted.
    #[serde(serialize_with = "serde_bytes::serialize", deserialize_with = "bin_only")]
    pub data: Vec<u8>,
    /// dtype `u8` only, and then required: one positive, finite scale per
    /// group of elements (see [`DType::U8`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scale: Vec<f32>,
    /// dtype `u8` only: one zero point (0 to 255) per group, as many as
    /// `scale`, as MessagePack `bin` (one byte each).
    #[serde(default, skip_serializing_if = "Vec::is_empty", with = "serde_bytes")]
    pub zero_point: Vec<u8>,
}

/// Accepts MessagePack `bin` (bytes) and nothing else: the wire format says
/// bytes, and a peer that sends numbers or text has it wrong.
fn bin_only<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    struct Bin;
    impl<'de> serde::de::Visitor<'de> for Bin {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("tensor data as MessagePack bin (bytes)")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }
    }
    d.deserialize_byte_buf(Bin)
}

impl Tensor {
    /// A f32 tensor holding `values` (row-major) with the given shape.
    pub fn from_f32(shape: &[u32], values: &[f32]) -> Result<Self, MessageError> {
        check_finite(values)?;
        Self::sized(DType::F32, shape, le_bytes(values, f32::to_le_bytes))
    }

    /// A f16 tensor holding `values` rounded to the nearest f16 (ties to
    /// even, in hardware where the CPU has it: the same bits either way).
    /// Values beyond f16's range (|x| > 65504) become infinite and are
    /// refused.
    pub fn from_f32_as_f16(shape: &[u32], values: &[f32]) -> Result<Self, MessageError> {
        use half::slice::HalfFloatSliceExt;
        check_finite(values)?;
        let mut halves = vec![f16::ZERO; values.len()];
        halves.convert_from_f32_slice(values);
        if let Some(index) = halves.iter().position(|h| !h.is_finite()) {
            return Err(MessageError::NonFinite { index, value: halves[index].to_f32() });
        }
        Self::sized(DType::F16, shape, le_bytes(&halves, f16::to_le_bytes))
    }

    /// A `u8` tensor from its codes, scales and zero points (see
    /// [`DType::U8`]); `codec::Codec::Int8` makes them from f32 values.
    pub fn from_u8_affine(shape: &[u32], codes: Vec<u8>, scale: Vec<f32>, zero_point: Vec<u8>) -> Result<Self, MessageError> {
        let tensor = Tensor { dtype: DType::U8, shape: shape.to_vec(), data: codes, scale, zero_point };
        // Valid groups make every code's value finite: no pass over them.
        tensor.check_size()?;
        Ok(tensor)
    }

    /// A tensor whose values are known to be finite: only its size is checked.
    fn sized(dtype: DType, shape: &[u32], data: Vec<u8>) -> Result<Self, MessageError> {
        let tensor = Tensor { dtype, shape: shape.to_vec(), data, scale: Vec::new(), zero_point: Vec::new() };
        tensor.check_size()?;
        Ok(tensor)
    }

    /// Number of elements, `product(shape)`, or `None` if it overflows u64.
    pub fn num_elements(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(u64::from(d)))
    }

    /// The values as f32, widening f16 and mapping u8 codes through their
    /// scales. Validates the size first, so a malformed payload gives an
    /// error rather than a short vector.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, MessageError> {
        let mut out = Vec::with_capacity(self.data.len());
        self.append_f32(&mut out)?;
        Ok(out)
    }

    /// Appends the values as f32 to `out` (a worker builds its batch this
    /// way, decoding straight into it).
    pub fn append_f32(&self, out: &mut Vec<f32>) -> Result<(), MessageError> {
        self.check_size()?;
        match self.dtype {
            DType::F32 => out.extend(self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            DType::F16 => {
                use half::slice::HalfFloatSliceExt;
                let start = out.len();
                out.resize(start + self.data.len() / 2, 0.0);
                let halves: Vec<f16> = from_le_bytes(&self.data, f16::from_le_bytes);
                halves.convert_to_f32_slice(&mut out[start..]);
            }
            DType::U8 => {
                let per_group = self.data.len() / self.scale.len();
                out.reserve(self.data.len());
                for (codes, (&scale, &zero_point)) in self.data.chunks_exact(per_group).zip(self.scale.iter().zip(&self.zero_point)) {
                    let zero = f32::from(zero_point);
                    out.extend(codes.iter().map(|&x| (f32::from(x) - zero) * scale));
                }
            }
        }
        Ok(())
    }

    /// Checks shape, size and that every value is finite.
    pub fn validate(&self) -> Result<(), MessageError> {
        self.check_size()?;
        // NaN or inf in an activation would silently poison the tail's logits
        // and every answer batched with it, so refuse it at the boundary.
        let bad = match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).enumerate().find(|(_, v)| !v.is_finite()),
            // All exponent bits set: an infinity or NaN.
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]))
                .position(|h| h & 0x7C00 == 0x7C00)
                .map(|i| (i, f16::from_le_bytes([self.data[2 * i], self.data[2 * i + 1]]).to_f32())),
            // Every code's value is finite once the groups are valid.
            DType::U8 => None,
        };
        match bad {
            Some((index, value)) => Err(MessageError::NonFinite { index, value }),
            None => Ok(()),
        }
    }

    /// Checks dims, limits, that the byte length equals shape x dtype size,
    /// and a `u8` tensor's groups.
    fn check_size(&self) -> Result<(), MessageError> {
        let bad = |reason| MessageError::BadShape { shape: self.shape.clone(), reason };
        if self.shape.is_empty() || self.shape.len() > MAX_DIMS {
            return Err(bad("a tensor needs 1 to 8 dimensions"));
        }
        if self.shape.contains(&0) {
            return Err(bad("a zero dimension leaves nothing to compute on"));
        }
        let expected = self.num_elements().and_then(|n| n.checked_mul(self.dtype.size())).unwrap_or(u64::MAX);
        if expected > MAX_TENSOR_BYTES {
            let limit = MAX_TENSOR_BYTES;
            return Err(MessageError::TooLarge { what: "tensor", size: expected, limit });
        }
        let actual = self.data.len() as u64;
        if actual != expected {
            let (shape, dtype) = (self.shape.clone(), self.dtype);
            return Err(MessageError::SizeMismatch { shape, dtype, expected, actual });
        }
        self.check_groups(actual)
    }

    /// A `u8` tensor needs as many zero points as scales, a number of groups
    /// that divides its elements, and scales whose codes all map to finite
    /// values; other dtypes carry neither.
    fn check_groups(&self, elements: u64) -> Result<(), MessageError> {
        let bad = |reason: String| Err(MessageError::BadQuantisation(reason));
        if self.dtype != DType::U8 {
            if !self.scale.is_empty() || !self.zero_point.is_empty() {
                return bad(format!("dtype {} carries no scale or zero_point", self.dtype));
            }
            return Ok(());
        }
        let groups = self.scale.len() as u64;
        if groups == 0 || groups != self.zero_point.len() as u64 {
            return bad(format!("dtype u8 needs one scale and one zero point per group, got {} scales and {} zero points", self.scale.len(), self.zero_point.len()));
        }
        if !elements.is_multiple_of(groups) {
            return bad(format!("{groups} groups do not divide {elements} elements"));
        }
        // 255 steps of the scale must stay finite: the largest code's value.
        if let Some((g, s)) = self.scale.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0 && (**s * 255.0).is_finite())) {
            return bad(format!("scale {s} of group {g} is not positive and finite"));
        }
        Ok(())
    }
}

/// Refuses the first value that is not finite.
pub(crate) fn check_finite(values: &[f32]) -> Result<(), MessageError> {
    // A branch-free pass first (it vectorises); the position only on failure.
    if values.iter().fold(true, |ok, v| ok & v.is_finite()) {
        return Ok(());
    }
    let index = values.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(MessageError::NonFinite { index, value: values[index] })
}

/// The values' little-endian bytes: on a little-endian CPU their memory as
/// it is (one copy), elsewhere value by value.
fn le_bytes<T: bytemuck::Pod, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    if cfg!(target_endian = "little") {
        bytemuck::cast_slice::<T, u8>(values).to_vec()
    } else {
        values.iter().flat_map(|&v| to_le(v)).collect()
    }
}

/// The values of little-endian `bytes` (a whole number of values).
fn from_le_bytes<T: bytemuck::Pod, const N: usize>(bytes: &[u8], from_le: fn([u8; N]) -> T) -> Vec<T> {
    if cfg!(target_endian = "little") {
        // Bytes carry no alignment: copy into values, do not cast in place.
        let n = bytes.len() / N;
        let mut values = vec![T::zeroed(); n];
        bytemuck::cast_slice_mut::<T, u8>(&mut values).copy_from_slice(&bytes[..n * N]);
        values
    } else {
        bytes.chunks_exact(N).map(|b| from_le(b.try_into().expect("N bytes"))).collect()
    }
}
