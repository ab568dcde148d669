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
    /// How audit results are watched.
    pub watch: WatchSettings,
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
    watch: LiveWatch,
}

/// Most (group, branch, threshold) triples watched at once; beyond it the
/// least recently heard one makes room (audit results come from the
/// network, and their keys must not grow without bound).
pub const MAX_WATCHED: usize = 256;

/// How a live calibrator watches: `monitor::MonitorConfig` without the
/// per-result parts (audit rate, target), which each result carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatchSettings {
    pub window_us: u64,
    pub max_observations: usize,
    pub drift_margin: f64,
    pub alarm_alpha: f64,
    pub delta: f64,
    pub min_refit_sample: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self { window_us: 120_000_000, max_observations: 50_000, drift_margin: 0.03, alarm_alpha: 0.01, delta: 0.05, min_refit_sample: 800 }
    }
}

/// The live calibrator's monitors, one per (group, branch, threshold in
/// force): audit results in, estimates and alarms out. Over NATS it only
/// raises alarms for now (no automatic refit): the refit's way to the
/// devices is the scenario engine's (virtual time) until devices send
/// audits.
#[derive(Debug, Clone, Default)]
pub struct LiveWatch {
    settings: WatchSettings,
    monitors: Vec<Watched>,
    refused: u64,
    clock: u64,
}

#[derive(Debug, Clone)]
struct Watched {
    group: String,
    branch: u8,
    p_tar: f64,
    monitor: branchpoint_models::monitor::Monitor,
    last_heard: u64,
    latest_us: u64,
}

impl LiveWatch {
    pub fn new(settings: WatchSettings) -> Self {
        Self { settings, ..Self::default() }
    }

    /// Takes one audit result, already decoded; a result that does not fit
    /// the model (another model's, a branch it lacks, the wrong number of
    /// classes) is refused and counted. Returns whether it raised an alarm.
    pub fn observe(&mut self, r: &branchpoint_messages::AuditResult, model_sha256: &str, temperatures: &[f64], classes: usize) -> Result<bool, ActorError> {
        let refuse = |w: &mut Self, why: String| {
            w.refused += 1;
            Err(ActorError::Invalid { what: "audit result".into(), reason: format!("it must be {why}") })
        };
        if r.model_sha256 != model_sha256 {
            return refuse(self, "for this calibrator's model".into());
        }
        let b = usize::from(r.partition_branch);
        if b == 0 || b >= temperatures.len() {
            return refuse(self, format!("for a side branch of this model (1 to {})", temperatures.len().saturating_sub(1)));
        }
        if r.branch_logits.len() != classes {
            return refuse(self, format!("{classes} logits, one per class of this model"));
        }
        self.clock += 1;
        let found = self.monitors.iter().position(|w| w.group == r.group && w.branch == r.partition_branch && w.p_tar == r.p_tar);
        let i = match found {
            Some(i) => i,
            None => {
                let s = self.settings;
                let cfg = branchpoint_models::monitor::MonitorConfig {
                    audit_rate: r.audit_rate,
                    target: Target { accuracy: r.target_accuracy, delta: s.delta },
                    window_us: s.window_us,
                    max_observations: s.max_observations,
                    drift_margin: s.drift_margin.min(r.target_accuracy / 2.0),
                    alarm_alpha: s.alarm_alpha,
                    auto_refit: false,
                    min_refit_interval_us: s.window_us,
                    min_refit_sample: s.min_refit_sample,
                };
                let monitor = match branchpoint_models::monitor::Monitor::new(cfg, temperatures[b - 1], r.p_tar) {
                    Ok(m) => m,
                    Err(e) => return refuse(self, format!("a watchable plan ({e})")),
                };
                if self.monitors.len() >= MAX_WATCHED {
                    let oldest = (0..self.monitors.len()).min_by_key(|&j| self.monitors[j].last_heard).expect("not empty");
                    self.monitors.swap_remove(oldest);
                }
                self.monitors.push(Watched { group: r.group.clone(), branch: r.partition_branch, p_tar: r.p_tar, monitor, last_heard: 0, latest_us: 0 });
                self.monitors.len() - 1
            }
        };
        let w = &mut self.monitors[i];
        w.last_heard = self.clock;
        w.latest_us = w.latest_us.max(r.decided_at_unix_us);
        let obs = branchpoint_models::monitor::Observation {
            t_us: r.decided_at_unix_us,
            logits: r.branch_logits.clone(),
            final_class: r.final_class,
            label: None,
            on_device: r.on_device,
            sampled: r.sampled,
        };
        match w.monitor.observe(obs) {
            Ok(event) => Ok(event.is_some()),
            Err(e) => {
                self.refused += 1;
                Err(e.into())
            }
        }
    }

