//! systemd's readiness protocol (`sd_notify`), for `Type=notify` units: `READY=1` once
//! serving, and `MAINPID=` when `forwarder upgrade` hands the service to a new process.
//! Without `NOTIFY_SOCKET` (not under systemd) every call does nothing.

use std::os::unix::net::UnixDatagram;

fn send(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        // An abstract socket is named with a leading '@'.
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt as _;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(state.as_bytes(), &addr)
        } else {
            socket.send_to(state.as_bytes(), &path)
        }
    });
    if let Err(err) = sent {
        tracing::warn!(%err, state, "could not notify systemd");
    }
}

/// The agent serves.
pub fn ready() {
    send(&format!("READY=1\nMAINPID={}", std::process::id()));
}

/// The service's main process is now `pid` (an upgrade's new agent).
pub fn main_pid(pid: u32) {
    send(&format!("MAINPID={pid}"));
}
