//! Shared by the integration tests: a real nats-server (the one
//! scripts/setup.sh installs into the venv) on a free loopback port, and
//! child processes of the `branchpoint` binary, all killed on drop.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub fn shipped_model() -> PathBuf {
    repo_root().join("models/balexnet-fmnist.safetensors")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct NatsServer {
    pub url: String,
    port: u16,
    extra: Vec<String>,
    proc: Option<Proc>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// A nats-server with extra command-line options, e.g. `--user U --pass P`,
    /// `--auth TOKEN`, `--tls --tlscert F --tlskey F` or `-c CONFIG`.
    pub fn start_with(extra: &[&str]) -> NatsServer {
        // A port that was free when picked may be taken by another test's
        // server before this one binds it: then this one says so and exits,
        // and another port is tried.
        for _ in 0..5 {
            let mut s = NatsServer { url: String::new(), port: free_port(), extra: extra.iter().map(|e| e.to_string()).collect(), proc: None };
            s.url = format!("nats://127.0.0.1:{}", s.port);
            match s.try_start() {
                Ok(()) => return s,
                Err(why) => eprintln!("nats-server on port {}: {why}; trying another port", s.port),
            }
        }
        panic!("nats-server {extra:?} could not start on any of 5 free ports");
    }

    /// Kills the server (a broker outage); `restart` brings it back on the
    /// same port with the same options.
    pub fn stop(&mut self) {
        self.proc = None;
    }

    pub fn restart(&mut self) {
        if let Err(why) = self.try_start() {
            panic!("nats-server {:?} on port {}: {why}", self.extra, self.port);
        }
    }

    /// Starts the server and waits for its own word that it serves (not
    /// just for the port to answer: another process may hold it), read
    /// from its log as it writes it; a thread keeps draining the log so
    /// the server never blocks on it.
    fn try_start(&mut self) -> Result<(), String> {
        use std::io::BufRead;
        let bin = repo_root().join(".venv/bin/nats-server");
        assert!(bin.is_file(), "{} is missing: run scripts/setup.sh", bin.display());
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server starts");
        let log = child.stderr.take().expect("piped stderr");
        let proc = Proc(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(log).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = tx.send(Ok(()));
                } else if line.contains("[FTL]") {
                    let _ = tx.send(Err(line));
                }
            }
            let _ = tx.send(Err("it exited".into()));
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {
                self.proc = Some(proc);
                Ok(())
            }
            Ok(Err(why)) => Err(why),
            Err(_) => Err("not ready within 10 s".into()),
        }
    }
}

pub fn branchpoint() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_branchpoint"));
    c.current_dir(repo_root());
    c
}

