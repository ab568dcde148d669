//! Fleet driver: many simulated devices, each fed test inputs as a Poisson
//! process, until a duration or an input budget is spent; then it waits for
//! every input's outcome.
//!
//! Inputs are taken from the test set in arrival order across the whole
//! fleet (input i of the run is test input i mod N), so a run of N inputs
//! classifies each test input exactly once and can be compared input by
//! input with the offline evaluation.
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_core::rng::SplitMix64;
use branchpoint_core::scenario::sim::{device_seed, next_arrival_us};
use branchpoint_models::Split;

use crate::collector::{Collector, GetSummary, Summary};
use crate::compute::{LoadedNet, ModelSpec};
use crate::device::{Device, DeviceConfig, Infer};
use crate::emulation::EmulationSpec;
use crate::error::ActorError;
use crate::transport::OffloadLink;

pub mod nats;
use crate::clock::unix_us;
use nats::{forward_updates, publish_last_status, publish_statuses, FleetBus, FleetDevice};

/// The threads that host device actors. Each thread has its own copy of the
/// network, shared by the devices it hosts, which run their heads inline: a
/// thread is one device CPU, shared round-robin by the devices placed on it.
pub struct DeviceThreads {
    hosts: Vec<(Arbiter, Addr<Host>)>,
}

impl DeviceThreads {
    /// Starts `threads` device threads. The model is loaded once here to fail
    /// fast with a clear error; each thread then loads its own copy.
    pub fn start(spec: ModelSpec, threads: usize) -> Result<Self, ActorError> {
        Self::start_with_slowdown(spec, threads, 1.0)
    }

    /// `start`, on emulated device hardware `slowdown` times slower than
    /// this machine: each head holds its thread that much longer, as a
    /// slower CPU would (see `LoadedNet::with_slowdown`).
    pub fn start_with_slowdown(spec: ModelSpec, threads: usize, slowdown: f64) -> Result<Self, ActorError> {
        if !(slowdown.is_finite() && slowdown >= 1.0) {
            return Err(ActorError::Invalid { what: "device slowdown".into(), reason: format!("{slowdown} must be a number at least 1") });
        }
        LoadedNet::load(&spec)?;
        let hosts = (0..threads.max(1))
            .map(|_| {
                let arbiter = Arbiter::new();
                let spec = spec.clone();
                let host = Host::start_in_arbiter(&arbiter.handle(), move |_| {
                    // Subnormals flushed, one intra-op thread: see `compute`.
                    branchpoint_models::subnormal::prepare_tensor_thread(1);
                    Host { net: Rc::new(LoadedNet::load(&spec).expect("model loaded once already at start").with_slowdown(slowdown)) }
                });
                (arbiter, host)
            })
            .collect();
        Ok(Self { hosts })
    }

    /// Stops every device thread and waits for it to exit: a head in
    /// progress finishes, the devices and inputs still in their mailboxes
    /// are dropped. Call it once the fleet has drained; dropping does it too.
    pub fn shutdown(&mut self) {
        let hosts = std::mem::take(&mut self.hosts);
        for (arbiter, _) in &hosts {
            arbiter.stop();
        }
        for (arbiter, host) in hosts {
            drop(host);
            // Joined, so no head still runs when the process tears libtorch
            // down; a thread that panicked has said so on stderr.
            let _ = arbiter.join();
        }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Starts one device per configuration, spread round-robin over the
    /// threads; returns their addresses in the same order.
    pub async fn spawn(&self, configs: Vec<DeviceConfig>, link: OffloadLink, collector: Addr<Collector>) -> Result<Vec<Addr<Device>>, ActorError> {
        let n = self.hosts.len();
        let mut shards: Vec<Vec<(usize, DeviceConfig)>> = vec![Vec::new(); n];
        for (i, c) in configs.into_iter().enumerate() {
            shards[i % n].push((i, c));
        }
        let mut out: Vec<Option<Addr<Device>>> = Vec::new();
        for ((_, host), shard) in self.hosts.iter().zip(shards) {
            let indices: Vec<usize> = shard.iter().map(|(i, _)| *i).collect();
            let configs = shard.into_iter().map(|(_, c)| c).collect();
            let addrs = host.send(SpawnDevices { configs, link: link.clone(), collector: collector.clone() }).await?;
            for (i, a) in indices.into_iter().zip(addrs) {
                if out.len() <= i {
                    out.resize(i + 1, None);
                }
                out[i] = Some(a);
            }
        }
        Ok(out.into_iter().flatten().collect())
    }
}

impl Drop for DeviceThreads {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Holds one device thread's network and starts devices on that thread.
pub struct Host {
    net: Rc<LoadedNet>,
}

impl Actor for Host {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "Vec<Addr<Device>>")]
struct SpawnDevices {
    configs: Vec<DeviceConfig>,
    link: OffloadLink,
    collector: Addr<Collector>,
}

impl Handler<SpawnDevices> for Host {
    type Result = Vec<Addr<Device>>;

