//! What became of one input, and the one way to count it.
//!
//! Every input gets exactly one outcome: decided on the device (its branch
//! was confident enough, or the device declined to offload), answered by
//! the cloud, or a fallback (offloaded, but the device answered with its
//! branch, for a reason). The live collector, the live replay and the
//! virtual-time replay all count outcomes through `Counts::add`, so a
//! deadline miss, a fallback by reason or an offload means the same thing
//! in `report.json`, `FleetSummary`, `/metrics` and the dashboard.
use serde::{Deserialize, Serialize};

/// Where an input's answer was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decided {
    /// The branch was confident enough (or the device declined to
    /// offload): answered on the device.
    Device,
    /// Offloaded and answered by a cloud worker with the final exit.
    Cloud,
    /// Offloaded, but no answer came in time (or an error came back): the
    /// device answered with its own branch.
    Fallback,
}

/// Why an offload fell back to the device's own answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackReason {
    /// The cloud's answer had not come by the deadline (or the upload could
    /// not even start by it).
    Deadline,
    /// The device's NATS client was disconnected: nothing was sent.
    Disconnected,
    /// No worker listens on the offload subject.
    NoResponders,
    /// A worker refused it at once: it could not finish it before its
    /// deadline behind what it holds (`Overloaded`).
    Refused,
    /// A worker took it, but its deadline came before a batch could run it
    /// (`DeadlineExpired`): answered at once, not computed late.
    Expired,
    /// Any other error reply from a worker (a bad request, an unknown
    /// model, a failed batch).
    ErrorReply,
    Transport,
}

impl FallbackReason {
    /// Every reason, in the order reports list them.
    pub const ALL: [FallbackReason; 7] = [
        FallbackReason::Deadline,
        FallbackReason::Disconnected,
        FallbackReason::NoResponders,
        FallbackReason::Refused,
        FallbackReason::Expired,
        FallbackReason::ErrorReply,
        FallbackReason::Transport,
    ];

    /// Its name in reports, metrics labels and JSON.
    pub fn name(self) -> &'static str {
        match self {
            FallbackReason::Deadline => "deadline",
            FallbackReason::Disconnected => "disconnected",
            FallbackReason::NoResponders => "no-responders",
            FallbackReason::Refused => "refused",
            FallbackReason::Expired => "expired",
            FallbackReason::ErrorReply => "error-reply",
            FallbackReason::Transport => "transport",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether an input missed its deadline, the one definition: it was
/// answered after its deadline, or answered by its branch because the
/// cloud's answer had not come by it (a `Deadline` fallback). A fallback
/// for any other reason (a worker's refusal, an expired request, no
/// responders) answers the branch's class as soon as the device knows, in
/// time: it costs accuracy, not the deadline. A deadline of 0 is unknown:
/// nothing is late against it.
pub fn deadline_missed(latency_us: u64, deadline_us: u64, fell_back_at_deadline: bool) -> bool {
    fell_back_at_deadline || (deadline_us > 0 && latency_us > deadline_us)
}

/// What counting needs of one outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counted {
    pub decided: Decided,
    /// Set for a fallback.
    pub fallback: Option<FallbackReason>,
    /// Decided on the device although below p_tar: its offload was
    /// predicted to miss the deadline.
    pub declined: bool,
    pub correct: bool,
    pub latency_us: u64,
    pub deadline_us: u64,
}

impl Counted {
    pub fn missed(&self) -> bool {
        deadline_missed(self.latency_us, self.deadline_us, self.fallback == Some(FallbackReason::Deadline))
    }
}

/// Outcomes counted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub inputs: u64,
    pub correct: u64,
    /// Decided on the device (declined ones included).
    pub on_device: u64,
    pub edge_correct: u64,
    /// Below p_tar, answered on the device because the device predicted its
    /// offload would miss the deadline.
    pub declined: u64,
    /// Offloaded: answered by the cloud or fallen back.
    pub offloaded: u64,
    pub cloud: u64,
    pub fallbacks: u64,
    /// Fallbacks by reason (`FallbackReason::index`).
    pub fallbacks_by_reason: [u64; 7],
    /// Deadline misses (`deadline_missed`).
    pub misses: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counted) {
        self.inputs += 1;
        self.correct += u64::from(o.correct);
        self.misses += u64::from(o.missed());
        match o.decided {
            Decided::Device => {
                self.on_device += 1;
                self.edge_correct += u64::from(o.correct);
                self.declined += u64::from(o.declined);
            }
            Decided::Cloud => {
                self.offloaded += 1;
                self.cloud += 1;
            }
            Decided::Fallback => {
                self.offloaded += 1;
                self.fallbacks += 1;
                // A fallback without a reason is a transport failure.
                self.fallbacks_by_reason[o.fallback.unwrap_or(FallbackReason::Transport).index()] += 1;
            }
        }
    }

    pub fn merge(&mut self, o: &Counts) {
        self.inputs += o.inputs;
        self.correct += o.correct;
        self.on_device += o.on_device;
        self.edge_correct += o.edge_correct;
        self.declined += o.declined;
        self.offloaded += o.offloaded;
        self.cloud += o.cloud;
        self.fallbacks += o.fallbacks;
        for (a, b) in self.fallbacks_by_reason.iter_mut().zip(o.fallbacks_by_reason) {
            *a += b;
        }
        self.misses += o.misses;
    }

    pub fn fallbacks_for(&self, reason: FallbackReason) -> u64 {
        self.fallbacks_by_reason[reason.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(decided: Decided, fallback: Option<FallbackReason>, latency_us: u64) -> Counted {
        Counted { decided, fallback, declined: false, correct: true, latency_us, deadline_us: 100 }
    }

    /// A miss is an answer after the deadline or a deadline fallback; a
    /// worker's refusal answered in time is a fallback, not a miss.
    #[test]
    fn a_deadline_miss_is_late_or_fallen_back_at_the_deadline_and_nothing_else() {
        let cases = [
            (counted(Decided::Device, None, 99), false),
            (counted(Decided::Device, None, 101), true),
            (counted(Decided::Cloud, None, 100), false),
            (counted(Decided::Cloud, None, 101), true),
            (counted(Decided::Fallback, Some(FallbackReason::Deadline), 100), true),
            (counted(Decided::Fallback, Some(FallbackReason::Deadline), 60), true),
            (counted(Decided::Fallback, Some(FallbackReason::Refused), 20), false),
            (counted(Decided::Fallback, Some(FallbackReason::Expired), 40), false),
            (counted(Decided::Fallback, Some(FallbackReason::NoResponders), 150), true),
        ];
        let mut c = Counts::default();
        for (o, missed) in cases {
            assert_eq!(o.missed(), missed, "{o:?}");
            c.add(&o);
        }
        assert_eq!((c.inputs, c.on_device, c.cloud, c.fallbacks, c.offloaded, c.misses), (9, 2, 2, 5, 7, 5));
        assert_eq!(c.fallbacks_by_reason, [2, 0, 1, 1, 1, 0, 0]);
        assert!(!deadline_missed(10_000, 0, false), "no deadline: nothing is late");
        let mut twice = c.clone();
        twice.merge(&c);
        assert_eq!((twice.inputs, twice.fallbacks_for(FallbackReason::Deadline)), (18, 4));
    }
}
