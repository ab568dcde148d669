//! Message types and their codec: MessagePack with named fields, wrapped in
//! an envelope that carries the wire version.
//!
//! Compatibility rule: adding a field is not a version bump. Fields are
//! encoded by name (`rmp_serde::to_vec_named`) and unknown fields are ignored
//! on decode, so an older peer reads a newer message and skips what it does
//! not know. A new field must therefore be optional (`#[serde(default)]`) for
//! the newer peer to read older messages. Anything else (renaming, retyping or
//! removing a field, a new enum variant that old peers must understand)
//! bumps [`WIRE_VERSION`], and peers refuse any version but their own.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::subjects::is_valid_id;
use crate::tensor::{Tensor, MAX_TENSOR_BYTES};
use crate::{MessageError, PartitionBranch, WIRE_VERSION};

/// Largest encoded message accepted: the largest tensor plus room for the
/// rest. Checked before parsing so no decode work is spent on a flood.
pub const MAX_MESSAGE_BYTES: u64 = MAX_TENSOR_BYTES + 1024 * 1024;

/// Nesting depth allowed while decoding. Our messages nest 4 levels; the
/// limit stops a hostile `[[[[...]]]]` from recursing deep into the stack.
const MAX_DEPTH: usize = 16;

/// A type that crosses a process boundary: it can be validated, encoded with
/// [`encode`] and decoded with [`decode`].
pub trait Message: Serialize + DeserializeOwned {
    /// Checks everything that the types alone do not (ranges, ids, tensors).
    fn validate(&self) -> Result<(), MessageError>;
}

#[derive(Serialize)]
struct EnvelopeOut<'a, M> {
    wire_version: u16,
    body: &'a M,
}

/// The envelope as decoded; `wire_version` is skipped here because
/// [`VersionProbe`] has checked it already.
#[derive(Deserialize)]
struct EnvelopeIn<M> {
    body: M,
}

/// The envelope with the body skipped, so the version is checked before the
/// body is interpreted: a message of another version fails with
/// `VersionMismatch`, not with a confusing error about some field.
#[derive(Deserialize)]
struct VersionProbe {
    wire_version: u16,
}

/// Validates `msg` and encodes it as `{wire_version, body}` in MessagePack
/// with named fields. Validating here means a peer never sends what the
/// other side would refuse.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, MessageError> {
    msg.validate()?;
    encode_unvalidated(msg, WIRE_VERSION)
}

/// The size `encode` would give `msg`, counted as it is serialised, without
/// building the bytes: an emulated uplink charges each offload its real
/// size on the wire without encoding it.
pub fn encoded_len<M: Serialize>(msg: &M) -> Result<usize, MessageError> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let envelope = EnvelopeOut { wire_version: WIRE_VERSION, body: msg };
    rmp_serde::encode::write_named(&mut count, &envelope).map_err(|e| MessageError::Encode(e.to_string()))?;
    Ok(count.0)
}

/// Encodes without validating and with any version; for tests of the decoder.
pub(crate) fn encode_unvalidated<M: Serialize>(msg: &M, version: u16) -> Result<Vec<u8>, MessageError> {
    let envelope = EnvelopeOut { wire_version: version, body: msg };
    rmp_serde::to_vec_named(&envelope).map_err(|e| MessageError::Encode(e.to_string()))
}

/// Decodes and validates a message. Never panics: any input that is not a
/// valid message of this version and type gives a `MessageError`.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, MessageError> {
    let size = bytes.len() as u64;
    if size > MAX_MESSAGE_BYTES {
        return Err(MessageError::TooLarge { what: "message", size, limit: MAX_MESSAGE_BYTES });
    }
    let probe: VersionProbe = from_slice(bytes)?;
    if probe.wire_version != WIRE_VERSION {
        return Err(MessageError::VersionMismatch { got: probe.wire_version, expected: WIRE_VERSION });
    }
    let envelope: EnvelopeIn<M> = from_slice(bytes)?;
    envelope.body.validate()?;
    Ok(envelope.body)
}

fn from_slice<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, MessageError> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de).map_err(|e| MessageError::Decode(e.to_string()))
}

/// The `seq` of a request that did not decode as a whole (a field out of
/// range, a bad tensor), if its envelope and seq are readable: so that an
/// error reply can still say which request it refuses.
pub fn decode_seq(bytes: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Seq {
        seq: u64,
    }
    #[derive(Deserialize)]
    struct Env {
        body: Seq,
    }
    if bytes.len() as u64 > MAX_MESSAGE_BYTES {
        return None;
    }
    from_slice::<Env>(bytes).ok().map(|e| e.body.seq)
}

