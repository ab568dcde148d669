//! Real-time replay: the live actors (device threads running the real head,
//! a cloud worker pool with dynamic batching, the partition planner, the
//! collector), in-process or across a NATS server, with each device's
//! uplink emulated on the wall clock (`branchpoint_actors::emulation`).
//!
//! Each policy runs for the scenario's duration, one after the other, with
//! the same arrivals as the virtual-time replay (same per-device seeds).
//! Device compute is this machine's real head forward, not the profile
//! times `compute.device_slowdown`. The oracle needs every fixed plan
//! replayed in hindsight, so it exists only in virtual time.
//!
//! A group's `[groups.shift]` switches its devices to the corrupted test
//! images from its time on. The watched policy runs the whole live loop
//! over NATS: devices audit, workers send the final exit's answers to a
//! calibrator (`serve_calibration_nats`), whose drift refits reach the
//! devices through the control store; its report's estimates are the
//! calibrator's statuses, its truth the devices' outcomes. Audits bypass
//! the emulated uplink (they would queue ahead of real offloads on a FIFO
//! link); their bytes and worker time are counted instead, as in virtual
//! time.
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr};
use anyhow::{bail, Context, Result};
use branchpoint_actors::calibration::nats::serve_calibration_nats;
use branchpoint_actors::calibration::{Calibrator, CalibratorConfig, Initial, WatchSettings};
use branchpoint_actors::clock::unix_us;
use branchpoint_actors::collector::{AuditCounts, Collector, Decided, GetAuditCounts, Outcome, TakeOutcomes};
use branchpoint_actors::compute::{Executor, ModelSpec};
use branchpoint_actors::control::ControlStore;
use branchpoint_actors::device::{AuditSettings, Device, DeviceConfig};
use branchpoint_actors::emulation::EmulationSpec;
use branchpoint_actors::fleet::nats::{forward_updates, publish_status, FleetDevice};
use branchpoint_actors::fleet::{drain, drive_arrivals, Arrivals, DeviceThreads, TestInputs};
use branchpoint_actors::planner::nats::{serve_planner_nats, NatsPlans, NatsReports};
use branchpoint_actors::planner::{watch_in_process_pool, Planner, TakePlanLog};
use branchpoint_actors::transport::{InProcessPool, OffloadLink};
use branchpoint_actors::worker::nats::{publish_status as publish_worker_status, serve_nats, NatsAudits};
use branchpoint_actors::worker::{Batcher, GetWorkerStats, ServedModel, WorkerConfig};
use branchpoint_core::planner::{Costs, LinkEstimator};
use branchpoint_messages::PartitionBranch;
use branchpoint_models::net::PartitionPoint;

use super::sim::{device_seed, Bin, LevelPlanning, Planning, Plans, SimConfig, WatchPoint, WatchTrace};
use super::{policy_plans, Policy, PolicyRun, Prepared, Scenario};
use crate::cli::NatsArgs;

pub struct LiveSetup<'a> {
    pub scenario: &'a Scenario,
    pub cfg: &'a SimConfig,
    pub prepared: &'a Prepared,
    pub spec: ModelSpec,
    pub points: Vec<PartitionPoint>,
    pub inputs: Arc<TestInputs>,
    /// The test inputs as each of the scenario's shifts corrupts them
    /// (`Scenario::shift_views`, in order).
    pub shifted: Vec<Arc<TestInputs>>,
    pub nats: &'a NatsArgs,
    pub model_sha256: String,
    /// Where the watched policy's calibrator finds the validation split.
    pub data_dir: Option<std::path::PathBuf>,
}

/// How often the run's workers tell their load: the worker's default
/// (`branchpoint worker --status-interval-ms`).
const WORKER_STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Runs every policy but the oracle live, one after the other.
pub fn replay_live(setup: &LiveSetup, on_policy: &dyn Fn(Policy)) -> Result<Vec<PolicyRun>> {
    // `--nats` turns a virtual-time file into a live replay; these two have
    // no live counterpart yet, and ignoring them would replay another scenario.
    if setup.scenario.workers.autoscale.is_some() {
        bail!(
            "scenario {}: workers.autoscale is replayed in virtual time only; run it without --nats (or see `branchpoint stack up` for live autoscaling)",
            setup.scenario.path.display()
        );
    }
    if setup.scenario.policies.contains(&Policy::Watched) && setup.nats.nats.is_none() {
        bail!(
            "scenario {}: the watched policy in real time needs --nats URL (a NATS server with JetStream): its refits reach the devices through the control store",
            setup.scenario.path.display()
        );
    }
    if setup.scenario.policies.contains(&Policy::Adaptive) && setup.nats.nats.is_none() {
        bail!(
            "scenario {}: the adaptive policy in real time needs --nats URL (a NATS server with JetStream): the workers' audit results reach its planner over NATS, and its plans reach the devices through the control store; list adaptive-network to run the planner alone in process",
            setup.scenario.path.display()
        );
    }
    let mut runs = Vec::new();
    for &policy in &setup.scenario.policies {
        let Some(plans) = policy_plans(policy, setup.scenario, setup.prepared) else {
            tracing::warn!("policy oracle: skipped in real time (it replays every fixed plan in hindsight; use time = \"virtual\")");
            continue;
        };
        on_policy(policy);
        runs.push(run_policy(setup, policy, &plans)?);
    }
    Ok(runs)
}

