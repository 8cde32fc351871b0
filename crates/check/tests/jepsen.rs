//! The checker agrees with Jepsen (Knossos/Porcupine) on every etcd history in
//! `testdata/jepsen-etcd` (copied from the project's shared test data; see its README).

use std::path::Path;
use std::time::{Duration, Instant};

use capkv_check::{check_jepsen, Limits, Validity};

#[test]
fn every_etcd_history_gets_jepsens_verdict() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/jepsen-etcd");
    let verdicts = std::fs::read_to_string(dir.join("verdicts.txt")).unwrap();
    let mut checked = 0;
    for line in verdicts.lines().filter(|l| !l.trim().is_empty()) {
        let (file, expected) = line.split_once(' ').unwrap();
        let expected = match expected.trim() {
            "linearizable" => Validity::Valid,
            "not-linearizable" => Validity::Invalid,
            other => panic!("unknown verdict {other}"),
        };
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let started = Instant::now();
        let result = check_jepsen(
            &text,
            Limits {
                time: Duration::from_secs(20),
                memory_bytes: 256 << 20,
            },
        )
        .unwrap();
        assert_eq!(
            result.validity, expected,
            "{file}: {:?} {:?}",
            result.anomalies, result.undecided
        );
        if expected == Validity::Invalid {
            let a = &result.anomalies[0];
            assert_eq!(a.kind, "not-linearizable");
            assert!(
                a.stuck.is_some(),
                "{file}: a violation names where it got stuck"
            );
        }
        eprintln!("{file}: {:?} in {:?}", result.validity, started.elapsed());
        checked += 1;
    }
    assert_eq!(checked, 26);
}
