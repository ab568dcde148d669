//! `/metrics`: the fleets', workers', plans' and calibrator's figures in
//! Prometheus's text format, in base units (seconds), checked by `promtool
//! check metrics` in the tests.
use std::fmt::Write as _;

use actix_web::{web, HttpResponse};
use branchpoint_messages::{FleetStatus, PlanTarget, PlanUpdate, WorkerStatus};

use super::view::ApiState;

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Writes `# HELP` and `# TYPE` once, then the samples.
struct Metrics(String);

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        match labels.is_empty() {
            true => {
                let _ = writeln!(self.0, "{name} {value}");
            }
            false => {
                let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
            }
        }
    }
}

pub(super) async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    let (fleets, workers) = state.snapshot();
    let plans = state.store.plans().await.unwrap_or_default();
    let connected = matches!(state.client.connection_state(), async_nats::connection::State::Connected);
    let mut m = Metrics(String::new());
    m.family("branchpoint_nats_connected", "gauge", "1 when the API is connected to NATS.");
    m.sample("branchpoint_nats_connected", "", f64::from(u8::from(connected)));

    fleet_metrics(&mut m, &fleets);
    plan_metrics(&mut m, &plans);
    m.family("branchpoint_api_refused_statuses_total", "counter", "Statuses the API refused (malformed, or figures that cannot be) since it started.");
    m.sample("branchpoint_api_refused_statuses_total", "", state.refused_statuses() as f64);
    m.family("branchpoint_workers", "gauge", "Workers that reported their status recently.");
    m.sample("branchpoint_workers", "", workers.len() as f64);
    worker_metrics(&mut m, &workers);
    if let Some(status) = state.calibration_status() {
        watch_metrics(&mut m, &status);
    }
    HttpResponse::Ok().content_type("text/plain; version=0.0.4; charset=utf-8").body(m.0)
}

