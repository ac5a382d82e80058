//! Where the bench's peers live: all on the host's loopback, or client, proxy and server
//! in three network namespaces joined by two veth pairs (traffic crosses real interfaces,
//! closer to packets arriving from another host; GRO on, as on a physical NIC). The
//! namespaces go away on drop.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Loopback,
    Netns,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Netns => "3 namespaces + veth",
        }
    }
}

/// The three parties of every measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Proxy,
    Server,
}

const CLIENT_NS: &str = "fbench-c";
const PROXY_NS: &str = "fbench-p";
const SERVER_NS: &str = "fbench-s";

pub struct Topology {
    pub kind: Kind,
}

impl Topology {
    pub fn create(kind: Kind) -> anyhow::Result<Self> {
        remove_namespaces();
        let this = Self { kind };
        if kind == Kind::Netns {
            create_namespaces().context("creating the bench namespaces")?;
        }
        Ok(this)
    }

    fn ns(&self, role: Role) -> Option<&'static str> {
        match (self.kind, role) {
            (Kind::Loopback, _) => None,
            (Kind::Netns, Role::Client) => Some(CLIENT_NS),
            (Kind::Netns, Role::Proxy) => Some(PROXY_NS),
            (Kind::Netns, Role::Server) => Some(SERVER_NS),
        }
    }

    /// The servers' address, as the proxies and the direct path reach it.
    pub fn server_ip(&self) -> IpAddr {
        match self.kind {
            Kind::Loopback => Ipv4Addr::LOCALHOST.into(),
            Kind::Netns => Ipv4Addr::new(10, 211, 2, 2).into(),
        }
    }

    /// The proxies' listening address, as clients reach it.
    pub fn proxy_ip(&self) -> IpAddr {
        match self.kind {
            Kind::Loopback => Ipv4Addr::LOCALHOST.into(),
            Kind::Netns => Ipv4Addr::new(10, 211, 1, 1).into(),
        }
    }

    /// `program` run in `role`'s namespace.
    pub fn command(&self, role: Role, program: impl AsRef<std::ffi::OsStr>) -> Command {
        match self.ns(role) {
            None => Command::new(program),
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(program);
                cmd
            }
        }
    }

    /// A closure that moves the calling thread (only it) into `role`'s namespace: sockets
    /// it opens afterwards live there, and threads it spawns inherit it.
    pub fn enter_fn(&self, role: Role) -> impl FnOnce() -> anyhow::Result<()> + Send + 'static {
        let ns = self.ns(role);
        move || enter(ns)
    }
}

#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn enter(ns: Option<&str>) -> anyhow::Result<()> {
    let Some(ns) = ns else {
        return Ok(());
    };
    let file = std::fs::File::open(format!("/run/netns/{ns}"))
        .with_context(|| format!("opening namespace {ns}"))?;
    // SAFETY: setns on a valid namespace fd; it affects only the calling thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("entering {ns}"));
    }
    Ok(())
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.kind == Kind::Netns {
            remove_namespaces();
        }
    }
}

fn remove_namespaces() {
    for ns in [CLIENT_NS, PROXY_NS, SERVER_NS] {
        if std::path::Path::new("/run/netns").join(ns).exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn create_namespaces() -> anyhow::Result<()> {
    for ns in [CLIENT_NS, PROXY_NS, SERVER_NS] {
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    #[rustfmt::skip]
    ip(&["link", "add", "fbc0", "netns", CLIENT_NS, "type", "veth", "peer", "name", "fbp0", "netns", PROXY_NS])?;
    #[rustfmt::skip]
    ip(&["link", "add", "fbp1", "netns", PROXY_NS, "type", "veth", "peer", "name", "fbs0", "netns", SERVER_NS])?;
    for (ns, dev, addr) in [
        (CLIENT_NS, "fbc0", "10.211.1.2/24"),
        (PROXY_NS, "fbp0", "10.211.1.1/24"),
        (PROXY_NS, "fbp1", "10.211.2.1/24"),
        (SERVER_NS, "fbs0", "10.211.2.2/24"),
    ] {
        ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
        ip(&["-n", ns, "link", "set", dev, "up"])?;
    }
    // GRO on, as physical NICs have it by default (veth has it off): every path then
    // receives coalesced segments, as it would from a real interface.
    for (ns, dev) in [
        (CLIENT_NS, "fbc0"),
        (PROXY_NS, "fbp0"),
        (PROXY_NS, "fbp1"),
        (SERVER_NS, "fbs0"),
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])
            .stdout(Stdio::null())
            .status()
            .context("running ethtool")?;
        if !status.success() {
            bail!("ethtool -K {dev} gro on in {ns} failed");
        }
    }
    // The direct path is routed through the proxy namespace, like traffic through a host.
    ip(&[
        "-n",
        CLIENT_NS,
        "route",
        "add",
        "default",
        "via",
        "10.211.1.1",
    ])?;
    ip(&[
        "-n",
        SERVER_NS,
        "route",
        "add",
        "default",
        "via",
        "10.211.2.1",
    ])?;
    for (ns, key, value) in [
        (PROXY_NS, "net.ipv4.ip_forward", "1"),
        // Connection-rate runs leave TIME_WAIT sockets behind; these are our namespaces.
        (CLIENT_NS, "net.ipv4.tcp_tw_reuse", "1"),
        (PROXY_NS, "net.ipv4.tcp_tw_reuse", "1"),
        (SERVER_NS, "net.ipv4.tcp_tw_reuse", "1"),
    ] {
        let status = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .arg(format!("{key}={value}"))
            .status()
            .context("running sysctl")?;
        if !status.success() {
            bail!("sysctl {key}={value} in {ns} failed");
        }
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its error output (also used by `xdp-bench`).
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
