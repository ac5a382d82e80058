//! The bench's output: Markdown tables (figures as median (min-max), ratios, targets) and
//! an SVG chart drawn with plotters.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use plotters::prelude::*;

use super::fleet::{FleetMetric, StormMetric};
use super::peers::Via;
use super::topology::Kind;
use super::{Metric, Results, Run, fleet_report, http};

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Self::OneWay1 => "one-way, 1 stream (Gbit/s)",
            Self::OneWay8 => "one-way, 8 streams (Gbit/s)",
            Self::Echo1 => "echo, 1 stream (Gbit/s)",
            Self::Echo8 => "echo, 8 streams (Gbit/s)",
            Self::RttP50 => "64 B round trip p50 (µs)",
            Self::RttP99 => "64 B round trip p99 (µs)",
            Self::ConnRate => "new connections/s",
            Self::TtfbP99 => "time to first byte p99 (µs)",
            Self::ProxyCpu1 => "proxy CPU-s/GiB (1 stream)",
            Self::MachineCpu1 => "machine CPU-s/GiB (1 stream)",
            Self::MachineCpu8 => "machine CPU-s/GiB (8 streams)",
            Self::Busy1 => "machine busy % (1 stream)",
            Self::GetRps => "small GET req/s",
            Self::GetP99 => "GET p99 (ms)",
            Self::PostRps => "1 MiB POST req/s",
            Self::PostP99 => "POST p99 (ms)",
            Self::WsP50 => "WebSocket 64 B round trip p50 (µs)",
            Self::WsP99 => "WebSocket round trip p99 (µs)",
            Self::Fleet(_, m) => m.label(),
            Self::Storm(m) => m.label(),
        }
    }

    pub(super) fn is_fleet(self) -> bool {
        matches!(self, Self::Fleet(..) | Self::Storm(..))
    }

    /// The label with what it belongs to, for a chart panel's caption.
    fn caption(self) -> String {
        match self {
            Self::Fleet(size, m) => format!("fleet {size} B: {}", m.label()),
            Self::Storm(m) => format!("TLS storm: {}", m.label()),
            _ => self.label().to_owned(),
        }
    }

    /// Values are stored in µs; milliseconds read better for HTTP requests.
    fn scale(self) -> f64 {
        match self {
            Self::GetP99 | Self::PostP99 => 1e-3,
            _ => 1.0,
        }
    }

    fn decimals(self) -> usize {
        match self {
            Self::OneWay1 | Self::OneWay8 | Self::Echo1 | Self::Echo8 => 1,
            Self::ProxyCpu1 | Self::MachineCpu1 | Self::MachineCpu8 => 2,
            Self::GetP99 | Self::PostP99 => 2,
            Self::Fleet(_, m) => m.decimals(),
            Self::Storm(m) => m.decimals(),
            _ => 0,
        }
    }

    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Self::OneWay1
                | Self::OneWay8
                | Self::Echo1
                | Self::Echo8
                | Self::ConnRate
                | Self::GetRps
                | Self::PostRps
                | Self::Fleet(_, FleetMetric::PerSecond)
                | Self::Storm(StormMetric::PerSecond)
        )
    }
}

const L4_METRICS: [Metric; 12] = [
    Metric::OneWay1,
    Metric::OneWay8,
    Metric::Echo1,
    Metric::Echo8,
    Metric::RttP50,
    Metric::RttP99,
    Metric::ConnRate,
    Metric::TtfbP99,
    Metric::ProxyCpu1,
    Metric::MachineCpu1,
    Metric::MachineCpu8,
    Metric::Busy1,
];

const RATIO_METRICS: [Metric; 8] = [
    Metric::OneWay1,
    Metric::OneWay8,
    Metric::Echo1,
    Metric::Echo8,
    Metric::RttP99,
    Metric::ConnRate,
    Metric::TtfbP99,
    Metric::MachineCpu1,
];

const HTTP_METRICS: [Metric; 6] = [
    Metric::GetRps,
    Metric::GetP99,
    Metric::PostRps,
    Metric::PostP99,
    Metric::WsP50,
    Metric::WsP99,
];

/// (min, median, max) of the samples.
pub(super) fn summary(samples: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = if v.len() % 2 == 1 {
        *v.get(v.len() / 2)?
    } else {
        (v.get(v.len() / 2 - 1)? + v.get(v.len() / 2)?) / 2.0
    };
    Some((*v.first()?, mid, *v.last()?))
}

