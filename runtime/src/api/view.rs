//! What the API knows of the system, from what the services publish: each
//! fleet's and worker's latest status (at most `MAX_TRACKED` of each; the
//! least recently heard makes room) and the calibrator's live estimates.
//! Stale entries are forgotten when read.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use branchpoint_actors::control::ControlStore;
use branchpoint_messages::{decode, subjects, CalibrationStatus, FleetStatus, WorkerStatus};
use futures::StreamExt;

/// The model this API serves: its weights' digest and its branches.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_sha256: String,
    pub branches: usize,
}

/// A fleet as last heard of, with its recent input rate.
struct FleetView {
    status: FleetStatus,
    seen: Instant,
    inputs_per_s: f64,
    /// (status time in µs, inputs) of the statuses inside the rate window.
    recent: std::collections::VecDeque<(u64, usize)>,
}

/// Inputs per second are measured over this much of the fleet's recent statuses.
const RATE_WINDOW_US: u64 = 2_000_000;

struct WorkerView {
    status: WorkerStatus,
    seen: Instant,
}

#[derive(Default)]
struct View {
    fleets: BTreeMap<String, FleetView>,
    workers: BTreeMap<String, WorkerView>,
    /// The calibrator's latest live estimates, for this API's model.
    calibration: Option<(CalibrationStatus, Instant)>,
    /// Statuses refused (malformed, or figures that cannot be) since start.
    refused: u64,
}

/// Most fleets and workers the view holds: statuses come from the network,
/// and forged ids must not grow it without bound (the least recently heard
/// makes room).
const MAX_TRACKED: usize = 1024;

/// Makes room in `map` for one more entry, dropping the least recently seen.
fn make_room<V>(map: &mut BTreeMap<String, V>, seen: impl Fn(&V) -> Instant) {
    if map.len() >= MAX_TRACKED {
        if let Some(oldest) = map.iter().min_by_key(|(_, v)| seen(v)).map(|(k, _)| k.clone()) {
            map.remove(&oldest);
        }
    }
}

#[derive(Clone)]
pub struct ApiState {
    pub(super) client: async_nats::Client,
    pub(super) store: ControlStore,
    pub(super) token: Option<String>,
    pub(super) model: ModelInfo,
    pub(super) stale_after: Duration,
    view: Arc<Mutex<View>>,
}

impl ApiState {
    pub fn new(client: async_nats::Client, store: ControlStore, token: Option<String>, model: ModelInfo, stale_after: Duration) -> Self {
        Self { client, store, token, model, stale_after, view: Arc::default() }
    }

    /// Subscribes to fleet and worker statuses and keeps the view current;
    /// returns the two tasks. Malformed statuses are reported and skipped.
    pub async fn follow(&self) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let mut fleets = self.client.subscribe(subjects::FLEET_STATUS_ALL).await.context("subscribing to fleet statuses")?;
        let mut workers = self.client.subscribe(subjects::WORKER_STATUS).await.context("subscribing to worker statuses")?;
        let mut calibration = self.client.subscribe(subjects::CALIBRATION_STATUS).await.context("subscribing to calibration statuses")?;
        self.client.flush().await.context("subscribing to statuses")?;
        let view = self.view.clone();
        let f = actix::spawn(async move {
            while let Some(msg) = fleets.next().await {
                match decode::<FleetStatus>(&msg.payload) {
                    Ok(s) => {
                        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                        let mut recent = v.fleets.remove(&s.fleet_id).map(|f| f.recent).unwrap_or_default();
                        recent.push_back((s.at_unix_us, s.summary.inputs));
                        // The rate over the last two seconds or so: statuses
                        // come every 250 ms, too short a window to be steady.
                        while recent.len() > 2 && s.at_unix_us.saturating_sub(recent[1].0) >= RATE_WINDOW_US {
                            recent.pop_front();
                        }
                        let (t0, n0) = recent[0];
                        let dt = s.at_unix_us.saturating_sub(t0) as f64 / 1e6;
                        let inputs_per_s = if s.running && dt > 0.0 { s.summary.inputs.saturating_sub(n0) as f64 / dt } else { 0.0 };
                        if !v.fleets.contains_key(&s.fleet_id) {
                            make_room(&mut v.fleets, |f| f.seen);
                        }
                        v.fleets.insert(s.fleet_id.clone(), FleetView { status: s, seen: Instant::now(), inputs_per_s, recent });
                    }
                    Err(e) => {
                        view.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                        tracing::warn!("api: ignored a malformed fleet status: {e}")
                    }
                }
            }
        });
        let view = self.view.clone();
        let w = actix::spawn(async move {
            while let Some(msg) = workers.next().await {
                match decode::<WorkerStatus>(&msg.payload) {
                    Ok(s) => {
                        let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
                        if !v.workers.contains_key(&s.worker_id) {
                            make_room(&mut v.workers, |w| w.seen);
                        }
                        v.workers.insert(s.worker_id.clone(), WorkerView { status: s, seen: Instant::now() });
                    }
                    Err(e) => {
                        view.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                        tracing::warn!("api: ignored a malformed worker status: {e}")
                    }
                }
            }
        });
        let (view, sha) = (self.view.clone(), self.model.model_sha256.clone());
        let c = actix::spawn(async move {
            while let Some(msg) = calibration.next().await {
                match decode::<CalibrationStatus>(&msg.payload) {
                    Ok(s) if s.model_sha256 == sha => view.lock().unwrap_or_else(|e| e.into_inner()).calibration = Some((s, Instant::now())),
                    Ok(_) => {}
                    Err(e) => {
                        view.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                        tracing::warn!("api: ignored a malformed calibration status: {e}")
                    }
                }
            }
        });
        Ok(vec![f, w, c])
    }

    /// Statuses refused since start (malformed, or figures that cannot be).
    pub(super) fn refused_statuses(&self) -> u64 {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).refused
    }

    /// The calibrator's live estimates, if it spoke recently.
    pub(super) fn calibration_status(&self) -> Option<CalibrationStatus> {
        let v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.calibration.as_ref().filter(|(_, seen)| seen.elapsed() < self.stale_after).map(|(s, _)| s.clone())
    }

    /// Fleets and workers heard from recently enough; forgets the others. A
    /// finished fleet stays, with its final totals, until the API restarts:
    /// its counters must not vanish from /metrics once it ends.
    pub(super) fn snapshot(&self) -> (Vec<(FleetStatus, f64)>, Vec<WorkerStatus>) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let stale = self.stale_after;
        v.workers.retain(|_, w| w.seen.elapsed() < stale);
        v.fleets.retain(|_, f| !f.status.running || f.seen.elapsed() < stale);
        let fleets = v.fleets.values().map(|f| (f.status.clone(), f.inputs_per_s)).collect();
        let workers = v.workers.values().map(|w| w.status.clone()).collect();
        (fleets, workers)
    }
}
