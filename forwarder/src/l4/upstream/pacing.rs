//! Pacing of new upstream connections per backend, for reconnect storms: after a network
//! flap or a restart thousands of devices reconnect at once, IoT Hub throttles new
//! connections per unit (S1 12/s per unit with a floor of 100/s, S2 120/s, S3 6,000/s)
//! and rejects the excess, and the rejected devices back off and retry for minutes. Held
//! here in a bounded queue and released at a steady rate, they get through the first time.
//!
//! The limiter is a token bucket (rate R per second, burst B = max(1, R/10)) written as
//! GCRA "virtual scheduling": one instant per bucket, the theoretical time of the next
//! connect at an empty bucket. A connect reserves its slot under a mutex, in arrival order
//! (so waiters form a FIFO), and sleeps until that slot: no polling, no wake-up but its
//! own. At wake-up it is checked against a second bucket kept in real release times, so
//! waiters woken late together (a stalled runtime) cannot go as a spike. Over any window
//! of T seconds at most B + R*T connects are released.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{self, BackendMetrics};

/// The burst is this fraction of a second's rate (at least one connect): enough to serve
/// a lone device at once, too little for the hub to see a spike.
pub const BURST_DIVISOR: u32 = 10;

/// A backend's pacing settings (`max_new_connections_per_sec`, `connect_queue`,
/// `queue_timeout_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacingLimits {
    /// New connections per second, at most (> 0).
    pub rate_per_sec: u32,
    /// Devices that may wait for a slot at once; more are refused at once.
    pub queue: u32,
    /// Longest wait for a slot; a device whose slot is further away is refused at once.
    pub queue_timeout: Duration,
}

impl PacingLimits {
    /// Connects released at once after a quiet spell.
    pub fn burst(&self) -> u32 {
        (self.rate_per_sec / BURST_DIVISOR).max(1)
    }

    /// Time between two slots, rounded up to the nanosecond so the rate is never exceeded.
    pub fn interval(&self) -> Duration {
        let rate = u64::from(self.rate_per_sec.max(1));
        Duration::from_nanos(1_000_000_000u64.div_ceil(rate))
    }

    /// How far ahead of its theoretical time a slot may be given: what makes the burst.
    fn tolerance(&self) -> Duration {
        self.interval() * (self.burst() - 1)
    }
}

/// Why a device was refused instead of queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `connect_queue` devices are already waiting.
    QueueFull,
    /// The next free slot is further away than `queue_timeout_ms`.
    QueueTimeout,
}

/// The outcome of one reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Decision {
    Go,
    WaitUntil(Instant),
    Refuse(Refusal),
}

/// One GCRA bucket: `tat` is the theoretical time of the next connect at an empty bucket
/// (`None` before the first connect).
#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    tat: Option<Instant>,
}

impl Bucket {
    /// The earliest instant, not before `now`, at which one more connect conforms, and
    /// the bucket's `tat` once that connect is taken.
    fn next_slot(&self, limits: &PacingLimits, now: Instant) -> (Instant, Instant) {
        let start = self.tat.map_or(now, |tat| tat.max(now));
        let slot = start
            .checked_sub(limits.tolerance())
            .map_or(now, |early| early.max(now));
        (slot, start + limits.interval())
    }
}

/// What the mutex guards. Two buckets of the same rate: `booked` hands out slots when
/// devices arrive (what the queue and its timeout are judged by), `released` counts
/// connects when they really go. They agree while waiters wake on time; after a stall
/// (the agent's threads busy or descheduled) the overdue waiters wake together, and
/// `released` holds them to the burst instead of letting them all connect at once.
#[derive(Debug, Default)]
struct Schedule {
    booked: Bucket,
    released: Bucket,
    /// Devices holding a future slot and sleeping until it.
    waiting: u32,
}

