//! `branchpoint serve`: the HTTP control plane (actix-web) on NATS.
//!
//! It keeps a view of the system from what the services publish (fleets'
//! `FleetStatus`, workers' `WorkerStatus`), reads and writes the control
//! store (plans, temperatures: JetStream key-value, see `actors::control`),
//! and forwards refits to the calibrator. It holds no state of its own that
//! matters: a restarted API rebuilds its view within a status interval.
//!
//! Endpoints: `GET /healthz`, `GET /readyz`, `GET /metrics` (Prometheus text
//! format), `GET /api/fleet`, `GET`/`PUT /api/plan`, `GET /api/calibration`,
//! `POST /api/calibration/refit`, and the dashboard at `/`. Mutating
//! endpoints need `Authorization: Bearer <token>`; without a configured
//! token they refuse every request.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use anyhow::{bail, Context, Result};
use branchpoint_actors::control::ControlStore;
use branchpoint_messages::{
    decode, encode, subjects, CalibrationMethod, CalibrationRefit, CalibrationStatus, CalibrationUpdate, CertifiedTarget, CertifyReply, CertifyRequest, ErrorReply, FleetStatus,
    PlanTarget, PlanUpdate, WorkerStatus,
};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::cli::ServeArgs;
use crate::shutdown::{Stopping, GRACE};

/// The dashboard: one static page, no build step.
const DASHBOARD: &str = include_str!("../../web/dashboard.html");

/// Longest a refit may take before the API gives up waiting (the fit itself
/// takes seconds on the validation split).
const REFIT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn run(args: ServeArgs) -> Result<()> {
    crate::shutdown::install("api");
    if args.nats.nats.is_none() {
        bail!("branchpoint serve needs --nats URL: the control plane reads and steers the system over NATS");
    }
    if !(args.stale_after_s.is_finite() && args.stale_after_s > 0.0) {
        bail!("--stale-after-s {}: give a positive number of seconds", args.stale_after_s);
    }
    // An empty token (say, an unset variable in compose.yaml) means none:
    // every change is refused, never allowed without a secret.
    let token = args.http.token.clone().filter(|t| !t.is_empty());
    if token.is_none() {
        eprintln!("api: no --token, so PUT /api/plan and POST /api/calibration/refit answer 401");
    }
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    let model = branchpoint_models::load_model(&args.model, tch::Device::Cpu)?;
    let info = ModelInfo { sha256: model.card.weights_sha256.clone(), branches: model.net.num_branches() };
    drop(model);
    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, "branchpoint-api").await?;
        let store = ControlStore::open_with(&client, args.nats.store_settings()).await?;
        let state = ApiState::new(client, store, token, info, Duration::from_secs_f64(args.stale_after_s));
        let followers = state.follow().await?;
        let server = http_server(state, &args.http.listen)?;
        args.service.mark_ready();
        eprintln!("api listening on http://{} (dashboard at /, metrics at /metrics)", args.http.listen);
        let handle = server.handle();
        let served = actix::spawn(server);
        crate::shutdown::serving();
        let sig = crate::shutdown::signal().await;
        eprintln!("api: {}: shutting down", sig.name());
        let stopping = Stopping::new("api", GRACE);
        for task in &followers {
            task.abort();
        }
        // Requests in progress get a second to finish (the server's own
        // shutdown timeout), then their connections are closed.
        stopping
            .step("finishing HTTP requests in progress", Duration::from_secs(2), async {
                handle.stop(true).await;
                let _ = served.await;
            })
            .await;
        args.service.clear();
        stopping.done();
        Ok::<(), anyhow::Error>(())
    })
}

