//! Command-line interface. Every flag carries help text; a test checks it.
use std::path::PathBuf;

use branchpoint_messages::PartitionBranch;
use clap::{Args, Parser, Subcommand};

/// The model the project ships; every command that reads a model defaults to it.
pub const DEFAULT_MODEL: &str = "models/balexnet-fmnist.safetensors";

#[derive(Debug, Parser)]
#[command(
    name = "branchpoint",
    version,
    about = "Calibrated early-exit offloading of deep-network inference from edge devices to the cloud",
    long_about = "branchpoint runs an early-exit network split between devices and cloud workers: \
                  each device answers when its side branch is confident enough (max softmax >= p_tar) \
                  and offloads the intermediate activation otherwise."
)]
pub struct Cli {
    /// Configuration file (TOML) [default: branchpoint.toml in the working directory, if there].
    /// Flags beat BRANCHPOINT_<SECTION>__<KEY> environment variables, which beat the file.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the early-exit network jointly on all exits; write weights and a model card.
    Train(TrainArgs),
    /// Fit temperatures on the validation split (temperature scaling) and write them to a file.
    Calibrate(CalibrateArgs),
    /// Evaluate a model on the test set: per-exit metrics, calibration, and the offloading sweep.
    Evaluate(EvaluateArgs),
    /// Measure the median latency of every stage, branch and partition on this machine.
    Profile(ProfileArgs),
    /// Measure each activation codec per branch on the test set: bytes per offload, final-exit agreement with f32 and accuracy, encode and decode time.
    Codecs(CodecsArgs),
    /// Run a cloud worker: serve offloaded activations from NATS with dynamic batching.
    Worker(WorkerArgs),
    /// Run a fleet of simulated devices (in-process by default, or against NATS workers).
    Fleet(Box<FleetArgs>),
    /// Run the calibration actor on NATS: publish temperatures, answer gets and refits.
    Calibrator(CalibratorArgs),
    /// Run the partition planner on NATS: answer devices' network reports with plans.
    Planner(PlannerArgs),
    /// Replay a network scenario under each policy; write report.json and plots.
    Run(RunArgs),
    /// Generate a synthetic cellular uplink trace (Mahimahi format).
    Trace(TraceArgs),
    /// Run the HTTP control plane on NATS: health, Prometheus metrics, fleet view, plans, calibration, dashboard.
    Serve(ServeArgs),
    /// Run the whole stack as local processes: nats-server (JetStream), workers (autoscaled), calibrator, planner, API, fleet.
    Stack(StackArgs),
    /// Write the nats-server configuration of a deployment (one user per role, least privilege) and, with --env, fresh passwords for it.
    NatsConfig(NatsConfigArgs),
}

#[derive(Debug, Args)]
pub struct NatsConfigArgs {
    /// Where to write the nats-server configuration (it holds no secret: passwords come from the environment).
    #[arg(long, default_value = "deploy/nats.conf", value_name = "FILE")]
    pub conf: PathBuf,
    /// Also write fresh passwords, one per role, as KEY=VALUE lines (e.g. .env, which docker compose reads); an existing file is kept.
    #[arg(long, value_name = "FILE")]
    pub env: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Address the HTTP API and dashboard listen on.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: String,
    /// Bearer token that PUT /api/plan and POST /api/calibration/refit require [default: none, so they answer 401].
    #[arg(long, value_name = "TOKEN")]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// The model plans are checked against: a built-in model's weights (.safetensors) or an imported model's card (.json).
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "FILE")]
    pub model: PathBuf,
    /// Forget a worker or fleet that has not reported for this long, in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "S")]
    pub stale_after_s: f64,
}

/// What `branchpoint stack` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StackAction {
    /// Start every service and keep them running until Ctrl-C or SIGTERM.
    Up,
}

