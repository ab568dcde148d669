//! A tiny seeded generator for data splits, shuffling and augmentation.
//!
//! Why our own: a split must stay the same split forever for a given seed,
//! across crate upgrades; rand's StdRng makes no such promise. SplitMix64 is
//! 10 lines, fast, and statistically fine for shuffling.

#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Exponentially distributed with the given rate (mean 1 / rate).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -(1.0 - self.next_f64()).ln() / rate
    }

    /// Uniform in `0..n` (n > 0). Lemire's multiply-shift; its bias is below
    /// 2^-32 for the sizes used here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_permutation_and_it_is_a_permutation() {
        let a = SplitMix64::new(7).permutation(1000);
        let b = SplitMix64::new(7).permutation(1000);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(a, SplitMix64::new(8).permutation(1000));
    }

    /// SplitMix64's published first output for seed 0, and one permutation.
    /// python/fmnist.py reimplements this generator to split Fashion-MNIST
    /// as models/src/data.rs does; python/test_example.py pins the same
    /// values, so the two cannot drift apart unnoticed.
    #[test]
    fn matches_the_reference_values_the_python_split_pins() {
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(SplitMix64::new(7).permutation(10), vec![9, 5, 8, 6, 1, 2, 4, 7, 0, 3]);
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(1);
        assert!((0..10_000).all(|_| r.below(5) < 5));
    }
}
