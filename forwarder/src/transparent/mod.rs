//! Transparent mode on a gateway host: connections that devices route through this host
//! to the hub's own address are taken over and forwarded, spliced in the kernel, without
//! any change on the devices (their DNS, their trust, the SNI and `Host` they send).
//!
//! Two pieces make a forwarded connection land on the agent's listener:
//! - policy routing (`rules`): TCP to an intercepted port that arrives from another
//!   host is looked up in a table of this instance whose only route is
//!   `local default dev lo`, so the kernel delivers it locally instead of forwarding it.
//!   Connections the host makes itself (the agent's own upstream connections to the same
//!   port) skip these rules, or the agent would connect to itself;
//! - steering (`steer`): an `sk_lookup` program attached to the network namespace picks
//!   the agent's listener for those connections (by destination port and prefix), so the
//!   listener can sit on any address, and the host's own services on those ports (on its
//!   own addresses, outside the intercepted prefixes) keep theirs.
//!
//! Why sk_lookup rather than TPROXY: no netfilter rules (nftables need not be installed,
//! and nothing else's ruleset is touched), the program detaches by itself when the agent
//! dies (its link is not pinned), and only the routing rules need clearing after a crash.
//!
//! The accepted socket's local address is the device's original destination
//! (`getsockname`), which `upstream` connects to unless the frontend names a backend.

mod hosts;
pub mod proxy_v2;
pub mod rules;
mod steer;
pub mod upstream;

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::Context as _;
use forwarder_common::{TP_MAX_DESTS, TP_MAX_LISTENERS, TP_MAX_PORTS};

use crate::config::{Config, Mode};
use crate::xdp::Cidr;
pub use rules::Identity;

/// The transparent eBPF object, built by build.rs from `forwarder-ebpf`.
pub static TRANSPARENT_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-transparent"));

/// The ports `forwarder run --transparent` intercepts: MQTT, AMQP and HTTPS/WebSockets
/// over TLS, all passed through (the device names the hub itself, so nothing needs
/// rewriting).
pub const DEFAULT_PORTS: [(&str, u16); 3] = [("mqtt", 8883), ("amqp", 5671), ("https", 443)];

/// How often `intercept_hosts` are resolved again when the frontend does not say.
pub const DEFAULT_HOSTS_REFRESH_SECS: u64 = 60;

/// What one transparent frontend intercepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intercept {
    pub ports: Vec<u16>,
    /// The prefixes intercepted now (configured, and the host names' addresses).
    pub destinations: Vec<Cidr>,
    /// Any destination (no prefix and no host name configured).
    pub any: bool,
    /// Host names whose addresses are intercepted, resolved again and again.
    pub hosts: Vec<String>,
}

impl Intercept {
    fn of(f: &crate::config::Frontend) -> Result<Self, String> {
        let destinations = f
            .intercept_destinations
            .iter()
            .enumerate()
            .map(|(i, text)| {
                text.parse::<Cidr>()
                    .map_err(|e| format!("frontend {:?}: intercept_destinations[{i}]: {e}", f.name))
            })
            .collect::<Result<_, _>>()?;
        let destinations: Vec<Cidr> = destinations;
        Ok(Self {
            ports: f.intercept_ports.clone(),
            any: destinations.is_empty() && f.intercept_hosts.is_empty(),
            destinations,
            hosts: f.intercept_hosts.clone(),
        })
    }

    /// Any destination, in tests.
    #[cfg(test)]
    pub fn any(ports: Vec<u16>) -> Self {
        Self {
            ports,
            destinations: Vec::new(),
            any: true,
            hosts: Vec::new(),
        }
    }

    /// These prefixes only, in tests.
    #[cfg(test)]
    pub fn to(ports: Vec<u16>, destinations: Vec<Cidr>) -> Self {
        Self {
            ports,
            destinations,
            any: false,
            hosts: Vec::new(),
        }
    }

