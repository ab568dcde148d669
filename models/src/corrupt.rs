//! Input shift on tensors: the pure core's seeded corruptions
//! (`branchpoint_core::corrupt`) applied to a split's standardised images.
use branchpoint_core::corrupt::Corruption;
use tch::{Kind, Tensor};

use crate::data::Normalization;
use crate::error::{ModelError, Result};

/// Corrupts standardised images `[N, C, H, W]` (as `Dataset` holds them):
/// image `first_index + i` draws its noise from `seed` and its index only,
/// so the same seed gives the same bits on every machine and in any batch.
pub fn apply(corruption: &Corruption, images: &Tensor, norm: &Normalization, seed: u64, first_index: u64) -> Result<Tensor> {
    let size = images.size();
    let [n, c, h, w] = <[i64; 4]>::try_from(size.as_slice())
        .map_err(|_| ModelError::InvalidArgument { what: "images to corrupt".into(), reason: format!("shape {size:?}; expected [N, C, H, W]") })?;
    let flat = images.to_kind(Kind::Float).contiguous().view([-1]);
    let mut data = Vec::<f32>::try_from(&flat).map_err(|e| ModelError::InvalidArgument { what: "images to corrupt".into(), reason: e.to_string() })?;
    corruption.apply_standardised(&mut data, [c as usize, h as usize, w as usize], &norm.mean, &norm.std, seed, first_index)?;
    Ok(Tensor::from_slice(&data).view([n, c, h, w]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchpoint_core::corrupt::CorruptionKind;
    use branchpoint_core::rng::SplitMix64;

    #[test]
    fn seeded_per_image_and_independent_of_the_batch() {
        let norm = Normalization { mean: vec![0.3], std: vec![0.35] };
        let mut rng = SplitMix64::new(4);
        let images: Vec<f32> = (0..6 * 784).map(|_| rng.next_f64() as f32).collect();
        let t = Tensor::from_slice(&images).view([6, 1, 28, 28]);
        let c = Corruption::new(CorruptionKind::GaussianNoise, 3).unwrap();
        let all = apply(&c, &t, &norm, 42, 0).unwrap();
        assert!(all.equal(&apply(&c, &t, &norm, 42, 0).unwrap()), "same seed, same bits");
        assert!(!all.equal(&apply(&c, &t, &norm, 43, 0).unwrap()), "another seed, other noise");
        // Images 2..6 corrupted on their own, told their index, match.
        let tail = apply(&c, &t.narrow(0, 2, 4), &norm, 42, 2).unwrap();
        assert!(tail.equal(&all.narrow(0, 2, 4)));
        assert!(apply(&c, &t.view([6, 784]), &norm, 42, 0).is_err(), "shape checked");
        assert!(apply(&c, &t, &Normalization { mean: vec![0.3, 0.3], std: vec![0.3, 0.3] }, 42, 0).is_err(), "channels checked");
    }
}
