//! Bounded shutdown. Every long-running command (worker, calibrator,
//! planner, serve, fleet, stack up) exits within `BOUND` after SIGTERM or
//! Ctrl-C, whether its NATS server is up or gone:
//!
//! - `install` at the command's start takes over SIGINT and SIGTERM. While
//!   the command is still starting (loading a model, fitting temperatures)
//!   a signal ends it at once, with status 128 + the signal's number, as the
//!   signal's default action would: there is nothing to drain yet.
//! - `serving` marks the command as running; from then on the first signal
//!   starts a cooperative shutdown: `signal` resolves, and the command stops
//!   in steps (unsubscribe, drain, flush, join its tensor threads), each
//!   under a `Stopping` deadline, saying what it could not finish.
//! - A watchdog thread ends the process, with a message and status 1, if it
//!   is still alive `BOUND` after that signal; a second signal ends it at
//!   once. Both skip destructors (`_exit`): a forward still running must
//!   not race libtorch's teardown.
//!
//! Why not tokio's signal streams: a step can block the event loop's thread
//! (a join, a libtorch call, a synchronous start-up), and then nothing that
//! waits on the loop would notice the signal or bound the shutdown.
use std::future::Future;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// The longest a command takes to exit after SIGTERM or Ctrl-C.
pub const BOUND: Duration = Duration::from_secs(5);

/// What a command's own steps may use of `BOUND`; the rest is the margin
/// before the watchdog.
pub const GRACE: Duration = Duration::from_secs(3);

const STARTING: u8 = 0;
const SERVING: u8 = 1;
const STOPPING: u8 = 2;

static STATE: AtomicU8 = AtomicU8::new(STARTING);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "Ctrl-C",
            Signal::Terminate => "SIGTERM",
        }
    }
}

/// Takes over SIGINT and SIGTERM for a long-running command named `who`
/// (the name in its messages) and starts the watchdog. Call it first thing.
pub fn install(who: &str) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only touches atomics and calls _exit, both
        // async-signal-safe.
        let registered = unsafe { signal_hook_registry::register(sig, move || on_signal(sig)) };
        if let Err(e) = registered {
            tracing::warn!("{who}: could not take over signal {sig} ({e}); it ends the process at once");
        }
    }
    let name = who.to_string();
    let spawned = std::thread::Builder::new().name("shutdown-watchdog".into()).spawn(move || {
        while STATE.load(Ordering::Acquire) != STOPPING {
            std::thread::sleep(Duration::from_millis(10));
        }
        let seen = Instant::now();
        std::thread::sleep(BOUND.saturating_sub(Duration::from_millis(10)));
        tracing::warn!("{name}: still not stopped {:.1} s after the signal; exiting now", seen.elapsed().as_secs_f64());
        // SAFETY: _exit ends the process without atexit handlers or
        // destructors, which is the point: nothing can hang or race there.
        unsafe { libc::_exit(1) }
    });
    if let Err(e) = spawned {
        tracing::warn!("{who}: no shutdown watchdog ({e}); its shutdown is not bounded");
    }
}

fn on_signal(sig: i32) {
    match STATE.compare_exchange(SERVING, STOPPING, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => SIGNAL.store(sig, Ordering::Release),
        // Still starting, or a second signal: end now, as the default
        // action would. SAFETY: _exit is async-signal-safe.
        Err(_) => unsafe { libc::_exit(128 + sig) },
    }
}

/// The command is running: from now on a signal starts a cooperative,
/// bounded shutdown instead of ending the process.
pub fn serving() {
    let _ = STATE.compare_exchange(STARTING, SERVING, Ordering::AcqRel, Ordering::Acquire);
}

/// Why the process stops on its own with a failure (a NATS permission its
/// role lacks), if it does.
static FAILURE: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// Stops the command as SIGTERM would (cooperatively, within `BOUND`), and
/// makes it exit with status 1 and `reason`: something it needs to serve
/// was refused, and running on without it would look healthy and do
/// nothing.
pub fn fail(reason: String) {
    let mut f = FAILURE.lock().unwrap_or_else(|e| e.into_inner());
    if f.is_none() {
        *f = Some(reason);
    }
    drop(f);
    SIGNAL.store(libc::SIGTERM, Ordering::Release);
    let _ = STATE.compare_exchange(SERVING, STOPPING, Ordering::AcqRel, Ordering::Acquire);
    let _ = STATE.compare_exchange(STARTING, STOPPING, Ordering::AcqRel, Ordering::Acquire);
}

/// The reason given to `fail`, if it was called.
pub fn failure() -> Option<String> {
    FAILURE.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Whether a signal has asked the process to stop.
pub fn requested() -> Option<Signal> {
    if STATE.load(Ordering::Acquire) != STOPPING {
        return None;
    }
    Some(if SIGNAL.load(Ordering::Acquire) == libc::SIGINT { Signal::Interrupt } else { Signal::Terminate })
}

/// Resolves once a signal has asked the process to stop (checked every
/// 10 ms: the handler itself may only touch atomics).
pub async fn signal() -> Signal {
    loop {
        if let Some(s) = requested() {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The deadline of one shutdown: each step gets at most what is left.
pub struct Stopping {
    who: String,
    started: Instant,
    until: Instant,
}

impl Stopping {
    /// A shutdown of `who` that must be done within `grace` from now.
    pub fn new(who: &str, grace: Duration) -> Self {
        let started = Instant::now();
        Self { who: who.into(), started, until: started + grace }
    }

    /// Time left before the deadline.
    pub fn left(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now())
    }

    /// Runs `step` for at most `at_most` (and never past the deadline);
    /// `None`, after saying so, when it did not finish.
    pub async fn step<F: Future>(&self, what: &str, at_most: Duration, step: F) -> Option<F::Output> {
        match tokio::time::timeout(self.left().min(at_most), step).await {
            Ok(out) => Some(out),
            Err(_) => {
                tracing::warn!("{}: gave up on {what} (NATS unreachable or too slow); going on", self.who);
                None
            }
        }
    }

    /// Says how long the shutdown took.
    pub fn done(&self) {
        tracing::info!("{}: stopped in {} ms", self.who, self.started.elapsed().as_millis());
    }
}
