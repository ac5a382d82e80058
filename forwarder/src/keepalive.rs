//! TCP keepalive towards devices and hubs: the one type for the setting, and the one way
//! it is put on a socket.

use std::os::fd::BorrowedFd;

use crate::log_limit::LogLimit;
use crate::sys;

/// TCP keepalive of a frontend's sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Seconds of silence before the first probe (`tcp_keepalive_secs`).
    pub idle: u32,
    /// Seconds between probes.
    pub interval: u32,
    /// Unanswered probes before the kernel drops the connection.
    pub probes: u32,
}

impl Keepalive {
    /// Probes go every 30 s once the idle time has passed...
    pub const INTERVAL_SECS: u32 = 30;
    /// ...and four unanswered ones end the connection (two minutes for a dead peer).
    pub const PROBES: u32 = 4;

    /// The keepalive for `tcp_keepalive_secs = idle_secs` (0: off).
    pub fn after_idle(idle_secs: u32) -> Option<Self> {
        (idle_secs > 0).then_some(Self {
            idle: idle_secs,
            interval: Self::INTERVAL_SECS,
            probes: Self::PROBES,
        })
    }
}

/// Turns `keepalive` on for `socket` (a listener passes it on to what it accepts). A
/// failure is logged, at most every few seconds, and the connection goes on without it.
pub fn set_keepalive_or_warn(socket: BorrowedFd<'_>, keepalive: Option<Keepalive>) {
    static LOG: LogLimit = LogLimit::new();
    let Some(k) = keepalive else {
        return;
    };
    if let Err(err) = sys::set_keepalive(socket, k.idle, k.interval, k.probes)
        && let Some(suppressed) = LOG.allow()
    {
        tracing::warn!(%err, suppressed, "could not set TCP keepalive");
    }
}
