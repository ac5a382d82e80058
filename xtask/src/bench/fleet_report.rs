//! The fleet part's section of bench/RESULTS.md and its chart panels.

use std::fmt::Write as _;

use super::fleet::{FleetMetric, StormMetric};
use super::peers::{self, Via};
use super::report::{ratio, table, vias_with};
use super::topology::Kind;
use super::{Metric, Results, Run};

impl FleetMetric {
    pub fn label(self) -> &'static str {
        match self {
            Self::MachineCpu => "machine CPU, ms per 1,000 msgs",
            Self::Busy => "machine busy %",
            Self::ProxyCpu => "proxy CPU, ms per 1,000 msgs",
            Self::P50 => "round trip p50 (µs)",
            Self::P99 => "round trip p99 (µs)",
            Self::P999 => "round trip p99.9 (µs)",
            Self::PerSecond => "msgs/s echoed",
            Self::Errors => "errors",
            Self::MemProxy => "proxy RSS, KiB/conn",
            Self::MemKernel => "kernel TCP, KiB/conn",
            Self::MemTotal => "proxy + kernel, KiB/conn",
        }
    }

    pub fn decimals(self) -> usize {
        match self {
            Self::MachineCpu | Self::ProxyCpu => 1,
            Self::MemProxy | Self::MemKernel | Self::MemTotal => 1,
            _ => 0,
        }
    }
}

impl StormMetric {
    pub fn label(self) -> &'static str {
        match self {
            Self::AllMs => "time to every first echo (ms)",
            Self::PerSecond => "devices/s",
            Self::Failed => "failed devices",
        }
    }

    pub fn decimals(self) -> usize {
        0
    }
}

const FLEET_COLUMNS: [FleetMetric; 11] = [
    FleetMetric::MachineCpu,
    FleetMetric::Busy,
    FleetMetric::ProxyCpu,
    FleetMetric::P50,
    FleetMetric::P99,
    FleetMetric::P999,
    FleetMetric::PerSecond,
    FleetMetric::Errors,
    FleetMetric::MemProxy,
    FleetMetric::MemKernel,
    FleetMetric::MemTotal,
];

const STORM_COLUMNS: [Metric; 3] = [
    Metric::Storm(StormMetric::AllMs),
    Metric::Storm(StormMetric::PerSecond),
    Metric::Storm(StormMetric::Failed),
];

/// The fleet tables for every topology, then the ratios to HAProxy.
pub fn markdown(run: &Run, kinds: &[Kind]) -> String {
    let r = &run.results;
    let Some(s) = &run.fleet else {
        return String::new();
    };
    if !r.keys().any(|(_, _, m)| m.is_fleet()) {
        return String::new();
    }
    let mut md = String::from("## Fleet: many small-message connections (IoT-shaped)\n\n");
    md += &method(run);
    for &kind in kinds {
        for &size in &s.sizes {
            let metrics = FLEET_COLUMNS.map(|m| Metric::Fleet(size, m));
            let vias = vias_with(r, kind, &metrics);
            if !vias.is_empty() {
                let _ = writeln!(md, "### {}, {size} B messages\n", kind.label());
                md += &table(r, kind, &vias, &metrics, Via::label);
            }
        }
        let vias = vias_with(r, kind, &STORM_COLUMNS);
        if !vias.is_empty() {
            let _ = writeln!(
                md,
                "### {}, reconnect storm: {} TLS devices at once\n",
                kind.label(),
                s.conns
            );
            md += &table(r, kind, &vias, &STORM_COLUMNS, Via::label);
        }
    }
    md += &ratios(r, kinds, &s.sizes);
    md
}

