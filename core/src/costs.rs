//! Compute costs: the median latency of each stage, each branch, the final
//! exit, and each partition's head and tail, at chosen batch sizes, as
//! measured by `branchpoint profile` (models::profile). The planner's and the
//! latency model's input.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ComputeProfile {
    pub device: String,
    pub torch_threads: i32,
    pub repeats: usize,
    pub batch_sizes: Vec<i64>,
    pub stages: Vec<PartLatency>,
    pub branches: Vec<PartLatency>,
    pub final_exit: PartLatency,
    pub partitions: Vec<PartitionLatency>,
}

/// Median latency of one part at each batch size (same order as
/// `ComputeProfile::batch_sizes`), in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartLatency {
    pub name: String,
    pub median_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionLatency {
    pub branch: usize,
    pub activation_bytes: usize,
    /// Device side: stages up to the branch, plus the branch.
    pub head_median_ms: Vec<f64>,
    /// Cloud side: remaining stages plus the final exit.
    pub tail_median_ms: Vec<f64>,
}

/// Time of a batch of `n` from measured `(batch size, µs)` points in
/// ascending batch order: linear between them and beyond them, at least
/// 1 µs; proportional to the one point there is. The replay's workers take
/// this long, and so do a live replay's (`Executor::start_paced`).
pub fn batch_time_us(points: &[(usize, f64)], n: usize) -> f64 {
    match points {
        [] => 0.0,
        [(b, t)] => t * n as f64 / (*b).max(1) as f64,
        _ => {
            let i = points.partition_point(|&(b, _)| b < n).clamp(1, points.len() - 1);
            let ((b0, t0), (b1, t1)) = (points[i - 1], points[i]);
            (t0 + (t1 - t0) * (n as f64 - b0 as f64) / (b1 as f64 - b0 as f64)).max(1.0)
        }
    }
}
