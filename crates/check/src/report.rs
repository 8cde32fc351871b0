//! The report of a check: a self-contained HTML page, and a JSON summary.
//!
//! The page has no outside dependency (inline CSS and SVG, no script, no font, no CDN), so it
//! can be attached to a CI run and opened anywhere:
//!
//! - the header: run, verdict (big, colored), operation counts, check time;
//! - the anomalies, each with the operations involved (and for a linearizability
//!   violation, where the search got stuck);
//! - a timeline: one row per client, one bar per operation from invoke to completion,
//!   colored by outcome (an unknown one trails off, hatched, to the end of the run), the
//!   nemesis's faults shaded across all rows, the final phase marked, the operations named
//!   by anomalies outlined in red; hovering a bar shows [`Op::describe`];
//! - latency (log scale) and throughput over time, with the faults shaded.
//!
//! Long runs are sampled to at most [`MAX_DRAWN`] bars (the operations named by anomalies
//! always among them), and the page says so. Everything that comes from the history is
//! escaped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use serde_json::{json, Value};

use crate::history::{History, NemesisEvent, Op, Outcome};
use crate::{CheckResult, Validity};

/// At most this many operations are drawn in the timeline, and as many points in the
/// latency plot.
pub const MAX_DRAWN: usize = 20_000;

/// The plot area: left margin (labels), width, right margin.
const LEFT: f64 = 70.0;
const WIDTH: f64 = 1100.0;
const RIGHT: f64 = 20.0;

/// Escapes text for HTML and SVG, in element content and in attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn verdict_word(v: Validity) -> &'static str {
    match v {
        Validity::Valid => "valid",
        Validity::Invalid => "invalid",
        Validity::Unknown => "unknown",
    }
}

fn outcome_class(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::Fail => "fail",
        Outcome::Unknown => "unk",
    }
}

fn outcome_index(o: Outcome) -> usize {
    match o {
        Outcome::Ok => 0,
        Outcome::Fail => 1,
        Outcome::Unknown => 2,
    }
}

/// The CSS class of a nemesis kind (the kind itself comes from the history: it is never
/// used as a class name).
fn nemesis_class(kind: &str) -> &'static str {
    match kind {
        "partition" => "nem-partition",
        "kill" | "restart" => "nem-kill",
        "pause" => "nem-pause",
        "clock" => "nem-clock",
        _ => "nem-other",
    }
}

/// Microseconds as a short duration: `850µs`, `12.3ms`, `4.56s`.
fn human_us(us: u64) -> String {
    if us < 1_000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// The time the drawings span: from 0 to the last event (at least 1 µs).
fn run_end(h: &History) -> u64 {
    h.end_us().max(h.final_at_us.unwrap_or(0)).max(1)
}

/// Maps run time to x.
struct Scale {
    end: f64,
}

impl Scale {
    fn new(h: &History) -> Scale {
        Scale {
            end: run_end(h) as f64,
        }
    }

    fn x(&self, t_us: u64) -> f64 {
        LEFT + WIDTH * (t_us as f64 / self.end).min(1.0)
    }
}

/// Round tick steps for a span of `end_us`: 1, 2 or 5 × 10^k µs, at most 12 of them.
fn ticks(end_us: u64) -> Vec<u64> {
    let mut step = 1u64;
    while end_us / step > 12 {
        step = match step.to_string().as_bytes()[0] {
            b'1' => step * 2,
            b'2' => step / 2 * 5,
            _ => step * 2,
        };
    }
    (0..=end_us / step).map(|i| i * step).collect()
}

/// The ids the anomalies name (their ops and their stuck ops).
fn named_ops(result: &CheckResult) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    for a in &result.anomalies {
        ids.extend(a.ops.iter().copied());
        if let Some(s) = &a.stuck {
            ids.insert(s.op);
        }
    }
    ids
}

/// The ops to draw: all of them, or a sample of at most [`MAX_DRAWN`] that keeps every op
/// the anomalies name, then as many failed and unknown ops as fit in half the rest, then ok
/// ones, each evenly spread over the run. Whether it is a sample.
fn drawn<'a>(h: &'a History, named: &BTreeSet<u64>) -> (Vec<&'a Op>, bool) {
    if h.ops.len() <= MAX_DRAWN {
        return (h.ops.iter().collect(), false);
    }
    let mut out: Vec<&Op> = h.ops.iter().filter(|o| named.contains(&o.id)).collect();
    let rest = |ok: bool| -> Vec<&'a Op> {
        h.ops
            .iter()
            .filter(|o| !named.contains(&o.id) && (o.outcome == Outcome::Ok) == ok)
            .collect()
    };
    let even = |ops: Vec<&'a Op>, n: usize| -> Vec<&'a Op> {
        if ops.len() <= n {
            return ops;
        }
        (0..n).map(|i| ops[i * ops.len() / n]).collect()
    };
    let room = MAX_DRAWN.saturating_sub(out.len());
    let not_ok = even(rest(false), room / 2);
    let room = room - not_ok.len();
    out.extend(not_ok);
    out.extend(even(rest(true), room));
    out.sort_by_key(|o| (o.invoke_us, o.id));
    (out, true)
}

