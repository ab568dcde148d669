//! Worker autoscaling policy: how many cloud workers to run, from the load
//! they report.
//!
//! One policy for every place workers scale: the scenario engine (virtual
//! time), and `branchpoint stack up`'s supervisor (real `branchpoint worker`
//! processes). It is a pure state machine fed one `Load` sample per tick, so
//! it is tested without timers.
//!
//! Hysteresis comes from two things: separate thresholds for "too busy" and
//! "idle", with a gap between them, and a number of consecutive ticks a
//! condition must hold before the pool changes. After every change both
//! counters restart, so the pool moves by one worker at a time and a new
//! worker gets time to take load before the next decision.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoscaleConfig {
    pub min_workers: usize,
    pub max_workers: usize,
    /// Add a worker when the mean queue delay is above this (µs) ...
    pub up_queue_delay_us: f64,
    /// ... or when more than this many requests wait per worker.
    pub up_backlog_per_worker: f64,
    /// Remove a worker only when the mean queue delay is below this (µs)
    /// and at most `down_backlog_per_worker` requests wait per worker.
    pub down_queue_delay_us: f64,
    pub down_backlog_per_worker: f64,
    /// Consecutive busy ticks before adding a worker.
    pub up_after_ticks: u32,
    /// Consecutive idle ticks before removing one.
    pub down_after_ticks: u32,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        Self {
            min_workers: 1,
            max_workers: 4,
            up_queue_delay_us: 5_000.0,
            up_backlog_per_worker: 8.0,
            down_queue_delay_us: 1_000.0,
            down_backlog_per_worker: 1.0,
            up_after_ticks: 2,
            down_after_ticks: 5,
        }
    }
}

impl AutoscaleConfig {
    /// Checks the settings; the error names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_workers == 0 {
            return Err("min_workers must be at least 1: devices need a worker to offload to".into());
        }
        if self.max_workers < self.min_workers {
            return Err(format!("max_workers {} is below min_workers {}", self.max_workers, self.min_workers));
        }
        for (name, v) in [
            ("up_queue_delay_us", self.up_queue_delay_us),
            ("up_backlog_per_worker", self.up_backlog_per_worker),
            ("down_queue_delay_us", self.down_queue_delay_us),
            ("down_backlog_per_worker", self.down_backlog_per_worker),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} {v} must be a number at least 0"));
            }
        }
        if self.down_queue_delay_us >= self.up_queue_delay_us {
            return Err(format!(
                "down_queue_delay_us {} must be below up_queue_delay_us {}: the gap is what keeps the pool from flapping",
                self.down_queue_delay_us, self.up_queue_delay_us
            ));
        }
        if self.down_backlog_per_worker >= self.up_backlog_per_worker {
            return Err(format!("down_backlog_per_worker {} must be below up_backlog_per_worker {}", self.down_backlog_per_worker, self.up_backlog_per_worker));
        }
        if self.up_after_ticks == 0 || self.down_after_ticks == 0 {
            return Err("up_after_ticks and down_after_ticks must be at least 1".into());
        }
        Ok(())
    }
}

/// What the workers reported over the last tick.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// Workers running now.
    pub workers: usize,
    /// Mean time requests waited for their batch, µs.
    pub queue_delay_us: f64,
    /// Requests waiting, over all workers.
    pub backlog: f64,
}

/// The policy's state between ticks.
#[derive(Debug, Clone)]
pub struct Autoscaler {
    cfg: AutoscaleConfig,
    busy_ticks: u32,
    idle_ticks: u32,
}

impl Autoscaler {
    pub fn new(cfg: AutoscaleConfig) -> Self {
        Self { cfg, busy_ticks: 0, idle_ticks: 0 }
    }

    pub fn config(&self) -> &AutoscaleConfig {
        &self.cfg
    }

