//! XDP ingress guard: judges TCP packets to the forwarder's listening ports by source
//! (deny-list, allow-list, per-source SYN rate) before they reach a socket, and counts
//! every verdict by reason. Everything else passes untouched.
//!
//! IPv6 extension headers are walked (up to `XDP_MAX_IPV6_EXT`; a longer chain is
//! dropped, since it could hide TCP from a denied source). Fragments: a first fragment
//! too short for the whole TCP header is dropped; later ones, which carry no port, are
//! judged by source alone. Limit, by design: VLAN tags are not parsed.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use forwarder_common::{
    SynBucket, XDP_MAX_IPV6_EXT, XDP_MAX_PORTS, XDP_MAX_REFILL_NS, XDP_MAX_RULES, XDP_MAX_SOURCES,
    XDP_MAX_SYN_RATE, XDP_NANOS_PER_TOKEN, XdpSettings, xdp_reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{IpProto, Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

#[map(name = "XDP_PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(XDP_MAX_PORTS, 0);

#[map(name = "XDP_ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(XDP_MAX_RULES, 0);
#[map(name = "XDP_DENY_V4")]
static DENY_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(XDP_MAX_RULES, 0);
#[map(name = "XDP_ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(XDP_MAX_RULES, 0);
#[map(name = "XDP_DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(XDP_MAX_RULES, 0);

#[map(name = "XDP_SETTINGS")]
static SETTINGS: Array<XdpSettings> = Array::with_max_entries(1, 0);

#[map(name = "XDP_SYN_BUCKETS")]
static BUCKETS: LruHashMap<[u8; 16], SynBucket> = LruHashMap::with_max_entries(XDP_MAX_SOURCES, 0);

// Per-CPU: plain increments, no 64-bit atomics (which the bpfel core lacks).
#[map(name = "XDP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(xdp_reason::COUNT, 0);

/// Byte offsets in the TCP header: data offset (upper 4 bits, in 32-bit words), flags.
const TCP_DOFF_OFFSET: usize = 12;
const TCP_FLAGS_OFFSET: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

#[xdp]
pub fn xdp_guard(ctx: XdpContext) -> u32 {
    let reason = judge(&ctx);
    if let Some(count) = STATS.get_ptr_mut(reason) {
        // SAFETY: a per-CPU slot of this CPU; XDP runs without preemption on it.
        unsafe { *count += 1 };
    }
    if xdp_reason::is_drop(reason) {
        XDP_DROP
    } else {
        XDP_PASS
    }
}

/// A bounds-checked pointer to a `T` at `offset` in the packet, as the verifier demands.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// A packet's source address: IPv6, or IPv4 mapped into IPv6 (::ffff:a.b.c.d), which is
/// also the key of its SYN bucket. Every byte is set on both paths on purpose: an enum
/// with a 4-byte and a 16-byte variant leaves registers undefined on the IPv4 path, and
/// the verifier rejects the program once the compiler merges the two paths.
struct Source {
    addr: [u8; 16],
    v4: bool,
}

impl Source {
    #[inline(always)]
    fn v4(addr: [u8; 4]) -> Self {
        let [a, b, c, d] = addr;
        Self {
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
            v4: true,
        }
    }

    #[inline(always)]
    fn v6(addr: [u8; 16]) -> Self {
        Self { addr, v4: false }
    }
}

/// Where a packet stands in IP fragmentation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// Not fragmented (or an IPv6 atomic fragment: offset 0, no more to come).
    Whole,
    /// Offset 0, more to come: it must hold the whole TCP header.
    First,
    /// Offset above 0: no TCP header at all, only a source to judge.
    Later,
}