/// When an offload answer stops being useful.
///
/// A relative budget, not an absolute time: devices and workers run on
/// different machines whose clocks may disagree by more than a whole budget
/// (tens of milliseconds), and comparing an absolute deadline from one clock
/// with the other would drop fresh requests or keep stale ones. The worker
/// anchors `budget_us` at its own receive time instead, so only one clock is
/// involved. That ignores the uplink transit, which makes the worker slightly
/// optimistic; the device keeps its own timer on its own clock and falls back
/// on its local answer when it fires, so a late reply is merely discarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deadline {
    /// Device clock at send, microseconds since the Unix epoch (0: not
    /// given). A worker compares it with its own clock only to refuse a
    /// request whose budget ended more than 2 s before it arrived (held up
    /// in a client's buffer through a broker outage), so clocks that agree
    /// within a second or so (NTP) are enough.
    pub sent_at_unix_us: u64,
    /// How long after sending the device still waits for the answer, in µs.
    pub budget_us: u64,
}

/// Device -> worker: run the tail of `partition_branch` on `activation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffloadRequest {
    pub device_id: String,
    /// Per-device sequence number; echoed in the reply.
    pub seq: u64,
    /// The branch the device's head ended with, numbered from 1; the worker
    /// runs `tail(partition_branch)`.
    pub partition_branch: u8,
    /// Output of `head(partition_branch)`, batch dimension first.
    pub activation: Tensor,
    /// Missing on the wire decodes as the zero default, which validation
    /// refuses as `MissingDeadline` (clearer than a generic decode error).
    #[serde(default)]
    pub deadline: Deadline,
    /// Set by a watched device: the worker also sends the final exit's
    /// answer, with this, to the calibrator (`AuditResult`). An audit
    /// (`on_device`) changes no outcome and is shed first under load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<AuditTag>,
    /// The SHA-256 of the model whose head made the activation (the
    /// weights' for a built-in model, the card's for an imported one): a
    /// worker serving several models runs that model's tail, and refuses
    /// one it does not serve (`UnknownModel`). Absent: the worker's first
    /// model, as before workers served several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_sha256: Option<String>,
}

/// What a watched device adds to an offload or an audit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditTag {
    pub model_sha256: String,
    pub group: String,
    pub branch_logits: Vec<f32>,
    pub on_device: bool,
    pub sampled: bool,
    pub audit_rate: f64,
    pub p_tar: f64,
    pub target_accuracy: f64,
    pub decided_at_unix_us: u64,
    /// The input's true label, where the sender knows it (a simulated
    /// fleet replaying a labelled test set); never used to decide, only
    /// reported beside the agreement with the final exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
}

impl AuditTag {
    /// The result the worker sends once the final exit answered `final_class`.
    pub fn result(&self, device_id: &str, partition_branch: u8, final_class: u32) -> AuditResult {
        AuditResult {
            model_sha256: self.model_sha256.clone(),
            device_id: device_id.to_string(),
            group: self.group.clone(),
            partition_branch,
            decided_at_unix_us: self.decided_at_unix_us,
            branch_logits: self.branch_logits.clone(),
            final_class,
            on_device: self.on_device,
            sampled: self.sampled,
            audit_rate: self.audit_rate,
            p_tar: self.p_tar,
            target_accuracy: self.target_accuracy,
            label: self.label,
        }
    }
}

impl Message for OffloadRequest {
    fn validate(&self) -> Result<(), MessageError> {
        check_id("device id", &self.device_id)?;
        check_branch(self.partition_branch)?;
        if self.deadline.budget_us == 0 {
            return Err(MessageError::MissingDeadline);
        }
        if let Some(sha) = &self.model_sha256 {
            check_sha256(sha)?;
        }
        if let Some(tag) = &self.audit {
            // The same checks as the result it becomes (class 0 exists).
            tag.result(&self.device_id, self.partition_branch, 0).validate()?;
        }
        self.activation.validate()
    }
}

/// Where the worker's time went, so the planner can tell queueing from compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerTimings {
    /// From receiving the request to starting its batch, in µs.
    pub queue_us: u64,
    /// Running the tail on the batch, in µs.
    pub compute_us: u64,
    /// Requests in the batch this one ran in.
    pub batch_size: u32,
}

/// Worker -> device: the final exit's answer for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OffloadAnswer {
    /// The request's `seq`.
    pub seq: u64,
    pub worker_id: String,
    /// Predicted class index of the final exit.
    pub class: u32,
    /// Max softmax probability of the final exit, in [0, 1].
    pub confidence: f32,
    pub timings: WorkerTimings,
}

/// What went wrong with an offload, so the device can choose how to react
/// (e.g. back off on `Overloaded`, re-plan on `UnknownBranch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The budget ran out before the worker could start the request.
    DeadlineExpired,
    /// The worker's queue is full.
    Overloaded,
    /// The request failed validation or decoding.
    InvalidRequest,
    /// The request's wire version is not the worker's.
    UnsupportedVersion,
    /// The worker does not serve this partition branch.
    UnknownBranch,
    /// The worker does not serve the model the request names
    /// (`model_sha256`). Peers older than this kind decode it as `Unknown`.
    UnknownModel,
    /// The worker failed for a reason of its own.
    Internal,
    /// A kind this build does not know (sent by a newer peer); decoding it as
    /// `Unknown` lets new kinds be added without a version bump.
    #[serde(other)]
    Unknown,
}

/// Worker -> device: the offload failed; the device falls back on its own answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The request's `seq`, if the worker could decode that far.
    pub seq: Option<u64>,
    pub worker_id: String,
    pub kind: ErrorKind,
    /// Human-readable detail, e.g. the `MessageError` text.
    pub detail: String,
}

