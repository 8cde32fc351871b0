//! Small hand-made histories with known verdicts: the checker is checked.
//!
//! Each invalid history is invalid in one classic way, and the test names the operation the
//! checker must point at. Times are in microseconds; `[a, b]` is an op's invoke and completion.

use std::time::Duration;

use crate::history::{Call, History, NemesisEvent, Op, Outcome, Ret, RunInfo};
use crate::{check, CheckResult, Limits, Validity};

/// Builds histories one operation at a time.
pub(crate) struct Hb {
    pub h: History,
    next_id: u64,
    key: String,
}

impl Hb {
    pub fn new(workload: &str) -> Hb {
        Hb {
            h: History {
                info: RunInfo {
                    workload: workload.into(),
                    nodes: vec!["n1".into(), "n2".into(), "n3".into()],
                    ..RunInfo::default()
                },
                ..History::default()
            },
            next_id: 0,
            key: "k".into(),
        }
    }

    /// The key of the operations pushed from now on.
    pub fn key(&mut self, key: &str) -> &mut Hb {
        self.key = key.into();
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub fn push(
        &mut self,
        client: u64,
        call: Call,
        invoke_us: u64,
        complete_us: Option<u64>,
        outcome: Outcome,
        ret: Option<Ret>,
        status: Option<u16>,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.h.ops.push(Op {
            id,
            client,
            node: format!("n{}", client % 3 + 1),
            key: self.key.clone(),
            call,
            invoke_us,
            complete_us,
            outcome,
            ret,
            status,
            error: match outcome {
                Outcome::Ok => None,
                Outcome::Fail => Some("unavailable".into()),
                Outcome::Unknown => Some("timed out".into()),
            },
        });
        id
    }

    pub fn ok(&mut self, client: u64, call: Call, t: (u64, u64), ret: Option<Ret>) -> u64 {
        self.push(client, call, t.0, Some(t.1), Outcome::Ok, ret, Some(200))
    }

    /// Answered 503: certainly not applied.
    pub fn fail(&mut self, client: u64, call: Call, t: (u64, u64)) -> u64 {
        self.push(client, call, t.0, Some(t.1), Outcome::Fail, None, Some(503))
    }

    /// Answered 409: the condition did not hold.
    pub fn mismatch(&mut self, client: u64, call: Call, t: (u64, u64)) -> u64 {
        let ret = Some(Ret::Mismatch);
        self.push(client, call, t.0, Some(t.1), Outcome::Fail, ret, Some(409))
    }

    /// Timed out at `gave_up` (or never answered): may take effect at any time after invoke.
    pub fn unknown(&mut self, client: u64, call: Call, invoke: u64, gave_up: Option<u64>) -> u64 {
        self.push(client, call, invoke, gave_up, Outcome::Unknown, None, None)
    }

    // Shorthands for the register model (Jepsen's calls).
    pub fn write(&mut self, client: u64, v: &str, t: (u64, u64)) -> u64 {
        self.ok(client, write(v), t, None)
    }

    pub fn read(&mut self, client: u64, v: Option<&str>, t: (u64, u64)) -> u64 {
        self.ok(client, Call::Read, t, Some(value(v, None)))
    }

    // Shorthands for the cp-key model.
    pub fn put(&mut self, client: u64, v: &str, version: u64, t: (u64, u64)) -> u64 {
        self.ok(client, put(v), t, Some(written(version)))
    }

    pub fn get(
        &mut self,
        client: u64,
        v: Option<&str>,
        version: Option<u64>,
        t: (u64, u64),
    ) -> u64 {
        self.ok(client, Call::Read, t, Some(value(v, version)))
    }

    pub fn build(&self) -> History {
        let mut h = self.h.clone();
        h.ops.sort_by_key(|o| (o.invoke_us, o.id));
        h
    }
}

pub(crate) fn write(v: &str) -> Call {
    Call::Write { value: v.into() }
}

pub(crate) fn cas(from: &str, to: &str) -> Call {
    Call::Cas {
        from: from.into(),
        to: to.into(),
    }
}

pub(crate) fn put(v: &str) -> Call {
    Call::Put {
        value: v.into(),
        if_version: None,
        if_value: None,
        idempotency_key: None,
    }
}

pub(crate) fn put_if_version(v: &str, n: u64) -> Call {
    Call::Put {
        value: v.into(),
        if_version: Some(n),
        if_value: None,
        idempotency_key: None,
    }
}

pub(crate) fn put_if_value(v: &str, x: &str) -> Call {
    Call::Put {
        value: v.into(),
        if_version: None,
        if_value: Some(x.into()),
        idempotency_key: None,
    }
}

pub(crate) fn put_idem(v: &str, idem: &str) -> Call {
    Call::Put {
        value: v.into(),
        if_version: None,
        if_value: None,
        idempotency_key: Some(idem.into()),
    }
}

pub(crate) fn value(v: Option<&str>, version: Option<u64>) -> Ret {
    Ret::Value {
        value: v.map(str::to_owned),
        version,
    }
}

pub(crate) fn written(version: u64) -> Ret {
    Ret::Written {
        version: Some(version),
    }
}

pub(crate) fn deleted(d: bool, version: u64) -> Ret {
    Ret::Deleted {
        deleted: d,
        version: Some(version),
    }
}

fn limits() -> Limits {
    Limits {
        time: Duration::from_secs(20),
        memory_bytes: 256 << 20,
    }
}

pub(crate) fn run(b: &Hb) -> CheckResult {
    check(&b.build(), limits())
}

#[track_caller]
pub(crate) fn assert_valid(r: &CheckResult) {
    assert_eq!(
        r.validity,
        Validity::Valid,
        "{:#?} {:?}",
        r.anomalies,
        r.undecided
    );
    assert!(r.anomalies.is_empty());
}

/// Invalid, with a linearizability violation stuck at `stuck` and naming every op of `named`.
#[track_caller]
fn assert_stuck(r: &CheckResult, stuck: u64, named: &[u64]) {
    assert_eq!(r.validity, Validity::Invalid, "{:?}", r.undecided);
    let a = &r.anomalies[0];
    assert_eq!(a.kind, "not-linearizable", "{a:#?}");
    let s = a
        .stuck
        .as_ref()
        .expect("a violation says where it got stuck");
    assert_eq!(s.op, stuck, "the stuck op: {a:#?}");
    assert!(a.ops.contains(&stuck), "{a:#?}");
    for id in named {
        assert!(a.ops.contains(id), "op #{id} is named: {a:#?}");
    }
    let mut once = a.ops.clone();
    once.sort_unstable();
    once.dedup();
    assert_eq!(once.len(), a.ops.len(), "each op named once: {:?}", a.ops);
    assert!(a.message.contains(&format!("#{stuck} ")), "{}", a.message);
}

/// Invalid with an anomaly of `kind` naming `op`.
#[track_caller]
fn assert_anomaly(r: &CheckResult, kind: &str, op: u64) {
    assert_eq!(r.validity, Validity::Invalid, "{:?}", r.undecided);
    assert!(
        r.anomalies
            .iter()
            .any(|a| a.kind == kind && a.ops.contains(&op)),
        "expected {kind} naming #{op}: {:#?}",
        r.anomalies
    );
}

// ---------------------------------------------------------------------------------------
// The register model (Jepsen's register: workload "jepsen-register")

const REG: &str = "jepsen-register";

#[test]
fn register_concurrent_writes_need_the_later_invoked_one_first() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 100)); // long: must take effect after "2"
    b.write(2, "2", (10, 20));
    b.read(3, Some("2"), (30, 40));
    b.read(4, Some("1"), (50, 60));
    b.read(3, Some("1"), (110, 120));
    assert_valid(&run(&b));
}

