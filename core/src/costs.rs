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