/// Worker -> device: the reply to an `OffloadRequest`, answer or error. One
/// enum so the device decodes a single type and must handle both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffloadReply {
    Answer(OffloadAnswer),
    Error(ErrorReply),
}

impl Message for OffloadReply {
    fn validate(&self) -> Result<(), MessageError> {
        match self {
            OffloadReply::Answer(a) => {
                check_id("worker id", &a.worker_id)?;
                check_range("confidence", f64::from(a.confidence), 1.0, "within [0, 1]")
            }
            OffloadReply::Error(e) => check_id("worker id", &e.worker_id),
        }
    }
}

/// How the temperatures were obtained (the names of `branchpoint calibrate
/// --method` and of the evaluation report).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibrationMethod {
    /// All temperatures 1: raw softmax, e.g. to undo a calibration.
    Uncalibrated,
    /// One temperature shared by all exits, fit on the validation split.
    Global,
    /// One temperature per exit, each fit on the validation split.
    PerBranch,
}

/// A typed error also travels alone, e.g. as the calibration actor's answer
/// to a refit it could not do.
impl Message for ErrorReply {
    fn validate(&self) -> Result<(), MessageError> {
        check_id("worker id", &self.worker_id)
    }
}

/// Anyone -> calibration actor, request/reply on `CALIBRATION_REFIT`: fit
/// temperatures again with `method` on the validation split and publish
/// them. The reply is the resulting `CalibrationUpdate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationRefit {
    pub method: CalibrationMethod,
}

impl Message for CalibrationRefit {
    fn validate(&self) -> Result<(), MessageError> {
        Ok(())
    }
}

/// Anyone -> calibration actor, request/reply on `CALIBRATION_CERTIFY`: the
/// threshold certified, on the validation split and the temperatures in
/// force, for side branch `partition_branch` and `target` (Learn-then-Test;
/// `risk::certify` in the models crate). The reply is a `CertifyReply`, or
/// an `ErrorReply` when the request does not fit the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertifyRequest {
    /// Side branch, numbered from 1.
    pub partition_branch: u8,
    pub target: CertifiedTarget,
}

impl Message for CertifyRequest {
    fn validate(&self) -> Result<(), MessageError> {
        check_branch(self.partition_branch)?;
        self.target.validate()
    }
}

/// Calibration actor -> requester: what was certified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertifyReply {
    /// The weights and temperatures the threshold holds for: after a refit
    /// the calibrator certifies stored certified plans again.
    pub model_sha256: String,
    pub temperature: f64,
    pub partition_branch: u8,
    pub target: CertifiedTarget,
    /// The lowest threshold certified; absent when none is (then the plan's
    /// p_tar is 1: the branch offloads every input).
    pub threshold: Option<f64>,
    /// On the validation split at that threshold: inputs, those that exit,
    /// and the wrong ones among them; and the Clopper-Pearson upper bound on
    /// their error rate at confidence 1 - delta.
    pub inputs: u32,
    pub exits: u32,
    pub errors: u32,
    pub error_upper_bound: f64,
}

impl CertifyReply {
    /// The plan threshold this certificate gives.
    pub fn p_tar(&self) -> f64 {
        self.threshold.unwrap_or(1.0)
    }
}

impl Message for CertifyReply {
    fn validate(&self) -> Result<(), MessageError> {
        check_sha256(&self.model_sha256)?;
        check_branch(self.partition_branch)?;
        self.target.validate()?;
        if let Some(t) = self.threshold {
            crate::PTar::plan(t)?;
        }
        if !is_valid_temperature(self.temperature) {
            return Err(MessageError::OutOfRange { field: "temperature", value: self.temperature, expected: "in [1e-3, 1e3]" });
        }
        if self.exits > self.inputs || self.errors > self.exits {
            return Err(MessageError::OutOfRange { field: "exits", value: f64::from(self.exits), expected: "errors <= exits <= inputs" });
        }
        Ok(())
    }
}

/// Most classes an audit result may carry logits for.
pub const MAX_AUDIT_CLASSES: usize = 1000;

/// Worker -> calibration actor, on `CALIBRATION_AUDIT`: what the full model
/// said of one input a device audited (decided on the device, sent to the
/// cloud as well) or offloaded, beside the branch's own logits. The
/// calibrator's monitor (`branchpoint_models::monitor`) learns from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditResult {
    pub model_sha256: String,
    pub device_id: String,
    pub group: String,
    pub partition_branch: u8,
    /// When the device decided, its clock, µs since the epoch.
    pub decided_at_unix_us: u64,
    /// The branch's raw logits (before any temperature).
    pub branch_logits: Vec<f32>,
    /// The final exit's class.
    pub final_class: u32,
    /// Decided on the device (an audit) rather than offloaded.
    pub on_device: bool,
    /// Its audit coin came up (always true for an audit).
    pub sampled: bool,
    /// The device's audit rate, for the monitor's weights.
    pub audit_rate: f64,
    /// The threshold the device decided with, and the on-device accuracy
    /// its plan targets (the certified accuracy, or p_tar itself).
    pub p_tar: f64,
    pub target_accuracy: f64,
    /// The true label, where the device knows it (simulation only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<u32>,
}

