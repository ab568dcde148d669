//! The HTTP control plane (actix-web) on NATS, as `branchpoint serve` and
//! `branchpoint run --listen` run it.
//!
//! - `view`: what the API knows: the fleets' and workers' latest statuses and
//!   the calibrator's live estimates, kept from NATS subjects, bounded, and
//!   forgotten when stale (`ApiState`).
//! - `http`: the endpoints, the bearer-token check (before any body is read)
//!   and bounded body reading.
//! - `metrics`: `/metrics` in Prometheus's text format, base units.
//!
//! It holds no state of its own that matters: a restarted API rebuilds its
//! view within a status interval; plans and temperatures live in the
//! control store (`actors::control`).
//!
//! Endpoints: `GET /healthz`, `GET /readyz`, `GET /metrics`, `GET /api/fleet`,
//! `GET`/`PUT /api/plan`, `GET /api/calibration`, `POST
//! /api/calibration/refit`, and the dashboard at `/`. Mutating endpoints need
//! `Authorization: Bearer <token>`; without a configured token they refuse
//! every request.
mod http;
mod metrics;
mod view;

use std::time::Duration;

use actix_web::{web, App, HttpServer};
use anyhow::{Context, Result};
use branchpoint_actors::control::ControlStore;

pub use http::{BODY_TIMEOUT, MAX_BODY_BYTES};
pub use view::{ApiState, ModelInfo};

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
            .route("/", web::get().to(http::dashboard))
            .route("/healthz", web::get().to(http::healthz))
            .route("/readyz", web::get().to(http::readyz))
            .route("/metrics", web::get().to(metrics::metrics))
            .route("/api/fleet", web::get().to(http::get_fleet))
            .route("/api/plan", web::get().to(http::get_plan))
            .route("/api/plan", web::put().to(http::put_plan))
            .route("/api/calibration", web::get().to(http::get_calibration))
            .route("/api/calibration/refit", web::post().to(http::post_refit))
            .default_service(web::to(http::not_found))
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
