//! The calibrator's NATS edge: requests in (temperatures, refits,
//! certified thresholds) and audit results in, decoded for the
//! `CalibratorHandle`; temperatures, statuses and error replies out; and
//! what it stores in the control store (temperatures, drift refits, plans
//! certified again).
use branchpoint_core::calibration::CalibrationFile;
use branchpoint_messages::{decode, encode, subjects, CalibrationRefit, CalibrationUpdate, CertifyRequest, ErrorKind, ErrorReply, PlanTarget, PlanUpdate};
use futures::StreamExt;

use super::{method_of, to_update, CalibratorHandle, GroupRefit, WatchOutcome};
use crate::error::ActorError;

/// Certifies every stored certified group plan again on the calibrator's
/// current temperatures, and stores those whose threshold moved (devices
/// follow the store). Devices' plans are the planner's to write, never the
/// calibrator's. A plan another writer replaced meanwhile is left as that
/// writer stored it. Returns how many moved.
pub async fn recertify_stored_plans(calibrator: &CalibratorHandle, store: &crate::control::ControlStore) -> Result<usize, ActorError> {
    let mut moved = 0;
    for stored in store.plans().await? {
        let plan = stored.value;
        let (PlanTarget::Group(group), Some(target)) = (&plan.target, plan.certified) else { continue };
        let reply = calibrator.certify(plan.partition_branch, target).await?;
        if reply.p_tar() != plan.p_tar {
            let group = group.clone();
            // Certified on the model's new temperatures, which the devices
            // take from the model's calibration: the plan names none.
            match store.replace_plan(&PlanUpdate { p_tar: reply.p_tar(), temperature: None, ..plan }, stored.revision).await? {
                Some(_) => moved += 1,
                None => tracing::info!("calibrator: the plan of group {group} changed while it was certified again; the new one stands"),
            }
        }
    }
    Ok(moved)
}

/// Stores a group's refit: its temperatures first, then its certified plan
/// (a device that has applied the first but not yet the second offloads
/// more, not less). The group's devices follow the store.
async fn store_refit(store: &crate::control::ControlStore, calibrator: &CalibratorHandle, r: &GroupRefit) {
    let current = match calibrator.current().await {
        Ok(c) => c,
        Err(e) => return tracing::warn!("calibrator: could not store the refit for group {}: {e}", r.group),
    };
    let update = CalibrationUpdate { temperatures: r.temperatures.clone(), group: Some(r.group.clone()), ..to_update(&current) };
    // The refit changes the threshold of the plan in force: that plan as it
    // is stored (its codec kept), unless it was replaced meanwhile by one on
    // another branch, which the refit says nothing about.
    let stored = async {
        let current = store.plan(&r.plan.target).await?;
        if current.as_ref().is_some_and(|c| c.value.partition_branch != r.plan.partition_branch) {
            return Ok(false);
        }
        let (plan, revision) = match current {
            Some(c) => (PlanUpdate { p_tar: r.plan.p_tar, certified: r.plan.certified, temperature: r.plan.temperature, ..c.value }, c.revision),
            None => (r.plan.clone(), 0),
        };
        store.put_calibration(&update).await?;
        Ok::<_, ActorError>(store.replace_plan(&plan, revision).await?.is_some())
    };
    match stored.await {
        Ok(false) => tracing::info!("calibrator: group {}'s plan changed while its refit was made; the new plan stands and the refit is not stored", r.group),
        Ok(true) => tracing::info!(
            group = %r.group,
            partition_branch = r.partition_branch,
            temperature = r.refit.temperature,
            threshold = r.refit.threshold,
            "calibrator: drift refit for group {}, branch {}: temperature {:.3}, threshold {:.3} certified for on-device accuracy {} (delta {}), from {} + {} sampled inputs; stored for the group's devices",
            r.group,
            r.partition_branch,
            r.refit.temperature,
            r.refit.threshold,
            r.plan.certified.map_or(f64::NAN, |c| c.accuracy),
            r.plan.certified.map_or(f64::NAN, |c| c.delta),
            r.refit.fit_inputs,
            r.refit.certify_inputs,
        ),
        Err(e) => tracing::warn!("calibrator: could not store the refit for group {}: {e}", r.group),
    }
}

