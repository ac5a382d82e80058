//! `cargo xtask soak --minutes N` (root; not part of `test` or CI): mixed traffic through
//! a real agent process for N minutes, sampled every few seconds, then a verdict on
//! whether anything grows.
//!
//! The environment and the load come from the `soak` binary (tests/src/bin/soak): spliced
//! MQTT (mosquitto_pub churning, QoS 1, and one long-lived mosquitto_sub), long-lived
//! spliced "AMQP" sessions to a TLS echo server (the 5671 path is L4 bytes whatever the
//! protocol), REST posts and WebSocket sessions through 443, and waves of hostile clients
//! (silent and partial ClientHellos, a per-source flood, silent HTTP/2, idle WebSockets),
//! each wave closed by the agent's own timeouts and caps.
//!
//! Sampled here: the agent's RSS and fds (/proc), the entries of each map it pins
//! (`forwarder maps --json`), the kernel's TCP memory (/proc/net/sockstat) and its
//! `/metrics`. A series is flat when the mean of the run's last third is within
//! `REL_TOLERANCE` (plus a small absolute slack) of the middle third's; the first third is
//! warm-up. After the load every per-connection map must be back to its baseline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct Options {
    /// How long the mixed load runs, in minutes (fractions allowed).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// The same in seconds, for a quick run (overrides --minutes).
    #[arg(long)]
    seconds: Option<f64>,
    /// Seconds between samples.
    #[arg(long, default_value_t = 5.0)]
    interval: f64,
    /// Seconds between waves of hostile clients.
    #[arg(long, default_value_t = 30)]
    wave_secs: u64,
}

/// A series grows when its last third's mean exceeds the middle third's by more than this
/// share, plus the series' absolute slack (`Series::slack`).
const REL_TOLERANCE: f64 = 0.10;

/// Descriptors the agent may hold after the load beyond its baseline (admin, logs).
const FD_SLACK: u64 = 16;

/// Maps whose entries are per connection and must return to their baseline.
/// `FWD_STATS` is keyed by (frontend, counter name): it gains an entry the first time a
/// counter is bumped and keeps it, so it is checked for flatness only.
const PER_CONNECTION_MAPS: [&str; 4] = ["FWD_SOCKS", "FWD_LINKS", "FWD_COUNTERS", "FWD_CONNS"];

#[derive(Clone, Debug, Default)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: u64,
    /// /proc/net/sockstat `TCP: ... mem` (pages, the whole machine).
    tcp_mem_pages: u64,
    tcp_inuse: u64,
    maps: BTreeMap<String, u64>,
    /// Sum of `forwarder_active` over the frontends.
    active: u64,
    /// Every `forwarder_*` series on /metrics, summed over its labels.
    metrics: BTreeMap<String, u64>,
    /// The load's counters at the time (from its last `LOAD` line).
    load: serde_json::Value,
}

enum Line {
    Ready(serde_json::Value),
    Load(serde_json::Value),
    Done(serde_json::Value),
    Stopped(serde_json::Value),
    Eof,
}

