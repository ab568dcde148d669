//! The cloud worker's batching policy, as a state machine over microseconds:
//! admission (refuse at once what cannot finish in time, shed audits
//! first), dynamic batching (`max_batch` or `max_wait`), the choice of the
//! next batch (the lane with the most urgent offload, the batch that answers
//! the most in time per second of compute) and batch times learned as
//! batches finish.
//!
//! It does no I/O and reads no clock: the caller drives it with its own
//! time (the live `worker::Batcher` with the wall clock, the virtual-time
//! replay with its events) and does what it says, in the manner of
//! raft-rs. So the replay's worker is the live worker's policy, overload
//! included.
//!
//! One round: `offer` a request (refused, queued, or queued with a flush
//! now or a timer to arm); on a flush or a timer that is still current,
//! `flush` the lane; then take `next_batch` while it gives one (each holds a
//! compute slot, with the requests to run and those that can no longer
//! make it); when the batch is done, `finished` frees its slot and learns
//! its time.
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Requests that may share a batch: the same model's tail at the same
/// partition branch (`model` indexes the worker's models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lane {
    pub model: usize,
    pub branch: u8,
}

/// How a worker batches.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueConfig {
    /// Most requests in one batched forward.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, µs.
    pub max_wait_us: u64,
    /// Most requests held (waiting and computing); beyond it an offload is
    /// refused at once.
    pub max_queue: usize,
    /// Threads that run batches. At most one batch more than that is handed
    /// to them: it keeps a thread from idling while its next batch is
    /// gathered (without it throughput fell to 0.78x a bare batched
    /// forward), and beyond it requests wait here, where an expired one is
    /// answered at once instead of being computed, and waiting ones join
    /// bigger batches.
    pub compute_threads: usize,
}

impl QueueConfig {
    /// `max_queue` defaults to 16 full batches.
    pub fn new(max_batch: usize, max_wait_us: u64, compute_threads: usize) -> Self {
        let max_batch = max_batch.max(1);
        Self { max_batch, max_wait_us, max_queue: max_batch * 16, compute_threads: compute_threads.max(1) }
    }
}

/// How long a batch of n takes to run at one lane: a least-squares line
/// `a + b n` (a and b at least 0) through the smoothed time of each batch
/// size seen (one point per size, so a run of small batches under light
/// load does not make the worker forget what full ones take), and beyond
/// the largest size seen no steeper than proportional to it; plus twice
/// the smoothed deviation of batches from their size's time, so that a
/// worker whose batches vary does not plan to the microsecond and answer
/// half of its tightest requests late (in virtual time, where a batch size
/// always takes the same time, the deviation is 0). Unknown (0) before the
/// first batch, so nothing is refused on a guess.
#[derive(Debug, Clone, Default)]
pub struct BatchTime {
    /// Smoothed µs per batch, by batch size (index n).
    by_size: Vec<Option<f64>>,
    a: f64,
    b: f64,
    /// Smoothed |batch time - its size's smoothed time|, µs.
    deviation: f64,
}

impl BatchTime {
    /// Weight of a new batch in its size's smoothed time.
    const ALPHA: f64 = 0.2;
    /// Batch sizes tracked (a worker's max_batch is far below).
    const MAX_SIZE: usize = 4096;

    pub fn observe(&mut self, n: usize, took_us: u64) {
        let n = n.clamp(1, Self::MAX_SIZE);
        if self.by_size.len() <= n {
            self.by_size.resize(n + 1, None);
        }
        let t = took_us as f64;
        let slot = &mut self.by_size[n];
        if let Some(old) = *slot {
            self.deviation += Self::ALPHA * ((t - old).abs() - self.deviation);
        }
        *slot = Some(slot.map_or(t, |old| old + Self::ALPHA * (t - old)));
        let points: Vec<(f64, f64)> = self.by_size.iter().enumerate().filter_map(|(n, t)| t.map(|t| (n as f64, t))).collect();
        let k = points.len() as f64;
        let (mx, my) = points.iter().fold((0.0, 0.0), |(x, y), p| (x + p.0 / k, y + p.1 / k));
        let (sxx, sxy) = points.iter().fold((0.0, 0.0), |(xx, xy), p| (xx + (p.0 - mx).powi(2), xy + (p.0 - mx) * (p.1 - my)));
        if sxx > 0.0 {
            self.b = (sxy / sxx).max(0.0);
            self.a = (my - self.b * mx).max(0.0);
        } else {
            // One batch size so far: all of it per input.
            (self.a, self.b) = (0.0, my / mx.max(1.0));
        }
    }