    /// Whether IPv4 (or IPv6) destinations are (or, by a host name, may be) intercepted.
    fn covers(&self, ipv6: bool) -> bool {
        self.any
            || !self.hosts.is_empty()
            || self.destinations.iter().any(|d| d.addr().is_ipv6() == ipv6)
    }
}

/// Checks the transparent settings of a configuration as a whole.
pub fn validate(config: &Config) -> Result<(), String> {
    let mut ports = HashSet::new();
    let mut dests = 0usize;
    let mut listeners = 0u32;
    for f in &config.frontends {
        if (f.send_proxy_v2 || f.preserve_source)
            && (f.mode != Mode::Transparent || f.backend.is_some())
        {
            return Err(format!(
                "frontend {:?}: send_proxy_v2 and preserve_source on a frontend apply to a transparent frontend's original destination (no backend); set them in the [[backend]] instead",
                f.name
            ));
        }
        if f.mode != Mode::Transparent {
            if !f.intercept_ports.is_empty()
                || !f.intercept_destinations.is_empty()
                || !f.intercept_hosts.is_empty()
            {
                return Err(format!(
                    "frontend {:?}: intercept_ports, intercept_destinations and intercept_hosts apply to mode \"transparent\" only",
                    f.name
                ));
            }
            continue;
        }
        listeners += 1;
        if f.intercept_ports.is_empty() {
            return Err(format!(
                "frontend {:?} (mode \"transparent\"): name the destination ports to intercept, e.g. intercept_ports = [8883]",
                f.name
            ));
        }
        for port in &f.intercept_ports {
            if *port == 0 {
                return Err(format!(
                    "frontend {:?}: intercept_ports: 0 is not a port",
                    f.name
                ));
            }
            if !ports.insert(*port) {
                return Err(format!(
                    "frontend {:?}: port {port} is intercepted by another transparent frontend too",
                    f.name
                ));
            }
        }
        let intercept = Intercept::of(f)?;
        dests += intercept.destinations.len().max(2) + 8 * intercept.hosts.len();
        for (i, host) in f.intercept_hosts.iter().enumerate() {
            let ok = !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_');
            if !ok {
                return Err(format!(
                    "frontend {:?}: intercept_hosts[{i}]: {host:?} is not a host name",
                    f.name
                ));
            }
        }
        if !(1..=86_400).contains(&f.intercept_hosts_refresh_secs) {
            return Err(format!(
                "frontend {:?}: intercept_hosts_refresh_secs = {} is out of range 1..=86400 (seconds between resolutions of intercept_hosts)",
                f.name, f.intercept_hosts_refresh_secs
            ));
        }
    }
    if listeners > TP_MAX_LISTENERS || ports.len() > TP_MAX_PORTS as usize {
        return Err(format!(
            "at most {TP_MAX_LISTENERS} transparent frontends and {TP_MAX_PORTS} intercepted ports"
        ));
    }
    if dests > TP_MAX_DESTS as usize {
        return Err(format!(
            "intercept_destinations: at most {TP_MAX_DESTS} prefixes in all"
        ));
    }
    for b in config
        .backends
        .iter()
        .filter(|b| b.send_proxy_v2 || b.preserve_source)
    {
        let terminating = config.frontends.iter().find(|f| {
            matches!(f.mode, Mode::Http | Mode::Originate)
                && f.backend.as_deref() == Some(b.name.as_str())
        });
        if let Some(f) = terminating {
            return Err(format!(
                "backend {:?}: send_proxy_v2 and preserve_source apply to L4 frontends (splice, transparent); frontend {:?} is mode {:?}",
                b.name, f.name, f.mode
            ));
        }
    }
    Ok(())
}