/// Runs the API on its own thread (and actix system) for a command that
/// embeds it (`branchpoint run --listen`); returns once it listens, or with
/// the error that kept it from starting.
pub fn spawn_embedded(nats: crate::cli::NatsArgs, listen: String, token: Option<String>, model: ModelInfo) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    std::thread::spawn(move || {
        let system = actix::System::new();
        system.block_on(async move {
            let started = async {
                let client = crate::nats::connect(&nats, "branchpoint-api").await?;
                let store = ControlStore::open_with(&client, nats.store_settings()).await?;
                let state = ApiState::new(client, store, token.filter(|t| !t.is_empty()), model, Duration::from_secs(5));
                let tasks = state.follow().await?;
                Ok::<_, anyhow::Error>((http_server(state, &listen)?, tasks))
            };
            match started.await {
                Ok((server, _tasks)) => {
                    let _ = tx.send(Ok(()));
                    let _ = server.await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    rx.recv().context("the embedded API's thread ended before it started")?
}

/// Most connections each of the API's two threads holds open.
pub const MAX_CONNECTIONS: usize = 4096;

/// Binds the API's HTTP server to `listen` (it runs once awaited).
pub fn http_server(state: ApiState, listen: &str) -> Result<actix_web::dev::Server> {
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            // Plans and refit requests are a few hundred bytes (bodies are
            // read by `read_body`, after the token check).
            .app_data(web::PayloadConfig::new(MAX_BODY_BYTES))
            .route("/", web::get().to(dashboard))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics))
            .route("/api/fleet", web::get().to(get_fleet))
            .route("/api/plan", web::get().to(get_plan))
            .route("/api/plan", web::put().to(put_plan))
            .route("/api/calibration", web::get().to(get_calibration))
            .route("/api/calibration/refit", web::post().to(post_refit))
            .default_service(web::to(not_found))
    })
    // The API is light; two threads keep a slow scrape from blocking a PUT.
    .workers(2)
    // Slow or idle clients do not hold connections: the request head must
    // arrive within 5 s, an idle keep-alive connection closes after 5 s, and
    // each thread holds at most MAX_CONNECTIONS (the process's open-file
    // limit is raised at start, see `main`), so /healthz still gets through
    // a flood of slow clients.
    .client_request_timeout(Duration::from_secs(5))
    .client_disconnect_timeout(Duration::from_secs(1))
    .keep_alive(Duration::from_secs(5))
    .max_connections(MAX_CONNECTIONS)
    // Stopping waits this long for requests in progress (see `run`).
    .shutdown_timeout(1)
    .disable_signals()
    .bind(listen)
    .with_context(|| format!("could not listen on {listen}: is the address free? (--listen)"))?
    .run();
    Ok(server)
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub sha256: String,
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
    client: async_nats::Client,
    store: ControlStore,
    token: Option<String>,
    model: ModelInfo,
    stale_after: Duration,
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
                        eprintln!("api: ignored a malformed fleet status: {e}")
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
                        eprintln!("api: ignored a malformed worker status: {e}")
                    }
                }
            }
        });
        let (view, sha) = (self.view.clone(), self.model.sha256.clone());
        let c = actix::spawn(async move {
            while let Some(msg) = calibration.next().await {
                match decode::<CalibrationStatus>(&msg.payload) {
                    Ok(s) if s.model_sha256 == sha => view.lock().unwrap_or_else(|e| e.into_inner()).calibration = Some((s, Instant::now())),
                    Ok(_) => {}
                    Err(e) => {
                        view.lock().unwrap_or_else(|e| e.into_inner()).refused += 1;
                        eprintln!("api: ignored a malformed calibration status: {e}")
                    }
                }
            }
        });
        Ok(vec![f, w, c])
    }

    /// The calibrator's live estimates, if it spoke recently.
    fn calibration_status(&self) -> Option<CalibrationStatus> {
        let v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        v.calibration.as_ref().filter(|(_, seen)| seen.elapsed() < self.stale_after).map(|(s, _)| s.clone())
    }

    /// Fleets and workers heard from recently enough; forgets the others. A
    /// finished fleet stays, with its final totals, until the API restarts:
    /// its counters must not vanish from /metrics once it ends.
    fn snapshot(&self) -> (Vec<(FleetStatus, f64)>, Vec<WorkerStatus>) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        let stale = self.stale_after;
        v.workers.retain(|_, w| w.seen.elapsed() < stale);
        v.fleets.retain(|_, f| !f.status.running || f.seen.elapsed() < stale);
        let fleets = v.fleets.values().map(|f| (f.status.clone(), f.inputs_per_s)).collect();
        let workers = v.workers.values().map(|w| w.status.clone()).collect();
        (fleets, workers)
    }

    /// The 401 to answer when `req` does not carry the API token; None when it does.
    fn denied(&self, req: &HttpRequest) -> Option<HttpResponse> {
        let Some(token) = &self.token else {
            return Some(unauthorized("this API has no token configured, so it refuses every change; set --token (or [serve] token, or BRANCHPOINT_SERVE__TOKEN)"));
        };
        let given = req.headers().get(header::AUTHORIZATION).and_then(|h| h.to_str().ok()).and_then(|h| h.strip_prefix("Bearer "));
        match given {
            Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => None,
            Some(_) => Some(unauthorized("wrong bearer token")),
            None => Some(unauthorized("send the API token as 'Authorization: Bearer <token>'")),
        }
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
async fn read_body(mut payload: web::Payload) -> Result<web::Bytes, HttpResponse> {
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
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(json!({ "error": message.into() }))
}

fn unauthorized(message: &str) -> HttpResponse {
    HttpResponse::Unauthorized().insert_header((header::WWW_AUTHENTICATE, "Bearer")).json(json!({ "error": message }))
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {} {}; see /healthz, /readyz, /metrics, /api/fleet, /api/plan, /api/calibration, /api/calibration/refit", req.method(), req.path()),
    )
}

