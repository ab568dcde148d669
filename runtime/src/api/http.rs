//! The endpoints. Mutating ones check the bearer token before they read
//! any body, and read at most `MAX_BODY_BYTES` within `BODY_TIMEOUT`.
use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use branchpoint_messages::{
    decode, encode, subjects, CalibrationMethod, CalibrationRefit, CalibrationUpdate, CertifiedTarget, CertifyReply, CertifyRequest, ErrorReply, FleetStatus, PartitionBranch,
    PlanTarget, PlanUpdate,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::view::ApiState;

/// The dashboard: one static page, no build step.
const DASHBOARD: &str = include_str!("../../web/dashboard.html");

/// Longest a refit may take before the API gives up waiting (the fit itself
/// takes seconds on the validation split).
const REFIT_TIMEOUT: Duration = Duration::from_secs(60);

/// The 401 to answer when `req` does not carry the API token; None when it does.
pub(super) fn denied(state: &ApiState, req: &HttpRequest) -> Option<HttpResponse> {
    let Some(token) = &state.token else {
        return Some(unauthorized("this API has no token configured, so it refuses every change; set --token (or [serve] token, or BRANCHPOINT_SERVE__TOKEN)"));
    };
    let given = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
        Some(_) => Some(unauthorized("wrong bearer token")),
        None => Some(unauthorized("send the API token as 'Authorization: Bearer <token>'")),
    }
}

/// Largest body a mutating endpoint reads: plans and refit requests are a
/// few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long a client may take to send a body, once its token was accepted.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a request body, after the token check (so an unauthenticated
/// client never makes the API read anything), at most `MAX_BODY_BYTES` and
/// within `BODY_TIMEOUT`.
pub(super) async fn read_body(mut payload: web::Payload) -> Result<web::Bytes, HttpResponse> {
    use futures::StreamExt;
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("could not read the body: {e}")))?;
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {MAX_BODY_BYTES} bytes; a plan or refit request is a few hundred")));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    };
    match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(error(StatusCode::REQUEST_TIMEOUT, format!("the body did not arrive within {BODY_TIMEOUT:?}"))),
    }
}

/// Compares without an early exit, so timing does not leak how much matched.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(super) fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

pub(super) fn unauthorized(message: &str) -> HttpResponse {
    HttpResponse::Unauthorized().insert_header((header::WWW_AUTHENTICATE, "Bearer")).json(json!({ "error": message }))
}

pub(super) async fn not_found(req: HttpRequest) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}; see /healthz, /readyz, /metrics, /api/fleet, /api/plan, /api/calibration, /api/calibration/refit", req.method(), req.path()),
    )
}

pub(super) async fn dashboard() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(DASHBOARD)
}

pub(super) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready when NATS is connected and the control store answers a read (a
/// cluster that lost the buckets' leader does not), within 2 s.
pub(super) async fn readyz(state: web::Data<ApiState>) -> HttpResponse {
    let nats = state.client.connection_state();
    let connected = matches!(nats, async_nats::connection::State::Connected);
    let store = match connected {
        true => state.store.check(Duration::from_secs(2)).await.map_err(|e| e.to_string()),
        false => Err("NATS is not connected".to_string()),
    };
    let ready = connected && store.is_ok();
    let body = json!({
        "ready": ready,
        "nats": format!("{nats:?}").to_lowercase(),
        "model_sha256": state.model.model_sha256,
        "control_store": store.as_ref().map_or_else(|e| e.clone(), |_| "ok".to_string()),
    });
    match ready {
        true => HttpResponse::Ok().json(body),
        false => HttpResponse::ServiceUnavailable().json(body),
    }
}

#[derive(Serialize)]
struct FleetJson {
    #[serde(flatten)]
    status: FleetStatus,
    inputs_per_s: f64,
}

/// Totals over the fleets, as the dashboard shows them.
#[derive(Serialize, Default)]
struct Totals {
    fleets: usize,
    devices: u64,
    inputs: u64,
    inputs_per_s: f64,
    offload_rate: Option<f64>,
    edge_accuracy: Option<f64>,
    deadline_misses: u64,
    workers: usize,
}

fn totals(fleets: &[(FleetStatus, f64)], workers: usize) -> Totals {
    let mut t = Totals { fleets: fleets.len(), workers, ..Totals::default() };
    let (mut outcomes, mut offloaded, mut edge, mut edge_right) = (0u64, 0u64, 0u64, 0.0);
    for (f, rate) in fleets {
        let s = &f.summary;
        if f.running {
            t.devices += u64::from(f.devices);
            t.inputs_per_s += rate;
        }
        t.inputs += s.inputs as u64;
        outcomes += (s.outcomes - s.errors) as u64;
        offloaded += s.offloaded as u64;
        t.deadline_misses += s.deadline_misses as u64;
        if let Some(a) = s.edge_accuracy {
            edge += s.decided_on_device as u64;
            edge_right += a * s.decided_on_device as f64;
        }
    }
    t.offload_rate = (outcomes > 0).then(|| offloaded as f64 / outcomes as f64);
    t.edge_accuracy = (edge > 0).then(|| edge_right / edge as f64);
    t
}

pub(super) async fn get_fleet(state: web::Data<ApiState>) -> HttpResponse {
    let (fleets, workers) = state.snapshot();
    let t = totals(&fleets, workers.len());
    let fleets: Vec<FleetJson> = fleets.into_iter().map(|(status, inputs_per_s)| FleetJson { status, inputs_per_s }).collect();
    HttpResponse::Ok().json(json!({ "totals": t, "fleets": fleets, "workers": workers }))
}

/// A plan as the API shows and takes it: exactly one of `group` and
/// `device`, and exactly one of `p_tar` (a raw threshold) and `certified`
/// (a target accuracy and delta, whose threshold the calibrator certifies).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    partition_branch: u8,
    #[serde(default)]
    p_tar: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certified: Option<CertifiedTarget>,
    /// "f32", "f16" or "int8"; absent: devices keep their codec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    codec: Option<branchpoint_messages::Codec>,
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
}

