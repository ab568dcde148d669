//! `branchpoint fleet`: simulated devices streaming test inputs, answered on
//! the device or by cloud workers (embedded, or over NATS).
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use anyhow::{bail, Context, Result};
use branchpoint_actors::collector::{Collector, Summary, TakeOutcomes};
use branchpoint_actors::compute::{Executor, ModelSpec};
use branchpoint_actors::device::{AuditSettings, DeviceConfig};
use branchpoint_actors::emulation::EmulationSpec;
use branchpoint_actors::fleet::{run_fleet, DeviceThreads, FleetConfig, TestInputs};
use branchpoint_actors::transport::OffloadLink;
use branchpoint_actors::worker::{Batcher, ServedModel, WorkerConfig};
use branchpoint_core::calibration::CalibrationFile;
use branchpoint_core::link::Link;
use branchpoint_core::planner::LinkEstimator;

use crate::cli::FleetArgs;

pub fn run(args: FleetArgs) -> Result<()> {
    crate::shutdown::install("fleet");
    let fleet_id = check_args(&args)?;
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    let model = args.source.load_model(tch::Device::Cpu)?;
    model.check_branch(args.partition_branch.get()).context("--partition-branch")?;
    let num_exits = model.num_exits();
    let temperatures = match &args.calibration {
        Some(path) => {
            let file = CalibrationFile::read(path)?;
            file.check_fits(num_exits, model.sha256()).with_context(|| format!("calibration file {}", path.display()))?;
            file.temperatures
        }
        None => vec![1.0; num_exits],
    };
    let corruption = args.corrupt.as_deref().map(branchpoint_core::corrupt::Corruption::parse).transpose().context("--corrupt")?;
    let mut data = args.source.load_data(&model)?;
    if let Some(c) = corruption {
        data.test.images = branchpoint_models::corrupt::apply(&c, &data.test.images, model.normalization(), 1, 0)?;
        tracing::info!("fleet: the devices see the test images under {c}");
    }
    let inputs = Arc::new(TestInputs::from_split(&data.test)?);
    let partition_points = model.partition_points().to_vec();
    let num_branches = model.num_branches();
    let model_sha256 = model.sha256().to_string();
    drop(model);

    let smallest_upload = partition_points.iter().map(|p| p.activation_bytes).min().unwrap_or(1) / 4;
    let emulation = emulation(&args, &fleet_id, smallest_upload)?;
    let cfg = fleet_config(&args, temperatures, model_sha256, fleet_id, emulation);
    cfg.validate()?;
    let spec = ModelSpec { model: args.source.model.clone(), device: tch::Device::Cpu };
    let served = ServedModel { model_sha256: cfg.model_sha256.clone(), partition_points };

    let ready_service = args.service.clone();
    let system = actix::System::new();
    let keep_outcomes = args.outcomes.is_some();
    let (run, outcomes) = system.block_on(async {
        let mut device_threads = DeviceThreads::start_with_slowdown(spec.clone(), args.threads, args.device_slowdown).context("--device-slowdown")?;
        let client = match &args.nats.nats {
            Some(_) => Some(crate::nats::connect(&args.nats, "branchpoint-fleet").await?),
            None => None,
        };
        let mut embedded_pool = None;
        let link = match &client {
            Some(c) => OffloadLink::Nats(c.clone()),
            None => {
                let worker_exec = Executor::start(vec![spec], args.worker_threads)?;
                embedded_pool = Some(worker_exec.clone());
                let wcfg = WorkerConfig { worker_id: "embedded".into(), max_batch: args.max_batch, max_wait: Duration::from_micros(args.max_wait_us) };
                OffloadLink::InProcess(Batcher::new(wcfg, worker_exec, vec![served]).with_compute_threads(args.worker_threads).start())
            }
        };
        // Every outcome is kept only for an --outcomes file; otherwise the
        // collector's memory stays flat however long the fleet runs.
        let collector = Collector::new(num_branches);
        let collector = if keep_outcomes { collector.keeping_outcomes() } else { collector }.start();
        let (devices, rate) = (cfg.devices, cfg.rate_per_device);
        let service = ready_service;
        let started = move || {
            crate::shutdown::serving();
            service.mark_ready();
            tracing::info!("fleet running: {devices} devices, {rate} inputs/s each")
        };
        let signalled = std::cell::Cell::new(None);
        let stop = async {
            let sig = crate::shutdown::signal().await;
            signalled.set(Some(std::time::Instant::now()));
            tracing::info!("fleet: {}: no more arrivals; waiting for the inputs already running", sig.name());
        };
        let run = run_fleet(cfg, inputs, &device_threads, link, collector.clone(), client.map(branchpoint_actors::fleet::nats::FleetBus), started, stop).await?;
        let outcomes = collector.send(TakeOutcomes).await?;
        // Joined before the process exits: no forward may still run while
        // libtorch tears down.
        device_threads.shutdown();
        if let Some(pool) = embedded_pool {
            pool.shutdown(Duration::from_secs(1));
        }
        if let Some(at) = signalled.get() {
            tracing::info!("fleet: stopped in {} ms", at.elapsed().as_millis());
        }
        Ok::<_, anyhow::Error>((run, outcomes))
    })?;

    args.service.clear();
    write_results(&args, &run, &outcomes)
}

