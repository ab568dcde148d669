//! Activation codecs: how a device shrinks an activation before the uplink,
//! and what the worker gets back.
//!
//! - `f32`: the values as they are, 4 bytes each.
//! - `f16`: rounded to the nearest binary16, 2 bytes each; values beyond
//!   f16's range are refused (`Tensor::from_f32_as_f16`).
//! - `int8`: 1 byte each, an affine map per channel of each item (dtype
//!   `u8` on the wire, with its scales and zero points). Per channel rather
//!   than per tensor because a network's channels differ in range by orders
//!   of magnitude (batch norm, ReLU), and one scale for all of them would
//!   spend its 256 levels on the widest channel and flatten the others; the
//!   scales cost 5 bytes per channel, under 2 % of an activation's codes
//!   when a channel holds at least 64 values. An activation without
//!   spatial dimensions (`[N, C]`) gets one group per item.
//!
//! Every step is plain IEEE f32 arithmetic, rounding to nearest with ties
//! to even (f16 in hardware where the CPU has it, the same bits either
//! way), so a codec gives the same bytes on every machine.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{MessageError, Tensor};

/// How a device encodes the activations it offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// 4 bytes per value, exact.
    #[default]
    F32,
    /// 2 bytes per value, rounded to binary16.
    F16,
    /// 1 byte per value, an affine map per channel.
    Int8,
}

/// Changes whenever a codec's bytes for the same values change: answers
/// recorded under a codec are keyed by it, so none computed by an older
/// codec is read back.
pub const CODEC_REVISION: u32 = 1;

