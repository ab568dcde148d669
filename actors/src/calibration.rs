//! Calibration actor: owns the model's current temperatures, refits them on
//! the validation split on request, and (over NATS) publishes every change so
//! running devices apply it live.
//!
//! Owns: a copy of the model, the validation split, the current calibration
//! file, all on its own thread (a `TensorPool` of one): a refit runs the
//! network over 5,000 validation inputs and fits temperatures, work that must
//! stay off the event loop. Messages in (`CalibratorHandle`): `current`,
//! `refit`, `certify`, one at a time in arrival order; at most a few wait.
//! A certified threshold holds for the temperatures it was found on, so
//! after a refit the stored certified plans are certified again. Restart: a
//! refit that panics rebuilds the state from the model and the initial
//! method, so temperatures fall back to the initial fit until the next
//! refit (the control store keeps the method an operator asked for).
//! Shutdown: `shutdown`, or the last handle dropped, joins the thread.
use std::path::PathBuf;

use branchpoint_messages::{
    decode, encode, subjects, CalibrationMethod, CalibrationRefit, CalibrationUpdate, CertifiedTarget, CertifyReply, CertifyRequest, ErrorKind,
    ErrorReply, PlanUpdate,
};
use branchpoint_models::risk::{certify, default_grid, ConfidenceCounts, Target};
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

    /// The threshold certified for side branch `partition_branch` (from 1)
    /// and `target`, on the validation split and the current temperatures.
    pub async fn certify(&self, partition_branch: u8, target: CertifiedTarget) -> Result<CertifyReply, ActorError> {
        self.0
            .run(move |c: &mut Calibrator| {
                let branches = c.validation.len().saturating_sub(1);
                let b = usize::from(partition_branch);
                if b == 0 || b > branches {
                    return Err(ActorError::Model(branchpoint_models::ModelError::InvalidArgument {
                        what: "partition_branch".into(),
                        reason: format!("{partition_branch}: this model has side branches 1 to {branches}"),
                    }));
                }
                let temperature = c.current.temperatures[b - 1];
                let counts = ConfidenceCounts::of_exit(&c.validation[b - 1], temperature)?;
                let cert = certify(&counts, Target { accuracy: target.accuracy, delta: target.delta }, &default_grid())?;
                let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
                Ok(CertifyReply {
                    model_sha256: c.current.weights_sha256.clone(),
                    temperature,
                    partition_branch,
                    target,
                    threshold: cert.threshold,
                    inputs: count(cert.inputs),
                    exits: count(cert.exits),
                    errors: count(cert.errors),
                    error_upper_bound: cert.error_upper_bound,
                })
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

/// Certifies every stored certified plan again on the calibrator's current
/// temperatures, and stores those whose threshold moved (devices follow the
/// store). Returns how many moved.
pub async fn recertify_stored_plans(calibrator: &CalibratorHandle, store: &crate::control::ControlStore) -> Result<usize, ActorError> {
    let mut moved = 0;
    for stored in store.plans().await? {
        let plan = stored.value;
        let Some(target) = plan.certified else { continue };
        let reply = calibrator.certify(plan.partition_branch, target).await?;
        if reply.p_tar() != plan.p_tar {
            store.put_plan(&PlanUpdate { p_tar: reply.p_tar(), ..plan }).await?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// Serves the calibration actor on NATS: publishes the current temperatures
/// on `CALIBRATION_UPDATE` (and stores them in the control store, when there
/// is one) at start and after every refit, answers `CALIBRATION_GET` with
/// them, `CALIBRATION_REFIT` with the new ones and `CALIBRATION_CERTIFY`
/// with a `CertifyReply` (or an `ErrorReply` when the request is malformed
/// or the fit fails). After a refit, stored certified plans are certified
/// again on the new temperatures.
pub async fn serve_calibration_nats(
    client: async_nats::Client,
    calibrator: CalibratorHandle,
    store: Option<crate::control::ControlStore>,
    on_ready: impl FnOnce(),
) -> Result<(), ActorError> {
    let nats = |e: String| ActorError::Nats(e);
    let mut get = client.subscribe(subjects::CALIBRATION_GET).await.map_err(|e| nats(e.to_string()))?;
    let mut refit = client.subscribe(subjects::CALIBRATION_REFIT).await.map_err(|e| nats(e.to_string()))?;
    let mut certify = client.subscribe(subjects::CALIBRATION_CERTIFY).await.map_err(|e| nats(e.to_string()))?;
    let refused = |e: ActorError| encode(&ErrorReply { seq: None, worker_id: "calibrator".into(), kind: ErrorKind::InvalidRequest, detail: e.to_string() });
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
                if let (Ok(_), Some(store)) = (&result, &store) {
                    match recertify_stored_plans(&calibrator, store).await {
                        Ok(0) => {}
                        Ok(n) => eprintln!("calibrator: {n} certified plan(s) certified again on the new temperatures"),
                        Err(e) => eprintln!("calibrator: could not certify the stored plans again: {e}"),
                    }
                }
                if let Some(reply) = msg.reply {
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => refused(e)?,
                    };
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            Some(msg) = certify.next() => {
                let result = match decode::<CertifyRequest>(&msg.payload) {
                    Ok(r) => calibrator.certify(r.partition_branch, r.target).await.and_then(|reply| Ok(encode(&reply)?)),
                    Err(e) => Err(e.into()),
                };
                if let Some(reply) = msg.reply {
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => refused(e)?,
                    };
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            else => return Ok(()),
        }
    }
}
