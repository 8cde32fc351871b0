//! The report of a run: one self-contained HTML page (inline CSS and SVG, nothing fetched)
//! and a JSON summary for scripts.
//!
//! The page shows the verdict, every anomaly with the operations involved, a timeline (one
//! row per client, one bar per operation from invoke to completion, coloured by outcome,
//! nemesis windows shaded, the final phase marked, the operations of an anomaly outlined in
//! red, each bar naming its operation on hover), and latency and throughput over time.
//! Runs with more operations than a page can draw are sampled (every operation of an anomaly
//! is always drawn), and the page says so.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

use crate::history::{History, Op, Outcome};
use crate::{CheckResult, Validity};

/// At most this many operations are drawn in each chart.
const DRAWN_OPS_MAX: usize = 20_000;
const WIDTH: f64 = 1200.0;
const LEFT: f64 = 90.0;

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn color(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "#2e7d32",
        Outcome::Fail => "#ef6c00",
        Outcome::Unknown => "#7b1fa2",
    }
}

/// Maps run time (µs) to an x coordinate, from the history's first instant to its last.
struct Scale {
    start_us: u64,
    span_us: f64,
}

impl Scale {
    fn new(h: &History) -> Scale {
        let start_us = h.ops.iter().map(|o| o.invoke_us).min().unwrap_or(0);
        Scale {
            start_us,
            span_us: h.end_us().saturating_sub(start_us).max(1) as f64,
        }
    }

    fn x(&self, t_us: u64) -> f64 {
        let t = t_us.saturating_sub(self.start_us) as f64;
        LEFT + (t / self.span_us).min(1.0) * (WIDTH - LEFT - 10.0)
    }
}

/// The operations to draw: all of them, or a sample that keeps every anomaly operation.
fn drawn<'a>(h: &'a History, marked: &HashSet<u64>) -> (Vec<&'a Op>, bool) {
    if h.ops.len() <= DRAWN_OPS_MAX {
        return (h.ops.iter().collect(), false);
    }
    let step = h.ops.len().div_ceil(DRAWN_OPS_MAX);
    let ops = h
        .ops
        .iter()
        .enumerate()
        .filter(|(i, o)| i % step == 0 || marked.contains(&o.id))
        .map(|(_, o)| o)
        .collect();
    (ops, true)
}

fn nemesis_shading(h: &History, s: &Scale, top: f64, height: f64, labels: bool) -> String {
    let mut out = String::new();
    let end = h.end_us();
    for n in &h.nemesis {
        let (x0, x1) = (s.x(n.start_us), s.x(n.end_us.unwrap_or(end)));
        let _ = write!(
            out,
            r##"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{height:.1}" fill="#d32f2f" fill-opacity="0.08"><title>{} {} ({:.1}s–{:.1}s)</title></rect>"##,
            (x1 - x0).max(1.0),
            escape(&n.kind),
            escape(&n.detail),
            n.start_us as f64 / 1e6,
            n.end_us.unwrap_or(end) as f64 / 1e6
        );
        if labels {
            let _ = write!(
                out,
                r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#b71c1c">{} {}</text>"##,
                x0 + 2.0,
                top + 10.0,
                escape(&n.kind),
                escape(&n.detail)
            );
        }
    }
    if let Some(t) = h.final_at_us {
        let x = s.x(t);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{top:.1}" y2="{:.1}" stroke="#1565c0" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" font-size="10" fill="#1565c0">final phase</text>"##,
            top + height,
            x + 3.0,
            top + height - 3.0
        );
    }
    out
}

fn time_axis(s: &Scale, y: f64) -> String {
    let mut out = String::new();
    let secs = s.span_us / 1e6;
    // A round step giving at most a dozen ticks, whatever the span.
    let mut step = 1.0;
    let mut factors = [2.0, 2.5, 2.0].into_iter().cycle(); // 1, 2, 5, 10, 20, 50, ...
    while secs / step > 12.0 {
        step *= factors.next().unwrap_or(2.0);
    }
    let mut t = 0.0;
    while t <= secs {
        let x = s.x(s.start_us + (t * 1e6) as u64);
        let _ = write!(
            out,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{y:.1}" y2="{:.1}" stroke="#999"/><text x="{x:.1}" y="{:.1}" font-size="10" text-anchor="middle">{t}s</text>"##,
            y + 4.0,
            y + 15.0
        );
        t += step;
    }
    out
}