    fn handle(&mut self, msg: SpawnDevices, _: &mut Context<Self>) -> Self::Result {
        msg.configs.into_iter().map(|c| Device::new(c, self.net.clone(), msg.link.clone(), msg.collector.clone()).start()).collect()
    }
}

/// Test inputs in plain memory, shareable across actors and threads.
pub struct TestInputs {
    pub images: Vec<Arc<[f32]>>,
    pub labels: Vec<i64>,
}

impl TestInputs {
    pub fn from_split(split: &Split) -> Result<Self, ActorError> {
        let n = split.len();
        let flat: Vec<f32> = Vec::try_from(split.images.flatten(0, -1)).map_err(branchpoint_models::ModelError::from)?;
        let per = flat.len() / n.max(1);
        let labels: Vec<i64> = Vec::try_from(&split.labels).map_err(branchpoint_models::ModelError::from)?;
        Ok(Self { images: flat.chunks(per).map(Arc::from).collect(), labels })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub devices: usize,
    /// Mean arrivals per second at each device (Poisson).
    pub rate_per_device: f64,
    /// How long inputs keep arriving.
    pub duration: Duration,
    /// Stop after this many inputs in total, if set.
    pub max_inputs: Option<usize>,
    pub seed: u64,
    /// Template for every device; ids become `{id}-{index}`.
    pub device: DeviceConfig,
    /// After the last arrival, how long the drain waits without any input
    /// being decided before it gives up on the rest (an offload ends by its
    /// deadline, so the deadline and a margin).
    pub drain: Duration,
    /// Group of every device, for plan updates addressed to a group.
    pub group: String,
    /// Digest of the devices' weights: calibration updates for other weights
    /// are ignored.
    pub model_sha256: String,
    /// Names this fleet in its status reports.
    pub fleet_id: String,
    /// With NATS: publish a `FleetStatus` this often while running (and once
    /// at the end).
    pub status_interval: Option<Duration>,
    /// After an interruption (`run_fleet`'s `stop`), how long to wait for the
    /// outcomes of inputs already running.
    pub stop_grace: Duration,
}

impl FleetConfig {
    pub fn validate(&self) -> Result<(), ActorError> {
        let bad = |what: &str, reason: String| Err(ActorError::Invalid { what: what.into(), reason });
        if self.devices == 0 {
            return bad("--devices", "must be at least 1".into());
        }
        if !(self.rate_per_device.is_finite() && self.rate_per_device > 0.0) {
            return bad("--rate", format!("{} must be a positive number of inputs per second", self.rate_per_device));
        }
        if let Err(e) = branchpoint_messages::PTar::target(self.device.p_tar) {
            return bad("--p-tar", e.to_string());
        }
        // Device ids are `<id>-<n>`: each must be a valid id on the wire.
        let last = format!("{}-{}", self.device.id, self.devices - 1);
        if !branchpoint_messages::subjects::is_valid_id(&last) {
            return bad("--fleet-id", format!("its devices' ids (up to {last:?}) must be 1 to 64 letters, digits, '-' or '_': give a shorter fleet id"));
        }
        Ok(())
    }
}

/// How a fleet run ended.
#[derive(Debug, Clone)]
pub struct FleetRun {
    pub summary: Summary,
    /// Inputs that arrived (were handed to a device).
    pub arrived: usize,
    /// Arrived inputs that no device ran because the run was interrupted
    /// first (they were still in a mailbox).
    pub not_run: usize,
    /// The run was stopped by `stop` before its duration or input budget.
    pub interrupted: bool,
}

impl FleetRun {
    /// Inputs a device accepted that have no outcome (always 0 for a run
    /// that drained).
    pub fn missing(&self) -> usize {
        self.summary.inputs.saturating_sub(self.summary.outcomes)
    }
}

/// Runs the fleet to completion and returns the collector's summary.
///
/// With a NATS client in `updates`, calibration and plan updates published
/// while the fleet runs reach its devices, which apply them to the inputs
/// that arrive afterwards. `on_started` runs once the devices exist and
/// listen for updates, just before the first arrival.
///
/// The run ends when its duration or input budget is spent and every input
/// that arrived has its outcome, however far behind the device threads are:
/// the drain waits as long as inputs keep being decided, and gives up only
/// when nothing has moved for `cfg.drain`. When `stop` resolves first
/// (Ctrl-C), arrivals end at once, inputs still queued at the devices are
/// not run, and the inputs already running get `cfg.stop_grace` to finish.
#[allow(clippy::too_many_arguments)]
pub async fn run_fleet(
    cfg: FleetConfig,
    inputs: Arc<TestInputs>,
    threads: &DeviceThreads,
    link: OffloadLink,
    collector: Addr<Collector>,
    updates: Option<FleetBus>,
    on_started: impl FnOnce(),
    stop: impl std::future::Future<Output = ()>,
) -> Result<FleetRun, ActorError> {
    cfg.validate()?;
    if inputs.is_empty() {
        return Err(ActorError::Invalid { what: "test inputs".into(), reason: "none".into() });
    }
    let claimed = Rc::new(Cell::new(0usize));
    let interrupt = cfg.device.interrupt.clone();
    // Emulated uplinks: each device its own loss stream and report offset
    // (reports spread over the interval), reporting through the NATS edge.
    let reports = match (&cfg.device.emulation, &updates) {
        (Some(_), Some(bus)) => Some(bus.reports()),
        _ => None,
    };
    let configs = device_configs(&cfg, reports.as_ref(), Instant::now());
    let ids: Vec<String> = configs.iter().map(|c| c.id.clone()).collect();
    let devices: Vec<(String, Addr<Device>)> = ids.into_iter().zip(threads.spawn(configs, link, collector.clone()).await?).collect();
    let listener = match &updates {
        Some(client) => {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let addressed = devices.iter().map(|(id, addr)| FleetDevice { id: id.clone(), group: cfg.group.clone(), addr: addr.clone() }).collect();
            let task = actix::spawn(forward_updates(client.0.clone(), addressed, cfg.model_sha256.clone(), ready_tx));
            // If subscribing failed the task has said so and ended; run anyway.
            let _ = ready_rx.await;
            Some(task)
        }
        None => None,
    };
    let started_unix_us = unix_us();
    let status = match (&updates, cfg.status_interval) {
        (Some(bus), Some(every)) => {
            Some(actix::spawn(publish_statuses(bus.0.clone(), (cfg.fleet_id.clone(), cfg.group.clone()), devices.clone(), collector.clone(), started_unix_us, every)))
        }
        _ => None,
    };
    on_started();
    let started = Instant::now();
    let arrivals = devices
        .iter()
        .enumerate()
        .map(|(d, (_, device))| Arrivals {
            device: device.clone(),
            seed: device_seed(cfg.seed, 0, d),
            rate_steps: vec![(0, cfg.rate_per_device)],
            views: vec![(0, inputs.clone())],
        })
        .collect();
    let until_us = cfg.duration.as_micros() as u64;
    let arrivals = drive_arrivals(arrivals, started, until_us, cfg.max_inputs.unwrap_or(usize::MAX), &claimed);
    let aborts: Vec<_> = arrivals.iter().map(|a| a.abort_handle()).collect();
    tokio::pin!(stop);
    let mut stop_deadline = None;
    tokio::select! {
        _ = futures::future::join_all(arrivals) => {}
        _ = &mut stop => {
            // Aborted between arrivals: every input claimed was handed over.
            aborts.iter().for_each(|a| a.abort());
            interrupt.set();
            stop_deadline = Some(Instant::now());
        }
    }
    // Polled again only if it has not resolved yet.
    let stop = async move {
        if stop_deadline.is_none() {
            stop.await
        } else {
            std::future::pending().await
        }
    };
    let arrived = claimed.get();
    let (summary, stopped) = drain(&collector, arrived, &interrupt, cfg.drain, cfg.stop_grace, stop, stop_deadline).await?;
    if let Some(l) = listener {
        l.abort();
    }
    if let (Some(task), Some(client)) = (status, &updates) {
        task.abort();
        publish_last_status(&client.0, (&cfg.fleet_id, &cfg.group), &devices, &collector, started_unix_us).await;
    }
    Ok(FleetRun { summary, arrived, not_run: interrupt.not_run(), interrupted: stopped })
}

/// Each device's settings: the fleet's, with its own id, and with an
/// emulated uplink, its own loss stream and report offset (reports spread
/// over the interval), reporting through `reports` (the NATS edge).
fn device_configs(cfg: &FleetConfig, reports: Option<&Addr<crate::planner::nats::NatsReports>>, epoch: Instant) -> Vec<DeviceConfig> {
    (0..cfg.devices)
        .map(|d| DeviceConfig {
            id: format!("{}-{d}", cfg.device.id),
            emulation: cfg.device.emulation.as_ref().map(|e| EmulationSpec {
                epoch,
                seed: e.seed ^ (d as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                reports: reports.map(|r| r.clone().recipient()),
                report_offset: e.report_interval * (d as u32 + 1) / (cfg.devices as u32 + 1),
                ..e.clone()
            }),
            ..cfg.device.clone()
        })
        .collect()
}

/// What arrives at one device: Poisson arrivals from its own seeded
/// stream at its group's rate schedule (`(start µs, inputs/s)` steps, as
/// `core::scenario::sim` draws them: a replay's devices get exactly the
/// virtual-time arrivals), and the inputs it sees from each instant on
/// (`(from µs, inputs)`, ascending from 0: a shift replaces the clean test
/// images with corrupted ones).
pub struct Arrivals {
    pub device: Addr<Device>,
    pub seed: u64,
    pub rate_steps: Vec<(u64, f64)>,
    pub views: Vec<(u64, Arc<TestInputs>)>,
}

/// The one fleet driver's arrivals: a task per device handing it its
/// inputs at its arrival instants after `epoch`, until `until_us` or until
/// the fleet's input budget is spent (`claimed` counts the inputs handed
/// over, fleet-wide: an input's arrival number, and which test input it
/// is). An input arrives when scheduled: the driver's timer waking late is
/// the host's slack, not the input's time.
pub fn drive_arrivals(devices: Vec<Arrivals>, epoch: Instant, until_us: u64, budget: usize, claimed: &Rc<Cell<usize>>) -> Vec<tokio::task::JoinHandle<()>> {
    devices
        .into_iter()
        .map(|a| {
            let claimed = claimed.clone();
            actix::spawn(async move {
                let mut rng = SplitMix64::new(a.seed);
                let mut at = 0u64;
                loop {
                    at = next_arrival_us(&mut rng, at, &a.rate_steps);
                    if at >= until_us {
                        return;
                    }
                    let arrived = epoch + Duration::from_micros(at);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(arrived)).await;
                    let i = claimed.get();
                    if i >= budget {
                        return;
                    }
                    claimed.set(i + 1);
                    let inputs = &a.views[a.views.partition_point(|(from, _)| *from <= at).max(1) - 1].1;
                    let k = i % inputs.len();
                    // Unbounded on purpose: the arrival process is the load
                    // being simulated, and every input handed over must get
                    // its outcome (`drain` waits for the backlog).
                    a.device.do_send(Infer { arrival: i as u64, arrived, input_index: k, input: inputs.images[k].clone(), label: inputs.labels[k] });
                }
            })
        })
        .collect()
}

/// Waits until each of the `arrived` inputs has its outcome (or, after an
/// interruption, was not run), backlog included: as long as inputs keep
/// being decided. Gives up when nothing has moved for `stall`, or `grace`
/// after `stop` resolved (or after `stopped_at`, when it already had): then
/// `interrupt` is set, so that inputs still queued are not run. Returns the
/// summary then, and whether the run was interrupted.
pub async fn drain(
    collector: &Addr<Collector>,
    arrived: usize,
    interrupt: &crate::device::Interrupt,
    stall: Duration,
    grace: Duration,
    stop: impl std::future::Future<Output = ()>,
    stopped_at: Option<Instant>,
) -> Result<(Summary, bool), ActorError> {
    tokio::pin!(stop);
    let mut give_up_at = stopped_at.map(|t| t + grace);
    let mut progress = (usize::MAX, Instant::now());
    loop {
        let s = collector.send(GetSummary).await?;
        let not_run = interrupt.not_run();
        if s.inputs + not_run >= arrived && s.outcomes >= s.inputs {
            return Ok((s, give_up_at.is_some()));
        }
        let moved = s.inputs + not_run + s.outcomes;
        if moved != progress.0 {
            progress = (moved, Instant::now());
        } else if progress.1.elapsed() >= stall {
            return Ok((s, give_up_at.is_some()));
        }
        if give_up_at.is_some_and(|d| Instant::now() >= d) {
            return Ok((s, true));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = &mut stop, if give_up_at.is_none() => {
                // Interrupted while draining: the backlog is not run.
                interrupt.set();
                give_up_at = Some(Instant::now() + grace);
            }
        }
    }
}
