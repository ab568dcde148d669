//! Control state in NATS JetStream key-value buckets: the plans devices
//! should hold and the temperatures of each model, stored durably so that a
//! restarted device, planner or calibrator resumes from them.
//!
//! Buckets (created by whoever comes first; the same settings every time):
//! - `branchpoint-plans`: key `group.<group>` or `device.<id>`, value a
//!   `PlanUpdate` (MessagePack, as on the wire). Written by the planner (per
//!   device) and the HTTP API (per group or device); watched by fleets.
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

#[derive(Clone)]
pub struct ControlStore {
    plans: kv::Store,
    calibration: kv::Store,
}

fn kv_error(what: &str, e: impl std::fmt::Display) -> ActorError {
    ActorError::Nats(format!("{what}: {e}"))
}

impl ControlStore {
    /// Opens (creating if needed) both buckets. Fails with a hint when the
    /// server has no JetStream.
    pub async fn open(client: &async_nats::Client) -> Result<Self, ActorError> {
        let js = jetstream::new(client.clone());
        let bucket = |name: &str, description: &str| kv::Config {
            bucket: name.into(),
            description: description.into(),
            // One value per key is the state; history would only be replayed.
            history: 1,
            ..Default::default()
        };
        let open = |cfg: kv::Config| {
            let js = js.clone();
            async move {
                let name = cfg.bucket.clone();
                js.create_or_update_key_value(cfg).await.map_err(|e| {
                    ActorError::Nats(format!(
                        "could not open the key-value bucket {name}: {e}; the control state needs a NATS server with JetStream \
                         (start nats-server with -js, or use `branchpoint stack up`, which does)"
                    ))
                })
            }
        };
        let plans = open(bucket(PLANS_BUCKET, "branchpoint: the plan each device group or device should hold")).await?;
        let calibration = open(bucket(CALIBRATION_BUCKET, "branchpoint: the temperatures of each model")).await?;
        Ok(Self { plans, calibration })
    }

    pub async fn put_plan(&self, plan: &PlanUpdate) -> Result<u64, ActorError> {
        let bytes = encode(plan)?;
        self.plans.put(plan_key(&plan.target), bytes.into()).await.map_err(|e| kv_error("storing a plan", e))
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
            let Some(entry) = self.plans.entry(key.clone()).await.map_err(|e| kv_error("reading a plan", e))? else { continue };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            match decode_plan(&entry.value, &key) {
                Some(value) => out.push(Stored { value, revision: entry.revision }),
                None => continue,
            }
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
            let entry = entry.map_err(|e| eprintln!("control: watching plans: {e}")).ok()?;
            (entry.operation == kv::Operation::Put).then_some(())?;
            decode_plan(&entry.value, &entry.key).map(ControlChange::Plan)
        });
        let cal = futures::stream::select(model, groups).filter_map(|entry| async move {
            let entry = entry.map_err(|e| eprintln!("control: watching temperatures: {e}")).ok()?;
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
        eprintln!("control: skipped the stored plan under {key}: it is for {:?}, whose key is {}", plan.target, plan_key(&plan.target));
        return None;
    }
    Some(plan)
}

/// Stored temperatures, if they decode, validate and are for the weights
/// and group their key names.
fn decode_calibration(bytes: &[u8], key: &str) -> Option<CalibrationUpdate> {
    let update = decode_checked::<CalibrationUpdate>(bytes, key)?;
    if key_of_calibration(&update) != key {
        eprintln!("control: skipped the stored temperatures under {key}: they belong under {}", key_of_calibration(&update));
        return None;
    }
    Some(update)
}

fn decode_checked<M: Message>(bytes: &[u8], key: &str) -> Option<M> {
    match decode::<M>(bytes) {
        Ok(m) => Some(m),
        Err(e) => {
            eprintln!("control: skipped the stored value under {key}: {e}");
            None
        }
    }
}
