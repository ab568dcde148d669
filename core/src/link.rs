//! Uplink emulation: how long S bytes take to cross a device's uplink when
//! sent at time t, for a constant link, a schedule of constant links, or a
//! recorded Mahimahi trace.
//!
//! Times are microseconds since the start of a run. A link has a capacity
//! that changes over time and a round-trip time (RTT); loss is optional.
//!
//! - Constant and schedule links are fluid: the sender gets the link's rate
//!   while a segment lasts; a transfer that spans segments gets each
//!   segment's rate in turn (a segment of rate 0 is an outage).
//! - Trace links follow the Mahimahi `mm-link` format: each line is one
//!   delivery opportunity for one 1500-byte packet at that millisecond; the
//!   trace repeats from the start when it ends (its last timestamp is the
//!   period). A transfer of S bytes takes ceil(S / 1500) opportunities, the
//!   first at or after t; it ends at the last one's millisecond.
//! - Loss (probability per packet): a lost packet is sent again after one
//!   RTT, behind whatever is left of the transfer; the draw uses the
//!   caller's random source, so a seeded run is reproducible.
//!
//! Replies from the cloud are a few hundred bytes: the downlink is modelled
//! as propagation only (half the RTT), which at any rate above 1 Mbit/s is
//! within 1 ms of the truth.
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};
use crate::rng::SplitMix64;

pub const PACKET_BYTES: usize = 1500;

/// One constant stretch of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// Start, in microseconds since the start of the run.
    pub at_us: u64,
    pub uplink_mbit_s: f64,
    pub rtt_us: u64,
    pub loss: f64,
}

#[derive(Debug, Clone)]
enum Capacity {
    /// Ordered by `at_us`, the first at 0; the last lasts forever.
    Segments(Vec<Segment>),
    Trace {
        opportunities_ms: Vec<u64>,
        period_ms: u64,
        rtt_us: u64,
        loss: f64,
        path: PathBuf,
    },
}

/// A device's uplink.
#[derive(Debug, Clone)]
pub struct Link {
    capacity: Capacity,
}

impl Link {
    pub fn constant(uplink_mbit_s: f64, rtt_us: u64, loss: f64) -> Result<Self> {
        Self::schedule(vec![Segment { at_us: 0, uplink_mbit_s, rtt_us, loss }])
    }

    /// A schedule of constant links. The first segment must start at 0.
    pub fn schedule(segments: Vec<Segment>) -> Result<Self> {
        let bad = |reason: String| Err(CoreError::InvalidArgument { what: "link schedule".into(), reason });
        if segments.first().map(|s| s.at_us) != Some(0) {
            return bad("the first segment must start at 0 s".into());
        }
        for w in segments.windows(2) {
            if w[1].at_us <= w[0].at_us {
                return bad(format!("segment times must increase; {} s follows {} s", w[1].at_us as f64 / 1e6, w[0].at_us as f64 / 1e6));
            }
        }
        for s in &segments {
            check_rate(s.uplink_mbit_s, true)?;
            check_loss(s.loss)?;
        }
        Ok(Self { capacity: Capacity::Segments(segments) })
    }