fn run_policy(setup: &LiveSetup, policy: Policy, plans: &Plans) -> Result<PolicyRun> {
    let (s, cfg, prepared) = (setup.scenario, setup.cfg, setup.prepared);
    let adaptive = matches!(plans, Plans::Adaptive(_) | Plans::Controlled { .. });
    let watched = matches!(plans, Plans::Watched(_));
    let controlled = matches!(plans, Plans::Controlled { .. });
    let system = actix::System::new();
    let (outcomes, log, claimed, epoch_unix, statuses, audits, mean_batch, control_log) = system.block_on(async {
        let client = match &setup.nats.nats {
            Some(_) => Some(crate::nats::connect(setup.nats, "branchpoint-run").await?),
            None => None,
        };
        // Watched and controlled devices' audits come back from the workers.
        let (pool, link) = start_pool(setup, client.as_ref(), watched || controlled).await?;
        // The report is made from every outcome.
        let collector = Collector::new(prepared.sim.num_branches()).keeping_outcomes().start();
        let (planner, nats_reports) = start_planning(setup, client.as_ref(), plans, &pool).await?;

        // Watched runs: the groups' starting plans in the control store (so
        // a refit left there by an earlier run does not apply), then a
        // calibrator that watches the audits and stores its refits.
        let calibrator = match (&client, plans) {
            (Some(c), Plans::Watched(start)) => Some(start_calibrator(setup, c, start).await?),
            _ => None,
        };
        let watch_statuses = match (&client, watched) {
            (Some(c), true) => Some(collect_statuses(c, &setup.model_sha256).await?),
            _ => None,
        };

        let threads = DeviceThreads::start(setup.spec.clone(), std::thread::available_parallelism().map_or(1, |n| n.get()))?;
        // Time 0 of every link: when the first arrivals may come.
        let epoch = Instant::now() + Duration::from_millis(500);
        let epoch_unix = unix_us() + 500_000;
        let (configs, places) = device_configs(setup, plans, planner.as_ref(), nats_reports.as_ref(), epoch)?;
        let ids: Vec<String> = configs.iter().map(|c| c.id.clone()).collect();
        let devices = threads.spawn(configs, link, collector.clone()).await?;
        // Over NATS the run shows up as a fleet named after the scenario and
        // policy, for a control plane watching it (`--listen`, `serve`).
        let fleet_id: String = format!("{}-{}", s.name, policy.name()).chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).take(64).collect();
        let named: Vec<_> = ids.iter().cloned().zip(devices.iter().cloned()).collect();
        let status_started = unix_us();
        let status = match &client {
            Some(c) => {
                // Plans and temperatures from NATS reach only the runs that
                // take them: the planner's per-device plans, and the watched
                // groups' refits. The fixed policies keep their own plans
                // whatever an earlier run left in the store.
                if adaptive || watched {
                    if adaptive {
                        forget_device_plans(setup, c, &ids).await?;
                    }
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let addressed = configs_groups(s, &ids, watched).into_iter().zip(devices.iter().cloned()).map(|((id, group), addr)| FleetDevice { id, group, addr }).collect();
                    actix::spawn(forward_updates(c.clone(), addressed, setup.model_sha256.clone(), tx));
                    let _ = rx.await;
                }
                let (c, named, collector, id) = (c.clone(), named.clone(), collector.clone(), fleet_id.clone());
                let started = status_started;
                Some(actix::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(250));
                    loop {
                        tick.tick().await;
                        publish_status(&c, &id, "replay", &named, &collector, started, true).await;
                    }
                }))
            }
            None => None,
        };

        let claimed = arrive(setup, places, devices, epoch).await;
        // Every input gets its outcome, however far behind the device
        // threads are; an offload ends by its deadline at the latest.
        let longest = cfg.groups.iter().map(|g| g.deadline_us).max().unwrap_or(0);
        let stall = Duration::from_micros(longest) + Duration::from_secs(5);
        let no_interrupt = branchpoint_actors::device::Interrupt::default();
        drain(&collector, claimed, &no_interrupt, stall, Duration::ZERO, std::future::pending(), None).await?;
        if let (Some(task), Some(c)) = (status, &client) {
            task.abort();
            let last = async {
                publish_status(c, &fleet_id, "replay", &named, &collector, status_started, false).await;
                let _ = c.flush().await;
            };
            if tokio::time::timeout(Duration::from_secs(1), last).await.is_err() {
                tracing::warn!("run: could not publish the policy's last status (NATS unreachable)");
            }
        }
        let outcomes = collector.send(TakeOutcomes).await?;
        let audits = collector.send(GetAuditCounts).await?;
        let (log, control_log) = planner_logs(planner.as_ref(), controlled).await?;
        let statuses = match watch_statuses {
            Some((task, seen)) => last_statuses(task, seen).await,
            None => Vec::new(),
        };
        if let Some(c) = calibrator {
            let still = c.shutdown(Duration::from_secs(5));
            if !still.is_empty() {
                tracing::warn!("run: the watched policy's calibrator is still refitting on {still:?}");
            }
        }
        // Joined before the next policy starts and before the process exits.
        let mut threads = threads;
        threads.shutdown();
        let mean_batch = mean_batch(&pool).await?;
        Ok::<_, anyhow::Error>((outcomes, log, claimed, epoch_unix, statuses, audits, mean_batch, control_log))
    })?;

    let Tallied { bins, latencies, edge } = tally(setup, policy, &outcomes, &log, epoch_unix)?;
    let watch = match control_log {
        Some(changes) => control_traces(setup, &changes, epoch_unix),
        None if watched => watch_traces(setup, &outcomes, &statuses, &audits, epoch_unix),
        None => Vec::new(),
    };
    let (arrivals, outcomes) = (claimed as u64, outcomes.len() as u64);
    Ok(PolicyRun { policy, bins, latencies_us: latencies, arrivals, outcomes, mean_batch, choices: None, edge: Some(edge), watch, plan_changes: None })
}

