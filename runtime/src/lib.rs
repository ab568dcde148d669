//! The `branchpoint` binary's library: CLI definition and commands. The
//! binary (`main.rs`) only parses arguments and calls `run`.
pub mod cli;
pub mod cmd;
pub mod evaluation;
pub mod nats;
pub mod plots;
pub mod scenario;

use anyhow::{bail, Result};
use tch::Device;

pub fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Train(args) => cmd::train::run(args),
        cli::Command::Calibrate(args) => cmd::calibrate::run(args),
        cli::Command::Evaluate(args) => cmd::evaluate::run(args),
        cli::Command::Profile(args) => cmd::profile::run(args),
        cli::Command::Worker(args) => cmd::worker::run(args),
        cli::Command::Fleet(args) => cmd::fleet::run(args),
        cli::Command::Calibrator(args) => cmd::calibrator::run(args),
        cli::Command::Run(args) => cmd::run::run(args),
        cli::Command::Trace(args) => cmd::trace::run(args),
    }
}

/// Parses `--device` and checks that libtorch can use it.
pub fn parse_device(name: &str) -> Result<Device> {
    let device = match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").and_then(|i| i.parse::<usize>().ok()) {
            Some(i) => Device::Cuda(i),
            None => bail!("unknown --device {other:?}; use cpu, cuda or cuda:N"),
        },
    };
    if let Device::Cuda(i) = device {
        let count = tch::Cuda::device_count() as usize;
        if i >= count {
            bail!(
                "--device {name}: libtorch sees {count} CUDA device(s); use --device cpu, \
                 or run on a machine with a GPU and its driver"
            );
        }
    }
    Ok(device)
}

/// Applies `--threads` (0 keeps libtorch's default).
pub fn set_threads(threads: i32) -> Result<()> {
    if threads < 0 {
        bail!("--threads {threads}: use 0 (libtorch's default) or a positive count");
    }
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    Ok(())
}

impl cli::ModelArgs {
    /// Loads the model through its card.
    pub fn load_model(&self, device: Device) -> Result<branchpoint_models::LoadedModel> {
        Ok(branchpoint_models::load_model(&self.model, device)?)
    }

    /// Loads the model's dataset with the split its card records, so the
    /// validation and test inputs are the ones held out when it was trained.
    pub fn load_data(&self, model: &branchpoint_models::LoadedModel) -> Result<branchpoint_models::Dataset> {
        let c = &model.card;
        let dir = self.data_dir.clone().unwrap_or_else(|| c.dataset.name.default_dir());
        Ok(branchpoint_models::Dataset::load(c.dataset.name, &dir, c.dataset.split.validation, c.dataset.split.seed)?)
    }
}
