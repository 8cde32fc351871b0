//! The linearizability checker: Wing & Gong's search with Lowe's memoization, as in Knossos
//! and Porcupine.
//!
//! A history is linearizable if every operation can be given one instant between its invoke
//! and its completion such that, taken in the order of those instants, the operations are a
//! legal run of the sequential [`Model`]. The search builds such an order one operation at a
//! time:
//!
//! ```text
//!   entries, sorted by time:   c1  c2  r1  c3  r2  r3     (c = invoke, r = completion)
//!   try the calls before the first completion in the list (c1, c2): step the model;
//!   if legal, lift the op's two entries out of the list and start again from the head;
//!   if a completion comes first, the op it completes was not linearized in time: undo the
//!   last choice (pop the stack) and try the next call after it.
//! ```
//!
//! Lowe's memoization makes it practical: a configuration (set of linearized operations,
//! model state) that was reached once is never explored again, because what can follow it
//! depends on nothing else. Operations with an unknown outcome have no completion: they may
//! be linearized at any point after their invoke, or never; the search is done when every
//! operation that must have happened has.
//!
//! Each key is checked on its own (P-compositionality: a history is linearizable iff each
//! key's sub-history is), which is what makes long histories checkable at all.
//!
//! **Unknown outcomes** are what makes a search blow up: each one that is pending can be
//! linearized at every point, and each subset of them is a different configuration. Three
//! rules, each of which only drops configurations that cannot succeed where another did not,
//! keep them in check:
//!
//! - *lazily*: at each configuration the calls that must take effect are tried first, then
//!   the unknown ones, so a lost write is placed where something needs it;
//! - *not for nothing*: an unknown op whose step leaves the state as it was is not tried
//!   (the configuration without it can do all the one with it can);
//! - *one of equals*: of pending unknown ops with equal model operations only the first is
//!   tried (they are interchangeable). The driver gives every lost write whose value nobody
//!   observed the same value, so these are equal (see `check_key`).
//!
//! **Bounded**: a time budget and a memory budget for the memo table. A search that hits
//! either stops and says [`Verdict::Unknown`], never valid.
//!
//! The cache key is compact: with operations numbered in invoke order and `p` the first
//! operation that must be linearized and is not, a configuration is `p`, a 128-bit
//! fingerprint of the linearized unknown-outcome operations, and the bitset from `p` on. Its
//! size is the width of the concurrency window, not the length of the history. (A
//! fingerprint collision could only make the search skip a configuration it had not seen:
//! at worst a wrong invalid, with odds of about 2^-128 a pair; never a wrong valid, which
//! needs a whole linearization in hand.)

use std::collections::HashSet;
use std::fmt::Debug;
use std::hash::Hash;
use std::time::{Duration, Instant};

use serde::Serialize;

/// A sequential specification: a state and a partial transition function.
pub trait Model {
    type State: Clone + Eq + Hash + Debug;
    type Op: Clone + Debug + PartialEq;

    fn init(&self) -> Self::State;
    /// The state after `op` in `state`, or None if `op` could not have done what the
    /// history says it did in that state.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
    /// A human form of a state, for reports.
    fn describe(&self, state: &Self::State) -> String;
}

/// One operation of a sub-history, ready for the search.
#[derive(Debug, Clone)]
pub struct LinOp<O> {
    /// The history's operation id, for reports.
    pub id: u64,
    pub op: O,
    pub call_us: u64,
    /// None: the outcome is unknown; it may take effect at any time after `call_us`, or never.
    pub ret_us: Option<u64>,
}

/// How much the search may spend.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub deadline: Instant,
    /// Bytes the memo table may hold (keys and states, estimated).
    pub memory_bytes: usize,
}

impl Budget {
    pub fn new(time: Duration, memory_bytes: usize) -> Budget {
        Budget {
            deadline: Instant::now() + time,
            memory_bytes,
        }
    }
}

/// Where the search got stuck furthest into the history: the smallest counterexample.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stuck {
    /// How many operations were linearized in the longest linearizable prefix found.
    pub prefix_len: usize,
    /// The last operations of that prefix, in linearization order (at most 32).
    pub prefix_tail: Vec<u64>,
    /// The operation that could not be linearized before it completed.
    pub op: u64,
    /// The operations invoked before it completed and not yet linearized: the ones tried.
    pub pending: Vec<u64>,
    /// The model states this point was reached with (at most 8).
    pub states: Vec<String>,
}