    /// Reads a Mahimahi trace. Errors name the file and the line.
    pub fn trace(path: &Path, rtt_us: u64, loss: f64) -> Result<Self> {
        check_loss(loss)?;
        let text = std::fs::read_to_string(path).map_err(|error| CoreError::Io { action: "read", path: path.to_path_buf(), error })?;
        let corrupt = |reason: String| CoreError::CorruptFile {
            path: path.to_path_buf(),
            what: "Mahimahi trace".into(),
            reason,
            hint: "each line must be one integer, a millisecond timestamp, never decreasing (see ../shared/traces/README.md)".into(),
        };
        let mut opportunities_ms = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let t: u64 = line.parse().map_err(|_| corrupt(format!("line {}: {line:?} is not a whole number of milliseconds", n + 1)))?;
            if opportunities_ms.last().is_some_and(|&last| t < last) {
                return Err(corrupt(format!("line {}: {t} ms comes after {} ms", n + 1, opportunities_ms.last().unwrap())));
            }
            opportunities_ms.push(t);
        }
        let period_ms = match opportunities_ms.last() {
            Some(&last) if last > 0 => last,
            _ => return Err(corrupt("it has no opportunity after 0 ms".into())),
        };
        Ok(Self { capacity: Capacity::Trace { opportunities_ms, period_ms, rtt_us, loss, path: path.to_path_buf() } })
    }

    /// The trace file this link replays, if it is a trace.
    pub fn trace_path(&self) -> Option<&Path> {
        match &self.capacity {
            Capacity::Trace { path, .. } => Some(path),
            Capacity::Segments(_) => None,
        }
    }

    pub fn rtt_us(&self, t_us: u64) -> u64 {
        match &self.capacity {
            Capacity::Segments(s) => segment_at(s, t_us).rtt_us,
            Capacity::Trace { rtt_us, .. } => *rtt_us,
        }
    }

    fn loss(&self, t_us: u64) -> f64 {
        match &self.capacity {
            Capacity::Segments(s) => segment_at(s, t_us).loss,
            Capacity::Trace { loss, .. } => *loss,
        }
    }

    /// When the last byte of `bytes` sent from `start_us` has crossed the
    /// uplink (propagation not included). `None` if it never does (the link
    /// ends in an outage).
    pub fn transmit(&self, start_us: u64, bytes: usize, rng: &mut SplitMix64) -> Option<u64> {
        let packets = bytes.div_ceil(PACKET_BYTES).max(1);
        let mut t = start_us;
        let mut left = packets;
        // Each round sends what is left; lost packets go again one RTT later.
        for _ in 0..64 {
            let loss = self.loss(t);
            let lost = if loss > 0.0 { (0..left).filter(|_| rng.next_f64() < loss).count() } else { 0 };
            t = self.send_packets(t, left, if left == packets { bytes } else { left * PACKET_BYTES })?;
            if lost == 0 {
                return Some(t);
            }
            left = lost;
            t += self.rtt_us(t);
        }
        Some(t)
    }

    fn send_packets(&self, start_us: u64, packets: usize, bytes: usize) -> Option<u64> {
        match &self.capacity {
            Capacity::Segments(segs) => fluid_transfer(segs, start_us, bytes as f64 * 8.0),
            Capacity::Trace { opportunities_ms: o, period_ms: p, .. } => {
                // Opportunity n (counting across repeats) is at
                // (n / L) * P + o[n % L] ms, with L lines and period P. Find
                // the first at or after the start, then take `packets` of
                // them in a row.
                let (lines, p) = (o.len() as u64, *p);
                let start_ms = start_us.div_ceil(1000);
                let (cycle, within) = (start_ms / p, start_ms % p);
                // The previous repeat's last line (at P) falls on this
                // repeat's 0 ms.
                let prev = if cycle > 0 { o.partition_point(|&x| x < within + p) as u64 } else { lines };
                let first = if prev < lines { (cycle - 1) * lines + prev } else { cycle * lines + o.partition_point(|&x| x < within) as u64 };
                let last = first + packets as u64 - 1;
                Some(((last / lines) * p + o[(last % lines) as usize]) * 1000)
            }
        }
    }

    /// Mean capacity over [from, to), in Mbit/s, for plots and reports.
    pub fn mean_capacity_mbit_s(&self, from_us: u64, to_us: u64) -> f64 {
        if to_us <= from_us {
            return 0.0;
        }
        match &self.capacity {
            Capacity::Segments(segs) => {
                let mut bits = 0.0;
                for (i, s) in segs.iter().enumerate() {
                    let end = segs.get(i + 1).map_or(u64::MAX, |n| n.at_us);
                    let (a, b) = (s.at_us.max(from_us), end.min(to_us));
                    if b > a {
                        bits += s.uplink_mbit_s * (b - a) as f64;
                    }
                }
                bits / (to_us - from_us) as f64
            }
            Capacity::Trace { opportunities_ms: o, period_ms: p, .. } => {
                // Opportunities at or before t_ms (see `send_packets`).
                let count_until = |t_ms: u64| -> u64 { (t_ms / p) * o.len() as u64 + o.partition_point(|&x| x <= t_ms % p) as u64 };
                let n = count_until(to_us / 1000) - count_until(from_us / 1000);
                (n as f64 * PACKET_BYTES as f64 * 8.0) / (to_us - from_us) as f64
            }
        }
    }
}

/// Settings of a synthetic cellular uplink: a two-state (good / bad)
/// Markov chain with exponential holding times; in each state delivery
/// opportunities arrive as a Poisson process at the state's rate, and a bad
/// period is an outage (no opportunity at all) with probability `outage`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticTrace {
    pub seed: u64,
    pub duration_s: f64,
    pub good_mbit_s: f64,
    pub bad_mbit_s: f64,
    pub mean_good_s: f64,
    pub mean_bad_s: f64,
    pub outage: f64,
}