impl Schedule {
    /// Reserves a slot for a connect asked for at `now`, or refuses it. A refusal takes
    /// nothing: the schedule is unchanged, so refused devices cost later ones no time.
    fn reserve(&mut self, limits: &PacingLimits, now: Instant) -> Decision {
        let (slot, booked) = self.booked.next_slot(limits, now);
        let (release, released) = self.released.next_slot(limits, now);
        if slot <= now && release <= now {
            self.booked.tat = Some(booked);
            self.released.tat = Some(released);
            return Decision::Go;
        }
        let slot = slot.max(release);
        if self.waiting >= limits.queue {
            return Decision::Refuse(Refusal::QueueFull);
        }
        if slot - now > limits.queue_timeout {
            return Decision::Refuse(Refusal::QueueTimeout);
        }
        self.waiting += 1;
        self.booked.tat = Some(booked);
        Decision::WaitUntil(slot)
    }

    /// A waiter woke at `now`: it goes if one more connect conforms now, else it learns
    /// when to look again.
    fn release(&mut self, limits: &PacingLimits, now: Instant) -> Result<(), Instant> {
        let (release, released) = self.released.next_slot(limits, now);
        if release > now {
            return Err(release);
        }
        self.released.tat = Some(released);
        Ok(())
    }
}

/// Paces one backend's new connections (shared by every frontend using the backend).
#[derive(Debug)]
pub struct Pacer {
    limits: PacingLimits,
    schedule: Mutex<Schedule>,
}

impl Pacer {
    pub fn new(limits: PacingLimits) -> Self {
        Self {
            limits,
            schedule: Mutex::default(),
        }
    }

    pub fn limits(&self) -> PacingLimits {
        self.limits
    }

