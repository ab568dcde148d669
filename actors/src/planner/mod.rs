//! Partition planner: answers each device's network report with the plan
//! (partition branch and p_tar) that maximises predicted accuracy within the
//! deadline-miss bound (`branchpoint_core::planner::choose`).
//!
//! Owns: the model's statistics (from the calibrated validation split), the
//! costs of each device group, and a log of what it decided (for reports).
//! Messages in: `DeviceReport` (in-process, or from NATS `NetworkReport`s
//! through the edge `nats::serve_planner_nats`). Plans go back as
//! `ApplyPlan` to the device (in-process, one round trip of the device's
//! link after the report left) or as a `DevicePlan` to its `PlanSink`
//! (over NATS: `nats::NatsPlans` stores a `PlanUpdate` under `device.<id>`
//! in the control store, `control`, which the devices watch). A report
//! from an unknown group is dropped with a message: a stray publisher must
//! not stop the planner. Restart: plans are stored when they change, and a
//! restarted planner starts from the stored ones; devices keep their last
//! plan meanwhile.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use actix::prelude::*;
use branchpoint_core::control::{Change, GroupControl};
use branchpoint_core::monitor::Observation;
use branchpoint_core::planner::{choose, CloudLoad, Costs, ModelStats, Observed, Prediction};
use branchpoint_messages::PartitionBranch;
use serde::{Deserialize, Serialize};

use crate::plans::{ApplyPlan, DevicePlan, DeviceReport, PlanSink};

pub mod nats;

/// One decision, for the run's report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanRecord {
    /// When the report was made, microseconds since the run's epoch.
    pub at_us: u64,
    pub group: String,
    pub device_id: String,
    /// The device's smoothed uplink estimate, Mbit/s.
    pub estimated_mbit_s: f64,
    pub prediction: Prediction,
}

pub struct Planner {
    stats: Arc<ModelStats>,
    /// Costs of known groups (a scenario's).
    costs: BTreeMap<String, Costs>,
    /// For devices of other groups: compute and bound from here, deadline
    /// and arrival rate from their reports.
    template: Option<Costs>,
    log: Vec<PlanRecord>,
    /// Where plans for devices out of reach in process go (over NATS:
    /// `nats::NatsPlans`, which stores them).
    sink: Option<Box<dyn PlanSink>>,
    /// The worker pool's load, and when it was heard (`PoolLoad`).
    cloud: Option<(CloudLoad, std::time::Instant)>,
    /// Each reporting device's input rate and when it reported, for the
    /// pool's share (`CloudLoad::inputs_per_s`).
    rates: DeviceRates,
    /// Under a service level (`stats` then holds only plans certified for
    /// it): what to spend least of (`planner::choose_for_level`).
    minimise: Option<branchpoint_core::guarantee::Minimise>,
    /// The adaptive policy: per group, its control loop (`core::control`),
    /// whose candidates and temperatures replace `stats` for the group.
    controls: Controls,
}

/// The control loops the planner runs, what they did, and each device's
/// last report (to re-plan a group at once when its evidence changes).
#[derive(Default)]
struct Controls {
    groups: HashMap<String, GroupControl>,
    /// Copied for each group heard of (`Planner::with_control_template`).
    template: Option<GroupControl>,
    last_reports: HashMap<String, DeviceReport>,
    log: Vec<ControlRecord>,
    refused: u64,
}

/// A change of a group's evidence, for the run's report.
#[derive(Debug, Clone)]
pub struct ControlRecord {
    pub group: String,
    pub change: Change,
}

/// An audit or an offload decided at `branch` by a device of `group`,
/// with the final exit's answer: evidence for the group's control loop.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct ControlObservation {
    pub group: String,
    pub branch: usize,
    pub observation: Observation,
}

/// The input rates of the devices heard from within `DEVICE_RATE_TTL`,
/// and their sum, kept as reports come and recomputed at each sweep (once a
/// second: a report costs O(1), not a pass over every device). Bounded:
/// beyond `MAX_RATED_DEVICES` a new id is not counted, so a flood of
/// made-up ids cannot grow the map, nor the sum without bound.
#[derive(Debug)]
struct DeviceRates {
    rates: HashMap<String, (f64, std::time::Instant)>,
    sum: f64,
    swept: Option<std::time::Instant>,
}

/// A device not heard from for this long no longer counts in the pool's
/// share: five missed reports at the devices' one a second.
pub const DEVICE_RATE_TTL: std::time::Duration = std::time::Duration::from_secs(5);

