//! `intercept_hosts`: a transparent frontend that intercepts the addresses of host names
//! (the hub's), resolved at start and again every `intercept_hosts_refresh_secs`, so a
//! hub that moves to another address stays intercepted. A name that fails to resolve
//! keeps its last addresses: a DNS outage must not stop the interception.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::Duration;

use super::rules::{self, Identity};
use super::steer::Steer;
use crate::xdp::Cidr;

/// The host names of one frontend and the addresses intercepted for them now.
#[derive(Debug)]
pub struct HostWatch {
    pub slot: u32,
    pub ports: Vec<u16>,
    pub every: Duration,
    pub current: BTreeMap<String, BTreeSet<IpAddr>>,
}

impl HostWatch {
    /// Resolves `hosts` now (blocking: start-up only); names that do not resolve are
    /// logged and tried again at the next refresh.
    pub fn start(slot: u32, ports: Vec<u16>, hosts: &[String], every: Duration) -> Self {
        let current = hosts
            .iter()
            .map(|host| {
                let found = match (host.as_str(), 0).to_socket_addrs() {
                    Ok(addrs) => addrs.map(|a| a.ip().to_canonical()).collect(),
                    Err(err) => {
                        tracing::warn!(%host, %err, "intercept_hosts: no address yet; trying again later");
                        BTreeSet::new()
                    }
                };
                (host.clone(), found)
            })
            .collect();
        Self {
            slot,
            ports,
            every,
            current,
        }
    }

    /// Every address intercepted now, as single-address prefixes.
    pub fn prefixes(&self) -> Vec<Cidr> {
        self.addresses()
            .into_iter()
            .filter_map(|ip| Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 }).ok())
            .collect()
    }

    fn addresses(&self) -> BTreeSet<IpAddr> {
        self.current.values().flatten().copied().collect()
    }

    /// Resolves again every `every`, and moves the interception (map entries first,
    /// then rules; removed the other way round) to the addresses that changed.
    pub async fn refresh(mut self, steer: Arc<Steer>, id: Identity) {
        loop {
            tokio::time::sleep(self.every).await;
            let before = self.addresses();
            for (host, addrs) in &mut self.current {
                match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(found) => {
                        let found: BTreeSet<IpAddr> =
                            found.map(|a| a.ip().to_canonical()).collect();
                        if !found.is_empty() {
                            *addrs = found;
                        }
                    }
                    Err(err) => {
                        tracing::debug!(%host, %err, "intercept_hosts: resolution failed; keeping the last addresses")
                    }
                }
            }
            let after = self.addresses();
            let added: Vec<IpAddr> = after.difference(&before).copied().collect();
            let removed: Vec<IpAddr> = before.difference(&after).copied().collect();
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            tracing::info!(
                ?added,
                ?removed,
                "intercept_hosts: the intercepted addresses changed"
            );
            for ip in added {
                if let Err(err) = steer.set_destination(self.slot, ip, true) {
                    tracing::warn!(%ip, "intercept_hosts: {err:#}");
                }
                self.set_rules(id, ip, true).await;
            }
            for ip in removed {
                self.set_rules(id, ip, false).await;
                if let Err(err) = steer.set_destination(self.slot, ip, false) {
                    tracing::warn!(%ip, "intercept_hosts: {err:#}");
                }
            }
        }
    }

    async fn set_rules(&self, id: Identity, ip: IpAddr, add: bool) {
        let ports = self.ports.clone();
        let done = tokio::task::spawn_blocking(move || {
            ports
                .iter()
                .try_for_each(|port| rules::set_destination(&id, ip, *port, add))
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(%ip, add, "intercept_hosts: {err:#}"),
            Err(err) => tracing::warn!(%ip, add, %err, "intercept_hosts: rule change did not run"),
        }
    }
}