#[derive(Debug, Args)]
pub struct StackArgs {
    /// up: start the stack in the foreground.
    #[arg(value_enum, value_name = "ACTION")]
    pub action: StackAction,
    /// Folder for the services' logs, the JetStream store and the fleet's summary.
    #[arg(long, default_value = "runs/stack", value_name = "DIR")]
    pub dir: PathBuf,
    /// nats-server binary [default: .venv/bin/nats-server if present (scripts/setup.sh installs it), else from PATH].
    #[arg(long, value_name = "FILE")]
    pub nats_server: Option<PathBuf>,
    /// Port of the stack's nats-server on 127.0.0.1.
    #[arg(long, default_value_t = 4222, value_name = "PORT")]
    pub nats_port: u16,
    /// Run a JetStream cluster of this many nats-servers (clients on --nats-port and up, routes on free ports the stack picks) instead of one; the services get every node's URL and the buckets min(3, N) replicas.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=9))]
    pub cluster: u16,
    /// Run NATS without users: any client may do anything (by default each service connects as its role's user, with permissions to match, and the passwords are in DIR/credentials.env).
    #[arg(long)]
    pub no_auth: bool,
    /// Control-store options (--kv-replicas, --device-plan-ttl-s) for the buckets the stack creates.
    #[command(flatten)]
    pub nats: StackStoreArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// The model: a built-in model's weights (.safetensors, its card
    /// NAME.json beside it) or an imported model's card (.json, from
    /// python/export.py).
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "FILE")]
    pub model: PathBuf,
    /// Workers to start with.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub workers: usize,
    /// Workers emulate cloud hardware this many times slower than this machine (`worker --cloud-slowdown`).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub cloud_slowdown: f64,
    #[command(flatten)]
    pub autoscale: AutoscaleArgs,
    /// Devices of the stack's fleet (0: no fleet).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub devices: usize,
    /// Mean inputs per second at each device.
    #[arg(long, default_value_t = 10.0, value_name = "R")]
    pub rate: f64,
    /// Seconds the fleet runs; the other services stay up after it ends.
    #[arg(long, default_value_t = 3600.0, value_name = "S")]
    pub duration: f64,
    /// The fleet's starting confidence target (until a plan arrives).
    #[arg(long, default_value_t = 0.9, value_name = "P")]
    pub p_tar: f64,
    /// The fleet's starting partition branch (`--branch` is an alias).
    #[arg(long = "partition-branch", visible_alias = "branch", default_value = "1", value_name = "K")]
    pub partition_branch: PartitionBranch,
    /// Deadline of one input, in ms.
    #[arg(long, default_value_t = 1000.0, value_name = "MS")]
    pub deadline_ms: f64,
    /// Emulate the fleet's uplinks from this Mahimahi trace (e.g.
    /// scenarios/traces/synthetic-cellular.up): its devices then report
    /// what they observe, and the planner plans for them as the trace
    /// changes (`fleet --uplink-trace`).
    #[arg(long, value_name = "FILE", conflicts_with = "uplink_schedule")]
    pub uplink_trace: Option<PathBuf>,
    /// Emulate the fleet's uplinks as steps over time instead: AT_S:MBIT_S
    /// pairs from 0 s, e.g. 0:50,20:0.5,40:50 (`fleet --uplink-schedule`).
    #[arg(long, value_name = "AT_S:MBIT_S,...")]
    pub uplink_schedule: Option<String>,
    /// Round-trip propagation time of the emulated uplinks.
    #[arg(long, default_value_t = 20.0, value_name = "MS")]
    pub rtt_ms: f64,
    /// Temperature method of the calibrator's initial fit: uncalibrated, global or per-branch.
    #[arg(long, default_value = "per-branch", value_name = "METHOD")]
    pub method: String,
}

