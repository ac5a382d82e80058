//! The fleet part of `cargo xtask bench` (`--fleet` alone): what an IoT gateway's day
//! looks like, rather than bulk transfer. Thousands of connections each sending a small
//! message a few times a second, on every path; CPU per message, round-trip tail and
//! memory per connection; then a reconnect storm of TLS devices.
//!
//! Every measurement gets a freshly started proxy: memory is the proxy's growth from its
//! idle state to holding the fleet, which an allocator that kept the previous run's
//! freed memory would hide. Load comes from `fleet` (tests/src/bin/fleet), run in the
//! client namespace; its echo servers run in the server namespace.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::ChildStdin;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use super::peers::{self, Pki, Process, Proxy, Service, Setup, Via};
use super::topology::{Role, Topology};
use super::{Metric, Run, cpu};

/// What the fleet part was asked for.
#[derive(Clone, Debug)]
pub struct Settings {
    pub conns: usize,
    /// Message sizes in bytes, each measured on its own.
    pub sizes: Vec<u16>,
    /// Messages per second per connection.
    pub rate: f64,
    pub secs: f64,
    pub warmup: f64,
    pub rounds: usize,
    /// RLIMIT_NOFILE the bench's processes inherit (set by `raise_nofile`).
    pub nofile: u64,
}

/// Figures of a fleet measurement (per message size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FleetMetric {
    /// All CPUs (/proc/stat), ms per 1,000 messages.
    MachineCpu,
    /// Share of all CPUs busy over the window, %: near 100 the figures measure queueing.
    Busy,
    /// The proxy's own processes, ms per 1,000 messages.
    ProxyCpu,
    P50,
    P99,
    P999,
    /// Messages echoed per second (what was offered, unless the path fell behind).
    PerSecond,
    /// Failed connects and failed round trips (each of which ends its connection).
    Errors,
    /// Proxy RSS growth per connection, KiB.
    MemProxy,
    /// Kernel TCP memory growth per connection, KiB (both sides of every hop).
    MemKernel,
    /// The two above together.
    MemTotal,
}

/// Figures of a reconnect storm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StormMetric {
    /// Time until every device had the echo of its first message, ms.
    AllMs,
    /// Devices served per second over that time.
    PerSecond,
    Failed,
}

/// The services every fleet proxy is configured for.
const SERVICES: [Service; 2] = [Service::FleetEcho, Service::TlsEcho];

/// The name the TLS echo server's certificate carries (passed through by every proxy).
const HUB_NAME: &str = "hub.test";

/// Allowance on top of a phase's planned length before the generator counts as stuck.
const SLACK: Duration = Duration::from_secs(30);

/// Devices still without an echo after this count as failed in a storm.
const STORM_TIMEOUT_SECS: u64 = 60;

pub fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_dir()?.join("target/release/fleet");
    if !path.exists() {
        bail!("{} is missing: the bench builds it first", path.display());
    }
    Ok(path)
}

/// Raises this process's descriptor limit so every proxy and server the bench starts
/// inherits enough for `conns` devices (the forwarder and the echo servers take what
/// they are given; HAProxy and nginx also set their own from their configuration): the
/// hard limit up to what is needed, which takes CAP_SYS_RESOURCE, else the soft limit to
/// the hard one, with a warning if that is short. Returns the limit now in force.
pub fn raise_nofile(conns: usize) -> anyhow::Result<u64> {
    let need = (conns as u64 * 4 + 4096).max(65_536);
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let hard = peers::nofile_hard_limit()?;
    let max = need.max(hard).min(nr_open);
    if set_nofile(max, max).is_ok() {
        return Ok(max);
    }
    set_nofile(hard, hard).context("setrlimit(RLIMIT_NOFILE) to the hard limit")?;
    // A proxy holds two descriptors per connection.
    if hard < conns as u64 * 2 + 1024 {
        eprintln!(
            "bench: WARNING: RLIMIT_NOFILE hard limit {hard} is short of {} connections per \
             proxy, and cannot be raised here (no CAP_SYS_RESOURCE)",
            conns
        );
    }
    Ok(hard)
}