/// The verdict on one sub-history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid(Stuck),
    /// The budget ran out; says which.
    Unknown(String),
}

const PREFIX_TAIL_MAX: usize = 32;
const STATES_MAX: usize = 8;
const NIL: usize = usize::MAX;

/// One entry of the search's list: an operation's invoke or completion.
#[derive(Clone, Copy)]
struct Entry {
    op: usize,
    is_call: bool,
    /// For a call: the index of its completion entry, or NIL (unknown outcome).
    partner: usize,
}

/// The search over one sub-history (see the module docs).
struct Search<'a, M: Model> {
    model: &'a M,
    /// Operations in invoke order.
    ops: Vec<&'a LinOp<M::Op>>,
    required: Vec<bool>,
    /// Entry 0 is the head sentinel; the rest are calls and completions sorted by time.
    entries: Vec<Entry>,
    next: Vec<usize>,
    prev: Vec<usize>,
    linearized: Vec<u64>,
    /// Required operations not yet linearized.
    remaining: usize,
    /// `p`: the first required operation not linearized.
    first_open: usize,
    /// An upper bound on the highest linearized operation.
    highest: usize,
    /// Linearized unknown-outcome operations, in the order they were linearized.
    unknown_stack: Vec<usize>,
    /// Their fingerprint: the XOR of their `zobrist` words.
    unknown_hash: u128,
    /// (call entry, state before it) for each linearized operation.
    stack: Vec<(usize, M::State)>,
    state: M::State,
    best: Option<Stuck>,
}

impl<'a, M: Model> Search<'a, M> {
    fn new(model: &'a M, ops: &'a [LinOp<M::Op>]) -> Self {
        let mut ops: Vec<&LinOp<M::Op>> = ops.iter().collect();
        ops.sort_by_key(|o| (o.call_us, o.id));
        let n = ops.len();
        let required: Vec<bool> = ops.iter().map(|o| o.ret_us.is_some()).collect();
        let remaining = required.iter().filter(|r| **r).count();
        // A call sorts before a completion at the same instant: touching intervals are
        // concurrent, which never rejects a valid history.
        let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
        for (i, o) in ops.iter().enumerate() {
            events.push((o.call_us, 0, i));
            if let Some(r) = o.ret_us {
                events.push((r.max(o.call_us), 1, i));
            }
        }
        events.sort_unstable();
        let mut entries = vec![Entry {
            op: NIL,
            is_call: false,
            partner: NIL,
        }];
        let mut call_entry = vec![NIL; n];
        for &(_, kind, i) in &events {
            let idx = entries.len();
            let is_call = kind == 0;
            entries.push(Entry {
                op: i,
                is_call,
                partner: NIL,
            });
            if is_call {
                call_entry[i] = idx;
            } else {
                entries[call_entry[i]].partner = idx;
            }
        }
        let m = entries.len();
        let next = (0..m)
            .map(|i| if i + 1 < m { i + 1 } else { NIL })
            .collect();
        let prev = (0..m).map(|i| if i == 0 { NIL } else { i - 1 }).collect();
        Search {
            model,
            ops,
            required,
            entries,
            next,
            prev,
            linearized: vec![0u64; n.div_ceil(64)],
            remaining,
            first_open: 0,
            highest: 0,
            unknown_stack: Vec::new(),
            unknown_hash: 0,
            stack: Vec::new(),
            state: model.init(),
            best: None,
        }
    }

    fn is_linearized(&self, i: usize) -> bool {
        self.linearized[i / 64] & (1 << (i % 64)) != 0
    }

    fn unlink(&mut self, x: usize) {
        let (p, nx) = (self.prev[x], self.next[x]);
        self.next[p] = nx;
        if nx != NIL {
            self.prev[nx] = p;
        }
    }

    /// Puts back an entry removed by `unlink`; entries come back in the reverse order.
    fn relink(&mut self, x: usize) {
        let (p, nx) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        if nx != NIL {
            self.prev[nx] = x;
        }
    }

