//! Live link emulation at a device, for real-time scenario replay: the
//! device's uploads queue on an emulated uplink (`branchpoint_core::link`)
//! and take the time the link says, on the wall clock; half the link's RTT
//! is added each way. The device keeps the same `DeviceUplink` the
//! virtual-time replay uses, so it estimates, probes, declines and reports
//! the same way, and it reports to the partition planner at an interval.
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Recipient;
use branchpoint_core::link::Link;
use branchpoint_core::planner::{DeviceUplink, LinkEstimator};
use branchpoint_core::rng::SplitMix64;

use crate::plans::DeviceReport;

/// How one device's link is emulated (sendable: devices are built on their
/// own threads from it).
#[derive(Debug, Clone)]
pub struct EmulationSpec {
    pub link: Arc<Link>,
    /// Time 0 of the link (the run's start).
    pub epoch: Instant,
    pub group: String,
    pub seed: u64,
    pub estimator: LinkEstimator,
    /// Decline offloads predicted to miss the deadline (adaptive devices).
    pub admission: bool,
    pub safety: f64,
    /// Report to the planner (adaptive devices), every interval, starting
    /// after `report_offset`: to an in-process planner, or to the NATS edge
    /// (`planner::nats::NatsReports`) that publishes for a remote one.
    pub reports: Option<Recipient<DeviceReport>>,
    pub report_interval: Duration,
    pub report_offset: Duration,
    pub probe_bytes: usize,
    /// Inputs per second arriving at the device, for its reports: `(start
    /// µs of link time, rate)` steps, ascending from 0.
    pub arrival_rates: Vec<(u64, f64)>,
}

/// A device's emulation state, on the device's thread.
pub struct Emulation {
    pub spec: EmulationSpec,
    pub uplink: Rc<RefCell<DeviceUplink>>,
    pub rng: Rc<RefCell<SplitMix64>>,
}

impl Emulation {
    pub fn new(spec: EmulationSpec) -> Self {
        Self { uplink: Rc::new(RefCell::new(DeviceUplink::new(spec.estimator))), rng: Rc::new(RefCell::new(SplitMix64::new(spec.seed))), spec }
    }

    /// Microseconds of link time at `at`.
    pub fn us(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.spec.epoch).as_micros() as u64
    }

    /// The wall-clock instant of link time `us`.
    pub fn instant(&self, us: u64) -> Instant {
        self.spec.epoch + Duration::from_micros(us)
    }

    pub fn half_rtt(&self, us: u64) -> Duration {
        Duration::from_micros(self.spec.link.rtt_us(us) / 2)
    }
}
