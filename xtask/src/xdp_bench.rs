//! `cargo xtask xdp-bench`: packets per second dropped by the XDP guard (generic mode on
//! a veth) versus the same rule in nftables, with one core generating and filtering.
//!
//! Two namespaces joined by a veth pair; a raw AF_PACKET sender pinned to CPU 0 in the
//! peer namespace blasts TCP SYNs from a denied source at the forwarder's port. On a veth
//! the receiving side (generic XDP, or the nftables hooks) runs in the sender's softirq on
//! the same CPU, so each figure is what one core can generate and drop.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::bench::topology::ip;

const FWD_NS: &str = "fxbench-f";
const PEER_NS: &str = "fxbench-p";
const FWD_IF: &str = "xbf";
const PEER_IF: &str = "xbp";
const FWD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x21, 0x01];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x21, 0x02];
const SOURCE: [u8; 4] = [10, 201, 0, 2];
const DEST: [u8; 4] = [10, 201, 0, 1];
const PORT: u16 = 18883;
const INSTANCE: &str = "xdpbench";
const ROUNDS: usize = 3;
const SECONDS: u64 = 3;

/// Deletes the bench namespaces (and with them the veth pair) on drop.
struct Namespaces;

impl Namespaces {
    fn create() -> anyhow::Result<Self> {
        Self::remove();
        let this = Self;
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        ip(&["netns", "add", FWD_NS])?;
        ip(&["netns", "add", PEER_NS])?;
        #[rustfmt::skip]
        ip(&["link", "add", "name", FWD_IF, "address", &mac(FWD_MAC), "netns", FWD_NS, "type", "veth",
             "peer", "name", PEER_IF, "address", &mac(PEER_MAC), "netns", PEER_NS])?;
        for (ns, dev, addr) in [
            (FWD_NS, FWD_IF, "10.201.0.1/24"),
            (PEER_NS, PEER_IF, "10.201.0.2/24"),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(this)
    }

    fn remove() {
        for ns in [FWD_NS, PEER_NS] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        Self::remove();
    }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the bench creates namespaces and loads XDP: run it as root");
    }
    crate::setup::run()?;
    crate::setup::ensure_packages(&["nftables"])?;
    crate::build(true)?;
    let _namespaces = Namespaces::create()?;
    let filters: [(&str, &str, Filter); 5] = [
        ("none", "SYNs reach TCP (closed port: RST)", Filter::None),
        ("XDP guard", "generic (skb) XDP", Filter::Xdp("generic")),
        ("nftables", "netdev ingress", Filter::Nft(NFT_INGRESS)),
        (
            "nftables",
            "inet prerouting, priority raw",
            Filter::Nft(NFT_PREROUTING),
        ),
        (
            "XDP guard",
            "native XDP (veth driver), for reference",
            Filter::Xdp("native"),
        ),
    ];
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); filters.len()];
    for round in 0..ROUNDS {
        for (i, (name, hook, nft)) in filters.iter().enumerate() {
            let sample = match nft {
                Filter::Xdp(mode) => measure_xdp(mode)?,
                Filter::Nft(ruleset) => measure_nft(ruleset)?,
                Filter::None => {
                    let (sent, elapsed) = blast()?;
                    let sent_pps = sent as f64 / elapsed;
                    Sample {
                        sent_pps,
                        dropped_pps: 0.0,
                    }
                }
            };
            eprintln!(
                "xdp-bench: round {} {name} ({hook}): sent {:.0} pps, dropped {:.0} pps",
                round + 1,
                sample.sent_pps,
                sample.dropped_pps
            );
            results[i].push(sample);
        }
    }
    println!();
    println!(
        "Drops of TCP SYNs from a denied source, veth between two namespaces, sender pinned to CPU 0 \
         (AF_PACKET, batches of 64 via sendmmsg), {ROUNDS} rounds of {SECONDS} s, median (min-max); kernel {}:",
        output(Command::new("uname").arg("-r"))?.trim()
    );
    println!();
    println!("| filter | where | dropped pps | sent pps |");
    println!("|---|---|---|---|");
    for ((name, hook, _), samples) in filters.iter().zip(&results) {
        let dropped: Vec<f64> = samples.iter().map(|s| s.dropped_pps).collect();
        let sent: Vec<f64> = samples.iter().map(|s| s.sent_pps).collect();
        println!(
            "| {name} | {hook} | {} | {} |",
            summary(&dropped),
            summary(&sent)
        );
    }
    Ok(())
}

