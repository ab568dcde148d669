//! Roles on the NATS bus and the least each needs: `branchpoint stack up`
//! runs nats-server with one user per role and these permissions, and
//! `branchpoint nats-config` writes the same for a compose deployment.
//!
//! Why roles: without them any client on the bus can publish a plan or
//! temperatures that running devices apply, write the key-value store, join
//! the workers' queue group and answer offloads, or read every activation.
//! With them a device may send offloads, network reports and its fleet's
//! status, and read plans and temperatures; only workers may join the
//! workers' queue group; only the planner, the calibrator and the API write
//! the control store, each only its part; only the operator (the stack
//! itself, and people) may create buckets or do anything else.
//!
//! Every role may subscribe to `_INBOX.>` for its requests' replies, and
//! answers the requests it serves through NATS's `allow_responses` (a reply
//! to a request it received), not through a publish right on inboxes.
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use branchpoint_actors::control::{CALIBRATION_BUCKET, PLANS_BUCKET};
use branchpoint_messages::subjects;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Device,
    Worker,
    Planner,
    Calibrator,
    Api,
    Operator,
}

/// What one role may publish and subscribe to.
#[derive(Debug, Clone, PartialEq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    /// May answer the requests it receives (one reply each).
    pub allow_responses: bool,
}

/// JetStream API subjects that read a key-value bucket: open it (stream
/// info), get a key (direct or stored-message get), list and watch it
/// (ordered consumers, their deletion and flow control).
fn kv_read(bucket: &str) -> Vec<String> {
    let stream = format!("KV_{bucket}");
    vec![
        format!("$JS.API.STREAM.INFO.{stream}"),
        format!("$JS.API.STREAM.MSG.GET.{stream}"),
        format!("$JS.API.DIRECT.GET.{stream}.>"),
        format!("$JS.API.CONSUMER.CREATE.{stream}"),
        format!("$JS.API.CONSUMER.CREATE.{stream}.>"),
        format!("$JS.API.CONSUMER.DELETE.{stream}.>"),
        format!("$JS.API.CONSUMER.INFO.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ]
}

/// Writes (puts and deletes) to a bucket's keys, on top of reading it, and
/// creating the bucket where it does not exist yet (a deployment without an
/// operator to make it). Never updating or deleting it: nothing but the
/// operator changes a bucket's settings.
fn kv_write(bucket: &str) -> Vec<String> {
    kv_write_keys(bucket, ">")
}

/// Reading a bucket, and writing only its keys under `keys` (a subject
/// pattern such as `device.>`): one writer per key, kept by the server.
fn kv_write_keys(bucket: &str, keys: &str) -> Vec<String> {
    let mut v = kv_read(bucket);
    v.push(format!("$KV.{bucket}.{keys}"));
    v.push(format!("$JS.API.STREAM.CREATE.KV_{bucket}"));
    v
}

impl Role {
    pub const ALL: [Role; 6] = [Role::Device, Role::Worker, Role::Planner, Role::Calibrator, Role::Api, Role::Operator];

    /// The NATS user name of the role.
    pub fn name(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::Worker => "worker",
            Role::Planner => "planner",
            Role::Calibrator => "calibrator",
            Role::Api => "api",
            Role::Operator => "operator",
        }
    }

    pub fn permissions(self) -> Permissions {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let inbox = "_INBOX.>".to_string();
        let (mut publish, mut subscribe) = match self {
            Role::Device => {
                let mut p = s(&[subjects::OFFLOAD_ALL, subjects::NETWORK_REPORT, subjects::FLEET_STATUS_ALL]);
                p.extend(kv_read(PLANS_BUCKET));
                p.extend(kv_read(CALIBRATION_BUCKET));
                (p, s(&[subjects::CALIBRATION_UPDATE]))
            }
            Role::Worker => {
                let p = s(&[subjects::WORKER_STATUS, "branchpoint.worker.errors.*", subjects::CALIBRATION_AUDIT]);
                // Only in the workers' queue group, and the service API.
                let q = format!("{} {}", subjects::OFFLOAD_ALL, subjects::WORKER_QUEUE_GROUP);
                (p, vec![q, "$SRV.>".into()])
            }
            Role::Planner => {
                // Devices' plans are the planner's alone; groups' are not.
                let mut p = kv_write_keys(PLANS_BUCKET, "device.>");
                p.extend(kv_read(CALIBRATION_BUCKET));
                // Devices' reports, the workers' load for every plan and,
                // under `--watch`, the workers' audit results (only workers
                // publish them): its control loops' evidence.
                (p, s(&[subjects::NETWORK_REPORT, subjects::WORKER_STATUS, subjects::CALIBRATION_AUDIT]))
            }
            Role::Calibrator => {
                let mut p = s(&[subjects::CALIBRATION_UPDATE, subjects::CALIBRATION_STATUS]);
                p.extend(kv_write_keys(PLANS_BUCKET, "group.>"));
                p.extend(kv_write(CALIBRATION_BUCKET));
                (p, s(&[subjects::CALIBRATION_GET, subjects::CALIBRATION_REFIT, subjects::CALIBRATION_CERTIFY, subjects::CALIBRATION_AUDIT]))
            }
            Role::Api => {
                let mut p = s(&[subjects::CALIBRATION_GET, subjects::CALIBRATION_REFIT, subjects::CALIBRATION_CERTIFY]);
                p.extend(kv_write_keys(PLANS_BUCKET, "group.>"));
                p.extend(kv_read(CALIBRATION_BUCKET));
                (p, s(&["branchpoint.status.>", subjects::WORKER_STATUS]))
            }
            Role::Operator => (s(&[">"]), s(&[">"])),
        };
        if self != Role::Operator {
            subscribe.push(inbox);
        }
        publish.sort();
        subscribe.sort();
        Permissions { publish, subscribe, allow_responses: self != Role::Operator }
    }
}

/// One password per role, generated for a stack or a deployment.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub passwords: Vec<(Role, String)>,
}

