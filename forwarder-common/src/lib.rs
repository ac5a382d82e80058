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
    /// HashMap: client socket cookie -> [`super::ConnInfo`], written by userspace only:
    /// what `forwarder conns` lists.
    pub const CONNS: &str = "FWD_CONNS";
    /// HashMap: [`super::StatKey`] -> u64, written by userspace only (every second): what
    /// `forwarder stats` shows.
    pub const STATS: &str = "FWD_STATS";
    /// RingBuf of [`super::SpliceEvent`]: the verdict tells the agent when a spliced
    /// socket needs it (bytes passed to userspace, lag budget half spent, a broken stream).
    /// The agent never polls spliced sockets for data: these events and hang-ups are all
    /// that wake it.
    pub const EVENTS: &str = "FWD_EVENTS";
    /// The sk_skb stream verdict program that splices a socket to its peer.
    pub const VERDICT: &str = "splice_verdict";
    /// Where the agent pins its maps: `<PIN_ROOT>/<instance>/<map name>`.
    pub const PIN_ROOT: &str = "/sys/fs/bpf/forwarder";

    /// The XDP ingress guard program (in its own object, see `forwarder::xdp`).
    pub const XDP_GUARD: &str = "xdp_guard";
    /// HashMap: TCP port (host order) -> 1. Only TCP to these ports is judged.
    pub const XDP_PORTS: &str = "XDP_PORTS";
    /// LpmTrie: IPv4 prefix -> 1. Sources allowed when the allow-list is on.
    pub const XDP_ALLOW_V4: &str = "XDP_ALLOW_V4";
    /// LpmTrie: IPv4 prefix -> 1. Sources always dropped.
    pub const XDP_DENY_V4: &str = "XDP_DENY_V4";
    /// LpmTrie: IPv6 prefix -> 1.
    pub const XDP_ALLOW_V6: &str = "XDP_ALLOW_V6";
    /// LpmTrie: IPv6 prefix -> 1.
    pub const XDP_DENY_V6: &str = "XDP_DENY_V6";
    /// Array of one [`super::XdpSettings`], written by userspace only.
    pub const XDP_SETTINGS: &str = "XDP_SETTINGS";
    /// LruHashMap: source address (IPv4 mapped into IPv6) -> [`super::SynBucket`].
    pub const XDP_SYN_BUCKETS: &str = "XDP_SYN_BUCKETS";
    /// PerCpuArray: [`super::xdp_reason`] index -> packets.
    pub const XDP_STATS: &str = "XDP_STATS";

    /// The transparent-mode sk_lookup program (in its own object, see
    /// `forwarder::transparent`).
    pub const TP_STEER: &str = "transparent_steer";
    /// SockMap: slot -> a transparent frontend's listening socket.
    pub const TP_LISTENERS: &str = "TP_LISTENERS";
    /// HashMap: intercepted destination port (host order) -> slot in `TP_LISTENERS`.
    pub const TP_PORTS: &str = "TP_PORTS";
    /// LpmTrie: [slot (big endian) | destination, IPv4 mapped into IPv6] -> 1: the
    /// destinations each slot intercepts (`::/0` under the slot when unrestricted).
    pub const TP_DESTS: &str = "TP_DESTS";
    /// PerCpuArray: [`super::tp_reason`] index -> connections.
    pub const TP_STATS: &str = "TP_STATS";
}

/// Upper bound of sockets (two per spliced connection) the maps hold.
pub const MAX_SPLICED_SOCKETS: u32 = 65_536;

/// Which socket a socket forwards to, and how. Owned by userspace: the kernel only reads it.
/// Userspace never lowers a field (see `SockCounters::link`).
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
    /// When `redirected_bytes` reaches this, the verdict sends one
    /// [`splice_event::REFRESH`] so the agent moves the budget along (it does not watch
    /// a healthy direction otherwise). Userspace keeps it at half a budget below
    /// `redirect_limit`.
    pub refresh_at: u64,
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
    /// Bytes passed to this socket's own receive queue for userspace to copy (peer missing
    /// or lag budget spent). While it differs from
    /// `PeerLink::passed_mark`, every later byte is passed too, so the order is kept.
    pub passed_bytes: u64,
    pub passed_segments: u64,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE: within a jiffy of
    /// CLOCK_MONOTONIC, and cheaper per segment) of the last verdict on this socket.
    pub last_active_ns: u64,
    /// Times the verdict found the lag budget spent and switched to passing.
    pub over_budget: u64,
    /// Bytes cut from the front of segments that repeated bytes the verdict had already
    /// seen. TCP queues a retransmitted segment that partly overlaps received data whole
    /// (its reader skips the overlap by sequence number), but the kernel hands the verdict
    /// whole segments, so without the cut those bytes would be forwarded twice.
    pub trimmed_bytes: u64,
    pub trimmed_segments: u64,
    /// Segments whose repeated bytes could not be cut, so the verdict dropped them: the
    /// stream is broken and the agent resets the connection.
    pub stream_errors: u64,
    /// TCP sequence number just past the last byte the verdict has seen, valid once
    /// `seq_known` is 1 (from the first segment on).
    pub next_seq: u32,
    pub seq_known: u32,
    /// Events the verdict could not put in `FWD_EVENTS` (ring full). The agent's coarse
    /// safety tick still finds what they would have reported, only later.
    pub events_lost: u64,
    /// The verdict's copy of this socket's `PeerLink`, so a segment costs one map lookup,
    /// not two. Sound because userspace only ever raises a link's limit, mark and refresh
    /// mark (the peer never changes): a stale copy can only be too strict, and the verdict
    /// reads `FWD_LINKS` again whenever the copy would stop it (a passed byte, a spent
    /// budget, a refresh mark reached). All zero until the first segment.
    pub link: PeerLink,
}
const _: () = assert!(core::mem::size_of::<SockCounters>() == 120);