/// The autoscaler's bounds and thresholds (`branchpoint_core::autoscale`).
#[derive(Debug, Args)]
pub struct AutoscaleArgs {
    /// Fewest workers [default: --workers].
    #[arg(long, value_name = "N")]
    pub min_workers: Option<usize>,
    /// Most workers [default: --workers, i.e. no autoscaling].
    #[arg(long, value_name = "N")]
    pub max_workers: Option<usize>,
    /// Add a worker when requests wait longer than this for compute, on average, in ms ...
    #[arg(long, default_value_t = 5.0, value_name = "MS")]
    pub scale_up_delay_ms: f64,
    /// ... or when more requests than this wait per worker.
    #[arg(long, default_value_t = 8.0, value_name = "N")]
    pub scale_up_backlog: f64,
    /// Remove a worker only when requests wait less than this, in ms ...
    #[arg(long, default_value_t = 1.0, value_name = "MS")]
    pub scale_down_delay_ms: f64,
    /// ... and at most this many wait per worker.
    #[arg(long, default_value_t = 1.0, value_name = "N")]
    pub scale_down_backlog: f64,
    /// Busy ticks in a row before adding a worker.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub scale_up_after: u32,
    /// Idle ticks in a row before removing a worker.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub scale_down_after: u32,
    /// How often the autoscaler looks at the workers' load, in ms.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub scale_tick_ms: u64,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Where to write the trace.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Seed of the generator: the same seed gives the same file.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Length of the trace; replays repeat it.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub duration_s: f64,
    /// Capacity in the good state.
    #[arg(long, default_value_t = 6.0, value_name = "MBIT_S")]
    pub good_mbit_s: f64,
    /// Capacity in the bad state.
    #[arg(long, default_value_t = 0.6, value_name = "MBIT_S")]
    pub bad_mbit_s: f64,
    /// Mean time in the good state.
    #[arg(long, default_value_t = 8.0, value_name = "SECONDS")]
    pub mean_good_s: f64,
    /// Mean time in the bad state.
    #[arg(long, default_value_t = 3.0, value_name = "SECONDS")]
    pub mean_bad_s: f64,
    /// Probability that a bad period is a complete outage.
    #[arg(long, default_value_t = 0.3, value_name = "P")]
    pub outage: f64,
}

#[derive(Debug, Args)]
pub struct PlannerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub source: ModelArgs,
    #[command(flatten)]
    pub temperatures: TemperatureArgs,
    /// Largest predicted fraction of a device's inputs that may miss the deadline.
    #[arg(long, default_value_t = 0.05, value_name = "P")]
    pub miss_bound: f64,
    /// Most of the worker pool's time the devices' offloads may take together, each device its share by its input rate (from the workers' status and the devices' reports).
    #[arg(long, default_value_t = branchpoint_core::planner::DEFAULT_POOL_UTILISATION, value_name = "U")]
    pub pool_utilisation: f64,
    /// Devices' head compute = the profile's time on this project's machine times this.
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub device_slowdown: f64,
    /// Plan with certified thresholds: each candidate p_tar becomes a target on-device accuracy whose threshold is certified (Learn-then-Test, validation split) with confidence 1 - D; plans then say which target they certify.
    #[arg(long, value_name = "D")]
    pub certify_delta: Option<f64>,
    /// Plan under a service level: on-device accuracy at least A with probability 1 - --level-delta, every plan chosen among those certified for it (all branches at once, validation split), within --miss-bound, spending least of --minimise. Refused, naming the most it certifies, when no plan can keep it.
    #[arg(long, value_name = "A", conflicts_with = "certify_delta")]
    pub level_accuracy: Option<f64>,
    /// The service level's risk delta (with --level-accuracy).
    #[arg(long, default_value_t = 0.05, value_name = "D")]
    pub level_delta: f64,
    /// What a plan keeping the service level spends least of: offloads, uplink-bytes, or nothing (the best predicted accuracy).
    #[arg(long, default_value = "offloads", value_name = "WHAT", value_parser = parse_minimise)]
    pub minimise: branchpoint_core::guarantee::Minimise,
    /// Compute profile [default: <model>.profile.json].
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Activation codecs plans may choose (f32, f16, int8), by their measured accuracy and bytes. f16 is left out by default: it ties int8 in accuracy on the shipped models at twice the bytes, and each codec costs its answers on the validation split at start.
    #[arg(long, default_value = "f32,int8", value_name = "C,C", value_delimiter = ',')]
    pub codecs: Vec<branchpoint_messages::Codec>,
    /// Workers' tail compute = the profile's time times this (as `worker --cloud-slowdown`): how fast they drain the backlog their status reports.
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub cloud_slowdown: f64,
    /// Run the adaptive policy's control loop (with --level-accuracy): every group heard of is watched from the workers' audit results (devices audit with `fleet --audit-rate`), a drift alarm makes its devices offload everything until a refit certifies new plans, and each change re-plans the group's devices at once. The planner is then the only writer of their plans; run no calibrator refits for those groups.
    #[arg(long, requires = "level_accuracy")]
    pub watch: bool,
    /// With --watch: the share of inputs the devices audit (`fleet --audit-rate`), which weighs the live estimates.
    #[arg(long, default_value_t = 0.1, value_name = "P", requires = "watch")]
    pub audit_rate: f64,
    /// With --watch: a refit waits for this many sampled inputs after an alarm (half fit the temperature, half certify).
    #[arg(long, default_value_t = 400, value_name = "N", requires = "watch")]
    pub min_refit_sample: usize,
    /// With --watch: the smallest change the drift and exchangeability tests are after.
    #[arg(long, default_value_t = 0.03, value_name = "ACCURACY", requires = "watch")]
    pub drift_margin: f64,
}

