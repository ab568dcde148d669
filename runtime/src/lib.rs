//! The `branchpoint` binary's library: CLI definition and commands. The
//! binary (`main.rs`) only parses arguments and calls `run`.
pub mod api;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod evaluation;
pub mod nats;
pub mod plots;
pub mod roles;
pub mod scenario;
pub mod shutdown;

use anyhow::{bail, Result};
use tch::Device;

/// Parses the command line, layered over the configuration file and the
/// environment (see `config`).
pub fn parse_with_config(args: Vec<std::ffi::OsString>) -> Result<cli::Cli, ParseFailure> {
    use clap::{CommandFactory, FromArgMatches};
    let command = cli::Cli::command();
    let matches = command.clone().try_get_matches_from(args.clone()).map_err(ParseFailure::Clap)?;
    let explicit = matches.get_one::<std::path::PathBuf>("config").cloned();
    let settings = config::config_file(explicit).and_then(|file| config::load(file.as_deref(), std::env::vars())).map_err(ParseFailure::Config)?;
    let args = config::merged_args(&command, &matches, args, &settings).map_err(ParseFailure::Config)?;
    let matches = command.try_get_matches_from(args).map_err(|e| {
        if settings.is_empty() {
            ParseFailure::Clap(e)
        } else {
            ParseFailure::Config(anyhow::anyhow!(config::explain(&e, &settings)))
        }
    })?;
    cli::Cli::from_arg_matches(&matches).map_err(ParseFailure::Clap)
}

/// Why the command line could not be parsed.
pub enum ParseFailure {
    /// clap's own errors, help and version included: clap prints them.
    Clap(clap::Error),
    /// The configuration was wrong.
    Config(anyhow::Error),
}

pub fn run(cli: cli::Cli) -> Result<()> {
    match cli.command {
        cli::Command::Train(args) => cmd::train::run(args),
        cli::Command::Calibrate(args) => cmd::calibrate::run(args),
        cli::Command::Evaluate(args) => cmd::evaluate::run(args),
        cli::Command::Profile(args) => cmd::profile::run(args),
        cli::Command::Codecs(args) => cmd::codecs::run(args),
        cli::Command::Worker(args) => cmd::worker::run(args),
        cli::Command::Fleet(args) => cmd::fleet::run(*args),
        cli::Command::Calibrator(args) => cmd::calibrator::run(args),
        cli::Command::Planner(args) => cmd::planner::run(args),
        cli::Command::Run(args) => cmd::run::run(args),
        cli::Command::Trace(args) => cmd::trace::run(args),
        cli::Command::Serve(args) => cmd::serve::run(args),
        cli::Command::Stack(args) => cmd::stack::run(args),
        cli::Command::NatsConfig(args) => cmd::nats_config::run(args),
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
    /// Loads the model through its card (a built-in or an imported one).
    pub fn load_model(&self, device: Device) -> Result<branchpoint_models::Model> {
        Ok(branchpoint_models::Model::load(&self.model, device)?)
    }

    /// Loads the validation and test inputs the model's card names: for a
    /// built-in dataset, with the split its card records, so the
    /// validation inputs are the ones held out when it was trained.
    pub fn load_data(&self, model: &branchpoint_models::Model) -> Result<branchpoint_models::ModelData> {
        Ok(model.load_data(self.data_dir.as_deref())?)
    }
}
