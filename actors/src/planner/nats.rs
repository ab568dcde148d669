//! The NATS edge of the device-planner exchange: network reports in
//! (`serve_planner_nats`) and plans out to the control store (`NatsPlans`)
//! at the planner, and
//! network reports out at the devices (`NatsReports`). The planner and the
//! devices decide on their own messages (`crate::plans`) and never see a
//! wire type; `network_report` and `device_report` translate both ways.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_core::planner::Observed;
use branchpoint_messages::{encode, subjects, CertifiedTarget, NetworkReport, PlanTarget, PlanUpdate};

use super::{Planner, MAILBOX};
use crate::control::ControlStore;
use crate::plans::{DevicePlan, DeviceReport, PlanSink};

/// Plans for devices over NATS: each is stored in the control store's
/// plans bucket under `device.<id>`, the one place devices learn plans
/// from (they watch the bucket). The planner is the only writer of device
/// keys. A plan is stored when it changes and again before its TTL runs
/// out while the device keeps reporting; a restarted planner starts from
/// what is stored. Devices not heard of for a TTL are forgotten here too.
pub struct NatsPlans {
    store: ControlStore,
    stored: HashMap<String, (PlanUpdate, Instant)>,
    pruned_at: usize,
}

impl NatsPlans {
    /// Stores plans in `store`, starting from the device plans in `stored`.
    pub fn new(store: ControlStore, stored: Vec<PlanUpdate>) -> Self {
        let mut plans = Self { store, stored: HashMap::new(), pruned_at: 1024 };
        for p in stored {
            if let PlanTarget::Device(id) = &p.target {
                plans.stored.insert(id.clone(), (p.clone(), Instant::now()));
            }
        }
        plans
    }
}

impl PlanSink for NatsPlans {
    /// Runs on the planner's thread; storing runs as a task there, so the
    /// planner never waits for NATS.
    fn send(&mut self, p: DevicePlan) {
        let update = PlanUpdate {
            target: PlanTarget::Device(p.device_id.clone()),
            partition_branch: p.plan.partition_branch.byte(),
            p_tar: p.plan.p_tar,
            certified: p.certified.map(|t| CertifiedTarget { accuracy: t.accuracy, delta: t.delta }),
            codec: p.plan.codec,
            temperature: p.plan.temperature,
        };
        let ttl = self.store.settings().device_plan_ttl;
        if self.stored.get(&p.device_id).is_some_and(|(old, at)| *old == update && at.elapsed() < ttl / 2) {
            return;
        }
        self.stored.insert(p.device_id.clone(), (update.clone(), Instant::now()));
        if self.stored.len() >= 2 * self.pruned_at {
            self.stored.retain(|_, (_, at)| at.elapsed() < ttl);
            self.pruned_at = self.stored.len().max(1024);
        }
        let store = self.store.clone();
        actix::spawn(async move {
            if let Err(e) = store.put_plan(&update).await {
                tracing::warn!("planner: could not store the plan for a device: {e}");
            }
        });
    }
}

/// A device's report as it goes on the wire.
pub fn network_report(r: &DeviceReport) -> NetworkReport {
    NetworkReport {
        device_id: r.device_id.clone(),
        uplink_bytes_per_s_ewma: r.estimated_mbit_s * 1e6 / 8.0,
        rtt_us_ewma: r.response_us,
        window_start_unix_us: r.at_us.saturating_sub(r.window_us),
        window_end_unix_us: r.at_us,
        samples: 0,
        group: Some(r.group.clone()),
        us_per_byte_conservative: Some(r.observed.us_per_byte),
        response_us_conservative: Some(r.observed.response_us),
        deadline_us: r.deadline_us.map(|d| d as u64),
        arrival_rate: r.arrival_rate,
    }
}

