//! Transparent mode's steering: an `sk_lookup` program that hands a TCP connection for an
//! intercepted destination (port, and optionally prefix) to the agent's listener, whatever
//! address that listener is bound to. The policy routing the agent installs makes the
//! forwarded traffic local first (sk_lookup runs only for packets delivered locally);
//! this program then picks the socket. Everything else passes to the kernel's own lookup.

use aya_ebpf::{
    bindings::sk_action::SK_PASS,
    macros::{map, sk_lookup},
    maps::{HashMap, LpmTrie, PerCpuArray, SockMap, lpm_trie::Key},
    programs::SkLookupContext,
};
use forwarder_common::{TP_DEST_KEY_LEN, TP_MAX_DESTS, TP_MAX_LISTENERS, TP_MAX_PORTS, tp_reason};

#[map(name = "TP_LISTENERS")]
static LISTENERS: SockMap = SockMap::with_max_entries(TP_MAX_LISTENERS, 0);

#[map(name = "TP_PORTS")]
static PORTS: HashMap<u16, u32> = HashMap::with_max_entries(TP_MAX_PORTS, 0);

#[map(name = "TP_DESTS")]
static DESTS: LpmTrie<[u8; TP_DEST_KEY_LEN], u8> = LpmTrie::with_max_entries(TP_MAX_DESTS, 0);

// Per-CPU: plain increments, no 64-bit atomics (which the bpfel core lacks).
#[map(name = "TP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(tp_reason::COUNT, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;
/// The loopback device's index, the same in every network namespace. Connections that
/// arrive on it are the host's own (the agent's upstream connection among them): never
/// steered, or the agent would connect to itself.
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn transparent_steer(ctx: SkLookupContext) -> u32 {
    if let Some(slot) = intercepted(&ctx) {
        let reason = match LISTENERS.redirect_sk_lookup(&ctx, slot, 0) {
            Ok(()) => tp_reason::STEERED,
            Err(_) => tp_reason::ASSIGN_FAILED,
        };
        if let Some(count) = STATS.get_ptr_mut(reason) {
            // SAFETY: a per-CPU slot of this CPU; the program runs without preemption on it.
            unsafe { *count += 1 };
        }
    }
    SK_PASS
}

/// The listener slot for this lookup, if its destination is intercepted.
fn intercepted(ctx: &SkLookupContext) -> Option<u32> {
    // SAFETY: the context is the kernel's bpf_sk_lookup; the verifier checks each load.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != IPPROTO_TCP || lookup.ingress_ifindex == LOOPBACK_IFINDEX {
        return None;
    }
    let port = u16::try_from(lookup.local_port).ok()?;
    // SAFETY: a plain read of a hash map value that userspace writes whole.
    let slot = unsafe { *PORTS.get(port)? };
    // Each context field is read once, at its fixed offset: the verifier refuses a load
    // through a context pointer the compiler has moved (as a shared IPv4/IPv6 path would).
    let ctx_ptr = ctx.lookup;
    // SAFETY: reads of bpf_sk_lookup fields the verifier allows for this program type.
    let (ip4, ip6) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx_ptr).local_ip4),
            [
                core::ptr::read_volatile(&raw const (*ctx_ptr).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ctx_ptr).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ctx_ptr).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ctx_ptr).local_ip6[3]),
            ],
        )
    };
    let mut data = [0u8; TP_DEST_KEY_LEN];
    data[..4].copy_from_slice(&slot.to_be_bytes());
    match lookup.family {
        AF_INET => {
            // IPv4 mapped into IPv6 (::ffff:a.b.c.d), as userspace keys its prefixes.
            data[14] = 0xff;
            data[15] = 0xff;
            data[16..20].copy_from_slice(&ip4.to_ne_bytes());
        }
        AF_INET6 => {
            data[4..8].copy_from_slice(&ip6[0].to_ne_bytes());
            data[8..12].copy_from_slice(&ip6[1].to_ne_bytes());
            data[12..16].copy_from_slice(&ip6[2].to_ne_bytes());
            data[16..20].copy_from_slice(&ip6[3].to_ne_bytes());
        }
        _ => return None,
    }
    let key = Key::new((TP_DEST_KEY_LEN * 8) as u32, data);
    DESTS.get(&key).map(|_| slot)
}