/// One record in `FWD_EVENTS`: socket `cookie` needs the agent's attention.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpliceEvent {
    pub cookie: u64,
    /// One of [`splice_event`].
    pub kind: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SpliceEvent>() == 16);

/// Why the verdict woke the agent (`SpliceEvent::kind`).
pub mod splice_event {
    /// The first byte since the passed mark went to the socket's own receive queue (lag
    /// budget spent, or the peer is missing): userspace must copy it, and every later
    /// byte, until it hands the direction back.
    pub const PASSING: u32 = 1;
    /// `redirected_bytes` reached `PeerLink::refresh_at`: move the lag budget along.
    pub const REFRESH: u32 = 2;
    /// A segment could not be made exact and was dropped: reset the connection.
    pub const STREAM_ERROR: u32 = 3;
}

/// Bytes of the `FWD_EVENTS` ring (a power of two, whole pages): about 10,000 events
/// that the agent has not read yet.
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// `ConnInfo::path`: bytes move in the kernel (sockmap redirect).
pub const PATH_KERNEL: u8 = 0;
/// `ConnInfo::path`: bytes are copied by the agent (fallback).
pub const PATH_USERSPACE: u8 = 1;
/// `ConnInfo::path`: a client connection of a terminating HTTPS frontend (requests go
/// over pooled upstream connections).
pub const PATH_HTTPS: u8 = 2;
/// `ConnInfo::path`: an HTTPS connection upgraded to a WebSocket tunnel.
pub const PATH_WEBSOCKET: u8 = 3;

/// Longest frontend or counter name the inspection maps keep (NUL-padded).
pub const NAME_LEN: usize = 32;

/// One connection of an L4 frontend, for `forwarder conns`. Written by the agent when the
/// connection starts (and, for the userspace path, its byte counts every second); removed
/// when it ends. Kernel-path byte counts and activity come from `FWD_COUNTERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// IPv6, or IPv4-mapped IPv6 (::ffff:a.b.c.d).
    pub client_addr: [u8; 16],
    pub upstream_addr: [u8; 16],
    pub client_port: u16,
    pub upstream_port: u16,
    /// `PATH_KERNEL`, `PATH_USERSPACE`, `PATH_HTTPS` or `PATH_WEBSOCKET`.
    pub path: u8,
    pub _pad: [u8; 3],
    /// Cookie of the agent's upstream socket (key of its `FWD_COUNTERS` entry); 0 without
    /// one upstream socket (HTTPS).
    pub upstream_cookie: u64,
    /// CLOCK_MONOTONIC when the connection was accepted.
    pub started_ns: u64,
    /// Paths copied in userspace: bytes client -> upstream, upstream -> client, last
    /// activity. For HTTPS: bytes on the client's connection, TLS included.
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub last_active_ns: u64,
    /// Frontend name, NUL-padded.
    pub frontend: [u8; NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<ConnInfo>() == 112);

/// Key of one counter of one frontend in `FWD_STATS`: both names NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    pub frontend: [u8; NAME_LEN],
    pub counter: [u8; NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<StatKey>() == 64);

/// Entries `FWD_STATS` holds: frontends x counters.
pub const MAX_STATS: u32 = 8192;

/// Ports the XDP guard can protect (one per frontend).
pub const XDP_MAX_PORTS: u32 = 256;
/// Prefixes per allow or deny list and address family.
pub const XDP_MAX_RULES: u32 = 16_384;
/// Sources whose SYN rate is tracked at once; the least recently seen are evicted.
pub const XDP_MAX_SOURCES: u32 = 65_536;
/// Upper bound of `XdpSettings::syn_rate_per_sec` and `syn_burst`, so the token
/// arithmetic (in nano-tokens) cannot overflow a u64.
pub const XDP_MAX_SYN_RATE: u64 = 1_000_000;
/// Refill at most this much idle time at once (1000 s): with the rate bound above,
/// `elapsed * rate` stays below 2^63.
pub const XDP_MAX_REFILL_NS: u64 = 1_000_000_000_000;
/// One SYN costs this many nano-tokens: integer token-bucket arithmetic without division.
pub const XDP_NANOS_PER_TOKEN: u64 = 1_000_000_000;