/// Feeds every device its arrivals, the virtual-time replay's streams
/// (rate steps included) on the wall clock, until the scenario's end, and
/// gives how many inputs arrived.
async fn arrive(setup: &LiveSetup<'_>, places: Places, devices: Vec<Addr<Device>>, epoch: Instant) -> usize {
    let cfg = setup.cfg;
    let arrivals = places
        .into_iter()
        .zip(devices)
        .map(|((gi, k), device)| {
            let group = &cfg.groups[gi];
            // What the group's camera sees: the clean test images, and
            // after its shift the corrupted ones.
            let mut views = vec![(0, setup.inputs.clone())];
            if let Some((at, view)) = group.shift {
                views.push((at, setup.shifted[view - 1].clone()));
                if let Some(until) = group.shift_until_us {
                    views.push((until, setup.inputs.clone()));
                }
            }
            Arrivals { device, seed: device_seed(cfg.seed, gi, k), rate_steps: group.rate_steps.clone(), views }
        })
        .collect();
    let claimed = Rc::new(Cell::new(0usize));
    for t in drive_arrivals(arrivals, epoch, cfg.duration_us, usize::MAX, &claimed) {
        let _ = t.await;
    }
    claimed.get()
}

/// The calibrator's statuses of a watched run, once one more (it publishes
/// every second) covers the last audits; a gone calibrator ends the wait.
async fn last_statuses(task: tokio::task::JoinHandle<()>, seen: Statuses) -> Vec<branchpoint_messages::CalibrationStatus> {
    let (ended, until) = (unix_us(), Instant::now() + Duration::from_secs(3));
    while Instant::now() < until && seen.borrow().last().is_none_or(|s| s.at_unix_us < ended) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    task.abort();
    let v = seen.borrow().clone();
    v
}

/// The pool's mean batch, as virtual time counts it.
async fn mean_batch(pool: &[Addr<Batcher>]) -> Result<f64> {
    let (mut batches, mut batched) = (0u64, 0.0);
    for w in pool {
        let s = w.send(GetWorkerStats).await?;
        batches += s.batches;
        batched += s.mean_batch_size * s.batches as f64;
    }
    Ok(if batches > 0 { batched / batches as f64 } else { f64::NAN })
}