fn client_label(c: u64) -> String {
    if c > u64::MAX - 100 {
        format!("final #{}", u64::MAX - c)
    } else {
        format!("client {c}")
    }
}

fn timeline(h: &History, s: &Scale, marked: &HashSet<u64>) -> (String, bool) {
    let (ops, sampled) = drawn(h, marked);
    let mut rows: BTreeMap<u64, usize> = BTreeMap::new();
    for o in &h.ops {
        rows.entry(o.client).or_insert(0);
    }
    for (i, v) in rows.values_mut().enumerate() {
        *v = i;
    }
    let row_h = if rows.len() > 40 { 6.0 } else { 12.0 };
    let height = rows.len() as f64 * row_h + 30.0;
    let end = h.end_us();
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" font-family="sans-serif">"##
    );
    svg.push_str(&nemesis_shading(h, s, 0.0, height - 20.0, true));
    if row_h >= 10.0 {
        for (c, i) in &rows {
            let _ = write!(
                svg,
                r##"<text x="2" y="{:.1}" font-size="9">{}</text>"##,
                *i as f64 * row_h + row_h - 3.0,
                client_label(*c)
            );
        }
    }
    let mut outlined = String::new();
    for o in ops {
        let y = rows[&o.client] as f64 * row_h + 1.0;
        let x0 = s.x(o.invoke_us);
        let done = match o.outcome {
            Outcome::Unknown => end,
            _ => o.complete_us.unwrap_or(end),
        };
        let w = (s.x(done) - x0).max(1.0);
        let opacity = if o.outcome == Outcome::Unknown {
            0.35
        } else {
            0.85
        };
        let bar = format!(
            r##"<rect x="{x0:.1}" y="{y:.1}" width="{w:.1}" height="{:.1}" fill="{}" fill-opacity="{opacity}"{}><title>{}</title></rect>"##,
            row_h - 2.0,
            color(o.outcome),
            if marked.contains(&o.id) {
                r##" stroke="#d50000" stroke-width="2.5" class="anomaly""##
            } else {
                ""
            },
            escape(&o.describe())
        );
        // Outlined bars go last, so nothing covers them.
        if marked.contains(&o.id) {
            outlined.push_str(&bar);
        } else {
            svg.push_str(&bar);
        }
    }
    svg.push_str(&outlined);
    svg.push_str(&time_axis(s, height - 20.0));
    svg.push_str("</svg>");
    (svg, sampled)
}

fn latency_chart(h: &History, s: &Scale, marked: &HashSet<u64>) -> String {
    let (ops, _) = drawn(h, marked);
    let height = 220.0;
    let plot = height - 30.0;
    // Log scale from 0.1 ms to 10 s.
    let y = |ms: f64| {
        let l = ms.clamp(0.1, 10_000.0).log10(); // -1 ..= 4
        5.0 + plot - (l + 1.0) / 5.0 * plot
    };
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">"##
    );
    svg.push_str(&nemesis_shading(h, s, 5.0, plot, false));
    for (ms, label) in [
        (0.1, "0.1ms"),
        (1.0, "1ms"),
        (10.0, "10ms"),
        (100.0, "100ms"),
        (1000.0, "1s"),
        (10_000.0, "10s"),
    ] {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{WIDTH}" y1="{0:.1}" y2="{0:.1}" stroke="#eee"/><text x="{1}" y="{2:.1}" font-size="10" text-anchor="end">{label}</text>"##,
            y(ms),
            LEFT - 4.0,
            y(ms) + 3.0
        );
    }
    for o in ops {
        let Some(done) = o.complete_us else { continue };
        let ms = done.saturating_sub(o.invoke_us) as f64 / 1000.0;
        let _ = write!(
            svg,
            r##"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}" fill-opacity="0.6"/>"##,
            s.x(done),
            y(ms),
            color(o.outcome)
        );
    }
    svg.push_str(&time_axis(s, plot + 5.0));
    svg.push_str("</svg>");
    svg
}