/// The fleets' counters, exits, fallbacks, accuracy, latency and plans held.
fn fleet_metrics(m: &mut Metrics, fleets: &[(FleetStatus, f64)]) {
    let fl = |f: &FleetStatus| format!("fleet=\"{}\",group=\"{}\"", label(&f.fleet_id), label(&f.group));
    type Counter = (&'static str, &'static str, fn(&branchpoint_messages::FleetSummary) -> usize);
    let counters: [Counter; 7] = [
        ("branchpoint_inputs_total", "Inputs the fleet's devices accepted.", |s| s.inputs),
        ("branchpoint_outcomes_total", "Inputs answered (on the device, by the cloud, or by fallback).", |s| s.outcomes),
        ("branchpoint_decided_on_device_total", "Inputs answered on the device because the branch was confident enough.", |s| s.decided_on_device),
        ("branchpoint_offloads_total", "Inputs offloaded to the cloud workers.", |s| s.offloaded),
        ("branchpoint_cloud_answers_total", "Offloads answered by a cloud worker.", |s| s.answered_by_cloud),
        (
            "branchpoint_deadline_misses_total",
            "Inputs answered after their deadline, or by the branch because the cloud's answer had not come by it (the definition report.json uses).",
            |s| s.deadline_misses,
        ),
        ("branchpoint_errors_total", "Inputs the device could not decide at all.", |s| s.errors),
    ];
    m.family("branchpoint_fleet_devices", "gauge", "Devices of the fleet.");
    for (f, _) in fleets {
        m.sample("branchpoint_fleet_devices", &fl(f), f64::from(f.devices));
    }
    m.family("branchpoint_fleet_running", "gauge", "1 while the fleet runs, 0 once it has ended.");
    for (f, _) in fleets {
        m.sample("branchpoint_fleet_running", &fl(f), f64::from(u8::from(f.running)));
    }
    m.family("branchpoint_inputs_per_second", "gauge", "Inputs per second over the fleet's last two seconds of statuses.");
    for (f, rate) in fleets {
        m.sample("branchpoint_inputs_per_second", &fl(f), *rate);
    }
    for (name, help, get) in counters {
        m.family(name, "counter", help);
        for (f, _) in fleets {
            m.sample(name, &fl(f), get(&f.summary) as f64);
        }
    }
    m.family("branchpoint_exits_total", "counter", "Answers per exit: branch1, branch2, ..., final.");
    for (f, _) in fleets {
        let n = f.summary.per_exit.len();
        for (i, count) in f.summary.per_exit.iter().enumerate() {
            let exit = if i + 1 == n { "final".to_string() } else { format!("branch{}", i + 1) };
            m.sample("branchpoint_exits_total", &format!("{},exit=\"{exit}\"", fl(f)), *count as f64);
        }
    }
    m.family("branchpoint_fallbacks_total", "counter", "Offloads answered by the device's branch instead, by reason.");
    for (f, _) in fleets {
        let s = &f.summary;
        for (reason, n) in s.fallbacks_by_reason() {
            m.sample("branchpoint_fallbacks_total", &format!("{},reason=\"{reason}\"", fl(f)), n as f64);
        }
    }
    m.family("branchpoint_accuracy", "gauge", "Share of answers that were right.");
    for (f, _) in fleets {
        m.sample("branchpoint_accuracy", &fl(f), f.summary.accuracy);
    }
    m.family("branchpoint_edge_accuracy", "gauge", "Share of on-device answers that were right.");
    for (f, _) in fleets {
        if let Some(a) = f.summary.edge_accuracy {
            m.sample("branchpoint_edge_accuracy", &fl(f), a);
        }
    }
    // Base units, as Prometheus's conventions ask: the fleets count in ms.
    m.family("branchpoint_latency_seconds", "histogram", "Time from an input's arrival to its answer.");
    for (f, _) in fleets {
        for (le, c) in f.latency_le_ms.iter().zip(&f.latency_le_counts) {
            m.sample("branchpoint_latency_seconds_bucket", &format!("{},le=\"{}\"", fl(f), le / 1e3), *c as f64);
        }
        let answered = (f.summary.outcomes - f.summary.errors) as f64;
        m.sample("branchpoint_latency_seconds_bucket", &format!("{},le=\"+Inf\"", fl(f)), answered);
        m.sample("branchpoint_latency_seconds_sum", &fl(f), f.latency_sum_ms / 1e3);
        m.sample("branchpoint_latency_seconds_count", &fl(f), answered);
    }
    m.family("branchpoint_devices_on_plan", "gauge", "Devices holding this plan now, as they report it.");
    for (f, _) in fleets {
        for a in &f.applied {
            let l = format!("{},partition_branch=\"{}\",p_tar=\"{}\",temperature=\"{}\"", fl(f), a.partition_branch, a.p_tar, a.temperature);
            m.sample("branchpoint_devices_on_plan", &l, f64::from(a.devices));
        }
    }
}

/// The plans stored in the control store, per group or device.
fn plan_metrics(m: &mut Metrics, plans: &[branchpoint_actors::control::Stored<PlanUpdate>]) {
    let target = |p: &PlanUpdate| match &p.target {
        PlanTarget::Group(g) => format!("group=\"{}\"", label(g)),
        PlanTarget::Device(d) => format!("device=\"{}\"", label(d)),
    };
    m.family("branchpoint_plan_p_tar", "gauge", "Stored plan: confidence target, per group or device.");
    for p in plans {
        m.sample("branchpoint_plan_p_tar", &target(&p.value), p.value.p_tar);
    }
    m.family("branchpoint_plan_partition_branch", "gauge", "Stored plan: partition branch, per group or device.");
    for p in plans {
        m.sample("branchpoint_plan_partition_branch", &target(&p.value), f64::from(p.value.partition_branch));
    }
}