    /// Estimated µs of a batch of n (whole microseconds, rounded up, so
    /// that no decision hinges on a fraction of one).
    pub fn estimate_us(&self, n: usize) -> u64 {
        let line = (self.a + self.b * n as f64).max(0.0);
        // Beyond the largest batch seen, a line through small ones can
        // climb too steeply (noise in their times); proportional to the
        // largest seen is an upper bound there (batching only amortises).
        let Some((largest, t)) = self.by_size.iter().enumerate().rev().find_map(|(n, t)| t.map(|t| (n as f64, t))) else { return 0 };
        let us = if n as f64 > largest { line.min(t * n as f64 / largest) } else { line };
        (us + self.deviation).ceil() as u64
    }
}

/// How many of a lane's waiting requests (their deadlines `dues`, in
/// earliest-first order, audits after) to run as the next batch: the n up to
/// `max_batch` that answers the most of them in time per second of compute,
/// with `batch_us(n)` the estimated time of a batch of n started at
/// `start`; the batch is then the earliest n whose deadlines a batch of n
/// still meets. At least one when any request waits.
pub fn batch_to_run(dues: &[u64], max_batch: usize, start: u64, batch_us: impl Fn(usize) -> u64) -> usize {
    let upto = dues.len().min(max_batch.max(1));
    // (answers, µs) of the best so far, compared as exact cross products:
    // no decision hinges on a float rounding.
    let mut best: (u128, u128, usize) = (0, 1, upto.min(1));
    for n in 1..=upto {
        let t = batch_us(n);
        let in_time = dues.iter().filter(|&&d| d >= start + t).count().min(n) as u128;
        let t = u128::from(t.max(1));
        // Answers per second of compute; ties go to the larger batch.
        if in_time > 0 && in_time * best.1 >= best.0 * t {
            best = (in_time, t, n);
        }
    }
    best.2
}

/// Where in a lane's queue a new request goes, or `None` to shed it: real
/// requests go ahead of every queued audit (an audit never delays an
/// offload), and an audit is shed while the worker holds `shed_at` requests
/// or more (`backlog`: queued and computing). `audits` flags the queue.
pub fn admit(audits: &[bool], is_audit: bool, backlog: usize, shed_at: usize) -> Option<usize> {
    if is_audit {
        return (backlog < shed_at).then_some(audits.len());
    }
    Some(audits.iter().position(|&a| a).unwrap_or(audits.len()))
}

/// A request held by the queue, with what the policy needs of it.
#[derive(Debug)]
pub struct Waiting<T> {
    pub item: T,
    /// When the worker received it, µs.
    pub received_us: u64,
    /// When its answer stops being useful, µs by the worker's clock.
    pub due_us: u64,
    /// An on-device input sampled for the calibrator: it waits behind every
    /// offload and is shed first.
    pub audit: bool,
}

/// What became of an offered request.
#[derive(Debug)]
pub enum Offered<T> {
    /// Queued; the caller flushes the lane now, arms a timer, or does
    /// nothing (a timer is armed already).
    Queued(Flush),
    /// Refused at once, with why: the caller replies `Overloaded`.
    Refused(Waiting<T>, Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// The lane holds a full batch: flush it now.
    Now,
    /// The first request of a batch: flush the lane at `at_us` unless it
    /// was flushed since (`timer_fired` with this generation).
    At { at_us: u64, generation: u64 },
    /// A timer is armed already.
    Armed,
}

/// Why a request was refused at once.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The worker holds `max_queue` requests already.
    Full { held: usize, max: usize },
    /// The offloads due before it make a queue it cannot get through before
    /// its own deadline.
    TooLate { ahead: usize, finish_in_us: u64 },
    /// An audit, shed because the worker is busy with offloads.
    AuditShed,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Full { held, max } => write!(f, "the worker holds {held} requests already (at most {max})"),
            Refusal::TooLate { ahead, finish_in_us } => {
                write!(f, "{ahead} requests are due before it: it would finish about {:.1} ms from now, after its deadline", *finish_in_us as f64 / 1e3)
            }
            Refusal::AuditShed => write!(f, "an audit, shed: the worker is busy with offloads"),
        }
    }
}