#[test]
fn register_reads_concurrent_with_a_write_may_see_either_side() {
    let mut b = Hb::new(REG);
    b.write(1, "a", (0, 10));
    b.write(1, "b", (20, 100));
    b.read(2, Some("a"), (25, 30));
    b.read(3, Some("b"), (30, 40));
    // Once a read saw b, a read that starts after it cannot see a: but this one overlaps.
    b.read(2, Some("a"), (35, 50));
    b.ok(4, cas("b", "c"), (60, 70), None);
    b.read(2, Some("c"), (80, 90));
    assert_valid(&run(&b));
}

#[test]
fn register_an_unknown_write_that_a_read_sees_took_effect_even_after_its_timeout() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.unknown(2, write("2"), 5, Some(15)); // the client gave up at 15
    b.read(3, Some("1"), (20, 30)); // not yet applied...
    b.read(3, Some("2"), (40, 50)); // ...applied late
    b.read(1, Some("2"), (60, 70));
    assert_valid(&run(&b));
}

#[test]
fn register_an_unknown_write_never_seen_is_fine() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.unknown(2, write("2"), 5, None);
    b.unknown(4, cas("1", "3"), 6, Some(8));
    b.read(3, Some("1"), (20, 30));
    b.read(3, Some("1"), (40, 50));
    assert_valid(&run(&b));
}

