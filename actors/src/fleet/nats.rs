//! The fleet's NATS edge: the bus a fleet runs on (`FleetBus`), its
//! statuses out (`publish_status`), and plans and temperatures in
//! (`forward_updates`), converted to the devices' own messages.
use std::time::Duration;

use actix::prelude::*;

use crate::clock::unix_us;
use crate::collector::{Collector, GetSnapshot};
use crate::control::{ControlChange, ControlStore};
use crate::device::{ApplyCalibration, ApplyPlan, Device, GetPlan};
use crate::error::ActorError;

/// One device of a fleet, as updates address it: by its id or its group.
#[derive(Clone)]
pub struct FleetDevice {
    pub id: String,
    pub group: String,
    pub addr: Addr<Device>,
}

/// The NATS connection a fleet runs on: its devices' network reports go
/// out on it, its statuses too, and plans and temperatures come in.
#[derive(Clone)]
pub struct FleetBus(pub async_nats::Client);

impl FleetBus {
    /// The devices' reports to a planner in another process.
    pub(super) fn reports(&self) -> Addr<crate::planner::nats::NatsReports> {
        crate::planner::nats::NatsReports::new(self.0.clone()).start()
    }
}

/// Publishes the fleet's status every `every` (until aborted).
pub(super) async fn publish_statuses(
    client: async_nats::Client,
    (fleet_id, group): (String, String),
    devices: Vec<(String, Addr<Device>)>,
    collector: Addr<Collector>,
    started_unix_us: u64,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        publish_status(&client, &fleet_id, &group, &devices, &collector, started_unix_us, true).await;
    }
}

/// The fleet's final status. It must leave before the process exits,
/// unless the server is gone: then a flush would wait for it forever.
pub(super) async fn publish_last_status(
    client: &async_nats::Client,
    (fleet_id, group): (&str, &str),
    devices: &[(String, Addr<Device>)],
    collector: &Addr<Collector>,
    started_unix_us: u64,
) {
    let last = async {
        publish_status(client, fleet_id, group, devices, collector, started_unix_us, false).await;
        let _ = client.flush().await;
    };
    if tokio::time::timeout(Duration::from_millis(500), last).await.is_err() {
        tracing::warn!("fleet: could not publish its last status (NATS unreachable)");
    }
}

/// Publishes a fleet's `FleetStatus`: the collector's totals and the plans
/// the devices hold (asked of each device, so it is what they apply, not what
/// was sent to them). A failed publish is reported and the fleet goes on.
pub async fn publish_status(
    client: &async_nats::Client,
    fleet_id: &str,
    group: &str,
    devices: &[(String, Addr<Device>)],
    collector: &Addr<Collector>,
    started_unix_us: u64,
    running: bool,
) {
    use branchpoint_messages::{encode, subjects, AppliedPlan, FleetStatus};
    let Ok((summary, latency)) = collector.send(GetSnapshot).await else { return };
    let mut applied: Vec<AppliedPlan> = Vec::new();
    for (_, d) in devices {
        let Ok((branch, p_tar, temperature)) = d.send(GetPlan).await else { continue };
        match applied.iter_mut().find(|a| a.partition_branch as usize == branch && a.p_tar == p_tar && a.temperature == temperature) {
            Some(a) => a.devices += 1,
            None => applied.push(AppliedPlan { partition_branch: branch as u8, p_tar, temperature, devices: 1 }),
        }
    }
    let status = FleetStatus {
        fleet_id: fleet_id.to_string(),
        group: group.to_string(),
        devices: devices.len() as u32,
        running,
        at_unix_us: unix_us(),
        started_unix_us,
        summary,
        latency_le_ms: latency.le_ms,
        latency_le_counts: latency.counts,
        latency_sum_ms: latency.sum_ms,
        applied,
    };
    match encode(&status) {
        Ok(bytes) => {
            if let Err(e) = client.publish(subjects::fleet_status(fleet_id), bytes.into()).await {
                tracing::warn!("fleet: could not publish its status: {e}");
            }
        }
        Err(e) => tracing::warn!("fleet: could not encode its status: {e}"),
    }
}