async fn dashboard() -> HttpResponse {
    HttpResponse::Ok().content_type("text/html; charset=utf-8").body(DASHBOARD)
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready when NATS is connected and the control store answers a read (a
/// cluster that lost the buckets' leader does not), within 2 s.
async fn readyz(state: web::Data<ApiState>) -> HttpResponse {
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
        "model_sha256": state.model.sha256,
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
        t.deadline_misses += s.fallbacks_deadline as u64;
        if let Some(a) = s.edge_accuracy {
            edge += s.decided_on_device as u64;
            edge_right += a * s.decided_on_device as f64;
        }
    }
    t.offload_rate = (outcomes > 0).then(|| offloaded as f64 / outcomes as f64);
    t.edge_accuracy = (edge > 0).then(|| edge_right / edge as f64);
    t
}

async fn get_fleet(state: web::Data<ApiState>) -> HttpResponse {
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
    #[serde(skip_deserializing, skip_serializing_if = "Option::is_none")]
    revision: Option<u64>,
}

impl PlanJson {
    fn from_update(p: &PlanUpdate, revision: u64) -> Self {
        let (group, device) = match &p.target {
            PlanTarget::Group(g) => (Some(g.clone()), None),
            PlanTarget::Device(d) => (None, Some(d.clone())),
        };
        Self { group, device, partition_branch: p.partition_branch, p_tar: Some(p.p_tar), certified: p.certified, revision: Some(revision) }
    }
}

/// Longest the API waits for the control store before it answers 503 (a
/// cluster electing a new leader for the buckets answers within it).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

async fn within_store_timeout<T>(f: impl std::future::Future<Output = Result<T, branchpoint_actors::ActorError>>) -> Result<T, String> {
    match tokio::time::timeout(STORE_TIMEOUT, f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("the control store did not answer within {STORE_TIMEOUT:?}")),
    }
}

async fn get_plan(state: web::Data<ApiState>) -> HttpResponse {
    match within_store_timeout(state.store.plans()).await {
        Ok(plans) => {
            let plans: Vec<PlanJson> = plans.iter().map(|p| PlanJson::from_update(&p.value, p.revision)).collect();
            HttpResponse::Ok().json(json!({ "plans": plans }))
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("could not read the plans: {e}")),
    }
}

