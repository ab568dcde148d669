//! `branchpoint planner`: the partition planner on NATS. Devices publish
//! network reports on `branchpoint.report.network` (with their deadline and
//! arrival rate); the planner answers each with a `PlanUpdate` stored under
//! `device.<id>` in the control store, which the devices watch. With
//! `--level-accuracy` and `--watch` it is the adaptive policy: each group
//! heard of gets a control loop (`core::control`), fed the workers' audit
//! results, and every change of a group's evidence re-plans its devices.
use std::collections::BTreeMap;
use std::sync::Arc;

use actix::Actor;
use anyhow::{bail, Context, Result};
use branchpoint_actors::control::ControlStore;
use branchpoint_actors::planner::nats::{serve_planner_nats, spawn_control_audits, NatsPlans};
use branchpoint_actors::planner::Planner;
use branchpoint_core::calibration::{self, CalibrationFile, Method};
use branchpoint_core::planner::{default_candidate_p_tars, Codec, CodecFinals, Costs, ModelStats};
use branchpoint_models::model::recorded_codec_final_logits;

use crate::cli::PlannerArgs;
use crate::scenario::{compute_costs, read_profile_at, upload_bytes};
use crate::shutdown::{Stopping, GRACE};

/// `--watch`: the control loop every group gets a copy of, under `level`,
/// starting from the validation split's certified candidates and drift
/// references.
fn control_template(
    args: &PlannerArgs,
    level: branchpoint_core::guarantee::ServiceLevel,
    stats: &ModelStats,
    validation: &[branchpoint_core::calibration::ExitLogits],
    temperatures: &[f64],
) -> Result<branchpoint_core::control::GroupControl> {
    use branchpoint_core::monitor::{MonitorConfig, ReferenceInputs};
    let watch = MonitorConfig {
        audit_rate: args.audit_rate,
        // Replaced per branch by the level's (delta / branches).
        target: level.target(),
        window_us: 120_000_000,
        max_observations: 200_000,
        drift_margin: args.drift_margin,
        alarm_alpha: 0.01,
        auto_refit: true,
        min_refit_interval_us: 30_000_000,
        min_refit_sample: args.min_refit_sample,
    };
    let t_final = *temperatures.last().context("no temperatures")?;
    let references = ReferenceInputs::of_exits(validation, t_final);
    branchpoint_core::control::GroupControl::new(level, stats.clone(), temperatures, watch, references.as_ref())
        .context("--watch (--audit-rate, --drift-margin, --min-refit-sample)")
}