/// Most devices whose rates a planner keeps.
pub const MAX_RATED_DEVICES: usize = 1 << 18;

impl DeviceRates {
    fn new() -> Self {
        Self { rates: HashMap::new(), sum: 0.0, swept: None }
    }

    /// A device's rate heard at `now`; returns the sum over the devices
    /// heard within the TTL (as of the last sweep for the others).
    fn heard(&mut self, device_id: &str, rate: f64, now: std::time::Instant) -> f64 {
        if self.swept.is_none_or(|at| now.saturating_duration_since(at) >= std::time::Duration::from_secs(1)) {
            self.rates.retain(|_, (_, at)| now.saturating_duration_since(*at) <= DEVICE_RATE_TTL);
            self.sum = self.rates.values().map(|(r, _)| r).sum();
            self.swept = Some(now);
        }
        let rate = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
        let full = self.rates.len() >= MAX_RATED_DEVICES;
        match self.rates.get_mut(device_id) {
            Some(entry) => {
                self.sum += rate - entry.0;
                *entry = (rate, now);
            }
            None if !full => {
                self.sum += rate;
                self.rates.insert(device_id.to_string(), (rate, now));
            }
            None => {}
        }
        self.sum.max(0.0)
    }
}

/// How long a pool load stays the planner's view of the cloud: workers
/// report every second, so three missed reports mean the planner no longer
/// knows (and plans from the devices' own response times).
pub const POOL_LOAD_TTL: std::time::Duration = std::time::Duration::from_secs(3);

/// The worker pool's load now (over NATS: summed from the workers' status
/// by `nats::serve_planner_nats`).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct PoolLoad(pub CloudLoad);

impl Handler<PoolLoad> for Planner {
    type Result = ();

    fn handle(&mut self, msg: PoolLoad, _: &mut Context<Self>) {
        self.cloud = Some((msg.0, std::time::Instant::now()));
    }
}

/// Tells `planner` the load of a worker pool in this process every
/// `every`, until either stops: the requests its workers (one compute
/// thread each) hold, as the workers' statuses tell a planner over NATS
/// (`nats::serve_planner_nats`).
pub async fn watch_in_process_pool(workers: Vec<Addr<crate::worker::Batcher>>, planner: Addr<Planner>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let mut backlog = 0;
        for w in &workers {
            let Ok(stats) = w.send(crate::worker::GetWorkerStats).await else { return };
            backlog += stats.queue_depth;
        }
        let load = CloudLoad { backlog: backlog as f64, workers: workers.len().max(1) as f64, inputs_per_s: 0.0 };
        if planner.send(PoolLoad(load)).await.is_err() {
            return;
        }
    }
}

impl Planner {
    pub fn new(stats: Arc<ModelStats>, costs: BTreeMap<String, Costs>, template: Option<Costs>, sink: Option<Box<dyn PlanSink>>) -> Self {
        Self { stats, costs, template, log: Vec::new(), sink, cloud: None, rates: DeviceRates::new(), minimise: None, controls: Controls::default() }
    }

    /// Runs the adaptive policy's control loop for each of these groups
    /// (`core::control::GroupControl`): their devices are planned among the
    /// loop's candidates, at its temperatures, and every change of evidence
    /// (`ControlObservation`s) re-plans the group's devices at once. The
    /// planner is then the one writer of these groups' plans.
    pub fn with_controls(self, groups: impl IntoIterator<Item = (String, GroupControl)>) -> Self {
        Self { controls: Controls { groups: groups.into_iter().collect(), ..Controls::default() }, ..self }
    }

    /// As `with_controls`, for groups not known in advance: every group
    /// heard of (in a report or in evidence) gets a copy of `template`, up
    /// to `MAX_CONTROLLED_GROUPS`; beyond, a new group is planned without
    /// one and its evidence is refused and counted.
    pub fn with_control_template(self, template: GroupControl) -> Self {
        Self { controls: Controls { template: Some(template), ..Controls::default() }, ..self }
    }

    /// Plans under a service level: `stats` must be the candidates
    /// certified for it (`ModelStats::for_level`).
    pub fn minimising(self, minimise: branchpoint_core::guarantee::Minimise) -> Self {
        Self { minimise: Some(minimise), ..self }
    }

