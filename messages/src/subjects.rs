//! NATS subject names and the workers' queue group: the one place that says
//! who publishes what where. Every subject starts with `branchpoint.` so one
//! server can host other applications, and `branchpoint.>` sees everything.
//!
//! Ids that go into a subject (device ids, group names) must be single
//! subject tokens; [`is_valid_id`] is the rule, and every message checks it.

/// Prefix of the offload subjects; the partition branch is the last token.
pub const OFFLOAD_PREFIX: &str = "branchpoint.offload";

/// Wildcard a worker subscribes to when it serves the tail of every branch.
pub const OFFLOAD_ALL: &str = "branchpoint.offload.*";

/// Queue group of the cloud workers: NATS hands each offload request to one
/// member only, which balances the load without a broker of our own.
pub const WORKER_QUEUE_GROUP: &str = "branchpoint-workers";

/// Calibration actor -> devices: new temperatures (`CalibrationUpdate`).
/// One subject for all, since temperatures belong to the model, not a device.
pub const CALIBRATION_UPDATE: &str = "branchpoint.calibration.update";

/// Request/reply, anyone -> calibration actor: the current temperatures,
/// answered with a `CalibrationUpdate` (what a device asks at start).
pub const CALIBRATION_GET: &str = "branchpoint.calibration.get";

/// Request/reply, anyone -> calibration actor: `CalibrationRefit`, answered
/// with the new `CalibrationUpdate` once it has been published.
pub const CALIBRATION_REFIT: &str = "branchpoint.calibration.refit";

/// Request/reply, anyone -> calibration actor: `CertifyRequest`, answered
/// with a `CertifyReply` (the threshold certified for a target accuracy).
pub const CALIBRATION_CERTIFY: &str = "branchpoint.calibration.certify";

/// Workers -> calibration actor: `AuditResult`, the full model's answer to
/// an audited or offloaded input, beside the branch's logits.
pub const CALIBRATION_AUDIT: &str = "branchpoint.calibration.audit";

/// Calibration actor -> control plane: `CalibrationStatus`, the live
/// estimates of each watched group and branch.
pub const CALIBRATION_STATUS: &str = "branchpoint.status.calibration";

/// Devices -> planner: observed uplink throughput and round trip (`NetworkReport`).
pub const NETWORK_REPORT: &str = "branchpoint.report.network";

/// Workers -> autoscaler and control plane: queue depth, queue delay and
/// batching (`WorkerStatus`).
pub const WORKER_STATUS: &str = "branchpoint.worker.status";

/// Worker -> monitoring: the service API's error response for each typed
/// error reply a worker sent (headers `Nats-Service-Error` and
/// `Nats-Service-Error-Code`, no body); sending it there is what counts the
/// error in `$SRV.STATS`. The device gets the typed `ErrorReply` itself.
pub fn worker_errors(worker_id: &str) -> String {
    format!("branchpoint.worker.errors.{worker_id}")
}

/// Prefix of the fleets' status subjects, see [`fleet_status`].
pub const FLEET_STATUS_PREFIX: &str = "branchpoint.status.fleet";

/// Wildcard that sees every fleet's status (the control plane).
pub const FLEET_STATUS_ALL: &str = "branchpoint.status.fleet.*";

/// Fleet -> control plane: `FleetStatus` of fleet `fleet_id`.
pub fn fleet_status(fleet_id: &str) -> String {
    format!("{FLEET_STATUS_PREFIX}.{fleet_id}")
}

/// Device -> workers, request/reply: `OffloadRequest` for `partition_branch`,
/// answered with an `OffloadReply` on the request's reply inbox.
///
/// One subject per branch, because a worker batches only requests whose
/// activations have the same shape, and may load only some tails.
pub fn offload(partition_branch: u8) -> String {
    format!("{OFFLOAD_PREFIX}.{partition_branch}")
}

/// Whether `id` can serve as a device id, worker id or group name: 1 to 64
/// characters of `[A-Za-z0-9_-]`. No dots, spaces or `*`/`>`, because these
/// would split the subject or turn it into a wildcard.
pub fn is_valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}