impl Message for AuditResult {
    fn validate(&self) -> Result<(), MessageError> {
        check_sha256(&self.model_sha256)?;
        check_id("device id", &self.device_id)?;
        check_id("group name", &self.group)?;
        check_branch(self.partition_branch)?;
        let n = self.branch_logits.len();
        if !(2..=MAX_AUDIT_CLASSES).contains(&n) {
            return Err(MessageError::OutOfRange { field: "branch_logits", value: n as f64, expected: "2 to 1000 classes" });
        }
        if let Some(z) = self.branch_logits.iter().find(|z| !z.is_finite()) {
            return Err(MessageError::OutOfRange { field: "branch_logits", value: f64::from(*z), expected: "finite" });
        }
        if self.final_class as usize >= n {
            return Err(MessageError::OutOfRange { field: "final_class", value: f64::from(self.final_class), expected: "below the number of classes" });
        }
        if let Some(y) = self.label.filter(|&y| y as usize >= n) {
            return Err(MessageError::OutOfRange { field: "label", value: f64::from(y), expected: "below the number of classes" });
        }
        if self.on_device && !self.sampled {
            return Err(MessageError::OutOfRange { field: "sampled", value: 0.0, expected: "true for an audit (on_device)" });
        }
        if !(self.audit_rate > 0.0 && self.audit_rate <= 1.0) {
            return Err(MessageError::OutOfRange { field: "audit_rate", value: self.audit_rate, expected: "in (0, 1]" });
        }
        crate::PTar::plan(self.p_tar)?;
        if !(self.target_accuracy > 0.0 && self.target_accuracy < 1.0) {
            return Err(MessageError::OutOfRange { field: "target_accuracy", value: self.target_accuracy, expected: "in (0, 1)" });
        }
        Ok(())
    }
}

/// Calibration actor -> control plane, every status interval on
/// `CALIBRATION_STATUS`: what it sees of each watched (group, branch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationStatus {
    pub model_sha256: String,
    pub at_unix_us: u64,
    /// Audit results refused since the calibrator started (malformed, out
    /// of range, another model's, or beyond the watched limit).
    pub refused: u64,
    pub watched: Vec<BranchWatch>,
    /// Drift alarms and refits since the calibrator started (refits
    /// alarmed too), over every monitor, past ones included.
    #[serde(default)]
    pub alarms_total: u64,
    #[serde(default)]
    pub refits_total: u64,
}

/// One watched (group, branch): the live estimate of the plan in force.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BranchWatch {
    pub group: String,
    pub partition_branch: u8,
    pub target_accuracy: f64,
    pub temperature: f64,
    pub threshold: f64,
    pub audits: u32,
    pub offloads: u32,
    /// On-device agreement with the final exit and its 95 % interval.
    pub edge_agreement: Option<f64>,
    pub edge_agreement_low: Option<f64>,
    pub edge_agreement_high: Option<f64>,
    pub offload_rate: Option<f64>,
    pub ece: Option<f64>,
    pub alarms: u64,
    pub refits: u64,
    /// On-device accuracy against the true labels and its 95 % interval,
    /// from the audits that carried one (simulated fleets only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_accuracy: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_accuracy_low: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edge_accuracy_high: Option<f64>,
    /// The live reliability diagram: the non-empty ones of 15 equal-width
    /// confidence bins, weighted to stand for every input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reliability: Vec<ReliabilityBin>,
    /// Whether a drift alarm refits the branch (off: alarms only).
    #[serde(default)]
    pub auto_refit: bool,
    /// The latest refit of this branch for the group, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refit: Option<RefitSummary>,
    /// Results decided under a plan a refit had already replaced (devices
    /// that had not applied it yet): not counted in the estimates.
    #[serde(default)]
    pub stale: u64,
}

/// A drift refit, as a watched branch's status reports it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefitSummary {
    /// When the calibrator refit (its clock, µs since the epoch).
    pub at_unix_us: u64,
    /// The device's clock of the input that completed the refit's sample.
    pub decided_at_unix_us: u64,
    pub temperature: f64,
    pub threshold: f64,
    /// Sampled inputs that fit the temperature, and that certified the threshold.
    pub fit_inputs: u32,
    pub certify_inputs: u32,
}

/// One bin of a live reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Mean calibrated confidence of the bin's inputs.
    pub confidence: f64,
    /// Their agreement with the final exit.
    pub agreement: f64,
    /// Their weight: how many inputs they stand for.
    pub weight: f64,
}

/// Most watched (group, branch) rows a status may carry.
pub const MAX_WATCHED_ROWS: usize = 1024;

