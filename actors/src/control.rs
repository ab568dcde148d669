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
//!   `CalibrationUpdate`. Written by the calibrator; read by fleets at start
//!   and watched while they run, read by the HTTP API.
//!
//! Values are validated when read like any message off the network: a bad
//! entry is reported and skipped, never applied.
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
            match decode_checked::<PlanUpdate>(&entry.value, &key) {
                Some(value) => out.push(Stored { value, revision: entry.revision }),
                None => continue,
            }
        }
        Ok(out)
    }

    pub async fn put_calibration(&self, update: &CalibrationUpdate) -> Result<u64, ActorError> {
        let bytes = encode(update)?;
        self.calibration
            .put(calibration_key(&update.model_sha256), bytes.into())
            .await
            .map_err(|e| kv_error("storing temperatures", e))
    }

    pub async fn calibration(&self, model_sha256: &str) -> Result<Option<Stored<CalibrationUpdate>>, ActorError> {
        let key = calibration_key(model_sha256);
        let Some(entry) = self.calibration.entry(key.clone()).await.map_err(|e| kv_error("reading temperatures", e))? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(decode_checked::<CalibrationUpdate>(&entry.value, &key).map(|value| Stored { value, revision: entry.revision }))
    }

    /// Every plan and this model's temperatures: first the stored ones (so a
    /// device that starts late resumes from them), then each change as it is
    /// written. Bad entries are reported on stderr and skipped.
    pub async fn watch(&self, model_sha256: &str) -> Result<impl futures::Stream<Item = ControlChange> + Unpin, ActorError> {
        let plans = self.plans.watch_with_history(">").await.map_err(|e| kv_error("watching plans", e))?;
        let cal = self
            .calibration
            .watch_with_history(calibration_key(model_sha256))
            .await
            .map_err(|e| kv_error("watching temperatures", e))?;
        let plans = plans.filter_map(|entry| async move {
            let entry = entry.map_err(|e| eprintln!("control: watching plans: {e}")).ok()?;
            (entry.operation == kv::Operation::Put).then_some(())?;
            decode_checked::<PlanUpdate>(&entry.value, &entry.key).map(ControlChange::Plan)
        });
        let cal = cal.filter_map(|entry| async move {
            let entry = entry.map_err(|e| eprintln!("control: watching temperatures: {e}")).ok()?;
            (entry.operation == kv::Operation::Put).then_some(())?;
            decode_checked::<CalibrationUpdate>(&entry.value, &entry.key).map(ControlChange::Calibration)
        });
        Ok(Box::pin(futures::stream::select(plans, cal)))
    }
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