pub fn run(options: &Options) -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the soak loads eBPF programs: run it as root");
    }
    let secs = options.seconds.unwrap_or(options.minutes * 60.0);
    if secs.is_nan() || secs <= 0.0 {
        bail!("the soak needs a positive duration");
    }
    crate::setup::run()?;
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
        "soak",
    ]))?;
    let root = std::env::current_dir()?;
    let forwarder = root.join("target/release/forwarder");
    let out_dir = root.join("target/soak");
    std::fs::create_dir_all(&out_dir)?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let scratch = std::env::temp_dir().join(format!("fwd-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);

    let mut child = Command::new(root.join("target/release/soak"))
        .arg("--forwarder")
        .arg(&forwarder)
        .args(["--secs", &secs.to_string()])
        .args(["--wave-secs", &options.wave_secs.to_string()])
        .arg("--dir")
        .arg(&scratch)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting target/release/soak")?;
    let mut stdin = child.stdin.take().context("soak stdin")?;
    let lines = read_lines(child.stdout.take().context("soak stdout")?);
    let result = drive(
        &lines, &mut stdin, &forwarder, options, secs, &out_dir, stamp,
    );
    // Stop the agent and the peers whatever happened.
    let _ = writeln!(stdin, "stop");
    drop(stdin);
    let stopped = loop {
        match lines.recv_timeout(Duration::from_secs(30)) {
            Ok(Line::Stopped(v)) => break v["clean"].as_bool(),
            Ok(Line::Eof) | Err(_) => break None,
            Ok(_) => {}
        }
    };
    // It drops mosquitto and the rest after STOPPED: let it, before any kill (a killed
    // soak would leave mosquitto, in its own process group, behind).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let verdicts = result?;
    let mut failed = verdicts;
    if stopped != Some(true) {
        eprintln!("soak: the agent did not stop cleanly on SIGTERM");
        failed = true;
    }
    if failed {
        bail!("soak failed (see the verdicts above)");
    }
    eprintln!("soak: every series flat, maps back to baseline, legitimate traffic served");
    Ok(())
}

fn read_lines(stdout: std::process::ChildStdout) -> Receiver<Line> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let (tag, rest) = line.split_once(' ').unwrap_or((&line, ""));
            let json = || serde_json::from_str(rest).unwrap_or(serde_json::Value::Null);
            let parsed = match tag {
                "READY" => Line::Ready(json()),
                "LOAD" => Line::Load(json()),
                "DONE" => Line::Done(json()),
                "STOPPED" => Line::Stopped(json()),
                _ => {
                    eprintln!("soak: {line}");
                    continue;
                }
            };
            if tx.send(parsed).is_err() {
                return;
            }
        }
        let _ = tx.send(Line::Eof);
    });
    rx
}

/// Baseline, the sampled run, the after-check and the report; true if a check failed.
fn drive(
    lines: &Receiver<Line>,
    stdin: &mut std::process::ChildStdin,
    forwarder: &Path,
    options: &Options,
    secs: f64,
    out_dir: &Path,
    stamp: u64,
) -> anyhow::Result<bool> {
    let ready = match lines.recv_timeout(Duration::from_secs(120)) {
        Ok(Line::Ready(v)) => v,
        _ => bail!("the soak environment did not come up (see its output above)"),
    };
    let pid = ready["pid"].as_u64().context("READY without pid")? as u32;
    let admin = ready["admin"].as_u64().context("READY without admin")? as u16;
    let instance = ready["instance"]
        .as_str()
        .context("READY without instance")?
        .to_owned();
    let agent = Agent {
        pid,
        admin,
        instance,
        forwarder: forwarder.to_owned(),
    };
    let started = Instant::now();
    let baseline = agent.sample(0.0, serde_json::Value::Null)?;
    eprintln!(
        "soak: agent pid {pid}, baseline RSS {} KiB, {} fds, maps {:?}; load for {secs:.0} s",
        baseline.rss_kib, baseline.fds, baseline.maps
    );
    writeln!(stdin, "start")?;
    stdin.flush()?;

    let mut samples = Vec::new();
    let mut load = serde_json::Value::Null;
    let period = Duration::from_secs_f64(options.interval.max(0.5));
    let mut next = Instant::now() + period;
    let summary = loop {
        match lines.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Ok(Line::Load(v)) => load = v,
            Ok(Line::Done(v)) => break v,
            Ok(Line::Eof) => bail!("the soak load generator exited early"),
            Ok(_) => {}
            Err(RecvTimeoutError::Timeout) => {
                let sample = agent.sample(started.elapsed().as_secs_f64(), load.clone())?;
                eprintln!("soak: {}", row(&sample).join(" | "));
                samples.push(sample);
                next += period;
            }
            Err(RecvTimeoutError::Disconnected) => bail!("lost the load generator"),
        }
        if started.elapsed().as_secs_f64() > secs + 180.0 {
            bail!("the load generator did not finish within 3 minutes of its end");
        }
    };

    // After the load: every connection is closed; the agent's per-connection state must
    // go back to where it started (given a few seconds for the last sessions to finish).
    let settle = Instant::now() + Duration::from_secs(20);
    let after = loop {
        let sample = agent.sample(started.elapsed().as_secs_f64(), summary.clone())?;
        let back = PER_CONNECTION_MAPS
            .iter()
            .all(|m| sample.maps.get(*m) <= baseline.maps.get(*m))
            && sample.active <= baseline.active;
        if back || Instant::now() > settle {
            break sample;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (report, failed) = report(
        &baseline,
        &samples,
        &after,
        &summary,
        secs,
        options.interval,
        options.wave_secs,
    );
    println!("{report}");
    let md = out_dir.join(format!("soak-{stamp}.md"));
    let csv = out_dir.join(format!("soak-{stamp}.csv"));
    std::fs::write(&md, &report)?;
    std::fs::write(&csv, csv_text(&baseline, &samples, &after))?;
    eprintln!("soak: wrote {} and {}", md.display(), csv.display());
    Ok(failed)
}

struct Agent {
    pid: u32,
    admin: u16,
    instance: String,
    forwarder: PathBuf,
}

impl Agent {
    fn sample(&self, secs: f64, load: serde_json::Value) -> anyhow::Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("the agent is gone")?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))?.count() as u64;
        let sockstat = std::fs::read_to_string("/proc/net/sockstat")?;
        let tcp = sockstat
            .lines()
            .find_map(|l| l.strip_prefix("TCP:"))
            .unwrap_or("");
        let field = |name: &str| {
            let words: Vec<&str> = tcp.split_whitespace().collect();
            words
                .windows(2)
                .find(|w| w[0] == name)
                .and_then(|w| w[1].parse().ok())
                .unwrap_or(0)
        };
        let output = Command::new(&self.forwarder)
            .args(["maps", "--json", "--instance", &self.instance])
            .output()
            .context("forwarder maps")?;
        if !output.status.success() {
            bail!(
                "forwarder maps: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let maps: serde_json::Value = serde_json::from_slice(&output.stdout)?;
        let maps = maps
            .as_object()
            .context("maps JSON is an object")?
            .iter()
            .map(|(name, entries)| {
                (
                    name.clone(),
                    entries.as_array().map_or(0, |a| a.len() as u64),
                )
            })
            .collect();
        let mut metrics = BTreeMap::new();
        for line in scrape(self.admin).unwrap_or_default().lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let name = series.split('{').next().unwrap_or(series);
            if let (true, Ok(value)) = (name.starts_with("forwarder_"), value.parse::<u64>()) {
                *metrics.entry(name.to_owned()).or_insert(0) += value;
            }
        }
        let active = metrics.get("forwarder_active").copied().unwrap_or(0);
        Ok(Sample {
            secs,
            rss_kib,
            fds,
            tcp_mem_pages: field("mem"),
            tcp_inuse: field("inuse"),
            maps,
            active,
            metrics,
            load,
        })
    }
}

fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text)
}

/// The series judged for flatness: name, value, absolute slack. The kernel's figures are
/// the whole machine's, shared with whatever else runs: their windows are compared by
/// median (one burst elsewhere is not a leak here), the agent's own by mean.
fn series(sample: &Sample) -> Vec<(String, f64, f64)> {
    let mut out = vec![
        ("agent RSS (KiB)".to_owned(), sample.rss_kib as f64, 2048.0),
        ("agent fds".to_owned(), sample.fds as f64, 32.0),
        (
            "kernel TCP memory (pages)".to_owned(),
            sample.tcp_mem_pages as f64,
            64.0,
        ),
        (
            "kernel TCP sockets in use".to_owned(),
            sample.tcp_inuse as f64,
            64.0,
        ),
        ("active connections".to_owned(), sample.active as f64, 32.0),
    ];
    for (name, count) in &sample.maps {
        out.push((format!("map {name} entries"), *count as f64, 32.0));
    }
    out
}

fn load_u64(load: &serde_json::Value, key: &str) -> u64 {
    load[key].as_u64().unwrap_or(0)
}

fn header(maps: &[String]) -> Vec<String> {
    let mut h: Vec<String> = [
        "t (s)",
        "RSS (MiB)",
        "fds",
        "TCP mem (pages)",
        "TCP inuse",
        "active",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    h.extend(maps.iter().cloned());
    h.extend(
        [
            "MQTT pub",
            "AMQP msgs",
            "REST ok",
            "WS sessions",
            "legit failed",
            "hostile closed",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    h
}

fn row(s: &Sample) -> Vec<String> {
    let mut r = vec![
        format!("{:.0}", s.secs),
        format!("{:.1}", s.rss_kib as f64 / 1024.0),
        s.fds.to_string(),
        s.tcp_mem_pages.to_string(),
        s.tcp_inuse.to_string(),
        s.active.to_string(),
    ];
    r.extend(s.maps.values().map(u64::to_string));
    let l = &s.load;
    r.extend([
        load_u64(l, "mqtt_published").to_string(),
        load_u64(l, "amqp_messages").to_string(),
        load_u64(l, "rest_ok").to_string(),
        load_u64(l, "ws_sessions").to_string(),
        legit_failures(l).to_string(),
        load_u64(l, "hostile_closed").to_string(),
    ]);
    r
}

fn legit_failures(load: &serde_json::Value) -> u64 {
    [
        "mqtt_publish_failed",
        "amqp_failed",
        "rest_failed",
        "ws_failed",
    ]
    .iter()
    .map(|k| load_u64(load, k))
    .sum()
}

/// The middle and the last window: after a third of the run, each as many whole wave
/// periods as fit in a third (plain thirds when a third is shorter than a wave).
fn windows(samples: &[Sample], secs: f64, wave_secs: u64) -> (Vec<Sample>, Vec<Sample>) {
    let third = secs / 3.0;
    let wave = wave_secs.max(1) as f64;
    let span = if third >= wave {
        (third / wave).floor() * wave
    } else {
        third
    };
    let pick = |from: f64| -> Vec<Sample> {
        samples
            .iter()
            .filter(|s| s.secs > from && s.secs <= from + span)
            .cloned()
            .collect()
    };
    (pick(third), pick(secs - span))
}

/// Least-squares slope of (seconds, value) points, per second (0 for fewer than 2).
/// Shown beside the verdict: a drift too slow for the windows' tolerance shows here.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx == 0.0 { 0.0 } else { sxy / sxx }
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The Markdown report and whether any check failed.
fn report(
    baseline: &Sample,
    samples: &[Sample],
    after: &Sample,
    summary: &serde_json::Value,
    secs: f64,
    interval: f64,
    wave_secs: u64,
) -> (String, bool) {
    let mut failed = false;
    let mut out = String::new();
    let maps: Vec<String> = baseline.maps.keys().cloned().collect();
    let _ = writeln!(
        out,
        "# Soak: {secs:.0} s of mixed traffic, sampled every {interval} s\n"
    );
    let head = header(&maps);
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---:|".repeat(head.len()));
    let _ = writeln!(out, "| baseline | {} |", row(baseline)[1..].join(" | "));
    for s in samples {
        let _ = writeln!(out, "| {} |", row(s).join(" | "));
    }
    let _ = writeln!(out, "| after | {} |", row(after)[1..].join(" | "));

    let (middle, last) = windows(samples, secs, wave_secs);
    let _ = writeln!(
        out,
        "\n## Flat?\n\nThe first third of the run is warm-up. The middle and the last third are \
         each cut to a whole number of hostile waves ({wave_secs} s apart; both windows {:.0} s), \
         so both hold the same share of wave peaks. A series grows when the last window's mean \
         (median for the kernel's machine-wide figures, which other processes share) exceeds the \
         middle window's by more than {:.0} % plus its slack.\n",
        last.last().map_or(0.0, |l| l.secs) - last.first().map_or(0.0, |f| f.secs) + interval,
        REL_TOLERANCE * 100.0
    );
    let _ = writeln!(
        out,
        "| series | middle window | last window | slack | verdict | trend after warm-up, per hour |\n|---|---:|---:|---:|---|---:|"
    );
    if middle.len() < 2 || last.len() < 2 {
        let _ = writeln!(
            out,
            "| (too few samples: {}; run longer) | | | | not judged |",
            samples.len()
        );
    } else {
        for (i, (name, _, slack)) in series(baseline).into_iter().enumerate() {
            let values = |part: &[Sample]| -> Vec<f64> {
                part.iter()
                    .filter_map(|s| series(s).get(i).map(|v| v.1))
                    .collect()
            };
            let by = if name.starts_with("kernel") {
                median
            } else {
                mean
            };
            let (m, l) = (by(&values(&middle)), by(&values(&last)));
            let grows = l > m * (1.0 + REL_TOLERANCE) + slack;
            failed |= grows;
            let judged: Vec<(f64, f64)> = samples
                .iter()
                .filter(|s| s.secs > secs / 3.0 && s.secs <= secs)
                .filter_map(|s| series(s).get(i).map(|v| (s.secs, v.1)))
                .collect();
            let _ = writeln!(
                out,
                "| {name} | {m:.1} | {l:.1} | {slack} | {} | {:+.1} |",
                if grows { "GROWS" } else { "flat" },
                slope(&judged) * 3600.0
            );
        }
    }

    let _ = writeln!(out, "\n## After the load\n");
    for name in PER_CONNECTION_MAPS {
        let (b, a) = (
            baseline.maps.get(name).copied().unwrap_or(0),
            after.maps.get(name).copied().unwrap_or(0),
        );
        let ok = a <= b;
        failed |= !ok;
        let _ = writeln!(
            out,
            "- map {name}: {b} entries before, {a} after: {}",
            if ok { "back to baseline" } else { "LEAKED" }
        );
    }
    let _ = writeln!(
        out,
        "- map FWD_STATS (one entry per frontend and counter kind, kept): {} before, {} after",
        baseline.maps.get("FWD_STATS").copied().unwrap_or(0),
        after.maps.get("FWD_STATS").copied().unwrap_or(0)
    );
    let active_ok = after.active <= baseline.active && after.fds <= baseline.fds + FD_SLACK;
    failed |= !active_ok;
    let _ = writeln!(
        out,
        "- active connections: {} before, {} after; fds {} before, {} after; RSS {:.1} MiB before, {:.1} MiB after",
        baseline.active,
        after.active,
        baseline.fds,
        after.fds,
        baseline.rss_kib as f64 / 1024.0,
        after.rss_kib as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "- {}: active connections back to baseline, fds within {FD_SLACK} of it",
        if active_ok { "ok" } else { "FAILED" }
    );
    let counters: Vec<String> = after
        .metrics
        .iter()
        .filter(|(name, value)| name.ends_with("_total") && **value > 0)
        .map(|(name, value)| format!("`{}` {value}", name.trim_start_matches("forwarder_")))
        .collect();
    let _ = writeln!(
        out,
        "- the agent's counters at the end (/metrics, summed over frontends and backends): {}",
        counters.join(", ")
    );

    let _ = writeln!(out, "\n## Traffic\n");
    let legit_failed = legit_failures(summary);
    let published = load_u64(summary, "mqtt_published");
    let received = load_u64(summary, "mqtt_received");
    let stuck = load_u64(summary, "hostile_stuck");
    let _ = writeln!(
        out,
        "- MQTT: {published} QoS 1 messages published by churning mosquitto_pub clients, {received} received by the long-lived subscriber",
    );
    let _ = writeln!(
        out,
        "- AMQP stand-in (TLS echo, spliced): {} sessions, {} echoed messages",
        load_u64(summary, "amqp_sessions"),
        load_u64(summary, "amqp_messages")
    );
    let _ = writeln!(
        out,
        "- HTTPS: {} REST posts answered 204; WebSocket: {} sessions, {} echoed messages",
        load_u64(summary, "rest_ok"),
        load_u64(summary, "ws_sessions"),
        load_u64(summary, "ws_messages")
    );
    let _ = writeln!(
        out,
        "- hostile: {} waves, {} connections opened, {} closed by the agent, {stuck} still open after 60 s",
        load_u64(summary, "hostile_waves"),
        load_u64(summary, "hostile_opened"),
        load_u64(summary, "hostile_closed"),
    );
    let _ = writeln!(out, "- legitimate failures: {legit_failed} ({summary})");
    let traffic_ok = legit_failed == 0 && received >= published && published > 0 && stuck == 0;
    failed |= !traffic_ok;
    let _ = writeln!(
        out,
        "\n**Verdict: {}**",
        if failed { "FAIL" } else { "PASS" }
    );
    (out, failed)
}

/// The table's columns, then every `/metrics` series (summed over its labels) over time.
fn csv_text(baseline: &Sample, samples: &[Sample], after: &Sample) -> String {
    let maps: Vec<String> = baseline.maps.keys().cloned().collect();
    let metrics: Vec<&String> = after.metrics.keys().collect();
    let mut out = String::new();
    let mut head = vec!["phase".to_owned()];
    head.extend(header(&maps));
    head.extend(metrics.iter().map(|m| m.to_string()));
    let _ = writeln!(out, "{}", head.join(","));
    let all = std::iter::once(("baseline", baseline))
        .chain(samples.iter().map(|s| ("load", s)))
        .chain(std::iter::once(("after", after)));
    for (phase, s) in all {
        let mut cells = row(s);
        cells[0] = format!("{:.1}", s.secs);
        cells.extend(
            metrics
                .iter()
                .map(|m| s.metrics.get(*m).copied().unwrap_or(0).to_string()),
        );
        let _ = writeln!(out, "{phase},{}", cells.join(","));
    }
    out
}
