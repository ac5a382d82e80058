//! The policy routing that makes intercepted connections local, installed with `ip`
//! (iproute2) at start and removed at exit and, after a crash, at the next start.
//!
//! Each instance owns one routing table and three rule priorities, derived from its name
//! (`Identity`), so its rules are recognisable and never mixed with another instance's.
//! Per address family (`-4`, `-6`), with T the table and P the first priority:
//!
//! ```text
//! ip route replace local default dev lo table T
//! ip rule add pref P+2 nop                                   # the end of our block
//! ip rule add pref P iif lo ipproto tcp goto P+2             # the host's own connections skip it
//! ip rule add pref P+1 [to CIDR] ipproto tcp dport PORT lookup T   # one per port (and prefix)
//! ip rule add pref P+1 ipproto tcp sport PORT lookup T       # preserve_source: replies
//! ```
//!
//! The last kind is there only when an upstream connects from the device's address
//! (`preserve_source`): the server's replies are addressed to the device, and must be
//! taken in by this host (the agent's socket) rather than forwarded to the device.
//!
//! `iif lo` is how the kernel's rule lookup sees connections made by this host; `not iif
//! lo` cannot be written beside a port (`not` inverts the whole rule), hence the `goto`.
//! Commands run as `ip`, also at exit when the agent no longer is root: it then passes
//! its CAP_NET_ADMIN on to `ip` as an ambient capability (`sys::keep_net_admin_across_exec`).

use std::process::{Command, Stdio};

use super::Intercept;

/// The table and rule priorities of one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub table: u32,
    /// The first of three priorities (`priorities`).
    pub priority: u32,
}

/// Tables 0x46570000-0x4657ffff ("FW"): far from the ones people number by hand.
const TABLE_BASE: u32 = 0x4657_0000;
/// Priorities 9000-11997: after `local` (0) and usual hand-written rules, before `main`
/// (32766).
const PRIORITY_BASE: u32 = 9_000;
const PRIORITY_SLOTS: u32 = 1_000;

impl Identity {
    /// Derived from the instance name (FNV-1a: stable across builds and versions).
    pub fn of(instance: &str) -> Self {
        let hash = instance.bytes().fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
        Self {
            table: TABLE_BASE | (hash & 0xffff),
            priority: PRIORITY_BASE + (hash >> 16) % PRIORITY_SLOTS * 3,
        }
    }

    /// The three rule priorities: skip (the host's own traffic), intercept, end.
    pub fn priorities(&self) -> [u32; 3] {
        [self.priority, self.priority + 1, self.priority + 2]
    }
}

/// `ip` arguments that install the rules of `intercepts` for one family (`"-4"`/`"-6"`).
pub fn install_commands(
    id: &Identity,
    family: &str,
    intercepts: &[&Intercept],
    reply_ports: &[u16],
) -> Vec<Vec<String>> {
    let ipv6 = family == "-6";
    let [skip, intercept, end] = id.priorities().map(|p| p.to_string());
    let table = id.table.to_string();
    let words = |w: &[&str]| -> Vec<String> {
        std::iter::once(family)
            .chain(w.iter().copied())
            .map(str::to_owned)
            .collect()
    };
    let mut commands = vec![
        words(&[
            "route", "replace", "local", "default", "dev", "lo", "table", &table,
        ]),
        words(&["rule", "add", "pref", &end, "nop"]),
        words(&[
            "rule", "add", "pref", &skip, "iif", "lo", "ipproto", "tcp", "goto", &end,
        ]),
    ];
    for i in intercepts.iter().filter(|i| i.covers(ipv6)) {
        let prefixes: Vec<String> = i
            .destinations
            .iter()
            .filter(|d| d.addr().is_ipv6() == ipv6)
            .map(ToString::to_string)
            .collect();
        for port in &i.ports {
            let port = port.to_string();
            let rule = |to: Option<&str>| {
                let mut w = vec!["rule", "add", "pref", &intercept];
                if let Some(to) = to {
                    w.extend(["to", to]);
                }
                w.extend(["ipproto", "tcp", "dport", &port, "lookup", &table]);
                words(&w)
            };
            if i.any {
                commands.push(rule(None));
            }
            for prefix in &prefixes {
                commands.push(rule(Some(prefix)));
            }
        }
    }
    for port in reply_ports {
        let port = port.to_string();
        commands.push(words(&[
            "rule", "add", "pref", &intercept, "ipproto", "tcp", "sport", &port, "lookup", &table,
        ]));
    }
    commands
}

