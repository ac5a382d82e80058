//! Listening sockets for frontends: a deep accept queue (bursts of reconnecting devices
//! after a hub or network blip arrive together) and SO_REUSEADDR for quick restarts.

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
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}