/// Resumes the groups' drift refits from the store; without a store,
/// alarms cannot refit (refits reach devices only through it).
async fn resume_watch(calibrator: &CalibratorHandle, store: Option<&crate::control::ControlStore>, initial: &CalibrationFile) -> Result<(), ActorError> {
    match store {
        Some(store) => {
            let groups = store.calibrations(&initial.model_sha256).await?;
            let groups: Vec<(String, Vec<f64>)> = groups.into_iter().filter_map(|s| Some((s.value.group?, s.value.temperatures))).collect();
            if !groups.is_empty() {
                tracing::info!("calibrator: resuming the drift refits of {} group(s)", groups.len());
            }
            calibrator.resume_groups(groups).await?;
        }
        None => {
            if calibrator.watch_settings().await?.auto_refit {
                tracing::warn!("calibrator: drift alarms will not refit: refits reach devices through the control store, which needs JetStream");
                calibrator.alarms_only().await?;
            }
        }
    }
    Ok(())
}

/// After an operator's refit of the whole model: its temperatures replace
/// every group's, and the stored certified plans are certified again.
async fn after_model_refit(calibrator: &CalibratorHandle, store: &crate::control::ControlStore) -> Result<(), ActorError> {
    // The model's new temperatures replace every group's.
    match store.delete_group_calibrations(&calibrator.current().await?.model_sha256).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("calibrator: the refit replaces the drift refits of {n} group(s)"),
        Err(e) => tracing::warn!("calibrator: could not remove the groups' refit temperatures: {e}"),
    }
    match recertify_stored_plans(calibrator, store).await {
        Ok(0) => {}
        Ok(n) => tracing::info!("calibrator: {n} certified plan(s) certified again on the new temperatures"),
        Err(e) => tracing::warn!("calibrator: could not certify the stored plans again: {e}"),
    }
    Ok(())
}

/// One audit result (`None`: undecodable) into the watch; a drift refit is
/// stored for the group's devices.
async fn on_audit(calibrator: &CalibratorHandle, store: Option<&crate::control::ControlStore>, result: Option<branchpoint_messages::AuditResult>) -> Result<(), ActorError> {
    match calibrator.audit(result).await {
        Ok(WatchOutcome::Refit(refit)) => match store {
            Some(store) => store_refit(store, calibrator, &refit).await,
            None => tracing::warn!("calibrator: a refit for group {} was computed but cannot be stored (no control store)", refit.group),
        },
        Ok(WatchOutcome::Alarm { group, partition_branch }) => tracing::warn!(
            group = %group,
            partition_branch,
            "calibrator: drift alarm: group {group}, branch {partition_branch}: on-device agreement with the final exit fell below its target{}",
            if calibrator.watch_settings().await?.auto_refit { "; refitting once enough sampled inputs have arrived" } else { " (automatic refits are off)" }
        ),
        Ok(WatchOutcome::Quiet | WatchOutcome::Stale) => {}
        // Refused and counted; the status says how many.
        Err(_) => {}
    }
    Ok(())
}