/// Completions by outcome in at most 2,000 buckets of at least a second, from the history's
/// first instant: (bucket width in µs, first instant, counts).
fn buckets(h: &History) -> (u64, u64, Vec<[u64; 3]>) {
    const BUCKETS_MAX: u64 = 2_000;
    let start = h.ops.iter().map(|o| o.invoke_us).min().unwrap_or(0);
    let span = h.end_us().saturating_sub(start);
    let width = (span / BUCKETS_MAX + 1).max(1_000_000);
    let mut counts = vec![[0u64; 3]; (span / width + 1) as usize];
    for o in &h.ops {
        let t = o.complete_us.unwrap_or(o.invoke_us).saturating_sub(start);
        let i = match o.outcome {
            Outcome::Ok => 0,
            Outcome::Fail => 1,
            Outcome::Unknown => 2,
        };
        if let Some(b) = counts.get_mut((t / width) as usize) {
            b[i] += 1;
        }
    }
    (width, start, counts)
}

fn throughput_chart(h: &History, s: &Scale) -> String {
    let (width, start, buckets) = buckets(h);
    let per_s = |v: u64| v * 1_000_000 / width;
    let height = 200.0;
    let plot = height - 30.0;
    let max = per_s(buckets.iter().flatten().copied().max().unwrap_or(1)).max(1) as f64;
    let y = |v: u64| 5.0 + plot - v as f64 / max * plot;
    let mut svg = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="sans-serif">"##
    );
    svg.push_str(&nemesis_shading(h, s, 5.0, plot, false));
    let _ = write!(
        svg,
        r##"<text x="{}" y="12" font-size="10" text-anchor="end">{max} ops/s</text><text x="{}" y="{:.1}" font-size="10" text-anchor="end">0</text>"##,
        LEFT - 4.0,
        LEFT - 4.0,
        plot + 5.0
    );
    for (i, outcome) in [Outcome::Ok, Outcome::Fail, Outcome::Unknown]
        .iter()
        .enumerate()
    {
        let points: Vec<String> = buckets
            .iter()
            .enumerate()
            .map(|(n, b)| {
                let t = start + n as u64 * width + width / 2;
                format!("{:.1},{:.1}", s.x(t), y(per_s(b[i])))
            })
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"##,
            color(*outcome),
            points.join(" ")
        );
    }
    svg.push_str(&time_axis(s, plot + 5.0));
    svg.push_str("</svg>");
    svg
}

/// Latency percentiles (ms) of the operations that completed `ok`.
fn latency_ms(h: &History) -> serde_json::Value {
    let mut l: Vec<u64> = h
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| o.complete_us.map(|c| c.saturating_sub(o.invoke_us)))
        .collect();
    l.sort_unstable();
    let p = |q: f64| -> f64 {
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1;
        l[i] as f64 / 1000.0
    };
    serde_json::json!({
        "p50": p(0.5), "p99": p(0.99), "p999": p(0.999), "max": p(1.0), "count": l.len()
    })
}

/// The summary for scripts: the result, the run, latency and throughput, the nemesis.
pub fn summary_json(h: &History, result: &CheckResult) -> serde_json::Value {
    let secs = (h.end_us() as f64 / 1e6).max(1e-6);
    serde_json::json!({
        "result": result,
        "run": h.info,
        "latency_ms_ok": latency_ms(h),
        "throughput_ops_per_s": {
            "all": h.ops.len() as f64 / secs,
            "ok": result.ok as f64 / secs,
        },
        "duration_s": secs,
        "nemesis": h.nemesis,
    })
}

