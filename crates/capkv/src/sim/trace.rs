//! The trace of a simulated run: every message sent, delivered, lost or answered, every
//! client operation and every fault, each stamped with the simulated time. Its hash is
//! what `capkv sim` prints as `trace <hash>`: two runs of one seed must give the same
//! hash, bit for bit, or the simulation is not deterministic (a test checks this).

use std::fmt::Write as _;
use std::sync::Mutex;

use xxhash_rust::xxh3::Xxh3;

use crate::rt::Instant;

pub struct Trace {
    start: Instant,
    state: Mutex<State>,
}

struct State {
    hash: Xxh3,
    events: u64,
    /// The events as text, when asked for (`--trace FILE`).
    lines: Option<String>,
}

/// Feeds formatted text into the hash without building a string.
struct Hashing<'a>(&'a mut Xxh3);

impl std::fmt::Write for Hashing<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

impl Trace {
    /// A trace that starts now; `keep_lines` keeps the events as text too.
    pub fn new(keep_lines: bool) -> Trace {
        Trace {
            start: Instant::now(),
            state: Mutex::new(State {
                hash: Xxh3::new(),
                events: 0,
                lines: keep_lines.then(String::new),
            }),
        }
    }

    /// Simulated microseconds since the trace began.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Records one event.
    pub fn event(&self, what: std::fmt::Arguments<'_>) {
        let at = self.now_us();
        let mut st = self.state.lock().expect("trace lock poisoned");
        st.events += 1;
        let _ = writeln!(Hashing(&mut st.hash), "{at} {what}");
        if let Some(lines) = &mut st.lines {
            let _ = writeln!(lines, "{:>12.6} {what}", at as f64 / 1e6);
        }
    }

    /// The hash of every event so far, and how many there were.
    pub fn digest(&self) -> (u64, u64) {
        let st = self.state.lock().expect("trace lock poisoned");
        (st.hash.digest(), st.events)
    }

    /// The events as text, if kept.
    pub fn lines(&self) -> Option<String> {
        self.state
            .lock()
            .expect("trace lock poisoned")
            .lines
            .clone()
    }
}
