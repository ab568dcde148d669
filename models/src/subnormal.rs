//! Subnormal floats kept out of the compute path.
//!
//! Subnormal floats (nonzero, below `f32::MIN_POSITIVE` in magnitude) take a
//! microcode slow path on some CPUs, this workplace's Xeons with AVX-512 and
//! AMX among them: a 3x3 convolution ran 100x slower on subnormal inputs.
//! Training with weight decay leaves such weights behind, and activations
//! computed from them are subnormal too. So results would depend on the CPU
//! they meet. Two defences, both needed:
//!
//! - Every thread that runs tensors calls [`flush_subnormals`] where it
//!   starts: the CPU then flushes subnormal results to zero (FTZ) and reads
//!   subnormal inputs as zero (DAZ). The setting is per thread (MXCSR on
//!   x86-64, FPCR on aarch64), and threads inherit it from the thread that
//!   spawns them, libtorch's own intra-op threads included, so the binary
//!   also sets it first thing in `main`.
//! - Weights files hold no subnormal values: training zeroes them
//!   ([`zero_subnormal_weights`]) before it saves, and a test checks every
//!   shipped file ([`count_in_safetensors`]).
//!
//! Subnormals are found by their bit patterns, never by comparing floats:
//! under DAZ a subnormal compares equal to zero.
use std::path::Path;

use tch::{nn, Kind, Tensor};

use crate::error::{ModelError, Result};

/// Turns on flush-to-zero and denormals-are-zero for the calling thread.
/// Returns false on a CPU architecture where this build cannot (then
/// subnormals cost whatever that CPU makes them cost).
pub fn flush_subnormals() -> bool {
    imp::set(true)
}

/// Turns flushing on or off for the calling thread. Off is libtorch's (and
/// the CPU's) default; only benchmarks that show what flushing saves want it.
pub fn set_flush_subnormals(on: bool) -> bool {
    imp::set(on)
}

/// Whether the calling thread flushes subnormals (for tests and reports).
pub fn subnormals_flushed() -> bool {
    imp::get()
}

