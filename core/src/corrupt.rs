//! Input shift: seeded, deterministic corruptions of images, in the spirit
//! of CIFAR-10-C / ImageNet-C (Hendrycks and Dietterich, ICLR 2019), for
//! scenarios in which a group's inputs change from some point in time (a
//! dirty lens, night, a new product line).
//!
//! Corruptions are computed in plain Rust on `[0, 1]` pixels, not with tensor
//! ops: the same seed gives the same bits on every machine, and each image's
//! noise depends only on the seed and the image's index, never on which
//! other images share the batch. Severities 1 to 5 use CIFAR-10-C's
//! parameters for the four kinds offered here.
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::rng::SplitMix64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CorruptionKind {
    /// Additive Gaussian noise, sigma 0.04 to 0.10.
    GaussianNoise,
    /// Gaussian blur, sigma 0.4 to 1.0 pixels.
    GaussianBlur,
    /// Contrast loss: each image's deviation from its mean scaled by 0.75
    /// down to 0.15.
    Contrast,
    /// Brightness: +0.05 to +0.30.
    Brightness,
}

pub const KINDS: [CorruptionKind; 4] = [CorruptionKind::GaussianNoise, CorruptionKind::GaussianBlur, CorruptionKind::Contrast, CorruptionKind::Brightness];

impl CorruptionKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::GaussianNoise => "gaussian-noise",
            Self::GaussianBlur => "gaussian-blur",
            Self::Contrast => "contrast",
            Self::Brightness => "brightness",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        KINDS
            .into_iter()
            .find(|k| k.name() == name)
            .ok_or_else(|| CoreError::InvalidArgument { what: "corruption".into(), reason: format!("{name:?}; use one of {}", KINDS.map(|k| k.name()).join(", ")) })
    }

    /// The parameter at `severity` (1 to 5).
    fn parameter(self, severity: u8) -> f32 {
        let table: [f32; 5] = match self {
            Self::GaussianNoise => [0.04, 0.06, 0.08, 0.09, 0.10],
            Self::GaussianBlur => [0.4, 0.6, 0.7, 0.8, 1.0],
            Self::Contrast => [0.75, 0.5, 0.4, 0.3, 0.15],
            Self::Brightness => [0.05, 0.1, 0.15, 0.2, 0.3],
        };
        table[usize::from(severity.clamp(1, 5)) - 1]
    }
}

/// One corruption at one severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Corruption {
    pub kind: CorruptionKind,
    pub severity: u8,
}

impl Corruption {
    pub fn new(kind: CorruptionKind, severity: u8) -> Result<Self> {
        if !(1..=5).contains(&severity) {
            return Err(CoreError::InvalidArgument { what: format!("{} severity", kind.name()), reason: format!("{severity}; use 1 to 5") });
        }
        Ok(Self { kind, severity })
    }

    /// Parses `KIND:SEVERITY`, e.g. `gaussian-noise:3`.
    pub fn parse(text: &str) -> Result<Self> {
        let (kind, severity) = text
            .split_once(':')
            .ok_or_else(|| CoreError::InvalidArgument { what: "corruption".into(), reason: format!("{text:?}; write KIND:SEVERITY, e.g. gaussian-noise:3") })?;
        let severity =
            severity.parse::<u8>().map_err(|_| CoreError::InvalidArgument { what: "corruption severity".into(), reason: format!("{severity:?} in {text:?}; use 1 to 5") })?;
        Self::new(CorruptionKind::parse(kind)?, severity)
    }