#[test]
fn register_an_unknown_cas_can_only_apply_from_its_from_value() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.unknown(2, cas("1", "2"), 12, None);
    b.write(1, "3", (20, 30));
    // 2 is seen after 3 was written: the cas cannot have applied after 3 (its "from"
    // is 1), so it applied before 3... and then 3 overwrote it: this read is stale.
    let r = b.read(3, Some("2"), (40, 50));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn lost_writes_nobody_saw_are_interchangeable_but_not_with_what_a_read_saw() {
    // Many lost writes of values nobody read: all may or may not have applied.
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    for i in 0..40 {
        b.unknown(2 + i, write(&format!("lost-{i}")), 20 + i, Some(30 + i));
    }
    b.read(1, Some("1"), (100, 110));
    b.write(1, "2", (120, 130));
    b.read(1, Some("2"), (140, 150));
    assert_valid(&run(&b));
    // The checker stands for all of them with one value: a read of a value nobody wrote
    // is still unexplained, even if it happens to be that value.
    for v in ["(a value no read saw)", "lost-7"] {
        let mut b = Hb::new(REG);
        b.write(1, "1", (0, 10));
        b.unknown(2, write("x"), 20, None);
        let r = b.read(1, Some(v), (100, 110));
        assert_stuck(&run(&b), r, &[]);
    }
}

#[test]
fn register_a_failed_cas_observes_a_different_value() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.mismatch(2, cas("2", "3"), (20, 30)); // fine: the value was 1
    b.read(2, Some("1"), (40, 50));
    assert_valid(&run(&b));
    let c = b.mismatch(2, cas("1", "3"), (60, 70)); // the value was 1: the cas must apply
    assert_stuck(&run(&b), c, &[]);
}

#[test]
fn register_stale_read() {
    let mut b = Hb::new(REG);
    let w1 = b.write(1, "1", (0, 10));
    let w2 = b.write(2, "2", (20, 30));
    let r = b.read(3, Some("1"), (40, 50));
    let res = run(&b);
    assert_stuck(&res, r, &[w2]);
    let s = res.anomalies[0].stuck.as_ref().unwrap();
    assert_eq!(s.prefix_len, 2);
    assert_eq!(s.prefix_tail, vec![w1, w2]);
    assert_eq!(s.states, vec!["2".to_owned()]);
}

#[test]
fn register_lost_write() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    let lost = b.write(2, "2", (20, 30));
    let r = b.read(3, Some("1"), (40, 50));
    b.read(1, Some("1"), (60, 70));
    b.read(2, Some("1"), (80, 90));
    assert_stuck(&run(&b), r, &[lost]);
}

#[test]
fn register_read_of_a_value_never_written() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.read(2, Some("1"), (20, 30));
    let r = b.read(3, Some("9"), (40, 50));
    b.write(1, "2", (60, 70));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn register_read_of_absent_after_a_write() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    let r = b.read(2, None, (20, 30));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn register_cas_on_a_stale_value_succeeds() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    let w2 = b.write(2, "2", (20, 30));
    let c = b.ok(3, cas("1", "3"), (40, 50), None);
    assert_stuck(&run(&b), c, &[w2]);
}

#[test]
fn register_a_failed_write_becomes_visible() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.fail(2, write("2"), (20, 30)); // 503: certainly not applied
    let r = b.read(3, Some("2"), (40, 50));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn register_ops_with_no_completion_are_unknown_and_a_read_without_answer_constrains_nothing() {
    let mut b = Hb::new(REG);
    b.write(1, "1", (0, 10));
    b.push(2, write("2"), 20, None, Outcome::Ok, None, None); // ok, never completed
    b.push(3, Call::Read, 30, Some(40), Outcome::Fail, None, Some(503));
    b.push(4, Call::Read, 30, None, Outcome::Unknown, None, None);
    b.read(3, Some("2"), (50, 60));
    assert_valid(&run(&b));
}