/// A batch handed to a compute slot; give it back to `finished`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    pub lane: Lane,
    pub slot: usize,
    /// Requests in it.
    pub n: usize,
    /// When the batch was handed over, and when its lane became ready (the
    /// congestion delay counts from there: the batching window before it is
    /// chosen, not congestion).
    pub handed_us: u64,
    pub ready_us: u64,
    /// When it is expected to start (its slot busy until then) and how long
    /// it is expected to take.
    pub start_us: u64,
    pub estimate_us: u64,
}

/// The next batch to run, and the requests of its lane that can no longer
/// make their deadline (answered `DeadlineExpired` at once, not computed).
#[derive(Debug)]
pub struct Next<T> {
    /// `None` when every request taken from the lane had expired: nothing
    /// to run, no slot held.
    pub ticket: Option<Ticket>,
    pub batch: Vec<Waiting<T>>,
    pub expired: Vec<Waiting<T>>,
    /// The estimated time of a batch of one, for the expired replies' words.
    pub one_us: u64,
}

/// How a handed batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It ran, in `took_us` of compute.
    Ran { took_us: u64 },
    /// It failed: its requests get error replies.
    Failed,
}

/// A worker's cumulative counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    pub requests: u64,
    pub batches: u64,
    pub errors: u64,
    /// Requests waiting: for their batch, or in a batch waiting for compute.
    pub queue_depth: usize,
    pub mean_batch_size: f64,
    /// EWMA (alpha 0.1) of the time requests wait for their batch, µs.
    pub queue_delay_us_ewma: f64,
    /// Requests answered by the tail (not error replies).
    pub answered: u64,
    /// Sum over answered requests of the time their formed batch waited for
    /// a compute thread, µs: divided by `answered` it is the congestion
    /// delay, without the batching window.
    pub compute_wait_us_total: f64,
    /// Audits shed because the worker was busy.
    pub audits_shed: u64,
    /// Offloads refused at once (`Refusal::Full`, `Refusal::TooLate`).
    pub refused: u64,
    /// Requests answered `DeadlineExpired` instead of being computed.
    pub expired: u64,
}

/// One worker's batching state: its lanes' waiting requests, its compute
/// slots and what it has learned of its batch times.
#[derive(Debug)]
pub struct WorkerQueue<T> {
    cfg: QueueConfig,
    pending: BTreeMap<Lane, Vec<Waiting<T>>>,
    /// Bumped at every flush, so a stale max_wait timer flushes nothing.
    generation: BTreeMap<Lane, u64>,
    /// Lanes ready to run, waiting for a compute slot, and since when.
    ready: BTreeSet<Lane>,
    ready_since: BTreeMap<Lane, u64>,
    batch_time: BTreeMap<Lane, BatchTime>,
    /// Requests and batches handed to the slots and not finished.
    in_flight: usize,
    batches_in_flight: usize,
    /// When each slot is expected to be free, and the estimated times of the
    /// batches handed to it and not finished.
    free_at: Vec<u64>,
    slot_work: Vec<VecDeque<u64>>,
    /// When each slot's last batch was seen done.
    done_at: Vec<u64>,
    stats: QueueStats,
}

impl<T> WorkerQueue<T> {
    pub fn new(cfg: QueueConfig) -> Self {
        let threads = cfg.compute_threads.max(1);
        Self {
            cfg: QueueConfig { compute_threads: threads, max_batch: cfg.max_batch.max(1), max_queue: cfg.max_queue.max(1), ..cfg },
            pending: BTreeMap::new(),
            generation: BTreeMap::new(),
            ready: BTreeSet::new(),
            ready_since: BTreeMap::new(),
            batch_time: BTreeMap::new(),
            in_flight: 0,
            batches_in_flight: 0,
            free_at: vec![0; threads],
            slot_work: vec![VecDeque::new(); threads],
            done_at: vec![0; threads],
            stats: QueueStats::default(),
        }
    }

    pub fn config(&self) -> &QueueConfig {
        &self.cfg
    }

    /// Requests held: waiting, and in batches handed to the slots.
    pub fn backlog(&self) -> usize {
        self.pending.values().map(Vec::len).sum::<usize>() + self.in_flight
    }

    /// Whether it holds nothing: no request waiting, no batch handed over.
    pub fn is_idle(&self) -> bool {
        self.backlog() == 0 && self.batches_in_flight == 0
    }