/// Checks the flags nothing else checks; gives the fleet's id.
fn check_args(args: &FleetArgs) -> Result<String> {
    if !(args.deadline_ms.is_finite() && args.deadline_ms > 0.0) {
        bail!("--deadline-ms {}: give a positive number of milliseconds", args.deadline_ms);
    }
    if !(args.duration.is_finite() && args.duration > 0.0) {
        bail!("--duration {}: give a positive number of seconds", args.duration);
    }
    if args.threads == 0 || args.worker_threads == 0 || args.max_batch == 0 {
        bail!("--threads, --worker-threads and --max-batch must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.audit_rate) {
        bail!("--audit-rate {}: give a probability in [0, 1] (0 turns audits off)", args.audit_rate);
    }
    if !branchpoint_messages::subjects::is_valid_id(&args.group) {
        bail!("--group {:?}: use 1 to 64 letters, digits, '-' or '_'", args.group);
    }
    let fleet_id = args.fleet_id.clone().unwrap_or_else(|| format!("fleet-{}", std::process::id()));
    if !branchpoint_messages::subjects::is_valid_id(&fleet_id) {
        bail!("--fleet-id {fleet_id:?}: use 1 to 64 letters, digits, '-' or '_'");
    }
    Ok(fleet_id)
}

/// The fleet's settings from its flags.
fn fleet_config(args: &FleetArgs, temperatures: Vec<f64>, model_sha256: String, fleet_id: String, emulation: Option<EmulationSpec>) -> FleetConfig {
    FleetConfig {
        devices: args.devices,
        rate_per_device: args.rate,
        duration: Duration::from_secs_f64(args.duration),
        max_inputs: args.inputs,
        seed: args.seed,
        device: DeviceConfig {
            // Device ids are the fleet's id and a number: fleets sharing a bus
            // never share a device's plan key.
            id: fleet_id.clone(),
            partition_branch: args.partition_branch,
            p_tar: args.p_tar,
            temperatures,
            deadline: Duration::from_secs_f64(args.deadline_ms / 1e3),
            model_sha256: model_sha256.as_str().into(),
            codec: args.codec,
            emulation,
            interrupt: Default::default(),
            audit: (args.audit_rate > 0.0).then(|| AuditSettings {
                rate: args.audit_rate,
                group: args.group.clone(),
                model_sha256: model_sha256.clone(),
                target_accuracy: None,
                // Audits are fire-and-forget, but a slow cloud must not
                // pile them up: a few per device at most.
                max_in_flight: 4,
                seed: args.seed,
            }),
        },
        // No outcome for this long means none is coming: an offload ends by
        // its deadline at the latest.
        drain: Duration::from_secs_f64(args.deadline_ms / 1e3) + Duration::from_secs(2),
        group: args.group.clone(),
        model_sha256,
        fleet_id,
        status_interval: (args.status_interval_ms > 0).then(|| Duration::from_millis(args.status_interval_ms)),
        // Leaves room in shutdown::GRACE for the last status and the joins.
        stop_grace: crate::shutdown::GRACE - Duration::from_millis(800),
    }
}

/// Prints the summary and writes the files asked for; fails when an input
/// got no outcome or two.
fn write_results(args: &FleetArgs, run: &branchpoint_actors::fleet::FleetRun, outcomes: &[branchpoint_actors::collector::Outcome]) -> Result<()> {
    let summary = &run.summary;
    print_summary(summary);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)? + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("summary written to {}", path.display());
    }
    if let Some(path) = &args.outcomes {
        let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        for o in outcomes {
            serde_json::to_writer(&mut w, o)?;
            writeln!(w)?;
        }
        w.flush()?;
        println!("{} outcomes written to {}", outcomes.len(), path.display());
    }
    if run.interrupted {
        println!("interrupted after {} arrivals: {} decided, {} still queued at the devices were not run", run.arrived, summary.inputs, run.not_run);
    }
    if run.missing() > 0 || summary.duplicates > 0 {
        bail!(
            "{} inputs accepted but {} outcomes ({} duplicates): {} inputs were lost{}",
            summary.inputs,
            summary.outcomes,
            summary.duplicates,
            run.missing(),
            if run.interrupted { " (still waiting for the cloud when the fleet stopped)" } else { "" }
        );
    }
    Ok(())
}