#[test]
fn keys_are_checked_on_their_own() {
    let mut b = Hb::new(REG);
    b.key("x");
    b.write(1, "1", (0, 10));
    b.key("y");
    b.write(2, "2", (20, 30));
    b.key("x");
    b.read(3, Some("1"), (40, 50));
    b.key("y");
    b.read(3, Some("2"), (60, 70));
    let r = run(&b);
    assert_valid(&r);
    assert_eq!(r.keys, 2);
    b.key("x");
    let bad = b.read(3, Some("2"), (80, 90)); // y's value, not x's
    let r = run(&b);
    assert_stuck(&r, bad, &[]);
    assert_eq!(r.anomalies.len(), 1);
    assert_eq!(r.anomalies[0].key, "x");
}

// ---------------------------------------------------------------------------------------
// The cp-key model (capkv's cp keys: workload "register")

const CP: &str = "register";

#[test]
fn cp_concurrent_puts_ordered_by_their_versions() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 2, (0, 100)); // invoked first, applied second
    b.put(2, "b", 1, (10, 20));
    b.get(3, Some("b"), Some(1), (30, 40));
    b.get(4, Some("a"), Some(2), (50, 60));
    b.ok(5, put_if_version("c", 2), (70, 80), Some(written(7)));
    b.get(3, Some("c"), Some(7), (90, 95));
    assert_valid(&run(&b));
}

#[test]
fn cp_an_unknown_put_that_a_read_sees_binds_its_version() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.unknown(2, put("b"), 5, Some(15));
    b.get(3, Some("a"), Some(1), (20, 30));
    b.get(3, Some("b"), Some(3), (40, 50)); // applied late, at version 3
    b.get(1, Some("b"), Some(3), (60, 70));
    b.put(1, "c", 4, (80, 90));
    b.get(1, Some("c"), Some(4), (100, 110));
    assert_valid(&run(&b));
}

#[test]
fn cp_an_unknown_put_seen_through_a_condition() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.unknown(2, put("b"), 5, None);
    // A put if_value=b applied: so b had been written, at a version in (1, 5).
    b.ok(3, put_if_value("c", "b"), (20, 30), Some(written(5)));
    b.get(3, Some("c"), Some(5), (40, 50));
    assert_valid(&run(&b));
}

#[test]
fn cp_an_unknown_put_never_seen_is_fine() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.unknown(2, put("b"), 5, None);
    b.unknown(4, put_if_version("d", 1), 6, Some(8));
    b.get(3, Some("a"), Some(1), (20, 30));
    b.put(1, "c", 9, (40, 50));
    b.get(3, Some("c"), Some(9), (60, 70));
    assert_valid(&run(&b));
}

#[test]
fn cp_deletes_and_reinserts() {
    let mut b = Hb::new(CP);
    b.ok(1, put_if_version("a", 0), (0, 10), Some(written(3)));
    b.ok(2, Call::Delete, (20, 30), Some(deleted(true, 4)));
    b.ok(3, Call::Delete, (40, 50), Some(deleted(false, 6)));
    b.get(1, None, None, (60, 70));
    b.ok(2, put_if_version("b", 0), (80, 90), Some(written(8)));
    b.get(1, Some("b"), Some(8), (100, 110));
    assert_valid(&run(&b));
}

#[test]
fn cp_stale_read() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    let w = b.put(2, "b", 2, (20, 30));
    let r = b.get(3, Some("a"), Some(1), (40, 50));
    assert_stuck(&run(&b), r, &[w]);
}

#[test]
fn cp_lost_write() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    let lost = b.put(2, "b", 2, (20, 30));
    let r = b.get(3, Some("a"), Some(1), (40, 50));
    b.get(1, Some("a"), Some(1), (60, 70));
    assert_stuck(&run(&b), r, &[lost]);
}

#[test]
fn cp_read_of_a_value_never_written() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    let r = b.get(2, Some("z"), Some(1), (20, 30));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn cp_cas_on_a_stale_version_succeeds() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    let w = b.put(2, "b", 2, (20, 30));
    let c = b.ok(3, put_if_version("c", 1), (40, 50), Some(written(3)));
    assert_stuck(&run(&b), c, &[w]);
}

#[test]
fn cp_cas_on_a_stale_value_succeeds() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    let w = b.put(2, "b", 2, (20, 30));
    let c = b.ok(3, put_if_value("c", "a"), (40, 50), Some(written(3)));
    assert_stuck(&run(&b), c, &[w]);
}

#[test]
fn cp_a_failed_put_becomes_visible() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.fail(2, put("b"), (20, 30));
    let r = b.get(3, Some("b"), Some(2), (40, 50));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn cp_a_read_whose_version_is_not_the_writes() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 4, (0, 10));
    let r = b.get(2, Some("a"), Some(7), (20, 30));
    assert_stuck(&run(&b), r, &[]);
}