fn parse_minimise(s: &str) -> Result<branchpoint_core::guarantee::Minimise, String> {
    use branchpoint_core::guarantee::Minimise;
    match s {
        "offloads" => Ok(Minimise::Offloads),
        "uplink-bytes" => Ok(Minimise::UplinkBytes),
        "nothing" => Ok(Minimise::Nothing),
        _ => Err(format!("{s:?}: give offloads, uplink-bytes or nothing")),
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Scenario file (TOML), e.g. scenarios/wifi-stable.toml.
    #[arg(value_name = "SCENARIO")]
    pub scenario: PathBuf,
    /// Folder for report.json and the plots [default: runs/<scenario name>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Mahimahi trace to use for every group whose network is a trace.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    #[command(flatten)]
    pub source: ModelArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// With --nats: also serve the HTTP API and dashboard (as `branchpoint serve` does) on this address while the replay runs.
    #[arg(long, value_name = "ADDR", requires = "nats")]
    pub listen: Option<String>,
    /// Bearer token for the embedded API's PUT /api/plan and POST /api/calibration/refit [default: none, so they answer 401].
    #[arg(long, value_name = "TOKEN", requires = "listen")]
    pub token: Option<String>,
}

#[derive(Debug, Args)]
pub struct CalibratorArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub source: ModelArgs,
    #[command(flatten)]
    pub temperatures: TemperatureArgs,
    /// Watch calibration live but never refit: drift alarms are still raised, logged and counted, and the dashboard shows them.
    #[arg(long)]
    pub alarm_only: bool,
    /// Live estimates and refits use the audits of the last this many seconds.
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    pub watch_window_s: f64,
    /// A refit waits for this many sampled inputs after the alarm (half fit the branch's temperature, half certify its threshold).
    #[arg(long, default_value_t = 800, value_name = "N")]
    pub min_refit_sample: usize,
    /// Refits of one group and branch are at least this many seconds apart.
    #[arg(long, default_value_t = 60.0, value_name = "SECONDS")]
    pub min_refit_interval_s: f64,
    /// The smallest rise in disagreement with the final exit the drift test is after, at any confidence (added to the validation split's rate there).
    #[arg(long, default_value_t = 0.03, value_name = "ACCURACY")]
    pub drift_margin: f64,
    /// A refit certifies its threshold with confidence 1 - this.
    #[arg(long, default_value_t = 0.05, value_name = "DELTA")]
    pub refit_delta: f64,
}

/// Where a NATS service's temperatures come from: a fit on the validation
/// split, or a calibration file.
#[derive(Debug, Args, Clone)]
pub struct TemperatureArgs {
    /// Fit temperatures with this method: uncalibrated, global or per-branch (ignored with --calibration).
    #[arg(long, default_value = "per-branch", value_name = "METHOD")]
    pub method: String,
    /// Use this calibration file's temperatures instead of fitting.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
}

