//! Types and names shared by the eBPF programs and the userspace agent.
//!
//! Every struct here is `#[repr(C)]` with explicit padding so the kernel and
//! userspace agree on its layout byte for byte; a `const` assertion pins each size.
#![no_std]

/// Names of the maps and programs in the eBPF object, used by the loader and the CLI.
pub mod names {
    /// SockHash: socket cookie -> socket. Every spliced socket lives here.
    pub const SOCKS: &str = "FWD_SOCKS";
    /// HashMap: socket cookie -> [`super::PeerLink`], written by userspace only.
    pub const LINKS: &str = "FWD_LINKS";
    /// HashMap: socket cookie -> [`super::SockCounters`], written by the kernel only.
    pub const COUNTERS: &str = "FWD_COUNTERS";
    /// The sk_skb stream verdict program that splices a socket to its peer.
    pub const VERDICT: &str = "splice_verdict";
    /// Where the agent pins its maps: `<PIN_ROOT>/<instance>/<map name>`.
    pub const PIN_ROOT: &str = "/sys/fs/bpf/forwarder";
}

/// Upper bound of sockets (two per spliced connection) the maps hold.
pub const MAX_SPLICED_SOCKETS: u32 = 65_536;

/// `PeerLink::mode`: redirect this socket's incoming bytes to its peer in the kernel.
pub const MODE_KERNEL: u32 = 0;
/// `PeerLink::mode`: hand this socket's incoming bytes to userspace (SK_PASS), which
/// copies them with backpressure. (A peer that falls behind is handled by the lag
/// budget, `PeerLink::redirect_limit`, which has the same effect per segment.)
pub const MODE_USERSPACE: u32 = 1;

/// Which socket a socket forwards to, and how. Owned by userspace: the kernel only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerLink {
    /// Socket cookie of the peer (the key of the peer in `FWD_SOCKS`).
    pub peer_cookie: u64,
    /// The lag budget, enforced per segment: redirect only while `redirected_bytes` stays
    /// at or below this. Userspace keeps it at (bytes the peer has sent on) + max lag, so
    /// a peer that stops reading cannot make the kernel queue more than that. Past it the
    /// verdict passes to userspace (where TCP flow control applies). `NO_LIMIT`: none.
    pub redirect_limit: u64,
    /// Redirect only while `SockCounters::passed_bytes` equals this: once a byte has gone
    /// to userspace, later bytes must follow it there, or the order breaks. Userspace
    /// moves the mark up when it has copied every passed byte and the kernel path may
    /// resume (see the session's resume hand-over).
    pub passed_mark: u64,
    /// `MODE_KERNEL` or `MODE_USERSPACE`.
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<PeerLink>() == 32);

/// `PeerLink::redirect_limit` without a budget.
pub const NO_LIMIT: u64 = u64::MAX;

/// What the verdict program did with one socket's incoming bytes. Owned by the kernel:
/// userspace creates the entry zeroed before the socket enters the map, then only reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockCounters {
    /// Bytes received on this socket and redirected to the peer's send queue in the kernel.
    pub redirected_bytes: u64,
    /// Socket buffers (segments, possibly coalesced) redirected.
    pub redirected_segments: u64,
    /// Bytes passed to this socket's own receive queue for userspace to copy (peer missing,
    /// mode `MODE_USERSPACE`, or lag budget spent). While it differs from
    /// `PeerLink::passed_mark`, every later byte is passed too, so the order is kept.
    pub passed_bytes: u64,
    pub passed_segments: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last verdict on this socket.
    pub last_active_ns: u64,
    /// Times the verdict found the lag budget spent and switched to passing.
    pub over_budget: u64,
}
const _: () = assert!(core::mem::size_of::<SockCounters>() == 48);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: both are repr(C), made only of integers, with no implicit padding.
    unsafe impl aya::Pod for super::PeerLink {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockCounters {}
}
