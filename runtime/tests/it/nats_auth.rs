//! The NATS authentication and TLS options of the CLI (`--nats-user`,
//! `--nats-password`, `--nats-token`, `--nats-tls`, `--nats-ca`,
//! `--nats-cert`, `--nats-key`) against a real nats-server that requires
//! them: with the right options a worker and a fleet connect and offloads are
//! answered by the cloud; with wrong or missing ones the command exits
//! non-zero and says it could not connect.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use branchpoint_actors::collector::Summary;
use common::*;

const INPUTS: usize = 200;
/// What nats-server answers a CONNECT with wrong or missing credentials.
const AUTH: &[&str] = &["authorization violation"];
/// A failing command loads the model (and the fleet the test split) before it
/// connects, then gives up within nats::connect's 3 s connection timeout.
const FAILS_WITHIN: Duration = Duration::from_secs(45);
const RUNS_WITHIN: Duration = Duration::from_secs(90);

/// `branchpoint fleet --nats URL <nats options>`: 5 devices, 200 inputs.
fn fleet(url: &str, nats_opts: &[&str], json: &Path) -> Command {
    let mut cmd = branchpoint();
    cmd.args(["fleet", "--nats", url])
        .args(nats_opts)
        .args(["--devices", "5", "--rate", "100", "--duration", "10", "--inputs", &INPUTS.to_string()])
        .args(["--p-tar", "0.9", "--branch", "1", "--deadline-ms", "5000"])
        .args(["--json", json.to_str().unwrap()]);
    cmd
}

/// Runs a fleet that must connect, and checks that offloads were answered
/// by the cloud worker (not by device fallbacks).
fn fleet_gets_cloud_answers(url: &str, nats_opts: &[&str], dir: &Path, name: &str) -> Summary {
    let json = dir.join(format!("{name}.json"));
    let out = output_within(&mut fleet(url, nats_opts, &json), RUNS_WITHIN);
    assert!(out.status.success(), "fleet {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    let s: Summary = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!((s.inputs, s.outcomes, s.duplicates, s.errors), (INPUTS, INPUTS, 0, 0), "{name}: {s:?}");
    assert!(s.offloaded > 0, "{name}: the test needs offloads: {s:?}");
    assert!(s.answered_by_cloud > 0, "{name}: no offload was answered by the worker: {s:?}");
    assert_eq!((s.answered_by_cloud, s.fallbacks), (s.offloaded, 0), "{name}: {s:?}");
    s
}

/// Runs a command that must fail to connect to `url`: non-zero exit, and
/// stderr says it could not connect and why (one of `causes`).
fn fails_to_connect(cmd: &mut Command, url: &str, causes: &[&str]) -> String {
    let out = output_within(cmd, FAILS_WITHIN);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{cmd:?} should have failed; stderr: {stderr}");
    eprintln!("refused as expected: {}", stderr.trim());
    assert!(stderr.contains(&format!("could not connect to NATS at {url}")), "{cmd:?}: {stderr}");
    assert!(causes.iter().any(|c| stderr.contains(c)), "{cmd:?}: expected one of {causes:?} in: {stderr}");
    stderr
}

/// A fleet that must fail to connect; it writes no summary.
fn fleet_fails(url: &str, nats_opts: &[&str], dir: &Path, name: &str, causes: &[&str]) -> String {
    let json = dir.join(format!("{name}.json"));
    let stderr = fails_to_connect(&mut fleet(url, nats_opts, &json), url, causes);
    assert!(!json.exists(), "fleet {name} wrote a summary without a connection");
    stderr
}

fn worker_fails(url: &str, nats_opts: &[&str], causes: &[&str]) -> String {
    let mut cmd = branchpoint();
    cmd.args(["worker", "--nats", url, "--worker-id", "refused"]).args(nats_opts);
    fails_to_connect(&mut cmd, url, causes)
}

#[test]
fn user_and_password_authenticate_and_a_wrong_password_is_refused() {
    let _cpu = shared();
    let nats = NatsServer::start_with(&["--user", "alice", "--pass", "s3cret"]);
    let url = nats.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let creds = ["--nats-user", "alice", "--nats-password", "s3cret"];
    let _w = start_worker(url, "user-pass", &creds);
    fleet_gets_cloud_answers(url, &creds, dir.path(), "right-password");

    fleet_fails(url, &["--nats-user", "alice", "--nats-password", "wrong"], dir.path(), "wrong-password", AUTH);
    fleet_fails(url, &["--nats-user", "mallory", "--nats-password", "s3cret"], dir.path(), "wrong-user", AUTH);
    fleet_fails(url, &[], dir.path(), "no-credentials", AUTH);
}

#[test]
fn a_token_authenticates_and_a_missing_or_wrong_token_is_refused() {
    let _cpu = shared();
    let nats = NatsServer::start_with(&["--auth", "t0ken-for-tests"]);
    let url = nats.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let token = ["--nats-token", "t0ken-for-tests"];
    let _w = start_worker(url, "token", &token);
    fleet_gets_cloud_answers(url, &token, dir.path(), "right-token");

    worker_fails(url, &["--nats-token", "not-the-token"], AUTH);
    fleet_fails(url, &["--nats-token", "not-the-token"], dir.path(), "wrong-token", AUTH);
    fleet_fails(url, &[], dir.path(), "no-token", AUTH);
}

/// A test PKI written as PEM files: a CA, a server certificate for
/// 127.0.0.1 and localhost, and a client certificate, all signed by the CA;
/// and a second, unrelated CA with a client certificate of its own.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
    other_client_cert: PathBuf,
    other_client_key: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(params, key))
}