impl SyntheticTrace {
    /// The trace in Mahimahi format: one millisecond timestamp per line.
    pub fn generate(&self) -> Result<String> {
        for (what, v) in [("duration_s", self.duration_s), ("mean_good_s", self.mean_good_s), ("mean_bad_s", self.mean_bad_s), ("good_mbit_s", self.good_mbit_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(CoreError::InvalidArgument { what: what.into(), reason: format!("{v} must be positive") });
            }
        }
        check_rate(self.bad_mbit_s, true)?;
        if !(0.0..=1.0).contains(&self.outage) {
            return Err(CoreError::InvalidArgument { what: "outage".into(), reason: format!("{} must be a probability in [0, 1]", self.outage) });
        }
        let mut rng = SplitMix64::new(self.seed);
        let end_ms = (self.duration_s * 1e3).round() as u64;
        let per_ms = |mbit: f64| mbit * 1e3 / (PACKET_BYTES as f64 * 8.0);
        let mut out = String::new();
        let (mut t_ms, mut good) = (0.0f64, true);
        let mut last = 0;
        while t_ms < end_ms as f64 {
            let hold = rng.exponential(1.0 / if good { self.mean_good_s } else { self.mean_bad_s }) * 1e3;
            let until = (t_ms + hold).min(end_ms as f64);
            let rate = if good {
                per_ms(self.good_mbit_s)
            } else if rng.next_f64() < self.outage {
                0.0
            } else {
                per_ms(self.bad_mbit_s)
            };
            if rate > 0.0 {
                let mut at = t_ms + rng.exponential(rate);
                while at < until {
                    last = (at.floor() as u64).max(1);
                    out.push_str(&format!("{last}\n"));
                    at += rng.exponential(rate);
                }
            }
            t_ms = until;
            good = !good;
        }
        // The last line is the period: end exactly at the duration.
        if last < end_ms {
            out.push_str(&format!("{end_ms}\n"));
        }
        Ok(out)
    }
}

fn segment_at(segs: &[Segment], t_us: u64) -> &Segment {
    &segs[segs.partition_point(|s| s.at_us <= t_us).saturating_sub(1)]
}

/// Fluid transfer of `bits` from `start_us` across constant segments.
fn fluid_transfer(segs: &[Segment], start_us: u64, bits: f64) -> Option<u64> {
    let mut i = segs.partition_point(|s| s.at_us <= start_us).saturating_sub(1);
    let mut t = start_us as f64;
    let mut left = bits;
    loop {
        let rate_bits_per_us = segs[i].uplink_mbit_s; // Mbit/s == bit/us
        let end = segs.get(i + 1).map(|n| n.at_us as f64);
        if rate_bits_per_us > 0.0 {
            let done = t + left / rate_bits_per_us;
            match end {
                Some(e) if done > e => {
                    left -= (e - t) * rate_bits_per_us;
                }
                _ => return Some(done.ceil() as u64),
            }
        } else if end.is_none() {
            return None;
        }
        t = end.expect("a later segment exists");
        i += 1;
    }
}

fn check_rate(r: f64, zero_ok: bool) -> Result<()> {
    if !(r.is_finite() && (r > 0.0 || (zero_ok && r == 0.0))) {
        return Err(CoreError::InvalidArgument { what: "uplink_mbit_s".into(), reason: format!("{r} must be a finite rate in Mbit/s, at least 0") });
    }
    Ok(())
}