/// A report from the wire as the planner takes it, or `None` without the
/// planner's fields (group and conservative estimates). Its plan goes back
/// over NATS, so there is no `reply_to`.
pub fn device_report(r: NetworkReport) -> Option<DeviceReport> {
    let (Some(group), Some(us_per_byte), Some(response_us)) = (r.group, r.us_per_byte_conservative, r.response_us_conservative) else {
        return None;
    };
    Some(DeviceReport {
        device_id: r.device_id,
        group,
        at_us: r.window_end_unix_us,
        observed: Observed { us_per_byte, response_us, cloud: None },
        estimated_mbit_s: r.uplink_bytes_per_s_ewma * 8.0 / 1e6,
        response_us: r.rtt_us_ewma,
        window_us: r.window_end_unix_us.saturating_sub(r.window_start_unix_us),
        rtt: Duration::ZERO,
        reply_to: None,
        deadline_us: r.deadline_us.map(|d| d as f64),
        arrival_rate: r.arrival_rate,
    })
}

/// Devices' reports for a planner in another process: each `DeviceReport`
/// is published as a `NetworkReport` on `branchpoint.report.network` half
/// the device's round trip after it was sent, since the report crosses the
/// device's (emulated) link. Reports come at the devices' report interval,
/// so the mailbox stays short; a report that cannot be published is lost
/// with a warning, as a report on a lossy link would be.
pub struct NatsReports {
    client: async_nats::Client,
}

impl NatsReports {
    pub fn new(client: async_nats::Client) -> Self {
        Self { client }
    }
}

impl Actor for NatsReports {
    type Context = Context<Self>;
}

impl Handler<DeviceReport> for NatsReports {
    type Result = ();

    fn handle(&mut self, r: DeviceReport, _: &mut Context<Self>) {
        match encode(&network_report(&r)) {
            Ok(bytes) => {
                let client = self.client.clone();
                let delay = r.rtt / 2;
                actix::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = client.publish(subjects::NETWORK_REPORT, bytes.into()).await {
                        tracing::warn!(device = %r.device_id, "could not publish a network report: {e}");
                    }
                });
            }
            Err(e) => tracing::warn!(device = %r.device_id, "could not encode a network report: {e}"),
        }
    }
}

/// Serves network reports from NATS (`branchpoint.report.network`) until
/// the subscription ends, and tells the planner the worker pool's load from
/// the workers' status (`branchpoint.worker.status`, `PoolLoad`). Malformed
/// reports and statuses, and reports without the planner's fields, are
/// dropped with a message.
pub async fn serve_planner_nats(
    client: async_nats::Client,
    planner: Addr<Planner>,
    on_ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::ActorError> {
    use branchpoint_messages::{decode, WorkerStatus};
    use futures::StreamExt;
    let nats = |e: String| crate::ActorError::Nats(e);
    let reports = client.subscribe(subjects::NETWORK_REPORT).await.map_err(|e| nats(e.to_string()))?;
    let statuses = client.subscribe(subjects::WORKER_STATUS).await.map_err(|e| nats(e.to_string()))?;
    client.flush().await.map_err(|e| nats(e.to_string()))?;
    on_ready();
    let mut merged = futures::stream::select(reports.map(|m| (true, m)), statuses.map(|m| (false, m)));
    let mut pool = PoolView::default();
    let mut dropped = 0u64;
    tokio::pin!(shutdown);
    loop {
        // Shutdown is seen between messages, never in the middle of one.
        let (is_report, msg) = tokio::select! {
            _ = &mut shutdown => break,
            next = merged.next() => match next {
                Some(m) => m,
                None => break,
            },
        };
        if !is_report {
            match decode::<WorkerStatus>(&msg.payload) {
                Ok(status) => {
                    // Only the latest load matters: a full mailbox drops it.
                    let _ = planner.try_send(super::PoolLoad(pool.heard(status, Instant::now())));
                }
                Err(e) => tracing::warn!("planner: ignored a malformed worker status: {e}"),
            }
            continue;
        }
        let report = match decode::<NetworkReport>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("planner: ignored a malformed network report: {e}");
                continue;
            }
        };
        let device_id = report.device_id.clone();
        let Some(report) = device_report(report) else {
            tracing::warn!("planner: ignored a report from {device_id} without group and conservative estimates");
            continue;
        };
        let sent = planner.try_send(report);
        match sent {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                dropped += 1;
                // Said at the first and then every 1,000th, not per report.
                if dropped % 1000 == 1 {
                    tracing::warn!("planner: {dropped} network report(s) dropped so far: more arrive than it plans (mailbox of {MAILBOX})");
                }
            }
            Err(SendError::Closed(_)) => break,
        }
    }
    Ok(())
}

