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
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::Actor;
use anyhow::{bail, Context, Result};
use branchpoint_actors::collector::{Collector, Decided, TakeOutcomes};
use branchpoint_actors::compute::{Executor, ModelSpec};
use branchpoint_actors::device::{DeviceConfig, Infer};
use branchpoint_actors::emulation::{EmulationSpec, ReportTo};
use branchpoint_actors::fleet::{drain, forward_updates, publish_status, DeviceThreads, TestInputs};
use branchpoint_actors::planner::{serve_planner_nats, Planner, TakePlanLog};
use branchpoint_actors::transport::OffloadLink;
use branchpoint_actors::worker::{publish_status as publish_worker_status, serve_nats, Batcher, WorkerConfig};
use branchpoint_models::net::PartitionPoint;
use branchpoint_models::planner::{Costs, LinkEstimator};
use branchpoint_models::rng::SplitMix64;

use super::sim::{device_seed, interarrival_us, Bin, Plans, SimConfig};
use super::{policy_plans, Policy, PolicyRun, Prepared, Scenario};
use crate::cli::NatsArgs;

fn unix_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub struct LiveSetup<'a> {
    pub scenario: &'a Scenario,
    pub cfg: &'a SimConfig,
    pub prepared: &'a Prepared,
    pub spec: ModelSpec,
    pub points: Vec<PartitionPoint>,
    pub inputs: Arc<TestInputs>,
    pub nats: &'a NatsArgs,
    pub model_sha256: String,
}

/// Runs every policy but the oracle live, one after the other.
pub fn replay_live(setup: &LiveSetup, on_policy: &dyn Fn(Policy)) -> Result<Vec<PolicyRun>> {
    // `--nats` turns a virtual-time file into a live replay; these two have
    // no live counterpart yet, and ignoring them would replay another scenario.
    if setup.scenario.workers.autoscale.is_some() {
        bail!("scenario {}: workers.autoscale is replayed in virtual time only; run it without --nats (or see `branchpoint stack up` for live autoscaling)", setup.scenario.path.display());
    }
    if let Some(g) = setup.scenario.groups.iter().find(|g| g.rate_schedule.is_some()) {
        bail!("scenario {}: group {} has a rate_schedule, which is replayed in virtual time only; run it without --nats", setup.scenario.path.display(), g.name);
    }
    let mut runs = Vec::new();
    for &policy in &setup.scenario.policies {
        let Some(plans) = policy_plans(policy, setup.scenario, setup.prepared) else {
            eprintln!("policy oracle: skipped in real time (it replays every fixed plan in hindsight; use time = \"virtual\")");
            continue;
        };
        on_policy(policy);
        runs.push(run_policy(setup, policy, &plans)?);
    }
    Ok(runs)
}

