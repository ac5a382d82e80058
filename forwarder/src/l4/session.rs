//! One connection after it has been spliced in the kernel. The kernel moves the bytes;
//! this task only watches: it forwards a FIN as a half-close once the peer's redirect
//! backlog is flushed, propagates resets, enforces the idle timeout from the kernel's
//! own activity stamps, keeps each direction's lag budget (enforced by the verdict) moving
//! with what the peer has sent on, and copies the (rare) bytes the kernel handed to
//! userspace instead of redirecting.

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::ebpf::{Datapath, SplicedPair};
use crate::l4::{End, Path, SessionOptions, SessionReport};
use crate::metrics::{self, L4Metrics};
use crate::sys;
use forwarder_common::SockCounters;

/// How often to look at the counters while bytes flow; doubled up to `MAX_TICK` while idle.
const MIN_TICK: Duration = Duration::from_millis(20);
/// While a direction moves more than a quarter of its lag budget per tick: the budget is
/// refreshed often enough that a fast, healthy flow never runs into a stale limit.
const FAST_TICK: Duration = Duration::from_millis(2);
/// Longest sleep of an idle session: bytes arriving wake it (the verdict's data-ready
/// hook signals the socket), and so do a FIN and a reset, so this only bounds how late
/// the idle timeout is seen. Devices idle for minutes between keep-alives, and
/// every wake costs a few syscalls: 3,000 idle connections took 2.2% of a core at 2 s,
/// 0.17% at 30 s, 0.10% once a quiet direction's step stopped reading the sink.
const MAX_TICK: Duration = Duration::from_secs(30);
/// While userspace waits for a peer's kernel backlog to drain before copying.
const COPY_TICK: Duration = Duration::from_millis(2);
const COPY_BUF: usize = 64 * 1024;

/// One direction: bytes arriving on `src` leave through `sink`.
struct Direction<'a> {
    src: &'a TcpStream,
    sink: &'a TcpStream,
    src_cookie: u64,
    sink_cookie: u64,
    /// FIN seen on `src`.
    eof: bool,
    /// FIN passed on: `sink`'s write side is shut.
    shut: bool,
    /// Bytes userspace read from `src` and wrote to `sink`.
    copied: u64,
    /// Bytes userspace read from `src` (`copied` plus `pending`).
    read: u64,
    /// Read from `src`, not yet taken by `sink`'s send buffer. Writes never wait: with
    /// both directions in userspace at once (an echoing peer), waiting on one sink would
    /// stop the other direction, and the peers would wait on each other for ever.
    pending: Vec<u8>,
    /// Bytes the kernel redirected, as of the last look.
    redirected: u64,
    /// On the userspace path because `sink` fell behind (until it catches up).
    diverted: bool,
    /// The redirect limit last written for `src` (see `PeerLink::redirect_limit`).
    limit: u64,
    /// The passed-bytes mark last written for `src` (see `PeerLink::passed_mark`).
    passed_mark: u64,
    /// `SockCounters::over_budget` as of the last divert we noticed.
    over_budget_seen: u64,
    /// `sink`'s written count before the splice: nothing we sent, but it can include the
    /// SYN (bytes_acked counts it on connected sockets).
    sink_base: u64,
}

impl<'a> Direction<'a> {
    fn new(
        src: &'a TcpStream,
        sink: &'a TcpStream,
        src_cookie: u64,
        sink_cookie: u64,
        sink_base: u64,
        limit: u64,
    ) -> Self {
        Self {
            src,
            sink,
            src_cookie,
            sink_cookie,
            eof: false,
            shut: false,
            copied: 0,
            read: 0,
            pending: Vec::new(),
            redirected: 0,
            diverted: false,
            limit,
            passed_mark: 0,
            over_budget_seen: 0,
            sink_base,
        }
    }
}

/// Each socket's `TcpBytes::written()` taken just before the splice.
#[derive(Clone, Copy, Debug, Default)]
pub struct WrittenBefore {
    pub client: u64,
    pub upstream: u64,
}

impl WrittenBefore {
    pub fn measure(client: &TcpStream, upstream: &TcpStream) -> io::Result<Self> {
        Ok(Self {
            client: sys::tcp_bytes(client.as_fd())?.written(),
            upstream: sys::tcp_bytes(upstream.as_fd())?.written(),
        })
    }
}