impl PlanJson {
    fn from_update(p: &PlanUpdate, revision: u64) -> Self {
        let (group, device) = match &p.target {
            PlanTarget::Group(g) => (Some(g.clone()), None),
            PlanTarget::Device(d) => (None, Some(d.clone())),
        };
        Self { group, device, partition_branch: p.partition_branch, p_tar: Some(p.p_tar), certified: p.certified, codec: p.codec, revision: Some(revision) }
    }
}

/// Longest the API waits for the control store before it answers 503 (a
/// cluster electing a new leader for the buckets answers within it).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) async fn within_store_timeout<T>(f: impl std::future::Future<Output = Result<T, branchpoint_actors::ActorError>>) -> Result<T, String> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("the control store did not answer within {STORE_TIMEOUT:?}")),
    }
}

pub(super) async fn get_plan(state: web::Data<ApiState>) -> HttpResponse {
    match within_store_timeout(state.store.plans()).await {
        Ok(plans) => {
            let plans: Vec<PlanJson> = plans.iter().map(|p| PlanJson::from_update(&p.value, p.revision)).collect();
            HttpResponse::Ok().json(json!({ "plans": plans }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("could not read the plans: {e}")),
    }
}

pub(super) async fn put_plan(state: web::Data<ApiState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = denied(&state, &req) {
        return denied;
    }
    let body = match read_body(payload).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let plan: PlanJson = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error(StatusCode::BAD_REQUEST, format!("the body is not a plan ({e}); send JSON like {{\"group\": \"default\", \"partition_branch\": 1, \"p_tar\": 0.8}}"))
        }
    };
    // One writer per key: a device's plan is the planner's (it would
    // replace an operator's at the device's next report).
    let target = match (plan.group, plan.device) {
        (Some(g), None) => PlanTarget::Group(g),
        (None, Some(d)) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("device {d}'s plan is the planner's to write; set its group's plan (\"group\") instead, which the device holds until the planner plans for it"),
            )
        }
        _ => return error(StatusCode::UNPROCESSABLE_ENTITY, "give \"group\": a group's plan is the operator's to set"),
    };
    let branches = state.model.branches;
    if let Err(e) = PartitionBranch::new(plan.partition_branch.into()).and_then(|b| b.within(branches)) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, format!("partition_branch: {e}"));
    }
    let (p_tar, certified) = match (plan.p_tar, plan.certified) {
        (Some(p_tar), None) => (p_tar, None),
        (None, Some(target)) => match certified_threshold(&state, plan.partition_branch, target).await {
            Ok(p_tar) => (p_tar, Some(target)),
            Err(refused) => return refused,
        },
        _ => return error(StatusCode::UNPROCESSABLE_ENTITY, "give exactly one of \"p_tar\" (a threshold) and \"certified\" (like {\"accuracy\": 0.95, \"delta\": 0.05})"),
    };
    let update = PlanUpdate { target, partition_branch: plan.partition_branch, p_tar, certified, codec: plan.codec, temperature: None };
    // The wire checks (ids, p_tar in [0, 1]) run here, before anything is stored.
    if let Err(e) = encode(&update) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string());
    }
    match within_store_timeout(state.store.put_plan(&update)).await {
        Ok(revision) => HttpResponse::Ok().json(PlanJson::from_update(&update, revision)),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("could not store the plan: {e}")),
    }
}

