//! `branchpoint calibrate`: temperature scaling on the validation split.
use anyhow::{bail, Result};
use branchpoint_core::calibration::Method;

use crate::cli::CalibrateArgs;
use crate::evaluation::{calibrate, split_logits};
use crate::{parse_device, set_threads};

pub fn run(args: CalibrateArgs) -> Result<()> {
    let method = Method::parse(&args.method)?;
    if method == Method::Uncalibrated {
        bail!("--method {}: use global or per-branch", args.method);
    }
    let device = parse_device(&args.compute.device)?;
    set_threads(args.compute.threads)?;
    let model = args.source.load_model(device)?;
    let data = args.source.load_data(&model)?;
    let logits = split_logits(&model, &data)?;
    let file = calibrate(&model, &data, method, &logits.validation)?;
    file.write(&args.out)?;

    println!("{} temperature scaling of {} on the validation split ({} inputs, split seed {}):", method.name(), args.source.model.display(), file.fit.inputs, file.fit.split_seed);
    println!("  fit: {}", file.fit.objective);
    println!("  {:<9} {:>12} {:>11} {:>10} {:>11} {:>10}", "exit", "temperature", "NLL before", "NLL after", "ECE before", "ECE after");
    for e in &file.exits {
        println!("  {:<9} {:>12.4} {:>11.4} {:>10.4} {:>11.4} {:>10.4}", e.exit, e.temperature, e.nll_before, e.nll_after, e.ece_before, e.ece_after);
    }
    println!("written to {}", args.out.display());
    Ok(())
}
