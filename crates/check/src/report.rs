//! The report of a run (interim: replaced by the full HTML report).

use crate::{CheckResult, History};

pub fn html(h: &History, result: &CheckResult) -> String {
    format!(
        "<html><body><pre>{}</pre><p>{} ops</p></body></html>",
        serde_json::to_string_pretty(result).unwrap_or_default(),
        h.ops.len()
    )
}

pub fn summary_json(h: &History, result: &CheckResult) -> serde_json::Value {
    serde_json::json!({ "result": result, "run": h.info })
}
