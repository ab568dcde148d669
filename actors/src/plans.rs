//! The messages between devices and the partition planner in one process.
//! They live apart from both actors so that neither imports the other: the
//! device reports to a `Recipient<DeviceReport>` and the planner answers a
//! `Recipient<ApplyPlan>`, so each can be tested against a fake of the other.
//! Over NATS the same exchange is `NetworkReport` and `PlanUpdate`
//! (branchpoint-messages), translated at the edge (`planner::nats`: a
//! device's reports go to a `NatsReports` there, which publishes them).
use std::time::Duration;

use actix::prelude::*;
use branchpoint_core::planner::Observed;
use branchpoint_messages::PartitionBranch;

/// What a device saw of its network, and where to send its plan.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct DeviceReport {
    pub device_id: String,
    pub group: String,
    pub at_us: u64,
    pub observed: Observed,
    pub estimated_mbit_s: f64,
    /// The mean response time (µs) the device measured (its EWMA).
    pub response_us: f64,
    /// The report covers link time `at_us - window_us` to `at_us`.
    pub window_us: u64,
    /// The device's current round trip: the plan arrives this long after
    /// the report left (half up, half down).
    pub rtt: Duration,
    /// In-process devices get their plan directly; `None` over NATS.
    pub reply_to: Option<Recipient<ApplyPlan>>,
    /// The device's own deadline (µs) and arrival rate, for groups the
    /// planner has no settings for.
    pub deadline_us: Option<f64>,
    pub arrival_rate: Option<f64>,
}

/// New partition branch and p_tar, applied to inputs that arrive from now on.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ApplyPlan {
    pub partition_branch: PartitionBranch,
    pub p_tar: f64,
    /// Set when p_tar is a threshold certified for this on-device accuracy
    /// (`PlanUpdate::certified`): the target a watched device's audits name.
    pub target_accuracy: Option<f64>,
    /// How to encode offloaded activations; `None` keeps the device's own
    /// (a planner that does not choose codecs).
    pub codec: Option<branchpoint_messages::Codec>,
    /// The branch's temperature the threshold was chosen at (`None`: keep
    /// the device's).
    pub temperature: Option<f64>,
}

/// A plan for a device the planner cannot reach in process: the planner's
/// decision, before any wire type.
#[derive(Debug, Clone)]
pub struct DevicePlan {
    pub device_id: String,
    pub plan: ApplyPlan,
    /// The target accuracy (and delta) the threshold is certified for.
    pub certified: Option<branchpoint_core::risk::Target>,
}

/// Where the planner's plans for out-of-process devices go (over NATS:
/// `planner::NatsPlans`).
pub trait PlanSink {
    fn send(&mut self, plan: DevicePlan);
}
