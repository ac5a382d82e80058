//! The XDP ingress guard: drops unwanted TCP traffic to the forwarder's listening ports
//! before it reaches a socket (allow/deny CIDR lists, per-source SYN rate limit), with
//! counters per verdict and reason, and rules changeable at run time through pinned maps.
//!
//! The program lives in its own eBPF object (`forwarder-ebpf/src/bin/forwarder-xdp.rs`),
//! not in the splice object: the guard then loads, attaches and unpins independently of
//! the splice data path, which stays exactly as it was, and neither object carries the
//! other's maps.

pub mod cidr;
pub mod cli;
mod guard;
pub mod maps;
pub mod state;

pub use cidr::{Cidr, CidrError};
pub use guard::{Attached, AttachedMode, XdpGuard};
pub use maps::{List, XdpMaps, XdpStats};

use crate::config::XdpConfig;
use forwarder_common::{XDP_MAX_RULES, XDP_MAX_SYN_RATE};

/// The XDP guard's eBPF object, built by build.rs from `forwarder-ebpf`.
pub static XDP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-xdp"));

/// Checks an `[xdp]` table; the message names the offending key and why.
pub fn validate(config: &XdpConfig) -> Result<(), String> {
    if config.interfaces.is_empty() {
        return Err("xdp.interfaces: name at least one interface".into());
    }
    for (i, name) in config.interfaces.iter().enumerate() {
        // IFNAMSIZ is 16 bytes with the terminating NUL.
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', '\0'])
            || name.contains(char::is_whitespace)
        {
            return Err(format!(
                "xdp.interfaces[{i}]: {name:?} is not an interface name"
            ));
        }
        if config.interfaces[..i].contains(name) {
            return Err(format!("xdp.interfaces: {name:?} is listed twice"));
        }
    }
    for (key, list) in [("allow", &config.allow), ("deny", &config.deny)] {
        for (i, text) in list.iter().enumerate() {
            text.parse::<Cidr>()
                .map_err(|e| format!("xdp.{key}[{i}]: {e}"))?;
        }
        if list.len() > XDP_MAX_RULES as usize {
            return Err(format!("xdp.{key}: more than {XDP_MAX_RULES} prefixes"));
        }
    }
    if config.syn_burst > 0 && config.syn_rate_per_sec == 0 {
        return Err("xdp.syn_rate_per_sec must be > 0 when syn_burst is set (syn_burst = 0 turns the limit off)".into());
    }
    for (key, value) in [
        ("syn_rate_per_sec", config.syn_rate_per_sec),
        ("syn_burst", config.syn_burst),
    ] {
        if value > XDP_MAX_SYN_RATE {
            return Err(format!(
                "xdp.{key}: {value} is above the maximum {XDP_MAX_SYN_RATE}"
            ));
        }
    }
    Ok(())
}

/// The agent's hook: attaches the guard if the config has an `[xdp]` table, protecting
/// the ports the frontends are bound to.
pub fn start_for(
    config: &crate::config::Config,
    bound: impl IntoIterator<Item = std::net::SocketAddr>,
    adopt: bool,
) -> anyhow::Result<Option<XdpGuard>> {
    let Some(xdp) = &config.xdp else {
        return Ok(None);
    };
    let mut ports: Vec<u16> = bound.into_iter().map(|a| a.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    let rules = state::RuleFile::new(&config.state_dir(), xdp);
    let guard = XdpGuard::start_with_rules(
        xdp,
        &ports,
        Some(crate::ebpf::pin_dir_for(&config.instance)),
        Some(rules),
        adopt,
    )?;
    tracing::info!(?ports, interfaces = ?guard.attached(), "XDP ingress guard on");
    Ok(Some(guard))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> XdpConfig {
        XdpConfig {
            interfaces: vec!["eth0".into()],
            ..Default::default()
        }
    }

    #[test]
    fn xdp_validate_accepts_a_full_table() {
        let c = XdpConfig {
            allow: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
            deny: vec!["10.6.6.6".into()],
            syn_rate_per_sec: 100,
            syn_burst: 200,
            ..config()
        };
        validate(&c).unwrap();
    }

    #[test]
    fn xdp_validate_names_the_key_and_reason() {
        let bad_cidr = XdpConfig {
            deny: vec!["10.0.0.0/8".into(), "10.1.2.3/8".into()],
            ..config()
        };
        let err = validate(&bad_cidr).unwrap_err();
        assert!(
            err.contains("xdp.deny[1]") && err.contains("host bits"),
            "{err}"
        );
        let no_iface = XdpConfig::default();
        assert!(validate(&no_iface).unwrap_err().contains("xdp.interfaces"));
        let long = XdpConfig {
            interfaces: vec!["a-very-long-interface".into()],
            ..config()
        };
        assert!(
            validate(&long)
                .unwrap_err()
                .contains("not an interface name")
        );
        let burst_without_rate = XdpConfig {
            syn_burst: 5,
            ..config()
        };
        assert!(
            validate(&burst_without_rate)
                .unwrap_err()
                .contains("syn_rate_per_sec")
        );
        let too_fast = XdpConfig {
            syn_rate_per_sec: XDP_MAX_SYN_RATE + 1,
            syn_burst: 1,
            ..config()
        };
        assert!(validate(&too_fast).unwrap_err().contains("maximum"));
    }
}
