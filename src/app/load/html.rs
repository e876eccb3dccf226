//! The HTML report: one self-contained page (inline SVG and CSS, nothing
//! fetched) with throughput and latency over time for each run, the stress
//! events marked, and the per-operation tables.

use std::fmt::Write as _;

use super::LoadReport;
use super::record::RunReport;

const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 260.0;
const PAD_L: f64 = 60.0;
const PAD_R: f64 = 20.0;
const PAD_T: f64 = 20.0;
const PAD_B: f64 = 36.0;
const COLOURS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis maximum at or above `v`.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

struct Series<'a> {
    label: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
    colour: &'a str,
}

/// A line chart over seconds, with vertical markers for events.
// Long by design: one SVG chart: axes, series and labels drawn in order.
fn chart(title: &str, unit: &str, series: &[Series<'_>], events: &[(f64, String)]) -> String {
    // Latencies of ten seconds and more read better in seconds.
    let peak = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    if unit == "ms" && peak >= 10_000.0 {
        let scaled: Vec<Series<'_>> = series
            .iter()
            .map(|s| Series {
                label: s.label.clone(),
                points: s.points.iter().map(|&(t, v)| (t, v / 1000.0)).collect(),
                dashed: s.dashed,
                colour: s.colour,
            })
            .collect();
        return chart(title, "s", &scaled, events);
    }
    let t_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let y_max = nice(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let x = |t: f64| PAD_L + t / t_max * (WIDTH - PAD_L - PAD_R);
    let y = |v: f64| HEIGHT - PAD_B - v / y_max * (HEIGHT - PAD_T - PAD_B);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<figure><figcaption>{}</figcaption><svg viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{}">"##,
        esc(title),
        esc(title)
    );
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{PAD_L}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{} {unit}</text>"##,
            WIDTH - PAD_R,
            PAD_L - 6.0,
            y(v) + 4.0,
            trim(v),
            y = y(v)
        );
    }
    for i in 0..=5 {
        let t = t_max * f64::from(i) / 5.0;
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{}" text-anchor="middle" font-size="11">{:.0} s</text>"##,
            x(t),
            HEIGHT - PAD_B + 16.0,
            t
        );
    }
    for (i, (t, what)) in events.iter().enumerate() {
        let _ = write!(
            s,
            r##"<line x1="{x:.1}" x2="{x:.1}" y1="{PAD_T}" y2="{}" stroke="#888" stroke-dasharray="3 3"/><text x="{:.1}" y="{}" font-size="10" fill="#555">{}</text>"##,
            HEIGHT - PAD_B,
            x(*t) + 3.0,
            PAD_T + 10.0 + 12.0 * (i % 3) as f64,
            esc(what),
            x = x(*t)
        );
    }
    for (i, ser) in series.iter().enumerate() {
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", x(*t), y(*v)))
            .collect();
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="{}" stroke-width="1.5" {} points="{}"/><text x="{}" y="{}" font-size="11" fill="{}">{}</text>"##,
            ser.colour,
            if ser.dashed {
                r#"stroke-dasharray="6 3""#
            } else {
                ""
            },
            pts.join(" "),
            WIDTH - PAD_R - 200.0,
            PAD_T + 14.0 * (i as f64 + 1.0),
            ser.colour,
            esc(&ser.label)
        );
    }
    s.push_str("</svg></figure>");
    s
}

