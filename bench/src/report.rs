//! The output: markdown tables ready for BENCHMARKS.md and an SVG chart of
//! the throughputs and the latency distribution.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;

use crate::daemon::SETTINGS;
use crate::delivery::{self, Results};
use crate::stats::Runs;
use crate::write_path::{self, Scenario, Variant, VariantResult};

type WriteResults = Vec<(Scenario, Vec<(Variant, VariantResult)>)>;

/// The machine and server the numbers come from.
#[derive(Debug, Default)]
pub struct Meta {
    pub command: String,
    pub quick: bool,
    pub date: String,
    pub commit: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub load_start: String,
    pub load_end: String,
    pub postgres: Vec<(String, String)>,
    pub elapsed: Duration,
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn loadavg() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Meta {
    pub async fn collect(admin_url: &str, quick: bool) -> anyhow::Result<Meta> {
        let date = tokio::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let commit = tokio::process::Command::new("git")
            .args(["log", "-1", "--format=%h %s"])
            .output()
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0);
        Ok(Meta {
            command: String::new(),
            quick,
            date,
            commit,
            cpu,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            memory_gib,
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            load_start: loadavg(),
            load_end: String::new(),
            postgres: crate::db::server_facts(admin_url)
                .await
                .context("reading the server's settings")?,
            elapsed: Duration::ZERO,
        })
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.load_end = loadavg();
        self.elapsed = elapsed;
    }
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "pass"
    } else {
        "**miss**"
    }
}

fn w_target(s: Scenario) -> (&'static str, f64, bool) {
    // (text, bound, higher is better)
    match s {
        Scenario::W1 => ("≥ 0.75", 0.75, true),
        Scenario::W2 => ("≥ 0.85", 0.85, true),
        Scenario::W3 => ("≤ 2.0× time", 2.0, false),
    }
}

fn w_title(s: Scenario) -> &'static str {
    match s {
        Scenario::W1 => "W1 single-row INSERT, 1 client (tps ratio)",
        Scenario::W2 => "W2 single-row INSERT + UPDATE, 16 clients (tps ratio)",
        Scenario::W3 => "W3 one 10,000-row INSERT (time ratio)",
    }
}