impl Codec {
    /// Every codec, in the order of their bytes (most first).
    pub const ALL: [Codec; 3] = [Codec::F32, Codec::F16, Codec::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Codec::F32 => "f32",
            Codec::F16 => "f16",
            Codec::Int8 => "int8",
        }
    }

    /// Its place in `ALL`.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The activation `values` of `shape` (batch first) as the wire carries
    /// them under this codec.
    pub fn encode(self, shape: &[u32], values: &[f32]) -> Result<Tensor, MessageError> {
        match self {
            Codec::F32 => Tensor::from_f32(shape, values),
            Codec::F16 => Tensor::from_f32_as_f16(shape, values),
            Codec::Int8 => {
                let groups = int8_groups(shape, values.len());
                let per_group = values.len() / groups;
                let mut codes = Vec::with_capacity(values.len());
                let (mut scale, mut zero_point) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
                for (g, chunk) in values.chunks(per_group.max(1)).enumerate() {
                    let (s, z) = affine_params(chunk).map_err(|e| match e {
                        MessageError::NonFinite { index, value } => MessageError::NonFinite { index: g * per_group + index, value },
                        e => e,
                    })?;
                    // To the nearest code, ties to even, without a saturating
                    // float-to-int conversion (which does not vectorise):
                    // adding 2^23 to a value in [0, 255] leaves its rounded
                    // integer in the low byte of the mantissa.
                    let (inverse, zero) = (1.0 / s, f32::from(z));
                    codes.extend(chunk.iter().map(|&v| ((v * inverse + zero).clamp(0.0, 255.0) + 8_388_608.0).to_bits() as u8));
                    scale.push(s);
                    zero_point.push(z);
                }
                Tensor::from_u8_affine(shape, codes, scale, zero_point)
            }
        }
    }

    /// What a worker decodes from `encode(shape, values)`: the values after
    /// the trip over the wire.
    pub fn round_trip(self, shape: &[u32], values: &[f32]) -> Result<Vec<f32>, MessageError> {
        let mut out = Vec::with_capacity(values.len());
        self.round_trip_into(shape, values, &mut out)?;
        Ok(out)
    }

    /// `round_trip`, appended to `out` (no buffer of its own per call).
    pub fn round_trip_into(self, shape: &[u32], values: &[f32], out: &mut Vec<f32>) -> Result<(), MessageError> {
        match self {
            Codec::F32 => {
                crate::tensor::check_finite(values)?;
                out.extend_from_slice(values);
                Ok(())
            }
            _ => self.encode(shape, values)?.append_f32(out),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Codec {
    type Err = MessageError;

    fn from_str(s: &str) -> Result<Self, MessageError> {
        Codec::ALL.into_iter().find(|c| c.name() == s).ok_or_else(|| MessageError::UnknownCodec(s.to_string()))
    }
}

/// Groups of the int8 codec for `len` values of `shape`: one per channel of
/// each item when the shape has dimensions beyond [N, C], else one per item
/// (per-channel scales on single values would cost more than the values).
fn int8_groups(shape: &[u32], len: usize) -> usize {
    let groups = match shape {
        [n, c, _, ..] => *n as usize * *c as usize,
        [n, ..] => *n as usize,
        [] => 1,
    };
    if groups == 0 || !len.is_multiple_of(groups) {
        1
    } else {
        groups
    }
}

/// Scale and zero point mapping `values` onto 0..=255: the range is
/// widened to hold 0, so that 0 (a ReLU's most common output) is exact.
fn affine_params(values: &[f32]) -> Result<(f32, u8), MessageError> {
    // Eight running minima and maxima, element-wise, so the loop vectorises
    // (a single running minimum is a chain the compiler must keep in order).
    // An infinity shows in them; a NaN, which no comparison lets in, in `nan`.
    let (mut lo8, mut hi8, mut nan) = ([0f32; 8], [0f32; 8], false);
    let chunks = values.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..8 {
            lo8[j] = if c[j] < lo8[j] { c[j] } else { lo8[j] };
            hi8[j] = if c[j] > hi8[j] { c[j] } else { hi8[j] };
            nan |= c[j].is_nan();
        }
    }
    let (mut lo, mut hi) = (0f32, 0f32);
    for &v in lo8.iter().chain(rest) {
        lo = lo.min(v);
    }
    for &v in hi8.iter().chain(rest) {
        hi = hi.max(v);
    }
    if nan || !(lo.is_finite() && hi.is_finite()) || rest.iter().any(|v| v.is_nan()) {
        crate::tensor::check_finite(values)?;
    }
    let scale = (hi - lo) / 255.0;
    // All zeros: any scale codes them exactly.
    if !(scale > 0.0 && scale.is_normal()) {
        return Ok((1.0, 0));
    }
    let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    Ok((scale, zero_point))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(shape: &[u32]) -> Vec<f32> {
        let n: u32 = shape.iter().product();
        // Channels of very different ranges, some negative values.
        (0..n).map(|i| ((i % 97) as f32 - 20.0) * 0.01 * (1 + (i / 49) % 7) as f32).collect()
    }

    #[test]
    fn each_codec_round_trips_within_its_precision_and_says_its_bytes() {
        let shape = [1, 8, 7, 7];
        let v = ramp(&shape);
        for codec in Codec::ALL {
            let t = codec.encode(&shape, &v).unwrap();
            let back = t.to_f32_vec().unwrap();
            assert_eq!(back, codec.round_trip(&shape, &v).unwrap());
            assert_eq!(back.len(), v.len());
            let per_byte = match codec {
                Codec::F32 => 4,
                Codec::F16 => 2,
                Codec::Int8 => 1,
            };
            assert_eq!(t.data.len(), v.len() * per_byte, "{codec}");
            for (g, chunk) in v.chunks(49).enumerate() {
                let range = chunk.iter().fold(0f32, |m, x| m.max(x.abs())) * 2.0;
                let tolerance = match codec {
                    Codec::F32 => 0.0,
                    Codec::F16 => range * 1e-3,
                    // Half a step of 255 over the channel's range.
                    Codec::Int8 => range / 255.0 * 0.5 + 1e-6,
                };
                for (a, b) in chunk.iter().zip(&back[g * 49..(g + 1) * 49]) {
                    assert!((a - b).abs() <= tolerance, "{codec} group {g}: {a} came back as {b}");
                }
            }
        }
        let t = Codec::Int8.encode(&shape, &v).unwrap();
        assert_eq!((t.dtype, t.scale.len(), t.zero_point.len()), (crate::DType::U8, 8, 8), "a scale per channel");
    }

    #[test]
    fn int8_keeps_zero_exact_and_an_all_zero_channel_decodes_to_zeros() {
        let shape = [1, 2, 2, 2];
        let v = [0.0, 0.3, 1.7, 0.0, 0.0, 0.0, 0.0, 0.0];
        let back = Codec::Int8.round_trip(&shape, &v).unwrap();
        assert_eq!((back[0], back[3]), (0.0, 0.0));
        assert_eq!(&back[4..], &[0.0; 4]);
        assert!((back[2] - 1.7).abs() < 1e-6, "the channel's largest value is its top code");
    }

    #[test]
    fn int8_groups_follow_the_shape() {
        assert_eq!(int8_groups(&[2, 3, 4, 4], 96), 6);
        assert_eq!(int8_groups(&[2, 3], 6), 2, "no spatial dimensions: one group per item");
        assert_eq!(int8_groups(&[5], 5), 5);
    }

    #[test]
    fn codecs_by_name_and_refusals() {
        for c in Codec::ALL {
            assert_eq!(c.name().parse::<Codec>().unwrap(), c);
        }
        assert_eq!("int4".parse::<Codec>().unwrap_err(), MessageError::UnknownCodec("int4".into()));
        assert!(matches!(Codec::Int8.encode(&[1, 2], &[1.0, f32::NAN]), Err(MessageError::NonFinite { .. })));
        assert!(matches!(Codec::F16.encode(&[1], &[1e6]), Err(MessageError::NonFinite { .. })));
    }
}