    /// The configuration key: `[p, the fingerprint of the linearized unknown-outcome ops
    /// (two words), the bitset words from p/64 up to the highest linearized op]`. With `p`,
    /// the required ops below it are all linearized; the fingerprint names the unknown ones;
    /// the bitset the rest. Its size is the width of the concurrency window.
    fn key(&self, unknown_hash: u128) -> Box<[u64]> {
        let p = self.first_open;
        let words = self.linearized.len();
        let lo = (p / 64).min(words);
        let hi = (self.highest / 64 + 1).max(lo).min(words);
        let mut key = Vec::with_capacity(3 + hi - lo);
        key.push(p as u64);
        key.push(unknown_hash as u64);
        key.push((unknown_hash >> 64) as u64);
        key.extend_from_slice(&self.linearized[lo..hi]);
        key.into_boxed_slice()
    }

    /// Linearizes the op of call entry `ce` with its new state.
    fn lift(&mut self, ce: usize, new_state: M::State) {
        let e = self.entries[ce];
        let i = e.op;
        self.linearized[i / 64] |= 1 << (i % 64);
        self.highest = self.highest.max(i);
        if self.required[i] {
            self.remaining -= 1;
            if i == self.first_open {
                let n = self.ops.len();
                while self.first_open < n
                    && (!self.required[self.first_open] || self.is_linearized(self.first_open))
                {
                    self.first_open += 1;
                }
            }
        } else {
            self.unknown_stack.push(i);
            self.unknown_hash ^= zobrist(i);
        }
        let before = std::mem::replace(&mut self.state, new_state);
        self.stack.push((ce, before));
        self.unlink(ce);
        if e.partner != NIL {
            self.unlink(e.partner);
        }
    }

    /// Undoes the last `lift`; returns the entry to try next (the one after its call), and
    /// whether the op undone must take effect.
    fn unlift(&mut self) -> Option<(usize, bool)> {
        let (ce, before) = self.stack.pop()?;
        let e = self.entries[ce];
        let i = e.op;
        if e.partner != NIL {
            self.relink(e.partner);
        }
        self.relink(ce);
        self.state = before;
        self.linearized[i / 64] &= !(1 << (i % 64));
        while self.highest > 0 && !self.is_linearized(self.highest) {
            self.highest -= 1;
        }
        if self.required[i] {
            self.remaining += 1;
            self.first_open = self.first_open.min(i);
        } else {
            self.unknown_hash ^= zobrist(i);
            let popped = self.unknown_stack.pop();
            debug_assert_eq!(popped, Some(i), "unknown ops are undone in LIFO order");
        }
        Some((self.next[ce], self.required[i]))
    }

    /// Remembers the point where the search got stuck deepest: the counterexample.
    fn record_stuck(&mut self, stuck_entry: usize) {
        let depth = self.stack.len();
        let op = self.ops[self.entries[stuck_entry].op].id;
        match &mut self.best {
            Some(b) if b.prefix_len > depth => {}
            Some(b) if b.prefix_len == depth => {
                let s = self.model.describe(&self.state);
                if b.op == op && b.states.len() < STATES_MAX && !b.states.contains(&s) {
                    b.states.push(s);
                }
            }
            _ => {
                let mut pending = Vec::new();
                let mut x = self.next[0];
                while x != NIL && x != stuck_entry {
                    if self.entries[x].is_call {
                        pending.push(self.ops[self.entries[x].op].id);
                    }
                    x = self.next[x];
                }
                let tail_start = depth.saturating_sub(PREFIX_TAIL_MAX);
                self.best = Some(Stuck {
                    prefix_len: depth,
                    prefix_tail: self.stack[tail_start..]
                        .iter()
                        .map(|(ce, _)| self.ops[self.entries[*ce].op].id)
                        .collect(),
                    op,
                    pending,
                    states: vec![self.model.describe(&self.state)],
                });
            }
        }
    }

    fn invalid(&mut self) -> Verdict {
        Verdict::Invalid(self.best.take().unwrap_or(Stuck {
            prefix_len: 0,
            prefix_tail: Vec::new(),
            op: self.ops.first().map(|o| o.id).unwrap_or(0),
            pending: Vec::new(),
            states: Vec::new(),
        }))
    }

    /// Whether an unknown-outcome op equal to the one of call entry `e` comes before it in
    /// the list. Every entry before `e` is a call (the scan stops at the first completion),
    /// so both ops are invoked and neither must complete: they are interchangeable, and
    /// linearizing the first is as good as linearizing either (this keeps k identical lost
    /// writes from making 2^k configurations).
    fn same_unknown_before(&self, e: usize) -> bool {
        let op = &self.ops[self.entries[e].op].op;
        let mut x = self.next[0];
        while x != e && x != NIL {
            let j = self.entries[x].op;
            if !self.required[j] && self.ops[j].op == *op {
                return true;
            }
            x = self.next[x];
        }
        false
    }