fn nemesis_title(n: &NemesisEvent) -> String {
    format!(
        "{} {} from {} to {}",
        n.kind,
        n.detail,
        human_us(n.start_us),
        n.end_us.map(human_us).unwrap_or_else(|| "the end".into())
    )
}

/// Opens a plot's `<svg>`, shades the faults and the final phase over its area
/// (`top`..`top + height`) and labels them above it. With `overlay`, the shades are left
/// to [`shade_faults`], to draw over what the plot draws.
fn open_plot(out: &mut String, class: &str, h: &History, top: f64, height: f64, overlay: bool) {
    let sc = Scale::new(h);
    let total_w = LEFT + WIDTH + RIGHT;
    let total_h = top + height + 30.0;
    let _ = write!(
        out,
        r#"<svg class="{class}" width="{total_w:.0}" height="{total_h:.0}" viewBox="0 0 {total_w:.0} {total_h:.0}" xmlns="http://www.w3.org/2000/svg">"#
    );
    out.push_str(
        r##"<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="6" height="6" fill="#ece6f5"/><line x1="0" y1="0" x2="0" y2="6" stroke="#8e6fc0" stroke-width="2"/></pattern></defs>"##,
    );
    if !overlay {
        shade_faults(out, h, top, height, "");
    }
    // Labels of faults that start close together go on different lines.
    let mut last_x = [f64::NEG_INFINITY; 3];
    for n in &h.nemesis {
        let x0 = sc.x(n.start_us);
        let line = (0..3).find(|&l| x0 - last_x[l] > 150.0).unwrap_or(0);
        last_x[line] = x0;
        let _ = write!(
            out,
            r#"<text class="nem-label" x="{:.1}" y="{:.1}">{} {}</text>"#,
            x0 + 2.0,
            top - 4.0 - 12.0 * line as f64,
            escape(&n.kind),
            escape(&n.detail)
        );
    }
    if let Some(f) = h.final_at_us {
        let x = sc.x(f);
        let _ = write!(
            out,
            r#"<line class="final-line" x1="{x:.1}" x2="{x:.1}" y1="{:.1}" y2="{:.1}"/><text class="final-label" x="{:.1}" y="{:.1}">final phase</text>"#,
            top - 40.0,
            top + height,
            x + 3.0,
            top - 42.0
        );
    }
}

/// The fault windows and the final phase as shaded areas over `top`..`top + height`.
fn shade_faults(out: &mut String, h: &History, top: f64, height: f64, extra_class: &str) {
    let sc = Scale::new(h);
    for n in &h.nemesis {
        let x0 = sc.x(n.start_us);
        let x1 = n
            .end_us
            .map(|e| sc.x(e))
            .unwrap_or(LEFT + WIDTH)
            .max(x0 + 1.0);
        let _ = write!(
            out,
            r#"<rect class="{}{extra_class}" x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{height:.1}"><title>{}</title></rect>"#,
            nemesis_class(&n.kind),
            x1 - x0,
            escape(&nemesis_title(n))
        );
    }
    if let Some(f) = h.final_at_us {
        let x = sc.x(f);
        let _ = write!(
            out,
            r#"<rect class="final{extra_class}" x="{x:.1}" y="{top:.1}" width="{:.1}" height="{height:.1}"/>"#,
            LEFT + WIDTH - x
        );
    }
}

/// Draws the time axis under a plot whose bottom is `y`, and closes the `<svg>`.
fn close_plot(out: &mut String, h: &History, y: f64) {
    let sc = Scale::new(h);
    let _ = write!(
        out,
        r#"<line class="axis" x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/>"#,
        LEFT + WIDTH
    );
    for t in ticks(run_end(h)) {
        let x = sc.x(t);
        let _ = write!(
            out,
            r#"<line class="axis" x1="{x:.1}" x2="{x:.1}" y1="{y:.1}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}">{}</text>"#,
            y + 4.0,
            y + 16.0,
            if t == 0 { "0".into() } else { human_us(t) }
        );
    }
    out.push_str("</svg>");
}

