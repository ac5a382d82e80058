//! XDP ingress guard: judges TCP packets to the forwarder's listening ports by source
//! (deny-list, allow-list, per-source SYN rate) before they reach a socket, and counts
//! every verdict by reason. Everything else passes untouched.
//!
//! IPv6 extension headers are walked (up to `XDP_MAX_IPV6_EXT`; a longer chain is
//! dropped, since it could hide TCP from a denied source). Limits, by design: VLAN tags
//! are not parsed, and fragments after the first pass unjudged (they carry no port).

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

enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

#[inline(always)]
fn judge(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return xdp_reason::PASSED_MALFORMED;
    };
    // SAFETY: bounds checked by ptr_at.
    let ether_type = unsafe { (*eth).ether_type };
    let (source, tcp_offset) = if ether_type == EtherType::Ipv4 as u16 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
            return xdp_reason::PASSED_MALFORMED;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        if ip.proto != IpProto::Tcp as u8 || ip.frag_offset() != 0 {
            return xdp_reason::PASSED_NOT_TCP;
        }
        let header_len = usize::from(ip.vihl & 0x0f) * 4;
        if header_len < Ipv4Hdr::LEN {
            return xdp_reason::PASSED_MALFORMED;
        }
        (Source::V4(ip.src_addr), EthHdr::LEN + header_len)
    } else if ether_type == EtherType::Ipv6 as u16 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN) else {
            return xdp_reason::PASSED_MALFORMED;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let tcp_offset = match find_tcp_after_ipv6(ctx, ip.next_hdr) {
            Ok(offset) => offset,
            Err(reason) => return reason,
        };
        (Source::V6(ip.src_addr), tcp_offset)
    } else {
        return xdp_reason::PASSED_NOT_TCP;
    };
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, tcp_offset) else {
        return xdp_reason::PASSED_MALFORMED;
    };
    // SAFETY: bounds checked by ptr_at; the flags byte lies inside the 20-byte header.
    let (dest, flags) = unsafe { ((*tcp).dest, *tcp.cast::<u8>().add(TCP_FLAGS_OFFSET)) };
    // SAFETY: the value is only tested for presence.
    if unsafe { PORTS.get(u16::from_be_bytes(dest)) }.is_none() {
        return xdp_reason::PASSED_OTHER_PORT;
    }
    judge_source(&source, flags & (TCP_SYN | TCP_ACK) == TCP_SYN)
}

/// IPv6 next-header values of extension headers with the generic layout (next header,
/// length in 8-octet units less one): hop-by-hop, routing, destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_DEST_OPTS: u8 = 60;
/// The fragment header: 8 octets; the offset field says whether this is the first.
const IPV6_FRAGMENT: u8 = 44;

/// Walks the IPv6 extension-header chain to the TCP header; its offset, or why not.
#[inline(always)]
fn find_tcp_after_ipv6(ctx: &XdpContext, first: u8) -> Result<usize, u32> {
    let mut next = first;
    let mut offset = EthHdr::LEN + Ipv6Hdr::LEN;
    for _ in 0..XDP_MAX_IPV6_EXT {
        if next == IpProto::Tcp as u8 {
            return Ok(offset);
        }
        let Some(ext) = ptr_at::<[u8; 4]>(ctx, offset) else {
            return Err(xdp_reason::PASSED_MALFORMED);
        };
        // SAFETY: bounds checked by ptr_at.
        let ext = unsafe { *ext };
        if next == IPV6_FRAGMENT {
            // Offset (13 bits) in the upper bits of bytes 2-3: non-zero is a later
            // fragment, which carries no TCP header to judge.
            if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                return Err(xdp_reason::PASSED_NOT_TCP);
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
        return Ok(offset);
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
    let (denied, allowed, key) = match source {
        Source::V4(addr) => {
            let prefix = Key::new(32, *addr);
            let mut mapped = [0u8; 16];
            mapped[10] = 0xff;
            mapped[11] = 0xff;
            mapped[12..].copy_from_slice(addr);
            (
                DENY_V4.get(&prefix).is_some(),
                ALLOW_V4.get(&prefix).is_some(),
                mapped,
            )
        }
        Source::V6(addr) => {
            let prefix = Key::new(128, *addr);
            (
                DENY_V6.get(&prefix).is_some(),
                ALLOW_V6.get(&prefix).is_some(),
                *addr,
            )
        }
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
    if syn && settings.syn_burst != 0 && !take_token(&key, settings) {
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