/// Adds (or deletes) the interception rule for one destination address and port: what a
/// change of an `intercept_hosts` name's addresses needs.
pub fn set_destination(
    id: &Identity,
    addr: std::net::IpAddr,
    port: u16,
    add: bool,
) -> anyhow::Result<()> {
    let family = if addr.is_ipv4() { "-4" } else { "-6" };
    let to = if addr.is_ipv4() {
        format!("{addr}/32")
    } else {
        format!("{addr}/128")
    };
    let [_, intercept, _] = id.priorities().map(|p| p.to_string());
    let (port, table) = (port.to_string(), id.table.to_string());
    let verb = if add { "add" } else { "del" };
    ip(&[
        family, "rule", verb, "pref", &intercept, "to", &to, "ipproto", "tcp", "dport", &port,
        "lookup", &table,
    ])
    .map(|_| ())
}

/// What `install` put in place; `remove` takes it away again.
#[derive(Debug)]
pub struct Installed {
    identity: Identity,
    removed: bool,
}

/// Installs the rules for every family the intercepts cover. IPv6 is skipped with a
/// warning when the host has it off and no IPv6 prefix was asked for.
pub fn install(
    id: &Identity,
    intercepts: &[&Intercept],
    reply_ports: &[u16],
) -> anyhow::Result<Installed> {
    let installed = Installed {
        identity: *id,
        removed: false,
    };
    for family in ["-4", "-6"] {
        let ipv6 = family == "-6";
        if !intercepts.iter().any(|i| i.covers(ipv6)) && reply_ports.is_empty() {
            continue;
        }
        let asked = intercepts
            .iter()
            .any(|i| i.destinations.iter().any(|d| d.addr().is_ipv6() == ipv6));
        for args in install_commands(id, family, intercepts, reply_ports) {
            if let Err(err) = ip(&args) {
                if ipv6 && !asked {
                    tracing::warn!(%err, "IPv6 connections are not intercepted (IPv6 off on this host?)");
                    clear_family(id, family);
                    break;
                }
                // `installed` drops here and removes what went in.
                return Err(err);
            }
        }
    }
    Ok(installed)
}

