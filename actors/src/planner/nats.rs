//! The planner's NATS edge: network reports in (`serve_planner_nats`),
//! plans out (`NatsPlans`). The planner itself decides on its own messages
//! and never sees a wire type.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use branchpoint_core::planner::Observed;
use branchpoint_messages::{encode, subjects, CertifiedTarget, PlanTarget, PlanUpdate};

use super::{Planner, MAILBOX};
use crate::control::ControlStore;
use crate::plans::{DevicePlan, DeviceReport, PlanSink};

/// Plans for devices over NATS: each is published on
/// `branchpoint.plan.device.<id>` and, with a control store, stored when it
/// changes and again before its TTL runs out while the device keeps
/// reporting; a restarted planner starts from what is stored. Devices not
/// heard of for a TTL are forgotten here too.
pub struct NatsPlans {
    client: async_nats::Client,
    store: Option<ControlStore>,
    stored: HashMap<String, (PlanUpdate, Instant)>,
    pruned_at: usize,
}

impl NatsPlans {
    pub fn new(client: async_nats::Client) -> Self {
        Self { client, store: None, stored: HashMap::new(), pruned_at: 1024 }
    }

    /// Stores plans in `store`, starting from the device plans in `stored`.
    pub fn with_store(mut self, store: ControlStore, stored: Vec<PlanUpdate>) -> Self {
        for p in stored {
            if let PlanTarget::Device(id) = &p.target {
                self.stored.insert(id.clone(), (p.clone(), Instant::now()));
            }
        }
        self.store = Some(store);
        self
    }
}

impl PlanSink for NatsPlans {
    /// Runs on the planner's thread; storing and publishing run as tasks
    /// there, so the planner never waits for NATS.
    fn send(&mut self, p: DevicePlan) {
        let update = PlanUpdate {
            target: PlanTarget::Device(p.device_id.clone()),
            partition_branch: p.plan.partition_branch as u8,
            p_tar: p.plan.p_tar,
            certified: p.certified.map(|t| CertifiedTarget { accuracy: t.accuracy, delta: t.delta }),
        };
        let store = match &self.store {
            Some(s) => {
                let ttl = s.settings().device_plan_ttl;
                let fresh = self.stored.get(&p.device_id).is_some_and(|(old, at)| *old == update && at.elapsed() < ttl / 2);
                if fresh {
                    None
                } else {
                    self.stored.insert(p.device_id.clone(), (update.clone(), Instant::now()));
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
                let client = self.client.clone();
                let subject = subjects::plan_device(&p.device_id);
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
            Err(e) => tracing::warn!("planner: could not encode a plan for {}: {e}", p.device_id),
        }
    }
}

/// Serves network reports from NATS (`branchpoint.report.network`) until
/// the subscription ends. Malformed reports, and reports without the
/// planner's fields, are dropped with a message on stderr.
pub async fn serve_planner_nats(client: async_nats::Client, planner: Addr<Planner>, on_ready: impl FnOnce()) -> Result<(), crate::ActorError> {
    use branchpoint_messages::{decode, NetworkReport};
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
