//! `branchpoint profile`: median latency of each stage, branch and partition
//! at the requested batch sizes, and the activation bytes at each partition.
use anyhow::{bail, Context, Result};
use branchpoint_models::profile::profile;
use branchpoint_models::Model;

use crate::cli::ProfileArgs;
use crate::{parse_device, set_threads};

pub fn run(args: ProfileArgs) -> Result<()> {
    if args.batch_sizes.is_empty() || args.batch_sizes.iter().any(|&b| b < 1) {
        bail!("--batch-sizes {:?}: give one or more positive batch sizes", args.batch_sizes);
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let device = parse_device(&args.device)?;
    set_threads(args.threads)?;
    let model = Model::load(&args.model, device)?;
    let p = profile(&model, &args.batch_sizes, args.repeats)?;

    let cols: Vec<String> = p.batch_sizes.iter().map(|b| format!("batch {b:>3} ms")).collect();
    println!("{} on {} with {} torch thread(s), median of {} runs", args.model.display(), p.device, p.torch_threads, p.repeats);
    println!("  {:<22} {}", "part", cols.join("  "));
    let row = |name: &str, ms: &[f64]| {
        let v: Vec<String> = ms.iter().map(|m| format!("{m:>12.4}")).collect();
        println!("  {name:<22} {}", v.join("  "));
    };
    // An imported model's profile has heads and tails only (its modules are whole heads and tails).
    for s in &p.stages {
        row(&s.name, &s.median_ms);
    }
    for b in &p.branches {
        row(&b.name, &b.median_ms);
    }
    if !p.final_exit.median_ms.is_empty() {
        row(&p.final_exit.name, &p.final_exit.median_ms);
    }
    println!("  partitions (device head = stages up to the branch + the branch; cloud tail = the rest):");
    for part in &p.partitions {
        row(&format!("branch {} head", part.branch), &part.head_median_ms);
        row(&format!("branch {} tail", part.branch), &part.tail_median_ms);
        println!("  {:<22} {} bytes per input (f32)", format!("branch {} activation", part.branch), part.activation_bytes);
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&p)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("profile written to {}", path.display());
    }
    Ok(())
}