#[test]
fn cp_a_version_that_goes_backwards() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    let w = b.put(2, "b", 3, (20, 30));
    assert_stuck(&run(&b), w, &[]);
}

#[test]
fn cp_a_version_below_a_deletes() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.ok(2, Call::Delete, (20, 30), Some(deleted(true, 6)));
    let w = b.put(3, "b", 6, (40, 50)); // 6 was the delete's revision
    assert_stuck(&run(&b), w, &[]);
}

#[test]
fn cp_a_delete_of_an_absent_key_sees_the_revision_so_far() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.ok(2, Call::Delete, (20, 30), Some(deleted(true, 6)));
    // The revision was at least 6 when this delete found nothing.
    let d = b.ok(3, Call::Delete, (40, 50), Some(deleted(false, 4)));
    assert_stuck(&run(&b), d, &[]);
}

#[test]
fn cp_a_delete_that_says_the_key_was_absent_when_it_was_not() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    let d = b.ok(3, Call::Delete, (20, 30), Some(deleted(false, 5)));
    assert_stuck(&run(&b), d, &[]);
}

#[test]
fn cp_an_unknown_put_takes_a_version_of_its_own() {
    // b was certainly applied (c's condition saw it), between a (v5) and c (v6): but no
    // version is left for it between 5 and 6.
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.unknown(2, put("b"), 12, None);
    let c = b.ok(3, put_if_value("c", "b"), (20, 30), Some(written(6)));
    assert_stuck(&run(&b), c, &[]);
    // With a version between, it is fine.
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.unknown(2, put("b"), 12, None);
    b.ok(3, put_if_value("c", "b"), (20, 30), Some(written(7)));
    assert_valid(&run(&b));
}

#[test]
fn cp_a_refused_if_version_rules_out_the_version_a_lost_write_got() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.unknown(2, put("b"), 12, None);
    b.get(3, Some("b"), None, (20, 25)); // b applied before the refusal (no version shown)
    b.mismatch(1, put_if_version("c", 3), (30, 35)); // so b's version is not 3...
    let r = b.get(3, Some("b"), Some(3), (40, 50)); // ...but it is
    assert_stuck(&run(&b), r, &[]);
    // Refused for another version, it is fine.
    let mut b = Hb::new(CP);
    b.put(1, "a", 1, (0, 10));
    b.unknown(2, put("b"), 12, None);
    b.get(3, Some("b"), None, (20, 25));
    b.mismatch(1, put_if_version("c", 2), (30, 35));
    b.get(3, Some("b"), Some(3), (40, 50));
    assert_valid(&run(&b));
}

#[test]
fn cp_an_unknown_delete_takes_a_version_of_its_own() {
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.unknown(2, Call::Delete, 12, None);
    // The key is absent: the delete applied, at a version above 5: 6 is not left for b.
    let w = b.ok(3, put_if_version("b", 0), (20, 30), Some(written(6)));
    assert_stuck(&run(&b), w, &[]);
    let mut b = Hb::new(CP);
    b.put(1, "a", 5, (0, 10));
    b.unknown(2, Call::Delete, 12, None);
    b.ok(3, put_if_version("b", 0), (20, 30), Some(written(7)));
    assert_valid(&run(&b));
}

#[test]
fn cp_insert_if_absent_refused_though_nobody_wrote_the_key() {
    // A 409 on if_version=0 says the key existed: with no other write, the insert itself
    // must have been applied already (a double apply of a retried request).
    let mut b = Hb::new(CP);
    let ins = b.mismatch(1, put_if_version("a", 0), (0, 10));
    b.get(2, None, None, (20, 30));
    assert_stuck(&run(&b), ins, &[]);
    // If an earlier attempt's outcome was unknown, it may have applied: then the 409 is
    // explained, and so is the read.
    let mut b = Hb::new(CP);
    b.unknown(1, put_if_version("a", 0), 0, Some(5));
    b.mismatch(1, put_if_version("a", 0), (6, 10));
    b.get(2, Some("a"), Some(1), (20, 30));
    assert_valid(&run(&b));
}

#[test]
fn cp_a_put_applied_twice() {
    // One acknowledged put, but reads show its value at two versions: it applied twice.
    let mut b = Hb::new(CP);
    let w = b.put(1, "a", 1, (0, 10));
    b.get(2, Some("a"), Some(1), (20, 30));
    let r = b.get(3, Some("a"), Some(2), (40, 50));
    assert_stuck(&run(&b), r, &[w]);
}

