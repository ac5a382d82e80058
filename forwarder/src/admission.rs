//! Who gets in: connection caps per frontend, for the whole agent, and per source.
//!
//! - **Frontend and agent caps** (`max_connections`): at the cap the accept loop stops
//!   accepting, so new clients wait in the kernel's accept queue (up to
//!   `listener::BACKLOG`; beyond it the kernel drops their SYNs and they retry). A device
//!   sees a slow connect, never an error, and gets in as soon as a slot frees. Counted as
//!   `at_capacity` (each time the loop had to wait).
//! - **Per-source cap** (`max_connections_per_source`): a source can only be known once
//!   accepted, so a client over it is accepted and reset at once (no TIME_WAIT left
//!   here), counted as `refused_per_source`. IPv4 counts per address, IPv6 per /64 (one
//!   host usually holds a whole /64), both configurable.
//!
//! A client holds its `Admitted` until its connection ends, an upgraded WebSocket
//! session included.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::Instrument as _;

use crate::log_limit::LogLimit;
use crate::metrics;

/// The agent-wide cap, shared by every frontend (and kept across reloads).
#[derive(Debug)]
pub struct AgentCap {
    slots: Arc<Semaphore>,
    max: usize,
}

impl AgentCap {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// How sources are grouped for `max_connections_per_source`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceLimit {
    pub max: u32,
    /// Leading bits of an IPv4 address that name a source (32: each address).
    pub ipv4_prefix: u8,
    /// Leading bits of an IPv6 address that name a source (64: each /64).
    pub ipv6_prefix: u8,
}

impl SourceLimit {
    /// The source a client address counts against. IPv4-mapped IPv6 addresses (a
    /// dual-stack listener) count as the IPv4 address they are.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => IpAddr::V4(mask_v4(v4, self.ipv4_prefix)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(mask_v4(v4, self.ipv4_prefix)),
                None => IpAddr::V6(mask_v6(v6, self.ipv6_prefix)),
            },
        }
    }
}

fn mask_v4(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    let bits = u32::from(ip);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits & mask)
}

fn mask_v6(ip: Ipv6Addr, prefix: u8) -> Ipv6Addr {
    let bits = u128::from(ip);
    let mask = u128::MAX
        .checked_shl(128 - u32::from(prefix.min(128)))
        .unwrap_or(0);
    Ipv6Addr::from(bits & mask)
}

/// Open connections per source of one frontend.
#[derive(Debug)]
struct SourceTable {
    limit: SourceLimit,
    open: Mutex<HashMap<IpAddr, u32>>,
}