pub(super) fn median(results: &Results, kind: Kind, via: Via, metric: Metric) -> Option<f64> {
    summary(results.get(&(kind, via, metric))?).map(|(_, m, _)| m)
}

pub(super) fn cell(results: &Results, kind: Kind, via: Via, metric: Metric) -> String {
    let Some((lo, mid, hi)) = results.get(&(kind, via, metric)).and_then(|s| summary(s)) else {
        return "-".into();
    };
    let d = metric.decimals();
    let k = metric.scale();
    if results[&(kind, via, metric)].len() == 1 {
        return format!("{:.d$}", mid * k);
    }
    format!("{:.d$} ({:.d$}-{:.d$})", mid * k, lo * k, hi * k)
}

pub(super) fn ratio(
    results: &Results,
    kind: Kind,
    via: Via,
    base: Via,
    metric: Metric,
) -> Option<f64> {
    let a = median(results, kind, via, metric)?;
    let b = median(results, kind, base, metric)?;
    (b > 0.0).then(|| a / b)
}

fn shell(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text += &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

pub fn machine_description(load_before: &str, load_after: &str, took: Duration) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?", |(_, m)| m.trim());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let load = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "- date: {}\n- kernel: {}\n- CPU: {model}, {} cores online; memory {mem}\n\
         - peers: {}; {}; {}\n- forwarder: commit {}\n\
         - load average (1/5/15 min) before: {}, after: {}; the run took {:.0?}\n",
        shell("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        shell("uname", &["-r"]),
        shell("nproc", &[]),
        shell("haproxy", &["-v"]),
        shell("nginx", &["-v"]),
        shell("iperf3", &["--version"]),
        shell("git", &["describe", "--always", "--dirty"]),
        load(load_before),
        load(load_after),
        took
    )
}

pub fn markdown(run: &Run, machine: &str, tried: Option<&str>) -> String {
    let r = &run.results;
    let mut md = String::new();
    let _ = writeln!(md, "# forwarder benchmark (`cargo xtask bench`)\n");
    let _ = writeln!(md, "{machine}");
    let kinds: Vec<Kind> = {
        let mut k: Vec<Kind> = r.keys().map(|(k, _, _)| *k).collect();
        k.dedup();
        k
    };
    let classic = r.keys().any(|(_, _, m)| !m.is_fleet());
    if classic {
        md += &classic_intro(run);
        for &kind in &kinds {
            md += &l4_section(r, kind);
            md += &http_section(r, kind);
        }
        md += &targets(r, &kinds);
    }
    md += &fleet_report::markdown(run, &kinds);
    if !run.forwarder_stats.is_empty() {
        let _ = writeln!(
            md,
            "## The spliced forwarder's counters at the end of each topology\n"
        );
        for (kind, stats) in &run.forwarder_stats {
            let _ = writeln!(md, "- {}: `{stats}`", kind.label());
        }
        let _ = writeln!(md);
    }
    if !run.failures.is_empty() {
        let _ = writeln!(md, "## Failed measurements\n");
        for f in &run.failures {
            let _ = writeln!(md, "- {f}");
        }
        let _ = writeln!(md);
    }
    if let Some(tried) = tried {
        let _ = writeln!(md, "{}", tried.trim());
    }
    md
}

fn classic_intro(run: &Run) -> String {
    let s = run.settings;
    format!(
        "Each figure: median of {} interleaved round(s) (min-max). Bulk runs {} s each (iperf3 \
         one way; echo {:.1} s = our client writing 128 KiB chunks and counting bytes echoed back), \
         64 B ping-pong {:.1} s, connection setup {:.1} s with 4 clients (connect, 1 byte each \
         way, reset), HTTPS {:.1} s per load. CPU-s/GiB: CPU seconds per GiB of payload \
         received, over the one-way run; machine = all CPUs from /proc/stat (user, system, \
         irq, softirq: the kernel splice's work is there), proxy = the proxy's processes \
         (/proc/PID/stat). The load generators and servers run on the same 2 cores and are \
         in the machine figure for every path alike. The namespaces' veth pairs have GRO on, \
         as physical NICs do by default. The machine is shared with other work (compiles): \
         figures are noisy, compare within a run.\n\n",
        s.rounds,
        s.bulk_secs,
        s.echo.as_secs_f64(),
        s.rtt.as_secs_f64(),
        s.connect.as_secs_f64(),
        s.http_secs
    )
}

