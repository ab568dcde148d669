//! Compute profile: median latency of each stage, each branch, the final
//! exit, and each partition's head and tail, at chosen batch sizes. The
//! planner's and the latency model's input.
use std::time::Instant;

use branchpoint_core::costs::{ComputeProfile, PartLatency, PartitionLatency};
use tch::{Kind, Tensor};

use crate::net::EarlyExitNet;

/// Median wall time of `f` over `repeats` runs after `repeats / 5 + 1`
/// warm-up runs, in milliseconds.
pub fn median_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..repeats / 5 + 1 {
        f();
    }
    let mut times: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Profiles `net` on random inputs of the right shapes (latency does not
/// depend on the values).
pub fn profile(net: &EarlyExitNet, batch_sizes: &[i64], repeats: usize) -> ComputeProfile {
    let arch = net.architecture();
    let dev = net.device();
    let input = arch.input.dims();
    let mut stages: Vec<PartLatency> = Vec::new();
    let mut branches: Vec<PartLatency> = Vec::new();
    let mut final_ms = Vec::new();
    let mut partitions: Vec<PartitionLatency> = arch
        .partition_points
        .iter()
        .map(|p| PartitionLatency { branch: p.branch, activation_bytes: p.activation_bytes, head_median_ms: Vec::new(), tail_median_ms: Vec::new() })
        .collect();
    for spec in &arch.stages {
        stages.push(PartLatency { name: spec.name.clone(), median_ms: Vec::new() });
    }
    for b in &arch.branches {
        branches.push(PartLatency { name: format!("branch{}", b.branch), median_ms: Vec::new() });
    }

    for &bs in batch_sizes {
        let xs = Tensor::randn([bs, input[0], input[1], input[2]], (Kind::Float, dev));
        // Each stage on the previous stage's real output shape.
        let mut x = xs.shallow_clone();
        let mut stage_outputs = Vec::new();
        for (si, stage) in stages.iter_mut().enumerate() {
            stage.median_ms.push(median_ms(repeats, || {
                let _ = net.run_stage(si, &x);
            }));
            x = net.run_stage(si, &x);
            stage_outputs.push(x.shallow_clone());
        }
        for (bi, b) in arch.branches.iter().enumerate() {
            let inp = &stage_outputs[b.after_stage - 1];
            branches[bi].median_ms.push(median_ms(repeats, || {
                let _ = net.run_branch(b.branch, inp);
            }));
        }
        final_ms.push(median_ms(repeats, || {
            let _ = net.run_final_exit(&x);
        }));
        for p in partitions.iter_mut() {
            let (_, act) = net.head(p.branch, &xs).expect("valid branch and input");
            p.head_median_ms.push(median_ms(repeats, || {
                let _ = net.head(p.branch, &xs);
            }));
            p.tail_median_ms.push(median_ms(repeats, || {
                let _ = net.tail(p.branch, &act);
            }));
        }
    }
    ComputeProfile {
        device: format!("{dev:?}"),
        torch_threads: tch::get_num_threads(),
        repeats,
        batch_sizes: batch_sizes.to_vec(),
        stages,
        branches,
        final_exit: PartLatency { name: "final".into(), median_ms: final_ms },
        partitions,
    }
}
