//! Reads Jepsen's log format for a single register (`read`, `write`, `cas`), as in the
//! histories Jepsen recorded against etcd:
//!
//! ```text
//! INFO  jepsen.util - 3  :invoke  :cas  [3 0]      (fields are separated by tabs)
//! INFO  jepsen.util - 3  :fail    :cas  [3 0]
//! ```
//!
//! `invoke` starts an operation of a process; `ok` completes it; `fail` completes it with no
//! effect (for a `cas`: its comparison failed); `info` leaves its outcome unknown. A read that
//! `fail`s with `:timed-out` constrains nothing. An operation still open at the end is
//! unknown. Line numbers stand in for time: the log is in real-time order.

use std::collections::HashMap;

use crate::history::{Call, History, Op, Outcome, ParseError, Ret, RunInfo};

/// The key every operation of a Jepsen register history is on.
pub const KEY: &str = "register";

fn parse_value(s: &str) -> Option<String> {
    (s != "nil").then(|| s.to_owned())
}

/// Parses a Jepsen register log into a history.
pub fn parse(text: &str) -> Result<History, ParseError> {
    let mut h = History {
        info: RunInfo {
            workload: "jepsen-register".into(),
            ..RunInfo::default()
        },
        ..History::default()
    };
    let mut open: HashMap<u64, Op> = HashMap::new();
    let mut next_id = 0u64;
    for (i, line) in text.lines().enumerate() {
        let err = |message: String| ParseError {
            line: i + 1,
            message,
        };
        let Some((_, rest)) = line.split_once(" - ") else {
            continue; // not an operation line (Jepsen logs other things too)
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 3 || !fields[1].starts_with(':') {
            continue;
        }
        // Lines of other actors (`:nemesis`) are not client operations.
        let Ok(process) = fields[0].parse::<u64>() else {
            continue;
        };
        let kind = fields[1];
        let f = fields[2];
        let value = fields[3..].join(" ");
        let time = i as u64;
        match kind {
            ":invoke" => {
                let call = match f {
                    ":read" => Call::Read,
                    ":write" => Call::Write { value },
                    ":cas" => {
                        let inner = value.trim_start_matches('[').trim_end_matches(']');
                        let mut parts = inner.split_whitespace();
                        match (parts.next(), parts.next()) {
                            (Some(a), Some(b)) => Call::Cas {
                                from: a.to_owned(),
                                to: b.to_owned(),
                            },
                            _ => return Err(err(format!("bad cas value {value:?}"))),
                        }
                    }
                    other => return Err(err(format!("unknown operation {other}"))),
                };
                if let Some(prev) = open.remove(&process) {
                    // A process invokes again only after its last op ended; if the log
                    // lost that line, the old op stays unknown.
                    h.ops.push(prev);
                }
                open.insert(
                    process,
                    Op {
                        id: next_id,
                        client: process,
                        node: String::new(),
                        key: KEY.into(),
                        call,
                        invoke_us: time,
                        complete_us: None,
                        outcome: Outcome::Unknown,
                        ret: None,
                        status: None,
                        error: None,
                    },
                );
                next_id += 1;
            }
            ":ok" | ":fail" | ":info" => {
                let Some(mut op) = open.remove(&process) else {
                    return Err(err(format!("{kind} for process {process} with no invoke")));
                };
                op.complete_us = Some(time);
                match (kind, &op.call) {
                    (":ok", Call::Read) => {
                        op.outcome = Outcome::Ok;
                        op.ret = Some(Ret::Value {
                            value: parse_value(&value),
                            version: None,
                        });
                    }
                    (":ok", _) => op.outcome = Outcome::Ok,
                    (":fail", Call::Cas { .. }) => {
                        op.outcome = Outcome::Fail;
                        op.ret = Some(Ret::Mismatch);
                    }
                    (":fail", _) => {
                        op.outcome = Outcome::Fail;
                        op.error = Some(value);
                    }
                    _ => op.outcome = Outcome::Unknown,
                }
                h.ops.push(op);
            }
            _ => continue,
        }
    }
    h.ops.extend(open.into_values());
    h.ops.sort_by_key(|o| (o.invoke_us, o.id));
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_of_line() {
        let log = "INFO  jepsen.util - 0\t:invoke\t:read\tnil\n\
                   INFO  jepsen.util - 1\t:invoke\t:cas\t[3 0]\n\
                   INFO  jepsen.util - 2\t:invoke\t:write\t4\n\
                   INFO  jepsen.util - 0\t:ok\t:read\t3\n\
                   INFO  jepsen.util - 1\t:fail\t:cas\t[3 0]\n\
                   INFO  jepsen.util - 3\t:invoke\t:write\t1\n\
                   INFO  jepsen.util - 3\t:info\t:write\t1\n";
        let h = parse(log).unwrap();
        assert_eq!(h.ops.len(), 4);
        assert_eq!(h.ops[0].outcome, Outcome::Ok);
        assert_eq!(
            h.ops[0].ret,
            Some(Ret::Value {
                value: Some("3".into()),
                version: None
            })
        );
        assert_eq!(
            h.ops[1].call,
            Call::Cas {
                from: "3".into(),
                to: "0".into()
            }
        );
        assert_eq!(h.ops[1].ret, Some(Ret::Mismatch));
        assert_eq!(h.ops[2].outcome, Outcome::Unknown, "still open at the end");
        assert_eq!(h.ops[2].complete_us, None);
        assert_eq!(h.ops[3].outcome, Outcome::Unknown, "info");
    }

    #[test]
    fn a_completion_without_invoke_is_an_error() {
        let e = parse("INFO  jepsen.util - 0\t:ok\t:read\tnil\n").unwrap_err();
        assert_eq!(e.line, 1);
    }
}
