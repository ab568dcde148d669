//! Compute profile: median latency of each stage, each branch, the final
//! exit, and each partition's head and tail, at chosen batch sizes. The
//! planner's and the latency model's input.
use std::time::Instant;

use branchpoint_core::costs::{ComputeProfile, PartLatency, PartitionLatency};
use tch::{Kind, Tensor};

use crate::error::Result;
use crate::model::Model;
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

/// Profiles `model` on random inputs of the right shapes (latency does not
/// depend on the values): every partition's head and tail, and for the
/// built-in network each stage, branch and the final exit alone (an
/// imported model's modules are whole heads and tails, so its profile has
/// no per-stage rows).
pub fn profile(model: &Model, batch_sizes: &[i64], repeats: usize) -> Result<ComputeProfile> {
    let dev = model.device();
    let input = model.input().dims();
    let mut partitions: Vec<PartitionLatency> = model
        .partition_points()
        .iter()
        .map(|p| PartitionLatency { branch: p.branch, activation_bytes: p.activation_bytes, head_median_ms: Vec::new(), tail_median_ms: Vec::new() })
        .collect();
    let (mut stages, mut branches, mut final_ms) = (Vec::new(), Vec::new(), Vec::new());
    for &bs in batch_sizes {
        let xs = Tensor::randn([bs, input[0], input[1], input[2]], (Kind::Float, dev));
        if let Model::Builtin(m) = model {
            let parts = parts_of(&m.net, &xs, repeats);
            stages.push(parts.stages);
            branches.push(parts.branches);
            final_ms.push(parts.final_ms);
        }
        for p in partitions.iter_mut() {
            let (_, act) = model.head(p.branch, &xs)?;
            p.head_median_ms.push(median_ms(repeats, || {
                let _ = model.head(p.branch, &xs);
            }));
            p.tail_median_ms.push(median_ms(repeats, || {
                let _ = model.tail(p.branch, &act);
            }));
        }
    }
    // Rows per part, one median per batch size.
    let rows = |names: Vec<String>, per_batch: &[Vec<f64>]| -> Vec<PartLatency> {
        names.into_iter().enumerate().map(|(i, name)| PartLatency { name, median_ms: per_batch.iter().map(|b| b[i]).collect() }).collect()
    };
    let (stage_rows, branch_rows) = match model {
        Model::Builtin(m) => {
            let arch = m.net.architecture();
            (rows(arch.stages.iter().map(|s| s.name.clone()).collect(), &stages), rows(arch.branches.iter().map(|b| format!("branch{}", b.branch)).collect(), &branches))
        }
        Model::Imported(_) => (Vec::new(), Vec::new()),
    };
    Ok(ComputeProfile {
        device: format!("{dev:?}"),
        torch_threads: tch::get_num_threads(),
        repeats,
        batch_sizes: batch_sizes.to_vec(),
        stages: stage_rows,
        branches: branch_rows,
        final_exit: PartLatency { name: "final".into(), median_ms: final_ms },
        partitions,
    })
}

/// The built-in network's parts alone at one batch size: each stage on the
/// previous stage's real output, each branch on its stage's output, the
/// final exit on the last stage's.
struct Parts {
    stages: Vec<f64>,
    branches: Vec<f64>,
    final_ms: f64,
}

fn parts_of(net: &EarlyExitNet, xs: &Tensor, repeats: usize) -> Parts {
    let mut x = xs.shallow_clone();
    let mut stage_outputs = Vec::new();
    let mut stages = Vec::new();
    for si in 0..net.num_stages() {
        stages.push(median_ms(repeats, || {
            let _ = net.run_stage(si, &x);
        }));
        x = net.run_stage(si, &x);
        stage_outputs.push(x.shallow_clone());
    }
    let branches = net
        .architecture()
        .branches
        .iter()
        .map(|b| {
            let inp = &stage_outputs[b.after_stage - 1];
            median_ms(repeats, || {
                let _ = net.run_branch(b.branch, inp);
            })
        })
        .collect();
    let final_ms = median_ms(repeats, || {
        let _ = net.run_final_exit(&x);
    });
    Parts { stages, branches, final_ms }
}
