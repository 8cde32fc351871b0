//! Histories: what every client asked, when, of which node, and what it learned.
//!
//! A history is a JSON-lines file, one [`Record`] a line: a header ([`RunInfo`]), one
//! [`Op`] per client operation (written when it completes), the nemesis's actions
//! ([`NemesisEvent`]) and the start of the final phase ([`Record::Phase`]).
//!
//! Every operation has one of three outcomes, and the checkers rely on exactly these
//! meanings (Jepsen's `:ok`, `:fail`, `:info`):
//!
//! | outcome | meaning | from capkv |
//! |---|---|---|
//! | `ok` | it took effect, once, between invoke and completion | 2xx (and 404 on a read) |
//! | `fail` | it certainly did **not** take effect | 503, 4xx, a connection never made |
//! | `unknown` | it may take effect, at any time after its invoke | 504, a timeout, a connection lost |
//!
//! An unknown write is never assumed absent: the checkers let it take effect at any point
//! after its invoke, or never. A `fail` of a conditional write caused by its condition (a
//! `409`) also tells something about the state: it carries [`Ret::Mismatch`].
//!
//! Times are microseconds on the recording process's monotonic clock, counted from the
//! start of the run, so they order operations in real time whatever the nodes' wall clocks say.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// The outcome of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Fail,
    Unknown,
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "f", rename_all = "kebab-case")]
pub enum Call {
    /// Read a register (Jepsen) or a cp key.
    Read,
    /// Write a register (Jepsen).
    Write { value: String },
    /// Compare-and-set a register by value (Jepsen).
    Cas { from: String, to: String },
    /// Put a cp key, optionally conditional; `idempotency_key` ties retries together.
    Put {
        value: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_version: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        if_value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// Delete a cp key.
    Delete,
    /// Add one member to an ap set.
    SetAdd { member: String },
    /// Read an ap set.
    SetRead,
    /// Add `by` to an ap counter.
    Incr { by: i64 },
    /// Read an ap counter.
    CounterRead,
    /// Write an ap register with the context of an earlier answer, which showed `seen`.
    ApWrite { value: String, seen: Vec<String> },
    /// Read an ap register.
    ApRead,
}

impl Call {
    /// Whether the call can change state (reads cannot).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Call::Read | Call::SetRead | Call::CounterRead | Call::ApRead
        )
    }

    /// A short human form: `put 3-17 if_version=0`, `read`.
    pub fn describe(&self) -> String {
        match self {
            Call::Read => "read".into(),
            Call::Write { value } => format!("write {value}"),
            Call::Cas { from, to } => format!("cas {from}->{to}"),
            Call::Put {
                value,
                if_version,
                if_value,
                idempotency_key,
            } => {
                let mut s = format!("put {value}");
                if let Some(v) = if_version {
                    s.push_str(&format!(" if_version={v}"));
                }
                if let Some(v) = if_value {
                    s.push_str(&format!(" if_value={v}"));
                }
                if let Some(k) = idempotency_key {
                    s.push_str(&format!(" idem={k}"));
                }
                s
            }
            Call::Delete => "delete".into(),
            Call::SetAdd { member } => format!("add {member}"),
            Call::SetRead => "read set".into(),
            Call::Incr { by } => format!("incr {by}"),
            Call::CounterRead => "read counter".into(),
            Call::ApWrite { value, seen } => format!("write {value} seen [{}]", seen.join(",")),
            Call::ApRead => "read".into(),
        }
    }
}