/// Starts `branchpoint ARGS` with `--ready-file` and waits for the file:
/// readiness is what the service signals, never a line of its log.
pub fn start_service(name: &str, args: &[&str], within: Duration) -> Proc {
    let log = std::env::temp_dir().join(format!("branchpoint-test-{}-{name}.log", std::process::id()));
    let ready = std::env::temp_dir().join(format!("branchpoint-test-{}-{name}.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = branchpoint().args(args).arg("--ready-file").arg(&ready).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().expect("the service starts");
    let mut proc = Proc(child);
    if let Err(status) = wait_ready(&mut proc.0, &ready, within) {
        panic!("{name} exited {status} before it was ready: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }
    proc
}

/// Waits for `child` to signal readiness through its `--ready-file`: Ok once
/// the file exists, or once the child has ended successfully (a short run
/// removes the file on its way out); its exit status if it failed first.
pub fn wait_ready(child: &mut Child, ready: &Path, within: Duration) -> Result<(), std::process::ExitStatus> {
    wait_for(&format!("{} (--ready-file)", ready.display()), within, || {
        if ready.exists() {
            return Some(Ok(()));
        }
        match child.try_wait() {
            Ok(Some(status)) if status.success() => Some(Ok(())),
            Ok(Some(status)) => Some(Err(status)),
            _ => None,
        }
    })
}

/// The stderr of a service started by `start_service`, so far.
pub fn service_log(name: &str) -> String {
    std::fs::read_to_string(std::env::temp_dir().join(format!("branchpoint-test-{}-{name}.log", std::process::id()))).unwrap_or_default()
}

/// Starts `branchpoint worker` and waits until it says it is serving.
pub fn start_worker(url: &str, id: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["worker", "--nats", url, "--worker-id", id];
    args.extend_from_slice(extra);
    start_service(id, &args, Duration::from_secs(30))
}

/// Reads a child's pipe to its end on a thread of its own (a full pipe
/// would block the child).
pub fn read_in_background(mut r: Box<dyn Read + Send>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        buf
    })
}

/// Runs `cmd` to its end with stdout and stderr captured, like
/// `Command::output`, but kills it and fails the test if it is still running
/// after `within` (a command that should fail must not hang instead).
pub fn output_within(cmd: &mut Command, within: Duration) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("command starts");
    let stdout = read_in_background(Box::new(child.stdout.take().unwrap()));
    let stderr = read_in_background(Box::new(child.stderr.take().unwrap()));
    let until = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("{cmd:?} still running after {within:?}; stderr: {err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// A free port on 127.0.0.1, for a service the test starts.
pub fn port() -> u16 {
    free_port()
}

/// The first of `n` consecutive free ports (a stack's cluster listens for
/// clients on `--nats-port` and the ports after it).
pub fn free_ports(n: u16) -> u16 {
    for _ in 0..100 {
        let base = free_port();
        if base.checked_add(n).is_some() && (0..n).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in 100 tries");
}

/// An HTTP response: status code and body.
pub struct Http {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request over a fresh connection (the tests need no client
/// library for a few JSON calls). Fails the test on a connection error.
pub fn http(method: &str, addr: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Http {
    try_http(method, addr, path, token, body).unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// `http`, for a poller that must survive the server going away.
pub fn try_http(method: &str, addr: &str, path: &str, token: Option<&str>, body: Option<&str>) -> std::io::Result<Http> {
    use std::io::Write;
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let body = body.unwrap_or("");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, rest) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| std::io::Error::other(format!("no status line in {head:?}")))?;
    // actix answers small bodies with Content-Length; chunked only when streaming.
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Ok(Http { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// Polls `f` every 50 ms until it returns Some, or fails the test after `within`.
pub fn wait_for<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out after {within:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Prometheus sample's value: the first line that starts with `prefix`
/// (a metric name and, optionally, the start of its labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

/// A device's report to the planner, group "phones": a link of `us_per_byte`
/// (conservative estimate too), 20 ms responses, a 100 ms deadline and 10
/// inputs/s.
pub fn network_report(device_id: &str, us_per_byte: f64) -> branchpoint_messages::NetworkReport {
    branchpoint_messages::NetworkReport {
        device_id: device_id.into(),
        uplink_bytes_per_s_ewma: 1e6 / us_per_byte,
        rtt_us_ewma: 20_000.0,
        window_start_unix_us: 0,
        window_end_unix_us: 1,
        samples: 3,
        group: Some("phones".into()),
        us_per_byte_conservative: Some(us_per_byte),
        response_us_conservative: Some(20_000.0),
        deadline_us: Some(100_000),
        arrival_rate: Some(10.0),
    }
}

/// Every message on one NATS subject since it was created, decoded (the
/// undecodable skipped), collected by a thread of its own: a test waits on
/// it for evidence (a worker's status, a fleet's status) instead of sleeping.
pub struct Watch<T> {
    seen: std::sync::Arc<std::sync::Mutex<Vec<T>>>,
}

impl<T: branchpoint_messages::Message + Send + 'static> Watch<T> {
    /// Returns once the subscription is in place at the server.
    pub fn new(url: &str, subject: &str) -> Self {
        use futures::StreamExt;
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (url, subject, sink) = (url.to_string(), subject.to_string(), seen.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let client = async_nats::connect(&url).await.expect("the watch connects");
                let mut sub = client.subscribe(subject).await.expect("the watch subscribes");
                client.flush().await.expect("the subscription reaches the server");
                let _ = ready_tx.send(());
                // Ends when the server goes away with the test.
                while let Some(msg) = sub.next().await {
                    if let Ok(m) = branchpoint_messages::decode::<T>(&msg.payload) {
                        sink.lock().unwrap().push(m);
                    }
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("the watch subscribed within 10 s");
        Watch { seen }
    }

    /// Waits until `f` finds what it needs among the messages so far.
    pub fn wait<R>(&self, what: &str, within: Duration, mut f: impl FnMut(&[T]) -> Option<R>) -> R {
        wait_for(what, within, || f(&self.seen.lock().unwrap()))
    }
}

/// Sends `signal` to a running child.
pub fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0, "signal {signal} delivered to {}", child.id());
}

/// Sends `signal` and waits for the child to exit: its status and how long
/// it took. The wait is for the exit itself (a pidfd becomes readable when
/// the process ends), not a polling loop. Fails the test if it is still
/// running after `give_up`, so that a hang says so instead of hanging the
/// test.
pub fn stop_with(child: &mut Child, signal: i32, give_up: Duration) -> (std::process::ExitStatus, Duration) {
    // Opened before the signal, so the exit cannot be missed.
    // SAFETY: pidfd_open(2) on our own child's pid; the fd is closed below.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) } as libc::c_int;
    assert!(fd >= 0, "pidfd_open failed: {}", std::io::Error::last_os_error());
    send_signal(child, signal);
    let sent = Instant::now();
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    loop {
        let left = give_up.saturating_sub(sent.elapsed()).as_millis() as libc::c_int;
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, left) };
        if ready > 0 || left == 0 {
            break;
        }
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("poll on the child's pidfd: {}", std::io::Error::last_os_error());
        }
    }
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd) };
    let status = child.try_wait().unwrap();
    let took = sent.elapsed();
    match status {
        Some(status) => (status, took),
        None => panic!("still running {took:?} after signal {signal}"),
    }
}

/// Lints a Prometheus exposition with promtool (Debian's prometheus
/// package, which scripts/setup.sh installs): its complaints, if any.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    use std::io::Write;
    let promtool = Path::new("/usr/bin/promtool");
    assert!(promtool.is_file(), "{} is missing: run scripts/setup.sh (it installs Debian's prometheus)", promtool.display());
    let mut child = Command::new(promtool).args(["check", "metrics"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(exposition.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(said)
    }
}

/// Who shares the two cores. A test whose assertions depend on timing
/// (deadlines met under load, goodput, how long a stop takes, a fleet still
/// running when a step ends) takes `alone()`: no other test runs beside
/// it. Every other test that starts processes or runs the model takes
/// `shared()`: such tests run beside one another, never beside a timing
/// test. Tests that only parse take neither.
static CPU: RwLock<()> = RwLock::new(());

pub fn alone() -> RwLockWriteGuard<'static, ()> {
    CPU.write().unwrap_or_else(|e| e.into_inner())
}

pub fn shared() -> RwLockReadGuard<'static, ()> {
    CPU.read().unwrap_or_else(|e| e.into_inner())
}
