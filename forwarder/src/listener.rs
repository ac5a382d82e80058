//! Listening sockets for frontends: a deep accept queue (bursts of reconnecting devices
//! after a hub or network blip arrive together), SO_REUSEADDR for quick restarts, and
//! SO_REUSEPORT so a reload can open the new listener before closing the old one, and
//! several agents on one host can share a port (as HAProxy does by default).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;

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

/// The next connection, or `None` once `shutdown` says stop and the accept queue is
/// empty. Accept errors (EMFILE and friends) are logged and retried after a short pause
/// instead of spinning.
pub async fn accept(
    listener: &TcpListener,
    shutdown: &mut watch::Receiver<bool>,
    frontend: &str,
) -> Option<(TcpStream, SocketAddr)> {
    if *shutdown.borrow() {
        return accept_queued(listener, frontend);
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => return Some(accepted),
                Err(err) => {
                    tracing::warn!(%frontend, %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return accept_queued(listener, frontend),
        }
    }
}

/// A connection already in the accept queue of a listener about to close, or `None`:
/// closing a listener resets what it queued, so a stopping frontend serves its queue
/// first (and `tcp_migrate_req` moves what arrives after, see `enable_migration`).
fn accept_queued(listener: &TcpListener, frontend: &str) -> Option<(TcpStream, SocketAddr)> {
    let queued = crate::sys::accept_now(listener.as_fd()).and_then(|stream| {
        let Some(stream) = stream else {
            return Ok(None);
        };
        let peer = stream.peer_addr()?;
        Ok(Some((TcpStream::from_std(stream)?, peer)))
    });
    match queued {
        Ok(queued) => queued,
        Err(err) => {
            tracing::debug!(%frontend, %err, "accepting a queued connection at stop failed");
            None
        }
    }
}

/// `net.ipv4.tcp_migrate_req`: when a listener closes, the kernel moves the connections
/// still being set up or queued on it to another listener of its `SO_REUSEPORT` group
/// (the one a reload or an upgrade has just opened) instead of resetting them. A
/// setting of the network namespace; needs root, so the agent sets it at start-up.
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

pub fn enable_migration() {
    match std::fs::read_to_string(MIGRATE_REQ) {
        Ok(value) if value.trim() == "1" => {}
        Ok(_) => match std::fs::write(MIGRATE_REQ, "1") {
            Ok(()) => tracing::info!(
                "net.ipv4.tcp_migrate_req = 1: a replaced listener hands its queued \
                 connections over instead of resetting them"
            ),
            Err(err) => tracing::warn!(
                %err,
                "could not set net.ipv4.tcp_migrate_req = 1: a reload may reset connections \
                 that arrive while a listener is replaced (set it with sysctl)"
            ),
        },
        Err(err) => tracing::debug!(%err, "no net.ipv4.tcp_migrate_req (kernel < 5.14)"),
    }
}