    fn run(&mut self, budget: Budget) -> Verdict {
        let mut cache: HashSet<(Box<[u64]>, M::State)> = HashSet::new();
        let mut cache_bytes = 0usize;
        let mut steps = 0u64;
        let mut entry = self.next[0];
        // Each configuration tries the calls of the ops that must take effect first, then
        // (`lazy`) those with an unknown outcome: a lost write is linearized where something
        // needs it, not wherever it fits first. (Trying it early and finding out thousands
        // of operations later that it was needed elsewhere is what makes long histories
        // with lost writes blow up.) Either order finds a linearization if there is one.
        let mut lazy = false;
        while self.remaining > 0 {
            steps += 1;
            if steps.is_multiple_of(4096) && Instant::now() > budget.deadline {
                return Verdict::Unknown(format!(
                    "time budget spent after {steps} steps ({} configurations)",
                    cache.len()
                ));
            }
            if entry == NIL || !self.entries[entry].is_call {
                if !lazy {
                    // Now the unknown-outcome calls before this completion.
                    lazy = true;
                    entry = self.next[0];
                    continue;
                }
                // A completion came before its op was linearized: undo the last choice.
                if entry != NIL {
                    self.record_stuck(entry);
                }
                match self.unlift() {
                    Some((e, required)) => (entry, lazy) = (e, !required),
                    None => return self.invalid(),
                }
                continue;
            }
            let i = self.entries[entry].op;
            if self.required[i] == lazy {
                entry = self.next[entry];
                continue;
            }
            if lazy && self.same_unknown_before(entry) {
                entry = self.next[entry];
                continue;
            }
            let Some(new_state) = self.model.step(&self.state, &self.ops[i].op) else {
                entry = self.next[entry];
                continue;
            };
            if !self.required[i] && new_state == self.state {
                // An unknown-outcome op that changes nothing here (a delete of an absent
                // key) is never worth linearizing: without it, every continuation is still
                // open, and it stays available for later.
                entry = self.next[entry];
                continue;
            }
            // Look the configuration up as if i were linearized.
            self.linearized[i / 64] |= 1 << (i % 64);
            let (saved_open, saved_high) = (self.first_open, self.highest);
            self.highest = self.highest.max(i);
            if self.required[i] && i == self.first_open {
                let n = self.ops.len();
                while self.first_open < n
                    && (!self.required[self.first_open] || self.is_linearized(self.first_open))
                {
                    self.first_open += 1;
                }
            }
            let key = self.key(if self.required[i] {
                self.unknown_hash
            } else {
                self.unknown_hash ^ zobrist(i)
            });
            self.linearized[i / 64] &= !(1 << (i % 64));
            self.first_open = saved_open;
            self.highest = saved_high;
            let bytes = 64 + 8 * key.len() + std::mem::size_of::<M::State>();
            if cache.insert((key, new_state.clone())) {
                cache_bytes += bytes;
                if cache_bytes > budget.memory_bytes {
                    return Verdict::Unknown(format!(
                        "memory budget of {} MiB spent ({} configurations)",
                        budget.memory_bytes >> 20,
                        cache.len()
                    ));
                }
                self.lift(entry, new_state);
                (entry, lazy) = (self.next[0], false);
            } else {
                entry = self.next[entry];
            }
        }
        Verdict::Valid
    }
}

/// A fixed pseudo-random 128-bit word for op `i` (splitmix64), for the fingerprint of a set
/// of ops. Two different sets get the same fingerprint with a chance of about 2^-128; if
/// they did, the search would skip a configuration it never saw — it could then miss a
/// linearization (a wrong invalid), but never claim one that is not there.
fn zobrist(i: usize) -> u128 {
    let mix = |mut z: u64| {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let i = i as u64;
    ((mix(2 * i) as u128) << 64) | mix(2 * i + 1) as u128
}

/// Checks one sub-history against a model.
pub fn check<M: Model>(model: &M, ops: &[LinOp<M::Op>], budget: Budget) -> Verdict {
    Search::new(model, ops).run(budget)
}