fn trim(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn runs(r: &LoadReport) -> Vec<&RunReport> {
    std::iter::once(&r.railyard).chain(r.raw.as_ref()).collect()
}

fn table(run: &RunReport) -> String {
    let mut s = format!(
        "<h3>{}</h3><p>{} operations in {:.1} s ({:.0}/s); p50 {:.2} ms, p99 {:.2} ms; late starts {}; replica share {}; stale reads <b>{}</b></p>",
        esc(&run.engine),
        run.operations,
        run.elapsed_s,
        run.throughput,
        run.p50_ms,
        run.p99_ms,
        run.late_starts,
        run.replica_share
            .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
        run.stale_reads
    );
    s.push_str("<table><tr><th>op</th><th>count</th><th>per s</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th><th>replica</th><th>errors</th><th>retries</th></tr>");
    for op in &run.ops {
        let classes = |m: &std::collections::BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{} {v}", esc(k)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.1}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&op.op),
            op.count,
            op.throughput,
            op.p50_ms,
            op.p95_ms,
            op.p99_ms,
            op.max_ms,
            op.replica_share
                .map_or("-".into(), |x| format!("{:.0}%", x * 100.0)),
            classes(&op.errors),
            classes(&op.retries)
        );
    }
    s.push_str("</table>");
    s
}

/// The page.
// Long by design: the report page is one template, top to bottom.
pub fn render(r: &LoadReport) -> String {
    let runs = runs(r);
    let events: Vec<(f64, String)> = r
        .railyard
        .events
        .iter()
        .map(|e| (e.t, e.what.clone()))
        .collect();
    let throughput: Vec<Series<'_>> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| Series {
            label: format!("{} ops/s", run.engine),
            points: run
                .series
                .iter()
                .map(|s| (s.t as f64, s.ops as f64))
                .collect(),
            dashed: false,
            colour: COLOURS[i % COLOURS.len()],
        })
        .collect();
    let mut latency = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        for (q, dashed) in [("p99", false), ("p50", true)] {
            latency.push(Series {
                label: format!("{} {q}", run.engine),
                points: run
                    .series
                    .iter()
                    .filter(|s| s.ops > 0)
                    .map(|s| (s.t as f64, if q == "p99" { s.p99_ms } else { s.p50_ms }))
                    .collect(),
                dashed,
                colour: COLOURS[i % COLOURS.len()],
            });
        }
    }
    let mut s = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>railyard load</title><style>\
         body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}\
         td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}\
         figure{margin:1em 0}figcaption{font-weight:600;margin-bottom:.3em}.ok{color:#1a7f37}.bad{color:#c62828}</style></head><body>",
    );
    let o = &r.options;
    let _ = write!(
        s,
        "<h1>railyard load</h1><p>{} traders, {} symbols, rate {}/s{}, concurrency {}, seed {}{}{}{}</p>",
        o.traders,
        o.symbols,
        o.rate,
        o.duration.map_or(String::new(), |d| format!(" for {d:?}")),
        o.concurrency,
        o.seed,
        if o.burst { ", burst" } else { "" },
        if o.pause_replica {
            ", replica paused"
        } else {
            ""
        },
        if o.restart_primary {
            ", primary restarted"
        } else {
            ""
        },
    );
    if let Some(x) = r.ratios {
        let class = |ok: bool| if ok { "ok" } else { "bad" };
        let _ = write!(
            s,
            "<p>Railyard / raw: throughput <b class=\"{}\">{:.3}×</b> (goal ≥ 0.9), p99 <b class=\"{}\">{:.3}×</b> (goal ≤ 1.0)</p>",
            class(x.throughput >= 0.9),
            x.throughput,
            class(x.p99 <= 1.0),
            x.p99
        );
    }
    if let Some(p) = &r.pgbench {
        let _ = match p {
            Ok(p) => write!(
                s,
                "<p>pgbench TPC-B-like, {} clients, {} s: {:.0} tps ({:.2} ms average)</p>",
                p.clients, p.seconds, p.tps, p.latency_ms
            ),
            Err(e) => write!(s, "<p>pgbench not run: {}</p>", esc(e)),
        };
    }
    s.push_str(&chart(
        "Throughput (operations finished per second)",
        "/s",
        &throughput,
        &events,
    ));
    s.push_str(&chart(
        "Latency from the intended start (p99 solid, p50 dashed)",
        "ms",
        &latency,
        &events,
    ));
    for run in runs {
        s.push_str(&table(run));
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_axis_maxima() {
        assert_eq!(nice(0.0), 1.0);
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(120.0), 200.0);
        assert_eq!(nice(2.4), 2.5);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