    pub fn stats(&self) -> QueueStats {
        QueueStats { queue_depth: self.backlog(), ..self.stats }
    }

    /// A request refused before it reached the policy (malformed, unknown
    /// model or branch, stale): counted as a request and an error.
    pub fn count_invalid(&mut self) {
        self.stats.requests += 1;
        self.stats.errors += 1;
    }

    /// An error reply for a request the policy had taken (its activation
    /// could not be decoded into the batch).
    pub fn count_error(&mut self) {
        self.stats.errors += 1;
    }

    /// The lane's learned batch times.
    pub fn batch_time(&self, lane: Lane) -> BatchTime {
        self.batch_time.get(&lane).cloned().unwrap_or_default()
    }

    /// The slot expected free first, and when a batch handed now would start.
    fn next_start(&self, now: u64) -> (usize, u64) {
        let (slot, at) = self.free_at.iter().enumerate().min_by_key(|(i, t)| (**t, *i)).map(|(i, t)| (i, *t)).unwrap_or((0, now));
        (slot, at.max(now))
    }

    /// Why an offload is refused at once, if it is: the worker holds
    /// `max_queue` requests already, or the offloads due before it make a
    /// queue it cannot get through before its own deadline (a device told
    /// now falls back at once, instead of at its deadline).
    fn refuse_offload(&self, now: u64, lane: Lane, due: u64, backlog: usize) -> Option<Refusal> {
        if backlog >= self.cfg.max_queue {
            return Some(Refusal::Full { held: backlog, max: self.cfg.max_queue });
        }
        if self.is_idle() {
            // An idle worker tries: its estimates come only from batches it
            // runs, so one slow batch must not make it refuse everything
            // from then on and never learn otherwise.
            return None;
        }
        let estimate = self.batch_time.get(&lane)?;
        // Waiting here, due before it: full batches ahead of its own, after
        // what the slots hold already.
        let ahead = self.pending.values().flatten().filter(|w| !w.audit && w.due_us <= due).count();
        let max_batch = self.cfg.max_batch;
        let work = estimate.estimate_us(max_batch) * (ahead / max_batch) as u64 + estimate.estimate_us(ahead % max_batch + 1);
        let (_, start) = self.next_start(now);
        let finish = start + work / self.cfg.compute_threads as u64;
        (finish > due).then(|| Refusal::TooLate { ahead, finish_in_us: finish - now })
    }

    /// Takes a request at `now`, or refuses it.
    pub fn offer(&mut self, now: u64, lane: Lane, w: Waiting<T>) -> Offered<T> {
        self.stats.requests += 1;
        let backlog = self.backlog();
        if !w.audit {
            if let Some(why) = self.refuse_offload(now, lane, w.due_us, backlog) {
                self.stats.refused += 1;
                self.stats.errors += 1;
                return Offered::Refused(w, why);
            }
        }
        let flags: Vec<bool> = self.pending.get(&lane).map_or(Vec::new(), |q| q.iter().map(|j| j.audit).collect());
        let Some(at) = admit(&flags, w.audit, backlog, self.cfg.max_batch) else {
            self.stats.audits_shed += 1;
            self.stats.errors += 1;
            return Offered::Refused(w, Refusal::AuditShed);
        };
        let queue = self.pending.entry(lane).or_default();
        queue.insert(at, w);
        let len = queue.len();
        if len >= self.cfg.max_batch {
            Offered::Queued(Flush::Now)
        } else if len == 1 {
            let generation = *self.generation.entry(lane).or_default();
            Offered::Queued(Flush::At { at_us: now + self.cfg.max_wait_us, generation })
        } else {
            Offered::Queued(Flush::Armed)
        }
    }

    /// A max_wait timer armed for `lane` at `generation` went off at `now`:
    /// flushes the lane unless it was flushed since.
    pub fn timer_fired(&mut self, now: u64, lane: Lane, generation: u64) {
        if self.generation.get(&lane) == Some(&generation) {
            self.flush(now, lane);
        }
    }

    /// The lane is ready to run (full, or its first request waited
    /// max_wait): it runs when a slot is free (`next_batch`).
    pub fn flush(&mut self, now: u64, lane: Lane) {
        *self.generation.entry(lane).or_default() += 1;
        if self.pending.get(&lane).is_none_or(Vec::is_empty) {
            return;
        }
        self.ready.insert(lane);
        self.ready_since.entry(lane).or_insert(now);
    }