#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn set_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit only reads the struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Every round: each size on each path, then a storm on each path (interleaved, as the
/// rest of the bench).
pub fn run(
    run: &mut Run,
    topology: &Topology,
    vias: &[Via],
    pki: &Pki,
    dir: &Path,
) -> anyhow::Result<()> {
    let Some(s) = run.fleet.clone() else {
        return Ok(());
    };
    let _servers = start_servers(topology, pki, dir)?;
    let kind = topology.kind;
    for round in 1..=s.rounds {
        for &size in &s.sizes {
            for &via in vias {
                eprintln!(
                    "bench: {} fleet round {round} {size} B {}",
                    kind.label(),
                    via.label()
                );
                if let Err(err) = fleet_once(run, topology, via, size, &s, dir) {
                    run.fail(kind, via, &format!("fleet {size} B"), &err);
                }
            }
        }
        for &via in vias {
            eprintln!(
                "bench: {} storm round {round} {}",
                kind.label(),
                via.label()
            );
            if let Err(err) = storm_once(run, topology, via, pki, &s, dir) {
                run.fail(kind, via, "reconnect storm", &err);
            }
        }
    }
    Ok(())
}

/// The plain and the TLS echo server, in the server namespace, for the whole topology.
fn start_servers(topology: &Topology, pki: &Pki, dir: &Path) -> anyhow::Result<Vec<Process>> {
    let mut servers = Vec::new();
    for service in SERVICES {
        let addr = std::net::SocketAddr::new(topology.server_ip(), service.server_port());
        let mut cmd = topology.command(Role::Server, binary()?);
        cmd.args(["echo-server", "--listen", &addr.to_string()]);
        if service == Service::TlsEcho {
            cmd.arg("--tls")
                .arg(pki.dir.join("hub.pem"))
                .arg(pki.dir.join("hub.key"));
        }
        let log = dir.join(format!("fleet-server-{}.log", addr.port()));
        let mut process = Process::spawn("fleet echo server", cmd, &log, libc::SIGTERM)?;
        peers::wait_listening(topology, Role::Server, &[addr.port()], &mut process, &log)?;
        servers.push(process);
    }
    Ok(servers)
}

/// A fresh proxy for `via` (none for the direct path) and the pids to account it by.
fn start_proxy(
    topology: &Topology,
    via: Via,
    s: &Settings,
    dir: &Path,
) -> anyhow::Result<(Option<Proxy>, Vec<u32>)> {
    let setup = Setup {
        services: &SERVICES,
        pki: None,
        max_conns: s.conns,
        tag: "fleet",
    };
    let proxy = peers::start_proxy(topology, via, dir, &setup)?;
    let pids = proxy.iter().map(|p| p.process.pid()).collect();
    Ok((proxy, pids))
}

/// What xtask sampled around the generator's phases, and what the generator reported.
struct Sampled {
    machine_s: f64,
    busy: f64,
    proxy_s: f64,
    rss_kib: f64,
    tcp_kib: f64,
    report: serde_json::Value,
}

fn fleet_once(
    run: &mut Run,
    topology: &Topology,
    via: Via,
    size: u16,
    s: &Settings,
    dir: &Path,
) -> anyhow::Result<()> {
    let (proxy, pids) = start_proxy(topology, via, s, dir)?;
    let sampled = measure(topology, via, size, s, dir, &pids)?;
    drop(proxy);
    let r = &sampled.report;
    let num = |key: &str| r[key].as_f64().with_context(|| format!("no {key} in {r}"));
    let messages = num("messages")?;
    let connected = num("connected")?;
    if messages < 1.0 || connected < 1.0 {
        bail!("no message was echoed: {r}");
    }
    // A failed round trip ends its connection: `lost` is within `errors`.
    let errors = num("errors")? + num("connect_failed")?;
    let kind = topology.kind;
    let mut push = |m: FleetMetric, v: f64| run.push(kind, via, Metric::Fleet(size, m), v);
    push(FleetMetric::MachineCpu, sampled.machine_s / messages * 1e6);
    push(FleetMetric::Busy, sampled.busy * 100.0);
    push(FleetMetric::P50, num("p50_us")?);
    push(FleetMetric::P99, num("p99_us")?);
    push(FleetMetric::P999, num("p999_us")?);
    push(FleetMetric::PerSecond, messages / num("seconds")?);
    push(FleetMetric::Errors, errors);
    let kernel = sampled.tcp_kib / connected;
    push(FleetMetric::MemKernel, kernel);
    if via == Via::Direct {
        push(FleetMetric::MemTotal, kernel);
    } else {
        let proxy = sampled.rss_kib / connected;
        push(FleetMetric::ProxyCpu, sampled.proxy_s / messages * 1e6);
        push(FleetMetric::MemProxy, proxy);
        push(FleetMetric::MemTotal, proxy + kernel);
    }
    if errors > 0.0 {
        let what = format!("fleet {size} B: {errors} errors (counted, figures kept)");
        run.fail(kind, via, &what, &anyhow::anyhow!("{}", r["first_error"]));
    }
    Ok(())
}