/// Each device's emulated uplink, from `--uplink-trace`, `--uplink-mbit-s`
/// or `--uplink-schedule` (none without one): the same emulation, estimate,
/// declining and reports as a live scenario replay's devices
/// (`run_fleet` gives each device its own seed and report offset).
fn emulation(args: &FleetArgs, fleet_id: &str, smallest_upload: usize) -> Result<Option<EmulationSpec>> {
    if !(args.rtt_ms.is_finite() && args.rtt_ms >= 0.0) {
        bail!("--rtt-ms {}: give a number of milliseconds, at least 0", args.rtt_ms);
    }
    let rtt_us = (args.rtt_ms * 1e3).round() as u64;
    let link = match (&args.uplink_trace, args.uplink_mbit_s, &args.uplink_schedule) {
        (Some(path), _, _) => Link::trace(path, rtt_us, 0.0).with_context(|| format!("--uplink-trace {}", path.display()))?,
        (None, Some(mbit), _) => Link::constant(mbit, rtt_us, 0.0).context("--uplink-mbit-s")?,
        (None, None, Some(steps)) => uplink_schedule(steps, rtt_us).with_context(|| format!("--uplink-schedule {steps}"))?,
        (None, None, None) => return Ok(None),
    };
    if args.report_interval_ms == 0 {
        bail!("--report-interval-ms 0: give how often devices report, e.g. 1000");
    }
    let defaults = branchpoint_core::scenario::file::PlannerSection::default();
    // Slower than the cap, not even the smallest upload (int8's, about a
    // quarter of f32's) could make the deadline.
    let cap_us_per_byte = args.deadline_ms * 1e3 / smallest_upload.max(1) as f64;
    Ok(Some(EmulationSpec {
        link: Arc::new(link),
        epoch: std::time::Instant::now(),
        group: args.group.clone(),
        seed: args.seed ^ fleet_id.bytes().fold(0u64, |h, b| h.wrapping_mul(0x100_0000_01B3) ^ u64::from(b)),
        estimator: LinkEstimator::new(defaults.ewma_alpha, cap_us_per_byte),
        admission: true,
        safety: defaults.safety,
        reports: None,
        report_interval: Duration::from_millis(args.report_interval_ms),
        report_offset: Duration::ZERO,
        probe_bytes: defaults.probe_bytes,
        arrival_rates: vec![(0, args.rate)],
    }))
}

/// A link of constant steps from `AT_S:MBIT_S,...` (the scenario files'
/// `schedule`, on one line).
pub(crate) fn uplink_schedule(steps: &str, rtt_us: u64) -> Result<Link> {
    let segments = steps
        .split(',')
        .map(|step| {
            let parsed = step.split_once(':').and_then(|(at, mbit)| Some((at.trim().parse::<f64>().ok()?, mbit.trim().parse::<f64>().ok()?)));
            match parsed {
                Some((at_s, uplink_mbit_s)) if at_s.is_finite() && at_s >= 0.0 => {
                    Ok(branchpoint_core::link::Segment { at_us: (at_s * 1e6).round() as u64, uplink_mbit_s, rtt_us, loss: 0.0 })
                }
                _ => bail!("{step:?} is not a step: give AT_S:MBIT_S pairs separated by commas, from 0 s, e.g. 0:50,20:0.5,40:50"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Link::schedule(segments)?)
}

fn print_summary(s: &Summary) {
    let pct = |n: usize| 100.0 * n as f64 / s.outcomes.max(1) as f64;
    println!("inputs {}, outcomes {}, duplicates {}", s.inputs, s.outcomes, s.duplicates);
    let exits: Vec<String> = s.per_exit.iter().enumerate().map(|(i, n)| if i + 1 == s.per_exit.len() { format!("final {n}") } else { format!("branch {} {n}", i + 1) }).collect();
    println!("per exit: {}", exits.join(", "));
    println!(
        "decided on device {} ({:.1} %; {} declined), offloaded {} ({:.1} %): answered by cloud {}, fallbacks {} ({}); errors {}; deadline misses {} ({:.1} %)",
        s.decided_on_device,
        pct(s.decided_on_device),
        s.declined,
        s.offloaded,
        pct(s.offloaded),
        s.answered_by_cloud,
        s.fallbacks,
        s.fallbacks_by_reason().iter().map(|(reason, n)| format!("{reason} {n}")).collect::<Vec<_>>().join(", "),
        s.errors,
        s.deadline_misses,
        pct(s.deadline_misses)
    );
    println!("accuracy {:.2} %, edge accuracy {}", 100.0 * s.accuracy, s.edge_accuracy.map_or("- (nothing decided on the device)".into(), |a| format!("{:.2} %", 100.0 * a)));
    println!("latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms", s.latency_ms_p50, s.latency_ms_p95, s.latency_ms_p99);
}
