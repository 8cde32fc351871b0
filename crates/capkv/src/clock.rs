//! The node's wall clock: the one place a node reads the time of day.
//!
//! Nodes share no clock. Wall time enters decisions in only a few places, each of which
//! reads it through the node's [`WallClock`]: the hybrid-logical-clock stamps of `lww`
//! writes and the `written_at_ms` of register siblings (`ap::coordinator`), and once in a
//! cluster's life the start of its cluster time (`cp::proposer::ClusterClock`, which
//! dates idempotency records and from then on follows the leaders' monotonic clocks). Everything that measures an
//! interval (deadlines, timeouts, reachability, grace periods) uses the monotonic clock
//! (`Instant`, tokio timers) instead and is not affected by anything here.
//!
//! The clock carries a **skew**, set through `POST /v1/faults {"clock_skew_ms": N}`, so the
//! `clock` nemesis of `capkv check` can make one node's wall clock read N ms off without
//! touching the machine's clock. The time source itself is injectable
//! ([`WallClock::with_source`]) so a simulation can drive it.

use std::sync::atomic::{AtomicI64, Ordering};

pub use capkv_core::validate::MAX_CLOCK_SKEW_MS;

/// Reads milliseconds since the Unix epoch.
pub type TimeSource = Box<dyn Fn() -> u64 + Send + Sync>;

/// Milliseconds since the Unix epoch by the operating system's clock (0 if it reads
/// before the epoch).
pub fn system_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A node's wall clock: a time source plus a skew (0 unless a fault sets one).
pub struct WallClock {
    source: TimeSource,
    skew_ms: AtomicI64,
}

impl Default for WallClock {
    fn default() -> Self {
        WallClock::system()
    }
}

impl std::fmt::Debug for WallClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WallClock")
            .field("skew_ms", &self.skew_ms())
            .finish_non_exhaustive()
    }
}

impl WallClock {
    /// The operating system's clock, without skew.
    pub fn system() -> WallClock {
        WallClock::with_source(system_ms)
    }

    /// A clock that reads `source` (ms since the Unix epoch), for tests and simulation.
    pub fn with_source(source: impl Fn() -> u64 + Send + Sync + 'static) -> WallClock {
        WallClock {
            source: Box::new(source),
            skew_ms: AtomicI64::new(0),
        }
    }

    /// Milliseconds since the Unix epoch as this node believes: the source plus the skew,
    /// saturating at 0 and `u64::MAX`.
    pub fn now_ms(&self) -> u64 {
        (self.source)().saturating_add_signed(self.skew_ms())
    }

    /// The skew in force, in ms (negative: this clock is behind).
    pub fn skew_ms(&self) -> i64 {
        self.skew_ms.load(Ordering::Relaxed)
    }

    /// Makes this clock read `skew_ms` off its source from now on. The API bounds it to
    /// ±[`MAX_CLOCK_SKEW_MS`]; any value is safe here (reads saturate).
    pub fn set_skew_ms(&self, skew_ms: i64) {
        self.skew_ms.store(skew_ms, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    #[test]
    fn skew_moves_the_reading_both_ways_and_saturates() {
        let t = Arc::new(AtomicU64::new(1_000_000));
        let clock = {
            let t = t.clone();
            WallClock::with_source(move || t.load(Ordering::Relaxed))
        };
        assert_eq!((clock.now_ms(), clock.skew_ms()), (1_000_000, 0));
        clock.set_skew_ms(5_000);
        assert_eq!(clock.now_ms(), 1_005_000);
        t.store(2_000_000, Ordering::Relaxed);
        assert_eq!(clock.now_ms(), 2_005_000, "the skew follows the source");
        clock.set_skew_ms(-500_000);
        assert_eq!((clock.now_ms(), clock.skew_ms()), (1_500_000, -500_000));
        clock.set_skew_ms(-3_000_000);
        assert_eq!(clock.now_ms(), 0, "saturates at the epoch");
        t.store(u64::MAX - 10, Ordering::Relaxed);
        clock.set_skew_ms(MAX_CLOCK_SKEW_MS);
        assert_eq!(clock.now_ms(), u64::MAX, "saturates at the top");
        clock.set_skew_ms(0);
        assert_eq!(clock.now_ms(), u64::MAX - 10);
    }

    #[test]
    fn the_system_clock_reads_the_time_of_day() {
        let clock = WallClock::system();
        clock.set_skew_ms(-60_000);
        let (before, skewed) = (system_ms(), clock.now_ms());
        // A minute behind, give or take the moment between the two reads.
        assert!(skewed + 60_000 >= before && skewed + 60_000 <= system_ms());
        // After 2020-01-01: a clock reading "0" would be a bug, not a skew.
        assert!(before > 1_577_836_800_000);
    }
}