fn check_loss(loss: f64) -> Result<()> {
    if !(0.0..1.0).contains(&loss) {
        return Err(CoreError::InvalidArgument { what: "loss".into(), reason: format!("{loss} must be a probability in [0, 1)") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng() -> SplitMix64 {
        SplitMix64::new(7)
    }

    #[test]
    fn constant_link_takes_bytes_over_rate() {
        let l = Link::constant(8.0, 20_000, 0.0).unwrap();
        // 10,000 bytes = 80,000 bits at 8 bit/us = 10 ms.
        assert_eq!(l.transmit(1_000, 10_000, &mut rng()), Some(11_000));
        assert_eq!(l.rtt_us(5), 20_000);
    }

    #[test]
    fn schedule_spans_segments_and_outages() {
        let segs = vec![
            Segment { at_us: 0, uplink_mbit_s: 8.0, rtt_us: 10_000, loss: 0.0 },
            Segment { at_us: 5_000, uplink_mbit_s: 0.0, rtt_us: 10_000, loss: 0.0 },
            Segment { at_us: 20_000, uplink_mbit_s: 4.0, rtt_us: 50_000, loss: 0.0 },
        ];
        let l = Link::schedule(segs).unwrap();
        // 80,000 bits: 40,000 by 5 ms, nothing until 20 ms, then 40,000 at 4 bit/us = 10 ms.
        assert_eq!(l.transmit(0, 10_000, &mut rng()), Some(30_000));
        assert_eq!(l.rtt_us(25_000), 50_000);
        assert!((l.mean_capacity_mbit_s(0, 20_000) - 2.0).abs() < 1e-9);
        let dead = Link::schedule(vec![Segment { at_us: 0, uplink_mbit_s: 0.0, rtt_us: 0, loss: 0.0 }]).unwrap();
        assert_eq!(dead.transmit(0, 10, &mut rng()), None);
    }

    #[test]
    fn trace_uses_opportunities_and_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.up");
        // Period 10 ms: opportunities at 2, 2, 5 and 10 ms.
        std::fs::write(&p, "2\n2\n5\n10\n").unwrap();
        let l = Link::trace(&p, 40_000, 0.0).unwrap();
        // One packet at t=0: the first opportunity, 2 ms.
        assert_eq!(l.transmit(0, 1, &mut rng()), Some(2_000));
        // Three packets from 3 ms: 5, 10, then 12 (2 ms of the next period).
        assert_eq!(l.transmit(3_000, 3 * PACKET_BYTES, &mut rng()), Some(12_000));
        // Five packets from 0: 2, 2, 5, 10, 12.
        assert_eq!(l.transmit(0, 5 * PACKET_BYTES, &mut rng()), Some(12_000));
        // 4 opportunities per 10 ms = 4.8 Mbit/s.
        assert!((l.mean_capacity_mbit_s(0, 1_000_000) - 4.8).abs() < 1e-9);
    }

    #[test]
    fn a_fixed_trace_of_one_line_is_12_mbit_s() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.up");
        std::fs::write(&p, "1\n").unwrap();
        let l = Link::trace(&p, 0, 0.0).unwrap();
        assert!((l.mean_capacity_mbit_s(0, 10_000_000) - 12.0).abs() < 1e-9);
        // 10 packets from 0.5 ms: 1, 2, ..., 10 ms.
        assert_eq!(l.transmit(500, 10 * PACKET_BYTES, &mut rng()), Some(10_000));
    }

    #[test]
    fn bad_traces_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.up");
        std::fs::write(&p, "1\n2\nx\n").unwrap();
        let e = Link::trace(&p, 0, 0.0).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("t.up"), "{e}");
        std::fs::write(&p, "5\n3\n").unwrap();
        assert!(Link::trace(&p, 0, 0.0).unwrap_err().to_string().contains("line 2"));
        let e = Link::trace(&dir.path().join("missing.up"), 0, 0.0).unwrap_err().to_string();
        assert!(e.contains("missing.up"), "{e}");
    }

    #[test]
    fn synthetic_traces_are_reproducible_and_near_their_rates() {
        let cfg = SyntheticTrace { seed: 1, duration_s: 600.0, good_mbit_s: 8.0, bad_mbit_s: 8.0, mean_good_s: 5.0, mean_bad_s: 5.0, outage: 0.0 };
        let a = cfg.generate().unwrap();
        assert_eq!(a, cfg.generate().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.up");
        std::fs::write(&p, &a).unwrap();
        let l = Link::trace(&p, 0, 0.0).unwrap();
        let mean = l.mean_capacity_mbit_s(0, 600_000_000);
        assert!((mean - 8.0).abs() < 0.2, "{mean}");
        let bad = SyntheticTrace { bad_mbit_s: 0.0, outage: 1.0, ..cfg }.generate().unwrap();
        std::fs::write(&p, &bad).unwrap();
        let half = Link::trace(&p, 0, 0.0).unwrap().mean_capacity_mbit_s(0, 600_000_000);
        assert!(half > 2.0 && half < 6.0, "half the time in outage: {half}");
        assert!(SyntheticTrace { duration_s: 0.0, ..cfg }.generate().is_err());
    }

    #[test]
    fn loss_costs_retransmissions_reproducibly() {
        let l = Link::constant(8.0, 20_000, 0.5).unwrap();
        let a = l.transmit(0, 30 * PACKET_BYTES, &mut SplitMix64::new(3)).unwrap();
        let b = l.transmit(0, 30 * PACKET_BYTES, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(a, b);
        // Without loss: 360,000 bits at 8 bit/us = 45 ms; with half lost, at
        // least one more RTT.
        assert!(a >= 45_000 + 20_000, "{a}");
    }
}