/// A reload may not add, remove or change transparent frontends: their listeners sit in
/// the steering program's map and the routing rules name their ports, both set up at
/// start (with privileges the agent may no longer have).
pub fn check_reload(current: &Config, next: &Config) -> Result<(), String> {
    let transparent = |c: &Config| -> Vec<crate::config::Frontend> {
        c.frontends
            .iter()
            .filter(|f| f.mode == Mode::Transparent)
            .cloned()
            .collect()
    };
    if transparent(current) != transparent(next) {
        return Err(
            "transparent frontends change only at a restart (their interception is set up at start); revert them to reload the rest"
                .into(),
        );
    }
    Ok(())
}

/// The configuration of `forwarder run --transparent`: MQTT, AMQP and HTTPS (WebSockets
/// included) intercepted on their standard ports and passed through to their original
/// destination, each on a listener of its own on a free loopback port.
pub fn default_config() -> Config {
    let frontends = DEFAULT_PORTS
        .iter()
        .map(|(name, port)| {
            let bind = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            let mut f = crate::config::Frontend::new(name, bind, Mode::Transparent, name);
            f.backend = None;
            f.intercept_ports = vec![*port];
            f
        })
        .collect();
    Config::new("default", frontends, Vec::new())
}

/// Settings that work but will not do what is meant.
pub fn warnings(config: &Config) -> Vec<String> {
    config
        .backends
        .iter()
        .filter(|b| b.send_proxy_v2)
        .filter(|b| b.servers.iter().any(|s| looks_like_azure(&s.address)))
        .map(|b| {
            format!(
                "backend {:?}: send_proxy_v2 is on, but Azure IoT Hub and DPS do not accept the PROXY protocol: they will close every connection. Use it only towards brokers that expect it (EMQX, HiveMQ, HAProxy accept-proxy, nginx proxy_protocol)",
                b.name
            )
        })
        .collect()
}

/// An IoT Hub or DPS name (`host:port`).
fn looks_like_azure(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_end_matches('.')
        .to_ascii_lowercase();
    [".azure-devices.net", ".azure-devices-provisioning.net"]
        .iter()
        .any(|suffix| host.ends_with(suffix))
}

/// The interception of an agent: the steering program attached and the routing rules
/// installed. Dropping it removes the rules, then detaches the program.
pub struct Interception {
    rules: rules::Installed,
    /// Absent when only `preserve_source` needs the rules (no transparent frontend).
    steer: Option<Arc<steer::Steer>>,
    identity: Identity,
    /// Frontends with `intercept_hosts`, until `spawn_refresh` takes them.
    watches: Vec<hosts::HostWatch>,
    /// Their refresh tasks: stopped before the rules are removed.
    refreshing: Vec<tokio::task::JoinHandle<()>>,
}