impl Message for CalibrationStatus {
    fn validate(&self) -> Result<(), MessageError> {
        check_sha256(&self.model_sha256)?;
        if self.watched.len() > MAX_WATCHED_ROWS {
            return Err(MessageError::OutOfRange { field: "watched", value: self.watched.len() as f64, expected: "at most 1024 rows" });
        }
        for w in &self.watched {
            check_id("group name", &w.group)?;
            check_branch(w.partition_branch)?;
            if w.reliability.len() > 15 {
                return Err(MessageError::OutOfRange { field: "reliability", value: w.reliability.len() as f64, expected: "at most 15 bins" });
            }
            let probability = |v: f64| (0.0..=1.0).contains(&v);
            if let Some(b) = w.reliability.iter().find(|b| !(probability(b.confidence) && probability(b.agreement) && b.weight.is_finite() && b.weight >= 0.0)) {
                return Err(MessageError::OutOfRange { field: "reliability", value: b.confidence, expected: "confidence and agreement in [0, 1], a finite weight" });
            }
            if let Some(r) = &w.last_refit {
                if !is_valid_temperature(r.temperature) {
                    return Err(MessageError::OutOfRange { field: "last_refit.temperature", value: r.temperature, expected: "in [1e-3, 1e3]" });
                }
                crate::PTar::plan(r.threshold)?;
            }
        }
        Ok(())
    }
}

/// Calibration actor -> devices: divide each exit's logits by its temperature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationUpdate {
    /// SHA-256 of the weights these temperatures were fit for (as in the
    /// model card); a device running other weights must ignore the update.
    pub model_sha256: String,
    pub method: CalibrationMethod,
    /// One per exit, ordered branch 1, branch 2, ..., final.
    pub temperatures: Vec<f64>,
    /// Set when these temperatures are for one device group only: the
    /// calibrator refit a branch for that group's inputs after a drift
    /// alarm. Such updates travel only through the control store (key
    /// `model.<sha256>.group.<group>`), never on the update subject, so a
    /// peer that does not know this field never applies them to everyone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// The range of temperatures on the wire. A temperature divides logits:
/// below 1e-3 every confidence is 1, above 1e3 every one is 1/classes, so
/// nothing outside it calibrates anything, and a value like 1e-30 or 1e300
/// is a mistake or a forgery.
pub const MIN_TEMPERATURE: f64 = 1e-3;
pub const MAX_TEMPERATURE: f64 = 1e3;

/// Whether `t` is a temperature the wire accepts.
pub fn is_valid_temperature(t: f64) -> bool {
    (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t)
}

/// Most exits a model may have on the wire (temperatures, counts per exit).
pub const MAX_EXITS: usize = 64;

impl Message for CalibrationUpdate {
    fn validate(&self) -> Result<(), MessageError> {
        check_sha256(&self.model_sha256)?;
        if let Some(g) = &self.group {
            check_id("group name", g)?;
        }
        if self.temperatures.is_empty() {
            return Err(MessageError::NoTemperatures);
        }
        if self.temperatures.len() > MAX_EXITS {
            return Err(MessageError::OutOfRange { field: "temperatures", value: self.temperatures.len() as f64, expected: "at most 64 exits" });
        }
        match self.temperatures.iter().enumerate().find(|(_, t)| !is_valid_temperature(**t)) {
            Some((i, &value)) => Err(MessageError::Temperature { exit: i + 1, value }),
            None => Ok(()),
        }
    }
}

/// Whom a plan is for: one device or a named group of devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlanTarget {
    Device(String),
    Group(String),
}

/// Planner -> devices: where to cut and when to offload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanUpdate {
    pub target: PlanTarget,
    /// Branch to end the head with, numbered from 1.
    pub partition_branch: u8,
    /// Answer on the device when the branch's calibrated confidence is at
    /// least `p_tar`; offload otherwise. In [0, 1]: 0 answers every input on
    /// the device, 1 offloads every input.
    pub p_tar: f64,
    /// Set when `p_tar` is the threshold its sender certified for this
    /// target (on-device accuracy at least `accuracy` with probability at
    /// least 1 - `delta`), so that devices and reports can say so. Absent
    /// for a plain p_tar; older senders never set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certified: Option<CertifiedTarget>,
    /// How to encode offloaded activations ("f32", "f16" or "int8"). Absent:
    /// the device keeps the codec it has (planners before codecs never set
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec: Option<crate::Codec>,
    /// The temperature of `partition_branch` that `p_tar` was chosen at:
    /// the device applies both together (a threshold means nothing at
    /// another temperature). Absent: the device keeps the temperature it
    /// has (senders whose plans follow the model's temperatures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// A target on-device accuracy and the confidence a certificate gives it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CertifiedTarget {
    pub accuracy: f64,
    pub delta: f64,
}

impl CertifiedTarget {
    fn validate(&self) -> Result<(), MessageError> {
        for (field, value) in [("certified accuracy", self.accuracy), ("certified delta", self.delta)] {
            if !(value > 0.0 && value < 1.0) {
                return Err(MessageError::OutOfRange { field, value, expected: "in (0, 1)" });
            }
        }
        Ok(())
    }
}