/// The run's worker pool: `workers` workers of one compute thread each, as
/// `branchpoint worker` runs and as virtual time has them, each batch
/// taking the scenario's compute time (the profile times `cloud_slowdown`),
/// as in virtual time, or longer if this machine is slower. In process a
/// request goes to one at random; over NATS each serves the offload
/// subjects in the workers' queue group (and, in watched runs, sends the
/// final exit's answers to the calibrator).
async fn start_pool(setup: &LiveSetup<'_>, client: Option<&async_nats::Client>, watched: bool) -> Result<(Vec<Addr<Batcher>>, OffloadLink)> {
    let cfg = setup.cfg;
    let served = || ServedModel { model_sha256: setup.model_sha256.clone(), partition_points: setup.points.clone() };
    let wcfg = |w: usize| WorkerConfig { worker_id: format!("run-worker-{w}"), max_batch: cfg.max_batch, max_wait: Duration::from_micros(cfg.max_wait_us) };
    let worker = |w: usize| -> Result<Batcher> {
        let exec = Executor::start_paced(vec![setup.spec.clone()], 1, vec![setup.prepared.sim.tail_us.clone()])?;
        Ok(Batcher::new(wcfg(w), exec, vec![served()]).with_compute_threads(1))
    };
    let mut pool = Vec::new();
    let Some(c) = client else {
        for w in 0..cfg.workers {
            pool.push(worker(w)?.start());
        }
        let link = InProcessPool::link(pool.clone());
        return Ok((pool, link));
    };
    for w in 0..cfg.workers {
        let wc = crate::nats::connect(setup.nats, &format!("branchpoint-run-worker-{w}")).await?;
        let batcher = worker(w)?;
        let batcher = if watched { batcher.with_audit_sink(NatsAudits(wc.clone())) } else { batcher }.start();
        pool.push(batcher.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = wcfg(w).worker_id;
        // Their load, for a control plane watching the run (`--listen`).
        actix::spawn(publish_worker_status(wc.clone(), batcher.clone(), id.clone(), WORKER_STATUS_INTERVAL));
        actix::spawn(async move {
            // Served until the run ends and aborts it.
            let ready = move || {
                let _ = tx.send(());
            };
            if let Err(e) = serve_nats(wc, batcher, id, ready, std::future::pending()).await {
                tracing::error!("worker: {e}");
            }
        });
        rx.await.context("a cloud worker could not subscribe to NATS")?;
    }
    Ok((pool, OffloadLink::Nats(c.clone())))
}

/// The adaptive policy's planner, with each group's costs; it hears the
/// pool's load when cloud-aware (over NATS from the workers' statuses, in
/// process from the batchers, as often), and over NATS it serves the
/// devices' reports.
async fn start_planner(
    setup: &LiveSetup<'_>,
    client: Option<&async_nats::Client>,
    planning: &Planning,
    pool: &[Addr<Batcher>],
    controls: Vec<(String, branchpoint_core::control::GroupControl)>,
) -> Result<Addr<Planner>> {
    let (s, cfg, sim) = (setup.scenario, setup.cfg, &setup.prepared.sim);
    let costs: BTreeMap<String, Costs> = s
        .groups
        .iter()
        .zip(&cfg.groups)
        .map(|(g, group)| {
            let costs = Costs {
                head_us: sim.head_us.clone(),
                upload_bytes: sim.upload_bytes.clone(),
                deadline_us: group.deadline_us as f64,
                arrival_rate: group.rate,
                miss_bound: cfg.miss_bound,
                pool_utilisation: cfg.pool_utilisation,
                // Cloud-aware, the planner hears the pool's load; blind, it
                // never counts its backlog.
                tail_us_per_request: if planning.cloud_aware {
                    (1..=sim.num_branches()).map(|k| sim.tail_time_us(k, cfg.max_batch) / cfg.max_batch as f64).collect()
                } else {
                    Vec::new()
                },
            };
            (g.name.clone(), costs)
        })
        .collect();
    // Over NATS the plans go where remote devices learn them: the store.
    let sink = match client {
        Some(c) => {
            let store = ControlStore::open_with(c, setup.nats.store_settings()).await.context("an adaptive policy over NATS keeps its plans in the control store")?;
            Some(Box::new(NatsPlans::new(store, Vec::new())) as Box<dyn branchpoint_actors::plans::PlanSink>)
        }
        None => None,
    };
    let controlled = !controls.is_empty();
    let planner = Planner::new(Arc::new(sim.stats.with_codecs(&planning.codecs)), costs, None, sink).with_controls(controls).start();
    if let (Some(c), true) = (client, controlled) {
        // The control loops' evidence: the workers' audit results.
        branchpoint_actors::planner::nats::spawn_control_audits(c.clone(), planner.clone(), setup.model_sha256.clone()).await.context("the adaptive policy's planner")?;
    }
    match client {
        None if planning.cloud_aware => {
            actix::spawn(watch_in_process_pool(pool.to_vec(), planner.clone(), WORKER_STATUS_INTERVAL));
        }
        None => {}
        Some(c) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (c, p) = (c.clone(), planner.clone());
            actix::spawn(async move {
                let ready = move || {
                    let _ = tx.send(());
                };
                if let Err(e) = serve_planner_nats(c, p, ready, std::future::pending()).await {
                    tracing::error!("planner: {e}");
                }
            });
            rx.await.context("the planner could not subscribe to NATS")?;
        }
    }
    Ok(planner)
}

/// The planner of a run that plans (none for the others), and over NATS the
/// edge its devices report through, as remote devices do.
async fn start_planning(
    setup: &LiveSetup<'_>,
    client: Option<&async_nats::Client>,
    plans: &Plans,
    pool: &[Addr<Batcher>],
) -> Result<(Option<Addr<Planner>>, Option<Addr<NatsReports>>)> {
    let planner = match plans {
        Plans::Adaptive(planning) => Some(start_planner(setup, client, planning, pool, Vec::new()).await?),
        Plans::Controlled { planning, levels } => Some(start_planner(setup, client, planning, pool, controls(setup, planning, levels)?).await?),
        _ => None,
    };
    let reports = match (client, &planner) {
        (Some(c), Some(_)) => Some(NatsReports::new(c.clone()).start()),
        _ => None,
    };
    Ok((planner, reports))
}

/// The planner's log of plans and, for the adaptive policy, of what its
/// control loops did.
type ControlLog = (Vec<branchpoint_actors::planner::ControlRecord>, u64);
async fn planner_logs(planner: Option<&Addr<Planner>>, controlled: bool) -> Result<(Vec<branchpoint_actors::planner::PlanRecord>, Option<ControlLog>)> {
    let Some(p) = planner else { return Ok((Vec::new(), None)) };
    let control = if controlled { Some(p.send(branchpoint_actors::planner::TakeControlLog).await?) } else { None };
    Ok((p.send(TakePlanLog).await?, control))
}