/// Server ports whose replies must be taken in by this host: those of upstreams that
/// connect from the device's address (`preserve_source`).
pub fn reply_ports(config: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = config
        .frontends
        .iter()
        .filter(|f| f.mode == Mode::Transparent && f.preserve_source)
        .flat_map(|f| f.intercept_ports.iter().copied())
        .chain(
            config
                .backends
                .iter()
                .filter(|b| b.preserve_source)
                .flat_map(|b| &b.servers)
                .filter_map(|s| s.address.rsplit_once(':')?.1.parse().ok()),
        )
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

impl Interception {
    /// Clears what a crashed agent of this instance left, then steers each transparent
    /// frontend's intercepted connections to its listener (`listeners`, in the
    /// configuration's order of frontends) and installs the routing rules. `None` when
    /// the configuration has no transparent frontend. Needs CAP_NET_ADMIN and CAP_BPF.
    pub fn start(
        config: &Config,
        listeners: &[std::net::TcpListener],
    ) -> anyhow::Result<Option<Self>> {
        let mut targets = Vec::new();
        let mut watches = Vec::new();
        for (f, listener) in config.frontends.iter().zip(listeners) {
            if f.mode == Mode::Transparent {
                let mut intercept = Intercept::of(f).map_err(anyhow::Error::msg)?;
                if !intercept.hosts.is_empty() {
                    let slot = u32::try_from(targets.len()).unwrap_or(u32::MAX);
                    let watch = hosts::HostWatch::start(
                        slot,
                        intercept.ports.clone(),
                        &intercept.hosts,
                        std::time::Duration::from_secs(f.intercept_hosts_refresh_secs),
                    );
                    intercept.destinations.extend(watch.prefixes());
                    watches.push(watch);
                }
                crate::sys::set_ip_transparent(listener.as_fd(), listener.local_addr()?.is_ipv6())
                    .with_context(|| {
                        format!(
                            "frontend {}: IP_TRANSPARENT on its listener (needs CAP_NET_ADMIN)",
                            f.name
                        )
                    })?;
                targets.push((intercept, listener));
            }
        }
        let reply_ports = reply_ports(config);
        let identity = Identity::of(&config.instance);
        if targets.is_empty() && reply_ports.is_empty() {
            // Still: rules a crashed agent of this instance left must go.
            if !rules::leftovers(&identity)?.is_empty()
                && let Err(err) = rules::clear(&identity)
            {
                tracing::warn!(
                    "transparent: routing rules left at this instance's priorities were not cleared: {err:#}"
                );
            }
            return Ok(None);
        }
        rules::clear(&identity).context("clearing the routing rules a previous agent left")?;
        let steer = if targets.is_empty() {
            None
        } else {
            Some(Arc::new(steer::Steer::start(&targets)?))
        };
        let intercepts: Vec<&Intercept> = targets.iter().map(|(i, _)| i).collect();
        let rules = rules::install(&identity, &intercepts, &reply_ports)?;
        tracing::info!(
            table = identity.table,
            priorities = ?identity.priorities(),
            ports = ?intercepts.iter().flat_map(|i| i.ports.iter()).collect::<Vec<_>>(),
            ?reply_ports,
            "transparent interception on (`ip rule`, `ip route show table {}`)",
            identity.table
        );
        Ok(Some(Self {
            rules,
            steer,
            identity,
            watches,
            refreshing: Vec::new(),
        }))
    }

    /// Starts resolving `intercept_hosts` again periodically (on the serving runtime: the
    /// start-up one may be gone by then).
    pub fn spawn_refresh(&mut self) {
        let Some(steer) = &self.steer else {
            return;
        };
        for watch in self.watches.drain(..) {
            self.refreshing
                .push(tokio::spawn(watch.refresh(steer.clone(), self.identity)));
        }
    }
}

/// Where the steering counters appear in `forwarder stats` (beside the frontends').
pub const STATS_KEY: &str = "transparent:steering";

impl Interception {
    /// The steering program's counters into `FWD_STATS`, for `forwarder stats`.
    pub fn publish(&self, datapath: &crate::ebpf::Datapath) {
        if let Some(steer) = &self.steer {
            let counters = [
                ("steered", steer.count(forwarder_common::tp_reason::STEERED)),
                (
                    "assign_failed",
                    steer.count(forwarder_common::tp_reason::ASSIGN_FAILED),
                ),
            ];
            if let Err(err) = datapath.publish_stats(STATS_KEY, &counters) {
                tracing::debug!(%err, "transparent counters not published");
            }
        }
    }
}

impl Drop for Interception {
    fn drop(&mut self) {
        for task in &self.refreshing {
            task.abort();
        }
        // Rules first: once they are gone, new connections are routed on to their
        // destination as if the agent were not there, rather than reset.
        self.rules.remove();
        if let Some(steer) = &self.steer {
            tracing::info!(
                steered = steer.count(forwarder_common::tp_reason::STEERED),
                "transparent steering detached (connections it handed to the agent, in all)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, "test.toml").map_err(|e| e.to_string())
    }

    const BASE: &str = r#"
[[frontend]]
name = "mqtt"
bind = "127.0.0.1:0"
mode = "transparent"
intercept_ports = [8883]
"#;

    #[test]
    fn a_transparent_frontend_needs_no_backend_but_needs_ports() {
        let config = parse(BASE).unwrap();
        assert_eq!(config.frontends[0].mode, Mode::Transparent);
        let err = parse(&BASE.replace("intercept_ports = [8883]", "")).unwrap_err();
        assert!(err.contains("intercept_ports = [8883]"), "{err}");
    }

    #[test]
    fn intercepted_ports_and_prefixes_are_checked() {
        let twice = format!(
            "{BASE}\n[[frontend]]\nname = \"b\"\nbind = \"127.0.0.1:0\"\nmode = \"transparent\"\nintercept_ports = [8883]\n"
        );
        let err = parse(&twice).unwrap_err();
        assert!(err.contains("another transparent frontend"), "{err}");
        let bad = BASE.replace(
            "[8883]",
            "[8883]\nintercept_destinations = [\"10.0.0.0/33\"]",
        );
        let err = parse(&bad).unwrap_err();
        assert!(err.contains("intercept_destinations[0]"), "{err}");
        let elsewhere = "[[backend]]\nname = \"b\"\nservers = [{ address = \"h:1\" }]\n[[frontend]]\nname = \"s\"\nbind = \"127.0.0.1:0\"\nbackend = \"b\"\nintercept_ports = [1]\n";
        let err = parse(elsewhere).unwrap_err();
        assert!(err.contains("mode \"transparent\" only"), "{err}");
    }

    #[test]
    fn host_names_are_checked_and_restrict_the_interception() {
        let named = BASE.replace(
            "[8883]",
            "[8883]\nintercept_hosts = [\"myhub.azure-devices.net\"]",
        );
        let config = parse(&named).unwrap();
        let intercept = Intercept::of(&config.frontends[0]).unwrap();
        assert!(
            !intercept.any,
            "a host name restricts the interception to its addresses"
        );
        assert!(intercept.covers(false) && intercept.covers(true));
        let bad = BASE.replace("[8883]", "[8883]\nintercept_hosts = [\"a b\"]");
        assert!(parse(&bad).unwrap_err().contains("intercept_hosts[0]"));
        let refresh = named.replace("[8883]\n", "[8883]\nintercept_hosts_refresh_secs = 0\n");
        assert!(
            parse(&refresh)
                .unwrap_err()
                .contains("intercept_hosts_refresh_secs = 0")
        );
    }

    #[test]
    fn identity_settings_sit_with_whoever_names_the_upstream() {
        // On a transparent frontend without a backend: its original destination's.
        let own = BASE.replace(
            "[8883]",
            "[8883]\npreserve_source = true\nsend_proxy_v2 = true",
        );
        let config = parse(&own).unwrap();
        assert_eq!(reply_ports(&config), vec![8883]);
        // With a backend they belong in the backend.
        let with_backend = format!(
            "[[backend]]\nname = \"b\"\npreserve_source = true\nservers = [{{ address = \"h:1884\" }}]\n{}",
            own.replace("[8883]\n", "[8883]\nbackend = \"b\"\n")
        );
        let err = parse(&with_backend).unwrap_err();
        assert!(err.contains("set them in the [[backend]]"), "{err}");
        let backend_only =
            with_backend.replace("preserve_source = true\nsend_proxy_v2 = true\n", "");
        assert_eq!(reply_ports(&parse(&backend_only).unwrap()), vec![1884]);
    }

    #[test]
    fn proxy_v2_towards_a_hub_draws_a_warning() {
        let text = r#"
[[backend]]
name = "hub"
send_proxy_v2 = true
servers = [{ address = "myhub.azure-devices.net:8883" }]
[[frontend]]
name = "mqtt"
bind = "127.0.0.1:0"
backend = "hub"
"#;
        let config = parse(text).unwrap();
        let warnings = config.warnings();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("do not accept the PROXY protocol")),
            "{warnings:?}"
        );
        let broker = parse(&text.replace("myhub.azure-devices.net", "emqx.example")).unwrap();
        assert!(broker.warnings().is_empty());
    }
}
