//! In-kernel splice: a stream verdict program that redirects every byte a spliced
//! socket receives to its peer's send queue, and counts what it did.

use aya_ebpf::{
    bindings::sk_action::{SK_DROP, SK_PASS},
    helpers::{bpf_get_socket_cookie, bpf_ktime_get_coarse_ns},
    macros::{map, stream_verdict},
    maps::{HashMap, RingBuf, SockHash},
    programs::SkBuffContext,
};
use aya_log_ebpf::{info, warn};
use forwarder_common::{
    ConnInfo, EVENTS_RING_BYTES, MAX_SPLICED_SOCKETS, MAX_STATS, PeerLink, SockCounters,
    SpliceEvent, StatKey, splice_event,
};

#[map(name = "FWD_SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "FWD_LINKS")]
static LINKS: HashMap<u64, PeerLink> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "FWD_COUNTERS")]
static COUNTERS: HashMap<u64, SockCounters> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "FWD_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);

// Inspection maps: written by the agent only, read by `forwarder conns|stats`. They live
// in this object so they are created and pinned with the data path.
#[map(name = "FWD_CONNS")]
static CONNS: HashMap<u64, ConnInfo> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "FWD_STATS")]
static STATS: HashMap<StatKey, u64> = HashMap::with_max_entries(MAX_STATS, 0);

/// Most bytes one `bpf_skb_adjust_room` call may cut from an sk_skb (the kernel's limit).
const MAX_CUT_STEP: u32 = 0xfff;
/// Cut steps per segment: 640 KiB, more than TCP coalesces into one receive buffer.
const MAX_CUT_STEPS: u32 = 160;

#[stream_verdict]
pub fn splice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the __sk_buff the kernel passed to this program.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb.cast()) };
    // An sk_skb program's cb[] is the start of skb->cb, which TCP's receive path fills
    // with its control block: cb[0] is the segment's sequence number.
    // SAFETY: reading a context field the verifier rewrites to a fixed offset.
    let seq = unsafe { (*ctx.skb.skb).cb[0] };
    let mut len = u64::from(ctx.len());
    if len == 0 {
        // A bare FIN: nothing to forward (userspace passes the half-close on). Redirecting
        // it would make the peer's send worker write after our shutdown(): EPIPE.
        return SK_DROP;
    }
    let Some(counters) = COUNTERS.get_ptr_mut(cookie) else {
        // Not set up by the agent: keep the bytes on this socket for userspace.
        return SK_PASS;
    };
    // SAFETY: the pointer comes from a successful lookup and stays valid while the entry
    // exists. The verdict for one socket runs under that socket's lock, so these
    // read-modify-writes never race each other; userspace only reads.
    let counters = unsafe { &mut *counters };
    // Only the idle timeout reads this: a jiffy's precision is plenty, and the coarse
    // clock costs less per segment.
    // SAFETY: plain helper call without arguments.
    counters.last_active_ns = unsafe { bpf_ktime_get_coarse_ns() };

    match cut_repeated_bytes(&ctx, counters, seq, len as u32) {
        Overlap::None => {}
        Overlap::Trimmed => {
            len = u64::from(ctx.len());
            if len == 0 {
                // Nothing new in it. Dropping a now empty buffer leaves TCP's copied_seq
                // alone, as it should.
                return SK_DROP;
            }
        }
        Overlap::Uncuttable => {
            // Forwarding it would repeat bytes: drop it and let the agent reset the
            // connection.
            warn!(
                &ctx,
                "splice: socket {} got a segment that could not be cut", cookie
            );
            notify(counters, cookie, splice_event::STREAM_ERROR);
            return SK_DROP;
        }
    }

    let before = counters.redirected_bytes;
    let after = before.saturating_add(len);
    let mut link = counters.link;
    if link.peer_cookie == 0
        || counters.passed_bytes != link.passed_mark
        || after > link.redirect_limit
        || after >= link.refresh_at
    {
        // The copy would stop this segment, or there is none yet: the agent may have moved
        // the link since (it only ever raises it), so read the real one.
        // SAFETY: the value is only read; userspace replaces whole entries atomically.
        match unsafe { LINKS.get(cookie) } {
            Some(fresh) => {
                link = *fresh;
                counters.link = link;
            }
            None => {
                // No link (not expected while the socket is in the map): as with a mark of 0.
                let first = counters.passed_bytes == 0;
                pass(counters, cookie, len, first);
                return SK_PASS;
            }
        }
    }
    // Once a byte has gone to userspace, every later byte must too, or the order breaks
    // (until userspace has copied them all and moves the mark).
    if counters.passed_bytes != link.passed_mark {
        pass(counters, cookie, len, false);
        return SK_PASS;
    }
    if after > link.redirect_limit {
        // The peer is not draining: the kernel gives redirects no backpressure, so stop
        // here and let this socket's receive queue (and TCP's window) hold the sender.
        counters.over_budget += 1;
        info!(
            &ctx,
            "splice: socket {} spent its lag budget; passing to userspace", cookie
        );
        pass(counters, cookie, len, true);
        return SK_PASS;
    }
    let mut peer = link.peer_cookie;
    if SOCKS.redirect_skb(&ctx, &mut peer, 0) != SK_PASS as i64 {
        warn!(
            &ctx,
            "splice: peer {} of socket {} is not in the map; passing to userspace", peer, cookie
        );
        pass(counters, cookie, len, true);
        return SK_PASS;
    }
    counters.redirected_bytes = after;
    counters.redirected_segments += 1;
    if before < link.refresh_at && after >= link.refresh_at {
        notify(counters, cookie, splice_event::REFRESH);
    }
    SK_PASS
}

