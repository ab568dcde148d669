//! `branchpoint trace`: writes a synthetic cellular uplink trace, so that a
//! trace scenario runs on a machine without recorded traces.
use anyhow::{Context, Result};
use branchpoint_core::link::SyntheticTrace;

use crate::cli::TraceArgs;

pub fn run(args: TraceArgs) -> Result<()> {
    let cfg = SyntheticTrace {
        seed: args.seed,
        duration_s: args.duration_s,
        good_mbit_s: args.good_mbit_s,
        bad_mbit_s: args.bad_mbit_s,
        mean_good_s: args.mean_good_s,
        mean_bad_s: args.mean_bad_s,
        outage: args.outage,
    };
    let text = cfg.generate().context("trace settings")?;
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{} delivery opportunities over {} s written to {}", text.lines().count(), args.duration_s, args.out.display());
    Ok(())
}