    /// Takes one tick's load and returns how many workers should run.
    pub fn tick(&mut self, load: Load) -> usize {
        let (min, max) = (self.cfg.min_workers, self.cfg.max_workers);
        let n = load.workers;
        // Outside the bounds (at start, or after a worker died): go straight
        // back inside, without waiting for a trend.
        if n < min || n > max {
            self.busy_ticks = 0;
            self.idle_ticks = 0;
            return n.clamp(min, max);
        }
        let per_worker = load.backlog / n.max(1) as f64;
        let busy = load.queue_delay_us > self.cfg.up_queue_delay_us || per_worker > self.cfg.up_backlog_per_worker;
        let idle = load.queue_delay_us < self.cfg.down_queue_delay_us && per_worker <= self.cfg.down_backlog_per_worker;
        self.busy_ticks = if busy { self.busy_ticks + 1 } else { 0 };
        self.idle_ticks = if idle { self.idle_ticks + 1 } else { 0 };
        if self.busy_ticks >= self.cfg.up_after_ticks && n < max {
            self.busy_ticks = 0;
            self.idle_ticks = 0;
            return n + 1;
        }
        if self.idle_ticks >= self.cfg.down_after_ticks && n > min {
            self.busy_ticks = 0;
            self.idle_ticks = 0;
            return n - 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig { min_workers: 1, max_workers: 3, up_after_ticks: 2, down_after_ticks: 3, ..AutoscaleConfig::default() }
    }

    fn load(workers: usize, queue_delay_us: f64, backlog: f64) -> Load {
        Load { workers, queue_delay_us, backlog }
    }

    #[test]
    fn scales_up_after_consecutive_busy_ticks_and_stops_at_max() {
        let mut a = Autoscaler::new(cfg());
        assert_eq!(a.tick(load(1, 20_000.0, 0.0)), 1, "one busy tick is not a trend");
        assert_eq!(a.tick(load(1, 20_000.0, 0.0)), 2);
        assert_eq!(a.tick(load(2, 20_000.0, 0.0)), 2, "the counter restarts after a change");
        assert_eq!(a.tick(load(2, 20_000.0, 0.0)), 3);
        for _ in 0..5 {
            assert_eq!(a.tick(load(3, 20_000.0, 100.0)), 3, "never above max_workers");
        }
    }

    #[test]
    fn backlog_alone_counts_as_busy() {
        let mut a = Autoscaler::new(cfg());
        a.tick(load(2, 0.0, 40.0));
        assert_eq!(a.tick(load(2, 0.0, 40.0)), 3);
    }

    #[test]
    fn scales_down_only_after_a_longer_idle_run_and_stops_at_min() {
        let mut a = Autoscaler::new(cfg());
        assert_eq!(a.tick(load(3, 0.0, 0.0)), 3);
        assert_eq!(a.tick(load(3, 0.0, 0.0)), 3);
        assert_eq!(a.tick(load(3, 0.0, 0.0)), 2);
        for _ in 0..3 {
            a.tick(load(2, 0.0, 0.0));
        }
        for _ in 0..10 {
            assert_eq!(a.tick(load(1, 0.0, 0.0)), 1, "never below min_workers");
        }
    }

    #[test]
    fn load_between_the_thresholds_holds_the_pool() {
        // 3 ms: below the up threshold (5 ms), above the down one (1 ms).
        let mut a = Autoscaler::new(cfg());
        for _ in 0..20 {
            assert_eq!(a.tick(load(2, 3_000.0, 2.0)), 2);
        }
    }

    #[test]
    fn a_busy_tick_interrupts_an_idle_run() {
        let mut a = Autoscaler::new(cfg());
        a.tick(load(2, 0.0, 0.0));
        a.tick(load(2, 0.0, 0.0));
        a.tick(load(2, 20_000.0, 0.0));
        assert_eq!(a.tick(load(2, 0.0, 0.0)), 2, "the idle run started again");
        assert_eq!(a.tick(load(2, 0.0, 0.0)), 2);
        assert_eq!(a.tick(load(2, 0.0, 0.0)), 1);
    }

    #[test]
    fn out_of_bounds_pools_are_brought_back_at_once() {
        let mut a = Autoscaler::new(cfg());
        assert_eq!(a.tick(load(0, 0.0, 0.0)), 1);
        assert_eq!(a.tick(load(7, 0.0, 0.0)), 3);
    }

    #[test]
    fn validation_names_the_bad_setting() {
        let bad = AutoscaleConfig { min_workers: 0, ..cfg() };
        assert!(bad.validate().unwrap_err().contains("min_workers"));
        let bad = AutoscaleConfig { max_workers: 0, min_workers: 2, ..cfg() };
        assert!(bad.validate().unwrap_err().contains("max_workers"));
        let bad = AutoscaleConfig { down_queue_delay_us: 9_000.0, ..cfg() };
        assert!(bad.validate().unwrap_err().contains("down_queue_delay_us"));
        let bad = AutoscaleConfig { up_queue_delay_us: f64::NAN, ..cfg() };
        assert!(bad.validate().unwrap_err().contains("up_queue_delay_us"));
        assert!(cfg().validate().is_ok());
    }
}