    fn costs_for(&self, r: &DeviceReport) -> Option<Costs> {
        if let Some(c) = self.costs.get(&r.group) {
            // The device knows the rate its inputs arrive at now, as the
            // virtual-time replay's devices do.
            return Some(Costs { arrival_rate: r.arrival_rate.filter(|a| a.is_finite() && *a >= 0.0).unwrap_or(c.arrival_rate), ..c.clone() });
        }
        let (t, deadline_us, rate) = (self.template.as_ref()?, r.deadline_us?, r.arrival_rate?);
        Some(Costs { deadline_us, arrival_rate: rate, ..t.clone() })
    }
}

/// The planner's mailbox: reports from the network wait here; beyond it a
/// report is dropped and counted (each device reports again within a
/// second, and only its latest report matters).
pub const MAILBOX: usize = 4096;

impl Actor for Planner {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX);
    }
}

/// Most groups a planner runs control loops for from a template: a flood
/// of invented group names must not grow it without bound.
pub const MAX_CONTROLLED_GROUPS: usize = 256;

impl Controls {
    /// Starts `group`'s loop from the template if it has none and there is
    /// room; whether it has one now.
    fn start(&mut self, group: &str) -> bool {
        if self.groups.contains_key(group) {
            return true;
        }
        match &self.template {
            Some(t) if self.groups.len() < MAX_CONTROLLED_GROUPS => {
                self.groups.insert(group.to_string(), t.clone());
                true
            }
            _ => false,
        }
    }
}

impl Handler<DeviceReport> for Planner {
    type Result = ();

    fn handle(&mut self, r: DeviceReport, ctx: &mut Context<Self>) {
        self.controls.start(&r.group);
        self.plan(&r, ctx);
        if self.controls.groups.contains_key(&r.group) && (self.controls.last_reports.len() < MAX_RATED_DEVICES || self.controls.last_reports.contains_key(&r.device_id)) {
            self.controls.last_reports.insert(r.device_id.clone(), r);
        }
    }
}

impl Planner {
    /// Plans the device that sent `r`, on what it reported.
    fn plan(&mut self, r: &DeviceReport, ctx: &mut Context<Self>) {
        let Some(costs) = self.costs_for(r) else {
            tracing::warn!(
                "planner: ignored a report from device {} of group {:?}: no settings for the group, and the report carries no deadline and arrival rate",
                r.device_id,
                r.group
            );
            return;
        };
        let now = std::time::Instant::now();
        // A device counts for at most the inputs its CPU can run: one
        // report cannot claim the whole pool.
        let most = 1e6 / costs.head_us.iter().copied().fold(f64::INFINITY, f64::min).max(1.0);
        let inputs_per_s = self.rates.heard(&r.device_id, r.arrival_rate.unwrap_or(costs.arrival_rate).min(most), now);
        let cloud = self.cloud.filter(|(_, at)| now.saturating_duration_since(*at) <= POOL_LOAD_TTL).map(|(load, _)| CloudLoad { inputs_per_s, ..load });
        let seen = Observed { cloud, ..r.observed };
        let (prediction, temperature) = match (self.controls.groups.get(&r.group), self.minimise) {
            (Some(control), _) => {
                let p = branchpoint_core::planner::choose_for_level(control.candidates(), &costs, &seen, control.level().minimise);
                (p, Some(control.temperature(p.plan.branch)))
            }
            (None, Some(minimise)) => (branchpoint_core::planner::choose_for_level(&self.stats, &costs, &seen, minimise), None),
            (None, None) => (choose(&self.stats, &costs, &seen), None),
        };
        self.log.push(PlanRecord { at_us: r.at_us, group: r.group.clone(), device_id: r.device_id.clone(), estimated_mbit_s: r.estimated_mbit_s, prediction });
        let partition_branch = match PartitionBranch::new(prediction.plan.branch) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!("planner: no plan for device {}: the model's statistics name {e}", r.device_id);
                return;
            }
        };
        let apply = ApplyPlan {
            partition_branch,
            p_tar: prediction.plan.p_tar,
            target_accuracy: prediction.certified.map(|t| t.accuracy),
            codec: Some(prediction.plan.codec),
            temperature,
        };
        match (&r.reply_to, &mut self.sink) {
            (Some(device), _) => {
                let device = device.clone();
                ctx.run_later(r.rtt, move |_, _| device.do_send(apply));
            }
            (None, Some(sink)) => sink.send(DevicePlan { device_id: r.device_id.clone(), plan: apply, certified: prediction.certified }),
            (None, None) => tracing::warn!("planner: no way to reach device {}", r.device_id),
        }
    }
}

