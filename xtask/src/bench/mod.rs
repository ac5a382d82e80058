//! `cargo xtask bench`: the forwarder side by side with the direct path, HAProxy and
//! nginx, in one run, on loopback and across three namespaces joined by veth pairs.
//!
//! Each round measures every path once, one after the other (interleaved, so a burst of
//! other load on the machine hits all paths alike); each figure is the median of the
//! rounds with min and max. Results go to `bench/RESULTS.md` and `bench/chart.svg`.
//!
//! After those, the fleet part (`fleet.rs`, alone with `--fleet`): thousands of small-message
//! connections and a TLS reconnect storm on the same paths.

mod cpu;
mod fleet;
mod fleet_report;
mod http;
mod load;
mod peers;
mod report;
pub(crate) mod topology;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use peers::{Service, Via};
use topology::{Kind, Role, Topology};

/// What `cargo xtask bench` was asked for.
#[derive(clap::Args, Debug)]
pub struct Options {
    /// Under a minute: one short round (results go to target/bench-quick/).
    #[arg(long)]
    pub quick: bool,
    /// Rounds: every path is measured once per round; figures are medians of rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Only these paths (comma-separated): direct, splice, userspace, haproxy, nginx.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only this topology: loopback or netns.
    #[arg(long)]
    pub topology: Option<String>,
    /// Skip the HTTPS comparison.
    #[arg(long)]
    pub no_http: bool,
    /// Output directory (default: bench/, or target/bench-quick/ with --quick).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only the fleet part: many IoT-shaped connections, then a TLS reconnect storm.
    #[arg(long)]
    pub fleet: bool,
    /// Skip the fleet part of the full bench.
    #[arg(long, conflicts_with = "fleet")]
    pub no_fleet: bool,
    /// Fleet: concurrent connections (and devices in the storm).
    #[arg(long, default_value_t = 5000)]
    pub fleet_conns: usize,
    /// Fleet: message sizes in bytes, 64 and/or 1024 (default both; 64 with --quick).
    #[arg(long, value_delimiter = ',', value_parser = parse_fleet_size)]
    pub fleet_size: Vec<u16>,
    /// Fleet: messages per second per connection.
    #[arg(long, default_value_t = 5.0)]
    pub fleet_rate: f64,
    /// Fleet: seconds measured per path and size (default 10; 3 with --quick).
    #[arg(long)]
    pub fleet_secs: Option<f64>,
}

fn parse_fleet_size(s: &str) -> Result<u16, String> {
    match s {
        "64" => Ok(64),
        "1024" => Ok(1024),
        _ => Err(format!("{s}: 64 or 1024")),
    }
}

impl Options {
    /// The fleet part's settings, or `None` when it is skipped.
    fn fleet_settings(&self, rounds: usize) -> Option<fleet::Settings> {
        if self.no_fleet {
            return None;
        }
        let sizes = match (&self.fleet_size[..], self.quick) {
            ([], true) => vec![64],
            ([], false) => vec![64, 1024],
            (sizes, _) => sizes.to_vec(),
        };
        Some(fleet::Settings {
            conns: self.fleet_conns.max(1),
            sizes,
            rate: self.fleet_rate,
            secs: self
                .fleet_secs
                .unwrap_or(if self.quick { 3.0 } else { 10.0 }),
            warmup: if self.quick { 0.5 } else { 1.0 },
            rounds,
            nofile: 0,
        })
    }
}

/// How long each measurement runs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub rounds: usize,
    pub bulk_secs: u64,
    pub echo: Duration,
    pub rtt: Duration,
    pub connect: Duration,
    pub http_secs: f64,
}

impl Settings {
    fn new(options: &Options) -> Self {
        let mut s = if options.quick {
            Self {
                rounds: 1,
                bulk_secs: 1,
                echo: Duration::from_millis(500),
                rtt: Duration::from_millis(200),
                connect: Duration::from_millis(200),
                http_secs: 0.3,
            }
        } else {
            Self {
                rounds: 3,
                bulk_secs: 2,
                echo: Duration::from_secs(2),
                rtt: Duration::from_secs(1),
                connect: Duration::from_secs(1),
                http_secs: 1.5,
            }
        };
        if let Some(rounds) = options.rounds {
            s.rounds = rounds.max(1);
        }
        s
    }
}