    /// Corrupts one image of `[0, 1]` pixels laid out as `[C, H, W]`, in
    /// place; `rng` supplies its noise.
    pub fn apply_pixels(&self, pixels: &mut [f32], shape: [usize; 3], rng: &mut SplitMix64) {
        let [c, h, w] = shape;
        debug_assert_eq!(pixels.len(), c * h * w);
        let p = self.kind.parameter(self.severity);
        match self.kind {
            CorruptionKind::GaussianNoise => {
                for v in pixels.iter_mut() {
                    *v += p * standard_normal(rng) as f32;
                }
            }
            CorruptionKind::GaussianBlur => {
                for plane in pixels.chunks_mut(h * w) {
                    blur_plane(plane, h, w, p);
                }
            }
            CorruptionKind::Contrast => {
                for plane in pixels.chunks_mut(h * w) {
                    let mean = plane.iter().map(|&v| f64::from(v)).sum::<f64>() / plane.len() as f64;
                    let mean = mean as f32;
                    for v in plane.iter_mut() {
                        *v = (*v - mean) * p + mean;
                    }
                }
            }
            CorruptionKind::Brightness => {
                for v in pixels.iter_mut() {
                    *v += p;
                }
            }
        }
        for v in pixels.iter_mut() {
            *v = v.clamp(0.0, 1.0);
        }
    }

