//! `branchpoint serve`: the HTTP control plane (`crate::api`) as a
//! service: connect, open the control store, follow the statuses, listen,
//! and stop within the bound on a signal.
use std::time::Duration;

use anyhow::{bail, Result};
use branchpoint_actors::control::ControlStore;

use crate::api::{http_server, ApiState, ModelInfo};
use crate::cli::ServeArgs;
use crate::shutdown::{Stopping, GRACE};

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
        tracing::warn!("api: no --token, so PUT /api/plan and POST /api/calibration/refit answer 401");
    }
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    let model = branchpoint_models::Model::load(&args.model, tch::Device::Cpu)?;
    let info = ModelInfo { model_sha256: model.sha256().to_string(), branches: model.num_branches() };
    drop(model);
    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, "branchpoint-api").await?;
        let store = ControlStore::open_with(&client, args.nats.store_settings()).await?;
        let state = ApiState::new(client, store, token, info, Duration::from_secs_f64(args.stale_after_s));
        let followers = state.follow().await?;
        let server = http_server(state, &args.http.listen)?;
        args.service.mark_ready();
        tracing::info!("api listening on http://{} (dashboard at /, metrics at /metrics)", args.http.listen);
        let handle = server.handle();
        let served = actix::spawn(server);
        crate::shutdown::serving();
        let sig = crate::shutdown::signal().await;
        tracing::info!("api: {}: shutting down", sig.name());
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