fn run_policy(setup: &LiveSetup, policy: Policy, plans: &Plans) -> Result<PolicyRun> {
    let (s, cfg, prepared) = (setup.scenario, setup.cfg, setup.prepared);
    let adaptive = matches!(plans, Plans::Adaptive);
    let system = actix::System::new();
    let (outcomes, log, claimed, epoch_unix) = system.block_on(async {
        let client = match &setup.nats.nats {
            Some(_) => Some(crate::nats::connect(setup.nats, "branchpoint-run").await?),
            None => None,
        };
        let wcfg = |w: usize| WorkerConfig {
            worker_id: format!("run-worker-{w}"),
            max_batch: cfg.max_batch,
            max_wait: Duration::from_micros(cfg.max_wait_us),
        };
        let link = match &client {
            None => {
                let exec = Executor::start(setup.spec.clone(), cfg.workers)?;
                OffloadLink::InProcess(Batcher::new(wcfg(0), exec, setup.points.clone()).with_compute_threads(cfg.workers).start())
            }
            Some(c) => {
                for w in 0..cfg.workers {
                    let wc = crate::nats::connect(setup.nats, &format!("branchpoint-run-worker-{w}")).await?;
                    let batcher = Batcher::new(wcfg(w), Executor::start(setup.spec.clone(), 1)?, setup.points.clone()).with_compute_threads(1).start();
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let id = wcfg(w).worker_id;
                    // Their load, for a control plane watching the run (`--listen`).
                    actix::spawn(publish_worker_status(wc.clone(), batcher.clone(), id.clone(), Duration::from_secs(1)));
                    actix::spawn(async move {
                        if let Err(e) = serve_nats(wc, batcher, id, move || {
                            let _ = tx.send(());
                        })
                        .await
                        {
                            eprintln!("worker: {e}");
                        }
                    });
                    rx.await.context("a cloud worker could not subscribe to NATS")?;
                }
                OffloadLink::Nats(c.clone())
            }
        };
        let collector = Collector::new(prepared.sim.num_branches()).start();
        let planner = adaptive.then(|| {
            let costs: BTreeMap<String, Costs> = s
                .groups
                .iter()
                .zip(&cfg.groups)
                .map(|(g, sim)| {
                    let costs = Costs {
                        head_us: prepared.sim.head_us.clone(),
                        upload_bytes: prepared.sim.upload_bytes.iter().map(|&b| b as f64).collect(),
                        deadline_us: sim.deadline_us as f64,
                        arrival_rate: sim.rate,
                        miss_bound: cfg.miss_bound,
                    };
                    (g.name.clone(), costs)
                })
                .collect();
            Planner::new(Arc::new(prepared.sim.stats.clone()), costs, None, client.clone()).start()
        });
        if let (Some(c), Some(p)) = (&client, &planner) {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (c, p) = (c.clone(), p.clone());
            actix::spawn(async move {
                if let Err(e) = serve_planner_nats(c, p, move || {
                    let _ = tx.send(());
                })
                .await
                {
                    eprintln!("planner: {e}");
                }
            });
            rx.await.context("the planner could not subscribe to NATS")?;
        }

        let threads = DeviceThreads::start(setup.spec.clone(), std::thread::available_parallelism().map_or(1, |n| n.get()))?;
        // Time 0 of every link: when the first arrivals may come.
        let epoch = Instant::now() + Duration::from_millis(500);
        let epoch_unix = unix_us() + 500_000;
        let total: usize = cfg.groups.iter().map(|g| g.devices).sum();
        let mut configs = Vec::new();
        let mut places = Vec::new();
        for (gi, (g, sim)) in s.groups.iter().zip(&cfg.groups).enumerate() {
            let plan = match plans {
                // Validation keeps uncalibrated and watched runs in virtual
                // time; their starting plans are the groups' own.
                Plans::Fixed(p) | Plans::Uncalibrated(p) | Plans::Watched(p) => p[gi],
                Plans::Adaptive => sim.initial,
            };
            let cap = sim.deadline_us as f64 / *prepared.sim.upload_bytes.iter().min().expect("a branch") as f64;
            for k in 0..g.devices {
                let n = configs.len();
                let reports = planner.as_ref().map(|p| match &client {
                    Some(c) => ReportTo::Nats(c.clone()),
                    None => ReportTo::Planner(p.clone()),
                });
                configs.push(DeviceConfig {
                    id: format!("{}-{k}", g.name),
                    partition_branch: plan.branch,
                    p_tar: plan.p_tar,
                    temperatures: prepared.temperatures.clone(),
                    deadline: Duration::from_micros(sim.deadline_us),
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
                        arrival_rate: sim.rate,
                    }),
                    interrupt: Default::default(),
                    // Real-time replays do not watch yet (validation keeps
                    // the watched policy in virtual time).
                    audit: None,
                });
                places.push((gi, k, sim.rate));
            }
        }
        let ids: Vec<String> = configs.iter().map(|c| c.id.clone()).collect();
        let devices = threads.spawn(configs, link, collector.clone()).await?;
        // Over NATS the run shows up as a fleet named after the scenario and
        // policy, for a control plane watching it (`--listen`, `serve`).
        let fleet_id: String = format!("{}-{}", s.name, policy.name()).chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '-' }).take(64).collect();
        let named: Vec<_> = ids.iter().cloned().zip(devices.iter().cloned()).collect();
        let status_started = unix_us();
        let status = match &client {
            Some(c) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                actix::spawn(forward_updates(c.clone(), named.clone(), String::new(), setup.model_sha256.clone(), tx));
                let _ = rx.await;
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

        // Arrivals: the virtual-time replay's streams, on the wall clock.
        let claimed = Rc::new(Cell::new(0usize));
        let duration_us = cfg.duration_us;
        let mut tasks = Vec::new();
        for ((gi, k, rate), device) in places.into_iter().zip(devices) {
            let (claimed, inputs) = (claimed.clone(), setup.inputs.clone());
            let mut rng = SplitMix64::new(device_seed(cfg.seed, gi, k));
            tasks.push(actix::spawn(async move {
                let mut at = 0u64;
                loop {
                    at += interarrival_us(&mut rng, rate);
                    if at >= duration_us {
                        return;
                    }
                    tokio::time::sleep_until(tokio::time::Instant::from_std(epoch + Duration::from_micros(at))).await;
                    let i = claimed.get();
                    claimed.set(i + 1);
                    let x = i % inputs.len();
                    let arrived = Instant::now();
                    device.do_send(Infer { arrival: i as u64, arrived, input_index: x, input: inputs.images[x].clone(), label: inputs.labels[x] });
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        // Every input gets its outcome, however far behind the device
        // threads are; an offload ends by its deadline at the latest.
        let longest = cfg.groups.iter().map(|g| g.deadline_us).max().unwrap_or(0);
        let stall = Duration::from_micros(longest) + Duration::from_secs(5);
        let no_interrupt = branchpoint_actors::device::Interrupt::default();
        drain(&collector, claimed.get(), &no_interrupt, stall, Duration::ZERO, std::future::pending(), None).await?;
        if let (Some(task), Some(c)) = (status, &client) {
            task.abort();
            let last = async {
                publish_status(c, &fleet_id, "replay", &named, &collector, status_started, false).await;
                let _ = c.flush().await;
            };
            if tokio::time::timeout(Duration::from_secs(1), last).await.is_err() {
                eprintln!("run: could not publish the policy's last status (NATS unreachable)");
            }
        }
        let outcomes = collector.send(TakeOutcomes).await?;
        let log = match &planner {
            Some(p) => p.send(TakePlanLog).await?,
            None => Vec::new(),
        };
        // Joined before the next policy starts and before the process exits.
        let mut threads = threads;
        threads.shutdown();
        Ok::<_, anyhow::Error>((outcomes, log, claimed.get(), epoch_unix))
    })?;

    // Outcomes into the report's bins, by arrival time.
    let group_of: HashMap<&str, usize> = s.groups.iter().enumerate().map(|(i, g)| (g.name.as_str(), i)).collect();
    let mut bins = vec![vec![Bin::default(); cfg.bins()]; cfg.groups.len()];
    let mut latencies = vec![Vec::new(); cfg.groups.len()];
    let mut edge = vec![super::sim::EdgeTally::default(); prepared.sim.num_branches()];
    for o in &outcomes {
        if let Some(e) = &o.error {
            bail!("policy {}: device {} could not decide input {}: {e}", policy.name(), o.device_id, o.input_index);
        }
        let group = o.device_id.rsplit_once('-').and_then(|(g, _)| group_of.get(g).copied()).context("an outcome from an unknown device")?;
        let deadline = cfg.groups[group].deadline_us;
        let bin = ((o.arrived_unix_us.saturating_sub(epoch_unix) / cfg.bin_us) as usize).min(cfg.bins() - 1);
        let b = &mut bins[group][bin];
        let correct = o.correct();
        b.inputs += 1;
        b.correct += u64::from(correct);
        b.p_tar_sum += o.p_tar;
        b.branch_sum += o.partition_branch as u64;
        match o.decided {
            Decided::Device => {
                b.on_device += 1;
                b.edge_correct += u64::from(correct);
                b.declined += u64::from(o.declined);
                if !o.declined {
                    let plan = branchpoint_models::planner::Plan { branch: o.partition_branch, p_tar: o.p_tar };
                    edge[o.partition_branch - 1].add(&prepared.sim.predictions, plan, correct);
                }
            }
            Decided::Cloud => {
                b.offloaded += 1;
                b.cloud += 1;
            }
            Decided::Fallback => {
                b.offloaded += 1;
                b.fallbacks += 1;
            }
        }
        let missed = o.decided == Decided::Fallback || o.latency.total_us > deadline;
        b.misses += u64::from(missed);
        latencies[group].push(o.latency.total_us.min(u64::from(u32::MAX)) as u32);
    }
    for r in &log {
        let Some(&g) = group_of.get(r.group.as_str()) else { continue };
        let b = &mut bins[g][((r.at_us / cfg.bin_us) as usize).min(cfg.bins() - 1)];
        b.reports += 1;
        b.est_mbit_s_sum += r.estimated_mbit_s;
        b.predicted_accuracy_sum += r.prediction.accuracy;
        b.predicted_miss_sum += r.prediction.miss_rate;
    }
    Ok(PolicyRun {
        policy,
        bins,
        latencies_us: latencies,
        arrivals: claimed as u64,
        outcomes: outcomes.len() as u64,
        mean_batch: f64::NAN,
        choices: None,
        edge: Some(edge),
        watch: Vec::new(),
    })
}