/// What each group's control loop did (its planner's log, and the evidence
/// it refused), as the virtual-time replay's traces hold it: alarms and
/// refits at their inputs' times since the run's epoch.
fn control_traces(setup: &LiveSetup<'_>, changes: &(Vec<branchpoint_actors::planner::ControlRecord>, u64), epoch_unix: u64) -> Vec<WatchTrace> {
    use branchpoint_core::control::Change;
    let (log, refused) = changes;
    if *refused > 0 {
        tracing::warn!("run: the adaptive policy's planner refused {refused} piece(s) of evidence (malformed, or for a group or branch it does not plan)");
    }
    let since = |t: u64| t.saturating_sub(epoch_unix);
    setup
        .scenario
        .groups
        .iter()
        .map(|g| {
            let mut trace = WatchTrace::default();
            for r in log.iter().filter(|r| r.group == g.name) {
                match r.change {
                    Change::Void { t_us, .. } => trace.alarms_only.push(since(t_us)),
                    Change::Live { refit, .. } => trace.refits.push(branchpoint_core::monitor::Refit { t_us: since(refit.t_us), ..refit }),
                }
            }
            trace
        })
        .collect()
}

/// The adaptive policy's control loop per group, under its service level,
/// as the virtual-time replay builds them (`sim::controls`).
fn controls(setup: &LiveSetup<'_>, planning: &Planning, levels: &[LevelPlanning]) -> Result<Vec<(String, branchpoint_core::control::GroupControl)>> {
    let sim = &setup.prepared.sim;
    setup
        .scenario
        .groups
        .iter()
        .zip(levels)
        .map(|(g, l)| {
            let control = branchpoint_core::control::GroupControl::new(l.level, l.stats.with_codecs(&planning.codecs), &sim.temperatures, setup.cfg.watch, sim.reference.as_ref())?;
            Ok((g.name.clone(), control))
        })
        .collect()
}

/// Each device's place: its group's index and its own in the group.
type Places = Vec<(usize, usize)>;

/// Every device of the scenario, in group order, and its place (group,
/// index): the group's starting plan, its emulated uplink (time 0 at
/// `epoch`), reports to the planner (in process, or through the NATS edge)
/// and, in watched runs, audits.
fn device_configs(
    setup: &LiveSetup<'_>,
    plans: &Plans,
    planner: Option<&Addr<Planner>>,
    nats_reports: Option<&Addr<NatsReports>>,
    epoch: Instant,
) -> Result<(Vec<DeviceConfig>, Places)> {
    let (s, cfg, prepared) = (setup.scenario, setup.cfg, setup.prepared);
    let (adaptive, watched) = (matches!(plans, Plans::Adaptive(_) | Plans::Controlled { .. }), matches!(plans, Plans::Watched(_)));
    let controlled = match plans {
        Plans::Controlled { levels, .. } => Some(levels),
        _ => None,
    };
    let total: usize = cfg.groups.iter().map(|g| g.devices).sum();
    let mut configs = Vec::new();
    let mut places = Vec::new();
    for (gi, (g, sim)) in s.groups.iter().zip(&cfg.groups).enumerate() {
        let plan = match plans {
            // Validation keeps uncalibrated and watched runs in virtual
            // time; their starting plans are the groups' own.
            Plans::Fixed(p) | Plans::Uncalibrated(p) | Plans::Watched(p) => p[gi],
            Plans::Adaptive(planning) => prepared.sim.starting_plan(sim.initial, planning),
            Plans::Controlled { planning, levels } => levels[gi].starting_plan(prepared.sim.starting_plan(sim.initial, planning)),
        };
        let cap = sim.deadline_us as f64 / prepared.sim.upload_bytes.iter().map(|b| b.int8.min(b.f16).min(b.f32)).fold(f64::INFINITY, f64::min);
        for k in 0..g.devices {
            let n = configs.len();
            let reports = planner.map(|p| match nats_reports {
                Some(edge) => edge.clone().recipient(),
                None => p.clone().recipient(),
            });
            configs.push(DeviceConfig {
                id: device_id(&g.name, k),
                partition_branch: PartitionBranch::new(plan.branch).with_context(|| format!("group {}", g.name))?,
                p_tar: plan.p_tar,
                temperatures: match plans {
                    Plans::Uncalibrated(_) => vec![1.0; prepared.temperatures.len()],
                    _ => prepared.temperatures.clone(),
                },
                deadline: Duration::from_micros(sim.deadline_us),
                model_sha256: setup.model_sha256.as_str().into(),
                codec: plan.codec,
                emulation: Some(EmulationSpec {
                    link: Arc::new(sim.link.clone()),
                    epoch,
                    group: g.name.clone(),
                    seed: device_seed(cfg.seed, gi, k) ^ 0x5555_5555_5555_5555,
                    estimator: LinkEstimator::new(cfg.ewma_alpha, cap),
                    admission: adaptive,
                    safety: cfg.safety,
                    reports,
                    report_interval: Duration::from_micros(cfg.report_interval_us),
                    report_offset: Duration::from_micros(cfg.report_interval_us * (n as u64 + 1) / (total as u64 + 1)) + Duration::from_millis(500),
                    probe_bytes: cfg.probe_bytes,
                    arrival_rates: sim.rate_steps.clone(),
                }),
                interrupt: Default::default(),
                audit: (watched || controlled.is_some()).then(|| AuditSettings {
                    rate: s.watch.audit_rate,
                    group: g.name.clone(),
                    model_sha256: setup.model_sha256.clone(),
                    // A controlled group's target is its service level's.
                    target_accuracy: Some(controlled.and_then(|l| l.get(gi)).map_or(sim.target, |l| l.level.accuracy)),
                    max_in_flight: 4,
                    // The virtual-time replay's audit coins are another
                    // stream; these only need to repeat.
                    seed: device_seed(cfg.seed, gi, k) ^ 0xa0d1_7a0d_17a0_d17a,
                }),
            });
            places.push((gi, k));
        }
    }
    Ok((configs, places))
}