#[test]
fn cp_two_inserts_if_absent_both_acknowledged() {
    // Both inserts of the same key were acknowledged: one of them must have seen the other.
    let mut b = Hb::new(CP);
    b.ok(1, put_if_version("a", 0), (0, 10), Some(written(1)));
    let second = b.ok(2, put_if_version("b", 0), (5, 15), Some(written(2)));
    let r = run(&b);
    assert_eq!(r.validity, Validity::Invalid);
    assert!(r.anomalies[0].ops.contains(&second), "{:#?}", r.anomalies);
}

// ---------------------------------------------------------------------------------------
// Budgets

/// Many concurrent writes and a read of the one that must go last: the search has to try
/// a great many orders. With no time at all it must say unknown, never valid.
fn hard_history(writes: u64) -> Hb {
    let mut b = Hb::new(REG);
    for i in 0..writes {
        b.write(i, &format!("{i}"), (0, 100));
    }
    b.read(writes, Some("0"), (200, 210));
    b
}

#[test]
fn a_tiny_budget_says_unknown_never_valid() {
    let b = hard_history(14);
    let r = check(
        &b.build(),
        Limits {
            time: Duration::ZERO,
            memory_bytes: 1 << 30,
        },
    );
    assert_eq!(r.validity, Validity::Unknown, "{r:#?}");
    assert!(r.undecided[0].contains("time budget"), "{:?}", r.undecided);
    let r = check(
        &b.build(),
        Limits {
            time: Duration::from_secs(60),
            memory_bytes: 4096,
        },
    );
    assert_eq!(r.validity, Validity::Unknown, "{r:#?}");
    assert!(
        r.undecided[0].contains("memory budget"),
        "{:?}",
        r.undecided
    );
    // With room, it is valid.
    assert_valid(&check(&hard_history(10).build(), limits()));
}

#[test]
fn unknown_does_not_hide_invalid_on_another_key() {
    let mut b = hard_history(14);
    b.key("other");
    b.write(1, "1", (0, 10));
    let r = b.read(2, Some("2"), (20, 30));
    let res = check(
        &b.build(),
        Limits {
            time: Duration::ZERO,
            memory_bytes: 1 << 30,
        },
    );
    assert_eq!(res.validity, Validity::Invalid);
    assert_eq!(res.anomalies[0].stuck.as_ref().unwrap().op, r);
    assert!(!res.undecided.is_empty());
}

#[test]
fn no_checker_for_a_workload_is_unknown() {
    let b = Hb::new("who-knows");
    assert_eq!(run(&b).validity, Validity::Unknown);
}

#[test]
fn an_empty_history_is_valid() {
    let r = run(&Hb::new(CP));
    assert_valid(&r);
    assert_eq!(r.ops, 0);
}

// ---------------------------------------------------------------------------------------
// ap checkers

fn ap(workload: &str) -> Hb {
    let mut b = Hb::new(workload);
    b.h.final_at_us = Some(1000);
    b.h.nemesis.push(NemesisEvent {
        kind: "partition".into(),
        detail: "n1 | n2,n3".into(),
        start_us: 100,
        end_us: Some(500),
    });
    b
}

fn add(m: &str) -> Call {
    Call::SetAdd { member: m.into() }
}

fn members(ms: &[&str]) -> Option<Ret> {
    Some(Ret::Members {
        members: ms.iter().map(|m| m.to_string()).collect(),
    })
}

/// Final reads of every node, with `ms` each (client = node index).
fn set_finals(b: &mut Hb, per_node: &[&[&str]]) -> Vec<u64> {
    per_node
        .iter()
        .enumerate()
        .map(|(i, ms)| {
            let t = 1100 + 10 * i as u64;
            let id = b.ok(i as u64, Call::SetRead, (t, t + 5), members(ms));
            b.h.ops.last_mut().unwrap().node = format!("n{}", i + 1);
            id
        })
        .collect()
}

#[test]
fn set_valid() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    b.unknown(1, add("b"), 20, Some(30)); // may or may not be there
    b.unknown(2, add("c"), 20, Some(30));
    b.fail(1, add("d"), (40, 50));
    b.ok(2, Call::SetRead, (60, 70), members(&["a", "c"]));
    set_finals(&mut b, &[&["a", "c"], &["a", "c"], &["a", "c"]]);
    assert_valid(&run(&b));
}