impl Message for PlanUpdate {
    fn validate(&self) -> Result<(), MessageError> {
        match &self.target {
            PlanTarget::Device(id) => check_id("device id", id)?,
            PlanTarget::Group(name) => check_id("group name", name)?,
        }
        check_branch(self.partition_branch)?;
        // 0 means every input exits at the branch (device only), 1 means
        // every input is offloaded (cloud only): the planner's extremes.
        crate::PTar::plan(self.p_tar)?;
        if let Some(c) = self.certified {
            c.validate()?;
        }
        match self.temperature {
            Some(value) if !is_valid_temperature(value) => Err(MessageError::Temperature { exit: usize::from(self.partition_branch), value }),
            _ => Ok(()),
        }
    }
}

/// Device -> planner: what the device saw of its uplink in a time window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkReport {
    pub device_id: String,
    /// EWMA of observed uplink throughput, bytes per second.
    pub uplink_bytes_per_s_ewma: f64,
    /// EWMA of offload round trips, µs (includes the worker's time).
    pub rtt_us_ewma: f64,
    /// Window the observations come from, device clock, µs since the epoch.
    pub window_start_unix_us: u64,
    pub window_end_unix_us: u64,
    /// Offloads observed in the window; 0 means the EWMAs are stale.
    pub samples: u32,
    /// For the partition planner (absent from older devices): the device's
    /// group, and its conservative estimates (mean worsened by its safety
    /// margin of deviations): uplink time per byte and response time, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub us_per_byte_conservative: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_us_conservative: Option<f64>,
    /// The device's deadline per input (µs) and its arrival rate (inputs
    /// per second), so a planner needs no per-group settings of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_rate: Option<f64>,
}

impl Message for NetworkReport {
    fn validate(&self) -> Result<(), MessageError> {
        check_id("device id", &self.device_id)?;
        check_non_negative("uplink_bytes_per_s_ewma", self.uplink_bytes_per_s_ewma)?;
        check_non_negative("rtt_us_ewma", self.rtt_us_ewma)?;
        if let Some(g) = &self.group {
            check_id("group name", g)?;
        }
        for (field, v) in
            [("us_per_byte_conservative", self.us_per_byte_conservative), ("response_us_conservative", self.response_us_conservative), ("arrival_rate", self.arrival_rate)]
        {
            if let Some(v) = v {
                check_non_negative(field, v)?;
            }
        }
        if self.window_end_unix_us < self.window_start_unix_us {
            return Err(MessageError::OutOfRange { field: "window_end_unix_us", value: self.window_end_unix_us as f64, expected: "at least window_start_unix_us" });
        }
        Ok(())
    }
}

/// Worker -> autoscaler and control plane: how loaded the worker is,
/// published every status interval on `branchpoint.worker.status`.
/// `Default` is an idle worker with no id (give it one before sending).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub worker_id: String,
    /// Requests waiting now: for a batch, or in a batch waiting for compute.
    pub queue_depth: u32,
    /// Batches run since the worker started.
    pub batches_served: u64,
    /// Requests per batch over those batches.
    pub mean_batch_size: f64,
    /// EWMA of the time requests wait before their batch starts, µs.
    pub queue_delay_us_ewma: f64,
    /// Worker clock when this status was taken, µs since the epoch.
    pub at_unix_us: u64,
    /// Requests received since the worker started.
    #[serde(default)]
    pub requests: u64,
    /// Error replies sent since the worker started.
    #[serde(default)]
    pub errors: u64,
    /// Mean time the requests answered since the previous status waited for
    /// compute after their batch was formed, µs (0 when none were answered).
    /// The batching window is left out on purpose: it is chosen, not
    /// congestion, and under light load it would hide an idle worker.
    #[serde(default)]
    pub queue_delay_us_interval: f64,
    /// Mean batch size over the batches run since the previous status.
    #[serde(default)]
    pub batch_size_interval: f64,
}

/// Largest batch a status may report: far above any worker's `max_batch`.
pub const MAX_BATCH_ON_WIRE: f64 = 65_536.0;
/// Longest queue delay a status may report: an hour, in µs.
const MAX_DELAY_US: f64 = 3.6e9;

impl Message for WorkerStatus {
    fn validate(&self) -> Result<(), MessageError> {
        check_id("worker id", &self.worker_id)?;
        check_range("mean_batch_size", self.mean_batch_size, MAX_BATCH_ON_WIRE, "within [0, 65536]")?;
        check_range("batch_size_interval", self.batch_size_interval, MAX_BATCH_ON_WIRE, "within [0, 65536]")?;
        check_range("queue_delay_us_ewma", self.queue_delay_us_ewma, MAX_DELAY_US, "within an hour")?;
        check_range("queue_delay_us_interval", self.queue_delay_us_interval, MAX_DELAY_US, "within an hour")?;
        if self.errors > self.requests {
            return Err(MessageError::OutOfRange { field: "errors", value: self.errors as f64, expected: "at most the requests received" });
        }
        if self.batches_served > self.requests {
            return Err(MessageError::OutOfRange {
                field: "batches_served",
                value: self.batches_served as f64,
                expected: "at most the requests received (a batch holds one at least)",
            });
        }
        Ok(())
    }
}