/// Turns on [`flush_subnormals`] and sets libtorch's intra-op thread count
/// (an OpenMP setting, also per thread): what every thread that runs
/// tensors does before its first forward.
pub fn prepare_tensor_thread(intra_op_threads: i32) {
    flush_subnormals();
    if intra_op_threads > 0 {
        tch::set_num_threads(intra_op_threads);
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    // MXCSR: bit 15 flush-to-zero, bit 6 denormals-are-zero.
    const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

    fn read() -> u32 {
        let mut csr: u32 = 0;
        // SAFETY: stmxcsr stores the SSE control register into `csr`.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        csr
    }

    pub fn set(on: bool) -> bool {
        let csr = if on { read() | FTZ_DAZ } else { read() & !FTZ_DAZ };
        // SAFETY: ldmxcsr loads a value read from the register with two mode
        // bits changed; it changes only how this thread treats subnormals.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
        true
    }

    pub fn get() -> bool {
        read() & FTZ_DAZ == FTZ_DAZ
    }
}

#[cfg(target_arch = "aarch64")]
mod imp {
    // FPCR bit 24 (FZ) flushes subnormal inputs and results alike.
    const FZ: u64 = 1 << 24;

    fn read() -> u64 {
        let fpcr: u64;
        // SAFETY: reads the floating-point control register.
        unsafe { std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        fpcr
    }

    pub fn set(on: bool) -> bool {
        let fpcr = if on { read() | FZ } else { read() & !FZ };
        // SAFETY: writes back the register with the flush bit changed.
        unsafe { std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack, preserves_flags)) };
        true
    }

    pub fn get() -> bool {
        read() & FZ == FZ
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod imp {
    pub fn set(_on: bool) -> bool {
        false
    }

    pub fn get() -> bool {
        false
    }
}

/// Elementwise: whether each value of a floating-point tensor is subnormal,
/// from its bits. `None` for tensors that are not floating point.
fn subnormal_mask(t: &Tensor) -> Option<Tensor> {
    // (integer view, exponent bits, mantissa bits) per kind.
    let (view, exponent, mantissa): (Kind, i64, i64) = match t.kind() {
        Kind::Float => (Kind::Int, 0x7f80_0000, 0x007f_ffff),
        Kind::Double => (Kind::Int64, 0x7ff0_0000_0000_0000, 0x000f_ffff_ffff_ffff),
        Kind::Half => (Kind::Int16, 0x7c00, 0x03ff),
        Kind::BFloat16 => (Kind::Int16, 0x7f80, 0x007f),
        _ => return None,
    };
    let bits = t.detach().contiguous().view_dtype(view);
    Some(bits.bitwise_and(exponent).eq(0).logical_and(&bits.bitwise_and(mantissa).ne(0)))
}

/// How many values of `t` are subnormal (0 for tensors that are not
/// floating point).
pub fn count(t: &Tensor) -> usize {
    subnormal_mask(t).map_or(0, |m| m.sum(Kind::Int64).int64_value(&[]) as usize)
}

/// Sets every subnormal weight (and batch-norm statistic) of `vs` to zero;
/// returns how many there were. The network's outputs move by far less than
/// float rounding: a subnormal weight times any activation the network
/// computes is below 1e-30.
pub fn zero_subnormal_weights(vs: &nn::VarStore) -> usize {
    tch::no_grad(|| {
        let mut zeroed = 0;
        for (_, mut var) in vs.variables() {
            if let Some(mask) = subnormal_mask(&var) {
                zeroed += mask.sum(Kind::Int64).int64_value(&[]) as usize;
                let _ = var.masked_fill_(&mask, 0.0);
            }
        }
        zeroed
    })
}

/// The subnormal values of each tensor of a safetensors file, by tensor
/// name (only tensors that have some).
pub fn count_in_safetensors(path: &Path) -> Result<Vec<(String, usize)>> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| ModelError::WeightsMismatch { path: path.to_path_buf(), reason: format!("not a readable safetensors file ({e})") })?;
    let mut found: Vec<(String, usize)> = tensors.iter().map(|(name, t)| (name.clone(), count(t))).filter(|(_, n)| *n > 0).collect();
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnormals_are_found_by_their_bits_even_while_flushed() {
        flush_subnormals();
        let tiny = f32::from_bits(1); // the smallest subnormal
        let values = [0.0, -0.0, tiny, -tiny, f32::MIN_POSITIVE, 1.0, f32::from_bits(0x007f_ffff), f32::NAN, f32::INFINITY];
        let t = Tensor::from_slice(&values);
        assert_eq!(count(&t), 3);
        assert_eq!(count(&t.to_kind(Kind::Double)), 0, "widened to f64 they are normal");
        assert_eq!(count(&Tensor::from_slice(&[f64::from_bits(1), 1.0])), 1);
        assert_eq!(count(&Tensor::from_slice(&[1i64, 0])), 0, "integers have no subnormals");
    }

    #[test]
    fn flushing_is_a_per_thread_setting_that_new_threads_inherit() {
        let fresh = std::thread::spawn(subnormals_flushed).join().unwrap();
        let prepared = std::thread::spawn(|| {
            assert!(flush_subnormals(), "this build supports flushing on this CPU architecture");
            let inherited = std::thread::spawn(subnormals_flushed).join().unwrap();
            // A subnormal input reads as zero, a subnormal result becomes zero.
            let x = std::hint::black_box(f32::from_bits(1));
            let halved = std::hint::black_box(f32::MIN_POSITIVE) / std::hint::black_box(2.0f32);
            // Compared by bits: under DAZ a subnormal also compares equal to 0.
            let read = x * std::hint::black_box(1.0f32);
            (subnormals_flushed(), inherited, read.to_bits() == 0, halved.to_bits() == 0)
        })
        .join()
        .unwrap();
        assert_eq!(prepared, (true, true, true, true), "fresh thread flushed: {fresh}");
    }

    #[test]
    fn zeroing_leaves_normal_weights_alone() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.5f32, f32::from_bits(7), -2.0, -f32::from_bits(0x0040_0000)]));
        assert_eq!(zero_subnormal_weights(&vs), 2);
        assert_eq!(Vec::<f32>::try_from(&w).unwrap(), vec![1.5, 0.0, -2.0, 0.0]);
        assert_eq!(zero_subnormal_weights(&vs), 0);
    }
}