impl Handler<ControlObservation> for Planner {
    type Result = ();

    fn handle(&mut self, o: ControlObservation, ctx: &mut Context<Self>) {
        if !self.controls.start(&o.group) {
            self.controls.refused += 1;
            return;
        }
        let Some(control) = self.controls.groups.get_mut(&o.group) else { return };
        let change = match control.observe(o.branch, o.observation) {
            Ok(Some(change)) => change,
            Ok(None) => return,
            Err(e) => {
                self.controls.refused += 1;
                // Said at the first and then every 1,000th.
                if self.controls.refused % 1000 == 1 {
                    tracing::warn!("planner: refused evidence for group {} ({} so far): {e}", o.group, self.controls.refused);
                }
                return;
            }
        };
        match change {
            Change::Void { branch, .. } => {
                tracing::warn!("planner: drift alarm, group {}, branch {branch}: its plans offload everything until a refit certifies new ones", o.group)
            }
            Change::Live { branch, refit } => tracing::info!(
                "planner: group {}, branch {branch} refit on {} + {} sampled inputs: temperature {:.3}, lowest certified threshold {:.3}; re-planning the group",
                o.group,
                refit.fit_inputs,
                refit.certify_inputs,
                refit.temperature,
                refit.threshold
            ),
        }
        self.controls.log.push(ControlRecord { group: o.group.clone(), change });
        let reports: Vec<DeviceReport> = self.controls.last_reports.values().filter(|r| r.group == o.group).cloned().collect();
        for r in &reports {
            self.plan(r, ctx);
        }
    }
}

/// Hands over what the control loops did, and how much evidence they
/// refused.
#[derive(Message)]
#[rtype(result = "(Vec<ControlRecord>, u64)")]
pub struct TakeControlLog;

impl Handler<TakeControlLog> for Planner {
    type Result = MessageResult<TakeControlLog>;

    fn handle(&mut self, _: TakeControlLog, _: &mut Context<Self>) -> Self::Result {
        MessageResult((std::mem::take(&mut self.controls.log), self.controls.refused))
    }
}

/// Hands over the planner's log.
#[derive(Message)]
#[rtype(result = "Vec<PlanRecord>")]
pub struct TakePlanLog;

impl Handler<TakePlanLog> for Planner {
    type Result = MessageResult<TakePlanLog>;