/// The pool from its workers' status: each worker's latest queue depth,
/// forgetting a worker not heard from for `POOL_LOAD_TTL` (stopped, or cut
/// off). Bounded: one entry per live worker id, and at most
/// `MAX_POOL_WORKERS` of them (a flood of made-up ids evicts the stalest).
#[derive(Debug, Default)]
pub struct PoolView {
    workers: HashMap<String, (u32, Instant)>,
}

/// Most workers a pool view keeps.
pub const MAX_POOL_WORKERS: usize = 4096;

impl PoolView {
    /// A worker's status arrived at `now`: the pool's load after it.
    pub fn heard(&mut self, status: branchpoint_messages::WorkerStatus, now: Instant) -> branchpoint_core::planner::CloudLoad {
        self.workers.retain(|_, (_, at)| now.saturating_duration_since(*at) <= super::POOL_LOAD_TTL);
        if self.workers.len() >= MAX_POOL_WORKERS && !self.workers.contains_key(&status.worker_id) {
            if let Some(stalest) = self.workers.iter().min_by_key(|(_, (_, at))| *at).map(|(id, _)| id.clone()) {
                self.workers.remove(&stalest);
            }
        }
        self.workers.insert(status.worker_id, (status.queue_depth, now));
        branchpoint_core::planner::CloudLoad { backlog: self.workers.values().map(|(q, _)| f64::from(*q)).sum(), workers: self.workers.len() as f64, inputs_per_s: 0.0 }
    }
}

/// Starts `serve_control_audits` on the current arbiter, for as long as the
/// process runs, and returns once it is subscribed.
pub async fn spawn_control_audits(client: async_nats::Client, planner: Addr<Planner>, model_sha256: String) -> Result<(), crate::ActorError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    actix::spawn(async move {
        let ready = move || {
            let _ = tx.send(());
        };
        if let Err(e) = serve_control_audits(client, planner, model_sha256, ready, std::future::pending()).await {
            tracing::error!("planner: {e}");
        }
    });
    rx.await.map_err(|_| crate::ActorError::Nats("the planner could not subscribe to the audit results".into()))
}