impl Installed {
    /// Removes every rule and route of this instance (idempotent).
    pub fn remove(&mut self) {
        if !self.removed {
            self.removed = true;
            for family in ["-4", "-6"] {
                clear_family(&self.identity, family);
            }
            if let Ok(left) = leftovers(&self.identity)
                && !left.is_empty()
            {
                tracing::error!(
                    ?left,
                    "transparent: routing rules could not be removed; remove them by hand"
                );
            } else {
                tracing::info!("transparent interception off: routing rules removed");
            }
        }
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes whatever an agent of this instance left (after a crash): every rule at its
/// priorities and every route in its table. Fails only if some remain.
pub fn clear(id: &Identity) -> anyhow::Result<()> {
    let mut listed = String::new();
    for family in ["-4", "-6"] {
        if let Ok(rules) = ip(&[family, "rule", "show"]) {
            listed.push_str(&rules);
        }
    }
    if let Some(conflict) = conflict(id, &listed) {
        anyhow::bail!(
            "{conflict}: another instance (or the host's own rules) uses this instance's routing table {} or rule priorities {:?}; the names hash to the same ones. Rename one of the instances",
            id.table,
            id.priorities()
        );
    }
    for family in ["-4", "-6"] {
        clear_family(id, family);
    }
    let left = leftovers(id)?;
    anyhow::ensure!(
        left.is_empty(),
        "rules or routes of this instance remain after clearing: {left:?}"
    );
    Ok(())
}

fn clear_family(id: &Identity, family: &str) {
    let mut cleared = 0;
    for pref in id.priorities() {
        let pref = pref.to_string();
        // One rule per call; a failure means none is left at this priority (or no such
        // family on this host).
        while ip(&[family, "rule", "del", "pref", &pref]).is_ok() {
            cleared += 1;
            if cleared > 100_000 {
                return;
            }
        }
    }
    let table = id.table.to_string();
    // Fails when the table does not exist: nothing to flush.
    let _ = ip(&[family, "route", "flush", "table", &table]);
    if cleared > 0 {
        tracing::debug!(family, cleared, "transparent: routing rules removed");
    }
}

/// A rule in `listed` (`ip rule show` output) that shares this instance's priorities
/// but looks up another table, or looks up this instance's table at another priority:
/// clearing would break someone else's routing.
fn conflict(id: &Identity, listed: &str) -> Option<String> {
    let ours = id.priorities();
    listed.lines().find_map(|line| {
        let (pref, rest) = line.split_once(':')?;
        let pref: u32 = pref.trim().parse().ok()?;
        let table = rest
            .split_whitespace()
            .skip_while(|w| *w != "lookup")
            .nth(1)
            .map(|t| t == id.table.to_string());
        let at_ours = ours.contains(&pref);
        match table {
            Some(false) if at_ours => Some(line.trim().to_owned()),
            Some(true) if !at_ours => Some(line.trim().to_owned()),
            _ => None,
        }
    })
}

/// The rules at this instance's priorities and the routes in its table, as `ip` lists
/// them (both families; a family the host lacks lists nothing).
pub fn leftovers(id: &Identity) -> anyhow::Result<Vec<String>> {
    let mut found = Vec::new();
    for family in ["-4", "-6"] {
        if let Ok(rules) = ip(&[family, "rule", "show"]) {
            let ours: Vec<String> = id.priorities().iter().map(|p| format!("{p}:")).collect();
            found.extend(
                rules
                    .lines()
                    .filter(|l| ours.iter().any(|p| l.starts_with(p.as_str())))
                    .map(str::to_owned),
            );
        }
        let table = id.table.to_string();
        if let Ok(routes) = ip(&[family, "route", "show", "table", &table]) {
            found.extend(routes.lines().map(|l| format!("table {table}: {l}")));
        }
    }
    Ok(found)
}

/// Runs `ip ARGS`; its standard output, or an error with its standard error.
fn ip<S: AsRef<str>>(args: &[S]) -> anyhow::Result<String> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let mut command = Command::new("ip");
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::sys::keep_net_admin_across_exec(&mut command);
    let output = command.output().map_err(|e| {
        anyhow::anyhow!(
            "running `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })?;
    if !output.status.success() {
        anyhow::bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_differ_by_instance_and_stay_in_their_ranges() {
        let a = Identity::of("default");
        assert_eq!(a, Identity::of("default"), "stable");
        assert_ne!(a, Identity::of("site-2"));
        for name in ["default", "demo", "a", "gateway-eu-west"] {
            let id = Identity::of(name);
            assert_eq!(id.table >> 16, 0x4657);
            assert!((9_000..=11_997).contains(&id.priority), "{id:?}");
            assert_eq!(id.priority % 3, 0);
        }
    }

    #[test]
    fn rules_of_another_table_at_our_priorities_are_never_cleared() {
        let id = Identity {
            table: 7,
            priority: 100,
        };
        let ours = "0:\tfrom all lookup local\n100:\tfrom all iif lo ipproto tcp goto 102\n101:\tfrom all ipproto tcp dport 8883 lookup 7\n102:\tfrom all nop\n32766:\tfrom all lookup main\n";
        assert_eq!(conflict(&id, ours), None);
        let theirs = "101:\tfrom all ipproto tcp dport 443 lookup 9\n";
        assert!(conflict(&id, theirs).is_some_and(|l| l.contains("lookup 9")));
        let our_table_elsewhere = "500:\tfrom all lookup 7\n";
        assert!(conflict(&id, our_table_elsewhere).is_some());
    }

    #[test]
    fn rules_skip_the_hosts_own_connections_before_intercepting() {
        let id = Identity {
            table: 7,
            priority: 100,
        };
        let any = Intercept::any(vec![8883, 443]);
        let lines: Vec<String> = install_commands(&id, "-4", &[&any], &[])
            .iter()
            .map(|c| c.join(" "))
            .collect();
        assert_eq!(
            lines,
            [
                "-4 route replace local default dev lo table 7",
                "-4 rule add pref 102 nop",
                "-4 rule add pref 100 iif lo ipproto tcp goto 102",
                "-4 rule add pref 101 ipproto tcp dport 8883 lookup 7",
                "-4 rule add pref 101 ipproto tcp dport 443 lookup 7",
            ]
        );
        let hub = Intercept::to(vec![8883], vec!["192.0.2.0/24".parse().unwrap()]);
        let v4 = install_commands(&id, "-4", &[&hub], &[8883]);
        assert_eq!(
            v4[3].join(" "),
            "-4 rule add pref 101 to 192.0.2.0/24 ipproto tcp dport 8883 lookup 7"
        );
        assert_eq!(
            v4[4].join(" "),
            "-4 rule add pref 101 ipproto tcp sport 8883 lookup 7",
            "replies to connections made from the device's address"
        );
        // An IPv4-only intercept adds no IPv6 interception rule.
        assert_eq!(install_commands(&id, "-6", &[&hub], &[]).len(), 3);
    }
}