/// A fleet's totals: what `branchpoint fleet --json` writes, and the core of
/// the `FleetStatus` the fleet publishes while it runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetSummary {
    /// Inputs the fleet fed in.
    pub inputs: usize,
    /// Outcomes received (equals `inputs` when nothing was lost).
    pub outcomes: usize,
    /// Inputs that got more than one outcome (must be 0).
    pub duplicates: usize,
    pub decided_on_device: usize,
    pub offloaded: usize,
    pub answered_by_cloud: usize,
    pub fallbacks: usize,
    /// Offloads the branch answered because the cloud's answer had not come
    /// by the deadline.
    pub fallbacks_deadline: usize,
    pub fallbacks_no_responders: usize,
    pub fallbacks_error_reply: usize,
    pub fallbacks_transport: usize,
    /// Offloads not sent because the device's NATS client was disconnected
    /// (absent from older fleets).
    #[serde(default)]
    pub fallbacks_disconnected: usize,
    /// Offloads a worker refused at once (`Overloaded`: it could not finish
    /// them before their deadline behind what it held), answered by the
    /// branch in time (absent from older fleets).
    #[serde(default)]
    pub fallbacks_refused: usize,
    /// Offloads a worker took but answered `DeadlineExpired`: their
    /// deadline came before a batch could run them (absent from older
    /// fleets). `fallbacks_error_reply` counts the other error replies.
    #[serde(default)]
    pub fallbacks_expired: usize,
    /// Inputs below p_tar answered on the device because the device
    /// predicted their offload would miss the deadline (counted in
    /// `decided_on_device` too; absent from older fleets).
    #[serde(default)]
    pub declined: usize,
    /// Inputs the device could not decide at all.
    pub errors: usize,
    /// Deadline misses: inputs answered after their deadline, or answered
    /// by the branch because the cloud's answer had not come by it
    /// (`branchpoint_core::offload::deadline_missed`, the definition the
    /// replay's report.json uses too). Absent from older fleets.
    #[serde(default)]
    pub deadline_misses: usize,
    /// Outcomes per exit: branches in order, then final.
    pub per_exit: Vec<usize>,
    pub accuracy: f64,
    /// Accuracy over inputs decided on the device (None if there were none).
    pub edge_accuracy: Option<f64>,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
}

/// Devices holding one plan and calibration, as they report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppliedPlan {
    pub partition_branch: u8,
    pub p_tar: f64,
    /// Temperature of the partition branch the devices use now.
    pub temperature: f64,
    pub devices: u32,
}

/// Fleet -> control plane: a running fleet's totals and the plans its
/// devices hold, every status interval on `branchpoint.status.fleet.<id>`,
/// and once more with `running: false` when it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub fleet_id: String,
    pub group: String,
    pub devices: u32,
    pub running: bool,
    /// Fleet clock when this status was taken, µs since the epoch.
    pub at_unix_us: u64,
    pub started_unix_us: u64,
    pub summary: FleetSummary,
    /// Latency histogram: upper bounds (ms), and the number of outcomes at
    /// or below each (cumulative, as Prometheus wants it).
    pub latency_le_ms: Vec<f64>,
    pub latency_le_counts: Vec<u64>,
    pub latency_sum_ms: f64,
    /// What the devices hold now, one entry per distinct plan.
    pub applied: Vec<AppliedPlan>,
}

/// Most devices one fleet status may speak for.
pub const MAX_FLEET_DEVICES: u32 = 100_000;
/// Most inputs one device can be fed per second (a simulated camera at
/// 10,000 frames/s is far beyond any device this runs on).
const MAX_INPUTS_PER_DEVICE_PER_S: f64 = 10_000.0;