    /// Corrupts standardised images laid out as `[N, C, H, W]` (`shape` is
    /// `[C, H, W]`), in place: back to `[0, 1]` pixels with the channels'
    /// `mean` and `std`, corrupt, standardise again. Image `first_index + i`
    /// draws its noise from `seed` and its index only.
    pub fn apply_standardised(&self, data: &mut [f32], shape: [usize; 3], mean: &[f64], std: &[f64], seed: u64, first_index: u64) -> Result<()> {
        let [c, h, w] = shape;
        if c != mean.len() || std.len() != mean.len() {
            return Err(CoreError::InvalidArgument { what: "images to corrupt".into(), reason: format!("{c} channels but the normalisation has {}", mean.len()) });
        }
        let plane = h * w;
        if plane == 0 || !data.len().is_multiple_of(c * plane) {
            return Err(CoreError::InvalidArgument { what: "images to corrupt".into(), reason: format!("{} values are not whole images of {shape:?}", data.len()) });
        }
        for (i, image) in data.chunks_mut(c * plane).enumerate() {
            // Standardised -> [0, 1], channel by channel.
            for (ch, px) in image.chunks_mut(plane).enumerate() {
                let (m, s) = (mean[ch] as f32, std[ch] as f32);
                px.iter_mut().for_each(|v| *v = *v * s + m);
            }
            let mut rng = SplitMix64::new(image_seed(seed, first_index + i as u64));
            self.apply_pixels(image, shape, &mut rng);
            for (ch, px) in image.chunks_mut(plane).enumerate() {
                let (m, s) = (mean[ch] as f32, std[ch] as f32);
                px.iter_mut().for_each(|v| *v = (*v - m) / s);
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (severity {})", self.kind.name(), self.severity)
    }
}

/// The seed of one image's noise: its index mixed into the corruption's seed.
fn image_seed(seed: u64, index: u64) -> u64 {
    let mut mix = SplitMix64::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    mix.next_u64()
}

/// A standard normal draw (Box-Muller; one of the pair is discarded, which
/// keeps each draw a function of the generator's state only).
fn standard_normal(rng: &mut SplitMix64) -> f64 {
    let u1 = 1.0 - rng.next_f64(); // in (0, 1]: ln is finite
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Separable Gaussian blur of one `h x w` plane, edges clamped.
fn blur_plane(plane: &mut [f32], h: usize, w: usize, sigma: f32) {
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius).map(|d| (-((d * d) as f32) / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut rows = vec![0f32; plane.len()];
    for y in 0..h {
        for x in 0..w {
            rows[y * w + x] = kernel.iter().enumerate().map(|(k, &kv)| kv * plane[y * w + clamp(x as isize + k as isize - radius, w)]).sum();
        }
    }
    for y in 0..h {
        for x in 0..w {
            plane[y * w + x] = kernel.iter().enumerate().map(|(k, &kv)| kv * rows[clamp(y as isize + k as isize - radius, h) * w + x]).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(rng: &mut SplitMix64) -> Vec<f32> {
        (0..28 * 28).map(|_| 0.2 + 0.6 * rng.next_f64() as f32).collect()
    }

    fn mean_std(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        (m, (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / n).sqrt())
    }

    const SHAPE: [usize; 3] = [1, 28, 28];

    #[test]
    fn each_kind_does_what_it_says() {
        let clean = image(&mut SplitMix64::new(1));
        let (m0, s0) = mean_std(&clean);
        let run = |kind, severity| {
            let mut v = clean.clone();
            Corruption::new(kind, severity).unwrap().apply_pixels(&mut v, SHAPE, &mut SplitMix64::new(9));
            v
        };
        // Contrast: the deviation from the mean scales by the parameter
        // (nothing is clamped: pixels stay inside [0.2, 0.8]).
        let (m, s) = mean_std(&run(CorruptionKind::Contrast, 2));
        assert!((m - m0).abs() < 1e-5 && (s / s0 - 0.5).abs() < 1e-4, "{m} {s} vs {m0} {s0}");
        // Brightness: every pixel moves up by 0.15.
        let bright = run(CorruptionKind::Brightness, 3);
        assert!(bright.iter().zip(&clean).all(|(b, c)| (b - c - 0.15).abs() < 1e-6));
        // Noise: the difference has standard deviation sigma (0.10 at 5),
        // mean about 0 (784 draws: standard error 0.0036).
        let noisy = run(CorruptionKind::GaussianNoise, 5);
        let diff: Vec<f32> = noisy.iter().zip(&clean).map(|(a, b)| a - b).collect();
        let (dm, ds) = mean_std(&diff);
        assert!(dm.abs() < 0.015 && (ds - 0.10).abs() < 0.01, "{dm} {ds}");
        // Blur: keeps a constant image, and smooths: less spread, mean kept.
        let mut flat = vec![0.5f32; 28 * 28];
        Corruption::new(CorruptionKind::GaussianBlur, 5).unwrap().apply_pixels(&mut flat, SHAPE, &mut SplitMix64::new(0));
        assert!(flat.iter().all(|&v| (v - 0.5).abs() < 1e-6));
        let (bm, bs) = mean_std(&run(CorruptionKind::GaussianBlur, 5));
        assert!((bm - m0).abs() < 0.01 && bs < 0.6 * s0, "{bm} {bs} vs {m0} {s0}");
        // Stronger is further from the clean image, for every kind.
        for kind in KINDS {
            let dist = |v: &[f32]| v.iter().zip(&clean).map(|(a, b)| f64::from(a - b).powi(2)).sum::<f64>();
            let d: Vec<f64> = (1..=5).map(|s| dist(&run(kind, s))).collect();
            assert!(d.windows(2).all(|p| p[0] < p[1]), "{}: {d:?}", kind.name());
        }
    }

    #[test]
    fn pixels_stay_in_range() {
        let mut v: Vec<f32> = (0..784).map(|i| if i % 2 == 0 { 0.0 } else { 1.0 }).collect();
        for kind in KINDS {
            Corruption::new(kind, 5).unwrap().apply_pixels(&mut v, SHAPE, &mut SplitMix64::new(3));
            assert!(v.iter().all(|x| (0.0..=1.0).contains(x)), "{}", kind.name());
        }
    }

    #[test]
    fn names_and_severities_are_checked() {
        for kind in KINDS {
            assert_eq!(CorruptionKind::parse(kind.name()).unwrap(), kind);
        }
        let e = CorruptionKind::parse("fog").unwrap_err().to_string();
        assert!(e.contains("gaussian-noise") && e.contains("fog"), "{e}");
        assert!(Corruption::new(CorruptionKind::Contrast, 0).is_err() && Corruption::new(CorruptionKind::Contrast, 6).is_err());
        assert_eq!(Corruption::parse("contrast:4").unwrap(), Corruption { kind: CorruptionKind::Contrast, severity: 4 });
        for bad in ["contrast", "contrast:x", "contrast:9", "fog:2", ""] {
            assert!(Corruption::parse(bad).is_err(), "{bad}");
        }
    }
}
