//! Control state in NATS JetStream key-value buckets: the plans devices
//! should hold and the temperatures of each model, stored durably so that a
//! restarted device, planner or calibrator resumes from them.
//!
//! Buckets (created by whoever comes first; the same settings every time):
//! - `branchpoint-plans`: key `group.<group>` or `device.<id>`, value a
//!   `PlanUpdate` (MessagePack, as on the wire). Written by the planner (per
//!   device), and the HTTP API and the calibrator (per group); watched by
//!   fleets.
//!   The latest write a device sees wins, whichever key it came under.
//! - `branchpoint-calibration`: key `model.<sha256 of the weights>`, value a
//!   `CalibrationUpdate`: the model's temperatures. Key
//!   `model.<sha256>.group.<group>`: the temperatures of one device group
//!   after the calibrator refit a branch for that group's inputs (a drift
//!   alarm, see `calibration::LiveWatch`). Written by the calibrator; read
//!   by fleets at start and watched while they run, read by the HTTP API.
//!   A device applies the latest write it sees of its model's key and its
//!   group's key, as for plans.
//!
//! Values are validated when read like any message off the network, and
//! must match their key (a plan under `group.a` is for group a; temperatures
//! under `model.<x>` are for weights x): a bad entry is reported and
//! skipped, never applied.
use async_nats::jetstream::{self, kv};
use branchpoint_messages::{decode, encode, CalibrationUpdate, Message, PlanTarget, PlanUpdate};
use futures::StreamExt;

use crate::error::ActorError;

pub const PLANS_BUCKET: &str = "branchpoint-plans";
pub const CALIBRATION_BUCKET: &str = "branchpoint-calibration";

/// Key of a plan in `branchpoint-plans`.
pub fn plan_key(target: &PlanTarget) -> String {
    match target {
        PlanTarget::Group(g) => format!("group.{g}"),
        PlanTarget::Device(d) => format!("device.{d}"),
    }
}

/// Key of a model's temperatures in `branchpoint-calibration`.
pub fn calibration_key(model_sha256: &str) -> String {
    format!("model.{model_sha256}")
}

/// Key of one group's temperatures (a drift refit) in `branchpoint-calibration`.
pub fn group_calibration_key(model_sha256: &str, group: &str) -> String {
    format!("model.{model_sha256}.group.{group}")
}

/// The key a calibration update is stored under.
pub fn key_of_calibration(update: &CalibrationUpdate) -> String {
    match &update.group {
        None => calibration_key(&update.model_sha256),
        Some(g) => group_calibration_key(&update.model_sha256, g),
    }
}

/// A stored value and its revision (the bucket's sequence number: it grows
/// with every write, so it tells whether something changed).
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub value: T,
    pub revision: u64,
}

/// What can arrive while watching the control buckets.
#[derive(Debug, Clone)]
pub enum ControlChange {
    Plan(PlanUpdate),
    Calibration(CalibrationUpdate),
}

/// How the buckets are created when they do not exist yet, and how long a
/// plan for one device lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreSettings {
    /// Replicas of each bucket in a JetStream cluster (1 on a single server).
    pub replicas: usize,
    /// A plan stored for one device expires this long after it was last
    /// written: devices come and go, and a gone device's key must not stay
    /// forever. The planner writes a reporting device's plan again before
    /// then (`Planner`), so a live device keeps its plan.
    pub device_plan_ttl: std::time::Duration,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self { replicas: 1, device_plan_ttl: std::time::Duration::from_secs(3600) }
    }
}

/// Largest value a bucket takes: a plan or temperatures are a few hundred
/// bytes; a forged megabyte is refused by the server.
pub const MAX_VALUE_BYTES: i32 = 64 * 1024;

#[derive(Clone)]
pub struct ControlStore {
    js: jetstream::Context,
    plans: kv::Store,
    calibration: kv::Store,
    settings: StoreSettings,
    /// Whether the plans bucket takes a TTL per value (created by this
    /// version); older buckets get plain puts.
    device_ttl: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

fn kv_error(what: &str, e: impl std::fmt::Display) -> ActorError {
    ActorError::Nats(format!("{what}: {e}"))
}

impl ControlStore {
    /// Opens both buckets, creating those that do not exist yet with the
    /// default settings (one replica). Fails with a hint when the server has
    /// no JetStream.
    pub async fn open(client: &async_nats::Client) -> Result<Self, ActorError> {
        Self::open_with(client, StoreSettings::default()).await
    }