/// Feeds the planner's control loops (`Planner::with_controls`) the audit
/// results the workers publish (`branchpoint.calibration.audit`: every
/// audit, and every offload of a watched device, with the final exit's
/// answer) until the subscription ends. Results for another model, and
/// malformed ones, are dropped and counted; a full mailbox drops one too
/// (evidence is a sample: losing some costs power, never validity).
pub async fn serve_control_audits(
    client: async_nats::Client,
    planner: Addr<Planner>,
    model_sha256: String,
    on_ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::ActorError> {
    use branchpoint_messages::{decode, AuditResult};
    use futures::StreamExt;
    let mut audits = client.subscribe(subjects::CALIBRATION_AUDIT).await.map_err(|e| crate::ActorError::Nats(e.to_string()))?;
    client.flush().await.map_err(|e| crate::ActorError::Nats(e.to_string()))?;
    on_ready();
    let mut dropped = 0u64;
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            next = audits.next() => match next {
                Some(m) => m,
                None => break,
            },
        };
        let observation = match decode::<AuditResult>(&msg.payload) {
            Ok(r) if r.model_sha256 == model_sha256 => super::ControlObservation {
                group: r.group,
                branch: usize::from(r.partition_branch),
                observation: branchpoint_core::monitor::Observation {
                    t_us: r.decided_at_unix_us,
                    logits: r.branch_logits,
                    final_class: r.final_class,
                    label: r.label,
                    on_device: r.on_device,
                    sampled: r.sampled,
                },
            },
            _ => {
                dropped += 1;
                if dropped % 1000 == 1 {
                    tracing::warn!("planner: {dropped} audit result(s) dropped so far: malformed, or for another model than {model_sha256}");
                }
                continue;
            }
        };
        match planner.try_send(observation) {
            Ok(()) | Err(SendError::Full(_)) => {}
            Err(SendError::Closed(_)) => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use branchpoint_core::planner::CloudLoad;

    fn status(worker: &str, queue_depth: u32) -> branchpoint_messages::WorkerStatus {
        branchpoint_messages::WorkerStatus { worker_id: worker.into(), queue_depth, ..Default::default() }
    }

    /// The pool is the sum of each worker's latest status; a worker not
    /// heard from for the TTL is gone, and made-up ids cannot grow it
    /// without bound.
    #[test]
    fn the_pool_view_sums_the_latest_status_of_live_workers() {
        let mut pool = PoolView::default();
        let t0 = Instant::now();
        assert_eq!(pool.heard(status("w1", 10), t0), CloudLoad { backlog: 10.0, workers: 1.0, inputs_per_s: 0.0 });
        assert_eq!(pool.heard(status("w2", 5), t0), CloudLoad { backlog: 15.0, workers: 2.0, inputs_per_s: 0.0 });
        assert_eq!(pool.heard(status("w1", 2), t0 + Duration::from_secs(1)), CloudLoad { backlog: 7.0, workers: 2.0, inputs_per_s: 0.0 }, "w1's latest replaces its earlier one");
        let later = t0 + super::super::POOL_LOAD_TTL + Duration::from_secs(2);
        assert_eq!(pool.heard(status("w3", 1), later), CloudLoad { backlog: 1.0, workers: 1.0, inputs_per_s: 0.0 }, "w1 and w2 went quiet");
        for i in 0..MAX_POOL_WORKERS + 10 {
            pool.heard(status(&format!("rogue-{i}"), 0), later);
        }
        assert!(pool.workers.len() <= MAX_POOL_WORKERS);
    }

    /// What a device reports reaches a remote planner as it was sent: the
    /// two translations at the edge are inverse for every field the planner
    /// reads, through MessagePack.
    #[test]
    fn a_report_crosses_the_wire_unchanged() {
        let sent = DeviceReport {
            device_id: "cell-3".into(),
            group: "cell".into(),
            at_us: 12_000_000,
            observed: Observed { us_per_byte: 0.75, response_us: 41_000.0, cloud: None },
            estimated_mbit_s: 12.5,
            response_us: 38_000.0,
            window_us: 1_000_000,
            rtt: Duration::from_millis(60),
            reply_to: None,
            deadline_us: Some(150_000.0),
            arrival_rate: Some(10.0),
        };
        let wire = branchpoint_messages::decode::<NetworkReport>(&encode(&network_report(&sent)).unwrap()).unwrap();
        assert_eq!((wire.window_start_unix_us, wire.window_end_unix_us), (11_000_000, 12_000_000));
        let got = device_report(wire).expect("a report with the planner's fields");
        assert_eq!((got.device_id.as_str(), got.group.as_str(), got.at_us, got.window_us), ("cell-3", "cell", 12_000_000, 1_000_000));
        assert_eq!((got.observed.us_per_byte, got.observed.response_us, got.response_us), (0.75, 41_000.0, 38_000.0));
        assert!((got.estimated_mbit_s - 12.5).abs() < 1e-12, "{}", got.estimated_mbit_s);
        assert_eq!((got.deadline_us, got.arrival_rate), (Some(150_000.0), Some(10.0)));
        let bare = NetworkReport { group: None, ..network_report(&sent) };
        assert!(device_report(bare).is_none(), "a report without a group cannot be planned for");
    }
}