fn timeline(h: &History, result: &CheckResult, out: &mut String) {
    let end = run_end(h);
    let sc = Scale::new(h);
    let named = named_ops(result);
    let stuck: BTreeSet<u64> = result
        .anomalies
        .iter()
        .filter_map(|a| a.stuck.as_ref().map(|s| s.op))
        .collect();
    let (ops, sampled) = drawn(h, &named);
    let clients: BTreeSet<u64> = h.ops.iter().map(|o| o.client).collect();
    let row: HashMap<u64, usize> = clients.iter().enumerate().map(|(i, c)| (*c, i)).collect();
    let row_h = (1200.0 / clients.len().max(1) as f64).clamp(3.0, 16.0);
    let top = 60.0;
    let height = row_h * clients.len().max(1) as f64;

    out.push_str("<h2>Timeline</h2>");
    if sampled {
        let _ = write!(
            out,
            r#"<p class="note">Sampled: {} of {} operations are drawn (every operation an anomaly names, then failed and unknown ones, then ok ones, evenly over the run).</p>"#,
            ops.len(),
            h.ops.len()
        );
    }
    out.push_str(
        r#"<p class="legend">One row per client; hover a bar for the operation. <span class="sw ok"></span>ok <span class="sw fail"></span>failed (not applied) <span class="sw unk"></span>unknown (may take effect until the end) <span class="sw hl"></span>named by an anomaly <span class="sw nem-partition"></span>fault <span class="sw final"></span>final phase</p>"#,
    );
    open_plot(out, "timeline", h, top, height, true);
    let label_every = ((11.0 / row_h).ceil() as usize).max(1);
    for (i, c) in clients.iter().enumerate() {
        let y = top + row_h * i as f64;
        if i % 2 == 1 {
            let _ = write!(
                out,
                r#"<rect class="band" x="{LEFT}" y="{y:.1}" width="{WIDTH}" height="{row_h:.1}"/>"#
            );
        }
        if i % label_every == 0 {
            let _ = write!(
                out,
                r#"<text class="row-label" x="{:.1}" y="{:.1}">c{c}</text>"#,
                LEFT - 6.0,
                y + row_h * 0.5 + 4.0
            );
        }
    }
    let bar = |out: &mut String, o: &Op, hl: bool| {
        let y = top + row_h * row[&o.client] as f64 + row_h * 0.1;
        let bh = row_h * 0.8;
        let x0 = sc.x(o.invoke_us);
        let x1 = sc.x(o.complete_us.unwrap_or(o.invoke_us)).max(x0 + 1.0);
        let mut class = outcome_class(o.outcome).to_owned();
        if hl {
            class.push_str(" hl");
        }
        if stuck.contains(&o.id) {
            class.push_str(" stuck");
        }
        let id_attr = if hl {
            format!(r#" id="op-{}""#, o.id)
        } else {
            String::new()
        };
        let when = match o.complete_us {
            Some(c) => format!(
                "invoked {}, completed {} (took {})",
                human_us(o.invoke_us),
                human_us(c),
                human_us(c.saturating_sub(o.invoke_us))
            ),
            None => format!("invoked {}, never completed", human_us(o.invoke_us)),
        };
        if o.outcome == Outcome::Unknown {
            // It may take effect until the end: a faded, hatched tail in the lower half.
            let _ = write!(
                out,
                r#"<rect class="tail" x="{x1:.1}" y="{:.1}" width="{:.1}" height="{:.1}"/>"#,
                y + bh * 0.55,
                (LEFT + WIDTH - x1).max(0.0),
                bh * 0.45
            );
        }
        let _ = write!(
            out,
            r#"<rect{id_attr} class="{class}" x="{x0:.1}" y="{y:.1}" width="{:.1}" height="{bh:.1}"><title>{}&#10;{}</title></rect>"#,
            x1 - x0,
            escape(&o.describe()),
            when
        );
    };
    // The named ones last, on top.
    for o in ops.iter().filter(|o| !named.contains(&o.id)) {
        bar(out, o, false);
    }
    for o in ops.iter().filter(|o| named.contains(&o.id)) {
        bar(out, o, true);
    }
    // The faults over the bars (the bars keep the pointer).
    shade_faults(out, h, top, height, " over");
    let _ = end;
    close_plot(out, h, top + height + 2.0);
}

/// Completion latency per op over time, on a log scale.
fn latency(h: &History, out: &mut String) {
    let sc = Scale::new(h);
    let points: Vec<(Outcome, u64, u64)> = h
        .ops
        .iter()
        .filter_map(|o| {
            o.complete_us
                .map(|c| (o.outcome, c, c.saturating_sub(o.invoke_us).max(1)))
        })
        .collect();
    out.push_str("<h2>Latency</h2>");
    if points.is_empty() {
        out.push_str(r#"<p class="note">No operation completed.</p>"#);
        return;
    }
    let step = points.len().div_ceil(MAX_DRAWN);
    let _ = write!(
        out,
        r#"<p class="note">Invoke to completion of every operation that completed (an unknown one: when the client gave up), by completion time; log scale.{}</p>"#,
        if step > 1 {
            format!(" Sampled: every {step}th of {} is drawn.", points.len())
        } else {
            String::new()
        }
    );
    let (lo, hi) = points
        .iter()
        .fold((u64::MAX, 1), |(lo, hi), p| (lo.min(p.2), hi.max(p.2)));
    // Whole decades that hold every latency.
    let mut d_lo = 1u64;
    while d_lo.saturating_mul(10) <= lo {
        d_lo *= 10;
    }
    let mut d_hi = d_lo.saturating_mul(10);
    while d_hi < hi {
        d_hi = d_hi.saturating_mul(10);
    }
    let (top, height) = (60.0, 260.0);
    let span = (d_hi as f64).ln() - (d_lo as f64).ln();
    let y = |lat: u64| top + height * (1.0 - ((lat as f64).ln() - (d_lo as f64).ln()) / span);
    open_plot(out, "latency", h, top, height, false);
    let mut d = d_lo;
    while d <= d_hi {
        let yy = y(d);
        grid_line(out, yy, &human_us(d));
        d = d.saturating_mul(10);
        if d == u64::MAX {
            break;
        }
    }
    for (outcome, c, lat) in points.iter().step_by(step) {
        let _ = write!(
            out,
            r#"<circle class="{}" cx="{:.1}" cy="{:.1}" r="1.6"/>"#,
            outcome_class(*outcome),
            sc.x(*c),
            y(*lat)
        );
    }
    close_plot(out, h, top + height + 2.0);
}

/// A horizontal grid line across a plot at `yy`, labelled on the left.
fn grid_line(out: &mut String, yy: f64, label: &str) {
    let _ = write!(
        out,
        r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{yy:.1}" y2="{yy:.1}"/><text class="row-label" x="{:.1}" y="{:.1}">{}</text>"#,
        LEFT + WIDTH,
        LEFT - 6.0,
        yy + 4.0,
        escape(label)
    );
}

/// Operations per bin of time: (bin width in µs, [ok, fail, unknown] per bin), counted at
/// completion (an unknown op that never completed: at its invoke).
fn throughput_bins(h: &History) -> (u64, Vec<[u64; 3]>) {
    let end = run_end(h);
    // One-second bins; finer for short runs, so there are at least ~50.
    let mut bin = 1_000_000u64;
    while bin > 1_000 && end / bin < 50 {
        bin /= 10;
    }
    // And never more than 2,000 bins, whatever the times in the history say.
    bin = bin.max(end / 2_000 + 1);
    let mut bins = vec![[0u64; 3]; (end / bin + 1) as usize];
    for o in &h.ops {
        let t = o.complete_us.unwrap_or(o.invoke_us);
        let i = ((t / bin) as usize).min(bins.len() - 1);
        bins[i][outcome_index(o.outcome)] += 1;
    }
    (bin, bins)
}

fn throughput(h: &History, out: &mut String) {
    let end = run_end(h);
    let sc = Scale::new(h);
    let (bin, bins) = throughput_bins(h);
    let per_s = 1e6 / bin as f64;
    let peak = bins
        .iter()
        .map(|b| (b[0] + b[1] + b[2]) as f64 * per_s)
        .fold(1.0, f64::max);
    let _ = write!(
        out,
        r#"<h2>Throughput</h2><p class="note">Operations per second, in bins of {}, stacked: ok, failed, unknown.</p>"#,
        human_us(bin)
    );
    let (top, height) = (60.0, 200.0);
    open_plot(out, "throughput", h, top, height, false);
    for frac in [0.0, 0.5, 1.0] {
        let yy = top + height * (1.0 - frac);
        grid_line(out, yy, &format!("{:.0}/s", peak * frac));
    }
    let w = (WIDTH * bin as f64 / end as f64).max(0.5);
    for (i, b) in bins.iter().enumerate() {
        let t = i as u64 * bin;
        let x = sc.x(t);
        if x >= LEFT + WIDTH {
            continue;
        }
        let mut base = top + height;
        for (k, class) in ["ok", "fail", "unk"].iter().enumerate() {
            if b[k] == 0 {
                continue;
            }
            let bh = height * b[k] as f64 * per_s / peak;
            base -= bh;
            let _ = write!(
                out,
                r#"<rect class="{class}" x="{x:.1}" y="{base:.1}" width="{w:.2}" height="{bh:.1}"><title>{}: {} ok, {} failed, {} unknown</title></rect>"#,
                human_us(t),
                b[0],
                b[1],
                b[2]
            );
        }
    }
    close_plot(out, h, top + height + 2.0);
}

fn anomalies(h: &History, result: &CheckResult, out: &mut String) {
    let by_id: HashMap<u64, &Op> = h.ops.iter().map(|o| (o.id, o)).collect();
    let op_line = |id: u64| -> String {
        match by_id.get(&id) {
            Some(o) => format!(
                r##"<li><a href="#op-{id}"><code>{}</code></a></li>"##,
                escape(&o.describe())
            ),
            None => format!("<li><code>#{id} (not in the history)</code></li>"),
        }
    };
    let _ = write!(out, "<h2>Anomalies ({})</h2>", result.anomalies.len());
    if result.anomalies.is_empty() {
        out.push_str(r#"<p class="note">None found.</p>"#);
    }
    for a in &result.anomalies {
        let _ = write!(
            out,
            r#"<div class="anomaly"><h3><span class="kind">{}</span> on key <code>{}</code></h3><p>{}</p><p>Operations ({}):</p><ul class="ops">"#,
            escape(&a.kind),
            escape(&a.key),
            escape(&a.message),
            a.ops.len()
        );
        for id in &a.ops {
            out.push_str(&op_line(*id));
        }
        out.push_str("</ul>");
        if let Some(s) = &a.stuck {
            let _ = write!(
                out,
                r#"<p>Where the search got stuck: after a linearizable prefix of <b>{}</b> operations, this one could not take effect before it completed:</p><ul class="ops">{}</ul><p>The end of that prefix ({} operations, in order):</p><ul class="ops">"#,
                s.prefix_len,
                op_line(s.op),
                s.prefix_tail.len()
            );
            for id in &s.prefix_tail {
                out.push_str(&op_line(*id));
            }
            let _ = write!(
                out,
                r#"</ul><p>Operations pending at that point ({}):</p><ul class="ops">"#,
                s.pending.len()
            );
            for id in &s.pending {
                out.push_str(&op_line(*id));
            }
            out.push_str(r#"</ul><p>States tried:</p><ul class="ops">"#);
            for st in &s.states {
                let _ = write!(out, "<li><code>{}</code></li>", escape(st));
            }
            out.push_str("</ul>");
        }
        out.push_str("</div>");
    }
    if !result.undecided.is_empty() {
        out.push_str(r#"<h2>Undecided</h2><ul class="undecided">"#);
        for u in &result.undecided {
            let _ = write!(out, "<li>{}</li>", escape(u));
        }
        out.push_str("</ul>");
    }
}

const CSS: &str = r#"
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1f2328; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 15px; margin: 4px 0; }
.verdict { font-size: 44px; font-weight: 700; letter-spacing: 1px; margin: 6px 0 10px; }
.verdict.valid { color: #1a7f37; } .verdict.invalid { color: #cf222e; } .verdict.unknown { color: #bf8700; }
table.info td { padding: 1px 14px 1px 0; vertical-align: top; } table.info td:first-child { color: #59636e; }
.n-ok { color: #1a7f37; } .n-fail { color: #bc4c00; } .n-unk { color: #8250df; }
.note, .legend { color: #59636e; }
code { font: 12.5px ui-monospace, SFMono-Regular, Menlo, monospace; }
.anomaly { border-left: 4px solid #cf222e; padding: 4px 12px; margin: 12px 0; background: #fff8f8; }
.anomaly .kind { color: #cf222e; }
ul.ops { margin: 2px 0; padding-left: 22px; }
.sw { display: inline-block; width: 14px; height: 10px; margin: 0 3px 0 12px; vertical-align: middle; border: 1px solid #8888; }
.sw.ok { background: #2da44e; } .sw.fail { background: #f08c00; } .sw.unk { background: #8e6fc0; }
.sw.hl { background: #fff; border: 2px solid #d1242f; } .sw.nem-partition { background: #f6c7c7; } .sw.final { background: #d8e8fb; }
svg { display: block; margin: 4px 0 8px; font: 11px system-ui, sans-serif; }
svg .ok { fill: #2da44e; } svg .fail { fill: #f08c00; } svg .unk { fill: #8e6fc0; }
svg .tail { fill: url(#hatch); opacity: 0.45; }
svg rect.hl { stroke: #d1242f; stroke-width: 2; } svg rect.stuck { stroke-width: 3.5; }
svg .band { fill: #f6f8fa; }
svg .nem-partition { fill: #e5534b; opacity: 0.13; } svg .nem-kill { fill: #8250df; opacity: 0.13; }
svg .nem-pause { fill: #0969da; opacity: 0.12; } svg .nem-clock { fill: #1a7f37; opacity: 0.12; }
svg .nem-other { fill: #6e7781; opacity: 0.13; }
svg .final { fill: #0969da; opacity: 0.06; } svg .over { pointer-events: none; } svg .final-line { stroke: #0969da; stroke-dasharray: 4 3; }
svg .final-label { fill: #0969da; } svg .nem-label { fill: #57606a; }
svg .axis { stroke: #6e7781; } svg .grid { stroke: #d8dee4; }
svg .tick { fill: #57606a; text-anchor: middle; } svg .row-label { fill: #57606a; text-anchor: end; }
"#;

/// The report page of a checked history.
pub fn html(h: &History, result: &CheckResult) -> String {
    let mut out = String::with_capacity(64 * 1024 + 200 * h.ops.len().min(MAX_DRAWN));
    let verdict = verdict_word(result.validity);
    let info = &h.info;
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>capkv check: {} {verdict}</title><style>{CSS}</style></head><body>",
        escape(&info.workload)
    );
    let _ = write!(
        out,
        r#"<h1>capkv check — <code>{}</code></h1><div class="verdict {verdict}">{}</div>"#,
        escape(&info.workload),
        verdict.to_uppercase()
    );
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            escape(&v.join(", "))
        }
    };
    let rows: [(&str, String); 10] = [
        ("workload", escape(&info.workload)),
        (
            "keyspace",
            if info.keyspace.is_empty() {
                "—".into()
            } else {
                escape(&info.keyspace)
            },
        ),
        ("nemesis", list(&info.nemesis)),
        ("seed", info.seed.to_string()),
        ("nodes", list(&info.nodes)),
        ("clients", info.clients.to_string()),
        (
            "duration",
            format!(
                "{} s asked, {} recorded",
                info.duration_s,
                human_us(h.end_us())
            ),
        ),
        (
            "operations",
            format!(
                r#"{} on {} keys: <span class="n-ok">{} ok</span>, <span class="n-fail">{} failed</span>, <span class="n-unk">{} unknown</span>"#,
                result.ops, result.keys, result.ok, result.fail, result.unknown
            ),
        ),
        ("faults", h.nemesis.len().to_string()),
        ("checked in", format!("{} ms", result.check_ms)),
    ];
    out.push_str(r#"<table class="info">"#);
    for (k, v) in rows {
        let _ = write!(out, "<tr><td>{k}</td><td>{v}</td></tr>");
    }
    out.push_str("</table>");
    anomalies(h, result, &mut out);
    if !h.nemesis.is_empty() {
        out.push_str(r#"<h2>Faults</h2><table class="info">"#);
        for n in &h.nemesis {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{} → {}</td><td><code>{}</code></td></tr>",
                escape(&n.kind),
                human_us(n.start_us),
                n.end_us.map(human_us).unwrap_or_else(|| "the end".into()),
                escape(&n.detail)
            );
        }
        out.push_str("</table>");
    }
    timeline(h, result, &mut out);
    latency(h, &mut out);
    throughput(h, &mut out);
    out.push_str("</body></html>\n");
    out
}

/// The `p`-quantile (0..=1) of sorted values, by nearest rank.
fn quantile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The check's result with the run, latency percentiles of the ok operations, throughput
/// and faults: what a CI job keeps next to the page.
pub fn summary_json(h: &History, result: &CheckResult) -> Value {
    let mut lat: Vec<u64> = h
        .ops
        .iter()
        .filter(|o| o.outcome == Outcome::Ok)
        .filter_map(|o| o.complete_us.map(|c| c.saturating_sub(o.invoke_us)))
        .collect();
    lat.sort_unstable();
    let ms = |v: Option<u64>| v.map(|us| us as f64 / 1e3);
    let end = h.end_us();
    let secs = (end as f64 / 1e6).max(1e-6);
    let mut per_second: BTreeMap<u64, [u64; 3]> = BTreeMap::new();
    for o in &h.ops {
        let s = o.complete_us.unwrap_or(o.invoke_us) / 1_000_000;
        per_second.entry(s).or_default()[outcome_index(o.outcome)] += 1;
    }
    let peak_ok = per_second.values().map(|b| b[0]).max().unwrap_or(0);
    json!({
        "result": result,
        "run": h.info,
        "recorded_us": end,
        "final_at_us": h.final_at_us,
        "latency_ms": {
            "of": "ok operations, invoke to completion",
            "count": lat.len(),
            "p50": ms(quantile(&lat, 0.5)),
            "p99": ms(quantile(&lat, 0.99)),
            "p999": ms(quantile(&lat, 0.999)),
            "max": ms(lat.last().copied()),
        },
        "throughput": {
            "ok_per_s": result.ok as f64 / secs,
            "fail_per_s": result.fail as f64 / secs,
            "unknown_per_s": result.unknown as f64 / secs,
            "peak_ok_in_a_second": peak_ok,
            "per_second": per_second
                .iter()
                .map(|(s, b)| json!({"s": s, "ok": b[0], "fail": b[1], "unknown": b[2]}))
                .collect::<Vec<_>>(),
        },
        "nemesis": h.nemesis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{put, value, Hb};
    use crate::{check, Anomaly, Call, Limits};

    fn checked(b: &Hb) -> (History, CheckResult) {
        let h = b.build();
        let r = check(&h, Limits::default());
        (h, r)
    }

    /// A stale read during a partition, a failed and an unknown put, a final phase.
    fn stale_read() -> (Hb, u64) {
        let mut b = Hb::new("register");
        b.h.info.seed = 42;
        b.h.info.nemesis = vec!["partition".into()];
        b.put(1, "a", 1, (0, 10_000));
        b.put(2, "b", 2, (20_000, 30_000));
        let r = b.get(3, Some("a"), Some(1), (40_000, 50_000));
        b.fail(1, put("c"), (60_000, 70_000));
        b.unknown(2, put("d"), 80_000, Some(90_000));
        b.h.nemesis.push(NemesisEvent {
            kind: "partition".into(),
            detail: "n1 | n2,n3".into(),
            start_us: 15_000,
            end_us: Some(75_000),
        });
        b.h.final_at_us = Some(95_000);
        b.get(1, Some("b"), Some(2), (100_000, 110_000));
        (b, r)
    }

    #[test]
    fn the_page_shows_the_verdict_and_highlights_the_stuck_op() {
        let (b, r) = stale_read();
        let (h, res) = checked(&b);
        assert_eq!(res.validity, Validity::Invalid);
        let page = html(&h, &res);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains(r#"<div class="verdict invalid">INVALID</div>"#));
        // The stuck read's bar is outlined, and the anomaly links to it.
        assert!(
            page.contains(&format!(r#"<rect id="op-{r}" class="ok hl stuck""#)),
            "{page}"
        );
        assert!(page.contains(&format!(r##"href="#op-{r}""##)));
        let stuck = h.ops.iter().find(|o| o.id == r).unwrap();
        assert!(page.contains(&escape(&stuck.describe())));
        assert!(page.contains("not-linearizable"));
        assert!(page.contains("partition n1 | n2,n3"));
        assert!(page.contains("final phase"));
        // Failed and unknown ops are drawn as such; the unknown one trails off.
        assert!(page.contains(r#"class="fail""#));
        assert!(page.contains(r#"class="unk""#));
        assert!(page.contains(r#"class="tail""#));
        // Self-contained: no script, nothing fetched.
        assert!(!page.contains("<script"));
        assert!(!page.contains("https://"));
        assert!(!page
            .replace("http://www.w3.org/2000/svg", "")
            .contains("http://"));
        assert!(!page.contains("<link"));
    }

    #[test]
    fn a_valid_run_is_green_and_an_undecided_one_amber() {
        let mut b = Hb::new("register");
        b.put(1, "a", 1, (0, 10));
        b.get(2, Some("a"), Some(1), (20, 30));
        let (h, res) = checked(&b);
        let page = html(&h, &res);
        assert!(page.contains(r#"<div class="verdict valid">VALID</div>"#));
        assert!(page.contains("None found."));
        let res = check(&Hb::new("no-such-workload").build(), Limits::default());
        let page = html(&h, &res);
        assert!(page.contains(r#"<div class="verdict unknown">UNKNOWN</div>"#));
        assert!(page.contains("Undecided"));
    }

    #[test]
    fn text_from_the_history_is_escaped() {
        let evil = r#"<script>alert("x&y")</script>'"#;
        let mut b = Hb::new(evil);
        b.key(evil);
        b.h.info.nodes = vec![evil.into()];
        b.h.info.nemesis = vec![evil.into()];
        b.h.info.keyspace = evil.into();
        b.ok(1, Call::Write { value: evil.into() }, (0, 10), None);
        b.ok(2, Call::Read, (20, 30), Some(value(Some("<b>"), None)));
        b.h.ops.last_mut().unwrap().node = evil.into();
        b.h.nemesis.push(NemesisEvent {
            kind: evil.into(),
            detail: evil.into(),
            start_us: 5,
            end_us: None,
        });
        let h = b.build();
        let mut res = check(&h, Limits::default());
        res.anomalies.push(Anomaly {
            kind: evil.into(),
            key: evil.into(),
            message: evil.into(),
            ops: vec![0, 1, 99],
            stuck: None,
        });
        res.undecided.push(evil.into());
        let page = html(&h, &res);
        assert!(!page.contains("<script"), "raw text in the page");
        assert!(!page.contains("<b>"));
        assert!(page.contains("&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"));
        assert!(page.contains("#99 (not in the history)"));
        let json = summary_json(&h, &res);
        assert_eq!(json["run"]["workload"], evil);
    }

    #[test]
    fn an_empty_history_does_not_panic() {
        let h = History::default();
        let res = check(&h, Limits::default());
        let page = html(&h, &res);
        assert!(page.contains("No operation completed."));
        let json = summary_json(&h, &res);
        assert_eq!(json["latency_ms"]["count"], 0);
        assert!(json["latency_ms"]["p50"].is_null());
        // Nor one whose only op never completed, under a fault never healed.
        let mut b = Hb::new("register");
        b.unknown(1, put("a"), 0, None);
        b.h.nemesis.push(NemesisEvent {
            kind: "kill".into(),
            detail: "n2".into(),
            start_us: 0,
            end_us: None,
        });
        let (h, res) = checked(&b);
        let page = html(&h, &res);
        assert!(page.contains("kill n2"));
        let _ = summary_json(&h, &res);
    }

    #[test]
    fn a_long_run_is_sampled_but_keeps_the_anomaly_ops() {
        let mut b = Hb::new("register");
        let n = 30_000u64;
        for i in 0..n {
            let t = i * 100;
            b.put(i % 10, &format!("v{i}"), i + 1, (t, t + 50));
        }
        // A stale read at the very end.
        let r = b.get(3, Some("v5"), Some(6), (n * 100, n * 100 + 50));
        let (h, res) = checked(&b);
        assert_eq!(res.validity, Validity::Invalid);
        let page = html(&h, &res);
        assert!(
            page.contains(&format!("Sampled: {MAX_DRAWN} of {} operations", n + 1)),
            "{}",
            &page[..2000]
        );
        assert!(page.contains(&format!(r#"id="op-{r}""#)));
        let bars = page.matches("<rect").count();
        assert!(bars < MAX_DRAWN + 2_000, "{bars} rects");
        assert!(page.len() < 8 << 20, "{} bytes", page.len());
    }

    #[test]
    fn the_summary_has_percentiles_throughput_and_faults() {
        let mut b = Hb::new("register");
        // 100 ok puts taking 1..=100 ms, one every 10 ms; one failed put.
        for i in 0..100u64 {
            let t = i * 10_000;
            b.put(i % 4, &format!("v{i}"), i + 1, (t, t + (i + 1) * 1_000));
        }
        b.fail(5, put("x"), (0, 5));
        b.h.nemesis.push(NemesisEvent {
            kind: "pause".into(),
            detail: "n3".into(),
            start_us: 100,
            end_us: Some(200),
        });
        let (h, res) = checked(&b);
        let s = summary_json(&h, &res);
        assert_eq!(s["result"]["validity"], "valid");
        assert_eq!(s["latency_ms"]["count"], 100);
        assert_eq!(s["latency_ms"]["p50"], 50.0);
        assert_eq!(s["latency_ms"]["p99"], 99.0);
        assert_eq!(s["latency_ms"]["p999"], 100.0);
        assert_eq!(s["latency_ms"]["max"], 100.0);
        assert_eq!(s["nemesis"][0]["kind"], "pause");
        let per_second = s["throughput"]["per_second"].as_array().unwrap();
        let total: u64 = per_second
            .iter()
            .map(|b| b["ok"].as_u64().unwrap() + b["fail"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 101);
        assert!(s["throughput"]["ok_per_s"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(quantile(&v, 0.5), Some(500));
        assert_eq!(quantile(&v, 0.99), Some(990));
        assert_eq!(quantile(&v, 0.999), Some(999));
        assert_eq!(quantile(&[7], 0.999), Some(7));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(10_000_000)[..3], [0, 1_000_000, 2_000_000]);
        assert_eq!(ticks(95_000)[1], 10_000);
        assert!(ticks(95_000).len() <= 13);
        assert_eq!(ticks(1), vec![0, 1]);
        assert!(ticks(600_000_000).len() <= 13);
        assert!(ticks(u64::MAX / 2).len() <= 13);
    }
}