/// Asks the calibrator for the threshold certified for `target` on
/// `partition_branch`; the error is the response to send.
pub(super) async fn certified_threshold(state: &ApiState, partition_branch: u8, target: CertifiedTarget) -> Result<f64, HttpResponse> {
    let bytes = encode(&CertifyRequest { partition_branch, target }).map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let payload = ask_calibrator(state, subjects::CALIBRATION_CERTIFY, bytes).await?;
    if let Ok(reply) = decode::<CertifyReply>(&payload) {
        if reply.model_sha256 != state.model.model_sha256 {
            return Err(error(
                StatusCode::CONFLICT,
                format!("the calibrator runs other weights ({}) than this API ({}): start both with the same --model", reply.model_sha256, state.model.model_sha256),
            ));
        }
        return Ok(reply.p_tar());
    }
    Err(calibrator_refusal(&payload))
}

/// A request to the calibrator, waiting at most `REFIT_TIMEOUT`; the error
/// is the response to send.
pub(super) async fn ask_calibrator(state: &ApiState, subject: &'static str, bytes: Vec<u8>) -> Result<web::Bytes, HttpResponse> {
    let request = state.client.request(subject, bytes.into());
    match tokio::time::timeout(REFIT_TIMEOUT, request).await {
        Err(_) => Err(error(StatusCode::GATEWAY_TIMEOUT, format!("the calibrator did not answer within {} s", REFIT_TIMEOUT.as_secs()))),
        Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
            Err(error(StatusCode::SERVICE_UNAVAILABLE, "no calibrator is running: start `branchpoint calibrator --nats URL`"))
        }
        Ok(Err(e)) => Err(error(StatusCode::BAD_GATEWAY, format!("asking the calibrator: {e}"))),
        Ok(Ok(m)) => Ok(m.payload),
    }
}

/// The response to a calibrator answer that is not what was asked for.
fn calibrator_refusal(payload: &[u8]) -> HttpResponse {
    match decode::<ErrorReply>(payload) {
        Ok(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("the calibrator refused: {}", e.detail)),
        Err(e) => error(StatusCode::BAD_GATEWAY, format!("the calibrator's answer is malformed: {e}")),
    }
}

fn method_name(m: CalibrationMethod) -> &'static str {
    match m {
        CalibrationMethod::Uncalibrated => "uncalibrated",
        CalibrationMethod::Global => "global",
        CalibrationMethod::PerBranch => "per-branch",
    }
}

fn calibration_json(u: &CalibrationUpdate, revision: Option<u64>) -> serde_json::Value {
    json!({
        "model_sha256": u.model_sha256,
        "method": method_name(u.method),
        "temperatures": u.temperatures,
        "revision": revision,
    })
}

pub(super) async fn get_calibration(state: web::Data<ApiState>) -> HttpResponse {
    match within_store_timeout(state.store.calibration(&state.model.model_sha256)).await {
        Ok(Some(c)) => {
            let mut body = calibration_json(&c.value, Some(c.revision));
            // The live view: what the calibrator's monitors estimate of each
            // watched group and branch (absent until it hears audit results).
            if let Some(status) = state.calibration_status() {
                body["watch"] = json!({ "refused": status.refused, "at_unix_us": status.at_unix_us, "branches": status.watched });
            }
            HttpResponse::Ok().json(body)
        }
        Ok(None) => error(StatusCode::NOT_FOUND, "no temperatures stored for this model yet: is `branchpoint calibrator` running?"),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("could not read the temperatures: {e}")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefitJson {
    method: String,
}

pub(super) async fn post_refit(state: web::Data<ApiState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = denied(&state, &req) {
        return denied;
    }
    let body = match read_body(payload).await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let refit: RefitJson = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("the body is not a refit request ({e}); send JSON like {{\"method\": \"per-branch\"}}")),
    };
    let method = match refit.method.as_str() {
        "uncalibrated" => CalibrationMethod::Uncalibrated,
        "global" => CalibrationMethod::Global,
        "per-branch" => CalibrationMethod::PerBranch,
        other => return error(StatusCode::UNPROCESSABLE_ENTITY, format!("method {other:?}: use uncalibrated, global or per-branch")),
    };
    let bytes = match encode(&CalibrationRefit { method }) {
        Ok(b) => b,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let payload = match ask_calibrator(&state, subjects::CALIBRATION_REFIT, bytes).await {
        Ok(p) => p,
        Err(refused) => return refused,
    };
    match decode::<CalibrationUpdate>(&payload) {
        Ok(u) => HttpResponse::Ok().json(calibration_json(&u, None)),
        Err(_) => calibrator_refusal(&payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