/// What a client learned, when it learned anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "kebab-case")]
pub enum Ret {
    /// A read: the value (None = absent) and, for cp keys, its version.
    Value {
        value: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// A write that took effect, with the version it was given (cp).
    Written {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// A delete: whether the key existed, and the version.
    Deleted {
        deleted: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
    },
    /// A conditional write that did not apply because its condition did not hold (409).
    Mismatch,
    /// An ap set's members.
    Members { members: Vec<String> },
    /// An ap counter's total.
    Counter { value: i64 },
    /// An ap register read: every sibling's value (empty: absent).
    Siblings { values: Vec<String> },
}

/// One client operation, recorded when it completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Op {
    /// Unique in the history, in invoke order for histories capkv records.
    pub id: u64,
    /// The client (Jepsen's process) that issued it; a client runs one operation at a time.
    pub client: u64,
    /// The node it was sent to (empty when unknown, as in Jepsen logs).
    #[serde(default)]
    pub node: String,
    /// The key it touched; the linearizability checker checks each key on its own.
    #[serde(default)]
    pub key: String,
    pub call: Call,
    pub invoke_us: u64,
    /// When the client stopped waiting (None: it never did, as at the end of a Jepsen log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complete_us: Option<u64>,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// The HTTP status, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed or is unknown, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Op {
    /// Refuses an operation whose answer does not fit its call: an `ok` read must say what
    /// it read (a checker would otherwise have to ignore it, and could call a broken
    /// history valid).
    pub fn validate(&self) -> Result<(), String> {
        let fits = match (&self.call, &self.ret) {
            (_, _) if self.outcome != Outcome::Ok => true,
            (Call::Read, Some(Ret::Value { .. })) => true,
            (Call::SetRead, Some(Ret::Members { .. })) => true,
            (Call::CounterRead, Some(Ret::Counter { .. })) => true,
            (Call::ApRead, Some(Ret::Siblings { .. })) => true,
            (Call::Read | Call::SetRead | Call::CounterRead | Call::ApRead, _) => false,
            _ => true,
        };
        if fits {
            Ok(())
        } else {
            Err(format!(
                "op {}: an ok {} must carry what it read in \"ret\"",
                self.id,
                self.call.describe()
            ))
        }
    }

    /// `#12 c3 n2 put 3-17 -> ok`: for reports and error messages.
    pub fn describe(&self) -> String {
        let ret = match &self.ret {
            Some(Ret::Value { value, version }) => format!(
                " -> {}{}",
                value.as_deref().unwrap_or("absent"),
                version.map(|v| format!(" v{v}")).unwrap_or_default()
            ),
            Some(Ret::Written { version: Some(v) }) => format!(" -> v{v}"),
            Some(Ret::Deleted { deleted, version }) => format!(
                " -> deleted={deleted}{}",
                version.map(|v| format!(" v{v}")).unwrap_or_default()
            ),
            Some(Ret::Mismatch) => " -> condition failed".into(),
            Some(Ret::Members { members }) => format!(" -> {} members", members.len()),
            Some(Ret::Counter { value }) => format!(" -> {value}"),
            Some(Ret::Siblings { values }) => format!(" -> [{}]", values.join(",")),
            Some(Ret::Written { version: None }) | None => String::new(),
        };
        let outcome = match self.outcome {
            Outcome::Ok => "ok",
            Outcome::Fail => "fail",
            Outcome::Unknown => "unknown",
        };
        let node = if self.node.is_empty() {
            String::new()
        } else {
            format!(" {}", self.node)
        };
        format!(
            "#{} c{}{node} key={} {}{ret} ({outcome})",
            self.id,
            self.client,
            self.key,
            self.call.describe()
        )
    }
}

/// One action of the nemesis: a fault that was active from `start_us` to `end_us`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NemesisEvent {
    /// `partition`, `kill`, `restart`, `pause`, `clock`.
    pub kind: String,
    /// What exactly: `n1 | n2,n3`, `n2`, `n3 +5000ms`.
    pub detail: String,
    pub start_us: u64,
    /// When it was healed (None: still active when the history ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_us: Option<u64>,
}

/// What was run: the header of a history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub workload: String,
    #[serde(default)]
    pub nemesis: Vec<String>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub nodes: Vec<String>,
    #[serde(default)]
    pub clients: u64,
    #[serde(default)]
    pub duration_s: u64,
    /// The keyspace the workload used.
    #[serde(default)]
    pub keyspace: String,
}

/// One line of a history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Record {
    Run(RunInfo),
    Op(Op),
    Nemesis(NemesisEvent),
    /// A phase began: `final` is the phase, after every fault healed, whose reads show
    /// what the cluster converged to.
    Phase {
        name: String,
        at_us: u64,
    },
}

/// A whole history in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub info: RunInfo,
    pub ops: Vec<Op>,
    pub nemesis: Vec<NemesisEvent>,
    /// When the final phase began, if it did.
    pub final_at_us: Option<u64>,
}