impl Credentials {
    /// Fresh random passwords (24 bytes from the OS, hex).
    pub fn generate() -> Result<Self> {
        let mut passwords = Vec::new();
        for role in Role::ALL {
            let mut bytes = [0u8; 24];
            let mut f = std::fs::File::open("/dev/urandom").context("reading /dev/urandom for the stack's NATS passwords")?;
            std::io::Read::read_exact(&mut f, &mut bytes).context("reading /dev/urandom")?;
            passwords.push((
                role,
                bytes.iter().fold(String::new(), |mut s, b| {
                    let _ = write!(s, "{b:02x}");
                    s
                }),
            ));
        }
        Ok(Self { passwords })
    }

    pub fn password(&self, role: Role) -> &str {
        self.passwords.iter().find(|(r, _)| *r == role).map(|(_, p)| p.as_str()).expect("every role has one")
    }

    /// The environment a service of `role` gets (the layered configuration
    /// reads `[nats] user` and `password` from it), so passwords stay off
    /// command lines.
    pub fn env(&self, role: Role) -> [(String, String); 2] {
        [("BRANCHPOINT_NATS__USER".into(), role.name().into()), ("BRANCHPOINT_NATS__PASSWORD".into(), self.password(role).into())]
    }

    /// KEY=VALUE lines per role, for `docker compose --env-file` or a shell.
    pub fn env_file(&self) -> String {
        let mut out = String::from("# branchpoint NATS credentials, one user per role; keep this file secret.\n");
        for (role, pw) in &self.passwords {
            let _ = writeln!(out, "{}={pw}", password_variable(*role));
        }
        out
    }
}

fn quoted(list: &[String]) -> String {
    list.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(", ")
}

/// The `authorization` block of a nats-server configuration: one user per
/// role with its permissions. `password` gives each user's password as the
/// configuration should hold it (the password itself, or a `$VARIABLE`).
pub fn authorization(password: impl Fn(Role) -> String) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for role in Role::ALL {
        let p = role.permissions();
        let _ = writeln!(
            out,
            "    {{ user: {:?}, password: {}, permissions: {{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{} }} }}",
            role.name(),
            password(role),
            quoted(&p.publish),
            quoted(&p.subscribe),
            if p.allow_responses { ", allow_responses: true" } else { "" },
        );
    }
    out.push_str("  ]\n}\n");
    out
}