/// Leaves `len` bytes in this socket's receive queue for userspace. `first` says they are
/// the first since the passed mark: the agent is told once, then copies until it hands
/// the direction back (it does not watch for data otherwise).
fn pass(counters: &mut SockCounters, cookie: u64, len: u64, first: bool) {
    counters.passed_bytes += len;
    counters.passed_segments += 1;
    if first {
        notify(counters, cookie, splice_event::PASSING);
    }
}

/// Wakes the agent for `cookie`. A full ring loses the event (counted); the agent's
/// coarse safety tick finds the condition later.
fn notify(counters: &mut SockCounters, cookie: u64, kind: u32) {
    let event = SpliceEvent {
        cookie,
        kind,
        _pad: 0,
    };
    if EVENTS.output::<SpliceEvent>(&event, 0).is_err() {
        counters.events_lost += 1;
    }
}

enum Overlap {
    /// The segment starts where the last one ended (or is the first).
    None,
    /// Its front repeated bytes already seen and was cut off.
    Trimmed,
    /// Its front repeated bytes that could not be cut (counted in `stream_errors`).
    Uncuttable,
}

/// Cuts from the front of this segment the bytes the verdict has already seen, and moves
/// the socket's sequence mark past it.
///
/// TCP queues a retransmitted segment that partly overlaps received bytes whole: its own
/// reader skips the overlap by sequence number, but `tcp_read_skb()` hands the verdict whole
/// segments. Under loss (here: receive-memory pruning while a budget holds bytes on this
/// socket) the overlap would otherwise be forwarded twice, and `tcp_eat_skb()` would move
/// `copied_seq` past `rcv_nxt`, which stops the socket's wake-ups (a stall).
fn cut_repeated_bytes(
    ctx: &SkBuffContext,
    counters: &mut SockCounters,
    seq: u32,
    len: u32,
) -> Overlap {
    if counters.seq_known == 0 {
        counters.seq_known = 1;
        counters.next_seq = seq.wrapping_add(len);
        return Overlap::None;
    }
    let repeated = counters.next_seq.wrapping_sub(seq) as i32;
    if repeated <= 0 {
        counters.next_seq = seq.wrapping_add(len);
        return Overlap::None;
    }
    let repeated = repeated as u32;
    if repeated < len {
        counters.next_seq = seq.wrapping_add(len);
    }
    let cut = if repeated < len { repeated } else { len };
    let mut left = cut;
    for _ in 0..MAX_CUT_STEPS {
        if left == 0 {
            break;
        }
        let step = if left > MAX_CUT_STEP {
            MAX_CUT_STEP
        } else {
            left
        };
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    if left != 0 {
        counters.stream_errors += 1;
        return Overlap::Uncuttable;
    }
    counters.trimmed_bytes += u64::from(cut);
    counters.trimmed_segments += 1;
    Overlap::Trimmed
}