/// Forwards plans and temperatures to the devices. Plans come only from
/// the control store (JetStream key-value, see `control`), their one home:
/// the stored state is applied before `ready` fires, so devices start from
/// it, and later writes follow. A model's temperatures also come on
/// `branchpoint.calibration.update`, for a calibrator without a store.
///
/// Only temperatures for these weights (the model's, or a device's group's)
/// and plans for a device's group or the device itself are applied.
/// Malformed updates are dropped with a message on stderr: a bad publisher
/// must not stop the fleet. Without JetStream the fleet says so once, and
/// its devices keep their starting plan.
pub async fn forward_updates(client: async_nats::Client, devices: Vec<FleetDevice>, sha256: String, ready: tokio::sync::oneshot::Sender<()>) {
    use branchpoint_messages::{decode, subjects, CalibrationUpdate};
    use futures::StreamExt;
    let Ok(mut cal) = client.subscribe(subjects::CALIBRATION_UPDATE).await else {
        tracing::warn!("fleet: could not subscribe to calibration updates");
        return;
    };
    let apply = Forward { devices, model_sha256: sha256 };
    // Plans live only in the control store: without it the devices keep
    // the plan they started with.
    let mut stored: std::pin::Pin<Box<dyn futures::Stream<Item = ControlChange>>> = match resume(&client, &apply).await {
        Ok(watch) => Box::pin(watch),
        Err(e) => {
            tracing::warn!("fleet: no control store, so no plan reaches these devices (they keep their starting plan) and temperatures come only from the update subject: {e}");
            Box::pin(futures::stream::pending())
        }
    };
    let _ = client.flush().await;
    let _ = ready.send(());
    loop {
        tokio::select! {
            Some(msg) = cal.next() => match decode::<CalibrationUpdate>(&msg.payload) {
                // A group's temperatures travel only through the store.
                Ok(u) if u.group.is_some() => tracing::warn!("fleet: ignored a group's temperatures on the update subject (they travel through the control store)"),
                Ok(u) => apply.calibration(&u),
                Err(e) => tracing::warn!("fleet: ignored a malformed calibration update: {e}"),
            },
            Some(change) = stored.next() => match change {
                ControlChange::Plan(p) => apply.plan(&p),
                ControlChange::Calibration(u) => apply.calibration(&u),
            },
            else => return,
        }
    }
}

/// Applies the stored state (plans and temperatures each in the order they
/// were written, so the latest wins as it would have live), then returns
/// the watch of the store, which repeats the stored state (harmless:
/// applying is idempotent) and then follows every write.
async fn resume(client: &async_nats::Client, apply: &Forward) -> Result<impl futures::Stream<Item = ControlChange>, ActorError> {
    let store = ControlStore::open(client).await?;
    let mut plans = store.plans().await?;
    plans.sort_by_key(|p| p.revision);
    for p in &plans {
        apply.plan(&p.value);
    }
    for c in store.calibrations(&apply.model_sha256).await? {
        apply.calibration(&c.value);
    }
    store.watch(&apply.model_sha256).await
}

/// Who gets which update.
struct Forward {
    devices: Vec<FleetDevice>,
    model_sha256: String,
}

impl Forward {
    fn calibration(&self, u: &branchpoint_messages::CalibrationUpdate) {
        if u.model_sha256 != self.model_sha256 {
            tracing::warn!("fleet: ignored a calibration update for other weights");
            return;
        }
        for d in &self.devices {
            if u.group.as_ref().is_none_or(|g| *g == d.group) {
                d.addr.do_send(ApplyCalibration { temperatures: u.temperatures.clone() });
            }
        }
    }

    fn plan(&self, p: &branchpoint_messages::PlanUpdate) {
        use branchpoint_messages::PlanTarget;
        // Decoding checked the branch; a plan made in process may not have been.
        let partition_branch = match branchpoint_messages::PartitionBranch::new(p.partition_branch.into()) {
            Ok(b) => b,
            Err(e) => return tracing::warn!("fleet: ignored a plan: {e}"),
        };
        let apply = ApplyPlan { partition_branch, p_tar: p.p_tar, target_accuracy: p.certified.map(|c| c.accuracy), codec: p.codec, temperature: p.temperature };
        for d in &self.devices {
            let for_me = match &p.target {
                PlanTarget::Device(t) => *t == d.id,
                PlanTarget::Group(g) => *g == d.group,
            };
            if for_me {
                d.addr.do_send(apply.clone());
            }
        }
    }
}