/// Every figure the bench reports, per path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Metric {
    OneWay1,
    OneWay8,
    Echo1,
    Echo8,
    RttP50,
    RttP99,
    ConnRate,
    TtfbP99,
    ProxyCpu1,
    MachineCpu1,
    MachineCpu8,
    Busy1,
    GetRps,
    GetP99,
    PostRps,
    PostP99,
    WsP50,
    WsP99,
    /// A fleet figure at one message size (bytes).
    Fleet(u16, fleet::FleetMetric),
    Storm(fleet::StormMetric),
}

/// Samples of every figure, by topology, path and metric.
pub type Results = BTreeMap<(Kind, Via, Metric), Vec<f64>>;

pub fn run(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    prepare()?;
    let settings = Settings::new(options);
    let mut fleet = options.fleet_settings(settings.rounds);
    if let Some(fleet) = &mut fleet {
        fleet.nofile = fleet::raise_nofile(fleet.conns)?;
    }
    let vias = select_vias(&options.only)?;
    let kinds = match options.topology.as_deref() {
        None => vec![Kind::Loopback, Kind::Netns],
        Some("loopback") => vec![Kind::Loopback],
        Some("netns") => vec![Kind::Netns],
        Some(other) => bail!("--topology {other}: loopback or netns"),
    };
    let out = options.out.clone().unwrap_or_else(|| {
        if options.quick {
            PathBuf::from("target/bench-quick")
        } else {
            PathBuf::from("bench")
        }
    });
    std::fs::create_dir_all(&out)?;
    let scratch = Scratch::create()?;
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut run = Run {
        settings,
        results: Results::new(),
        failures: Vec::new(),
        forwarder_stats: Vec::new(),
        fleet,
    };
    let parts = Parts {
        classic: !options.fleet,
        http: !options.fleet && !options.no_http,
    };
    for &kind in &kinds {
        run.topology(kind, &vias, parts, &scratch.0)
            .with_context(|| format!("topology {}", kind.label()))?;
    }
    let machine = report::machine_description(
        &load_before,
        &std::fs::read_to_string("/proc/loadavg").unwrap_or_default(),
        started.elapsed(),
    );
    // What was tried on the spliced path belongs with the classic figures.
    let tried = std::fs::read_to_string("bench/tried.md")
        .ok()
        .filter(|_| parts.classic);
    let markdown = report::markdown(&run, &machine, tried.as_deref());
    println!("\n{markdown}");
    std::fs::write(out.join("RESULTS.md"), &markdown)?;
    report::chart(&run.results, &out.join("chart.svg"))?;
    eprintln!(
        "bench: wrote {} and {} in {:.0?}",
        out.join("RESULTS.md").display(),
        out.join("chart.svg").display(),
        started.elapsed()
    );
    Ok(())
}

/// Root, the peers installed, and the release binaries the bench runs built.
fn prepare() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the bench creates network namespaces and loads eBPF: run it as root");
    }
    crate::setup::run()?;
    crate::setup::ensure_packages(&[
        "iperf3",
        "haproxy",
        "nginx-light",
        "libnginx-mod-stream",
        "iproute2",
        "ethtool",
    ])?;
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--package",
        "forwarder",
        "--package",
        "forwarder-tests",
        "--bin",
        "forwarder",
        "--bin",
        "bench_http",
        "--bin",
        "fleet",
    ]))
}

/// The classic part's servers: our echo server (threads in this process, for good) and
/// iperf3 (stopped when the returned process drops).
fn classic_servers(topology: &Topology, dir: &Path) -> anyhow::Result<peers::Process> {
    let server = |s: Service| std::net::SocketAddr::new(topology.server_ip(), s.server_port());
    load::start_echo_server(topology, server(Service::Echo))?;
    let mut iperf_cmd = topology.command(Role::Server, "iperf3");
    iperf_cmd.args(["-s", "-B", &topology.server_ip().to_string(), "-p"]);
    iperf_cmd.arg(Service::Iperf.server_port().to_string());
    let iperf_log = dir.join("iperf3.log");
    let mut iperf = peers::Process::spawn("iperf3 server", iperf_cmd, &iperf_log, libc::SIGTERM)?;
    peers::wait_listening(
        topology,
        Role::Server,
        &[Service::Iperf.server_port()],
        &mut iperf,
        &iperf_log,
    )?;
    Ok(iperf)
}

