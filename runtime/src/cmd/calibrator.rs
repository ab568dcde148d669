//! `branchpoint calibrator`: the calibration actor on NATS.
use anyhow::{bail, Context, Result};
use branchpoint_actors::calibration::nats::serve_calibration_nats;
use branchpoint_actors::calibration::{method_of, Calibrator, CalibratorConfig, Initial, WatchSettings};
use branchpoint_actors::control::ControlStore;
use branchpoint_core::calibration::{CalibrationFile, Method};

use crate::cli::CalibratorArgs;
use crate::shutdown::{Stopping, GRACE};

pub fn run(args: CalibratorArgs) -> Result<()> {
    crate::shutdown::install("calibrator");
    if args.nats.nats.is_none() {
        bail!("branchpoint calibrator needs --nats URL: it publishes temperatures to devices over NATS");
    }
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    let initial = match &args.temperatures.calibration {
        Some(path) => Initial::File(CalibrationFile::read(path)?),
        None => Initial::Fit(Method::parse(&args.temperatures.method)?),
    };
    let seconds = |flag: &str, v: f64| -> Result<u64> {
        if !(v.is_finite() && v > 0.0) {
            bail!("--{flag} {v}: give a positive number of seconds");
        }
        Ok((v * 1e6).round() as u64)
    };
    let watch = WatchSettings {
        window_us: seconds("watch-window-s", args.watch_window_s)?,
        min_refit_interval_us: seconds("min-refit-interval-s", args.min_refit_interval_s)?,
        min_refit_sample: args.min_refit_sample,
        drift_margin: args.drift_margin,
        delta: args.refit_delta,
        auto_refit: !args.alarm_only,
        ..WatchSettings::default()
    };
    watch.validate().context("the calibrator's live watch (--drift-margin, --refit-delta, --min-refit-sample)")?;
    let cfg = CalibratorConfig { model: args.source.model.clone(), data_dir: args.source.data_dir.clone(), initial, watch };
    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, "branchpoint-calibrator").await?;
        let (calibrator, mut file) = Calibrator::start(cfg).await?;
        // The stored method beats the command line's: it is what an operator
        // last asked for (a refit), and a restart must not undo it.
        let store = match ControlStore::open_with(&client, args.nats.store_settings()).await {
            Ok(store) => Some(store),
            Err(e) => {
                tracing::warn!("calibrator: temperatures will not be stored: {e:#}");
                None
            }
        };
        if let Some(store) = &store {
            if let Some(stored) = store.calibration(&file.model_sha256).await? {
                let method = method_of(stored.value.method);
                tracing::info!("calibrator: resuming the stored {} calibration (revision {})", method.name(), stored.revision);
                if method != file.method {
                    file = calibrator.refit(method).await?;
                }
            }
        }
        let service = args.service.clone();
        let ready = move || {
            service.mark_ready();
            tracing::info!(
                "calibrator serving {} and {}; {} temperatures {:?} published on {}; watching audits on {} ({})",
                branchpoint_messages::subjects::CALIBRATION_GET,
                branchpoint_messages::subjects::CALIBRATION_REFIT,
                file.method.name(),
                file.temperatures,
                branchpoint_messages::subjects::CALIBRATION_UPDATE,
                branchpoint_messages::subjects::CALIBRATION_AUDIT,
                if watch.auto_refit { "drift alarms refit the group's branch" } else { "alarms only" },
            )
        };
        crate::shutdown::serving();
        let signalled = async {
            let sig = crate::shutdown::signal().await;
            tracing::info!("calibrator: {}: shutting down", sig.name());
        };
        let served = serve_calibration_nats(client.clone(), calibrator.clone(), store, ready, signalled).await;
        let stopping = Stopping::new("calibrator", GRACE);
        // Replies already published leave now, unless the server is gone.
        stopping.step("flushing replies to NATS", std::time::Duration::from_millis(500), client.flush()).await;
        let still = calibrator.shutdown(stopping.left());
        if !still.is_empty() {
            tracing::warn!("calibrator: a refit is still running on {still:?}");
        }
        args.service.clear();
        served.context("serving calibration")?;
        stopping.done();
        Ok::<(), anyhow::Error>(())
    })
}