/// A model and the dataset it was trained on, for commands that need both.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// The model: a built-in model's weights (.safetensors, its card
    /// NAME.json beside it) or an imported model's card (.json, from
    /// python/export.py).
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "FILE")]
    pub model: PathBuf,
    /// Folder holding the dataset files [default: the dataset's standard folder].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// What a long-running service offers its supervisor.
#[derive(Debug, Args, Clone)]
pub struct ServiceArgs {
    /// Create this file once the service serves (for container healthchecks); removed at a clean exit.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

impl ServiceArgs {
    /// Creates the ready file, if one was asked for. A failure is reported,
    /// not fatal: the service itself works.
    pub fn mark_ready(&self) {
        if let Some(f) = &self.ready_file {
            if let Err(e) = std::fs::write(f, b"ready\n") {
                tracing::warn!("could not create the ready file {}: {e}", f.display());
            }
        }
    }

    pub fn clear(&self) {
        if let Some(f) = &self.ready_file {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// How to reach NATS. Without --nats, commands that can run in-process do so.
#[derive(Debug, Args, Clone)]
pub struct NatsArgs {
    /// NATS server URL, e.g. nats://127.0.0.1:4222 (several: comma-separated).
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// User name for NATS user/password authentication.
    #[arg(long, value_name = "USER", requires = "nats_password")]
    pub nats_user: Option<String>,
    /// Password for NATS user/password authentication.
    #[arg(long, value_name = "PASSWORD", requires = "nats_user")]
    pub nats_password: Option<String>,
    /// Token for NATS token authentication.
    #[arg(long, value_name = "TOKEN")]
    pub nats_token: Option<String>,
    /// Require TLS on the NATS connection.
    #[arg(long)]
    pub nats_tls: bool,
    /// CA certificate (PEM) to verify the NATS server with; implies --nats-tls.
    #[arg(long, value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs --nats-key; implies --nats-tls.
    #[arg(long, value_name = "FILE", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS; needs --nats-cert.
    #[arg(long, value_name = "FILE", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// Replicas of the control store's key-value buckets when this command creates them (a JetStream cluster: 3); existing buckets are never changed.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=5))]
    pub kv_replicas: u16,
    /// A plan stored for one device expires this many seconds after it was last written (the planner writes it again while the device reports).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub device_plan_ttl_s: u64,
}

/// The control-store options of `stack up` (its services connect to the
/// stack's own server).
#[derive(Debug, Args, Clone)]
pub struct StackStoreArgs {
    /// Replicas of the control store's key-value buckets.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=5))]
    pub kv_replicas: u16,
    /// A plan stored for one device expires this many seconds after it was last written.
    #[arg(long, default_value_t = 3600, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub device_plan_ttl_s: u64,
}

impl StackStoreArgs {
    pub fn store_settings(&self) -> branchpoint_actors::control::StoreSettings {
        branchpoint_actors::control::StoreSettings { replicas: usize::from(self.kv_replicas), device_plan_ttl: std::time::Duration::from_secs(self.device_plan_ttl_s) }
    }
}

impl NatsArgs {
    /// How the control store's buckets are made and device plans expire.
    pub fn store_settings(&self) -> branchpoint_actors::control::StoreSettings {
        branchpoint_actors::control::StoreSettings { replicas: usize::from(self.kv_replicas), device_plan_ttl: std::time::Duration::from_secs(self.device_plan_ttl_s) }
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    /// The models to serve: each a built-in model's weights (.safetensors,
    /// its card NAME.json beside it) or an imported model's card (.json, from
    /// python/export.py). Repeat the flag (or separate with commas) to serve
    /// several; a request runs the tail of the model it names by SHA-256,
    /// and one that names none runs the first.
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "FILE", value_delimiter = ',', action = clap::ArgAction::Append)]
    pub model: Vec<PathBuf>,
    /// Most offloaded inputs run together in one batched tail forward.
    #[arg(long, default_value_t = 32, value_name = "B")]
    pub max_batch: usize,
    /// Longest an offloaded input waits for others to join its batch, in microseconds.
    #[arg(long, default_value_t = 2000, value_name = "U")]
    pub max_wait_us: u64,
    /// Compute threads running tails (each with its own copy of the model).
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: usize,
    /// Where tensor work runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Name this worker reports in replies and service info [default: worker-<pid>].
    #[arg(long, value_name = "ID")]
    pub worker_id: Option<String>,
    /// Emulate cloud hardware this many times slower than this machine (each tail holds its thread that much longer).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub cloud_slowdown: f64,
    /// How often the worker publishes its load (queue delay, backlog) for the autoscaler, in ms.
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub status_interval_ms: u64,
}

#[derive(Debug, Args)]
pub struct FleetArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub source: ModelArgs,
    /// Simulated devices.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub devices: usize,
    /// Mean inputs per second at each device (Poisson arrivals).
    #[arg(long, default_value_t = 10.0, value_name = "R")]
    pub rate: f64,
    /// Seconds during which inputs arrive.
    #[arg(long, default_value_t = 10.0, value_name = "S")]
    pub duration: f64,
    /// Stop after this many inputs in total (inputs are test inputs 0, 1, 2, ... in arrival order).
    #[arg(long, value_name = "N")]
    pub inputs: Option<usize>,
    /// Confidence target: answer on the device when the calibrated branch confidence reaches it.
    #[arg(long, default_value_t = 0.9, value_name = "P")]
    pub p_tar: f64,
    /// Partition branch every device ends its head with (`--branch` is an alias).
    #[arg(long = "partition-branch", visible_alias = "branch", default_value = "1", value_name = "K")]
    pub partition_branch: PartitionBranch,
    /// How devices encode the activations they offload: f32, f16 (half the bytes) or int8 (a quarter, with a scale per channel); a planner's plans change it.
    #[arg(long, default_value = "f32", value_name = "CODEC")]
    pub codec: branchpoint_messages::Codec,
    /// Watch calibration live: each input's audit coin comes up with this probability; the on-device ones among them are sent to the cloud as well (audits, which change no outcome), and offloads are tagged, so the calibrator sees both [default: 0, off].
    #[arg(long, default_value_t = 0.0, value_name = "R")]
    pub audit_rate: f64,
    /// The devices see corrupted test images (an input shift, as in `evaluate --corrupt`): KIND:SEVERITY.
    #[arg(long, value_name = "KIND:SEVERITY")]
    pub corrupt: Option<String>,
    /// Calibration file (from `branchpoint calibrate`) with the temperatures [default: uncalibrated].
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Deadline of one input from arrival to answer, in ms; past it the device falls back to its branch.
    #[arg(long, default_value_t = 1000.0, value_name = "MS")]
    pub deadline_ms: f64,
    /// Seed of the arrival processes.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Device threads: each has its own copy of the model and runs the heads of the devices it hosts.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub threads: usize,
    /// Emulate device hardware this many times slower than this machine (each head holds its device thread that much longer).
    #[arg(long, default_value_t = 1.0, value_name = "X")]
    pub device_slowdown: f64,
    /// In-process only: compute threads of the embedded cloud worker.
    #[arg(long, default_value_t = 1, value_name = "T")]
    pub worker_threads: usize,
    /// In-process only: batch size limit of the embedded cloud worker.
    #[arg(long, default_value_t = 32, value_name = "B")]
    pub max_batch: usize,
    /// In-process only: batching wait of the embedded cloud worker, in microseconds.
    #[arg(long, default_value_t = 2000, value_name = "U")]
    pub max_wait_us: u64,
    /// Write the summary as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write every input's outcome as JSON lines to this file.
    #[arg(long, value_name = "FILE")]
    pub outcomes: Option<PathBuf>,
    /// Group of the devices, for plan updates addressed to a group (with --nats).
    #[arg(long, default_value = "default", value_name = "NAME")]
    pub group: String,
    /// Name of this fleet in its status reports, and of its devices (<ID>-0, <ID>-1, ...) [default: fleet-<pid>].
    #[arg(long, value_name = "ID")]
    pub fleet_id: Option<String>,
    /// With --nats: how often the fleet publishes its totals and its devices' plans, in ms (0: never).
    #[arg(long, default_value_t = 250, value_name = "MS")]
    pub status_interval_ms: u64,
    /// Emulate each device's uplink from this Mahimahi trace (looped; each
    /// line a millisecond at which a 1,500-byte packet may leave). The
    /// devices then measure their uplink, decline offloads predicted to miss
    /// the deadline, and report to the planner (over NATS: the stack's
    /// planner plans for them)
    #[arg(long, value_name = "FILE", conflicts_with_all = ["uplink_mbit_s", "uplink_schedule"])]
    pub uplink_trace: Option<PathBuf>,
    /// Emulate each device's uplink at this constant rate instead (see
    /// --uplink-trace)
    #[arg(long, value_name = "MBIT_S", conflicts_with = "uplink_schedule")]
    pub uplink_mbit_s: Option<f64>,
    /// Emulate each device's uplink as steps over time instead: AT_S:MBIT_S
    /// pairs, from 0 s, e.g. 0:50,20:0.5,40:50 (a handover at 20 s that
    /// ends at 40 s; the last step lasts to the end)
    #[arg(long, value_name = "AT_S:MBIT_S,...")]
    pub uplink_schedule: Option<String>,
    /// Round-trip propagation time of the emulated uplink
    #[arg(long, default_value_t = 20.0, value_name = "MS")]
    pub rtt_ms: f64,
    /// How often each emulated device reports what it observes to the
    /// planner
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub report_interval_ms: u64,
}

#[derive(Debug, Args)]
pub struct ComputeArgs {
    /// Where tensor work runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Intra-op threads libtorch uses (0: libtorch's default, one per core).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub threads: i32,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Dataset to train on: fashion-mnist or cifar-10.
    #[arg(long, default_value = "fashion-mnist", value_name = "NAME")]
    pub dataset: String,
    /// Folder holding the dataset files [default: /usr/share/datasets/fashion-mnist for
    /// fashion-mnist, data/cifar-10-batches-bin for cifar-10].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Passes over the training split.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub epochs: usize,
    /// Seed of weight initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Inputs per optimisation step.
    #[arg(long, default_value_t = 128, value_name = "B")]
    pub batch_size: usize,
    /// Peak learning rate of Adam (decayed to zero on a cosine schedule).
    #[arg(long, default_value_t = 2e-3, value_name = "LR")]
    pub learning_rate: f64,
    /// Loss weight of each exit, comma-separated: branches in order, then final [default: 0.5 per branch, 1 for final].
    #[arg(long, value_name = "W,W,W", value_delimiter = ',')]
    pub exit_weights: Option<Vec<f64>>,
    /// Network to train: b-alexnet-small (2 side branches) or b-vgg-small (3 side branches, deeper and wider, no dropout).
    #[arg(long, default_value = "b-alexnet-small", value_name = "NAME")]
    pub architecture: String,
    /// Adam's L2 weight decay (0: none).
    #[arg(long, default_value_t = 1e-4, value_name = "WD")]
    pub weight_decay: f64,
    /// Inputs held out of the training set for validation (calibration uses them).
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub validation_size: usize,
    /// Seed of the train/validation split.
    #[arg(long, default_value_t = 2021, value_name = "S")]
    pub split_seed: u64,
    /// Train on only the first N inputs of the training split (quick runs and tests).
    #[arg(long, value_name = "N")]
    pub subset: Option<usize>,
    /// Turn off random crops (2-pixel padding) and horizontal flips of training images.
    #[arg(long)]
    pub no_augment: bool,
    /// Where to write the weights (.safetensors); the model card goes beside it as NAME.json.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// global: one temperature for all exits; per-branch: one temperature per exit.
    #[arg(long, default_value = "per-branch", value_name = "METHOD")]
    pub method: String,
    /// Where to write the calibration file (JSON).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Args)]
pub struct EvaluateArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// Use this calibration file's temperatures for its method instead of fitting them here.
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
    /// Write the full report (per method, branch and p_tar; per-exit calibration) as JSON.
    #[arg(long, value_name = "REPORT")]
    pub json: Option<PathBuf>,
    /// Write PNG plots (reliability diagrams, edge accuracy, offloading, outage, deadlines) here.
    #[arg(long, value_name = "DIR")]
    pub plots: Option<PathBuf>,
    /// Write per-exit validation and test logits with labels as CSV files here.
    #[arg(long, value_name = "DIR")]
    pub dump_logits: Option<PathBuf>,
    /// Targets p_tar to sweep, comma-separated [default: 0.50 to 0.95 by 0.05, then 0.96 to 0.99].
    #[arg(long, value_name = "P,P", value_delimiter = ',')]
    pub p_tars: Option<Vec<f64>>,
    /// Consecutive test inputs per batch when counting inference outages.
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub outage_batch: usize,
    /// Uplink rate of the latency model, in Mbit/s.
    #[arg(long, default_value_t = 10.0, value_name = "MBIT_S")]
    pub uplink_mbit_s: f64,
    /// Round-trip propagation delay device <-> cloud of the latency model, in ms.
    #[arg(long, default_value_t = 20.0, value_name = "MS")]
    pub rtt_ms: f64,
    /// Deadline t_tar of one input, in ms, for the missed-deadline probability.
    #[arg(long, default_value_t = 40.0, value_name = "MS")]
    pub deadline_ms: f64,
    /// p_tar at which the missed-deadline curve over deadlines is drawn.
    #[arg(long, default_value_t = 0.9, value_name = "P")]
    pub deadline_curve_p_tar: f64,
    /// Compute profile JSON (from `branchpoint profile --json`) [default: profile this machine now].
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Target on-device accuracies a to certify thresholds for, comma-separated.
    #[arg(long, default_value = "0.9,0.95,0.99", value_name = "A,A", value_delimiter = ',')]
    pub certify_accuracy: Vec<f64>,
    /// Confidence 1 - delta of each certificate: the deltas, comma-separated (the smallest also draws the plot over the p_tar sweep).
    #[arg(long, default_value = "0.1,0.05", value_name = "D,D", value_delimiter = ',')]
    pub certify_delta: Vec<f64>,
    /// Random re-splits of validation + test into calibration and evaluation halves, to count how often each threshold rule breaks its target (0: none).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub resplits: usize,
    /// Draws of the guarantee study: a planner choosing among every certified branch and threshold, on calibration sets drawn from validation + test, and recertification on audits of the test split (0: none).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub guarantee_draws: usize,
    /// Seed of the re-splits and of the calibration methods' cross-validation folds.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Corrupt the test images (an input shift; calibration still fits on the clean validation split): KIND:SEVERITY, KIND one of gaussian-noise, gaussian-blur, contrast, brightness, SEVERITY 1 to 5.
    #[arg(long, value_name = "KIND:SEVERITY")]
    pub corrupt: Option<String>,
    /// Seed of the corruption's noise.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub corrupt_seed: u64,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Debug, Args)]
pub struct CodecsArgs {
    #[command(flatten)]
    pub source: ModelArgs,
    /// Also write the measurements as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Test inputs whose encoding, decoding and head are timed (one at a time; medians are reported).
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub timed_inputs: usize,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The model: a built-in model's weights (.safetensors, its card
    /// NAME.json beside it) or an imported model's card (.json, from
    /// python/export.py).
    #[arg(long, default_value = DEFAULT_MODEL, value_name = "FILE")]
    pub model: PathBuf,
    /// Also write the profile as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Batch sizes to time, comma-separated.
    #[arg(long, default_value = "1,32", value_name = "B,B", value_delimiter = ',')]
    pub batch_sizes: Vec<i64>,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub repeats: usize,
    /// Where tensor work runs: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Intra-op threads libtorch uses; 1 by default, like a device's single inference thread.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub threads: i32,
}