/// A Markdown table: a row per path, a column per metric, cells median (min-max).
pub(super) fn table(
    r: &Results,
    kind: Kind,
    vias: &[Via],
    metrics: &[Metric],
    name: impl Fn(Via) -> &'static str,
) -> String {
    let mut md = String::from("| path |");
    for m in metrics {
        let _ = write!(md, " {} |", m.label());
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(metrics.len()));
    for &via in vias {
        let _ = write!(md, "| {} |", name(via));
        for &m in metrics {
            let _ = write!(md, " {} |", cell(r, kind, via, m));
        }
        let _ = writeln!(md);
    }
    md.push('\n');
    md
}

/// The paths that have any of `metrics` in `kind`.
pub(super) fn vias_with(r: &Results, kind: Kind, metrics: &[Metric]) -> Vec<Via> {
    Via::ALL
        .into_iter()
        .filter(|v| metrics.iter().any(|m| r.contains_key(&(kind, *v, *m))))
        .collect()
}

fn l4_section(r: &Results, kind: Kind) -> String {
    let vias = vias_with(r, kind, &L4_METRICS);
    if vias.is_empty() {
        return String::new();
    }
    let mut md = format!("## TCP, {}\n\n", kind.label());
    md += &table(r, kind, &vias, &L4_METRICS, Via::label);
    let _ = writeln!(
        md,
        "Ratios of medians, to direct / to HAProxy (for times and CPU, lower is better):\n"
    );
    let _ = write!(md, "| path |");
    for m in RATIO_METRICS {
        let _ = write!(md, " {} |", m.label());
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(RATIO_METRICS.len()));
    for &via in vias.iter().filter(|v| **v != Via::Direct) {
        let _ = write!(md, "| {} |", via.label());
        for m in RATIO_METRICS {
            let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}x"));
            let _ = write!(
                md,
                " {} / {} |",
                f(ratio(r, kind, via, Via::Direct, m)),
                f(ratio(r, kind, via, Via::Haproxy, m))
            );
        }
        let _ = writeln!(md);
    }
    md.push('\n');
    md
}

fn http_section(r: &Results, kind: Kind) -> String {
    let vias: Vec<Via> = vias_with(r, kind, &HTTP_METRICS)
        .into_iter()
        .filter(|v| http::VIAS.contains(v))
        .collect();
    if vias.is_empty() {
        return String::new();
    }
    let mut md = format!(
        "## HTTPS, {} (TLS terminated and re-originated to a stand-in hub; GET: 16 \
         keep-alive clients, POST: 4, WebSocket: 1)\n\n",
        kind.label()
    );
    md += &table(r, kind, &vias, &HTTP_METRICS, http::label);
    md
}