/// Configs, logs and certificates of one run; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn create() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("forwarder-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The agent's last `stats:` line per frontend (it logs one per frontend when it stops).
fn closing_stats(log: &str) -> Vec<String> {
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    for line in log.lines() {
        let plain = strip_ansi(line);
        let Some((_, stats)) = plain.split_once("stats: ") else {
            continue;
        };
        let frontend = stats
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("frontend="))
            .unwrap_or("?")
            .to_owned();
        let counters = stats
            .split_whitespace()
            .filter(|kv| !kv.starts_with("frontend="))
            .collect::<Vec<_>>()
            .join(" ");
        last.insert(frontend.clone(), format!("{frontend}: {counters}"));
    }
    last.into_values().collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequences end with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn select_vias(only: &[String]) -> anyhow::Result<Vec<Via>> {
    if only.is_empty() {
        return Ok(Via::ALL.to_vec());
    }
    let mut vias = Vec::new();
    for name in only {
        let via = Via::ALL
            .into_iter()
            .find(|v| v.short() == name)
            .with_context(|| {
                format!("--only {name}: one of direct, splice, userspace, haproxy, nginx")
            })?;
        vias.push(via);
    }
    Ok(vias)
}

pub struct Run {
    pub settings: Settings,
    pub results: Results,
    /// Measurements that failed (the rest of the run goes on).
    pub failures: Vec<String>,
    /// The spliced forwarder's closing counters per topology (how often it diverted).
    pub forwarder_stats: Vec<(Kind, String)>,
    /// The fleet part's settings, if it runs.
    pub fleet: Option<fleet::Settings>,
}

/// Which parts of the bench run.
#[derive(Clone, Copy, Debug)]
struct Parts {
    /// Bulk, ping-pong and connection setup (the measurements before the fleet part).
    classic: bool,
    /// The HTTPS comparison (with the classic part).
    http: bool,
}

impl Run {
    fn push(&mut self, kind: Kind, via: Via, metric: Metric, value: f64) {
        self.results
            .entry((kind, via, metric))
            .or_default()
            .push(value);
    }

    fn topology(
        &mut self,
        kind: Kind,
        vias: &[Via],
        parts: Parts,
        scratch: &Path,
    ) -> anyhow::Result<()> {
        eprintln!("bench: topology {}", kind.label());
        let dir = scratch.join(match kind {
            Kind::Loopback => "loopback",
            Kind::Netns => "netns",
        });
        std::fs::create_dir_all(&dir)?;
        let topology = Topology::create(kind)?;
        let http_vias: Vec<Via> = http::VIAS
            .into_iter()
            .filter(|v| parts.http && vias.contains(v))
            .collect();
        // One set of certificates for the HTTPS comparison and the fleet's TLS storm.
        let pki = if !http_vias.is_empty() || self.fleet.is_some() {
            Some(http::make_pki(&dir)?)
        } else {
            None
        };
        if parts.classic {
            let http_pki = pki.as_ref().filter(|_| !http_vias.is_empty());
            self.classic(&topology, vias, &http_vias, http_pki, &dir)?;
        }
        if let Some(pki) = &pki {
            fleet::run(self, &topology, vias, pki, &dir)?;
        }
        Ok(())
    }

    /// Bulk, echo, ping-pong, connection setup and HTTPS, on proxies started once.
    fn classic(
        &mut self,
        topology: &Topology,
        vias: &[Via],
        http_vias: &[Via],
        pki: Option<&peers::Pki>,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let kind = topology.kind;
        let _iperf = classic_servers(topology, dir)?;
        let _upstream = match pki {
            Some(pki) => Some(http::start_upstream(topology, pki, dir)?),
            None => None,
        };
        let setup = peers::Setup {
            services: &[Service::Echo, Service::Iperf],
            pki,
            max_conns: 4000,
            tag: "classic",
        };
        let mut proxies = Vec::new();
        for &via in vias {
            if let Some(proxy) = peers::start_proxy(topology, via, dir, &setup)? {
                proxies.push(proxy);
            }
        }
        for round in 0..self.settings.rounds {
            for &via in vias {
                let pids: Vec<u32> = proxies
                    .iter()
                    .filter(|p| p.via == via)
                    .map(|p| p.process.pid())
                    .collect();
                eprintln!(
                    "bench: {} round {} {}",
                    kind.label(),
                    round + 1,
                    via.label()
                );
                self.l4(topology, via, &pids);
            }
            if let Some(pki) = pki {
                for &via in http_vias {
                    self.https(topology, pki, via);
                }
            }
        }
        for proxy in proxies {
            let log = proxy.log.clone();
            let via = proxy.via;
            drop(proxy);
            if via == Via::Splice
                && let Ok(text) = std::fs::read_to_string(&log)
            {
                self.forwarder_stats
                    .extend(closing_stats(&text).into_iter().map(|s| (kind, s)));
            }
        }
        Ok(())
    }

