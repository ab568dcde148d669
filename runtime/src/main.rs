use std::process::ExitCode;

use branchpoint::ParseFailure;

fn main() -> ExitCode {
    // Before any other thread exists, so that every thread this process
    // starts (libtorch's intra-op threads included) inherits it.
    branchpoint_models::subnormal::flush_subnormals();
    raise_open_file_limit();
    init_logging();
    let cli = match branchpoint::parse_with_config(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(ParseFailure::Clap(e)) => e.exit(),
        Err(ParseFailure::Config(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let code = match branchpoint::run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // A command stopped because something it needs was refused.
    let code = match branchpoint::shutdown::failure() {
        Some(reason) if code == 0 => {
            eprintln!("error: {reason}");
            1
        }
        _ => code,
    };
    // Every command joins its tensor threads; one that could not (a forward
    // outlasting its shutdown bound) must not meet libtorch's teardown.
    let running = branchpoint_actors::compute::tensor_threads_running();
    if running > 0 {
        eprintln!("{running} compute thread(s) still running; exiting without waiting for them");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // SAFETY: _exit ends the process at once, skipping the destructors
        // that would race the running thread.
        unsafe { libc::_exit(code) }
    }
    ExitCode::from(code as u8)
}

/// Raises the soft limit on open files to the hard one: a service holding
/// many NATS and HTTP connections must not be refused new ones (an accept
/// that fails for want of a descriptor stalls every client, /healthz's
/// too) while the system would allow them.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write `lim`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Library crates log through `tracing` (levels and fields); this prints
/// their events on stderr: branchpoint's at `info` and above, other
/// libraries' at `warn`, unless `RUST_LOG` says otherwise (`warn`,
/// `branchpoint_actors::planner=debug,info`, ...).
fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    // Our own events from info up; libraries' (async-nats reports every
    // connect and reconnect at info) from warn up.
    let default = || Targets::new().with_default(LevelFilter::WARN).with_target("branchpoint", LevelFilter::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => spec.parse::<Targets>().unwrap_or_else(|e| {
            eprintln!("warning: RUST_LOG={spec:?} is not a log filter ({e}); logging at info; write e.g. RUST_LOG=warn or RUST_LOG=branchpoint_actors=debug,info");
            default()
        }),
        _ => default(),
    };
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(fmt).with(filter).init();
}
