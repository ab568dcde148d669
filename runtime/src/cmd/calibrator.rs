//! `branchpoint calibrator`: the calibration actor on NATS.
use anyhow::{bail, Context, Result};
use branchpoint_actors::calibration::{method_of, serve_calibration_nats, Calibrator, CalibratorConfig, Initial, Refit};
use branchpoint_actors::control::ControlStore;
use branchpoint_models::calibration::{CalibrationFile, Method};

use crate::cli::CalibratorArgs;
use crate::cmd::worker::shutdown_signal;

pub fn run(args: CalibratorArgs) -> Result<()> {
    if args.nats.nats.is_none() {
        bail!("branchpoint calibrator needs --nats URL: it publishes temperatures to devices over NATS");
    }
    tch::set_num_threads(1);
    let initial = match &args.temperatures.calibration {
        Some(path) => Initial::File(CalibrationFile::read(path)?),
        None => Initial::Fit(Method::parse(&args.temperatures.method)?),
    };
    let cfg = CalibratorConfig { weights: args.source.model.clone(), data_dir: args.source.data_dir.clone(), initial };
    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, "branchpoint-calibrator").await?;
        let (calibrator, mut file) = Calibrator::start(cfg)?;
        // The stored method beats the command line's: it is what an operator
        // last asked for (a refit), and a restart must not undo it.
        let store = match ControlStore::open(&client).await {
            Ok(store) => Some(store),
            Err(e) => {
                eprintln!("calibrator: temperatures will not be stored: {e:#}");
                None
            }
        };
        if let Some(store) = &store {
            if let Some(stored) = store.calibration(&file.weights_sha256).await? {
                let method = method_of(stored.value.method);
                eprintln!("calibrator: resuming the stored {} calibration (revision {})", method.name(), stored.revision);
                if method != file.method {
                    file = calibrator.send(Refit(method)).await??;
                }
            }
        }
        let service = args.service.clone();
        let ready = move || {
            service.mark_ready();
            eprintln!(
                "calibrator serving {} and {}; {} temperatures {:?} published on {}",
                branchpoint_messages::subjects::CALIBRATION_GET,
                branchpoint_messages::subjects::CALIBRATION_REFIT,
                file.method.name(),
                file.temperatures,
                branchpoint_messages::subjects::CALIBRATION_UPDATE
            )
        };
        tokio::select! {
            r = serve_calibration_nats(client, calibrator, store, ready) => r.context("serving calibration")?,
            _ = shutdown_signal() => eprintln!("calibrator: shutting down"),
        }
        args.service.clear();
        Ok::<(), anyhow::Error>(())
    })
}