    /// Opens both buckets. A bucket that exists is used as it is: its
    /// replicas and limits are never changed (an operator may have raised
    /// them), and a request for more replicas than it has is reported. One
    /// that does not exist is created with `settings.replicas`, one value
    /// per key, values of at most `MAX_VALUE_BYTES`, and (plans) a TTL per
    /// value allowed.
    pub async fn open_with(client: &async_nats::Client, settings: StoreSettings) -> Result<Self, ActorError> {
        let js = jetstream::new(client.clone());
        let bucket = |name: &str, description: &str| kv::Config {
            bucket: name.into(),
            description: description.into(),
            // One value per key is the state; history would only be replayed.
            history: 1,
            max_value_size: MAX_VALUE_BYTES,
            num_replicas: settings.replicas.max(1),
            // Per-value TTLs (device plans), and how long the marker of an
            // expired value stays for watchers to see.
            limit_markers: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        };
        let open = |cfg: kv::Config| {
            let js = js.clone();
            async move {
                let name = cfg.bucket.clone();
                let hint = "the control state needs a NATS server with JetStream (start nats-server with -js, or use `branchpoint stack up`, which does)";
                let store = match js.get_key_value(name.clone()).await {
                    Ok(store) => store,
                    Err(_) => match js.create_key_value(cfg.clone()).await {
                        Ok(store) => store,
                        // Created meanwhile by another service: use that one.
                        Err(create) => {
                            js.get_key_value(name.clone()).await.map_err(|_| ActorError::Nats(format!("could not open or create the key-value bucket {name}: {create}; {hint}")))?
                        }
                    },
                };
                let replicas = store.stream.cached_info().config.num_replicas;
                if replicas < cfg.num_replicas {
                    tracing::info!(
                        "control: the bucket {name} has {replicas} replica(s), fewer than the {} asked for; it is left as it is (raise it with `nats kv edit {name} --replicas {}`)",
                        cfg.num_replicas, cfg.num_replicas
                    );
                }
                Ok::<_, ActorError>(store)
            }
        };
        let plans = open(bucket(PLANS_BUCKET, "branchpoint: the plan each device group or device should hold")).await?;
        let calibration = open(bucket(CALIBRATION_BUCKET, "branchpoint: the temperatures of each model")).await?;
        let ttl = plans.stream.cached_info().config.allow_message_ttl;
        Ok(Self { js, plans, calibration, settings, device_ttl: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(ttl)) })
    }

    pub fn settings(&self) -> StoreSettings {
        self.settings
    }

    /// Whether the store answers now: a read from each bucket within
    /// `within` (a cluster that lost the buckets' leader does not).
    pub async fn check(&self, within: std::time::Duration) -> Result<(), ActorError> {
        let probe = async {
            self.plans.get("readyz").await.map_err(|e| kv_error("reading the plans bucket", e))?;
            self.calibration.get("readyz").await.map_err(|e| kv_error("reading the calibration bucket", e))?;
            Ok(())
        };
        tokio::time::timeout(within, probe).await.map_err(|_| ActorError::Nats(format!("the control store did not answer within {within:?}")))?
    }