/// The run's outcomes into the report's bins, by arrival time, and the
/// planner's reports beside them: counted as virtual time counts them.
fn tally(setup: &LiveSetup, policy: Policy, outcomes: &[Outcome], log: &[branchpoint_actors::planner::PlanRecord], epoch_unix: u64) -> Result<Tallied> {
    let (s, cfg, prepared) = (setup.scenario, setup.cfg, setup.prepared);
    // Outcomes into the report's bins, by arrival time.
    let group_of: HashMap<&str, usize> = s.groups.iter().enumerate().map(|(i, g)| (g.name.as_str(), i)).collect();
    let group_of_device = devices_groups(s);
    let mut bins = vec![vec![Bin::default(); cfg.bins()]; cfg.groups.len()];
    let mut latencies = vec![Vec::new(); cfg.groups.len()];
    let mut edge = vec![super::sim::EdgeTally::default(); prepared.sim.num_branches()];
    // The adaptive policy's plans, per device in the order they were made:
    // each on-device answer counts the prediction of the plan it was decided
    // under (the latest such plan made before it arrived).
    let mut plans_of: HashMap<&str, Vec<&branchpoint_actors::planner::PlanRecord>> = HashMap::new();
    if policy == Policy::Adaptive {
        for r in log {
            plans_of.entry(r.device_id.as_str()).or_default().push(r);
        }
    }
    for o in outcomes {
        if let Some(e) = &o.error {
            bail!("policy {}: device {} could not decide input {}: {e}", policy.name(), o.device_id, o.input_index);
        }
        let group = *group_of_device.get(&o.device_id).context("an outcome from an unknown device")?;
        let bin = ((o.arrived_unix_us.saturating_sub(epoch_unix) / cfg.bin_us) as usize).min(cfg.bins() - 1);
        let b = &mut bins[group][bin];
        b.count(&o.counted(), branchpoint_core::planner::Plan::f32(o.partition_branch, o.p_tar));
        if o.decided == Decided::Device && !o.declined {
            // What a plan predicts on the device is the same under every
            // codec: f32's statistics stand for all.
            let plan = branchpoint_core::planner::Plan::f32(o.partition_branch, o.p_tar);
            let arrived_us = o.arrived_unix_us.saturating_sub(epoch_unix);
            let m = &prepared.sim;
            b.edge_agree += u64::from(o.class == m.final_of(cfg.groups[group].view_at(arrived_us), o.input_index % m.inputs()));
            let own = plans_of.get(o.device_id.as_str()).and_then(|v| {
                v.iter()
                    .rev()
                    .find(|r| r.at_us <= arrived_us && r.prediction.plan.branch == o.partition_branch && r.prediction.plan.p_tar == o.p_tar)
                    .map(|r| r.prediction.edge_accuracy)
            });
            // Before its first plan, a device runs the group's starting plan.
            let predicted = own.or_else(|| prepared.sim.predictions.lookup(plan).map(|s| s.edge_accuracy)).unwrap_or(f64::NAN);
            b.predicted_edge_sum += predicted;
            edge[o.partition_branch - 1].add_predicted(predicted, o.correct());
        }
        if let Some(sent) = o.sent {
            b.sent_by_codec[sent.codec.index()] += 1;
            b.uplink_bytes += sent.bytes;
        }
        latencies[group].push(o.latency.total_us.min(u64::from(u32::MAX)) as u32);
    }
    for r in log {
        let Some(&g) = group_of.get(r.group.as_str()) else { continue };
        let b = &mut bins[g][((r.at_us / cfg.bin_us) as usize).min(cfg.bins() - 1)];
        b.reports += 1;
        b.est_mbit_s_sum += r.estimated_mbit_s;
        b.predicted_accuracy_sum += r.prediction.accuracy;
        b.predicted_miss_sum += r.prediction.miss_rate;
    }
    Ok(Tallied { bins, latencies, edge })
}

/// A live run counted: per group its bins and latencies, per branch its
/// exits by confidence.
struct Tallied {
    bins: Vec<Vec<Bin>>,
    latencies: Vec<Vec<u32>>,
    edge: Vec<super::sim::EdgeTally>,
}

