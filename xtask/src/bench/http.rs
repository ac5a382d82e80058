//! The HTTPS comparison: the forwarder's terminating frontend versus HAProxy http mode,
//! both terminating TLS with the same certificate and re-originating verified TLS to a
//! stand-in hub (`bench_http upstream`); load from `bench_http load`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use super::peers::{self, Pki, Process, Service, Via};
use super::topology::{Role, Topology};

/// The HTTPS paths compared.
pub const VIAS: [Via; 3] = [Via::Direct, Via::Splice, Via::Haproxy];

pub fn label(via: Via) -> &'static str {
    match via {
        Via::Direct => "direct to the upstream",
        Via::Splice => "forwarder (rustls + hyper)",
        Via::Haproxy => "HAProxy 2.6 http mode",
        _ => via.label(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Load {
    /// A small GET, many keep-alive connections.
    Get,
    /// 1 MiB POST bodies.
    Post,
    /// 64-byte WebSocket message round trips.
    Ws,
}

impl Load {
    fn arg(self) -> &'static str {
        match self {
            Self::Get => "get",
            Self::Post => "post",
            Self::Ws => "ws",
        }
    }

    fn connections(self) -> usize {
        match self {
            Self::Get => 16,
            Self::Post => 4,
            Self::Ws => 1,
        }
    }
}

pub fn binary() -> anyhow::Result<PathBuf> {
    let path = std::env::current_dir()?.join("target/release/bench_http");
    if !path.exists() {
        bail!("{} is missing: the bench builds it first", path.display());
    }
    Ok(path)
}

pub fn make_pki(dir: &Path) -> anyhow::Result<Pki> {
    let dir = dir.join("pki");
    let status = std::process::Command::new(binary()?)
        .arg("pki")
        .arg(&dir)
        .status()
        .context("running bench_http pki")?;
    if !status.success() {
        bail!("bench_http pki failed");
    }
    Ok(Pki { dir })
}

/// The stand-in hub in the server namespace.
pub fn start_upstream(topology: &Topology, pki: &Pki, dir: &Path) -> anyhow::Result<Process> {
    let addr = SocketAddr::new(topology.server_ip(), Service::Https.server_port());
    let mut cmd = topology.command(Role::Server, binary()?);
    cmd.arg("upstream")
        .arg(addr.to_string())
        .arg(pki.dir.join("hub.pem"))
        .arg(pki.dir.join("hub.key"));
    let log = dir.join("upstream.log");
    let mut process = Process::spawn("https upstream", cmd, &log, libc::SIGTERM)?;
    peers::wait_listening(topology, Role::Server, &[addr.port()], &mut process, &log)?;
    Ok(process)
}

#[derive(Clone, Copy, Debug)]
pub struct Figures {
    pub per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

pub fn run(
    topology: &Topology,
    pki: &Pki,
    via: Via,
    load: Load,
    seconds: f64,
) -> anyhow::Result<Figures> {
    let addr = peers::target(topology, via, Service::Https);
    let name = if via == Via::Direct {
        "hub.test"
    } else {
        "proxy.test"
    };
    let out = topology
        .command(Role::Client, binary()?)
        .args(["load", load.arg(), &addr.to_string(), name])
        .arg(pki.ca())
        .args([load.connections().to_string(), seconds.to_string()])
        .output()
        .context("running bench_http load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "bench_http load {} via {}: {}{}",
            load.arg(),
            via.short(),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let field = |key: &str| -> anyhow::Result<f64> {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
            .with_context(|| format!("no {key} in {text:?}"))
    };
    if field("errors")? > 0.0 {
        bail!("bench_http load {} via {}: {text}", load.arg(), via.short());
    }
    Ok(Figures {
        per_second: field("count")? / field("seconds")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}