fn method(run: &Run) -> String {
    let Some(s) = &run.fleet else {
        return String::new();
    };
    format!(
        "{conns} connections, each sending one message {rate} times a second (phased evenly \
         across connections) and reading its echo; connected first (64 connects in flight, \
         not measured), {warmup} s warm-up, then {secs} s measured; median of {rounds} \
         interleaved round(s) (min-max). Load: `fleet` (a single-threaded tokio generator, \
         tests/src/bin/fleet) in the client namespace; a tokio echo server in the server \
         namespace. Every measurement gets a freshly started proxy. CPU per 1,000 messages \
         echoed over the measured window: machine = all CPUs (/proc/stat; generator and echo \
         server included, alike for every path), proxy = the proxy's processes. Memory per \
         connection, with every connection still open at the end of the window, minus before \
         they connected: proxy = VmRSS summed over its processes; kernel = `TCP mem` of \
         /proc/net/sockstat (every socket of every hop: client, proxy both sides, server; the \
         kernel caches up to 1 MiB per CPU, so small fleets read coarsely). Storm: {conns} \
         devices started at once, each a TCP connect, a full TLS 1.3 handshake (no \
         resumption) with the TLS echo server passed through at L4, one 64 B message and its \
         echo; all stay connected until the last is served (timeout 60 s). HAProxy: maxconn \
         {maxconn} (global and per listener), nbthread 2; nginx: 2 workers, \
         worker_connections {wc}; accept queues 4096 everywhere (the forwarder's); \
         descriptor limit (RLIMIT_NOFILE) of every process: {nofile}. Offered load: {offered} \
         messages/s; when \"msgs/s echoed\" falls short of it or the machine is near 100% busy, \
         the path (or the machine) is saturated and round trips measure queueing. The storm's \
         time includes the devices' own TLS work, done by one client thread on the same \
         cores for every path.\n\n",
        conns = s.conns,
        rate = s.rate,
        warmup = s.warmup,
        secs = s.secs,
        rounds = s.rounds,
        maxconn = peers::haproxy_maxconn(s.conns),
        wc = peers::nginx_worker_connections(s.conns),
        nofile = s.nofile,
        offered = s.conns as f64 * s.rate,
    )
}

/// Ratios of medians, the forwarder (spliced, then userspace) to HAProxy.
fn ratios(r: &Results, kinds: &[Kind], sizes: &[u16]) -> String {
    let mut rows: Vec<(String, Metric)> = Vec::new();
    for &size in sizes {
        for (what, m) in [
            ("agent CPU per message", FleetMetric::ProxyCpu),
            ("machine CPU per message", FleetMetric::MachineCpu),
            ("round trip p99", FleetMetric::P99),
            (
                "memory per connection (proxy + kernel)",
                FleetMetric::MemTotal,
            ),
        ] {
            rows.push((format!("{what}, {size} B"), Metric::Fleet(size, m)));
        }
    }
    rows.push(("storm: time to every first echo".into(), STORM_COLUMNS[0]));
    let mut md = String::from(
        "### Forwarder vs HAProxy, ratios of medians: kernel splice / userspace (`--no-ebpf`), \
         each divided by HAProxy (lower is better)\n\n| figure |",
    );
    for k in kinds {
        let _ = write!(md, " {} |", k.label());
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(kinds.len()));
    for (label, metric) in rows {
        let _ = write!(md, "| {label} |");
        for &kind in kinds {
            let f = |via| {
                ratio(r, kind, via, Via::Haproxy, metric).map_or("-".into(), |x| format!("{x:.2}x"))
            };
            let _ = write!(md, " {} / {} |", f(Via::Splice), f(Via::Userspace));
        }
        let _ = writeln!(md);
    }
    md.push('\n');
    md
}

/// The chart's fleet panels for `kind`, at the smallest message size measured.
pub fn panels(r: &Results, kind: Kind) -> Vec<Metric> {
    let size = r
        .keys()
        .filter(|(k, _, _)| *k == kind)
        .filter_map(|(_, _, m)| match m {
            Metric::Fleet(size, _) => Some(*size),
            _ => None,
        })
        .min();
    let mut panels: Vec<Metric> = match size {
        Some(size) => [
            FleetMetric::MachineCpu,
            FleetMetric::ProxyCpu,
            FleetMetric::P99,
            FleetMetric::MemTotal,
        ]
        .map(|m| Metric::Fleet(size, m))
        .to_vec(),
        None => Vec::new(),
    };
    panels.push(STORM_COLUMNS[0]);
    panels.retain(|m| r.keys().any(|(k, _, key)| *k == kind && key == m));
    panels
}