enum Wake {
    Readable(usize, io::Result<tokio::io::Ready>, Interest),
    Tick,
}

/// Runs until both directions are closed, a side resets, or the idle timeout hits.
pub async fn run(
    datapath: &Datapath,
    pair: SplicedPair,
    client: TcpStream,
    upstream: TcpStream,
    written_before: WrittenBefore,
    options: &SessionOptions,
    metrics: &L4Metrics,
) -> SessionReport {
    let started_ns = sys::monotonic_ns();
    let mut last_userspace_io_ns = started_ns;
    let mut dirs = [
        Direction::new(
            &client,
            &upstream,
            pair.client,
            pair.upstream,
            written_before.upstream,
            options.max_lag,
        ),
        Direction::new(
            &upstream,
            &client,
            pair.upstream,
            pair.client,
            written_before.client,
            options.max_lag,
        ),
    ];
    let mut tick = MIN_TICK;
    let mut last_progress = 0u64;
    let idle_ns = u64::try_from(options.idle_timeout.as_nanos()).unwrap_or(u64::MAX);

    let end = loop {
        // After a side's FIN only its errors matter (a reset): it stays readable for ever.
        let watch = |eof: bool| {
            if eof {
                Interest::ERROR
            } else {
                Interest::READABLE
            }
        };
        let (watch_client, watch_upstream) = (watch(dirs[0].eof), watch(dirs[1].eof));
        let wake = tokio::select! {
            r = client.ready(watch_client) => Wake::Readable(0, r, watch_client),
            r = upstream.ready(watch_upstream) => Wake::Readable(1, r, watch_upstream),
            () = tokio::time::sleep(tick) => Wake::Tick,
        };
        if let Wake::Readable(i, ready, interest) = wake {
            match ready {
                Ok(ready) if ready.is_read_closed() => dirs[i].eof = true,
                Ok(_) => {}
                Err(err) => break End::Error(format!("polling a socket failed: {err}")),
            }
            // Readiness is edge-triggered: clear it, the counters say what happened.
            let _ = dirs[i]
                .src
                .try_io(interest, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        }

        if let Some(end) = check_resets(&client, &upstream) {
            break end;
        }

        let mut needs_copy = false;
        let mut failed = None;
        let mut kernel = [None, None];
        for (d, seen) in dirs.iter_mut().zip(kernel.iter_mut()) {
            match step(datapath, d, options, metrics).await {
                Ok(StepOutcome {
                    waiting_to_copy,
                    copied,
                    counters,
                }) => {
                    needs_copy |= waiting_to_copy;
                    if copied > 0 {
                        last_userspace_io_ns = sys::monotonic_ns();
                    }
                    *seen = counters;
                }
                Err(err) => {
                    failed = Some(err);
                    break;
                }
            }
        }
        if let Some(err) = failed {
            if let Some(end) = check_resets(&client, &upstream) {
                break end;
            }
            break End::Error(err.to_string());
        }
        if dirs.iter().all(|d| d.shut) {
            break End::Closed;
        }

        // The counters each step read (a shut direction's are read here).
        for (seen, cookie) in kernel.iter_mut().zip([pair.client, pair.upstream]) {
            if seen.is_none() {
                *seen = datapath.counters(cookie).ok();
            }
        }
        if kernel.iter().flatten().any(|c| c.stream_errors > 0) {
            // The verdict met a segment it could not make exact, and dropped it.
            break End::Broken;
        }
        // Idle: the kernel stamps every verdict; we stamp our own copies.
        let last_kernel = kernel
            .iter()
            .flatten()
            .map(|c| c.last_active_ns)
            .max()
            .unwrap_or(0);
        let last_active = last_kernel.max(last_userspace_io_ns).max(started_ns);
        if sys::monotonic_ns().saturating_sub(last_active) > idle_ns {
            break End::IdleTimeout;
        }

        let progress: u64 = dirs.iter().map(|d| d.redirected + d.copied).sum();
        let moved = progress.saturating_sub(last_progress);
        tick = if needs_copy {
            COPY_TICK
        } else if moved > options.max_lag / 4 {
            FAST_TICK
        } else if moved > 0 {
            MIN_TICK
        } else {
            (tick * 2)
                .min(MAX_TICK)
                .min(options.idle_timeout / 4)
                .max(MIN_TICK)
        };
        last_progress = progress;
    };

    let report = SessionReport {
        path: Path::Kernel,
        bytes_up: dirs[0].redirected + dirs[0].copied,
        bytes_down: dirs[1].redirected + dirs[1].copied,
        userspace_bytes: dirs[0].copied + dirs[1].copied,
        diverted: dirs.iter().any(|d| d.over_budget_seen > 0),
        end,
    };
    if matches!(report.end, End::Reset | End::Broken) {
        if matches!(report.end, End::Broken) {
            metrics::add(&metrics.kernel_stream_errors, 1);
            tracing::error!(
                "the kernel could not cut a retransmitted segment's repeated bytes; \
                 resetting the connection rather than forwarding them twice"
            );
        } else {
            metrics::add(&metrics.resets, 1);
        }
        // Pass the reset on: close the surviving side with RST, not FIN.
        let _ = sys::set_linger_zero(client.as_fd());
        let _ = sys::set_linger_zero(upstream.as_fd());
    }
    if matches!(report.end, End::IdleTimeout) {
        metrics::add(&metrics.idle_timeouts, 1);
    }
    check_kernel_accounting(datapath, &dirs, metrics);
    datapath.unsplice(pair);
    drop((client, upstream));
    report
}

/// Every byte a socket received meets the verdict once: redirected plus passed equals what
/// TCP received (plus one for a FIN), once the verdict has cut the repeated fronts of
/// retransmitted segments (counted here). More would mean bytes went to the peer twice:
/// logged and counted so it cannot go unnoticed.
fn check_kernel_accounting(datapath: &Datapath, dirs: &[Direction<'_>], metrics: &L4Metrics) {
    for d in dirs {
        let (Ok(counters), Ok(tcp)) = (
            datapath.counters(d.src_cookie),
            sys::tcp_bytes(d.src.as_fd()),
        ) else {
            continue;
        };
        if counters.trimmed_bytes > 0 {
            metrics::add(&metrics.retransmit_overlap_bytes, counters.trimmed_bytes);
            tracing::debug!(
                bytes = counters.trimmed_bytes,
                segments = counters.trimmed_segments,
                "cut repeated bytes from retransmitted segments"
            );
        }
        let seen = counters.redirected_bytes + counters.passed_bytes;
        // `received` counts a FIN's sequence number too (a reset takes none).
        let received = if tcp.fin_received {
            tcp.received.saturating_sub(1)
        } else {
            tcp.received
        };
        let extra = seen.saturating_sub(received);
        if extra > 0 {
            metrics::add(&metrics.kernel_duplicated_bytes, extra);
            tracing::error!(
                extra,
                redirected = counters.redirected_bytes,
                passed = counters.passed_bytes,
                received = tcp.received,
                "the verdict saw more bytes than TCP received: some went to the peer twice"
            );
        }
    }
}

fn check_resets(client: &TcpStream, upstream: &TcpStream) -> Option<End> {
    for stream in [client, upstream] {
        match sys::take_socket_error(stream.as_fd()) {
            Ok(Some(err)) => {
                tracing::debug!(%err, "socket error: treating as reset");
                return Some(End::Reset);
            }
            Ok(None) => {}
            Err(err) => return Some(End::Error(format!("SO_ERROR: {err}"))),
        }
    }
    None
}

struct StepOutcome {
    /// Bytes wait in userspace's queue until the sink's kernel backlog drains.
    waiting_to_copy: bool,
    copied: u64,
    /// The source's kernel counters as read in this step (none once the direction is shut).
    counters: Option<SockCounters>,
}

/// Brings one direction up to date: copy passed bytes, bound the lag, pass on a FIN.
async fn step(
    datapath: &Datapath,
    d: &mut Direction<'_>,
    options: &SessionOptions,
    metrics: &L4Metrics,
) -> io::Result<StepOutcome> {
    let mut outcome = StepOutcome {
        waiting_to_copy: false,
        copied: 0,
        counters: None,
    };
    if d.shut {
        return Ok(outcome);
    }
    let counters = datapath.counters(d.src_cookie)?;
    d.redirected = counters.redirected_bytes;
    outcome.counters = Some(counters);
    let in_kernel = counters.passed_bytes == d.passed_mark
        && !d.diverted
        && counters.over_budget == d.over_budget_seen;
    if in_kernel
        && !d.eof
        && counters
            .redirected_bytes
            .saturating_add(options.max_lag / 2)
            < d.limit
    {
        // The kernel carries this direction well inside its budget: nothing to copy, and
        // the budget needs no move yet (so the sink's counters need no syscalls).
        return Ok(outcome);
    }
    let sink = sys::tcp_bytes(d.sink.as_fd())?;
    // Everything this direction put into the sink: kernel redirects plus our copies.
    let owed_to_sink = counters.redirected_bytes + d.copied;
    let sink_written = sink.written().saturating_sub(d.sink_base);
    let backlog = owed_to_sink.saturating_sub(sink_written);

    if counters.over_budget > d.over_budget_seen {
        // The verdict found the sink behind by the whole budget and stopped redirecting:
        // this direction goes through userspace, where TCP flow control holds the sender,
        // until the sink catches up.
        d.over_budget_seen = counters.over_budget;
        d.diverted = true;
        metrics::add(&metrics.diverted_slow_peer, 1);
        tracing::debug!(
            backlog,
            max_lag = options.max_lag,
            "peer fell behind; direction paused on the userspace path"
        );
    }
    if counters.passed_bytes != d.passed_mark || d.diverted {
        tracing::trace!(
            redirected = counters.redirected_bytes,
            passed = counters.passed_bytes,
            copied = d.copied,
            written = sink_written,
            backlog,
            "direction on the userspace path"
        );
        if backlog == 0 {
            // The kernel's bytes are all in the sink: ours may follow without reordering.
            let n = copy_ready_bytes(d).await?;
            outcome.copied = n;
            metrics::add(&metrics.userspace_payload_bytes, n);
            // Back to the kernel only once the sink's peer has acknowledged most of what
            // it was sent: a large send buffer empties the backlog long before that, and
            // resuming then would spend the budget at once and divert again.
            let unacked = owed_to_sink.saturating_sub(sink.acked.saturating_sub(d.sink_base));
            if !d.eof && d.diverted && unacked < options.max_lag / 2 {
                try_resume(datapath, d, options, metrics)?;
            }
        }
        // Passed bytes not yet copied (we wait for the backlog, the sink, or more to read).
        outcome.waiting_to_copy = (counters.passed_bytes > d.read && !d.eof)
            || !d.pending.is_empty()
            || backlog > 0
            || d.diverted;
    } else {
        // Move the budget along with what the sink's peer has acknowledged (not merely
        // what entered the send buffer: spliced sockets have large ones, see
        // `SPLICE_SNDBUF`, and the budget must bound them too); skip small moves to save
        // map updates. Our own copies are in the count too, hence the subtraction.
        let sink_acked = sink.acked.saturating_sub(d.sink_base);
        let limit = sink_acked
            .saturating_sub(d.copied)
            .saturating_add(options.max_lag);
        if limit >= d.limit.saturating_add(options.max_lag / 8) {
            datapath.set_redirect_limit(d.src_cookie, d.sink_cookie, limit, d.passed_mark)?;
            d.limit = limit;
        }
    }

    if d.eof {
        let src = sys::tcp_bytes(d.src.as_fd())?;
        let counters = datapath.counters(d.src_cookie)?;
        d.redirected = counters.redirected_bytes;
        // The FIN takes one sequence number; every byte before it must have met the verdict
        // (or been read by us), been copied if passed, and left the sink's backlog.
        let accounted = counters.redirected_bytes + counters.passed_bytes.max(d.read) + 1;
        let all_seen = accounted >= src.received;
        let all_copied = d.read >= counters.passed_bytes && d.pending.is_empty();
        let flushed =
            sys::tcp_bytes(d.sink.as_fd())?.written() >= counters.redirected_bytes + d.copied;
        if all_seen && all_copied && flushed {
            sys::shutdown_write(d.sink.as_fd())?;
            d.shut = true;
        } else {
            outcome.waiting_to_copy = true;
        }
    }
    Ok(outcome)
}

/// Hands a paused direction back to the kernel once userspace has read (and written out)
/// every byte the verdict passed.
///
/// Nothing is read while deciding. `SO_RCVLOWAT = INT_MAX` stops the verdict from running
/// (as in the first hand-over), so new bytes wait, unjudged, in the receive queue; a read
/// now would take them through plain `tcp_recvmsg`, possibly half an skb, and the verdict
/// would later redirect that skb whole: the same bytes twice (seen under an echo load).
/// So the rule is: every passed byte read before the hold, and still so under it (a
/// verdict can slip in before the hold is set); then the mark moves to the passed count
/// and the hold is released, and the waiting bytes meet the verdict, after ours, in order.
/// A verdict after that (a FIN ignores the hold) passes again, since the count is past the
/// mark.
fn try_resume(
    datapath: &Datapath,
    d: &mut Direction<'_>,
    options: &SessionOptions,
    metrics: &L4Metrics,
) -> io::Result<()> {
    if datapath.counters(d.src_cookie)?.passed_bytes != d.read || !d.pending.is_empty() {
        return Ok(());
    }
    sys::set_rcvlowat(d.src.as_fd(), libc::c_int::MAX)?;
    let result = (|| {
        let now = datapath.counters(d.src_cookie)?;
        if now.passed_bytes != d.read {
            return Ok(());
        }
        let sink_acked = sys::tcp_bytes(d.sink.as_fd())?
            .acked
            .saturating_sub(d.sink_base);
        let limit = sink_acked
            .saturating_sub(d.copied)
            .saturating_add(options.max_lag);
        datapath.set_redirect_limit(d.src_cookie, d.sink_cookie, limit, now.passed_bytes)?;
        d.limit = limit;
        d.passed_mark = now.passed_bytes;
        d.diverted = false;
        metrics::add(&metrics.resumed_kernel, 1);
        tracing::debug!("peer caught up; direction back on the kernel path");
        Ok::<(), io::Error>(())
    })();
    // Release the hold: bytes that arrived meanwhile meet the verdict now, in order.
    let released = sys::set_rcvlowat(d.src.as_fd(), 1);
    result?;
    released
}

enum Read {
    /// Bytes written to the sink (this call's, including earlier pending ones).
    Copied(u64),
    Empty,
    Eof,
    /// The sink's send buffer is full; the bytes wait in `pending`.
    SinkFull,
}

/// Writes what `sink` takes now; the rest stays (or goes) into `pending`.
fn write_now(d: &mut Direction<'_>, bytes: &[u8]) -> io::Result<u64> {
    let mut written = 0;
    while written < bytes.len() {
        match sys::send_now(d.sink.as_fd(), &bytes[written..]) {
            Ok(n) => written += n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    d.copied += written as u64;
    Ok(written as u64)
}

/// Sends what is pending first; then one read from `src` (without waiting), sent on as far
/// as `sink` takes it. Never waits for the sink.
async fn copy_once(d: &mut Direction<'_>, buf: &mut [u8]) -> io::Result<Read> {
    let mut flushed = 0;
    if !d.pending.is_empty() {
        let pending = std::mem::take(&mut d.pending);
        flushed = write_now(d, &pending)?;
        let rest = &pending[flushed as usize..];
        if !rest.is_empty() {
            d.pending = rest.to_vec();
            return Ok(Read::SinkFull);
        }
    }
    match sys::recv_now(d.src.as_fd(), buf) {
        Ok(0) => {
            d.eof = true;
            Ok(if flushed > 0 {
                Read::Copied(flushed)
            } else {
                Read::Eof
            })
        }
        Ok(n) => {
            d.read += n as u64;
            let written = write_now(d, &buf[..n])?;
            if (written as usize) < n {
                d.pending.extend_from_slice(&buf[written as usize..n]);
                return Ok(Read::SinkFull);
            }
            Ok(Read::Copied(flushed + written))
        }
        Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(if flushed > 0 {
            Read::Copied(flushed)
        } else {
            Read::Empty
        }),
        Err(err) => Err(err),
    }
}

/// Reads what userspace may read from `src` now and writes it all to `sink`.
async fn copy_ready_bytes(d: &mut Direction<'_>) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        match copy_once(d, &mut buf).await? {
            Read::Copied(n) => total += n,
            Read::Empty | Read::Eof | Read::SinkFull => return Ok(total),
        }
    }
}