/// What the IP layer says about a packet the guard may judge.
struct Ip {
    source: Source,
    fragment: Fragment,
    /// Offset of the TCP header in the frame (meaningless for `Fragment::Later`).
    tcp_offset: usize,
    /// End of the IP datagram in the frame, from its length field (never past the
    /// frame): Ethernet padding must not pass for a TCP header.
    ip_end: usize,
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> u32 {
    let ip = match parse_ip(ctx) {
        Ok(ip) => ip,
        Err(reason) => return reason,
    };
    if ip.fragment == Fragment::Later {
        return judge_later_fragment(&ip.source);
    }
    let (dest, flags) = match tcp_port_and_flags(ctx, &ip) {
        Ok(found) => found,
        Err(reason) => return reason,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { PORTS.get(dest) }.is_none() {
        return xdp_reason::PASSED_OTHER_PORT;
    }
    judge_source(&ip.source, flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// A fragment after the first has no port and no flags: its source alone decides. A
/// denied or not-allowed source's fragments are dropped whatever port they were sent to
/// (which the guard cannot know); an acceptable source's pass, since the kernel
/// reassembles them only with their first fragment, which is judged in full.
#[inline(always)]
fn judge_later_fragment(source: &Source) -> u32 {
    let reason = judge_source(source, false);
    if reason == xdp_reason::PASSED {
        xdp_reason::PASSED_FRAGMENT
    } else {
        reason
    }
}

#[inline(always)]
fn parse_ip(ctx: &XdpContext) -> Result<Ip, u32> {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Err(xdp_reason::PASSED_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type == EtherType::Ipv4 as u16 {
        parse_ipv4(ctx)
    } else if ether_type == EtherType::Ipv6 as u16 {
        parse_ipv6(ctx)
    } else {
        Err(xdp_reason::PASSED_NOT_TCP)
    }
}

/// IPv4 flags and fragment offset (host order): more-fragments bit, offset in 8 octets.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1fff;

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Result<Ip, u32> {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Err(xdp_reason::PASSED_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    // The kernel reassembles by (source, destination, id, protocol): a fragment that
    // says it is not TCP never becomes part of a TCP segment.
    if ip.proto != IpProto::Tcp as u8 {
        return Err(xdp_reason::PASSED_NOT_TCP);
    }
    let header_len = usize::from(ip.vihl & 0x0f) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(xdp_reason::PASSED_MALFORMED);
    }
    let frags = u16::from_be_bytes(ip.frags);
    let fragment = if frags & IPV4_OFFSET_MASK != 0 {
        Fragment::Later
    } else if frags & IPV4_MORE_FRAGMENTS != 0 {
        Fragment::First
    } else {
        Fragment::Whole
    };
    Ok(Ip {
        source: Source::v4(ip.src_addr),
        fragment,
        tcp_offset: EthHdr::LEN + header_len,
        ip_end: ip_end(ctx, usize::from(u16::from_be_bytes(ip.tot_len))),
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext) -> Result<Ip, u32> {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
        return Err(xdp_reason::PASSED_MALFORMED);
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let (tcp_offset, fragment) = find_tcp_after_ipv6(ctx, ip.next_hdr)?;
    let payload_len = usize::from(u16::from_be_bytes(ip.payload_len));
    Ok(Ip {
        source: Source::v6(ip.src_addr),
        fragment,
        tcp_offset,
        ip_end: ip_end(ctx, Ipv6Hdr::LEN + payload_len),
    })
}

/// Frame offset where an IP datagram of `ip_len` bytes (header included) ends, capped
/// at the frame's end.
#[inline(always)]
fn ip_end(ctx: &XdpContext, ip_len: usize) -> usize {
    let frame_len = ctx.data_end() - ctx.data();
    let end = EthHdr::LEN + ip_len;
    if end < frame_len { end } else { frame_len }
}

/// The destination port (host order) and flags byte of the TCP header at
/// `ip.tcp_offset`, or the reason it cannot be judged. A first fragment must hold the
/// whole header, options included; a whole packet only its fixed part (the stack
/// rejects the rest).
#[inline(always)]
fn tcp_port_and_flags(ctx: &XdpContext, ip: &Ip) -> Result<(u16, u8), u32> {
    let short = if ip.fragment == Fragment::First {
        xdp_reason::DROPPED_TINY_FRAGMENT
    } else {
        xdp_reason::PASSED_MALFORMED
    };
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, ip.tcp_offset) else {
        return Err(short);
    };
    // SAFETY: bounds checked by ptr_at; both bytes lie inside the 20-byte header.
    let (dest, doff_byte, flags) = unsafe {
        let bytes = tcp.cast::<u8>();
        (
            (*tcp).dest,
            *bytes.add(TCP_DOFF_OFFSET),
            *bytes.add(TCP_FLAGS_OFFSET),
        )
    };
    let needed = if ip.fragment == Fragment::First {
        usize::from(doff_byte >> 4) * 4
    } else {
        TcpHdr::LEN
    };
    // A data offset below the fixed header is nonsense; in a first fragment, too short.
    if needed < TcpHdr::LEN || ip.tcp_offset + needed > ip.ip_end {
        return Err(short);
    }
    Ok((u16::from_be_bytes(dest), flags))
}

/// IPv6 next-header values of extension headers with the generic layout (next header,
/// length in 8-octet units less one): hop-by-hop, routing, destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DEST_OPTS: u8 = 60;
/// The fragment header: 8 octets; offset (13 bits) and more-fragments bit in bytes 2-3.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_OFFSET_MASK: u16 = 0xfff8;
const IPV6_MORE_FRAGMENTS: u16 = 0x0001;

/// Walks the IPv6 extension-header chain to the TCP header: its offset and the
/// packet's fragment kind, or why not.
///
/// A fragment after the first is judged whatever its fragment header's next-header
/// field says: the kernel takes the protocol of a reassembled packet from the first
/// fragment alone, so a later one could claim anything.
#[inline(always)]
fn find_tcp_after_ipv6(ctx: &XdpContext, first: u8) -> Result<(usize, Fragment), u32> {
    let mut next = first;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    let mut fragment = Fragment::Whole;
    for _ in 0..XDP_MAX_IPV6_EXT {
        if next == IpProto::Tcp as u8 {
            return Ok((offset, fragment));
        }
        let Some(ext) = ptr_at::<[u8; 4]>(ctx, offset) else {
            // A first fragment must carry the whole chain (RFC 7112).
            return Err(if fragment == Fragment::First {
                xdp_reason::DROPPED_TINY_FRAGMENT
            } else {
                xdp_reason::PASSED_MALFORMED
            });
        };
        // SAFETY: bounds checked by ptr_at.
        let ext = unsafe { *ext };
        if next == IPV6_FRAGMENT {
            let frag = u16::from_be_bytes([ext[2], ext[3]]);
            if frag & IPV6_OFFSET_MASK != 0 {
                return Ok((offset, Fragment::Later));
            }
            if frag & IPV6_MORE_FRAGMENTS != 0 {
                fragment = Fragment::First;
            }
            offset += 8;
        } else if next == IPV6_HOP_BY_HOP || next == IPV6_ROUTING || next == IPV6_DEST_OPTS {
            offset += (usize::from(ext[1]) + 1) * 8;
        } else {
            // UDP, ICMPv6, ESP, no next header...: not TCP.
            return Err(xdp_reason::PASSED_NOT_TCP);
        }
        next = ext[0];
    }
    if next == IpProto::Tcp as u8 {
        return Ok((offset, fragment));
    }
    if next == IPV6_FRAGMENT
        || next == IPV6_HOP_BY_HOP
        || next == IPV6_ROUTING
        || next == IPV6_DEST_OPTS
    {
        return Err(xdp_reason::DROPPED_UNPARSEABLE);
    }
    Err(xdp_reason::PASSED_NOT_TCP)
}

#[inline(always)]
fn judge_source(source: &Source, syn: bool) -> u32 {
    let addr = &source.addr;
    let (denied, allowed) = if source.v4 {
        let prefix = Key::new(32, [addr[12], addr[13], addr[14], addr[15]]);
        (
            DENY_V4.get(&prefix).is_some(),
            ALLOW_V4.get(&prefix).is_some(),
        )
    } else {
        let prefix = Key::new(128, *addr);
        (
            DENY_V6.get(&prefix).is_some(),
            ALLOW_V6.get(&prefix).is_some(),
        )
    };
    if denied {
        return xdp_reason::DROPPED_DENY;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return xdp_reason::PASSED;
    };
    if settings.allow_list_on != 0 && !allowed {
        return xdp_reason::DROPPED_NOT_ALLOWED;
    }
    if syn && settings.syn_burst != 0 && !take_token(addr, settings) {
        return xdp_reason::DROPPED_SYN_RATE;
    }
    xdp_reason::PASSED
}

/// Takes one SYN token from `source`'s bucket; false when it is empty.
///
/// The read-modify-write below is not atomic: two CPUs judging SYNs from the same source
/// at the same instant may both see the same token. That race only ever lets a SYN or two
/// more through, never drops a legitimate one, and needs no lock in the fast path.
#[inline(always)]
fn take_token(source: &[u8; 16], settings: &XdpSettings) -> bool {
    // SAFETY: plain helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let rate = min(settings.syn_rate_per_sec, XDP_MAX_SYN_RATE);
    let full = min(settings.syn_burst, XDP_MAX_SYN_RATE) * XDP_NANOS_PER_TOKEN;
    let Some(bucket) = BUCKETS.get_ptr_mut(source) else {
        // First SYN seen from this source: a full bucket, less this SYN.
        let fresh = SynBucket {
            nano_tokens: full - XDP_NANOS_PER_TOKEN,
            last_ns: now,
        };
        // If the insert fails the source simply starts again with a full bucket next time.
        let _ = BUCKETS.insert(source, fresh, 0);
        return true;
    };
    // SAFETY: the pointer comes from a successful lookup; see the race note above.
    let bucket = unsafe { &mut *bucket };
    // Saturating: another CPU may have stored a slightly later time.
    let elapsed = min(now.saturating_sub(bucket.last_ns), XDP_MAX_REFILL_NS);
    let tokens = min(bucket.nano_tokens + elapsed * rate, full);
    bucket.last_ns = now;
    if tokens >= XDP_NANOS_PER_TOKEN {
        bucket.nano_tokens = tokens - XDP_NANOS_PER_TOKEN;
        true
    } else {
        bucket.nano_tokens = tokens;
        false
    }
}

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b { a } else { b }
}