pub fn markdown(
    meta: &Meta,
    w_scale: &write_path::Scale,
    write: &WriteResults,
    e_scale: &delivery::Scale,
    engine: Option<&Results>,
) -> String {
    let mut s = String::new();
    let mut line = |t: String| {
        s.push_str(&t);
        s.push('\n');
    };
    line(format!(
        "# thorn benchmark results{}\n",
        if meta.quick {
            " (--quick: smoke scale, timings mean little)"
        } else {
            ""
        }
    ));
    line(format!(
        "- date: {}; whole run took {:.0} s",
        meta.date,
        meta.elapsed.as_secs_f64()
    ));
    line(format!("- command: `{}`", meta.command));
    line(format!("- code: {}", meta.commit));
    line(format!(
        "- machine: {} cores ({}), {:.1} GiB memory, Linux {}",
        meta.cores, meta.cpu, meta.memory_gib, meta.kernel
    ));
    line(format!(
        "- load average (1, 5, 15 min) at start: {}; at end: {} (anything far above 0 means other work shared the cores)",
        meta.load_start, meta.load_end
    ));
    line(format!(
        "- PostgreSQL: {}",
        meta.postgres
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    line(format!(
        "- thorn daemon: delivery.concurrency = {}, delivery.per_subscriber_concurrency = {}, delivery.batch_size = {}, dispatch.batch_size = {}, delivery.timeout = {} ms, log.level = warn; everything else default",
        SETTINGS.concurrency, SETTINGS.per_subscriber_concurrency, SETTINGS.delivery_batch, SETTINGS.dispatch_batch, SETTINGS.timeout_ms
    ));
    line(String::new());

    if !write.is_empty() {
        line("## Write path (pgbench)\n".into());
        line(format!(
            "pgbench -M prepared, {} s per run (W3: {} statements per run), {} rounds; every round runs every variant (order rotated), and each value is divided by the plain table's value of the same round. Median over rounds, spread = min–max of the per-round ratios. {} rows preloaded for the UPDATEs; tables truncated and CHECKPOINT before every run.\n",
            w_scale.seconds, w_scale.bulk_statements, w_scale.rounds, w_scale.preload
        ));
        line("| scenario | trigger on the table | relative to no trigger (median) | spread | raw median | thorn target | result |".into());
        line("|---|---|---|---|---|---|---|".into());
        for (scenario, results) in write {
            let (target, bound, higher) = w_target(*scenario);
            for (variant, r) in results {
                let raw = match scenario {
                    Scenario::W3 => format!("{:.1} ms", r.raw.median()),
                    _ => format!("{:.0} tps", r.raw.median()),
                };
                // Judged: the state under load. A daemon asleep is woken by the
                // first NOTIFY and stops them; thorn+waiter pins it asleep.
                let is_thorn = *variant == Variant::Thorn;
                let m = r.ratio.median();
                let result = if is_thorn {
                    verdict(if higher { m >= bound } else { m <= bound })
                } else {
                    ""
                };
                line(format!(
                    "| {} | {} | {:.2} | {} | {} | {} | {} |",
                    w_title(*scenario),
                    variant.label(),
                    m,
                    r.ratio.spread(2),
                    raw,
                    if is_thorn { target } else { "" },
                    result
                ));
            }
        }
        line(String::new());
    }

    if let Some(e) = engine {
        line("## Delivery engine (release `thorn run` → in-process receiver)\n".into());
        line(format!(
            "{} run(s) per scenario, each on a fresh database; median and min–max. Deliveries/s count from the first write (E1, E3, E5) or the daemon's start (E4, E6) to the last receipt. Signatures verified on {} sampled deliveries, {} wrong.\n",
            e_scale.runs, e.verified, e.bad_signatures
        ));
        line("| scenario | metric | median | spread | target | result |".into());
        line("|---|---|---|---|---|---|".into());
        let mut row = |scenario: &str,
                       metric: &str,
                       r: &Runs,
                       digits: usize,
                       target: &str,
                       pass: Option<bool>| {
            if r.values.is_empty() {
                return;
            }
            line(format!(
                "| {scenario} | {metric} | {:.*} | {} | {target} | {} |",
                digits,
                r.median(),
                r.spread(digits),
                pass.map_or("", verdict)
            ));
        };
        let e1 = format!("E1 {} events, 1 subscriber", e_scale.e1_events);
        row(
            &e1,
            "deliveries/s",
            &e.e1_rate,
            0,
            "≥ 5,000",
            Some(e.e1_rate.median() >= 5000.0),
        );
        row(
            &e1,
            "raw reqwest POSTs/s, no database (the limit)",
            &e.e1_raw,
            0,
            "",
            None,
        );
        row(&e1, "thorn / raw", &e.e1_ratio, 2, "", None);
        row(
            &e1,
            "idle RSS after start-up, MiB",
            &e.e1_idle_rss,
            1,
            "",
            None,
        );
        let e2 = format!(
            "E2 {} events/s for {} s, each its own transaction",
            e_scale.e2_rate, e_scale.e2_seconds
        );
        row(
            &e2,
            "achieved write rate, events/s",
            &e.e2_achieved,
            0,
            "",
            None,
        );
        row(
            &e2,
            "p50 commit→receipt, ms",
            &e.e2_p50,
            1,
            "≤ 10",
            Some(e.e2_p50.median() <= 10.0),
        );
        row(&e2, "p90, ms", &e.e2_p90, 1, "", None);
        row(
            &e2,
            "p99, ms",
            &e.e2_p99,
            1,
            "≤ 50",
            Some(e.e2_p99.median() <= 50.0),
        );
        row(&e2, "max, ms", &e.e2_max, 1, "", None);
        let e3 = format!(
            "E3 {} events × {} subscribers",
            e_scale.e3_events, e_scale.e3_subscribers
        );
        row(
            &e3,
            "deliveries/s",
            &e.e3_rate,
            0,
            "≥ 5,000",
            Some(e.e3_rate.median() >= 5000.0),
        );
        let e4 = format!("E4 backlog of {} events", e_scale.e4_events);
        row(
            &e4,
            "drain deliveries/s",
            &e.e4_rate,
            0,
            "≥ 5,000",
            Some(e.e4_rate.median() >= 5000.0),
        );
        row(
            &e4,
            "first delivery after start, ms",
            &e.e4_first_ms,
            0,
            "",
            None,
        );
        row(
            &e4,
            "peak RSS (VmHWM), MiB",
            &e.e4_peak,
            1,
            "≤ 150 MB",
            Some(e.e4_peak.median() <= 150.0),
        );
        row(
            &e4,
            &format!(
                "idle RSS {} s after the drain, MiB",
                e_scale.e4_idle_wait.as_secs()
            ),
            &e.e4_idle,
            1,
            "≤ 30 MB",
            Some(e.e4_idle.median() <= 30.0),
        );
        let e5 = format!(
            "E5 {} events × 100 subscribers, one hanging",
            e_scale.e5_events
        );
        row(
            &e5,
            "99 healthy, without the hanging one: deliveries/s",
            &e.e5_without,
            0,
            "",
            None,
        );
        row(
            &e5,
            "99 healthy, with the hanging one: deliveries/s",
            &e.e5_with,
            0,
            "",
            None,
        );
        row(
            &e5,
            "with / without",
            &e.e5_ratio,
            2,
            "≥ 0.90",
            Some(e.e5_ratio.median() >= 0.9),
        );
        row(
            &e5,
            &format!(
                "99 healthy, with the hanging one holding {} due deliveries: deliveries/s",
                e_scale.e5_backlog
            ),
            &e.e5_backlog_with,
            0,
            "",
            None,
        );
        row(
            &e5,
            "with the hanging one and its backlog / without",
            &e.e5_backlog_ratio,
            2,
            "(≥ 0.90)",
            Some(e.e5_backlog_ratio.median() >= 0.9),
        );
        for (k, runs) in &e.e6 {
            row(
                &format!("E6 backlog of {} events", e_scale.e6_events),
                &format!("{k} daemon(s): deliveries/s"),
                runs,
                0,
                "",
                None,
            );
        }
        if !e.e6.is_empty() {
            line(format!(
                "| E6 | duplicates over all runs (same webhook-id / same event and subscriber) | {} / {} | | 0 | {} |",
                e.e6_duplicates,
                e.e6_duplicate_events,
                verdict(e.e6_duplicates == 0 && e.e6_duplicate_events == 0)
            ));
        }
        if e.e5_hung > 0 {
            line(format!("\nThe hanging subscriber was sent {} requests in E5 (each cut off by the timeout).", e.e5_hung));
        }
        if !e.incomplete.is_empty() {
            line(format!(
                "\nIncomplete runs (rates count what arrived): {}",
                e.incomplete.join("; ")
            ));
        }
        line(String::new());
    }
    line("![throughput and latency](chart.svg)".into());
    s
}

/// Draws the chart: write-path ratios, delivery throughputs and the E2
/// latency distribution.
pub fn chart(path: &Path, write: &WriteResults, engine: Option<&Results>) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, (1100, 1300)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let panels = root.split_evenly((3, 1));

    // 1. Write path: ratio to no trigger, per scenario and variant.
    let mut bars: Vec<(String, f64, f64, f64, usize)> = Vec::new();
    for (scenario, results) in write {
        for (variant, r) in results {
            if *variant == Variant::Plain {
                continue;
            }
            let color = write_path::VARIANTS
                .iter()
                .position(|v| v == variant)
                .unwrap_or(0);
            bars.push((
                format!("{scenario:?} {}", variant.tiny()),
                r.ratio.median(),
                r.ratio.min(),
                r.ratio.max(),
                color,
            ));
        }
    }
    bar_panel(
        &panels[0],
        "Write path: relative to the same table without a trigger (W1, W2: tps, higher is better; W3: time, lower is better)",
        "ratio",
        &bars,
        &[],
    )?;

    // 2. Delivery throughput.
    let mut bars = Vec::new();
    if let Some(e) = engine {
        let mut add = |name: &str, r: &Runs, color: usize| {
            if !r.values.is_empty() {
                bars.push((name.to_owned(), r.median(), r.min(), r.max(), color));
            }
        };
        // Colors of PALETTE: thorn blue, the raw limit grey, E5 with the
        // hanging subscriber green, E6 orange.
        add("E1 thorn", &e.e1_rate, 5);
        add("E1 raw", &e.e1_raw, 0);
        add("E3", &e.e3_rate, 5);
        add("E4", &e.e4_rate, 5);
        add("E5 alone", &e.e5_without, 5);
        add("E5 +hang", &e.e5_with, 6);
        add("E5 +backlog", &e.e5_backlog_with, 6);
        for (k, r) in &e.e6 {
            add(&format!("E6 ×{k}"), r, 2);
        }
    }
    bar_panel(
        &panels[1],
        "Deliveries/s (median, min–max whiskers; dashed: 5,000/s target). E1 raw: reqwest alone; E5: the 99 healthy subscribers; E6 ×k: k daemons",
        "deliveries/s",
        &bars,
        &[5000.0],
    )?;

    // 3. Latency distribution of E2.
    latency_panel(&panels[2], engine.map_or(&[][..], |e| &e.e2_latencies[..]))?;
    root.present().map_err(plot_error)?;
    Ok(())
}

fn plot_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {e}")
}