/// Runs the generator and samples CPU over its measured window, and memory with every
/// connection open against the proxy's idle state before they connected.
fn measure(
    topology: &Topology,
    via: Via,
    size: u16,
    s: &Settings,
    dir: &Path,
    pids: &[u32],
) -> anyhow::Result<Sampled> {
    let target = peers::target(topology, via, Service::FleetEcho);
    let mut cmd = topology.command(Role::Client, binary()?);
    cmd.args(["fleet", "--hold", "--target", &target.to_string()])
        .args(["--conns", &s.conns.to_string(), "--size", &size.to_string()])
        .args(["--rate", &s.rate.to_string(), "--secs", &s.secs.to_string()])
        .args(["--warmup", &s.warmup.to_string()]);
    let (rss0, tcp0) = (cpu::rss_kib(pids), cpu::tcp_mem_kib()?);
    let log = dir.join(format!("fleet-load-{}.log", via.short()));
    let mut generator = Generator::spawn(cmd, &log)?;
    // Set-up of a few thousand connections, paced by the generator: generous.
    let connect = SLACK + Duration::from_millis(20 * s.conns as u64);
    generator.expect("connected", connect)?;
    generator.expect("measure-start", Duration::from_secs_f64(s.warmup) + SLACK)?;
    let (m0, p0) = (cpu::machine()?, cpu::processes(pids));
    generator.expect("measure-end", Duration::from_secs_f64(s.secs) + SLACK)?;
    let (m1, p1) = (cpu::machine()?, cpu::processes(pids));
    let (rss1, tcp1) = (cpu::rss_kib(pids), cpu::tcp_mem_kib()?);
    generator.release();
    let line = generator.expect("{", SLACK)?;
    let report = serde_json::from_str(&line).with_context(|| format!("fleet output {line}"))?;
    let (machine_s, busy) = m1.since(&m0);
    Ok(Sampled {
        machine_s,
        busy,
        proxy_s: p1 - p0,
        rss_kib: rss1 as f64 - rss0 as f64,
        tcp_kib: tcp1 as f64 - tcp0 as f64,
        report,
    })
}

/// The running load generator: its output lines as they come, and its stdin, closed to
/// let it end once memory has been sampled.
struct Generator {
    _process: Process,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Generator {
    fn spawn(cmd: std::process::Command, log: &Path) -> anyhow::Result<Self> {
        let (process, stdin, stdout) = Process::spawn_piped("fleet load", cmd, log, libc::SIGTERM)?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            _process: process,
            stdin: Some(stdin),
            lines,
            log: log.to_owned(),
        })
    }

    /// The next line starting with `prefix` (others are skipped), within `timeout`.
    fn expect(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no `{prefix}` within {timeout:?}; {}", self.stderr())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the generator ended before `{prefix}`; {}", self.stderr())
                }
            }
        }
    }

    /// Lets the generator close its connections and print its report.
    fn release(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
    }

    fn stderr(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("its stderr: {}", text.trim())
    }
}

fn storm_once(
    run: &mut Run,
    topology: &Topology,
    via: Via,
    pki: &Pki,
    s: &Settings,
    dir: &Path,
) -> anyhow::Result<()> {
    let (_proxy, _pids) = start_proxy(topology, via, s, dir)?;
    let target = peers::target(topology, via, Service::TlsEcho);
    let out = topology
        .command(Role::Client, binary()?)
        .args(["storm", "--target", &target.to_string()])
        .args(["--conns", &s.conns.to_string(), "--sni", HUB_NAME])
        .args(["--timeout", &STORM_TIMEOUT_SECS.to_string(), "--tls-ca"])
        .arg(pki.ca())
        .output()
        .context("running fleet storm")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!(
            "fleet storm: {}: {}{}",
            out.status,
            text.trim(),
            stderr.trim()
        );
    }
    let r: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("fleet storm output {text}"))?;
    let num = |key: &str| r[key].as_f64().with_context(|| format!("no {key} in {r}"));
    if num("ok")? < 1.0 {
        bail!("no device got its echo: {}", r["first_error"]);
    }
    let kind = topology.kind;
    run.push(
        kind,
        via,
        Metric::Storm(StormMetric::AllMs),
        num("all_first_echo_ms")?,
    );
    run.push(
        kind,
        via,
        Metric::Storm(StormMetric::PerSecond),
        num("per_second")?,
    );
    let failed = num("failed")?;
    run.push(kind, via, Metric::Storm(StormMetric::Failed), failed);
    if failed > 0.0 {
        let what = format!("reconnect storm: {failed} devices failed (figures kept)");
        run.fail(kind, via, &what, &anyhow::anyhow!("{}", r["first_error"]));
    }
    Ok(())
}