enum Filter {
    /// No filter: the baseline the filters save work against.
    None,
    /// The agent's guard in this `[xdp] mode`.
    Xdp(&'static str),
    /// An nftables ruleset with the same match.
    Nft(&'static str),
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    sent_pps: f64,
    dropped_pps: f64,
}

fn summary(values: &[f64]) -> String {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let k = |x: f64| format!("{:.0}k", x / 1000.0);
    match (v.first(), v.get(v.len() / 2), v.last()) {
        (Some(&lo), Some(&mid), Some(&hi)) => format!("{} ({}-{})", k(mid), k(lo), k(hi)),
        _ => "-".into(),
    }
}

/// Runs the agent with the guard in `mode`, denying the sender, and counts its drops.
fn measure_xdp(mode: &str) -> anyhow::Result<Sample> {
    let config = std::env::temp_dir().join("forwarder-xdp-bench.toml");
    std::fs::write(
        &config,
        format!(
            r#"instance = "{INSTANCE}"
[[frontend]]
name = "bench"
bind = "0.0.0.0:{PORT}"
backend = "none"
[[backend]]
name = "none"
servers = [{{ address = "127.0.0.1:9" }}]
[xdp]
interfaces = ["{FWD_IF}"]
mode = "{mode}"
deny = ["10.201.0.2/32"]
"#
        ),
    )?;
    let forwarder = Path::new("target/release/forwarder");
    // nsenter switches only the network namespace: the pins stay visible to the CLI.
    let agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{FWD_NS}"))
        .arg(forwarder)
        .args(["run", "--no-ebpf", "--drain-secs", "1", "-c"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the agent")?;
    let agent = AgentGuard(agent);
    let dropped = || -> anyhow::Result<u64> {
        let json = output(
            Command::new(forwarder)
                .args(["xdp", "stats", "--json", "--instance", INSTANCE])
                .env("RUST_BACKTRACE", "0"),
        )?;
        json_number(&json, "\"dropped_deny\":")
    };
    let started = Instant::now();
    let before = loop {
        match dropped() {
            Ok(n) => break n,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(err) => return Err(err.context("the agent did not attach the XDP guard")),
        }
    };
    let (sent, elapsed) = blast()?;
    let after = dropped()?;
    drop(agent);
    Ok(Sample {
        sent_pps: sent as f64 / elapsed,
        dropped_pps: after.saturating_sub(before) as f64 / elapsed,
    })
}

/// Stops the agent (SIGINT, as an operator would) and waits for it.
struct AgentGuard(Child);

impl Drop for AgentGuard {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

const NFT_INGRESS: &str = r#"table netdev fxbench {
  chain guard {
    type filter hook ingress device "xbf" priority -500;
    ip saddr 10.201.0.2 tcp dport 18883 counter drop
  }
}"#;

const NFT_PREROUTING: &str = r#"table inet fxbench {
  chain guard {
    type filter hook prerouting priority raw;
    ip saddr 10.201.0.2 tcp dport 18883 counter drop
  }
}"#;

fn measure_nft(ruleset: &str) -> anyhow::Result<Sample> {
    let family = ruleset.split_whitespace().nth(1).unwrap_or("inet");
    let nft = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", FWD_NS, "nft"]).args(args);
        cmd
    };
    let path = std::env::temp_dir().join("forwarder-xdp-bench.nft");
    std::fs::write(&path, ruleset)?;
    output(nft(&["-f"]).arg(&path))?;
    let result = (|| {
        let (sent, elapsed) = blast()?;
        let listing = output(&mut nft(&["list", "table", family, "fxbench"]))?;
        let dropped = listing
            .split("counter packets ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .context("no counter in the nft listing")?;
        Ok(Sample {
            sent_pps: sent as f64 / elapsed,
            dropped_pps: dropped as f64 / elapsed,
        })
    })();
    let _ = output(&mut nft(&["delete", "table", family, "fxbench"]));
    result
}

fn json_number(json: &str, key: &str) -> anyhow::Result<u64> {
    json.split(key)
        .nth(1)
        .map(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {key} in {json}"))
}

/// Sends SYN frames at full speed for `SECONDS` from one thread pinned to CPU 0 in the
/// peer namespace; returns (frames sent, seconds).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn blast() -> anyhow::Result<(u64, f64)> {
    std::thread::spawn(|| -> anyhow::Result<(u64, f64)> {
        let ns = std::fs::File::open(format!("/run/netns/{PEER_NS}"))?;
        // SAFETY: setns on a valid namespace fd; it changes only this thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error()).context("setns");
        }
        // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it.
        let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::CPU_SET(0, &mut cpus) };
        // SAFETY: cpus is a valid cpu_set_t of the given size.
        if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &cpus) } != 0 {
            return Err(io::Error::last_os_error()).context("pinning the sender to CPU 0");
        }
        send_for(Duration::from_secs(SECONDS))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sender thread panicked"))?
}

#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn send_for(duration: Duration) -> anyhow::Result<(u64, f64)> {
    // SAFETY: plain socket creation; ownership passes to OwnedFd at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("AF_PACKET socket");
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid option value pointer and length. Skips the qdisc layer, as pktgen does.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    let name = std::ffi::CString::new(PEER_IF)?;
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {PEER_IF}");
    }
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&FWD_MAC);

    const BATCH: usize = 64;
    let frames: Vec<Vec<u8>> = (0..BATCH).map(|i| syn_frame(20_000 + i as u16)).collect();
    let mut iovecs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut libc::c_void,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; every pointer set below outlives the sends.
    let mut messages: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() })
        .collect();
    for (m, iov) in messages.iter_mut().zip(iovecs.iter_mut()) {
        m.msg_hdr.msg_name = (&raw mut addr).cast();
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let started = Instant::now();
    let mut sent: u64 = 0;
    while started.elapsed() < duration {
        // SAFETY: messages holds BATCH valid headers pointing at live frames.
        let n =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), messages.as_mut_ptr(), BATCH as u32, 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENOBUFS) {
                continue;
            }
            return Err(err).context("sendmmsg");
        }
        sent += n as u64;
    }
    Ok((sent, started.elapsed().as_secs_f64()))
}

/// Ethernet + IPv4 + TCP SYN from the denied source, with valid checksums.
fn syn_frame(sport: u16) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&PORT.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xfa, 0xf0, 0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&SOURCE);
    pseudo.extend_from_slice(&DEST);
    pseudo.extend_from_slice(&[0, 6, 0, 20]);
    let sum = checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&SOURCE);
    ip.extend_from_slice(&DEST);
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = Vec::with_capacity(54);
    frame.extend_from_slice(&FWD_MAC);
    frame.extend_from_slice(&PEER_MAC);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp);
    frame
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for chunk in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