/// IPv6 extension headers the XDP guard walks to find TCP (real traffic uses zero to
/// two; a longer chain is dropped, see `xdp_reason::DROPPED_UNPARSEABLE`).
pub const XDP_MAX_IPV6_EXT: usize = 6;

/// Transparent frontends (and so listener slots) one agent can have.
pub const TP_MAX_LISTENERS: u32 = 64;
/// Intercepted destination ports, all transparent frontends together.
pub const TP_MAX_PORTS: u32 = 256;
/// Destination prefixes, all transparent frontends together.
pub const TP_MAX_DESTS: u32 = 4_096;
/// Bytes of a `TP_DESTS` key's data: the slot (4) and the address as IPv6 (16).
pub const TP_DEST_KEY_LEN: usize = 20;

/// What the transparent steering did with a connection: the index into `TP_STATS`.
pub mod tp_reason {
    /// A SYN to an intercepted port and destination, handed to the agent's listener.
    pub const STEERED: u32 = 0;
    /// Intercepted, but the listener was missing or refused (the kernel's own lookup
    /// went on: normally a reset).
    pub const ASSIGN_FAILED: u32 = 1;
    pub const COUNT: u32 = 2;
}

/// Why the XDP guard passed or dropped a packet: the index into `XDP_STATS`.
pub mod xdp_reason {
    /// TCP to a protected port from an acceptable source, within its SYN rate.
    pub const PASSED: u32 = 0;
    /// Source matched the deny-list.
    pub const DROPPED_DENY: u32 = 1;
    /// The allow-list is on and the source is not on it.
    pub const DROPPED_NOT_ALLOWED: u32 = 2;
    /// A SYN beyond the source's token bucket.
    pub const DROPPED_SYN_RATE: u32 = 3;
    /// TCP to a port no frontend listens on: not judged.
    pub const PASSED_OTHER_PORT: u32 = 4;
    /// Not TCP over IPv4/IPv6 (ARP, ICMP, UDP and their fragments).
    pub const PASSED_NOT_TCP: u32 = 5;
    /// Too short to hold the headers it announces: left for the stack to reject.
    pub const PASSED_MALFORMED: u32 = 6;
    /// IPv6 with a longer extension-header chain than the guard walks
    /// (`XDP_MAX_IPV6_EXT`): it could hide TCP from a denied source, so it is dropped.
    pub const DROPPED_UNPARSEABLE: u32 = 7;
    /// A TCP fragment after the first (no port, no flags) from an acceptable source. Such
    /// fragments are judged by source alone: the kernel reassembles them only with a
    /// first fragment, which is judged in full.
    pub const PASSED_FRAGMENT: u32 = 8;
    /// A first fragment (offset 0, more to come) too short to hold the whole TCP header,
    /// options included: its port and flags could hide in a later fragment (RFC 1858's
    /// tiny-fragment attack), and no real stack sends one.
    pub const DROPPED_TINY_FRAGMENT: u32 = 9;
    /// Entries in `XDP_STATS`.
    pub const COUNT: u32 = 10;
    /// Names for display, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "passed",
        "dropped_deny",
        "dropped_not_allowed",
        "dropped_syn_rate",
        "passed_other_port",
        "passed_not_tcp",
        "passed_malformed",
        "dropped_unparseable",
        "passed_fragment",
        "dropped_tiny_fragment",
    ];

    /// Whether the packet counted under `reason` was dropped.
    pub const fn is_drop(reason: u32) -> bool {
        matches!(
            reason,
            DROPPED_DENY
                | DROPPED_NOT_ALLOWED
                | DROPPED_SYN_RATE
                | DROPPED_UNPARSEABLE
                | DROPPED_TINY_FRAGMENT
        )
    }
}

/// The XDP guard's settings. Owned by userspace: the kernel only reads entry 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpSettings {
    /// Tokens (SYNs) added per second to each source's bucket.
    pub syn_rate_per_sec: u64,
    /// Bucket size; 0 turns the SYN limit off.
    pub syn_burst: u64,
    /// Non-zero: sources that match no allow prefix (of either family) are dropped.
    pub allow_list_on: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<XdpSettings>() == 24);

/// One source's SYN token bucket. Owned by the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens left, in units of 1/`XDP_NANOS_PER_TOKEN` SYN.
    pub nano_tokens: u64,
    /// `bpf_ktime_get_ns()` of the last refill.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<SynBucket>() == 16);

#[cfg(feature = "user")]
#[allow(unsafe_code)] // `Pod` is an unsafe trait: each impl states why the type qualifies
mod pod {
    // SAFETY: repr(C), made only of integers and byte arrays, padding explicit.
    unsafe impl aya::Pod for super::ConnInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StatKey {}
    // SAFETY: both are repr(C), made only of integers, with no implicit padding.
    unsafe impl aya::Pod for super::PeerLink {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockCounters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SpliceEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::XdpSettings {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SynBucket {}
}