pub fn run(args: PlannerArgs) -> Result<()> {
    crate::shutdown::install("planner");
    if args.nats.nats.is_none() {
        bail!("branchpoint planner needs --nats URL: devices reach it over NATS");
    }
    if !(args.miss_bound > 0.0 && args.miss_bound < 1.0) {
        bail!("--miss-bound {}: give a fraction in (0, 1), e.g. 0.05", args.miss_bound);
    }
    if !(args.pool_utilisation > 0.0 && args.pool_utilisation <= 1.0) {
        bail!("--pool-utilisation {}: give a fraction in (0, 1], e.g. 0.9", args.pool_utilisation);
    }
    if !(args.device_slowdown.is_finite() && args.device_slowdown > 0.0) {
        bail!("--device-slowdown {}: give a positive factor", args.device_slowdown);
    }
    if !(args.cloud_slowdown.is_finite() && args.cloud_slowdown > 0.0) {
        bail!("--cloud-slowdown {}: give a positive factor", args.cloud_slowdown);
    }
    if args.codecs.is_empty() {
        bail!("--codecs: name at least one of f32, f16, int8");
    }
    if let Some(delta) = args.certify_delta.filter(|d| !(*d > 0.0 && *d < 1.0)) {
        bail!("--certify-delta {delta}: give a probability in (0, 1), e.g. 0.05");
    }
    tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get() as i32));
    let model = args.source.load_model(tch::Device::Cpu)?;
    let data = args.source.load_data(&model)?;
    let validation = branchpoint_models::model::recorded_split_exit_logits(&model, &data.validation)?;
    let num_exits = validation.len();
    let temperatures = match &args.temperatures.calibration {
        Some(path) => {
            let file = CalibrationFile::read(path)?;
            file.check_fits(num_exits, model.sha256()).with_context(|| format!("calibration file {}", path.display()))?;
            file.temperatures
        }
        None => calibration::fit(Method::parse(&args.temperatures.method)?, &validation)?,
    };
    let codecs = args
        .codecs
        .iter()
        .filter(|c| **c != Codec::F32)
        .map(|&codec| Ok(CodecFinals { codec, per_branch: recorded_codec_final_logits(&model, &data.validation, codec)? }))
        .collect::<Result<Vec<_>>>()?;
    let level =
        args.level_accuracy.map(|accuracy| branchpoint_core::guarantee::ServiceLevel { accuracy, delta: args.level_delta, miss_bound: args.miss_bound, minimise: args.minimise });
    let stats = match (level, args.certify_delta) {
        (Some(level), _) => ModelStats::for_level(&validation, &temperatures, &level, &codecs).context("--level-accuracy / --level-delta")?,
        (None, Some(delta)) => {
            let targets: Vec<f64> = default_candidate_p_tars().into_iter().filter(|p| branchpoint_messages::PTar::target(*p).is_ok()).collect();
            ModelStats::certified(&validation, &temperatures, &targets, delta, &codecs)?
        }
        (None, None) => ModelStats::from_validation(&validation, &temperatures, &default_candidate_p_tars(), &codecs)?,
    };
    // f32 plans come with every statistic; keep only the codecs asked for.
    let stats = stats.with_codecs(&args.codecs);
    let model_sha256 = model.sha256().to_string();
    let control = match level.filter(|_| args.watch) {
        Some(level) => Some(control_template(&args, level, &stats, &validation, &temperatures)?),
        None => None,
    };
    let profile_path = args.profile.clone().unwrap_or_else(|| args.source.model.with_extension("profile.json"));
    let profile = read_profile_at(&profile_path)?;
    let (head_us, tail_us) = compute_costs(&profile, args.device_slowdown, args.cloud_slowdown)?;
    let template = Costs {
        head_us,
        upload_bytes: upload_bytes(model.partition_points())?,
        deadline_us: 0.0,
        arrival_rate: 0.0,
        miss_bound: args.miss_bound,
        pool_utilisation: args.pool_utilisation,
        // A request's share of the largest profiled batch: the workers'
        // rate when a backlog keeps their batches full.
        tail_us_per_request: tail_us.iter().map(|pts| pts.last().map_or(0.0, |&(b, us)| us / b.max(1) as f64)).collect(),
    };
    tch::set_num_threads(1);
    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, "branchpoint-planner").await?;
        // Devices learn plans only from the control store: without it the
        // planner could reach no one.
        let store = ControlStore::open_with(&client, args.nats.store_settings()).await.context("the planner stores its plans in the control store")?;
        let stored: Vec<_> = store.plans().await?.into_iter().map(|p| p.value).collect();
        let devices = stored.iter().filter(|p| matches!(p.target, branchpoint_messages::PlanTarget::Device(_))).count();
        tracing::info!("planner: resumed {devices} device plan(s) from the control store");
        let plans = NatsPlans::new(store, stored);
        let planner = Planner::new(Arc::new(stats), BTreeMap::new(), Some(template), Some(Box::new(plans)));
        let planner = match (level, control) {
            (_, Some(control)) => planner.with_control_template(control),
            (Some(level), None) => planner.minimising(level.minimise),
            (None, None) => planner,
        }
        .start();
        if args.watch {
            // The control loops' evidence: the workers' audit results.
            spawn_control_audits(client.clone(), planner.clone(), model_sha256.clone()).await.context("--watch")?;
        }
        let service = args.service.clone();
        let ready = move || {
            service.mark_ready();
            tracing::info!(
                "planner serving {} with temperatures {temperatures:?}; plans go to the control store's {} bucket under device.<id>",
                branchpoint_messages::subjects::NETWORK_REPORT,
                branchpoint_actors::control::PLANS_BUCKET
            )
        };
        crate::shutdown::serving();
        let signalled = async {
            let sig = crate::shutdown::signal().await;
            tracing::info!("planner: {}: shutting down", sig.name());
        };
        serve_planner_nats(client.clone(), planner, ready, signalled).await.context("serving the planner")?;
        let stopping = Stopping::new("planner", GRACE);
        // Plans already published leave now, unless the server is gone.
        stopping.step("flushing plans to NATS", std::time::Duration::from_millis(500), client.flush()).await;
        args.service.clear();
        stopping.done();
        Ok::<(), anyhow::Error>(())
    })
}