/// Each worker's latest status.
fn worker_metrics(m: &mut Metrics, workers: &[WorkerStatus]) {
    type WorkerGauge = (&'static str, &'static str, &'static str, fn(&WorkerStatus) -> f64);
    let worker_metrics: [WorkerGauge; 7] = [
        ("branchpoint_worker_queue_depth", "gauge", "Requests waiting at the worker: for a batch or for compute.", |w| f64::from(w.queue_depth)),
        ("branchpoint_worker_queue_delay_seconds", "gauge", "Mean wait for compute after batching over the last status interval.", |w| w.queue_delay_us_interval / 1e6),
        ("branchpoint_worker_batch_size", "gauge", "Mean batch size over the last status interval.", |w| w.batch_size_interval),
        ("branchpoint_worker_mean_batch_size", "gauge", "Mean batch size since the worker started.", |w| w.mean_batch_size),
        ("branchpoint_worker_requests_total", "counter", "Offload requests the worker received.", |w| w.requests as f64),
        ("branchpoint_worker_batches_total", "counter", "Batches the worker ran.", |w| w.batches_served as f64),
        ("branchpoint_worker_errors_total", "counter", "Error replies the worker sent.", |w| w.errors as f64),
    ];
    for (name, kind, help, get) in worker_metrics {
        m.family(name, kind, help);
        for w in workers {
            m.sample(name, &format!("worker=\"{}\"", label(&w.worker_id)), get(w));
        }
    }
}

/// The calibrator's live estimates, alarms and refits.
fn watch_metrics(m: &mut Metrics, status: &branchpoint_messages::CalibrationStatus) {
    m.family("branchpoint_watch_refused_total", "counter", "Audit results the calibrator refused (malformed, out of range, another model's).");
    m.sample("branchpoint_watch_refused_total", "", status.refused as f64);
    m.family("branchpoint_calibrator_drift_alarms_total", "counter", "Drift alarms the calibrator raised since it started (refits included).");
    m.sample("branchpoint_calibrator_drift_alarms_total", "", status.alarms_total as f64);
    m.family("branchpoint_calibrator_drift_refits_total", "counter", "Drift refits the calibrator made and stored since it started.");
    m.sample("branchpoint_calibrator_drift_refits_total", "", status.refits_total as f64);
    type WatchGauge = (&'static str, &'static str, &'static str, fn(&branchpoint_messages::BranchWatch) -> Option<f64>);
    let watch_metrics: [WatchGauge; 15] = [
        ("branchpoint_watch_edge_agreement", "gauge", "Live estimate of on-device agreement with the final exit (audits in the window).", |w| w.edge_agreement),
        ("branchpoint_watch_edge_agreement_low", "gauge", "Its 95 % interval, low end.", |w| w.edge_agreement_low),
        ("branchpoint_watch_edge_agreement_high", "gauge", "Its 95 % interval, high end.", |w| w.edge_agreement_high),
        ("branchpoint_watch_target_accuracy", "gauge", "The on-device accuracy the plan targets.", |w| Some(w.target_accuracy)),
        ("branchpoint_watch_offload_rate", "gauge", "Live weighted estimate of the share of inputs offloaded.", |w| w.offload_rate),
        ("branchpoint_watch_ece", "gauge", "Live weighted ECE of the branch's confidence against agreement.", |w| w.ece),
        ("branchpoint_watch_audits", "gauge", "Audits in the window of the plan in force.", |w| Some(f64::from(w.audits))),
        ("branchpoint_watch_alarms_total", "counter", "Drift alarms raised.", |w| Some(w.alarms as f64)),
        ("branchpoint_watch_refits_total", "counter", "Refits made.", |w| Some(w.refits as f64)),
        ("branchpoint_watch_edge_accuracy", "gauge", "Live estimate of on-device accuracy against true labels (audits that carry one: simulated fleets).", |w| w.edge_accuracy),
        ("branchpoint_watch_edge_accuracy_low", "gauge", "Its 95 % interval, low end.", |w| w.edge_accuracy_low),
        ("branchpoint_watch_edge_accuracy_high", "gauge", "Its 95 % interval, high end.", |w| w.edge_accuracy_high),
        ("branchpoint_watch_temperature", "gauge", "The branch's temperature for the group (a refit changes it).", |w| Some(w.temperature)),
        ("branchpoint_watch_threshold", "gauge", "The threshold the group's plan holds (a refit certifies a new one).", |w| Some(w.threshold)),
        ("branchpoint_watch_stale_results_total", "counter", "Results decided under a plan a refit had replaced (not counted in the estimates).", |w| Some(w.stale as f64)),
    ];
    for (name, kind, help, get) in watch_metrics {
        m.family(name, kind, help);
        for w in &status.watched {
            if let Some(v) = get(w) {
                m.sample(name, &format!("group=\"{}\",branch=\"{}\"", label(&w.group), w.partition_branch), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
