//! Histories an outside review built to break the checkers (false valids, panics, a report
//! that allocated tens of GB): each must get its verdict, and every report stays small.

use std::path::Path;
use std::time::Duration;

use capkv_check::{check, jepsen, report, History, Limits, Validity};

fn dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/review")
}

#[test]
fn every_review_history_gets_its_verdict_and_a_bounded_report() {
    let expected = std::fs::read_to_string(dir().join("expected.txt")).unwrap();
    let mut n = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (file, want) = line.split_once(' ').unwrap();
        let text = std::fs::read_to_string(dir().join(file)).unwrap();
        let parsed = History::read_jsonl(text.as_bytes());
        if want == "refused" {
            assert!(parsed.is_err(), "{file} must be refused as not a history");
            n += 1;
            continue;
        }
        let h = parsed.unwrap_or_else(|e| panic!("{file}: {e}"));
        let result = check(
            &h,
            Limits {
                time: Duration::from_secs(10),
                memory_bytes: 64 << 20,
            },
        );
        let want = match want {
            "valid" => Validity::Valid,
            "invalid" => Validity::Invalid,
            _ => Validity::Unknown,
        };
        assert_eq!(result.validity, want, "{file}: {result:?}");
        let page = report::html(&h, &result);
        assert!(
            page.len() < 4 << 20,
            "{file}: report of {} bytes",
            page.len()
        );
        n += 1;
    }
    assert_eq!(n, 15);
}

#[test]
fn jepsen_logs_with_nemesis_lines_parse() {
    let text = std::fs::read_to_string(dir().join("o_jepsen_nemesis.log")).unwrap();
    let h = jepsen::parse(&text).unwrap();
    assert!(!h.ops.is_empty());
}
