//! Listening sockets for frontends: a deep accept queue (bursts of reconnecting devices
//! after a hub or network blip arrive together), SO_REUSEADDR for quick restarts, and
//! SO_REUSEPORT so a reload can open the new listener before closing the old one, and
//! several agents on one host can share a port (as HAProxy does by default).

use std::io;
use std::net::SocketAddr;

use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

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

/// The next connection, or `None` once `shutdown` says stop. Accept errors (EMFILE and
/// friends) are logged and retried after a short pause instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    frontend: &str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(err) => {
                    tracing::warn!(%frontend, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}