#[test]
fn set_lost_add() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    let lost = b.ok(1, add("b"), (20, 30), None);
    set_finals(&mut b, &[&["a"], &["a"], &["a"]]);
    assert_anomaly(&run(&b), "lost-write", lost);
}

#[test]
fn set_phantom() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    let r = b.ok(2, Call::SetRead, (60, 70), members(&["a", "zz"]));
    set_finals(&mut b, &[&["a"], &["a"], &["a"]]);
    assert_anomaly(&run(&b), "phantom", r);
}

#[test]
fn set_failed_add_visible() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    let f = b.fail(1, add("b"), (20, 30));
    let finals = set_finals(&mut b, &[&["a", "b"], &["a", "b"], &["a", "b"]]);
    let r = run(&b);
    assert_anomaly(&r, "failed-write-visible", f);
    assert_anomaly(&r, "failed-write-visible", finals[0]);
}

#[test]
fn set_diverged_nodes() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    b.unknown(1, add("b"), 20, Some(30));
    let finals = set_finals(&mut b, &[&["a", "b"], &["a"], &["a", "b"]]);
    let r = run(&b);
    assert_anomaly(&r, "diverged", finals[1]);
    assert_eq!(r.anomalies.len(), 1, "{:#?}", r.anomalies);
}

#[test]
fn set_the_last_final_read_of_each_node_counts() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    b.ok(1, add("b"), (20, 30), None);
    // n1 had not converged at first; it had by its last read.
    b.ok(0, Call::SetRead, (1010, 1020), members(&["a"]));
    set_finals(&mut b, &[&["a", "b"], &["a", "b"], &["a", "b"]]);
    assert_valid(&run(&b));
}

#[test]
fn set_no_final_reads_is_unknown() {
    let mut b = ap("set");
    b.ok(0, add("a"), (0, 10), None);
    b.ok(2, Call::SetRead, (60, 70), members(&["a"]));
    let r = run(&b);
    assert_eq!(r.validity, Validity::Unknown, "{r:#?}");
    assert!(r.undecided[0].contains("final"), "{:?}", r.undecided);
}

fn incr(by: i64) -> Call {
    Call::Incr { by }
}

fn counter(v: i64) -> Option<Ret> {
    Some(Ret::Counter { value: v })
}

fn counter_finals(b: &mut Hb, totals: &[i64]) -> Vec<u64> {
    totals
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let t = 1100 + 10 * i as u64;
            let id = b.ok(i as u64, Call::CounterRead, (t, t + 5), counter(*v));
            b.h.ops.last_mut().unwrap().node = format!("n{}", i + 1);
            id
        })
        .collect()
}

fn counter_run(b: &mut Hb) {
    b.ok(0, incr(1), (0, 10), None);
    b.ok(1, incr(2), (20, 30), None);
    b.unknown(2, incr(4), 40, Some(50));
    b.fail(0, incr(8), (60, 70));
}

#[test]
fn counter_valid_with_or_without_the_unknown_increment() {
    for total in [3, 7] {
        let mut b = ap("counter");
        counter_run(&mut b);
        b.ok(1, Call::CounterRead, (35, 38), counter(3));
        counter_finals(&mut b, &[total, total, total]);
        assert_valid(&run(&b));
    }
}

#[test]
fn counter_double_count() {
    let mut b = ap("counter");
    counter_run(&mut b);
    let finals = counter_finals(&mut b, &[8, 8, 8]); // above 1 + 2 + 4
    let r = run(&b);
    assert_anomaly(&r, "double-count", finals[0]);
}

#[test]
fn counter_lost_increment() {
    let mut b = ap("counter");
    counter_run(&mut b);
    let finals = counter_finals(&mut b, &[1, 1, 1]); // below 1 + 2
    assert_anomaly(&run(&b), "lost-write", finals[0]);
}

#[test]
fn counter_read_during_the_run_above_what_was_attempted() {
    let mut b = ap("counter");
    counter_run(&mut b);
    // Completed at 25: only incr 1 and incr 2 (invoked at 20) could count.
    let r = b.ok(1, Call::CounterRead, (15, 25), counter(4));
    counter_finals(&mut b, &[7, 7, 7]);
    let res = run(&b);
    assert_anomaly(&res, "double-count", r);
    assert_eq!(res.anomalies.len(), 1);
}

#[test]
fn counter_diverged() {
    let mut b = ap("counter");
    counter_run(&mut b);
    let finals = counter_finals(&mut b, &[3, 7, 3]);
    assert_anomaly(&run(&b), "diverged", finals[1]);
}

