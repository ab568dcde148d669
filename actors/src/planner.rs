//! Partition planner: answers each device's network report with the plan
//! (partition branch and p_tar) that maximises predicted accuracy within the
//! deadline-miss bound (`branchpoint_core::planner::choose`).
//!
//! Owns: the model's statistics (from the calibrated validation split), the
//! costs of each device group, and a log of what it decided (for reports).
//! Messages in: `DeviceReport` (in-process), or NATS `NetworkReport`s through
//! `serve_planner_nats`. Plans go back as `ApplyPlan` to the device
//! (in-process, one round trip of the device's link after the report left)
//! or as a `PlanUpdate` on `branchpoint.plan.device.<id>` (NATS). A report
//! from an unknown group is dropped with a message: a stray publisher must
//! not stop the planner. Restart: over NATS with JetStream, plans are stored
//! in the control store (`control`) when they change, and a restarted planner
//! starts from the stored ones; devices keep their last plan meanwhile.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use branchpoint_core::planner::{choose, Costs, ModelStats, Observed, Prediction};
use serde::{Deserialize, Serialize};

use crate::plans::{ApplyPlan, DeviceReport};

/// One decision, for the run's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRecord {
    /// When the report was made, microseconds since the run's epoch.
    pub at_us: u64,
    pub group: String,
    pub device_id: String,
    /// The device's smoothed uplink estimate, Mbit/s.
    pub estimated_mbit_s: f64,
    pub prediction: Prediction,
}

pub struct Planner {
    stats: Arc<ModelStats>,
    /// Costs of known groups (a scenario's).
    costs: BTreeMap<String, Costs>,
    /// For devices of other groups: compute and bound from here, deadline
    /// and arrival rate from their reports.
    template: Option<Costs>,
    log: Vec<PlanRecord>,
    nats: Option<async_nats::Client>,
    /// Where plans are stored durably (over NATS with JetStream), and the
    /// plan stored for each device and when: a plan is stored when it
    /// changes, and again before its TTL runs out while the device keeps
    /// reporting; a restarted planner starts from what is stored. Devices
    /// not heard of for a TTL are forgotten here too.
    store: Option<crate::control::ControlStore>,
    stored: std::collections::HashMap<String, (branchpoint_messages::PlanUpdate, std::time::Instant)>,
    pruned_at: usize,
}

impl Planner {
    pub fn new(stats: Arc<ModelStats>, costs: BTreeMap<String, Costs>, template: Option<Costs>, nats: Option<async_nats::Client>) -> Self {
        Self { stats, costs, template, log: Vec::new(), nats, store: None, stored: Default::default(), pruned_at: 1024 }
    }

    /// Stores plans in `store`, starting from the device plans in `stored`.
    pub fn with_store(mut self, store: crate::control::ControlStore, stored: Vec<branchpoint_messages::PlanUpdate>) -> Self {
        use branchpoint_messages::PlanTarget;
        for p in stored {
            if let PlanTarget::Device(id) = &p.target {
                self.stored.insert(id.clone(), (p.clone(), std::time::Instant::now()));
            }
        }
        self.store = Some(store);
        self
    }

    fn costs_for(&self, r: &DeviceReport) -> Option<Costs> {
        if let Some(c) = self.costs.get(&r.group) {
            return Some(c.clone());
        }
        let (t, deadline_us, rate) = (self.template.as_ref()?, r.deadline_us?, r.arrival_rate?);
        Some(Costs { deadline_us, arrival_rate: rate, ..t.clone() })
    }
}

/// The planner's mailbox: reports from the network wait here; beyond it a
/// report is dropped and counted (each device reports again within a
/// second, and only its latest report matters).
pub const MAILBOX: usize = 4096;

impl Actor for Planner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

impl Handler<DeviceReport> for Planner {
    type Result = ();

