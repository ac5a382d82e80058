//! Lists each connection in the pinned `FWD_CONNS` map while it lives, so
//! `forwarder conns` can show who is connected to whom, on which path: L4 pairs (kernel
//! or userspace) and the client connections of terminating HTTPS frontends.

use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;
use std::os::fd::AsFd;

use forwarder_common::{ConnInfo, PATH_HTTPS, PATH_KERNEL, PATH_USERSPACE, PATH_WEBSOCKET};
use tokio::net::TcpStream;

use crate::ebpf::{Datapath, SplicedPair, padded_name};
use crate::sys;

/// A connection's entry; removed again when this is dropped. `D` is how it holds the
/// data path: borrowed by an L4 session, owned (`Arc`) inside an HTTPS client stream.
pub struct Registration<D: Deref<Target = Datapath>> {
    datapath: D,
    cookie: u64,
    info: ConnInfo,
    /// Handed to the next agent (`crate::upgrade`): the entry stays at drop.
    handed_over: bool,
}

fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl<D: Deref<Target = Datapath>> Registration<D> {
    /// Lists an L4 pair; `None` if the map is full or the client is gone (the connection
    /// is served all the same, only not listed).
    pub fn l4(
        datapath: D,
        frontend: &str,
        client: SocketAddr,
        upstream: SocketAddr,
        pair: SplicedPair,
        kernel: bool,
    ) -> Option<Self> {
        let path = if kernel { PATH_KERNEL } else { PATH_USERSPACE };
        Self::list(
            datapath,
            frontend,
            (client, pair.client),
            path,
            Some(upstream),
            pair.upstream,
        )
    }

    /// Lists the client connection of a terminating HTTPS frontend (its requests go over
    /// pooled upstream connections, so it has no one upstream until it becomes a tunnel).
    pub fn https(datapath: D, frontend: &str, client: &TcpStream) -> Option<Self> {
        let cookie = sys::socket_cookie(client.as_fd()).ok()?;
        let client_addr = client.peer_addr().ok()?;
        Self::list(
            datapath,
            frontend,
            (client_addr, cookie),
            PATH_HTTPS,
            None,
            0,
        )
    }

    fn list(
        datapath: D,
        frontend: &str,
        (client_addr, cookie): (SocketAddr, u64),
        path: u8,
        upstream: Option<SocketAddr>,
        upstream_cookie: u64,
    ) -> Option<Self> {
        let now = sys::monotonic_ns();
        let info = ConnInfo {
            client_addr: mapped(client_addr.ip()),
            upstream_addr: upstream.map_or([0; 16], |a| mapped(a.ip())),
            client_port: client_addr.port(),
            upstream_port: upstream.map_or(0, |a| a.port()),
            path,
            _pad: [0; 3],
            upstream_cookie,
            started_ns: now,
            bytes_up: 0,
            bytes_down: 0,
            last_active_ns: now,
            frontend: padded_name(frontend),
        };
        match datapath.register_conn(cookie, &info) {
            Ok(()) => Some(Self {
                datapath,
                cookie,
                info,
                handed_over: false,
            }),
            Err(err) => {
                tracing::debug!(%err, "connection not listed for `forwarder conns`");
                None
            }
        }
    }

    /// The kernel could not take the pair after all: it is served in userspace.
    /// Takes over the entry the previous agent listed for this connection (an upgrade:
    /// the map is shared), if there is one.
    pub fn adopt(datapath: D, client_cookie: u64) -> Option<Self> {
        let info = datapath.conn_info(client_cookie)?;
        Some(Self {
            datapath,
            cookie: client_cookie,
            info,
            handed_over: false,
        })
    }

    /// Leaves the entry to the next agent, which takes it over (`adopt`).
    pub fn hand_over(mut self) {
        self.handed_over = true;
    }

    pub fn set_userspace(&mut self) {
        self.info.path = PATH_USERSPACE;
        let _ = self.datapath.register_conn(self.cookie, &self.info);
    }

    /// An HTTPS connection became a WebSocket tunnel to `upstream` (if known).
    pub fn set_websocket(&mut self, upstream: Option<SocketAddr>) {
        self.info.path = PATH_WEBSOCKET;
        if let Some(addr) = upstream {
            self.info.upstream_addr = mapped(addr.ip());
            self.info.upstream_port = addr.port();
        }
        let _ = self.datapath.register_conn(self.cookie, &self.info);
    }

    /// Paths copied in userspace: the byte counts and last activity so far.
    pub fn update(&mut self, bytes_up: u64, bytes_down: u64, last_active_ns: u64) {
        self.info.bytes_up = bytes_up;
        self.info.bytes_down = bytes_down;
        self.info.last_active_ns = last_active_ns;
        let _ = self.datapath.register_conn(self.cookie, &self.info);
    }
}

impl<D: Deref<Target = Datapath>> Drop for Registration<D> {
    fn drop(&mut self) {
        if self.handed_over {
            return;
        }
        self.datapath.forget_conn(self.cookie);
    }
}

/// Address back from the map's IPv6 / IPv4-mapped form; `None` for an entry without one.
pub fn socket_addr(addr: [u8; 16], port: u16) -> Option<SocketAddr> {
    if port == 0 {
        return None;
    }
    let v6 = std::net::Ipv6Addr::from(addr);
    Some(SocketAddr::new(v6.to_canonical(), port))
}