/// A device's id in a live replay: its group's name and its place there.
fn device_id(group: &str, k: usize) -> String {
    format!("{group}-{k}")
}

/// Each device's group (its index in the scenario), by id: groups are data
/// the replay keeps, not read back out of the ids.
fn devices_groups(s: &Scenario) -> HashMap<String, usize> {
    s.groups.iter().enumerate().flat_map(|(gi, g)| (0..g.devices).map(move |k| (device_id(&g.name, k), gi))).collect()
}

/// Each device's id and the group plans address it by: its group's name in
/// watched runs, none otherwise (the planner plans devices one by one).
fn configs_groups(s: &Scenario, ids: &[String], watched: bool) -> Vec<(String, String)> {
    let mut out = Vec::with_capacity(ids.len());
    let mut i = 0;
    for g in &s.groups {
        for _ in 0..g.devices {
            out.push((ids[i].clone(), if watched { g.name.clone() } else { String::new() }));
            i += 1;
        }
    }
    out
}

/// Removes the plans an earlier run's planner stored for these devices, so
/// that they start from the policy's own plan, not from another policy's.
async fn forget_device_plans(setup: &LiveSetup<'_>, client: &async_nats::Client, ids: &[String]) -> Result<()> {
    let store = ControlStore::open_with(client, setup.nats.store_settings()).await.context("an adaptive policy over NATS keeps its plans in the control store")?;
    for id in ids {
        store.delete_plan(&branchpoint_messages::PlanTarget::Device(id.clone())).await?;
    }
    Ok(())
}

/// The watched run's calibrator: the groups' starting plans go into the
/// control store, stale group refits out of it, then the calibrator starts
/// (fitting the scenario's method on the validation split) and serves.
async fn start_calibrator(
    setup: &LiveSetup<'_>,
    client: &async_nats::Client,
    start: &[branchpoint_core::planner::Plan],
) -> Result<branchpoint_actors::calibration::CalibratorHandle> {
    let s = setup.scenario;
    let store = ControlStore::open_with(client, setup.nats.store_settings()).await.context("the watched policy keeps its plans and refits in the control store")?;
    for (g, plan) in s.groups.iter().zip(start) {
        store.delete_group_calibration(&setup.model_sha256, &g.name).await?;
        let update = branchpoint_messages::PlanUpdate {
            target: branchpoint_messages::PlanTarget::Group(g.name.clone()),
            partition_branch: PartitionBranch::new(plan.branch).with_context(|| format!("group {}", g.name))?.byte(),
            p_tar: plan.p_tar,
            certified: None,
            codec: Some(plan.codec),
            temperature: None,
        };
        store.put_plan(&update).await?;
    }
    let w = &s.watch;
    let secs = |v: f64| (v * 1e6).round() as u64;
    let watch = WatchSettings {
        window_us: secs(w.window_s).max(1),
        max_observations: 200_000,
        drift_margin: w.drift_margin,
        alarm_alpha: w.alarm_alpha,
        delta: w.delta,
        min_refit_sample: w.min_refit_sample,
        auto_refit: w.auto_refit,
        min_refit_interval_us: secs(w.min_refit_interval_s),
    };
    let cfg = CalibratorConfig { model: setup.spec.model.clone(), data_dir: setup.data_dir.clone(), initial: Initial::Fit(setup.prepared.method), watch };
    let (handle, _) = Calibrator::start(cfg).await.context("starting the watched policy's calibrator")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (c, h) = (client.clone(), handle.clone());
    actix::spawn(async move {
        let ready = move || {
            let _ = tx.send(());
        };
        if let Err(e) = serve_calibration_nats(c, h, Some(store), ready, std::future::pending()).await {
            tracing::error!("calibrator: {e}");
        }
    });
    rx.await.context("the watched policy's calibrator could not serve on NATS")?;
    Ok(handle)
}

type Statuses = Rc<std::cell::RefCell<Vec<branchpoint_messages::CalibrationStatus>>>;

/// Records the statuses of the calibrator of `model_sha256` while a
/// watched run lasts (one a second).
async fn collect_statuses(client: &async_nats::Client, model_sha256: &str) -> Result<(tokio::task::JoinHandle<()>, Statuses)> {
    use futures::StreamExt;
    let mut sub = client.subscribe(branchpoint_messages::subjects::CALIBRATION_STATUS).await.map_err(|e| anyhow::anyhow!("subscribing to the calibrator's statuses: {e}"))?;
    let seen: Statuses = Default::default();
    let (into, sha) = (seen.clone(), model_sha256.to_string());
    let task = actix::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Ok(status) = branchpoint_messages::decode::<branchpoint_messages::CalibrationStatus>(&msg.payload) {
                if status.model_sha256 == sha {
                    into.borrow_mut().push(status);
                }
            }
        }
    });
    Ok((task, seen))
}