async fn put_plan(state: web::Data<ApiState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = state.denied(&req) {
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
    let target = match (plan.group, plan.device) {
        (Some(g), None) => PlanTarget::Group(g),
        (None, Some(d)) => PlanTarget::Device(d),
        _ => return error(StatusCode::UNPROCESSABLE_ENTITY, "give exactly one of \"group\" and \"device\""),
    };
    let branches = state.model.branches;
    if plan.partition_branch == 0 || plan.partition_branch as usize > branches {
        return error(StatusCode::UNPROCESSABLE_ENTITY, format!("partition_branch {}: this model has branches 1 to {branches}", plan.partition_branch));
    }
    let (p_tar, certified) = match (plan.p_tar, plan.certified) {
        (Some(p_tar), None) => (p_tar, None),
        (None, Some(target)) => match certified_threshold(&state, plan.partition_branch, target).await {
            Ok(p_tar) => (p_tar, Some(target)),
            Err(refused) => return refused,
        },
        _ => return error(StatusCode::UNPROCESSABLE_ENTITY, "give exactly one of \"p_tar\" (a threshold) and \"certified\" (like {\"accuracy\": 0.95, \"delta\": 0.05})"),
    };
    let update = PlanUpdate { target, partition_branch: plan.partition_branch, p_tar, certified };
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
async fn certified_threshold(state: &ApiState, partition_branch: u8, target: CertifiedTarget) -> Result<f64, HttpResponse> {
    let bytes = encode(&CertifyRequest { partition_branch, target }).map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let payload = ask_calibrator(state, subjects::CALIBRATION_CERTIFY, bytes).await?;
    if let Ok(reply) = decode::<CertifyReply>(&payload) {
        if reply.model_sha256 != state.model.sha256 {
            return Err(error(
                StatusCode::CONFLICT,
                format!("the calibrator runs other weights ({}) than this API ({}): start both with the same --model", reply.model_sha256, state.model.sha256),
            ));
        }
        return Ok(reply.p_tar());
    }
    Err(calibrator_refusal(&payload))
}

/// A request to the calibrator, waiting at most `REFIT_TIMEOUT`; the error
/// is the response to send.
async fn ask_calibrator(state: &ApiState, subject: &'static str, bytes: Vec<u8>) -> Result<web::Bytes, HttpResponse> {
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

async fn get_calibration(state: web::Data<ApiState>) -> HttpResponse {
    match within_store_timeout(state.store.calibration(&state.model.sha256)).await {
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

async fn post_refit(state: web::Data<ApiState>, req: HttpRequest, payload: web::Payload) -> HttpResponse {
    if let Some(denied) = state.denied(&req) {
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

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` once, then the samples.
struct Metrics(String);

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        match labels.is_empty() {
            true => {
                let _ = writeln!(self.0, "{name} {value}");
            }
            false => {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let (fleets, workers) = state.snapshot();
    let plans = state.store.plans().await.unwrap_or_default();
    let connected = matches!(state.client.connection_state(), async_nats::connection::State::Connected);
    let mut m = Metrics(String::new());
    m.family("branchpoint_nats_connected", "gauge", "1 when the API is connected to NATS.");
    m.sample("branchpoint_nats_connected", "", f64::from(u8::from(connected)));

    let fl = |f: &FleetStatus| format!("fleet=\"{}\",group=\"{}\"", label(&f.fleet_id), label(&f.group));
    type Counter = (&'static str, &'static str, fn(&branchpoint_messages::FleetSummary) -> usize);
    let counters: [Counter; 7] = [
        ("branchpoint_inputs_total", "Inputs the fleet's devices accepted.", |s| s.inputs),
        ("branchpoint_outcomes_total", "Inputs answered (on the device, by the cloud, or by fallback).", |s| s.outcomes),
        ("branchpoint_decided_on_device_total", "Inputs answered on the device because the branch was confident enough.", |s| s.decided_on_device),
        ("branchpoint_offloads_total", "Inputs offloaded to the cloud workers.", |s| s.offloaded),
        ("branchpoint_cloud_answers_total", "Offloads answered by a cloud worker.", |s| s.answered_by_cloud),
        ("branchpoint_deadline_misses_total", "Offloads with no answer before the deadline (answered by the branch instead).", |s| s.fallbacks_deadline),
        ("branchpoint_errors_total", "Inputs the device could not decide at all.", |s| s.errors),
    ];
    m.family("branchpoint_fleet_devices", "gauge", "Devices of the fleet.");
    for (f, _) in &fleets {
        m.sample("branchpoint_fleet_devices", &fl(f), f64::from(f.devices));
    }
    m.family("branchpoint_fleet_running", "gauge", "1 while the fleet runs, 0 once it has ended.");
    for (f, _) in &fleets {
        m.sample("branchpoint_fleet_running", &fl(f), f64::from(u8::from(f.running)));
    }
    m.family("branchpoint_inputs_per_second", "gauge", "Inputs per second over the fleet's last two seconds of statuses.");
    for (f, rate) in &fleets {
        m.sample("branchpoint_inputs_per_second", &fl(f), *rate);
    }
    for (name, help, get) in counters {
        m.family(name, "counter", help);
        for (f, _) in &fleets {
            m.sample(name, &fl(f), get(&f.summary) as f64);
        }
    }
    m.family("branchpoint_exits_total", "counter", "Answers per exit: branch1, branch2, ..., final.");
    for (f, _) in &fleets {
        let n = f.summary.per_exit.len();
        for (i, count) in f.summary.per_exit.iter().enumerate() {
            let exit = if i + 1 == n { "final".to_string() } else { format!("branch{}", i + 1) };
            m.sample("branchpoint_exits_total", &format!("{},exit=\"{exit}\"", fl(f)), *count as f64);
        }
    }
    m.family("branchpoint_fallbacks_total", "counter", "Offloads answered by the device's branch instead, by reason.");
    for (f, _) in &fleets {
        let s = &f.summary;
        for (reason, n) in [
            ("deadline", s.fallbacks_deadline),
            ("no-responders", s.fallbacks_no_responders),
            ("error-reply", s.fallbacks_error_reply),
            ("transport", s.fallbacks_transport),
            ("disconnected", s.fallbacks_disconnected),
        ] {
            m.sample("branchpoint_fallbacks_total", &format!("{},reason=\"{reason}\"", fl(f)), n as f64);
        }
    }
    m.family("branchpoint_accuracy", "gauge", "Share of answers that were right.");
    for (f, _) in &fleets {
        m.sample("branchpoint_accuracy", &fl(f), f.summary.accuracy);
    }
    m.family("branchpoint_edge_accuracy", "gauge", "Share of on-device answers that were right.");
    for (f, _) in &fleets {
        if let Some(a) = f.summary.edge_accuracy {
            m.sample("branchpoint_edge_accuracy", &fl(f), a);
        }
    }
    // Base units, as Prometheus's conventions ask: the fleets count in ms.
    m.family("branchpoint_latency_seconds", "histogram", "Time from an input's arrival to its answer.");
    for (f, _) in &fleets {
        for (le, c) in f.latency_le_ms.iter().zip(&f.latency_le_counts) {
            m.sample("branchpoint_latency_seconds_bucket", &format!("{},le=\"{}\"", fl(f), le / 1e3), *c as f64);
        }
        let answered = (f.summary.outcomes - f.summary.errors) as f64;
        m.sample("branchpoint_latency_seconds_bucket", &format!("{},le=\"+Inf\"", fl(f)), answered);
        m.sample("branchpoint_latency_seconds_sum", &fl(f), f.latency_sum_ms / 1e3);
        m.sample("branchpoint_latency_seconds_count", &fl(f), answered);
    }
    m.family("branchpoint_devices_on_plan", "gauge", "Devices holding this plan now, as they report it.");
    for (f, _) in &fleets {
        for a in &f.applied {
            let l = format!("{},partition_branch=\"{}\",p_tar=\"{}\",temperature=\"{}\"", fl(f), a.partition_branch, a.p_tar, a.temperature);
            m.sample("branchpoint_devices_on_plan", &l, f64::from(a.devices));
        }
    }
    let target = |p: &PlanUpdate| match &p.target {
        PlanTarget::Group(g) => format!("group=\"{}\"", label(g)),
        PlanTarget::Device(d) => format!("device=\"{}\"", label(d)),
    };
    m.family("branchpoint_plan_p_tar", "gauge", "Stored plan: confidence target, per group or device.");
    for p in &plans {
        m.sample("branchpoint_plan_p_tar", &target(&p.value), p.value.p_tar);
    }
    m.family("branchpoint_plan_partition_branch", "gauge", "Stored plan: partition branch, per group or device.");
    for p in &plans {
        m.sample("branchpoint_plan_partition_branch", &target(&p.value), f64::from(p.value.partition_branch));
    }
    m.family("branchpoint_api_refused_statuses_total", "counter", "Statuses the API refused (malformed, or figures that cannot be) since it started.");
    m.sample("branchpoint_api_refused_statuses_total", "", state.view.lock().unwrap_or_else(|e| e.into_inner()).refused as f64);
    m.family("branchpoint_workers", "gauge", "Workers that reported their status recently.");
    m.sample("branchpoint_workers", "", workers.len() as f64);
    type WorkerGauge = (&'static str, &'static str, &'static str, fn(&WorkerStatus) -> f64);
    let worker_metrics: [WorkerGauge; 7] = [
        ("branchpoint_worker_queue_depth", "gauge", "Requests waiting at the worker: for a batch or for compute.", |w| f64::from(w.queue_depth)),
        ("branchpoint_worker_queue_delay_seconds", "gauge", "Mean wait for compute after batching over the last status interval.", |w| w.queue_delay_us_interval / 1e6),
        ("branchpoint_worker_batch_size", "gauge", "Mean batch size over the last status interval.", |w| w.batch_size_interval),
        ("branchpoint_worker_mean_batch_size", "gauge", "Mean batch size since the worker started.", |w| w.mean_batch_size),
        ("branchpoint_worker_requests_total", "counter", "Offload requests the worker received.", |w| w.requests as f64),
        ("branchpoint_worker_batches_total", "counter", "Batches the worker ran.", |w| w.batches_served as f64),
        ("branchpoint_worker_errors_total", "counter", "Error replies the worker sent.", |w| w.errors as f64),
    ];
    for (name, kind, help, get) in worker_metrics {
        m.family(name, kind, help);
        for w in &workers {
            m.sample(name, &format!("worker=\"{}\"", label(&w.worker_id)), get(w));
        }
    }
    if let Some(status) = state.calibration_status() {
        m.family("branchpoint_watch_refused_total", "counter", "Audit results the calibrator refused (malformed, out of range, another model's).");
        m.sample("branchpoint_watch_refused_total", "", status.refused as f64);
        m.family("branchpoint_calibrator_drift_alarms_total", "counter", "Drift alarms the calibrator raised since it started (refits included).");
        m.sample("branchpoint_calibrator_drift_alarms_total", "", status.alarms_total as f64);
        m.family("branchpoint_calibrator_drift_refits_total", "counter", "Drift refits the calibrator made and stored since it started.");
        m.sample("branchpoint_calibrator_drift_refits_total", "", status.refits_total as f64);
        type WatchGauge = (&'static str, &'static str, &'static str, fn(&branchpoint_messages::BranchWatch) -> Option<f64>);
        let watch_metrics: [WatchGauge; 15] = [
            ("branchpoint_watch_edge_agreement", "gauge", "Live estimate of on-device agreement with the final exit (audits in the window).", |w| w.edge_agreement),
            ("branchpoint_watch_edge_agreement_low", "gauge", "Its 95 % interval, low end.", |w| w.edge_agreement_low),
            ("branchpoint_watch_edge_agreement_high", "gauge", "Its 95 % interval, high end.", |w| w.edge_agreement_high),
            ("branchpoint_watch_target_accuracy", "gauge", "The on-device accuracy the plan targets.", |w| Some(w.target_accuracy)),
            ("branchpoint_watch_offload_rate", "gauge", "Live weighted estimate of the share of inputs offloaded.", |w| w.offload_rate),
            ("branchpoint_watch_ece", "gauge", "Live weighted ECE of the branch's confidence against agreement.", |w| w.ece),
            ("branchpoint_watch_audits", "gauge", "Audits in the window of the plan in force.", |w| Some(f64::from(w.audits))),
            ("branchpoint_watch_alarms_total", "counter", "Drift alarms raised.", |w| Some(w.alarms as f64)),
            ("branchpoint_watch_refits_total", "counter", "Refits made.", |w| Some(w.refits as f64)),
            ("branchpoint_watch_edge_accuracy", "gauge", "Live estimate of on-device accuracy against true labels (audits that carry one: simulated fleets).", |w| w.edge_accuracy),
            ("branchpoint_watch_edge_accuracy_low", "gauge", "Its 95 % interval, low end.", |w| w.edge_accuracy_low),
            ("branchpoint_watch_edge_accuracy_high", "gauge", "Its 95 % interval, high end.", |w| w.edge_accuracy_high),
            ("branchpoint_watch_temperature", "gauge", "The branch's temperature for the group (a refit changes it).", |w| Some(w.temperature)),
            ("branchpoint_watch_threshold", "gauge", "The threshold the group's plan holds (a refit certifies a new one).", |w| Some(w.threshold)),
            ("branchpoint_watch_stale_results_total", "counter", "Results decided under a plan a refit had replaced (not counted in the estimates).", |w| Some(w.stale as f64)),
        ];
        for (name, kind, help, get) in watch_metrics {
            m.family(name, kind, help);
            for w in &status.watched {
                if let Some(v) = get(w) {
                    m.sample(name, &format!("group=\"{}\",branch=\"{}\"", label(&w.group), w.partition_branch), v);
                }
            }
        }
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(m.0)
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

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
