//! Listening sockets for frontends: a deep accept queue (bursts of reconnecting devices
//! after a hub or network blip arrive together), SO_REUSEADDR for quick restarts, and
//! SO_REUSEPORT so a reload can open the new listener before closing the old one, and
//! several agents on one host can share a port (as HAProxy does by default).

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Accept queue length asked for; the kernel caps it at net.core.somaxconn.
pub const BACKLOG: u32 = 4096;

pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