    /// The three HTTPS loads through one path.
    fn https(&mut self, topology: &Topology, pki: &peers::Pki, via: Via) {
        let kind = topology.kind;
        for load in [http::Load::Get, http::Load::Post, http::Load::Ws] {
            match http::run(topology, pki, via, load, self.settings.http_secs) {
                Ok(f) => {
                    let (first, first_value, p99) = match load {
                        http::Load::Get => (Metric::GetRps, f.per_second, Metric::GetP99),
                        http::Load::Post => (Metric::PostRps, f.per_second, Metric::PostP99),
                        http::Load::Ws => (Metric::WsP50, f.p50_us, Metric::WsP99),
                    };
                    self.push(kind, via, first, first_value);
                    self.push(kind, via, p99, f.p99_us);
                }
                Err(err) => self.fail(kind, via, &format!("https {load:?}"), &err),
            }
        }
    }

    fn fail(&mut self, kind: Kind, via: Via, what: &str, err: &anyhow::Error) {
        let text = format!("{} / {} / {what}: {err:#}", kind.label(), via.label());
        eprintln!("bench: FAILED {text}");
        self.failures.push(text);
    }

    /// Every L4 measurement of one path, one after the other.
    fn l4(&mut self, topology: &Topology, via: Via, pids: &[u32]) {
        let kind = topology.kind;
        let s = self.settings;
        let iperf = peers::target(topology, via, Service::Iperf);
        let echo = peers::target(topology, via, Service::Echo);
        for (streams, rate, machine_metric) in [
            (1, Metric::OneWay1, Metric::MachineCpu1),
            (8, Metric::OneWay8, Metric::MachineCpu8),
        ] {
            let result = (|| {
                let (m0, p0) = (cpu::machine()?, cpu::processes(pids));
                let bulk = load::iperf(topology, iperf, streams, s.bulk_secs)?;
                let (m1, p1) = (cpu::machine()?, cpu::processes(pids));
                anyhow::Ok((bulk, m1.since(&m0), p1 - p0))
            })();
            match result {
                Ok((bulk, (machine_s, busy), proxy_s)) => {
                    let gib = bulk.bytes as f64 / f64::from(1u32 << 30);
                    self.push(kind, via, rate, bulk.gbit_per_s());
                    self.push(kind, via, machine_metric, machine_s / gib);
                    if streams == 1 {
                        self.push(kind, via, Metric::Busy1, busy * 100.0);
                        if via != Via::Direct {
                            self.push(kind, via, Metric::ProxyCpu1, proxy_s / gib);
                        }
                    }
                }
                Err(err) => self.fail(kind, via, &format!("iperf3 -P {streams}"), &err),
            }
        }
        for (streams, metric) in [(1, Metric::Echo1), (8, Metric::Echo8)] {
            match load::echo_bulk(topology, echo, streams, s.echo) {
                Ok(bulk) => self.push(kind, via, metric, bulk.gbit_per_s()),
                Err(err) => self.fail(kind, via, &format!("echo x{streams}"), &err),
            }
        }
        match load::ping_pong(topology, echo, s.rtt) {
            Ok(l) => {
                self.push(kind, via, Metric::RttP50, l.p50_us);
                self.push(kind, via, Metric::RttP99, l.p99_us);
            }
            Err(err) => self.fail(kind, via, "ping-pong", &err),
        }
        match load::connect_rate(topology, echo, 4, s.connect) {
            Ok((rate, l)) => {
                self.push(kind, via, Metric::ConnRate, rate);
                self.push(kind, via, Metric::TtfbP99, l.p99_us);
            }
            Err(err) => self.fail(kind, via, "connection setup", &err),
        }
    }
}