    /// The next batch, if a slot may take one and a lane is ready: the
    /// lane whose most urgent offload is due first goes first. Call it until
    /// it gives `None`.
    pub fn next_batch(&mut self, now: u64) -> Option<Next<T>> {
        // One batch per thread, and one waiting behind them.
        if self.batches_in_flight > self.cfg.compute_threads {
            return None;
        }
        let urgent = |l: &Lane| self.pending.get(l).and_then(|q| q.iter().filter(|w| !w.audit).map(|w| w.due_us).min());
        let lane = self.ready.iter().copied().min_by_key(|l| (urgent(l).is_none(), urgent(l), *l))?;
        self.ready.remove(&lane);
        let ready_us = self.ready_since.remove(&lane).unwrap_or(now);
        // Deadlines count from when the batch will start: now, or when the
        // batch ahead of it at its slot is expected to finish.
        let (slot, start) = self.next_start(now);
        let estimate = self.batch_time(lane);
        let one_us = estimate.estimate_us(1);
        let queue = self.pending.get_mut(&lane).expect("a ready lane has a queue");
        // Earliest deadline first, offloads ahead of audits; a request that
        // cannot finish even alone is answered now, not computed late.
        queue.sort_by_key(|w| (w.audit, w.due_us));
        // An idle worker runs what has not expired yet, whatever its
        // estimate says (as it admits it): so it measures again.
        let idle = self.batches_in_flight == 0;
        let (expired, rest): (Vec<_>, Vec<_>) = std::mem::take(queue).into_iter().partition(|w| now >= w.due_us || (!idle && start + one_us > w.due_us));
        // The batch that answers the most requests in time per second of
        // compute: under overload a full batch of those that can still make
        // it, rather than a small one shrunk to fit the most urgent.
        let dues: Vec<u64> = rest.iter().map(|w| w.due_us).collect();
        let take = batch_to_run(&dues, self.cfg.max_batch, start, |n| estimate.estimate_us(n));
        let fits_by = start + estimate.estimate_us(take.max(1));
        // None in time by the estimate: an idle worker runs the earliest
        // `take` all the same (a busy one has expired them above).
        let none_in_time = !rest.iter().any(|r| r.due_us >= fits_by);
        let in_time = |w: &Waiting<T>| w.due_us >= fits_by || (idle && none_in_time);
        let (mut batch, mut kept) = (Vec::with_capacity(take), Vec::with_capacity(rest.len()));
        let fits: Vec<bool> = rest.iter().map(in_time).collect();
        for (w, fits) in rest.into_iter().zip(fits) {
            if batch.len() < take && fits {
                batch.push(w);
            } else {
                kept.push(w);
            }
        }
        *queue = kept;
        if !queue.is_empty() {
            // More arrived while the lane waited for a slot; they have
            // waited too, so they go next.
            self.ready.insert(lane);
            self.ready_since.insert(lane, now);
        }
        self.stats.expired += expired.len() as u64;
        self.stats.errors += expired.len() as u64;
        if batch.is_empty() {
            return Some(Next { ticket: None, batch, expired, one_us });
        }
        let n = batch.len();
        self.stats.batches += 1;
        self.stats.mean_batch_size += (n as f64 - self.stats.mean_batch_size) / self.stats.batches as f64;
        for w in &batch {
            self.stats.queue_delay_us_ewma = 0.9 * self.stats.queue_delay_us_ewma + 0.1 * now.saturating_sub(w.received_us) as f64;
        }
        let estimate_us = estimate.estimate_us(n);
        self.in_flight += n;
        self.batches_in_flight += 1;
        self.free_at[slot] = start + estimate_us;
        self.slot_work[slot].push_back(estimate_us);
        let ticket = Ticket { lane, slot, n, handed_us: now, ready_us, start_us: start, estimate_us };
        Some(Next { ticket: Some(ticket), batch, expired, one_us })
    }

    /// The caller could run only `n` of a ticket's requests (the others got
    /// error replies before it started, `count_error`).
    pub fn shrink(&mut self, ticket: &mut Ticket, n: usize) {
        let n = n.min(ticket.n);
        self.in_flight -= ticket.n - n;
        ticket.n = n;
    }

