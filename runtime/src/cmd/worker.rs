//! `branchpoint worker`: a cloud worker serving offloads from NATS until
//! interrupted (Ctrl-C or SIGTERM).
use std::time::Duration;

use actix::Actor;
use anyhow::{bail, Context, Result};
use branchpoint_actors::compute::{Executor, ModelSpec};
use branchpoint_actors::worker::nats::{publish_status, serve_nats, NatsAudits};
use branchpoint_actors::worker::{Batcher, GetWorkerStats, ServedModel, WorkerConfig};
use branchpoint_models::Model;

use crate::cli::WorkerArgs;
use crate::parse_device;

pub fn run(args: WorkerArgs) -> Result<()> {
    crate::shutdown::install("worker");
    if args.nats.nats.is_none() {
        bail!("branchpoint worker needs --nats URL: it serves offloads that devices send over NATS");
    }
    if args.max_batch == 0 || args.threads == 0 || args.status_interval_ms == 0 {
        bail!("--max-batch, --threads and --status-interval-ms must be at least 1");
    }
    let device = parse_device(&args.device)?;
    // One intra-op thread per compute thread: parallelism comes from the pool.
    branchpoint_models::subnormal::prepare_tensor_thread(1);
    // Each model loaded once here, to check it and learn its name and
    // shapes; the compute threads load their own copies.
    let mut served: Vec<ServedModel> = Vec::new();
    for path in &args.model {
        let model = Model::load(path, device).with_context(|| format!("--model {}", path.display()))?;
        if let Some(i) = served.iter().position(|m| m.model_sha256 == model.sha256()) {
            bail!("--model {}: the same model as --model {} (SHA-256 {}); serve each model once", path.display(), args.model[i].display(), model.sha256());
        }
        served.push(ServedModel { model_sha256: model.sha256().to_string(), partition_points: model.partition_points().to_vec() });
    }
    let worker_id = args.worker_id.clone().unwrap_or_else(|| format!("worker-{}", std::process::id()));
    if !branchpoint_messages::subjects::is_valid_id(&worker_id) {
        bail!("--worker-id {worker_id:?}: use 1 to 64 letters, digits, '-' or '_'");
    }

    let system = actix::System::new();
    system.block_on(async move {
        let client = crate::nats::connect(&args.nats, &worker_id).await?;
        // Off the event loop, which drives the NATS client meanwhile.
        let specs: Vec<ModelSpec> = args.model.iter().map(|m| ModelSpec { model: m.clone(), device }).collect();
        let (threads, slowdown) = (args.threads, args.cloud_slowdown);
        let executor = tokio::task::spawn_blocking(move || Executor::start_with_slowdown(specs, threads, slowdown))
            .await
            .context("starting the compute threads")?
            .context("--cloud-slowdown")?;
        let cfg = WorkerConfig { worker_id: worker_id.clone(), max_batch: args.max_batch, max_wait: Duration::from_micros(args.max_wait_us) };
        let executor_pool = executor.clone();
        let names: Vec<String> = served.iter().map(|m| m.model_sha256.get(..12).unwrap_or(&m.model_sha256).to_string()).collect();
        let batcher = Batcher::new(cfg, executor, served).with_compute_threads(args.threads).with_audit_sink(NatsAudits(client.clone())).start();
        let ready = {
            let (id, url) = (worker_id.clone(), args.nats.nats.clone().unwrap_or_default());
            let (max_batch, max_wait_us, threads, device) = (args.max_batch, args.max_wait_us, args.threads, args.device.clone());
            let service = args.service.clone();
            move || {
                service.mark_ready();
                tracing::info!(
                    "worker {id} serving {} on {url} for models {names:?} (SHA-256 prefixes; max batch {max_batch}, max wait {max_wait_us} us, {threads} thread(s), {device})",
                    branchpoint_messages::subjects::OFFLOAD_ALL
                )
            }
        };
        let status_every = Duration::from_millis(args.status_interval_ms);
        let status = actix::spawn(publish_status(client.clone(), batcher.clone(), worker_id.clone(), status_every));
        let (batcher_for_drain, drain_client) = (batcher.clone(), client.clone());
        let who = format!("worker {worker_id}");
        crate::shutdown::serving();
        let signalled = async {
            let sig = crate::shutdown::signal().await;
            tracing::info!("{who}: {}: shutting down", sig.name());
        };
        serve_nats(client, batcher, worker_id.clone(), ready, signalled).await.context("serving offloads")?;
        let stopping = crate::shutdown::Stopping::new(&who, crate::shutdown::GRACE);
        status.abort();
        // The subscription is gone with serve_nats's future, so no new
        // request arrives; answer those already here before exiting.
        let drained = stopping
            .step("answering the requests already received", Duration::from_secs(2), async {
                loop {
                    match batcher_for_drain.send(GetWorkerStats).await {
                        Ok(s) if s.queue_depth > 0 => tokio::time::sleep(Duration::from_millis(5)).await,
                        _ => break,
                    }
                }
            })
            .await;
        if drained.is_none() {
            if let Ok(s) = batcher_for_drain.send(GetWorkerStats).await {
                tracing::warn!("{who}: {} request(s) not answered; their devices fall back to their own answers", s.queue_depth);
            }
        }
        // Replies are published by spawned tasks: let them run, then flush,
        // unless the server is gone (a flush would wait for it forever).
        tokio::task::yield_now().await;
        stopping.step("flushing replies to NATS", Duration::from_millis(500), drain_client.flush()).await;
        let still = executor_pool.shutdown(stopping.left());
        if !still.is_empty() {
            tracing::warn!("{who}: compute threads {still:?} still busy");
        }
        args.service.clear();
        stopping.done();
        Ok::<(), anyhow::Error>(())
    })
}