    fn handle(&mut self, r: DeviceReport, ctx: &mut Context<Self>) {
        let Some(costs) = self.costs_for(&r) else {
            tracing::warn!(
                "planner: ignored a report from device {} of group {:?}: no settings for the group, and the report carries no deadline and arrival rate",
                r.device_id,
                r.group
            );
            return;
        };
        let prediction = choose(&self.stats, &costs, &r.observed);
        self.log.push(PlanRecord { at_us: r.at_us, group: r.group.clone(), device_id: r.device_id.clone(), estimated_mbit_s: r.estimated_mbit_s, prediction });
        let apply = ApplyPlan { partition_branch: prediction.plan.branch, p_tar: prediction.plan.p_tar, target_accuracy: prediction.certified.map(|t| t.accuracy) };
        match (r.reply_to, &self.nats) {
            (Some(device), _) => {
                ctx.run_later(r.rtt, move |_, _| device.do_send(apply));
            }
            (None, Some(client)) => {
                use branchpoint_messages::{encode, subjects, CertifiedTarget, PlanTarget, PlanUpdate};
                let update = PlanUpdate {
                    target: PlanTarget::Device(r.device_id.clone()),
                    partition_branch: apply.partition_branch as u8,
                    p_tar: apply.p_tar,
                    certified: prediction.certified.map(|t| CertifiedTarget { accuracy: t.accuracy, delta: t.delta }),
                };
                let store = match &self.store {
                    Some(s) => {
                        let ttl = s.settings().device_plan_ttl;
                        let fresh = self.stored.get(&r.device_id).is_some_and(|(p, at)| *p == update && at.elapsed() < ttl / 2);
                        if fresh {
                            None
                        } else {
                            self.stored.insert(r.device_id.clone(), (update.clone(), std::time::Instant::now()));
                            if self.stored.len() >= 2 * self.pruned_at {
                                self.stored.retain(|_, (_, at)| at.elapsed() < ttl);
                                self.pruned_at = self.stored.len().max(1024);
                            }
                            Some(s.clone())
                        }
                    }
                    None => None,
                };
                match encode(&update) {
                    Ok(bytes) => {
                        let client = client.clone();
                        let subject = subjects::plan_device(&r.device_id);
                        actix::spawn(async move {
                            if let Some(store) = store {
                                if let Err(e) = store.put_plan(&update).await {
                                    tracing::warn!("planner: could not store a plan: {e}");
                                }
                            }
                            if let Err(e) = client.publish(subject, bytes.into()).await {
                                tracing::warn!("planner: could not publish a plan: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("planner: could not encode a plan for {}: {e}", r.device_id),
                }
            }
            (None, None) => tracing::warn!("planner: no way to reach device {}", r.device_id),
        }
    }
}

/// Hands over the planner's log.
#[derive(Message)]
#[rtype(result = "Vec<PlanRecord>")]
pub struct TakePlanLog;

impl Handler<TakePlanLog> for Planner {
    type Result = MessageResult<TakePlanLog>;

    fn handle(&mut self, _: TakePlanLog, _: &mut Context<Self>) -> Self::Result {
        MessageResult(std::mem::take(&mut self.log))
    }
}

/// Serves network reports from NATS (`branchpoint.report.network`) until
/// the subscription ends. Malformed reports, and reports without the
/// planner's fields, are dropped with a message on stderr.
pub async fn serve_planner_nats(client: async_nats::Client, planner: Addr<Planner>, on_ready: impl FnOnce()) -> Result<(), crate::ActorError> {
    use branchpoint_messages::{decode, subjects, NetworkReport};
    use futures::StreamExt;
    let mut sub = client.subscribe(subjects::NETWORK_REPORT).await.map_err(|e| crate::ActorError::Nats(e.to_string()))?;
    client.flush().await.map_err(|e| crate::ActorError::Nats(e.to_string()))?;
    on_ready();
    let mut dropped = 0u64;
    while let Some(msg) = sub.next().await {
        let report = match decode::<NetworkReport>(&msg.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("planner: ignored a malformed network report: {e}");
                continue;
            }
        };
        let (Some(group), Some(us_per_byte), Some(response_us)) = (report.group.clone(), report.us_per_byte_conservative, report.response_us_conservative) else {
            tracing::warn!("planner: ignored a report from {} without group and conservative estimates", report.device_id);
            continue;
        };
        let sent = planner.try_send(DeviceReport {
            device_id: report.device_id.clone(),
            group,
            at_us: report.window_end_unix_us,
            observed: Observed { us_per_byte, response_us },
            estimated_mbit_s: report.uplink_bytes_per_s_ewma * 8.0 / 1e6,
            rtt: Duration::ZERO,
            reply_to: None,
            deadline_us: report.deadline_us.map(|d| d as f64),
            arrival_rate: report.arrival_rate,
        });
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

#[cfg(test)]
mod tests {
    use branchpoint_core::planner::{Plan, ThresholdStats};

    use super::*;

    /// Stands in for a device: hands every plan it gets to the test.
    struct FakeDevice(tokio::sync::mpsc::UnboundedSender<(ApplyPlan, tokio::time::Instant)>);

    impl Actor for FakeDevice {
        type Context = Context<Self>;
    }

    impl Handler<ApplyPlan> for FakeDevice {
        type Result = ();

        fn handle(&mut self, plan: ApplyPlan, _: &mut Context<Self>) {
            let _ = self.0.send((plan, tokio::time::Instant::now()));
        }
    }

    /// Branch 1 weak, branch 2 better; at 0.9 branch 2 keeps 80 % on the
    /// device at 97 % accuracy.
    fn stats() -> ModelStats {
        let mk = |branch, p_tar, offload_rate, edge| ThresholdStats {
            plan: Plan { branch, p_tar },
            offload_rate,
            edge_accuracy: edge,
            cloud_accuracy: 0.95,
            fallback_accuracy: 0.6,
            measured_edge_accuracy: edge,
            measured_cloud_accuracy: 0.95,
            certified: None,
        };
        ModelStats { candidates: vec![mk(1, 0.0, 0.0, 0.85), mk(1, 0.9, 0.4, 0.97), mk(1, 1.0, 1.0, 0.0), mk(2, 0.0, 0.0, 0.90), mk(2, 0.9, 0.2, 0.97), mk(2, 1.0, 1.0, 0.0)] }
    }

    fn report(device: &str, group: &str, us_per_byte: f64, reply_to: Recipient<ApplyPlan>) -> DeviceReport {
        DeviceReport {
            device_id: device.into(),
            group: group.into(),
            at_us: 0,
            observed: Observed { us_per_byte, response_us: 10_000.0 },
            estimated_mbit_s: 8.0 / us_per_byte,
            rtt: Duration::from_millis(40),
            reply_to: Some(reply_to),
            deadline_us: None,
            arrival_rate: None,
        }
    }

    /// The plan push in one process, without NATS: a report gets the
    /// planner's choice back one round trip after it left, a report the
    /// planner cannot plan for gets nothing, and the log holds what it
    /// decided. Paused time: the round trip costs no wall time.
    #[test]
    fn a_report_gets_its_plan_back_one_round_trip_later() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let (tx, mut plans) = tokio::sync::mpsc::unbounded_channel();
            let device = FakeDevice(tx).start().recipient();
            let costs = Costs { head_us: vec![2_000.0, 3_000.0], upload_bytes: vec![25_000.0, 12_500.0], deadline_us: 100_000.0, arrival_rate: 10.0, miss_bound: 0.05 };
            let planner = Planner::new(Arc::new(stats()), BTreeMap::from([("cameras".to_string(), costs)]), None, None).start();

            let sent = tokio::time::Instant::now();
            planner.do_send(report("cam-1", "cameras", 0.08, device.clone()));
            let (fast, at) = plans.recv().await.expect("a plan for the fast link");
            assert_eq!((fast.partition_branch, fast.p_tar, fast.target_accuracy), (2, 0.9, None), "100 Mbit/s offloads at branch 2: {fast:?}");
            assert!(at - sent >= Duration::from_millis(40), "the plan arrives one round trip after the report: {:?}", at - sent);

            // 0.1 Mbit/s: nothing can be offloaded in time.
            planner.do_send(report("cam-1", "cameras", 80.0, device.clone()));
            let (slow, _) = plans.recv().await.expect("a plan for the slow link");
            assert_eq!((slow.partition_branch, slow.p_tar), (2, 0.0), "{slow:?}");

            // A group the planner has no costs for, with no deadline in the
            // report: ignored, no plan. The log says what was decided.
            planner.do_send(report("phone-1", "phones", 0.08, device));
            let log = planner.send(TakePlanLog).await.unwrap();
            assert_eq!(log.iter().map(|r| (r.device_id.as_str(), r.prediction.plan.p_tar)).collect::<Vec<_>>(), vec![("cam-1", 0.9), ("cam-1", 0.0)]);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(plans.try_recv().is_err(), "no plan for a report the planner cannot plan for");
        });
    }
}
