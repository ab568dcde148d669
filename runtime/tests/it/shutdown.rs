//! Bounded shutdown, as an operator meets it: every long-running command
//! exits within `shutdown::BOUND` after SIGTERM or Ctrl-C, with its NATS
//! server up or gone, with status 0, and says that it stopped. A signal
//! while a command is still starting ends it at once.
use crate::common;

use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use branchpoint::shutdown::BOUND;
use common::*;

/// Stops the service with `signal`: its exit status and how long it took.
fn stop(service: &mut Proc, signal: i32) -> (ExitStatus, Duration) {
    stop_with(&mut service.0, signal, 2 * BOUND)
}

/// Whether NATS is still up when the service is stopped.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Nats {
    Up,
    Gone,
}

/// Starts `args` against a fresh nats-server (with JetStream when `js`),
/// takes the server away for `Nats::Gone`, stops the service with
/// `signal`, and checks the bound, the status and the last words.
fn stops_within_the_bound(name: &str, args: &[&str], js: bool, nats: Nats, signal: i32) {
    let store = tempfile::tempdir().unwrap();
    let server = if js { NatsServer::start_with(&["-js", "-sd", store.path().to_str().unwrap()]) } else { NatsServer::start() };
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--nats", &server.url]);
    let tag = format!("{name}-{nats:?}-{signal}");
    let mut service = start_service(&tag, &full, Duration::from_secs(120));
    if nats == Nats::Gone {
        drop(server); // killed and reaped: the service's connection is gone
    }
    let (status, took) = stop(&mut service, signal);
    let log = service_log(&tag);
    eprintln!("{name}, NATS {nats:?}, signal {signal}: exited {status} after {} ms", took.as_millis());
    assert!(took <= BOUND, "{name} (NATS {nats:?}) took {took:?} to exit: {log}");
    assert!(status.success(), "{name} (NATS {nats:?}) exited {status}: {log}");
    assert!(log.contains("shutting down") || log.contains("no more arrivals"), "{name} says why it stops: {log}");
    assert!(log.contains("stopped in") || log.contains("interrupted after"), "{name} says it stopped: {log}");
}

fn both_ways(name: &str, args: &[&str], js: bool) {
    for nats in [Nats::Up, Nats::Gone] {
        stops_within_the_bound(name, args, js, nats, libc::SIGTERM);
    }
}

#[test]
fn a_worker_stops_within_the_bound_on_sigterm_or_ctrl_c() {
    let _cpu = alone();
    both_ways("worker", &["worker", "--worker-id", "stopper"], false);
    stops_within_the_bound("worker", &["worker", "--worker-id", "stopper"], false, Nats::Up, libc::SIGINT);
}

#[test]
fn the_calibrator_stops_within_the_bound() {
    let _cpu = alone();
    both_ways("calibrator", &["calibrator"], true);
}

#[test]
fn the_planner_stops_within_the_bound() {
    let _cpu = alone();
    both_ways("planner", &["planner"], true);
}

#[test]
fn the_api_stops_within_the_bound() {
    let _cpu = alone();
    let listen = format!("127.0.0.1:{}", port());
    both_ways("api", &["serve", "--listen", &listen], true);
}

/// A fleet offloading to nobody (every offload falls back) and one whose
/// worker is busy: interrupted, each stops its arrivals, lets the inputs
/// already running finish, writes its summary and exits 0.
#[test]
fn a_running_fleet_stops_within_the_bound_and_accounts_for_every_input() {
    let _cpu = alone();
    let dir = tempfile::tempdir().unwrap();
    let summary = dir.path().join("summary.json");
    let args = ["fleet", "--devices", "10", "--rate", "50", "--duration", "600", "--json", summary.to_str().unwrap()];
    both_ways("fleet", &args, false);
    stops_within_the_bound("fleet", &args, false, Nats::Up, libc::SIGINT);
    let s: branchpoint_actors::collector::Summary = serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    assert_eq!((s.outcomes, s.duplicates), (s.inputs, 0), "every input the devices accepted has one outcome: {s:?}");
}

/// Still loading its model and fitting temperatures, the calibrator has
/// nothing to drain: SIGTERM ends it at once, as the signal's default would.
#[test]
fn a_signal_while_starting_ends_the_command_at_once() {
    let _cpu = alone();
    let server = NatsServer::start();
    let log = Path::new(&std::env::temp_dir()).join(format!("branchpoint-test-{}-early.log", std::process::id()));
    let ready = Path::new(&std::env::temp_dir()).join(format!("branchpoint-test-{}-early.ready", std::process::id()));
    let _ = std::fs::remove_file(&ready);
    let child = branchpoint()
        .args(["calibrator", "--nats", &server.url, "--ready-file", ready.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut service = Proc(child);
    let (status, took) = stop(&mut service, libc::SIGTERM);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(took <= BOUND, "took {took:?}: {said}");
    assert!(!status.success(), "stopped before it served: {status}");
    assert!(!ready.exists(), "it never signalled readiness: {said}");
}
