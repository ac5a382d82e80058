//! `forwarder xdp ...`: changes and reads a running agent's XDP guard through its pinned
//! maps, so rules take effect at once without a restart.

use std::io::Write;

use clap::{Args, Subcommand};
use forwarder_common::xdp_reason;

use super::{Cidr, List, XdpMaps};

#[derive(Subcommand, Debug, Clone)]
pub enum XdpCommand {
    /// Allow-list: once it holds a prefix, sources matching none are dropped.
    Allow {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Deny-list: sources matching a prefix are always dropped.
    Deny {
        #[command(subcommand)]
        action: RuleAction,
    },
    /// Show the lists, the SYN limit and the protected ports.
    List(Output),
    /// Show packets per verdict and reason.
    Stats(Output),
}

#[derive(Subcommand, Debug, Clone)]
pub enum RuleAction {
    /// Add a prefix (e.g. 10.0.0.0/8, 2001:db8::/32, or a bare address).
    Add {
        cidr: Cidr,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a prefix, written exactly as it was added.
    Del {
        cidr: Cidr,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The agent instance (its maps are pinned in /sys/fs/bpf/forwarder/<instance>).
    #[arg(long, default_value = "default")]
    pub instance: String,
}

#[derive(Args, Debug, Clone)]
pub struct Output {
    #[command(flatten)]
    pub target: Target,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs one command against the pins of its instance, printing to `out`.
pub fn run(command: XdpCommand, out: &mut impl Write) -> anyhow::Result<()> {
    let open = |target: &Target| XdpMaps::open_pinned(&crate::ebpf::pin_dir_for(&target.instance));
    match command {
        XdpCommand::Allow { action } => change(List::Allow, action, out),
        XdpCommand::Deny { action } => change(List::Deny, action, out),
        XdpCommand::List(o) => list(&open(&o.target)?, o.json, out),
        XdpCommand::Stats(o) => stats(&open(&o.target)?, o.json, out),
    }
}

fn change(list: List, action: RuleAction, out: &mut impl Write) -> anyhow::Result<()> {
    let (add, cidr, target) = match action {
        RuleAction::Add { cidr, target } => (true, cidr, target),
        RuleAction::Del { cidr, target } => (false, cidr, target),
    };
    let mut maps = XdpMaps::open_pinned(&crate::ebpf::pin_dir_for(&target.instance))?;
    let name = list.name();
    if add {
        maps.add(list, cidr)?;
        writeln!(out, "added {cidr} to the {name}-list")?;
    } else if maps.remove(list, cidr)? {
        writeln!(out, "removed {cidr} from the {name}-list")?;
    } else {
        anyhow::bail!("{cidr} is not on the {name}-list (remove prefixes exactly as listed)");
    }
    if list == List::Allow {
        let on = maps.settings()?.allow_list_on != 0;
        writeln!(
            out,
            "allow-list is {}",
            if on {
                "on: sources matching no allow prefix are dropped"
            } else {
                "off (empty)"
            }
        )?;
    }
    Ok(())
}

fn list(maps: &XdpMaps, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let allow = maps.rules(List::Allow)?;
    let deny = maps.rules(List::Deny)?;
    let settings = maps.settings()?;
    let ports = maps.ports();
    if json {
        let strings = |v: &[Cidr]| v.iter().map(Cidr::to_string).collect::<Vec<_>>();
        let value = serde_json::json!({
            "allow": strings(&allow),
            "deny": strings(&deny),
            "allow_list_on": settings.allow_list_on != 0,
            "syn_rate_per_sec": settings.syn_rate_per_sec,
            "syn_burst": settings.syn_burst,
            "ports": ports,
        });
        writeln!(out, "{value}")?;
        return Ok(());
    }
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    writeln!(out, "protected TCP ports: {}", ports.join(", "))?;
    if settings.syn_burst == 0 {
        writeln!(out, "SYN limit per source: off")?;
    } else {
        writeln!(
            out,
            "SYN limit per source: {}/s, burst {}",
            settings.syn_rate_per_sec, settings.syn_burst
        )?;
    }
    let state = if settings.allow_list_on != 0 {
        "on"
    } else {
        "off"
    };
    writeln!(out, "allow-list ({state}): {}", allow.len())?;
    for cidr in &allow {
        writeln!(out, "  {cidr}")?;
    }
    writeln!(out, "deny-list: {}", deny.len())?;
    for cidr in &deny {
        writeln!(out, "  {cidr}")?;
    }
    Ok(())
}

fn stats(maps: &XdpMaps, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let stats = maps.stats()?;
    if json {
        let value: serde_json::Map<String, serde_json::Value> = stats
            .named()
            .map(|(name, n)| (name.to_string(), n.into()))
            .collect();
        writeln!(out, "{}", serde_json::Value::Object(value))?;
        return Ok(());
    }
    writeln!(out, "{:<22} {:>14}", "reason", "packets")?;
    for (reason, (name, n)) in stats.named().enumerate() {
        let verdict = if xdp_reason::is_drop(reason as u32) {
            "drop"
        } else {
            "pass"
        };
        writeln!(out, "{:<22} {n:>14}  ({verdict})", name)?;
    }
    Ok(())
}