    /// Stores a plan. A device's plan expires `device_plan_ttl` after this
    /// write (see `StoreSettings`); a group's stays.
    pub async fn put_plan(&self, plan: &PlanUpdate) -> Result<u64, ActorError> {
        use std::sync::atomic::Ordering;
        let bytes = encode(plan)?;
        let key = plan_key(&plan.target);
        if matches!(plan.target, PlanTarget::Device(_)) && self.device_ttl.load(Ordering::Relaxed) {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-TTL", self.settings.device_plan_ttl.as_secs().max(1).to_string().as_str());
            let put = async {
                let ack = self.js.publish_with_headers(format!("$KV.{PLANS_BUCKET}.{key}"), headers, bytes.clone().into()).await.map_err(|e| e.to_string())?;
                ack.await.map(|a| a.sequence).map_err(|e| e.to_string())
            };
            match put.await {
                Ok(revision) => return Ok(revision),
                // A bucket made before TTLs were asked for: plain puts.
                Err(e) if e.contains("TTL") || e.contains("ttl") => {
                    tracing::warn!("control: the plans bucket takes no TTL per value ({e}); device plans stay until replaced");
                    self.device_ttl.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(kv_error("storing a plan", e)),
            }
        }
        self.plans.put(key, bytes.into()).await.map_err(|e| kv_error("storing a plan", e))
    }

    /// The plan stored for `target`, with its revision, if there is one.
    pub async fn plan(&self, target: &PlanTarget) -> Result<Option<Stored<PlanUpdate>>, ActorError> {
        self.plan_at(plan_key(target)).await
    }

    /// The plan stored under `key`, if one is (not deleted, and it decodes
    /// to a plan for the target its key names).
    async fn plan_at(&self, key: String) -> Result<Option<Stored<PlanUpdate>>, ActorError> {
        let Some(entry) = self.plans.entry(key.clone()).await.map_err(|e| kv_error("reading a plan", e))? else { return Ok(None) };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(decode_plan(&entry.value, &key).map(|value| Stored { value, revision: entry.revision }))
    }

    /// Removes the plan stored for `target`, if any.
    pub async fn delete_plan(&self, target: &PlanTarget) -> Result<(), ActorError> {
        self.plans.delete(plan_key(target)).await.map_err(|e| kv_error("removing a plan", e))
    }

    /// Stores a group's `plan` only if its key is still at `revision` (0:
    /// only if it holds no plan): a writer that read a plan and derives a
    /// new one never overwrites another writer's plan stored meanwhile.
    /// `Ok(None)` when someone else wrote first.
    pub async fn replace_plan(&self, plan: &PlanUpdate, revision: u64) -> Result<Option<u64>, ActorError> {
        use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
        let bytes: bytes::Bytes = encode(plan)?.into();
        let key = plan_key(&plan.target);
        if revision == 0 {
            return match self.plans.create(&key, bytes).await {
                Ok(r) => Ok(Some(r)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(kv_error("storing a plan", e)),
            };
        }
        match self.plans.update(&key, bytes, revision).await {
            Ok(r) => Ok(Some(r)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(kv_error("storing a plan", e)),
        }
    }

    /// Every stored plan, groups and devices, in key order.
    pub async fn plans(&self) -> Result<Vec<Stored<PlanUpdate>>, ActorError> {
        let mut keys: Vec<String> = Vec::new();
        let mut stream = self.plans.keys().await.map_err(|e| kv_error("listing plans", e))?;
        while let Some(k) = stream.next().await {
            keys.push(k.map_err(|e| kv_error("listing plans", e))?);
        }
        keys.sort();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            out.extend(self.plan_at(key).await?);
        }
        Ok(out)
    }

    /// Stores a model's temperatures, or one group's (`update.group`).
    pub async fn put_calibration(&self, update: &CalibrationUpdate) -> Result<u64, ActorError> {
        let bytes = encode(update)?;
        self.calibration.put(key_of_calibration(update), bytes.into()).await.map_err(|e| kv_error("storing temperatures", e))
    }

    /// The model's temperatures and every group's, in the order they were
    /// written (applying them in turn leaves each device with the latest).
    pub async fn calibrations(&self, model_sha256: &str) -> Result<Vec<Stored<CalibrationUpdate>>, ActorError> {
        let base = calibration_key(model_sha256);
        let groups = format!("{base}.group.");
        let mut keys: Vec<String> = Vec::new();
        let mut stream = self.calibration.keys().await.map_err(|e| kv_error("listing temperatures", e))?;
        while let Some(k) = stream.next().await {
            let k = k.map_err(|e| kv_error("listing temperatures", e))?;
            if k == base || k.starts_with(&groups) {
                keys.push(k);
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(entry) = self.calibration.entry(key.clone()).await.map_err(|e| kv_error("reading temperatures", e))? else { continue };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            if let Some(value) = decode_calibration(&entry.value, &key) {
                out.push(Stored { value, revision: entry.revision });
            }
        }
        out.sort_by_key(|s| s.revision);
        Ok(out)
    }

    /// Removes every group's temperatures for a model (an operator refit
    /// of the whole model replaces them). Returns how many there were.
    pub async fn delete_group_calibrations(&self, model_sha256: &str) -> Result<usize, ActorError> {
        let groups: Vec<String> = self.calibrations(model_sha256).await?.into_iter().filter_map(|s| s.value.group).collect();
        for g in &groups {
            self.delete_group_calibration(model_sha256, g).await?;
        }
        Ok(groups.len())
    }

    /// Removes one group's temperatures, so that its devices follow the
    /// model's again from their next write.
    pub async fn delete_group_calibration(&self, model_sha256: &str, group: &str) -> Result<(), ActorError> {
        self.calibration.delete(group_calibration_key(model_sha256, group)).await.map_err(|e| kv_error("removing a group's temperatures", e))
    }

    pub async fn calibration(&self, model_sha256: &str) -> Result<Option<Stored<CalibrationUpdate>>, ActorError> {
        let key = calibration_key(model_sha256);
        let Some(entry) = self.calibration.entry(key.clone()).await.map_err(|e| kv_error("reading temperatures", e))? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(decode_calibration(&entry.value, &key).map(|value| Stored { value, revision: entry.revision }))
    }

    /// Every plan, this model's temperatures and its groups': first the
    /// stored ones (so a device that starts late resumes from them), then
    /// each change as it is written. Bad entries are reported on stderr and
    /// skipped.
    pub async fn watch(&self, model_sha256: &str) -> Result<impl futures::Stream<Item = ControlChange> + Unpin, ActorError> {
        let plans = self.plans.watch_with_history(">").await.map_err(|e| kv_error("watching plans", e))?;
        let cal = |key: String| {
            let bucket = self.calibration.clone();
            async move { bucket.watch_with_history(key).await.map_err(|e| kv_error("watching temperatures", e)) }
        };
        let model = cal(calibration_key(model_sha256)).await?;
        let groups = cal(group_calibration_key(model_sha256, "*")).await?;
        let plans = plans.filter_map(|entry| async move {
            let entry = entry.map_err(|e| tracing::warn!("control: watching plans: {e}")).ok()?;
            (entry.operation == kv::Operation::Put).then_some(())?;
            decode_plan(&entry.value, &entry.key).map(ControlChange::Plan)
        });
        let cal = futures::stream::select(model, groups).filter_map(|entry| async move {
            let entry = entry.map_err(|e| tracing::warn!("control: watching temperatures: {e}")).ok()?;
            (entry.operation == kv::Operation::Put).then_some(())?;
            decode_calibration(&entry.value, &entry.key).map(ControlChange::Calibration)
        });
        Ok(Box::pin(futures::stream::select(plans, cal)))
    }
}

/// A stored plan, if it decodes, validates and is for the target its key names.
fn decode_plan(bytes: &[u8], key: &str) -> Option<PlanUpdate> {
    let plan = decode_checked::<PlanUpdate>(bytes, key)?;
    if plan_key(&plan.target) != key {
        tracing::warn!("control: skipped the stored plan under {key}: it is for {:?}, whose key is {}", plan.target, plan_key(&plan.target));
        return None;
    }
    Some(plan)
}

/// Stored temperatures, if they decode, validate and are for the weights
/// and group their key names.
fn decode_calibration(bytes: &[u8], key: &str) -> Option<CalibrationUpdate> {
    let update = decode_checked::<CalibrationUpdate>(bytes, key)?;
    if key_of_calibration(&update) != key {
        tracing::warn!("control: skipped the stored temperatures under {key}: they belong under {}", key_of_calibration(&update));
        return None;
    }
    Some(update)
}

fn decode_checked<M: Message>(bytes: &[u8], key: &str) -> Option<M> {
    match decode::<M>(bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!("control: skipped the stored value under {key}: {e}");
            None
        }
    }
}