/// A leaf certificate signed by `issuer`: (certificate PEM, private key PEM).
fn new_leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
    use rcgen::{CertificateParams, DnType, KeyPair, KeyUsagePurpose};
    let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn make_pki() -> Pki {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let (ca_cert, ca) = new_ca("branchpoint test CA");
    let (server_cert, server_key) = new_leaf(&ca, "nats-server", &["127.0.0.1", "localhost"], ServerAuth);
    let (client_cert, client_key) = new_leaf(&ca, "branchpoint-client", &[], ClientAuth);
    let (other_ca_cert, other_ca) = new_ca("some other CA");
    let (other_client_cert, other_client_key) = new_leaf(&other_ca, "branchpoint-client", &[], ClientAuth);
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server-cert.pem", &server_cert),
        server_key: write("server-key.pem", &server_key),
        client_cert: write("client-cert.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
        other_ca: write("other-ca.pem", &other_ca_cert.pem()),
        other_client_cert: write("other-client-cert.pem", &other_client_cert),
        other_client_key: write("other-client-key.pem", &other_client_key),
        _dir: dir,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn tls_connects_with_the_servers_ca_and_fails_without_it() {
    let _cpu = shared();
    let pki = make_pki();
    let nats = NatsServer::start_with(&["--tls", "--tlscert", s(&pki.server_cert), "--tlskey", s(&pki.server_key)]);
    let url = nats.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let tls = ["--nats-tls", "--nats-ca", s(&pki.ca)];
    let _w = start_worker(url, "tls", &tls);
    fleet_gets_cloud_answers(url, &tls, dir.path(), "tls");
    // A tls:// URL asks for TLS by itself.
    let tls_url = url.replacen("nats://", "tls://", 1);
    fleet_gets_cloud_answers(&tls_url, &["--nats-ca", s(&pki.ca)], dir.path(), "tls-url");

    // The server's certificate is not trusted without its CA (the platform's
    // roots, if any, do not have it), nor with another CA.
    fleet_fails(url, &["--nats-tls"], dir.path(), "no-ca", &["invalid peer certificate: UnknownIssuer", "could not load platform certs"]);
    fleet_fails(url, &["--nats-tls", "--nats-ca", s(&pki.other_ca)], dir.path(), "other-ca", &["invalid peer certificate: UnknownIssuer"]);

    // --nats-tls refuses a server that does not speak TLS (rustls gets the
    // plain-text INFO line where it expects a TLS record).
    let plain = NatsServer::start();
    fleet_fails(&plain.url, &tls, dir.path(), "plain-server", &["received corrupt message"]);
}

#[test]
fn mutual_tls_needs_a_client_certificate_from_the_servers_ca() {
    let _cpu = shared();
    let pki = make_pki();
    let nats = NatsServer::start_with(&["--tlsverify", "--tlscert", s(&pki.server_cert), "--tlskey", s(&pki.server_key), "--tlscacert", s(&pki.ca)]);
    let url = nats.url.as_str();
    let dir = tempfile::tempdir().unwrap();
    let mtls = ["--nats-tls", "--nats-ca", s(&pki.ca), "--nats-cert", s(&pki.client_cert), "--nats-key", s(&pki.client_key)];
    let _w = start_worker(url, "mtls", &mtls);
    fleet_gets_cloud_answers(url, &mtls, dir.path(), "mtls");

    // The server (Go's TLS) sends an alert the client reports; should the
    // server's reset overtake it, the refusal shows as a reset instead.
    let reset = "Connection reset by peer";
    fleet_fails(url, &["--nats-tls", "--nats-ca", s(&pki.ca)], dir.path(), "no-client-cert", &["CertificateRequired", reset]);
    let other = ["--nats-tls", "--nats-ca", s(&pki.ca), "--nats-cert", s(&pki.other_client_cert), "--nats-key", s(&pki.other_client_key)];
    fleet_fails(url, &other, dir.path(), "other-client-cert", &["UnknownCA", "BadCertificate", reset]);
}