impl SourceTable {
    /// A slot for `ip`'s source, or `None` when it already holds `limit.max`.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = self.limit.key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(key).or_insert(0);
        if *count >= self.limit.max {
            return None;
        }
        *count += 1;
        Some(SourceSlot {
            table: self.clone(),
            key,
        })
    }

    fn open_sources(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// One connection's share of its source's cap; given back on drop.
#[derive(Debug)]
struct SourceSlot {
    table: Arc<SourceTable>,
    key: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// What a connection holds while it is open: its slots under every cap.
#[derive(Debug)]
pub struct Admitted {
    _frontend: OwnedSemaphorePermit,
    _agent: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// A frontend's two caps, as a handle that outlives its accept loop: a session a previous
/// agent hands over (`crate::upgrade`) holds its slots like any connection, so the caps
/// (and the descriptor budget they are sized from) count it.
#[derive(Clone, Debug)]
pub struct Slots {
    frontend: Arc<Semaphore>,
    agent: Arc<AgentCap>,
}

impl Slots {
    /// Slots for a connection that is open already: at once if both caps have room, else
    /// a claim on the next that free up. The claim queues with the accept loop (tokio's
    /// semaphores are first come, first served), so new clients wait until the count is
    /// back under the caps. The connection is served either way.
    pub fn hold(&self) -> Held {
        if let Ok(frontend) = self.frontend.clone().try_acquire_owned()
            && let Ok(agent) = self.agent.slots.clone().try_acquire_owned()
        {
            return Held::Now(Admitted {
                _frontend: frontend,
                _agent: agent,
                _source: None,
            });
        }
        let (frontend, agent) = (self.frontend.clone(), self.agent.slots.clone());
        Held::Owed(tokio::spawn(async move {
            // In the accept loop's order: frontend, then agent.
            let frontend = frontend.acquire_owned().await.ok()?;
            let agent = agent.acquire_owned().await.ok()?;
            Some(Admitted {
                _frontend: frontend,
                _agent: agent,
                _source: None,
            })
        }))
    }
}

/// What `Slots::hold` gave a connection, held until it ends.
#[derive(Debug)]
pub enum Held {
    Now(Admitted),
    /// Still waiting, or the slots it got (in the task's output, freed with the handle).
    Owed(tokio::task::JoinHandle<Option<Admitted>>),
}

impl Held {
    pub fn is_owed(&self) -> bool {
        matches!(self, Self::Owed(_))
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // A claim still waiting must not take slots for a connection that is gone.
        if let Self::Owed(claim) = self {
            claim.abort();
        }
    }
}

/// The counters a gate adds to (the frontend's).
pub struct GateCounters<'a> {
    pub at_capacity: &'a AtomicU64,
    pub refused_per_source: &'a AtomicU64,
}

/// The caps of one frontend, in front of its listener.
#[derive(Debug)]
pub struct Gate {
    frontend: String,
    slots: Arc<Semaphore>,
    max: usize,
    agent: Arc<AgentCap>,
    sources: Option<Arc<SourceTable>>,
    capacity_log: LogLimit,
    refusal_log: LogLimit,
}

impl Gate {
    pub fn new(
        frontend: &str,
        max: usize,
        agent: Arc<AgentCap>,
        per_source: Option<SourceLimit>,
    ) -> Self {
        Self {
            frontend: frontend.to_owned(),
            slots: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            agent,
            sources: per_source.map(|limit| {
                Arc::new(SourceTable {
                    limit,
                    open: Mutex::default(),
                })
            }),
            capacity_log: LogLimit::default(),
            refusal_log: LogLimit::default(),
        }
    }

    /// The accept loop every frontend runs: accepts until `shutdown` turns true, and
    /// serves each admitted client in a task of its own, in a `conn` span naming the
    /// frontend and the client. `serve` gets the client's `Admitted` slot to hold for as
    /// long as the client is served.
    pub async fn serve<F, Fut>(
        &self,
        listener: &TcpListener,
        mut shutdown: watch::Receiver<bool>,
        counters: &GateCounters<'_>,
        mut serve: F,
    ) where
        F: FnMut(TcpStream, SocketAddr, Admitted) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        while let Some((client, peer, admitted)) =
            self.accept(listener, &mut shutdown, counters).await
        {
            let span = tracing::info_span!("conn", frontend = %self.frontend, client = %peer);
            tokio::spawn(serve(client, peer, admitted).instrument(span));
        }
    }

    /// The next admitted client, or `None` once `shutdown` says stop.
    pub async fn accept(
        &self,
        listener: &TcpListener,
        shutdown: &mut watch::Receiver<bool>,
        counters: &GateCounters<'_>,
    ) -> Option<(TcpStream, SocketAddr, Admitted)> {
        let (frontend, agent) = self.wait_for_slots(shutdown, counters).await?;
        loop {
            let (client, peer) =
                crate::listener::accept(listener, shutdown, &self.frontend).await?;
            let source = match &self.sources {
                None => None,
                Some(table) => match table.take(peer.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        self.refuse(client, peer, table, counters);
                        continue;
                    }
                },
            };
            let admitted = Admitted {
                _frontend: frontend,
                _agent: agent,
                _source: source,
            };
            return Some((client, peer, admitted));
        }
    }

    pub fn slots(&self) -> Slots {
        Slots {
            frontend: self.slots.clone(),
            agent: self.agent.clone(),
        }
    }

    /// Slots under the frontend's and the agent's caps (in that order, always, so two
    /// frontends never hold one each of what the other waits for).
    async fn wait_for_slots(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        counters: &GateCounters<'_>,
    ) -> Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let frontend = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.at_capacity("max_connections of this frontend", self.max, counters);
                acquire(&self.slots, shutdown).await?
            }
        };
        let agent = match self.agent.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                self.at_capacity("the agent's max_connections", self.agent.max, counters);
                acquire(&self.agent.slots, shutdown).await?
            }
        };
        Some((frontend, agent))
    }

    fn at_capacity(&self, cap: &str, max: usize, counters: &GateCounters<'_>) {
        metrics::add(counters.at_capacity, 1);
        if let Some(suppressed) = self.capacity_log.allow() {
            tracing::warn!(frontend = %self.frontend, max, suppressed,
                "connection cap reached ({cap}): new clients wait in the accept queue");
        }
    }

    fn refuse(
        &self,
        client: TcpStream,
        peer: SocketAddr,
        table: &SourceTable,
        counters: &GateCounters<'_>,
    ) {
        metrics::add(counters.refused_per_source, 1);
        // A reset, not a FIN: no TIME_WAIT here for a client that may be flooding.
        let _ = crate::sys::set_linger_zero(client.as_fd());
        drop(client);
        if let Some(suppressed) = self.refusal_log.allow() {
            tracing::warn!(frontend = %self.frontend, client = %peer,
                source = %table.limit.key(peer.ip()), max = table.limit.max,
                sources_open = table.open_sources(), suppressed,
                "source over max_connections_per_source: connection reset");
        }
    }
}

async fn acquire(
    slots: &Arc<Semaphore>,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        permit = slots.clone().acquire_owned() => permit.ok(),
        _ = shutdown.changed() => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u32) -> SourceLimit {
        SourceLimit {
            max,
            ipv4_prefix: 32,
            ipv6_prefix: 64,
        }
    }

    #[test]
    fn ipv6_sources_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let l = limit(1);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(l.key(a), l.key(b));
        assert_ne!(l.key(a), l.key(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(l.key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
        let wide = SourceLimit {
            ipv4_prefix: 24,
            ..l
        };
        assert_eq!(
            wide.key("192.0.2.200".parse().unwrap()),
            "192.0.2.0".parse::<IpAddr>().unwrap()
        );
        let zero = SourceLimit {
            ipv4_prefix: 0,
            ipv6_prefix: 0,
            ..l
        };
        assert_eq!(zero.key(a), "::".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_source_gets_its_slots_back_when_connections_end() {
        let table = Arc::new(SourceTable {
            limit: limit(2),
            open: Mutex::default(),
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let first = table.take(ip).unwrap();
        let second = table.take(ip).unwrap();
        assert!(table.take(ip).is_none(), "third over a cap of 2");
        assert!(table.take("192.0.2.2".parse().unwrap()).is_some());
        drop(first);
        assert!(table.take(ip).is_some());
        drop(second);
        assert_eq!(table.open_sources(), 0, "no entry left for a gone source");
    }
}