/// Per group of a watched run: the calibrator's estimates at the end of
/// each bin beside the truth over the same inputs, its refits and alarms,
/// and what the audits cost.
fn watch_traces(
    setup: &LiveSetup,
    outcomes: &[Outcome],
    statuses: &[branchpoint_messages::CalibrationStatus],
    audits: &std::collections::BTreeMap<String, AuditCounts>,
    epoch_unix: u64,
) -> Vec<WatchTrace> {
    let (s, cfg, m) = (setup.scenario, setup.cfg, &setup.prepared.sim);
    let group_of_device = devices_groups(s);
    let rel = |unix: u64| unix.saturating_sub(epoch_unix);
    let mut traces = Vec::with_capacity(s.groups.len());
    for (gi, g) in s.groups.iter().enumerate() {
        let sim = &cfg.groups[gi];
        let branch = sim.initial.branch;
        let rows: Vec<(u64, &branchpoint_messages::BranchWatch)> = statuses
            .iter()
            .flat_map(|st| st.watched.iter().filter(|w| w.group == g.name && usize::from(w.partition_branch) == branch).map(move |w| (rel(st.at_unix_us), w)))
            .collect();
        let mut trace = WatchTrace::default();
        // Refits, each once (a row repeats the latest until the next), and
        // alarms that no refit followed, at the status that first showed them.
        let (mut alarms, mut refits) = (0u64, 0u64);
        for (t, w) in &rows {
            if let Some(r) = w.last_refit {
                let t_us = rel(r.decided_at_unix_us);
                if trace.refits.last().is_none_or(|last| last.t_us != t_us) {
                    let refit = branchpoint_core::monitor::Refit {
                        t_us,
                        temperature: r.temperature,
                        threshold: r.threshold,
                        fit_inputs: r.fit_inputs as usize,
                        certify_inputs: r.certify_inputs as usize,
                        // The wire's refit summary does not carry it.
                        predicted_agreement: None,
                    };
                    trace.refits.push(refit);
                }
            }
            if w.alarms < alarms || w.refits < refits {
                // A new monitor (another plan): its counts start again.
                (alarms, refits) = (0, 0);
            }
            let new_alarms = (w.alarms - alarms).saturating_sub(w.refits - refits);
            trace.alarms_only.extend(std::iter::repeat_n(*t, new_alarms as usize));
            (alarms, refits) = (w.alarms, w.refits);
        }
        // The truth: the group's inputs that exited by confidence under the
        // plan in force, in the calibrator's window.
        let decided: Vec<(u64, f64, bool, bool)> = outcomes
            .iter()
            .filter(|o| group_of_device.get(&o.device_id) == Some(&gi) && o.decided == Decided::Device && !o.declined)
            .map(|o| {
                let t = rel(o.arrived_unix_us);
                let view = sim.view_at(t);
                let agrees = o.class == m.final_of(view, o.input_index % m.inputs());
                (t, o.p_tar, agrees, o.correct())
            })
            .collect();
        let window = (s.watch.window_s * 1e6).round() as u64;
        for b in 0..cfg.bins() {
            let t = ((b as u64 + 1) * cfg.bin_us).min(cfg.duration_us);
            let Some((_, w)) = rows.iter().rev().find(|(at, _)| *at <= t) else {
                // No status yet: the starting plan, nothing estimated.
                let temperature = setup.prepared.temperatures[branch - 1];
                trace.points.push(WatchPoint {
                    t_us: t,
                    temperature,
                    threshold: sim.initial.p_tar,
                    audits: 0,
                    estimate: None,
                    estimate_accuracy: None,
                    true_agreement: None,
                    true_accuracy: None,
                });
                continue;
            };
            let since = w.last_refit.map_or(0, |r| rel(r.decided_at_unix_us));
            let from = t.saturating_sub(window).max(since);
            let under: Vec<&(u64, f64, bool, bool)> = decided.iter().filter(|d| d.0 >= from && d.0 <= t && d.1 == w.threshold).collect();
            let n = under.len();
            let rate = |f: fn(&(u64, f64, bool, bool)) -> bool| (n > 0).then(|| under.iter().filter(|d| f(d)).count() as f64 / n as f64);
            let interval = |e: Option<f64>, lo: Option<f64>, hi: Option<f64>| Some(branchpoint_core::monitor::Interval { estimate: e?, low: lo?, high: hi? });
            trace.points.push(WatchPoint {
                t_us: t,
                temperature: w.temperature,
                threshold: w.threshold,
                audits: w.audits as usize,
                estimate: interval(w.edge_agreement, w.edge_agreement_low, w.edge_agreement_high),
                estimate_accuracy: interval(w.edge_accuracy, w.edge_accuracy_low, w.edge_accuracy_high),
                true_agreement: rate(|d| d.2),
                true_accuracy: rate(|d| d.3),
            });
        }
        let counts = audits.get(&g.name).copied().unwrap_or_default();
        let bytes = m.upload_bytes[branch - 1].of(g.codec) as u64;
        trace.audits = counts.sent;
        trace.audit_bytes = counts.bytes;
        let offloaded = outcomes.iter().filter(|o| group_of_device.get(&o.device_id) == Some(&gi) && o.decided != Decided::Device).count() as u64;
        trace.offload_bytes = offloaded * bytes;
        trace.audit_worker_us = counts.sent as f64 * m.tail_time_us(branch, cfg.max_batch) / cfg.max_batch as f64;
        traces.push(trace);
    }
    traces
}