/// The whole report page.
pub fn html(h: &History, result: &CheckResult) -> String {
    let marked: HashSet<u64> = result
        .anomalies
        .iter()
        .flat_map(|a| a.ops.iter().copied())
        .collect();
    let by_id: BTreeMap<u64, &Op> = h.ops.iter().map(|o| (o.id, o)).collect();
    let describe = |id: &u64| {
        by_id
            .get(id)
            .map(|o| escape(&o.describe()))
            .unwrap_or_else(|| format!("#{id}"))
    };
    let s = Scale::new(h);
    let (verdict, vcolor) = match result.validity {
        Validity::Valid => ("VALID", "#2e7d32"),
        Validity::Invalid => ("INVALID", "#c62828"),
        Validity::Unknown => ("UNKNOWN", "#f9a825"),
    };
    let mut page = String::new();
    let _ = write!(
        page,
        r##"<!doctype html><html><head><meta charset="utf-8"><title>capkv check: {w} {verdict}</title>
<style>body{{font-family:sans-serif;margin:20px;color:#222}} h1 span{{color:{vcolor}}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:3px 8px;font-size:13px;text-align:left;vertical-align:top}}
.anomaly-box{{border-left:4px solid #c62828;padding:6px 10px;margin:8px 0;background:#fff5f5}}
.legend span{{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}}
code{{font-size:12px}} .small{{font-size:12px;color:#555}}</style></head><body>
<h1>capkv check: {w} — <span>{verdict}</span></h1>
<table><tr><th>workload</th><td>{w}</td><th>nemesis</th><td>{nem}</td><th>seed</th><td>{seed}</td></tr>
<tr><th>nodes</th><td>{nodes}</td><th>clients</th><td>{clients}</td><th>fault phase</th><td>{dur} s</td></tr>
<tr><th>operations</th><td>{ops}</td><th>ok / fail / unknown</th><td>{ok} / {fail} / {unknown}</td><th>checked in</th><td>{ms} ms ({keys} keys)</td></tr></table>
"##,
        w = escape(&result.workload),
        nem = escape(&h.info.nemesis.join(", ")),
        seed = h.info.seed,
        nodes = escape(&h.info.nodes.join(", ")),
        clients = h.info.clients,
        dur = h.info.duration_s,
        ops = result.ops,
        ok = result.ok,
        fail = result.fail,
        unknown = result.unknown,
        ms = result.check_ms,
        keys = result.keys,
    );
    if !result.anomalies.is_empty() {
        let _ = write!(page, "<h2>Anomalies ({})</h2>", result.anomalies.len());
        for a in result.anomalies.iter().take(100) {
            let _ = write!(
                page,
                r##"<div class="anomaly-box"><b>{}</b> on key <code>{}</code><br>{}<br><span class="small">operations: {}</span>"##,
                escape(&a.kind),
                escape(&a.key),
                escape(&a.message),
                a.ops
                    .iter()
                    .take(12)
                    .map(describe)
                    .collect::<Vec<_>>()
                    .join("<br>")
            );
            if let Some(st) = &a.stuck {
                let _ = write!(
                    page,
                    r##"<br><span class="small">stuck after a linearizable prefix of {} operations (last: {}); could not linearize {}; pending then: {}; states tried: {}</span>"##,
                    st.prefix_len,
                    st.prefix_tail
                        .iter()
                        .rev()
                        .take(5)
                        .map(describe)
                        .collect::<Vec<_>>()
                        .join(", "),
                    describe(&st.op),
                    st.pending
                        .iter()
                        .take(8)
                        .map(describe)
                        .collect::<Vec<_>>()
                        .join(", "),
                    escape(&st.states.join("; "))
                );
            }
            page.push_str("</div>");
        }
        if result.anomalies.len() > 100 {
            let _ = write!(
                page,
                "<p>... and {} more (summary.json has all).</p>",
                result.anomalies.len() - 100
            );
        }
    }
    if !result.undecided.is_empty() {
        page.push_str("<h2>Undecided</h2><ul>");
        for u in &result.undecided {
            let _ = write!(page, "<li>{}</li>", escape(u));
        }
        page.push_str("</ul>");
    }
    let (tl, sampled) = timeline(h, &s, &marked);
    page.push_str(
        r##"<h2>Timeline</h2><p class="legend"><span style="background:#2e7d32"></span>ok<span style="background:#ef6c00"></span>fail (did not take effect)<span style="background:#7b1fa2;opacity:.4"></span>unknown (drawn to the end)<span style="background:#d32f2f;opacity:.2"></span>nemesis<span style="border:2px solid #d50000"></span>in an anomaly — hover a bar for its operation</p>"##,
    );
    if sampled {
        let _ = write!(
            page,
            "<p class=\"small\">{} operations: every {}th is drawn, and every operation of an anomaly.</p>",
            h.ops.len(),
            h.ops.len().div_ceil(DRAWN_OPS_MAX)
        );
    }
    page.push_str(&tl);
    page.push_str("<h2>Latency</h2>");
    page.push_str(&latency_chart(h, &s, &marked));
    page.push_str("<h2>Throughput (completions per second)</h2>");
    page.push_str(&throughput_chart(h, &s));
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, NemesisEvent, Ret};
    use crate::Anomaly;

    fn op(id: u64, value: &str, outcome: Outcome) -> Op {
        Op {
            id,
            client: id % 3,
            node: "n1".into(),
            key: "k<&>".into(),
            call: Call::Write {
                value: value.into(),
            },
            invoke_us: id * 1000,
            complete_us: Some(id * 1000 + 500),
            outcome,
            ret: Some(Ret::Written { version: None }),
            status: None,
            error: None,
        }
    }

    #[test]
    fn the_page_shows_the_verdict_escapes_text_and_outlines_anomaly_ops() {
        let mut h = History::default();
        h.info.workload = "register".into();
        h.ops.push(op(1, "<script>alert(1)</script>", Outcome::Ok));
        h.ops.push(op(2, "b", Outcome::Unknown));
        h.ops.push(op(3, "c", Outcome::Fail));
        h.nemesis.push(NemesisEvent {
            kind: "partition".into(),
            detail: "n1 | n2,n3".into(),
            start_us: 500,
            end_us: Some(2500),
        });
        h.final_at_us = Some(3000);
        let mut result = crate::check(&h, crate::Limits::default());
        result.add(Anomaly {
            kind: "not-linearizable".into(),
            key: "k<&>".into(),
            message: "because <b>".into(),
            ops: vec![2],
            stuck: None,
        });
        let page = html(&h, &result);
        assert!(page.contains("INVALID"));
        assert!(!page.contains("<script>"), "history text is escaped");
        assert!(page.contains("&lt;script&gt;"));
        assert!(page.contains("because &lt;b&gt;"));
        assert_eq!(
            page.matches(r#"class="anomaly""#).count(),
            1,
            "op 2 is outlined"
        );
        assert!(page.contains("partition n1 | n2,n3"));
        assert!(page.contains("final phase"));
        let summary = summary_json(&h, &result);
        assert_eq!(summary["result"]["validity"], "invalid");
        assert_eq!(summary["latency_ms_ok"]["count"], 1);
    }

    #[test]
    fn an_empty_history_makes_a_page() {
        let h = History::default();
        let result = crate::check(&h, crate::Limits::default());
        let page = html(&h, &result);
        assert!(page.contains("</html>"));
        let _ = summary_json(&h, &result);
    }

    #[test]
    fn large_histories_are_sampled_but_keep_anomaly_ops() {
        let mut h = History::default();
        for i in 0..50_000 {
            h.ops.push(op(i, &i.to_string(), Outcome::Ok));
        }
        let marked: HashSet<u64> = [49_999].into();
        let (ops, sampled) = drawn(&h, &marked);
        assert!(sampled);
        assert!(ops.len() <= DRAWN_OPS_MAX + 1);
        assert!(ops.iter().any(|o| o.id == 49_999));
    }
}