/// The issue's targets, judged on this run's medians.
fn targets(r: &Results, kinds: &[Kind]) -> String {
    type Check = (&'static str, Via, Via, Metric, f64);
    let checks: [Check; 7] = [
        (
            "spliced throughput >= 0.8x direct (1 stream)",
            Via::Splice,
            Via::Direct,
            Metric::OneWay1,
            0.8,
        ),
        (
            "spliced throughput >= 1.5x userspace (1 stream)",
            Via::Splice,
            Via::Userspace,
            Metric::OneWay1,
            1.5,
        ),
        (
            "spliced throughput >= 1x HAProxy (1 stream)",
            Via::Splice,
            Via::Haproxy,
            Metric::OneWay1,
            1.0,
        ),
        (
            "machine CPU per GiB <= 0.7x HAProxy's (1 stream)",
            Via::Splice,
            Via::Haproxy,
            Metric::MachineCpu1,
            0.7,
        ),
        (
            "spliced round trip p99 <= 1.2x direct",
            Via::Splice,
            Via::Direct,
            Metric::RttP99,
            1.2,
        ),
        (
            "HTTPS small GET req/s >= HAProxy's",
            Via::Splice,
            Via::Haproxy,
            Metric::GetRps,
            1.0,
        ),
        (
            "HTTPS 1 MiB POST req/s >= HAProxy's",
            Via::Splice,
            Via::Haproxy,
            Metric::PostRps,
            1.0,
        ),
    ];
    let mut md = String::from("## Targets (ratios of this run's medians)\n\n| target |");
    for k in kinds {
        let _ = write!(md, " {} |", k.label());
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(kinds.len()));
    for (label, via, base, metric, bound) in checks {
        let _ = write!(md, "| {label} |");
        for &kind in kinds {
            let text = match ratio(r, kind, via, base, metric) {
                None => "-".to_owned(),
                Some(x) => {
                    let met = if metric.higher_is_better() {
                        x >= bound
                    } else {
                        x <= bound
                    };
                    format!("{x:.2}x {}", if met { "met" } else { "**not met**" })
                }
            };
            let _ = write!(md, " {text} |");
        }
        let _ = writeln!(md);
    }
    md.push('\n');
    md
}

const PANELS: [Metric; 4] = [
    Metric::OneWay1,
    Metric::OneWay8,
    Metric::MachineCpu1,
    Metric::RttP99,
];

fn color(via: Via) -> RGBColor {
    match via {
        Via::Direct => RGBColor(120, 120, 120),
        Via::Splice => RGBColor(31, 119, 180),
        Via::Userspace => RGBColor(158, 202, 225),
        Via::Haproxy => RGBColor(214, 39, 40),
        Via::Nginx => RGBColor(44, 160, 44),
    }
}

/// The chart's rows: per topology, the classic panels and the fleet panels, each only if
/// the run measured them.
fn chart_rows(results: &Results) -> Vec<(Kind, Vec<Metric>)> {
    let mut kinds: Vec<Kind> = results.keys().map(|(k, _, _)| *k).collect();
    kinds.dedup();
    let has = |kind: Kind, metrics: &[Metric]| {
        results
            .keys()
            .any(|(k, _, m)| *k == kind && metrics.contains(m))
    };
    let mut rows = Vec::new();
    for kind in kinds {
        if has(kind, &PANELS) {
            rows.push((kind, PANELS.to_vec()));
        }
        let fleet = fleet_report::panels(results, kind);
        if !fleet.is_empty() {
            rows.push((kind, fleet));
        }
    }
    rows
}

/// One panel per (topology, metric): a bar per path at its median, a line from min to max.
pub fn chart(results: &Results, path: &Path) -> anyhow::Result<()> {
    let rows = chart_rows(results);
    if rows.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (1600, 460 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let root = root
        .titled(
            "forwarder vs direct, HAProxy, nginx: median with min-max of the rounds",
            ("sans-serif", 24),
        )
        .map_err(draw_error)?;
    let columns = rows.iter().map(|(_, m)| m.len()).max().unwrap_or(1);
    let areas = root.split_evenly((rows.len(), columns));
    for (i, area) in areas.iter().enumerate() {
        let (kind, metrics) = &rows[i / columns];
        if let Some(&metric) = metrics.get(i % columns) {
            panel(results, area, *kind, metric)?;
        }
    }
    root.present().map_err(draw_error)?;
    Ok(())
}

fn panel(
    results: &Results,
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    kind: Kind,
    metric: Metric,
) -> anyhow::Result<()> {
    let bars: Vec<(Via, (f64, f64, f64))> = Via::ALL
        .into_iter()
        .filter_map(|v| Some((v, summary(results.get(&(kind, v, metric))?)?)))
        .collect();
    if bars.is_empty() {
        return Ok(());
    }
    let top = bars.iter().map(|(_, (_, _, hi))| *hi).fold(0.0, f64::max) * 1.15;
    let n = bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("{}: {}", kind.label(), metric.caption()),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((0..n).into_segmented(), 0.0..top.max(1e-9))
        .map_err(draw_error)?;
    let names: Vec<&str> = bars.iter().map(|(v, _)| v.short()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i).map_or(String::new(), |s| s.to_string()),
            _ => String::new(),
        })
        .draw()
        .map_err(draw_error)?;
    draw_bars(&mut chart, &bars)
}

type Panel<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<
        plotters::coord::ranged1d::SegmentedCoord<plotters::coord::types::RangedCoordusize>,
        plotters::coord::types::RangedCoordf64,
    >,
>;

/// A bar per path at its median, and a line from min to max.
fn draw_bars(chart: &mut Panel, bars: &[(Via, (f64, f64, f64))]) -> anyhow::Result<()> {
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (via, (_, mid, _)))| {
            let mut bar = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *mid),
                ],
                color(*via).filled(),
            );
            bar.set_margin(0, 0, 8, 8);
            bar
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, (lo, _, hi)))| {
            PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), *lo),
                    (SegmentValue::CenterOf(i), *hi),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(draw_error)?;
    Ok(())
}

fn draw_error<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the chart: {err:?}")
}