    /// Returns when this connect may go (at once, or after sleeping until its slot), or
    /// refuses it. Counted in `metrics`; `connect_queue_depth` holds the sleepers.
    pub async fn admit(&self, metrics: &BackendMetrics) -> Result<(), Refusal> {
        let decision = self.lock().reserve(&self.limits, Instant::now());
        let slot = match decision {
            Decision::Go => return Ok(()),
            Decision::WaitUntil(slot) => slot,
            Decision::Refuse(refusal) => {
                let counter = match refusal {
                    Refusal::QueueFull => &metrics.connects_refused_queue_full,
                    Refusal::QueueTimeout => &metrics.connects_refused_queue_timeout,
                };
                metrics::add(counter, 1);
                return Err(refusal);
            }
        };
        metrics::add(&metrics.connects_paced, 1);
        // Held across the sleep: a device that goes away while waiting (its task dropped)
        // leaves the queue too. Its slot stays used, which errs on the hub's side.
        let _waiter = Waiter::new(self, metrics);
        let mut at = slot;
        loop {
            tokio::time::sleep_until(at).await;
            let released = self.lock().release(&self.limits, Instant::now());
            match released {
                Ok(()) => return Ok(()),
                Err(later) => at = later,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // The schedule stays consistent even if a holder panicked: every update is one
        // assignment.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One device sleeping for its slot: counted in the queue until dropped.
struct Waiter<'a> {
    pacer: &'a Pacer,
    metrics: &'a BackendMetrics,
}

impl<'a> Waiter<'a> {
    /// `Schedule::reserve` already counted it in `waiting`; this mirrors it in the gauge.
    fn new(pacer: &'a Pacer, metrics: &'a BackendMetrics) -> Self {
        metrics::add(&metrics.connect_queue_depth, 1);
        Self { pacer, metrics }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut schedule = self.pacer.lock();
        schedule.waiting = schedule.waiting.saturating_sub(1);
        metrics::sub(&self.metrics.connect_queue_depth, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rate_per_sec: u32, queue: u32, timeout_ms: u64) -> PacingLimits {
        PacingLimits {
            rate_per_sec,
            queue,
            queue_timeout: Duration::from_millis(timeout_ms),
        }
    }

    /// Offsets from `t0` of the slots given to `n` connects asked for at `t0`, none of
    /// them released (the queue is large enough).
    fn slots_at_once(limits: &PacingLimits, n: usize) -> Vec<Duration> {
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        (0..n)
            .map(|_| match schedule.reserve(limits, t0) {
                Decision::Go => Duration::ZERO,
                Decision::WaitUntil(slot) => slot - t0,
                Decision::Refuse(r) => panic!("refused: {r:?}"),
            })
            .collect()
    }

    /// The most slots inside any closed window `[s, s + width]`.
    fn max_in_window(slots: &[Duration], width: Duration) -> usize {
        let mut sorted = slots.to_vec();
        sorted.sort();
        let mut best = 0;
        let mut first = 0;
        for last in 0..sorted.len() {
            while sorted[last] - sorted[first] > width {
                first += 1;
            }
            best = best.max(last - first + 1);
        }
        best
    }

    #[test]
    fn burst_and_interval_follow_the_rate() {
        let l = limits(500, 10_000, 30_000);
        assert_eq!((l.burst(), l.interval()), (50, Duration::from_millis(2)));
        assert_eq!(limits(1, 1, 1).burst(), 1);
        assert_eq!(limits(6_000, 1, 1).burst(), 600);
        // 1/3 s is not a whole number of nanoseconds: rounded up, never faster than asked.
        assert_eq!(
            limits(3, 1, 1).interval(),
            Duration::from_nanos(333_333_334)
        );
    }

    #[test]
    fn a_storm_gets_the_burst_at_once_then_one_slot_per_interval() {
        let l = limits(500, 10_000, 30_000);
        let slots = slots_at_once(&l, 2_000);
        assert!(
            slots[..50].iter().all(|s| s.is_zero()),
            "the burst goes at once"
        );
        for (k, slot) in slots.iter().enumerate().skip(50) {
            let expected = Duration::from_millis(2) * u32::try_from(k - 49).unwrap();
            assert_eq!(*slot, expected, "connect {k}");
        }
        // Any one second: the burst plus one second's rate, and no more.
        assert_eq!(max_in_window(&slots, Duration::from_secs(1)), 550);
        assert_eq!(slots[1_999], Duration::from_millis(3_900));
    }

    #[test]
    fn waiters_waking_on_time_are_released_at_once() {
        let l = limits(500, 10_000, 30_000);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        let mut slots = Vec::new();
        for _ in 0..2_000 {
            if let Decision::WaitUntil(slot) = schedule.reserve(&l, t0) {
                slots.push(slot);
            }
        }
        assert_eq!(slots.len(), 1_950);
        for slot in slots {
            assert_eq!(schedule.release(&l, slot), Ok(()), "at {:?}", slot - t0);
        }
    }

    #[test]
    fn waiters_woken_late_together_go_no_faster_than_the_burst() {
        let l = limits(100, 1_000, 30_000);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        // 10 go at once, 30 wait for slots 10 ms apart (the last at 300 ms).
        for _ in 0..40 {
            schedule.reserve(&l, t0);
        }
        // The agent stalls for half a second: all 30 are overdue when it resumes.
        let resumed = t0 + Duration::from_millis(500);
        let went = (0..30)
            .filter(|_| schedule.release(&l, resumed).is_ok())
            .count();
        assert_eq!(
            went, 10,
            "a stall must not turn into a spike: the burst goes, no more"
        );
        assert_eq!(
            schedule.release(&l, resumed),
            Err(resumed + Duration::from_millis(10))
        );
        // A newcomer during the catch-up waits too, although the booked schedule is idle.
        assert_eq!(
            schedule.reserve(&l, resumed),
            Decision::WaitUntil(resumed + Duration::from_millis(10))
        );
    }

    #[test]
    fn arrivals_spread_over_time_never_beat_burst_plus_rate() {
        let l = limits(100, u32::MAX, 3_600_000);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        let mut slots = Vec::new();
        // Irregular arrivals: bunches, gaps, idle spells (a fixed pseudo-random walk).
        let mut at = Duration::ZERO;
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..5_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            at += Duration::from_micros(seed % 40_000);
            match schedule.reserve(&l, t0 + at) {
                Decision::Go => slots.push(at),
                Decision::WaitUntil(slot) => {
                    // Wakes on time and goes (the queue bookkeeping is the Waiter's job).
                    assert_eq!(schedule.release(&l, slot), Ok(()));
                    slots.push(slot - t0);
                    schedule.waiting -= 1;
                }
                Decision::Refuse(r) => panic!("refused: {r:?}"),
            }
        }
        for width_ms in [10, 100, 1_000, 5_000] {
            let width = Duration::from_millis(width_ms);
            let bound = 10 + usize::try_from(width_ms / 10).unwrap();
            let seen = max_in_window(&slots, width);
            assert!(seen <= bound, "{seen} slots in {width:?}, bound {bound}");
        }
    }

    #[test]
    fn a_full_queue_refuses_at_once_and_takes_no_slot() {
        let l = limits(1, 5, 30_000);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        let decisions: Vec<Decision> = (0..20).map(|_| schedule.reserve(&l, t0)).collect();
        assert_eq!(decisions[0], Decision::Go);
        for (k, d) in decisions.iter().enumerate().take(6).skip(1) {
            let secs = u64::try_from(k).unwrap();
            assert_eq!(*d, Decision::WaitUntil(t0 + Duration::from_secs(secs)));
        }
        assert!(
            decisions[6..]
                .iter()
                .all(|d| *d == Decision::Refuse(Refusal::QueueFull))
        );
        // One waiter leaves: the next device gets the slot after the last one given.
        schedule.waiting -= 1;
        assert_eq!(
            schedule.reserve(&l, t0),
            Decision::WaitUntil(t0 + Duration::from_secs(6))
        );
    }

    #[test]
    fn a_slot_beyond_the_queue_timeout_is_refused() {
        let l = limits(2, 100, 1_200);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        let decisions: Vec<Decision> = (0..10).map(|_| schedule.reserve(&l, t0)).collect();
        assert_eq!(decisions[0], Decision::Go);
        assert_eq!(
            decisions[1],
            Decision::WaitUntil(t0 + Duration::from_millis(500))
        );
        assert_eq!(
            decisions[2],
            Decision::WaitUntil(t0 + Duration::from_millis(1_000))
        );
        assert!(
            decisions[3..]
                .iter()
                .all(|d| *d == Decision::Refuse(Refusal::QueueTimeout))
        );
        // Later, the schedule has room again.
        assert_eq!(
            schedule.reserve(&l, t0 + Duration::from_millis(1_400)),
            Decision::WaitUntil(t0 + Duration::from_millis(1_500))
        );
    }

    #[test]
    fn an_idle_spell_refills_the_burst_and_no_more() {
        let l = limits(100, 1_000, 30_000);
        let t0 = Instant::now();
        let mut schedule = Schedule::default();
        for _ in 0..500 {
            schedule.reserve(&l, t0);
        }
        let later = t0 + Duration::from_secs(60);
        schedule.waiting = 0;
        let goes = (0..100)
            .filter(|_| schedule.reserve(&l, later) == Decision::Go)
            .count();
        assert_eq!(
            goes, 10,
            "after an idle minute: the burst, not a minute's worth"
        );
    }

    #[tokio::test]
    async fn admit_sleeps_until_the_slot_and_counts() {
        let pacer = std::sync::Arc::new(Pacer::new(limits(10, 1, 30_000)));
        let counters = std::sync::Arc::new(BackendMetrics::default());
        let t0 = Instant::now();
        pacer.admit(&counters).await.unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(50),
            "the burst of one goes at once"
        );
        let (p, m) = (pacer.clone(), counters.clone());
        let waiter = tokio::spawn(async move { p.admit(&m).await });
        tokio::task::yield_now().await;
        assert_eq!(metrics::get(&counters.connect_queue_depth), 1);
        assert_eq!(pacer.admit(&counters).await, Err(Refusal::QueueFull));
        waiter.await.unwrap().unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(100),
            "released before its slot"
        );
        assert_eq!(metrics::get(&counters.connect_queue_depth), 0);
        assert_eq!(metrics::get(&counters.connects_paced), 1);
        assert_eq!(metrics::get(&counters.connects_refused_queue_full), 1);
    }
}