/// Indexed like write_path::VARIANTS.
const PALETTE: [RGBColor; 7] = [
    RGBColor(140, 140, 140),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(190, 190, 190),
    RGBColor(110, 110, 110),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
];

fn bar_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_desc: &str,
    bars: &[(String, f64, f64, f64, usize)],
    lines: &[f64],
) -> anyhow::Result<()> {
    let n = bars.len().max(1) as i32;
    let top = bars
        .iter()
        .map(|b| b.3.max(b.1))
        .chain(lines.iter().copied())
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n).into_segmented(), 0f64..top)
        .map_err(plot_error)?;
    let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                names.get(*i as usize).cloned().unwrap_or_default()
            }
            SegmentValue::Last => String::new(),
        })
        .x_label_style(("sans-serif", 11).into_font())
        .y_label_formatter(&|v| {
            if top > 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.1}")
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(plot_error)?;
    for (i, (_, median, lo, hi, color)) in bars.iter().enumerate() {
        let i = i as i32;
        if !median.is_finite() {
            continue;
        }
        let c = PALETTE[*color % PALETTE.len()];
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), *median),
            ],
            c.filled(),
        );
        bar.set_margin(0, 0, 6, 6);
        chart
            .draw_series(std::iter::once(bar))
            .map_err(plot_error)?;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), *lo),
                    (SegmentValue::CenterOf(i), *hi),
                ],
                BLACK.stroke_width(2),
            )))
            .map_err(plot_error)?;
        let label = if *median >= 100.0 {
            format!("{median:.0}")
        } else {
            format!("{median:.2}")
        };
        chart
            .draw_series(std::iter::once(Text::new(
                label,
                (SegmentValue::CenterOf(i), hi.max(*median) + top * 0.02),
                ("sans-serif", 11).into_font(),
            )))
            .map_err(plot_error)?;
    }
    for y in lines {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(SegmentValue::Exact(0), *y), (SegmentValue::Last, *y)],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(plot_error)?;
    }
    Ok(())
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    latencies: &[Duration],
) -> anyhow::Result<()> {
    let mut ms: Vec<f64> = latencies
        .iter()
        .map(|d| (d.as_secs_f64() * 1e3).max(0.01))
        .collect();
    ms.sort_by(f64::total_cmp);
    let hi = ms.last().copied().unwrap_or(100.0).max(60.0) * 1.2;
    let lo = ms.first().copied().unwrap_or(0.1).min(1.0) * 0.8;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!(
                "E2 latency, commit → receipt at 500 events/s: cumulative distribution of {} deliveries (dashed: 10 ms p50 and 50 ms p99 targets)",
                ms.len()
            ),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds (log scale)")
        .y_desc("% of deliveries at or below")
        .draw()
        .map_err(plot_error)?;
    let n = ms.len();
    let step = (n / 2000).max(1);
    let points: Vec<(f64, f64)> = ms
        .iter()
        .enumerate()
        .filter(|(i, _)| i % step == 0 || *i + 1 == n)
        .map(|(i, v)| (*v, 100.0 * (i + 1) as f64 / n as f64))
        .collect();
    chart
        .draw_series(LineSeries::new(points, PALETTE[5].stroke_width(2)))
        .map_err(plot_error)?;
    for x in [10.0, 50.0] {
        chart
            .draw_series(DashedLineSeries::new(
                vec![(x, 0.0), (x, 100.0)],
                6,
                4,
                RED.stroke_width(1),
            ))
            .map_err(plot_error)?;
    }
    Ok(())
}
