//! Lists each L4 connection in the pinned `FWD_CONNS` map while it lives, so
//! `forwarder conns` can show who is connected to whom, on which path.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

use forwarder_common::{ConnInfo, PATH_KERNEL, PATH_USERSPACE};
use tokio::net::TcpStream;

use crate::ebpf::{Datapath, padded_name};
use crate::sys;

/// A connection's entry; removed again when this is dropped.
pub struct Registration<'a> {
    datapath: &'a Datapath,
    cookie: u64,
    info: ConnInfo,
}

fn mapped(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

impl<'a> Registration<'a> {
    /// Lists the pair; `None` if the map is full or a socket is gone (the connection is
    /// served all the same, only not listed).
    pub fn new(
        datapath: &'a Datapath,
        frontend: &str,
        client: &TcpStream,
        upstream: &TcpStream,
        kernel: bool,
    ) -> Option<Self> {
        let client_addr = client.peer_addr().ok()?;
        let upstream_addr = upstream.peer_addr().ok()?;
        let cookie = sys::socket_cookie(client.as_fd()).ok()?;
        let upstream_cookie = sys::socket_cookie(upstream.as_fd()).ok()?;
        let now = sys::monotonic_ns();
        let info = ConnInfo {
            client_addr: mapped(client_addr.ip()),
            upstream_addr: mapped(upstream_addr.ip()),
            client_port: client_addr.port(),
            upstream_port: upstream_addr.port(),
            path: if kernel { PATH_KERNEL } else { PATH_USERSPACE },
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
            }),
            Err(err) => {
                tracing::debug!(%err, "connection not listed for `forwarder conns`");
                None
            }
        }
    }

    /// The kernel could not take the pair after all: it is served in userspace.
    pub fn set_userspace(&mut self) {
        self.info.path = PATH_USERSPACE;
        let _ = self.datapath.register_conn(self.cookie, &self.info);
    }

    /// Userspace path: the byte counts and last activity so far.
    pub fn update(&mut self, bytes_up: u64, bytes_down: u64, last_active_ns: u64) {
        self.info.bytes_up = bytes_up;
        self.info.bytes_down = bytes_down;
        self.info.last_active_ns = last_active_ns;
        let _ = self.datapath.register_conn(self.cookie, &self.info);
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.datapath.forget_conn(self.cookie);
    }
}

/// Address back from the map's IPv6 / IPv4-mapped form.
pub fn socket_addr(addr: [u8; 16], port: u16) -> SocketAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    SocketAddr::new(v6.to_canonical(), port)
}