    /// A handed batch is done at `now` (or was never run: `n` 0): its slot
    /// frees, its time is learned, its requests counted.
    pub fn finished(&mut self, now: u64, ticket: Ticket, how: Finish) {
        self.in_flight -= ticket.n;
        self.batches_in_flight -= 1;
        if let (Some(t), Some(w)) = (self.free_at.get_mut(ticket.slot), self.slot_work.get_mut(ticket.slot)) {
            // Free now, but for what was handed to it after this batch.
            w.pop_front();
            *t = now + w.iter().sum::<u64>();
        }
        if ticket.n == 0 {
            return;
        }
        // A batch's time as the caller sees it: from when it could start
        // (handed over, and its slot done with the batch before) to when it
        // is seen done, at least its compute. Live, that includes what the
        // compute alone does not (a thread waking, the result reaching the
        // caller), and the worker plans with it; in virtual time it is the
        // compute.
        let could_start = ticket.handed_us.max(self.done_at.get(ticket.slot).copied().unwrap_or(0));
        if let Some(d) = self.done_at.get_mut(ticket.slot) {
            *d = now;
        }
        match how {
            Finish::Ran { took_us } => {
                let seen = now.saturating_sub(could_start).max(took_us);
                self.batch_time.entry(ticket.lane).or_default().observe(ticket.n, seen);
                // Waiting for a slot: ready here, then queued at the slot.
                let waited = now.saturating_sub(ticket.handed_us).saturating_sub(took_us) + ticket.handed_us.saturating_sub(ticket.ready_us);
                self.stats.answered += ticket.n as u64;
                self.stats.compute_wait_us_total += waited as f64 * ticket.n as f64;
            }
            Finish::Failed => self.stats.errors += ticket.n as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANE: Lane = Lane { model: 0, branch: 1 };

    fn waiting(item: u32, now: u64, due: u64) -> Waiting<u32> {
        Waiting { item, received_us: now, due_us: due, audit: false }
    }

    #[test]
    fn batch_times_follow_the_batches_seen() {
        let mut t = BatchTime::default();
        assert_eq!(t.estimate_us(32), 0, "nothing refused on a guess");
        // 2 ms + 0.5 ms per input.
        for n in [1, 4, 8, 16, 32, 8, 1] {
            t.observe(n, 2000 + 500 * n as u64);
        }
        for n in [1, 10, 32] {
            let want = 2000.0 + 500.0 * n as f64;
            assert!((t.estimate_us(n) as f64 - want).abs() < 2.0, "{n}: {}", t.estimate_us(n));
        }
        // A long run of small batches (light load) does not make it forget
        // what a full one takes.
        for _ in 0..500 {
            t.observe(2, 3000);
        }
        assert!((t.estimate_us(32) as f64 - 18_000.0).abs() < 1_000.0, "{}", t.estimate_us(32));
        // Only small batches seen: beyond them, no steeper than proportional.
        let mut small = BatchTime::default();
        small.observe(1, 30_000);
        small.observe(2, 70_000);
        assert!(small.estimate_us(32) <= 70_000 * 16, "{}", small.estimate_us(32));
    }

    #[test]
    fn under_overload_a_full_batch_of_what_can_still_make_it() {
        let ms = |m: u64| m * 1000;
        // A batch of n takes 10 + n ms.
        let time = |n: usize| ms(10 + n as u64);
        // Plenty of slack: everything, up to max_batch.
        let relaxed: Vec<u64> = (0..50).map(|i| ms(1000 + i)).collect();
        assert_eq!(batch_to_run(&relaxed, 32, 0, time), 32);
        // Two urgent ones (due in 15 ms) and 40 with room: a full batch of
        // those that make it beats a batch of 2 shrunk to fit the urgent.
        let mut mixed = vec![ms(15), ms(15)];
        mixed.extend((0..40).map(|i| ms(500 + i)));
        assert_eq!(batch_to_run(&mixed, 32, 0, time), 32);
        // Only the urgent ones: a small batch that saves them.
        assert_eq!(batch_to_run(&[ms(15), ms(15)], 32, 0, time), 2);
        assert_eq!(batch_to_run(&[ms(11)], 32, 0, time), 1);
        assert_eq!(batch_to_run(&[], 32, 0, time), 0);
    }

    #[test]
    fn audits_wait_behind_offloads_and_are_shed_first() {
        // An offload goes ahead of every queued audit, however many.
        assert_eq!(admit(&[false, false, true, true], false, 4, 32), Some(2));
        assert_eq!(admit(&[true; 100], false, 1000, 32), Some(0), "a burst of audits cannot delay an offload, let alone refuse it");
        assert_eq!(admit(&[false, false], false, 1000, 32), Some(2), "offloads are never shed here");
        // An audit goes last, while the worker has room.
        assert_eq!(admit(&[false, true], true, 2, 32), Some(2));
        assert_eq!(admit(&[], true, 31, 32), Some(0));
        assert_eq!(admit(&[], true, 32, 32), None, "shed at the limit");
    }

    /// A full lane flushes at once; a lone request arms its timer, and a
    /// timer from before a flush flushes nothing.
    #[test]
    fn a_full_lane_flushes_at_once_and_a_stale_timer_does_nothing() {
        let mut q = WorkerQueue::new(QueueConfig::new(3, 2_000, 1));
        let Offered::Queued(Flush::At { at_us, generation }) = q.offer(0, LANE, waiting(0, 0, 100_000)) else { panic!("a lone request arms a timer") };
        assert_eq!(at_us, 2_000);
        assert!(matches!(q.offer(10, LANE, waiting(1, 10, 100_000)), Offered::Queued(Flush::Armed)));
        assert!(matches!(q.offer(20, LANE, waiting(2, 20, 100_000)), Offered::Queued(Flush::Now)));
        q.flush(20, LANE);
        let next = q.next_batch(20).expect("a slot is free");
        assert_eq!(next.batch.iter().map(|w| w.item).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(next.expired.is_empty());
        // The first request's timer goes off after the flush: nothing.
        q.timer_fired(at_us, LANE, generation);
        assert!(q.next_batch(at_us).is_none());
        let ticket = next.ticket.expect("a batch to run");
        assert_eq!((q.backlog(), ticket.n), (3, 3));
        q.finished(3_020, ticket, Finish::Ran { took_us: 3_000 });
        let s = q.stats();
        assert_eq!((s.requests, s.batches, s.answered, s.queue_depth), (3, 1, 3, 0));
        assert_eq!(q.batch_time(LANE).estimate_us(3), 3_000);
        // Seen done later than its compute (a thread slow to wake, the
        // result slow to come back): the worker plans with what it saw.
        q.offer(10_000, LANE, waiting(3, 10_000, 100_000));
        q.flush(10_000, LANE);
        let ticket = q.next_batch(10_000).unwrap().ticket.unwrap();
        q.finished(14_000, ticket, Finish::Ran { took_us: 3_000 });
        assert!(q.batch_time(LANE).estimate_us(1) > 3_000, "{}", q.batch_time(LANE).estimate_us(1));
    }

    /// Under overload: an offload that cannot finish behind those due
    /// before it is refused at once, an expired one is answered without
    /// computing, and at most one batch waits behind each busy slot.
    #[test]
    fn an_overloaded_worker_refuses_at_once_and_expires_what_waited_too_long() {
        let mut q = WorkerQueue::new(QueueConfig::new(2, 1_000, 1));
        // Learn that a batch of 2 takes 10 ms (and one 5 ms).
        q.offer(0, LANE, waiting(0, 0, 1_000_000));
        q.offer(0, LANE, waiting(1, 0, 1_000_000));
        q.flush(0, LANE);
        let t = q.next_batch(0).unwrap().ticket.unwrap();
        q.finished(10_000, t, Finish::Ran { took_us: 10_000 });
        // Two full batches go to the slot (one running, one waiting).
        for i in 0..4 {
            q.offer(10_000, LANE, waiting(10 + i, 10_000, 200_000));
        }
        q.flush(10_000, LANE);
        let a = q.next_batch(10_000).unwrap().ticket.unwrap();
        assert_eq!(a.start_us, 10_000);
        q.flush(10_000, LANE);
        let b = q.next_batch(10_000).unwrap().ticket.unwrap();
        assert_eq!(b.start_us, 20_000, "behind the batch before it");
        // A third waits here: no slot takes it.
        q.offer(10_000, LANE, waiting(20, 10_000, 200_000));
        q.flush(10_000, LANE);
        assert!(q.next_batch(10_000).is_none(), "one batch waits behind each busy slot, no more");
        // Due in 15 ms with 20 ms of batches handed over: refused now.
        match q.offer(10_000, LANE, waiting(21, 10_000, 25_000)) {
            Offered::Refused(w, Refusal::TooLate { .. }) => assert_eq!(w.item, 21),
            other => panic!("{other:?}"),
        }
        // The queued one expires while the slot is busy: answered, not run.
        q.finished(250_000, a, Finish::Ran { took_us: 10_000 });
        let next = q.next_batch(250_000).expect("the lane is ready");
        assert!(next.ticket.is_none());
        assert_eq!(next.expired.iter().map(|w| w.item).collect::<Vec<_>>(), vec![20]);
        q.finished(250_000, b, Finish::Ran { took_us: 10_000 });
        let s = q.stats();
        assert_eq!((s.refused, s.expired, s.answered, s.queue_depth), (1, 1, 6, 0));
        assert!(q.is_idle());
    }

    /// One cold batch that took longer than any deadline does not lock the
    /// worker out: idle, it admits and runs the next request anyway, and
    /// learns from it.
    #[test]
    fn one_slow_batch_does_not_make_an_idle_worker_refuse_everything() {
        let mut q = WorkerQueue::new(QueueConfig::new(4, 1_000, 1));
        q.offer(0, LANE, waiting(0, 0, 10_000_000));
        q.flush(0, LANE);
        let t = q.next_batch(0).unwrap().ticket.unwrap();
        q.finished(1_000_000, t, Finish::Ran { took_us: 1_000_000 });
        // Due in 100 ms, a batch estimated at 1 s: an idle worker tries.
        assert!(matches!(q.offer(1_000_000, LANE, waiting(1, 1_000_000, 1_100_000)), Offered::Queued(_)));
        q.flush(1_000_000, LANE);
        let next = q.next_batch(1_000_000).unwrap();
        assert!(next.expired.is_empty());
        assert_eq!(next.batch.iter().map(|w| w.item).collect::<Vec<_>>(), vec![1]);
        let mut now = 1_010_000;
        q.finished(now, next.ticket.unwrap(), Finish::Ran { took_us: 10_000 });
        let first = q.batch_time(LANE).estimate_us(1);
        // Each batch it runs brings the estimate down to what batches take.
        for i in 0..30 {
            q.offer(now, LANE, waiting(10 + i, now, now + 100_000));
            q.flush(now, LANE);
            let t = q.next_batch(now).unwrap().ticket.expect("run, not expired");
            now += 10_000;
            q.finished(now, t, Finish::Ran { took_us: 10_000 });
        }
        let learned = q.batch_time(LANE).estimate_us(1);
        assert!(learned < first && learned < 30_000, "it learned: {first} then {learned}");
        // Busy, it does refuse what its estimate says it cannot finish.
        q.offer(now, LANE, waiting(2, now, now + 9_000_000));
        q.flush(now, LANE);
        let busy = q.next_batch(now).unwrap().ticket.unwrap();
        assert!(matches!(q.offer(now, LANE, waiting(3, now, now + 1_000)), Offered::Refused(_, Refusal::TooLate { .. })));
        q.finished(now + 10_000, busy, Finish::Ran { took_us: 10_000 });
    }

    /// The queue holds at most `max_queue`: beyond it offloads are refused,
    /// and audits are shed once the backlog reaches a batch.
    #[test]
    fn a_full_worker_refuses_offloads_and_sheds_audits_first() {
        let mut q = WorkerQueue::new(QueueConfig { max_queue: 3, ..QueueConfig::new(2, 1_000, 1) });
        let audit = |i| Waiting { item: i, received_us: 0, due_us: 1_000_000, audit: true };
        assert!(matches!(q.offer(0, LANE, audit(0)), Offered::Queued(_)));
        assert!(matches!(q.offer(0, LANE, waiting(1, 0, 1_000_000)), Offered::Queued(_)));
        assert!(matches!(q.offer(0, LANE, audit(2)), Offered::Refused(_, Refusal::AuditShed)), "backlog at a batch: audits shed");
        assert!(matches!(q.offer(0, LANE, waiting(3, 0, 1_000_000)), Offered::Queued(_)));
        assert!(matches!(q.offer(0, LANE, waiting(4, 0, 1_000_000)), Offered::Refused(_, Refusal::Full { held: 3, max: 3 })));
        // The offloads go first, the audit last.
        q.flush(0, LANE);
        let next = q.next_batch(0).unwrap();
        assert_eq!(next.batch.iter().map(|w| w.item).collect::<Vec<_>>(), vec![1, 3]);
    }
}
