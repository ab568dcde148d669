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
use branchpoint_models::Split;

use crate::collector::{Collector, GetSnapshot, GetSummary, Summary};
use crate::compute::{LoadedNet, ModelSpec};
use crate::control::{ControlChange, ControlStore};
use crate::device::{ApplyCalibration, ApplyPlan, Device, DeviceConfig, GetPlan, Infer};
use crate::emulation::EmulationSpec;
use crate::error::ActorError;
use crate::transport::OffloadLink;

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
    updates: Option<async_nats::Client>,
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
        (Some(_), Some(client)) => Some(crate::planner::nats::NatsReports::new(client.clone()).start()),
        _ => None,
    };
    let configs = device_configs(&cfg, reports.as_ref(), Instant::now());
    let ids: Vec<String> = configs.iter().map(|c| c.id.clone()).collect();
    let devices: Vec<(String, Addr<Device>)> = ids.into_iter().zip(threads.spawn(configs, link, collector.clone()).await?).collect();
    let listener = match &updates {
        Some(client) => {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let addressed = devices.iter().map(|(id, addr)| FleetDevice { id: id.clone(), group: cfg.group.clone(), addr: addr.clone() }).collect();
            let task = actix::spawn(forward_updates(client.clone(), addressed, cfg.model_sha256.clone(), ready_tx));
            // If subscribing failed the task has said so and ended; run anyway.
            let _ = ready_rx.await;
            Some(task)
        }
        None => None,
    };
    let started_unix_us = unix_us();
    let status = match (&updates, cfg.status_interval) {
        (Some(client), Some(every)) => Some(actix::spawn(publish_statuses(client.clone(), cfg.clone(), devices.clone(), collector.clone(), started_unix_us, every))),
        _ => None,
    };
    on_started();
    let started = Instant::now();
    let arrivals = arrive(&cfg, &devices, &inputs, &claimed, started);
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
        publish_last_status(client, &cfg, &devices, &collector, started_unix_us).await;
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

/// One task per device handing it inputs at Poisson arrivals from
/// `started`, until the duration or the fleet's input budget (`claimed`
/// counts the inputs handed over) is spent.
fn arrive(cfg: &FleetConfig, devices: &[(String, Addr<Device>)], inputs: &Arc<TestInputs>, claimed: &Rc<Cell<usize>>, started: Instant) -> Vec<tokio::task::JoinHandle<()>> {
    let budget = cfg.max_inputs.unwrap_or(usize::MAX);
    let mut arrivals = Vec::with_capacity(cfg.devices);
    for (d, (_, device)) in devices.iter().enumerate() {
        let device = device.clone();
        let inputs = inputs.clone();
        let claimed = claimed.clone();
        let mut rng = SplitMix64::new(cfg.seed.wrapping_mul(0x100_0000_01B3).wrapping_add(d as u64));
        let (rate, duration) = (cfg.rate_per_device, cfg.duration);
        arrivals.push(actix::spawn(async move {
            let mut at = Duration::ZERO;
            loop {
                at += Duration::from_secs_f64(rng.exponential(rate));
                if at >= duration {
                    break;
                }
                tokio::time::sleep_until(tokio::time::Instant::from_std(started + at)).await;
                let i = claimed.get();
                if i >= budget {
                    break;
                }
                claimed.set(i + 1);
                let k = i % inputs.len();
                // Unbounded on purpose: the arrival process is the load being
                // simulated, and every input handed over must get its outcome
                // (`run_fleet`'s drain waits for the backlog).
                let arrived = Instant::now();
                device.do_send(Infer { arrival: i as u64, arrived, input_index: k, input: inputs.images[k].clone(), label: inputs.labels[k] });
            }
        }));
    }
    arrivals
}

/// Publishes the fleet's status every `every` (until aborted).
async fn publish_statuses(client: async_nats::Client, cfg: FleetConfig, devices: Vec<(String, Addr<Device>)>, collector: Addr<Collector>, started_unix_us: u64, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        publish_status(&client, &cfg.fleet_id, &cfg.group, &devices, &collector, started_unix_us, true).await;
    }
}