/// The environment variable a deployment keeps a role's password in.
pub fn password_variable(role: Role) -> String {
    format!("BRANCHPOINT_NATS_{}_PASSWORD", role.name().to_uppercase())
}

/// The nats-server configuration of a deployment (compose): JetStream on
/// /data, the monitoring port for health checks, and the roles' users with
/// their passwords read from the environment (`password_variable`), so the
/// file holds no secret and can be committed.
pub fn deployment_config() -> String {
    format!(
        concat!(
            "# Written by `branchpoint nats-config`: one NATS user per role, each allowed only its\n",
            "# subjects and key-value operations. The passwords come from the environment\n",
            "# (BRANCHPOINT_NATS_<ROLE>_PASSWORD, made by `branchpoint nats-config --env FILE`).\n",
            "# For links between machines add a tls {{ cert_file, key_file, ca_file }} block\n",
            "# and give the services --nats-tls --nats-ca (README, \"Roles and TLS\").\n",
            "listen: \"0.0.0.0:4222\"\nhttp: 8222\njetstream {{ store_dir: \"/data\" }}\n{}"
        ),
        authorization(|role| format!("${}", password_variable(role)))
    )
}

/// A whole nats-server configuration for one server on loopback with
/// JetStream in `store` and the roles' users.
pub fn server_config(port: u16, store: &Path, creds: &Credentials) -> String {
    format!(
        "# Written by `branchpoint stack up`; it holds passwords: keep it private.\nlisten: \"127.0.0.1:{port}\"\njetstream {{ store_dir: {:?} }}\n{}",
        store.display().to_string(),
        authorization(|role| format!("{:?}", creds.password(role)))
    )
}

/// Writes `text` to `path` readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path).with_context(|| format!("writing {}", path.display()))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_workers_join_the_queue_group_and_devices_write_nothing() {
        let device = Role::Device.permissions();
        assert!(!device.subscribe.iter().any(|s| s.starts_with("branchpoint.offload")), "{device:?}");
        assert!(!device.publish.iter().any(|s| s.starts_with("$KV.") || s.starts_with("branchpoint.plan") || s == subjects::CALIBRATION_UPDATE), "{device:?}");
        assert!(!device.publish.iter().any(|s| s.contains("STREAM.CREATE") || s.contains("STREAM.UPDATE") || s == ">"), "{device:?}");
        let worker = Role::Worker.permissions();
        assert!(worker.subscribe.contains(&format!("{} {}", subjects::OFFLOAD_ALL, subjects::WORKER_QUEUE_GROUP)));
        for role in [Role::Planner, Role::Calibrator, Role::Api] {
            assert!(!role.permissions().subscribe.iter().any(|s| s.starts_with("branchpoint.offload")), "{role:?}");
        }
        assert!(!Role::Planner.permissions().publish.iter().any(|s| s.contains(CALIBRATION_BUCKET) && s.starts_with("$KV")), "the planner writes plans only");
        // One writer per key: devices' plans are the planner's, groups' the
        // operator's (through the API) and the calibrator's refits.
        let plan_writes = |role: Role| role.permissions().publish.into_iter().filter(|s| s.starts_with(&format!("$KV.{PLANS_BUCKET}."))).collect::<Vec<_>>();
        assert_eq!(plan_writes(Role::Planner), [format!("$KV.{PLANS_BUCKET}.device.>")]);
        for role in [Role::Api, Role::Calibrator] {
            assert_eq!(plan_writes(role), [format!("$KV.{PLANS_BUCKET}.group.>")], "{role:?}");
        }
        let conf = server_config(4222, Path::new("/tmp/js"), &Credentials::generate().unwrap());
        for role in Role::ALL {
            assert!(conf.contains(&format!("user: {:?}", role.name())));
        }
    }
}
