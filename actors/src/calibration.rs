//! Calibration actor: owns the model's current temperatures, refits them on
//! the validation split on request, and (over NATS) publishes every change so
//! running devices apply it live.
//!
//! Owns: a copy of the model, the validation split, the current calibration
//! file, all on its own thread (a `TensorPool` of one): a refit runs the
//! network over 5,000 validation inputs and fits temperatures, work that must
//! stay off the event loop. Messages in (`CalibratorHandle`): `current`,
//! `refit`, one at a time in arrival order; at most a few wait. Restart: a
//! refit that panics rebuilds the state from the model and the initial
//! method, so temperatures fall back to the initial fit until the next
//! refit (the control store keeps the method an operator asked for).
//! Shutdown: `shutdown`, or the last handle dropped, joins the thread.
use std::path::PathBuf;

use branchpoint_messages::{
    decode, encode, subjects, CalibrationMethod, CalibrationRefit, CalibrationUpdate, ErrorKind, ErrorReply,
};
use branchpoint_models::calibration::{fit_file, split_exit_logits, CalibrationFile, ExitLogits, Method};
use branchpoint_models::{load_model, Dataset, LoadedModel};
use futures::StreamExt;

use crate::compute::TensorPool;
use crate::error::ActorError;

#[derive(Debug, Clone)]
pub struct CalibratorConfig {
    pub weights: PathBuf,
    pub data_dir: Option<PathBuf>,
    /// The calibration to start with: a file, or a fit with this method.
    pub initial: Initial,
}

#[derive(Debug, Clone)]
pub enum Initial {
    File(CalibrationFile),
    Fit(Method),
}

pub struct Calibrator {
    model: LoadedModel,
    validation: Vec<ExitLogits>,
    current: CalibrationFile,
}

impl Calibrator {
    fn build(cfg: &CalibratorConfig) -> Result<Self, ActorError> {
        let model = load_model(&cfg.weights, tch::Device::Cpu)?;
        let c = &model.card;
        let dir = cfg.data_dir.clone().unwrap_or_else(|| c.dataset.name.default_dir());
        let data = Dataset::load(c.dataset.name, &dir, c.dataset.split.validation, c.dataset.split.seed)?;
        let validation = split_exit_logits(&model.net, &data.validation)?;
        let current = match &cfg.initial {
            Initial::File(f) => {
                f.check_fits(model.net.architecture().num_exits(), &c.weights_sha256)?;
                f.clone()
            }
            Initial::Fit(method) => Self::fit(&model, &validation, *method)?,
        };
        Ok(Self { model, validation, current })
    }

    fn fit(model: &LoadedModel, validation: &[ExitLogits], method: Method) -> Result<CalibrationFile, ActorError> {
        let c = &model.card;
        let names = model.net.architecture().exit_names();
        Ok(fit_file(method, validation, &names, &c.weights, &c.weights_sha256, c.dataset.split.seed)?)
    }

    /// Starts the calibrator's thread, which builds its state (a bad model,
    /// dataset or file is a clear error here); returns its handle and the
    /// initial calibration.
    pub async fn start(cfg: CalibratorConfig) -> Result<(CalibratorHandle, CalibrationFile), ActorError> {
        let handle = CalibratorHandle(TensorPool::start("calibrator", 1, 8, move || Calibrator::build(&cfg))?);
        let initial = handle.current().await?;
        Ok((handle, initial))
    }
}

/// The calibrator's address: its thread and mailbox.
#[derive(Clone)]
pub struct CalibratorHandle(TensorPool<Calibrator>);

impl CalibratorHandle {
    /// The current calibration.
    pub async fn current(&self) -> Result<CalibrationFile, ActorError> {
        self.0.run(|c: &mut Calibrator| c.current.clone()).await
    }

    /// Fits again with `method`; the result becomes current.
    pub async fn refit(&self, method: Method) -> Result<CalibrationFile, ActorError> {
        self.0
            .run(move |c: &mut Calibrator| {
                c.current = Calibrator::fit(&c.model, &c.validation, method)?;
                Ok(c.current.clone())
            })
            .await?
    }

    /// Stops the thread (a refit in progress finishes first); see
    /// `TensorPool::shutdown`.
    pub fn shutdown(&self, within: std::time::Duration) -> Vec<String> {
        self.0.shutdown(within)
    }
}

/// The wire form of a calibration file.
pub fn to_update(file: &CalibrationFile) -> CalibrationUpdate {
    CalibrationUpdate {
        model_sha256: file.weights_sha256.clone(),
        method: match file.method {
            Method::Uncalibrated => CalibrationMethod::Uncalibrated,
            Method::Global => CalibrationMethod::Global,
            Method::PerBranch => CalibrationMethod::PerBranch,
        },
        temperatures: file.temperatures.clone(),
    }
}

pub fn method_of(m: CalibrationMethod) -> Method {
    match m {
        CalibrationMethod::Uncalibrated => Method::Uncalibrated,
        CalibrationMethod::Global => Method::Global,
        CalibrationMethod::PerBranch => Method::PerBranch,
    }
}

/// Serves the calibration actor on NATS: publishes the current temperatures
/// on `CALIBRATION_UPDATE` (and stores them in the control store, when there
/// is one) at start and after every refit, answers `CALIBRATION_GET` with
/// them and `CALIBRATION_REFIT` with the new ones (or an `ErrorReply` when
/// the request is malformed or the fit fails).
pub async fn serve_calibration_nats(
    client: async_nats::Client,
    calibrator: CalibratorHandle,
    store: Option<crate::control::ControlStore>,
    on_ready: impl FnOnce(),
) -> Result<(), ActorError> {
    let nats = |e: String| ActorError::Nats(e);
    let mut get = client.subscribe(subjects::CALIBRATION_GET).await.map_err(|e| nats(e.to_string()))?;
    let mut refit = client.subscribe(subjects::CALIBRATION_REFIT).await.map_err(|e| nats(e.to_string()))?;
    let publish = |file: CalibrationFile| {
        let (client, store) = (client.clone(), store.clone());
        async move {
            let update = to_update(&file);
            // Stored first: a device that starts after this sees it.
            if let Some(store) = &store {
                store.put_calibration(&update).await?;
            }
            let bytes = encode(&update)?;
            client.publish(subjects::CALIBRATION_UPDATE, bytes.clone().into()).await.map_err(|e| nats(e.to_string()))?;
            Ok::<_, ActorError>(bytes)
        }
    };
    publish(calibrator.current().await?).await?;
    client.flush().await.map_err(|e| nats(e.to_string()))?;
    on_ready();
    loop {
        tokio::select! {
            Some(msg) = get.next() => {
                if let Some(reply) = msg.reply {
                    let bytes = encode(&to_update(&calibrator.current().await?))?;
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            Some(msg) = refit.next() => {
                let result = match decode::<CalibrationRefit>(&msg.payload) {
                    Ok(r) => match calibrator.refit(method_of(r.method)).await {
                        Ok(file) => publish(file).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e.into()),
                };
                if let Some(reply) = msg.reply {
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => encode(&ErrorReply { seq: None, worker_id: "calibrator".into(), kind: ErrorKind::InvalidRequest, detail: e.to_string() })?,
                    };
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            else => return Ok(()),
        }
    }
}