/// The fleet's final status. It must leave before the process exits,
/// unless the server is gone: then a flush would wait for it forever.
async fn publish_last_status(client: &async_nats::Client, cfg: &FleetConfig, devices: &[(String, Addr<Device>)], collector: &Addr<Collector>, started_unix_us: u64) {
    let last = async {
        publish_status(client, &cfg.fleet_id, &cfg.group, devices, collector, started_unix_us, false).await;
        let _ = client.flush().await;
    };
    if tokio::time::timeout(Duration::from_millis(500), last).await.is_err() {
        tracing::warn!("fleet: could not publish its last status (NATS unreachable)");
    }
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

pub fn unix_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

/// Publishes a fleet's `FleetStatus`: the collector's totals and the plans
/// the devices hold (asked of each device, so it is what they apply, not what
/// was sent to them). A failed publish is reported and the fleet goes on.
pub async fn publish_status(
    client: &async_nats::Client,
    fleet_id: &str,
    group: &str,
    devices: &[(String, Addr<Device>)],
    collector: &Addr<Collector>,
    started_unix_us: u64,
    running: bool,
) {
    use branchpoint_messages::{encode, subjects, AppliedPlan, FleetStatus};
    let Ok((summary, latency)) = collector.send(GetSnapshot).await else { return };
    let mut applied: Vec<AppliedPlan> = Vec::new();
    for (_, d) in devices {
        let Ok((branch, p_tar, temperature)) = d.send(GetPlan).await else { continue };
        match applied.iter_mut().find(|a| a.partition_branch as usize == branch && a.p_tar == p_tar && a.temperature == temperature) {
            Some(a) => a.devices += 1,
            None => applied.push(AppliedPlan { partition_branch: branch as u8, p_tar, temperature, devices: 1 }),
        }
    }
    let status = FleetStatus {
        fleet_id: fleet_id.to_string(),
        group: group.to_string(),
        devices: devices.len() as u32,
        running,
        at_unix_us: unix_us(),
        started_unix_us,
        summary,
        latency_le_ms: latency.le_ms,
        latency_le_counts: latency.counts,
        latency_sum_ms: latency.sum_ms,
        applied,
    };
    match encode(&status) {
        Ok(bytes) => {
            if let Err(e) = client.publish(subjects::fleet_status(fleet_id), bytes.into()).await {
                tracing::warn!("fleet: could not publish its status: {e}");
            }
        }
        Err(e) => tracing::warn!("fleet: could not encode its status: {e}"),
    }
}

/// Forwards plans and temperatures to the devices. Plans come only from
/// the control store (JetStream key-value, see `control`), their one home:
/// the stored state is applied before `ready` fires, so devices start from
/// it, and later writes follow. A model's temperatures also come on
/// `branchpoint.calibration.update`, for a calibrator without a store.
///
/// Only temperatures for these weights (the model's, or a device's group's)
/// and plans for a device's group or the device itself are applied.
/// Malformed updates are dropped with a message on stderr: a bad publisher
/// must not stop the fleet. Without JetStream the fleet says so once, and
/// its devices keep their starting plan.
pub async fn forward_updates(client: async_nats::Client, devices: Vec<FleetDevice>, sha256: String, ready: tokio::sync::oneshot::Sender<()>) {
    use branchpoint_messages::{decode, subjects, CalibrationUpdate};
    use futures::StreamExt;
    let Ok(mut cal) = client.subscribe(subjects::CALIBRATION_UPDATE).await else {
        tracing::warn!("fleet: could not subscribe to calibration updates");
        return;
    };
    let apply = Forward { devices, sha256 };
    // Plans live only in the control store: without it the devices keep
    // the plan they started with.
    let mut stored: std::pin::Pin<Box<dyn futures::Stream<Item = ControlChange>>> = match resume(&client, &apply).await {
        Ok(watch) => Box::pin(watch),
        Err(e) => {
            tracing::warn!("fleet: no control store, so no plan reaches these devices (they keep their starting plan) and temperatures come only from the update subject: {e}");
            Box::pin(futures::stream::pending())
        }
    };
    let _ = client.flush().await;
    let _ = ready.send(());
    loop {
        tokio::select! {
            Some(msg) = cal.next() => match decode::<CalibrationUpdate>(&msg.payload) {
                // A group's temperatures travel only through the store.
                Ok(u) if u.group.is_some() => tracing::warn!("fleet: ignored a group's temperatures on the update subject (they travel through the control store)"),
                Ok(u) => apply.calibration(&u),
                Err(e) => tracing::warn!("fleet: ignored a malformed calibration update: {e}"),
            },
            Some(change) = stored.next() => match change {
                ControlChange::Plan(p) => apply.plan(&p),
                ControlChange::Calibration(u) => apply.calibration(&u),
            },
            else => return,
        }
    }
}

/// Applies the stored state (plans and temperatures each in the order they
/// were written, so the latest wins as it would have live), then returns
/// the watch of the store, which repeats the stored state (harmless:
/// applying is idempotent) and then follows every write.
async fn resume(client: &async_nats::Client, apply: &Forward) -> Result<impl futures::Stream<Item = ControlChange>, ActorError> {
    let store = ControlStore::open(client).await?;
    let mut plans = store.plans().await?;
    plans.sort_by_key(|p| p.revision);
    for p in &plans {
        apply.plan(&p.value);
    }
    for c in store.calibrations(&apply.sha256).await? {
        apply.calibration(&c.value);
    }
    store.watch(&apply.sha256).await
}

/// One device of a fleet, as updates address it: by its id or its group.
#[derive(Clone)]
pub struct FleetDevice {
    pub id: String,
    pub group: String,
    pub addr: Addr<Device>,
}

/// Who gets which update.
struct Forward {
    devices: Vec<FleetDevice>,
    sha256: String,
}

impl Forward {
    fn calibration(&self, u: &branchpoint_messages::CalibrationUpdate) {
        if u.model_sha256 != self.sha256 {
            tracing::warn!("fleet: ignored a calibration update for other weights");
            return;
        }
        for d in &self.devices {
            if u.group.as_ref().is_none_or(|g| *g == d.group) {
                d.addr.do_send(ApplyCalibration { temperatures: u.temperatures.clone() });
            }
        }
    }

    fn plan(&self, p: &branchpoint_messages::PlanUpdate) {
        use branchpoint_messages::PlanTarget;
        // Decoding checked the branch; a plan made in process may not have been.
        let partition_branch = match branchpoint_messages::PartitionBranch::new(p.partition_branch.into()) {
            Ok(b) => b,
            Err(e) => return tracing::warn!("fleet: ignored a plan: {e}"),
        };
        let apply = ApplyPlan { partition_branch, p_tar: p.p_tar, target_accuracy: p.certified.map(|c| c.accuracy), codec: p.codec };
        for d in &self.devices {
            let for_me = match &p.target {
                PlanTarget::Device(t) => *t == d.id,
                PlanTarget::Group(g) => *g == d.group,
            };
            if for_me {
                d.addr.do_send(apply.clone());
            }
        }
    }
}