/// Why a history file could not be read.
#[derive(Debug)]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for ParseError {}

impl History {
    pub fn push(&mut self, record: Record) {
        match record {
            Record::Run(info) => self.info = info,
            Record::Op(op) => self.ops.push(op),
            Record::Nemesis(n) => self.nemesis.push(n),
            Record::Phase { name, at_us } if name == "final" => self.final_at_us = Some(at_us),
            Record::Phase { .. } => {}
        }
    }

    /// Reads a history written as JSON lines. Blank lines are skipped.
    pub fn read_jsonl<R: BufRead>(reader: R) -> Result<History, ParseError> {
        let mut h = History::default();
        for (i, line) in reader.lines().enumerate() {
            let line = line.map_err(|e| ParseError {
                line: i + 1,
                message: e.to_string(),
            })?;
            if line.trim().is_empty() {
                continue;
            }
            let record: Record = serde_json::from_str(&line).map_err(|e| ParseError {
                line: i + 1,
                message: e.to_string(),
            })?;
            if let Record::Op(op) = &record {
                op.validate().map_err(|message| ParseError {
                    line: i + 1,
                    message,
                })?;
            }
            h.push(record);
        }
        if h.info.workload.is_empty() {
            return Err(ParseError {
                line: 1,
                message: "no header: a history starts with {\"type\":\"run\",\"workload\":...}"
                    .into(),
            });
        }
        h.ops.sort_by_key(|o| (o.invoke_us, o.id));
        Ok(h)
    }

    /// Writes the history as JSON lines: header, operations, nemesis, phase.
    pub fn write_jsonl<W: Write>(&self, mut w: W) -> std::io::Result<()> {
        let mut line = |r: &Record| -> std::io::Result<()> {
            serde_json::to_writer(&mut w, r)?;
            w.write_all(b"\n")
        };
        line(&Record::Run(self.info.clone()))?;
        for op in &self.ops {
            line(&Record::Op(op.clone()))?;
        }
        for n in &self.nemesis {
            line(&Record::Nemesis(n.clone()))?;
        }
        if let Some(at_us) = self.final_at_us {
            line(&Record::Phase {
                name: "final".into(),
                at_us,
            })?;
        }
        Ok(())
    }

    /// The time of the last event in the history.
    pub fn end_us(&self) -> u64 {
        let ops = self
            .ops
            .iter()
            .map(|o| o.complete_us.unwrap_or(o.invoke_us));
        let nem = self.nemesis.iter().map(|n| n.end_us.unwrap_or(n.start_us));
        ops.chain(nem).max().unwrap_or(0)
    }

    /// Whether an operation belongs to the final phase (invoked after it began).
    pub fn is_final(&self, op: &Op) -> bool {
        self.final_at_us.is_some_and(|t| op.invoke_us >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json_lines() {
        let mut h = History {
            info: RunInfo {
                workload: "register".into(),
                seed: 7,
                ..RunInfo::default()
            },
            ..History::default()
        };
        h.ops.push(Op {
            id: 1,
            client: 2,
            node: "n1".into(),
            key: "k".into(),
            call: Call::Put {
                value: "2-1".into(),
                if_version: Some(0),
                if_value: None,
                idempotency_key: None,
            },
            invoke_us: 10,
            complete_us: Some(20),
            outcome: Outcome::Fail,
            ret: Some(Ret::Mismatch),
            status: Some(409),
            error: Some("conflict".into()),
        });
        h.nemesis.push(NemesisEvent {
            kind: "partition".into(),
            detail: "n1 | n2,n3".into(),
            start_us: 5,
            end_us: Some(30),
        });
        h.final_at_us = Some(40);
        let mut buf = Vec::new();
        h.write_jsonl(&mut buf).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.contains(r#""f":"put""#), "{text}");
        assert!(text.contains(r#""outcome":"fail""#), "{text}");
        let back = History::read_jsonl(&buf[..]).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn a_bad_line_names_its_number() {
        let text = "{\"type\":\"run\",\"workload\":\"x\"}\n\nnot json\n";
        let e = History::read_jsonl(text.as_bytes()).unwrap_err();
        assert_eq!(e.line, 3);
    }
}