impl FleetSummary {
    /// The fallbacks by reason, named as `/metrics`, reports and the
    /// outcomes' JSON name them (`core::outcome::FallbackReason::name`).
    pub fn fallbacks_by_reason(&self) -> [(&'static str, usize); 7] {
        [
            ("deadline", self.fallbacks_deadline),
            ("disconnected", self.fallbacks_disconnected),
            ("no-responders", self.fallbacks_no_responders),
            ("refused", self.fallbacks_refused),
            ("expired", self.fallbacks_expired),
            ("error-reply", self.fallbacks_error_reply),
            ("transport", self.fallbacks_transport),
        ]
    }

    /// The totals must add up: outcomes of inputs, decided in one place each.
    fn validate(&self, devices: u32, running_s: f64) -> Result<(), MessageError> {
        let bad = |field: &'static str, value: usize, expected: &'static str| Err(MessageError::OutOfRange { field, value: value as f64, expected });
        let cap = (f64::from(devices.max(1)) * MAX_INPUTS_PER_DEVICE_PER_S * (running_s + 1.0)).min(u64::MAX as f64);
        if self.inputs as f64 > cap {
            return bad("inputs", self.inputs, "at most 10,000 per device per second the fleet has run");
        }
        if self.outcomes > self.inputs + self.duplicates {
            return bad("outcomes", self.outcomes, "at most one per input (plus duplicates)");
        }
        if self.decided_on_device + self.offloaded + self.errors > self.outcomes {
            return bad("decided_on_device", self.decided_on_device, "on the device, offloaded and errors add up to the outcomes");
        }
        if self.answered_by_cloud + self.fallbacks > self.offloaded {
            return bad("fallbacks", self.fallbacks, "cloud answers and fallbacks add up to the offloads");
        }
        let reasons = self.fallbacks_deadline
            + self.fallbacks_no_responders
            + self.fallbacks_error_reply
            + self.fallbacks_transport
            + self.fallbacks_disconnected
            + self.fallbacks_refused
            + self.fallbacks_expired;
        if reasons > self.fallbacks {
            return bad("fallbacks_deadline", reasons, "the reasons add up to the fallbacks");
        }
        if self.declined > self.decided_on_device {
            return bad("declined", self.declined, "at most the inputs decided on the device");
        }
        // 0 from a fleet older than the field, whatever its fallbacks.
        if self.deadline_misses > self.outcomes || (self.deadline_misses > 0 && self.fallbacks_deadline > self.deadline_misses) {
            return bad("deadline_misses", self.deadline_misses, "at most the outcomes, counting every deadline fallback");
        }
        if self.per_exit.len() > MAX_EXITS || self.per_exit.iter().sum::<usize>() > self.outcomes {
            return bad("per_exit", self.per_exit.len(), "at most 64 exits, adding up to at most the outcomes");
        }
        check_range("accuracy", self.accuracy, 1.0, "within [0, 1]")?;
        if let Some(a) = self.edge_accuracy {
            check_range("edge_accuracy", a, 1.0, "within [0, 1]")?;
        }
        for (field, v) in [("latency_ms_p50", self.latency_ms_p50), ("latency_ms_p95", self.latency_ms_p95), ("latency_ms_p99", self.latency_ms_p99)] {
            check_non_negative(field, v)?;
        }
        Ok(())
    }
}

impl Message for FleetStatus {
    fn validate(&self) -> Result<(), MessageError> {
        check_id("fleet id", &self.fleet_id)?;
        check_id("group name", &self.group)?;
        if self.devices > MAX_FLEET_DEVICES {
            return Err(MessageError::OutOfRange { field: "devices", value: f64::from(self.devices), expected: "at most 100,000 per fleet" });
        }
        if self.at_unix_us < self.started_unix_us {
            return Err(MessageError::OutOfRange { field: "at_unix_us", value: self.at_unix_us as f64, expected: "not before started_unix_us" });
        }
        self.summary.validate(self.devices, (self.at_unix_us - self.started_unix_us) as f64 / 1e6)?;
        if self.latency_le_ms.len() > 256 {
            return Err(MessageError::OutOfRange { field: "latency_le_ms", value: self.latency_le_ms.len() as f64, expected: "at most 256 bounds" });
        }
        if self.latency_le_counts.windows(2).any(|w| w[0] > w[1]) || self.latency_le_counts.iter().any(|&c| c as usize > self.summary.outcomes) {
            return Err(MessageError::OutOfRange { field: "latency_le_counts", value: 0.0, expected: "cumulative counts, at most the outcomes" });
        }
        if self.applied.len() > 1024 || self.applied.iter().map(|a| u64::from(a.devices)).sum::<u64>() > u64::from(self.devices) {
            return Err(MessageError::OutOfRange { field: "applied", value: self.applied.len() as f64, expected: "plans held by at most the fleet's devices" });
        }
        if self.latency_le_ms.len() != self.latency_le_counts.len() {
            return Err(MessageError::OutOfRange { field: "latency_le_counts", value: self.latency_le_counts.len() as f64, expected: "one count per latency bound" });
        }
        check_non_negative("latency_sum_ms", self.latency_sum_ms)?;
        for a in &self.applied {
            check_branch(a.partition_branch)?;
            crate::PTar::plan(a.p_tar)?;
            if !is_valid_temperature(a.temperature) {
                return Err(MessageError::OutOfRange { field: "applied.temperature", value: a.temperature, expected: "in [1e-3, 1e3]" });
            }
        }
        Ok(())
    }
}

fn check_id(what: &'static str, id: &str) -> Result<(), MessageError> {
    match is_valid_id(id) {
        true => Ok(()),
        false => Err(MessageError::BadId { what, id: id.to_string() }),
    }
}

fn check_sha256(sha: &str) -> Result<(), MessageError> {
    if sha.len() != 64 || !sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(MessageError::BadSha256(sha.to_string()));
    }
    Ok(())
}

fn check_branch(partition_branch: u8) -> Result<(), MessageError> {
    PartitionBranch::new(partition_branch as usize).map(|_| ())
}

/// `value` must be finite and within `[0, max]`; `expected` says so in words.
fn check_range(field: &'static str, value: f64, max: f64, expected: &'static str) -> Result<(), MessageError> {
    match value.is_finite() && (0.0..=max).contains(&value) {
        true => Ok(()),
        false => Err(MessageError::OutOfRange { field, value, expected }),
    }
}

/// Finite and >= 0, the rule of every rate, delay and mean on the wire.
fn check_non_negative(field: &'static str, value: f64) -> Result<(), MessageError> {
    check_range(field, value, f64::MAX, "finite and >= 0")
}