/// Serves the calibration actor on NATS: publishes the current temperatures
/// on `CALIBRATION_UPDATE` (and stores them in the control store, when there
/// is one) at start and after every refit, answers `CALIBRATION_GET` with
/// them, `CALIBRATION_REFIT` with the new ones and `CALIBRATION_CERTIFY`
/// with a `CertifyReply` (or an `ErrorReply` when the request is malformed
/// or the fit fails). After a refit, stored certified plans are certified
/// again on the new temperatures. Audit results on `CALIBRATION_AUDIT` feed
/// the live monitors (`LiveWatch`), whose estimates and alarms go out every
/// second on `CALIBRATION_STATUS`; a drift refit is stored for the group's
/// devices (its temperatures and certified plan), and an operator's refit
/// of the whole model removes the groups' refit temperatures.
pub async fn serve_calibration_nats(
    client: async_nats::Client,
    calibrator: CalibratorHandle,
    store: Option<crate::control::ControlStore>,
    on_ready: impl FnOnce(),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ActorError> {
    let nats = |e: String| ActorError::Nats(e);
    let mut get = client.subscribe(subjects::CALIBRATION_GET).await.map_err(|e| nats(e.to_string()))?;
    let mut refit = client.subscribe(subjects::CALIBRATION_REFIT).await.map_err(|e| nats(e.to_string()))?;
    let mut certify = client.subscribe(subjects::CALIBRATION_CERTIFY).await.map_err(|e| nats(e.to_string()))?;
    // Audit results: the client's subscription buffer is bounded; a burst
    // beyond it is dropped by the client (a slow consumer), never queued
    // without end.
    let mut audits = client.subscribe(subjects::CALIBRATION_AUDIT).await.map_err(|e| nats(e.to_string()))?;
    let mut status_tick = tokio::time::interval(std::time::Duration::from_secs(1));
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let refused = |e: ActorError| encode(&ErrorReply { seq: None, worker_id: "calibrator".into(), kind: ErrorKind::InvalidRequest, detail: e.to_string() });
    let publish = |file: CalibrationFile| {
        let (client, store) = (client.clone(), store.clone());
        async move {
            let update = to_update(&file);
            // Stored first: a device that starts after this sees it.
            if let Some(store) = &store {
                store.put_calibration(&update).await?;
            }
            let bytes = encode(&update)?;
            client.publish(subjects::CALIBRATION_UPDATE, bytes.clone().into()).await.map_err(|e| nats(e.to_string()))?;
            Ok::<_, ActorError>(bytes)
        }
    };
    let initial = calibrator.current().await?;
    resume_watch(&calibrator, store.as_ref(), &initial).await?;
    publish(initial).await?;
    client.flush().await.map_err(|e| nats(e.to_string()))?;
    on_ready();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            // A message being handled is handled to the end: shutdown is
            // seen only between messages.
            _ = &mut shutdown => return Ok(()),
            Some(msg) = get.next() => {
                if let Some(reply) = msg.reply {
                    let bytes = encode(&to_update(&calibrator.current().await?))?;
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            Some(msg) = refit.next() => {
                let result = match decode::<CalibrationRefit>(&msg.payload) {
                    Ok(r) => match calibrator.refit(method_of(r.method)).await {
                        Ok(file) => publish(file).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e.into()),
                };
                if let (Ok(_), Some(store)) = (&result, &store) {
                    after_model_refit(&calibrator, store).await?;
                }
                if let Some(reply) = msg.reply {
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => refused(e)?,
                    };
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            Some(msg) = audits.next() => {
                on_audit(&calibrator, store.as_ref(), decode::<branchpoint_messages::AuditResult>(&msg.payload).ok()).await?;
            }
            _ = status_tick.tick() => {
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
                let status = calibrator.watch_status(now).await?;
                if !status.watched.is_empty() || status.refused > 0 {
                    let _ = client.publish(subjects::CALIBRATION_STATUS, encode(&status)?.into()).await;
                }
            }
            Some(msg) = certify.next() => {
                let result = match decode::<CertifyRequest>(&msg.payload) {
                    Ok(r) => calibrator.certify(r.partition_branch, r.target).await.and_then(|reply| Ok(encode(&reply)?)),
                    Err(e) => Err(e.into()),
                };
                if let Some(reply) = msg.reply {
                    let bytes = match result {
                        Ok(bytes) => bytes,
                        Err(e) => refused(e)?,
                    };
                    let _ = client.publish(reply, bytes.into()).await;
                }
            }
            else => return Ok(()),
        }
    }
}