fn ap_write(v: &str, seen: &[&str]) -> Call {
    Call::ApWrite {
        value: v.into(),
        seen: seen.iter().map(|s| s.to_string()).collect(),
    }
}

fn siblings(vs: &[&str]) -> Option<Ret> {
    Some(Ret::Siblings {
        values: vs.iter().map(|s| s.to_string()).collect(),
    })
}

fn sibling_finals(b: &mut Hb, vs: &[&str]) {
    for i in 0..3u64 {
        let t = 1100 + 10 * i;
        b.ok(i, Call::ApRead, (t, t + 5), siblings(vs));
        b.h.ops.last_mut().unwrap().node = format!("n{}", i + 1);
    }
}

#[test]
fn siblings_a_write_replaced_by_a_later_context_is_fine() {
    let mut b = ap("siblings");
    b.ok(0, ap_write("a", &[]), (0, 10), None);
    b.ok(1, ap_write("b", &[]), (0, 10), None); // concurrent: siblings a, b
    b.ok(2, Call::ApRead, (20, 30), siblings(&["a", "b"]));
    b.ok(2, ap_write("c", &["a", "b"]), (40, 50), None); // replaces both
    sibling_finals(&mut b, &["c"]);
    assert_valid(&run(&b));
}

#[test]
fn siblings_a_lost_write_not_covered() {
    let mut b = ap("siblings");
    b.ok(0, ap_write("a", &[]), (0, 10), None);
    let lost = b.ok(1, ap_write("b", &[]), (0, 10), None);
    b.ok(2, ap_write("c", &["a"]), (40, 50), None); // saw only a
    sibling_finals(&mut b, &["c"]);
    assert_anomaly(&run(&b), "lost-write", lost);
}

#[test]
fn siblings_phantom_and_failed_write_visible() {
    let mut b = ap("siblings");
    b.ok(0, ap_write("a", &[]), (0, 10), None);
    let f = b.fail(1, ap_write("b", &[]), (20, 30));
    let r = b.ok(2, Call::ApRead, (40, 50), siblings(&["a", "q"]));
    sibling_finals(&mut b, &["a", "b"]);
    let res = run(&b);
    assert_anomaly(&res, "phantom", r);
    assert_anomaly(&res, "failed-write-visible", f);
}

// ---------------------------------------------------------------------------------------
// idempotency

#[test]
fn idempotent_consistent_retries_are_one_write() {
    let mut b = Hb::new("idempotent");
    b.unknown(1, put_idem("a", "k1"), 0, Some(10));
    b.ok(1, put_idem("a", "k1"), (20, 30), Some(written(1)));
    b.ok(2, put_idem("a", "k1"), (40, 50), Some(written(1)));
    b.get(3, Some("a"), Some(1), (60, 70));
    b.unknown(1, put_idem("b", "k2"), 80, Some(90));
    b.fail(1, put_idem("b", "k2"), (100, 110));
    b.ok(1, put_idem("b", "k2"), (120, 130), Some(written(2)));
    b.get(3, Some("b"), Some(2), (140, 150));
    assert_valid(&run(&b));
}

#[test]
fn idempotent_retries_answered_differently() {
    let mut b = Hb::new("idempotent");
    let first = b.ok(1, put_idem("a", "k1"), (0, 10), Some(written(1)));
    let second = b.ok(2, put_idem("a", "k1"), (20, 30), Some(written(2)));
    let r = run(&b);
    assert_anomaly(&r, "retry-answer-differs", first);
    assert_anomaly(&r, "retry-answer-differs", second);
}

#[test]
fn idempotent_a_retry_refused_as_a_conflict() {
    let mut b = Hb::new("idempotent");
    b.unknown(1, put_idem("a", "k1"), 0, Some(10));
    let refused = b.mismatch(1, put_idem("a", "k1"), (20, 30));
    assert_anomaly(&run(&b), "retry-refused", refused);
}

#[test]
fn idempotent_a_write_applied_twice_shows_in_the_reads() {
    // The retry got the same answer, but a read shows a second version of the value.
    let mut b = Hb::new("idempotent");
    let w = b.ok(1, put_idem("a", "k1"), (0, 10), Some(written(1)));
    b.ok(2, put_idem("a", "k1"), (20, 30), Some(written(1)));
    b.get(3, Some("a"), Some(1), (40, 50));
    let r = b.get(3, Some("a"), Some(2), (60, 70));
    assert_stuck(&run(&b), r, &[w]);
}