    /// Counts a result that could not even be decoded.
    pub fn refuse_undecodable(&mut self) {
        self.refused += 1;
    }

    pub fn status(&self, model_sha256: &str, at_unix_us: u64) -> branchpoint_messages::CalibrationStatus {
        let watched = self
            .monitors
            .iter()
            .map(|w| {
                let e = w.monitor.estimate(w.latest_us, 0.05);
                let a = e.edge_agreement;
                branchpoint_messages::BranchWatch {
                    group: w.group.clone(),
                    partition_branch: w.branch,
                    target_accuracy: w.monitor.target_accuracy(),
                    temperature: w.monitor.temperature(),
                    threshold: w.monitor.threshold(),
                    audits: u32::try_from(e.audits).unwrap_or(u32::MAX),
                    offloads: u32::try_from(e.offloads).unwrap_or(u32::MAX),
                    edge_agreement: a.map(|a| a.estimate),
                    edge_agreement_low: a.map(|a| a.low),
                    edge_agreement_high: a.map(|a| a.high),
                    offload_rate: e.offload_rate,
                    ece: e.ece,
                    alarms: w.monitor.alarms(),
                    refits: w.monitor.refits().len() as u64,
                }
            })
            .collect();
        branchpoint_messages::CalibrationStatus { model_sha256: model_sha256.to_string(), at_unix_us, refused: self.refused, watched }
    }
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
        Ok(Self { model, validation, current, watch: LiveWatch::new(cfg.watch) })
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

    /// Takes one audit result off the network (`None`: it did not decode);
    /// returns whether it raised a drift alarm.
    pub async fn audit(&self, result: Option<branchpoint_messages::AuditResult>) -> Result<bool, ActorError> {
        self.0
            .run(move |c: &mut Calibrator| match result {
                Some(r) => {
                    let (sha, temps) = (c.current.weights_sha256.clone(), c.current.temperatures.clone());
                    let classes = c.validation.first().map_or(0, |e| e.classes);
                    c.watch.observe(&r, &sha, &temps, classes)
                }
                None => {
                    c.watch.refuse_undecodable();
                    Ok(false)
                }
            })
            .await?
    }

    /// What the calibrator sees of every watched group and branch.
    pub async fn watch_status(&self, at_unix_us: u64) -> Result<branchpoint_messages::CalibrationStatus, ActorError> {
        self.0.run(move |c: &mut Calibrator| c.watch.status(&c.current.weights_sha256, at_unix_us)).await
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
/// again on the new temperatures. Audit results on `CALIBRATION_AUDIT` feed
/// the live monitors (`LiveWatch`), whose estimates and alarms go out every
/// second on `CALIBRATION_STATUS`.
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
    // Audit results: the client's subscription buffer is bounded; a burst
    // beyond it is dropped by the client (a slow consumer), never queued
    // without end.
    let mut audits = client.subscribe(subjects::CALIBRATION_AUDIT).await.map_err(|e| nats(e.to_string()))?;
    let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            Some(msg) = audits.next() => {
                let result = decode::<branchpoint_messages::AuditResult>(&msg.payload).ok();
                match calibrator.audit(result).await {
                    Ok(true) => eprintln!("calibrator: drift alarm: a watched branch's on-device agreement with the final exit fell below its target"),
                    Ok(false) => {}
                    // Refused and counted; the status says how many.
                    Err(_) => {}
                }
            }
            _ = status_tick.tick() => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
                let status = calibrator.watch_status(now).await?;
                if !status.watched.is_empty() || status.refused > 0 {
                    let _ = client.publish(subjects::CALIBRATION_STATUS, encode(&status)?.into()).await;
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