    fn handle(&mut self, _: TakePlanLog, _: &mut Context<Self>) -> Self::Result {
        MessageResult(std::mem::take(&mut self.log))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use branchpoint_core::planner::{Codec, OffloadBytes, Plan, ThresholdStats, DEFAULT_POOL_UTILISATION};

    use super::*;

    /// Stands in for a device: hands every plan it gets to the test.
    struct FakeDevice(tokio::sync::mpsc::UnboundedSender<(ApplyPlan, tokio::time::Instant)>);

    impl Actor for FakeDevice {
        type Context = Context<Self>;
    }

    impl Handler<ApplyPlan> for FakeDevice {
        type Result = ();

        fn handle(&mut self, plan: ApplyPlan, _: &mut Context<Self>) {
            let _ = self.0.send((plan, tokio::time::Instant::now()));
        }
    }

    /// Branch 1 weak, branch 2 better; at 0.9 branch 2 keeps 80 % on the
    /// device at 97 % accuracy.
    fn stats() -> ModelStats {
        let mk = |branch, p_tar, offload_rate, edge| ThresholdStats {
            plan: Plan { branch, p_tar, codec: Codec::F32 },
            offload_rate,
            edge_accuracy: edge,
            cloud_accuracy: 0.95,
            fallback_accuracy: 0.6,
            measured_edge_accuracy: edge,
            measured_cloud_accuracy: 0.95,
            certified: None,
        };
        ModelStats {
            candidates: vec![mk(1, 0.0, 0.0, 0.85), mk(1, 0.9, 0.4, 0.97), mk(1, 1.0, 1.0, 0.0), mk(2, 0.0, 0.0, 0.90), mk(2, 0.9, 0.2, 0.97), mk(2, 1.0, 1.0, 0.0)],
            validation_inputs: 0,
        }
    }

    /// The cameras' costs; `tail_us_per_request` empty: blind to the pool.
    fn cameras(tail_us_per_request: Vec<f64>) -> Costs {
        Costs {
            head_us: vec![2_000.0, 3_000.0],
            upload_bytes: vec![OffloadBytes::same(25_000.0), OffloadBytes::same(12_500.0)],
            deadline_us: 100_000.0,
            arrival_rate: 10.0,
            miss_bound: 0.05,
            pool_utilisation: DEFAULT_POOL_UTILISATION,
            tail_us_per_request,
        }
    }

    fn report(device: &str, group: &str, us_per_byte: f64, reply_to: Recipient<ApplyPlan>) -> DeviceReport {
        DeviceReport {
            device_id: device.into(),
            group: group.into(),
            at_us: 0,
            observed: Observed { us_per_byte, response_us: 10_000.0, cloud: None },
            estimated_mbit_s: 8.0 / us_per_byte,
            response_us: 10_000.0,
            window_us: 1_000_000,
            rtt: Duration::from_millis(40),
            reply_to: Some(reply_to),
            deadline_us: None,
            arrival_rate: None,
        }
    }

    /// The plan push in one process, without NATS: a report gets the
    /// planner's choice back one round trip after it left, a report the
    /// planner cannot plan for gets nothing, and the log holds what it
    /// decided. Paused time: the round trip costs no wall time.
    #[test]
    fn a_report_gets_its_plan_back_one_round_trip_later() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let (tx, mut plans) = tokio::sync::mpsc::unbounded_channel();
            let device = FakeDevice(tx).start().recipient();
            let costs = cameras(Vec::new());
            let planner = Planner::new(Arc::new(stats()), BTreeMap::from([("cameras".to_string(), costs)]), None, None).start();

            let sent = tokio::time::Instant::now();
            planner.do_send(report("cam-1", "cameras", 0.08, device.clone()));
            let (fast, at) = plans.recv().await.expect("a plan for the fast link");
            assert_eq!((fast.partition_branch.get(), fast.p_tar, fast.target_accuracy), (2, 0.9, None), "100 Mbit/s offloads at branch 2: {fast:?}");
            assert!(at - sent >= Duration::from_millis(40), "the plan arrives one round trip after the report: {:?}", at - sent);

            // 0.1 Mbit/s: nothing can be offloaded in time.
            planner.do_send(report("cam-1", "cameras", 80.0, device.clone()));
            let (slow, _) = plans.recv().await.expect("a plan for the slow link");
            assert_eq!((slow.partition_branch.get(), slow.p_tar), (2, 0.0), "{slow:?}");

            // A group the planner has no costs for, with no deadline in the
            // report: ignored, no plan. The log says what was decided.
            planner.do_send(report("phone-1", "phones", 0.08, device));
            let log = planner.send(TakePlanLog).await.unwrap();
            assert_eq!(log.iter().map(|r| (r.device_id.as_str(), r.prediction.plan.p_tar)).collect::<Vec<_>>(), vec![("cam-1", 0.9), ("cam-1", 0.0)]);
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(plans.try_recv().is_err(), "no plan for a report the planner cannot plan for");
        });
    }

    /// The pool's load reaches the plans: behind a backlog no offload makes
    /// its deadline, so the same report gets a device-only plan, and the
    /// plan carries the codec it was made for.
    #[test]
    fn a_swamped_pool_keeps_inputs_on_the_device() {
        actix::System::new().block_on(async {
            tokio::time::pause();
            let (tx, mut plans) = tokio::sync::mpsc::unbounded_channel();
            let device = FakeDevice(tx).start().recipient();
            let costs = cameras(vec![1_000.0, 1_000.0]);
            let planner = Planner::new(Arc::new(stats()), BTreeMap::from([("cameras".to_string(), costs)]), None, None).start();
            planner.do_send(PoolLoad(CloudLoad { backlog: 0.0, workers: 1.0, inputs_per_s: 0.0 }));
            planner.do_send(report("cam-1", "cameras", 0.08, device.clone()));
            let (idle, _) = plans.recv().await.expect("a plan");
            assert_eq!((idle.partition_branch.get(), idle.p_tar, idle.codec), (2, 0.9, Some(Codec::F32)), "{idle:?}");
            // 400 requests of 1 ms each ahead on one worker.
            planner.do_send(PoolLoad(CloudLoad { backlog: 400.0, workers: 1.0, inputs_per_s: 0.0 }));
            planner.do_send(report("cam-1", "cameras", 0.08, device));
            let (swamped, _) = plans.recv().await.expect("a plan");
            assert_eq!((swamped.partition_branch.get(), swamped.p_tar), (2, 0.0), "{swamped:?}");
        });
    }

    /// The rates the planner sums for the pool's share: each device's
    /// latest, none older than the TTL after a sweep, and a flood of new ids
    /// beyond the cap not counted.
    #[test]
    fn device_rates_sum_the_latest_of_live_devices() {
        let mut r = DeviceRates::new();
        let t0 = std::time::Instant::now();
        assert_eq!(r.heard("a", 10.0, t0), 10.0);
        assert_eq!(r.heard("b", 5.0, t0), 15.0);
        assert_eq!(r.heard("a", 2.0, t0), 7.0, "a's latest replaces its earlier rate");
        assert_eq!(r.heard("c", f64::NAN, t0), 7.0, "a rate that is no number counts as none");
        let later = t0 + DEVICE_RATE_TTL + Duration::from_secs(2);
        assert_eq!(r.heard("d", 1.0, later), 1.0, "a, b and c went quiet");
        for i in 0..MAX_RATED_DEVICES + 10 {
            r.heard(&format!("rogue-{i}"), 1.0, later);
        }
        assert_eq!(r.rates.len(), MAX_RATED_DEVICES);
        assert_eq!(r.heard("one-more", 1_000.0, later), MAX_RATED_DEVICES as f64, "beyond the cap, not counted");
    }

    /// Tails that never finish: the batcher's requests stay in its backlog.
    struct StuckTails;

    impl crate::worker::RunTails for StuckTails {
        fn run_tails(&self, _: crate::compute::RunTail) -> futures::future::LocalBoxFuture<'static, Result<crate::compute::TailOutput, crate::ActorError>> {
            Box::pin(std::future::pending())
        }
    }

    /// In one process the planner hears the batcher's backlog as it would
    /// hear the workers' status over NATS: the same report gets an
    /// offloading plan before the backlog builds and a device-only one
    /// after.
    #[test]
    fn an_in_process_pool_tells_the_planner_its_backlog() {
        use crate::worker::{Batcher, Job, ReplyTo, ServedModel, WorkerConfig};
        use branchpoint_models::net::PartitionPoint;
        actix::System::new().block_on(async {
            tokio::time::pause();
            let (tx, mut plans) = tokio::sync::mpsc::unbounded_channel();
            let device = FakeDevice(tx).start().recipient();
            // 5 ms of cloud compute per request: 40 waiting are 200 ms.
            let planner = Planner::new(Arc::new(stats()), BTreeMap::from([("cameras".to_string(), cameras(vec![5_000.0, 5_000.0]))]), None, None).start();
            let cfg = WorkerConfig { worker_id: "w".into(), max_batch: 4, max_wait: Duration::from_millis(1) };
            // The pool serves the branch the plans offload at.
            let point = |branch| PartitionPoint { branch, activation_shape: vec![2], activation_bytes: 8 };
            let points = vec![point(1), point(2)];
            let batcher = Batcher::new(cfg, StuckTails, vec![ServedModel { model_sha256: "ab".repeat(32), partition_points: points }]).with_compute_threads(1).start();
            actix::spawn(watch_in_process_pool(vec![batcher.clone()], planner.clone(), Duration::from_millis(100)));
            tokio::time::sleep(Duration::from_millis(150)).await;
            planner.do_send(report("cam-1", "cameras", 0.08, device.clone()));
            let (idle, _) = plans.recv().await.expect("a plan");
            assert_eq!((idle.partition_branch.get(), idle.p_tar), (2, 0.9), "an idle pool: {idle:?}");
            let mut replies = Vec::new();
            for seq in 0..40 {
                let (reply, rx) = tokio::sync::oneshot::channel();
                let request = crate::offload::Offload {
                    device_id: "d".into(),
                    seq,
                    partition_branch: 2,
                    shape: vec![1, 2],
                    activation: crate::offload::Activation::F32(vec![0.5, 0.5].into()),
                    deadline: branchpoint_messages::Deadline { sent_at_unix_us: 0, budget_us: 60_000_000 },
                    audit: None,
                    model_sha256: None,
                };
                batcher.send(Job { request, received: std::time::Instant::now(), reply: ReplyTo::Local(reply) }).await.unwrap();
                replies.push(rx);
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
            planner.do_send(report("cam-1", "cameras", 0.08, device));
            let (swamped, _) = plans.recv().await.expect("a plan");
            assert_eq!((swamped.partition_branch.get(), swamped.p_tar), (2, 0.0), "40 requests stuck ahead: {swamped:?}");
        });
    }
}
