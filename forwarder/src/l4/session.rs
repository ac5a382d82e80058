//! One connection after it has been spliced in the kernel. The kernel moves the bytes;
//! this task only watches, and only when woken (see `supervisor`): it forwards a FIN as a
//! half-close once the peer's redirect backlog is flushed, propagates resets, enforces the
//! idle timeout from the kernel's own activity stamps, keeps each direction's lag budget
//! (enforced by the verdict) moving with what the peer has acknowledged, and copies the
//! (rare) bytes the kernel handed to userspace instead of redirecting.
//!
//! A healthy spliced connection costs the agent nothing per message: it sleeps until its
//! idle deadline (at most `MAX_SLEEP`), a FIN, a reset, or a report from the verdict.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::time::Duration;

use tokio::time::Instant;

use crate::ebpf::{Datapath, SplicedPair, peer_link};
use crate::l4::supervisor::{Watch, wake};
use crate::l4::{Carrier, End, Outcome, SessionOptions, Side};
use crate::metrics::{self, L4Metrics};
use crate::sys;
use forwarder_common::SockCounters;

/// Longest sleep of a quiet session. Every condition that needs the agent wakes it (a FIN,
/// a reset, a verdict event) and the idle deadline is a timer of its own, so this is only
/// a safety net for a lost verdict event (ring full, counted as `events_lost`). 5,000
/// connections cost about 170 wake-ups a second at 30 s.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// While a direction needs attention (bytes to copy, a FIN waiting for the backlog, a
/// lag budget the peer has not yet made room in), the first look comes this soon...
const ATTENTION_TICK: Duration = Duration::from_millis(2);
/// ...and the pause doubles up to this while nothing moves: a peer that stopped reading
/// costs a few wake-ups a second, not 500. Bytes arriving on a direction that runs
/// through userspace wake the session at once (it is watched for data then).
const MAX_ATTENTION_TICK: Duration = Duration::from_millis(100);
const COPY_BUF: usize = 64 * 1024;

/// One direction: bytes arriving on `src` leave through `sink`.
struct Direction<'a> {
    src: &'a TcpStream,
    sink: &'a TcpStream,
    /// `src`'s side in the pair: 0 the client, 1 the upstream.
    side: usize,
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
    /// The redirect limit and refresh mark last written for `src` (see `PeerLink`).
    limit: u64,
    refresh_at: u64,
    /// The passed-bytes mark last written for `src` (see `PeerLink::passed_mark`).
    passed_mark: u64,
    /// `SockCounters::over_budget` as of the last divert we noticed.
    over_budget_seen: u64,
    /// `src` is watched for arriving bytes (it runs through userspace).
    watching_data: bool,
    /// `sink`'s written count before the splice: nothing we sent, but it can include the
    /// SYN (bytes_acked counts it on connected sockets).
    sink_base: u64,
}

impl<'a> Direction<'a> {
    fn new(
        (src, sink): (&'a TcpStream, &'a TcpStream),
        side: usize,
        pair: SplicedPair,
        sink_base: u64,
        max_lag: u64,
    ) -> Self {
        let cookies = [pair.client, pair.upstream];
        let initial = peer_link(0, max_lag, max_lag, 0);
        Self {
            src,
            sink,
            side,
            src_cookie: cookies[side],
            sink_cookie: cookies[1 - side],
            eof: false,
            shut: false,
            copied: 0,
            read: 0,
            pending: Vec::new(),
            redirected: 0,
            diverted: false,
            limit: initial.redirect_limit,
            refresh_at: initial.refresh_at,
            passed_mark: 0,
            over_budget_seen: 0,
            watching_data: false,
            sink_base,
        }
    }

    /// What an upgrade's next agent needs to go on with this direction.
    fn state(&mut self) -> DirectionState {
        DirectionState {
            eof: self.eof,
            shut: self.shut,
            copied: self.copied,
            read: self.read,
            pending: std::mem::take(&mut self.pending),
            redirected: self.redirected,
            diverted: self.diverted,
            limit: self.limit,
            refresh_at: self.refresh_at,
            passed_mark: self.passed_mark,
            over_budget_seen: self.over_budget_seen,
            watching_data: self.watching_data,
            sink_base: self.sink_base,
        }
    }

    /// A direction as the previous agent left it (`state`).
    fn restore(
        (src, sink): (&'a TcpStream, &'a TcpStream),
        side: usize,
        pair: SplicedPair,
        state: DirectionState,
    ) -> Self {
        let cookies = [pair.client, pair.upstream];
        Self {
            src,
            sink,
            side,
            src_cookie: cookies[side],
            sink_cookie: cookies[1 - side],
            eof: state.eof,
            shut: state.shut,
            copied: state.copied,
            read: state.read,
            pending: state.pending,
            redirected: state.redirected,
            diverted: state.diverted,
            limit: state.limit,
            refresh_at: state.refresh_at,
            passed_mark: state.passed_mark,
            over_budget_seen: state.over_budget_seen,
            watching_data: state.watching_data,
            sink_base: state.sink_base,
        }
    }

    /// Writes `src`'s link with a new limit and mark. Neither ever goes down: the verdict
    /// keeps a copy of the link and reads the real one only when the copy would stop a
    /// segment (see `SockCounters::link`). A limit kept from an earlier, smaller ack is
    /// still a sound bound: acknowledgements only grow.
    fn set_link(
        &mut self,
        datapath: &Datapath,
        limit: u64,
        max_lag: u64,
        mark: u64,
    ) -> io::Result<()> {
        let link = peer_link(
            self.sink_cookie,
            limit.max(self.limit),
            max_lag,
            mark.max(self.passed_mark),
        );
        datapath.set_link(self.src_cookie, &link)?;
        self.limit = link.redirect_limit;
        self.refresh_at = link.refresh_at;
        self.passed_mark = link.passed_mark;
        Ok(())
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

/// The sockets of a spliced pair and what the session needs to watch them.
pub struct Spliced {
    pub pair: SplicedPair,
    pub client: TcpStream,
    pub upstream: TcpStream,
    pub written_before: WrittenBefore,
    /// Registered before the splice, so no report of the verdict's is missed and a FIN or
    /// reset from before is reported at once.
    pub watch: Watch,
}

/// What one look at both directions found.
#[derive(Default)]
struct Look {
    /// A direction needs another look soon (see `ATTENTION_TICK`).
    attention: bool,
    /// Payload bytes seen moving (kernel or ours) up to now: a stalled look backs off.
    progress: u64,
    /// The newest activity stamp, kernel or ours.
    last_active_ns: u64,
}

struct Session<'a> {
    datapath: &'a Datapath,
    options: &'a SessionOptions,
    metrics: &'a L4Metrics,
    frontend: &'a str,
    dirs: [Direction<'a>; 2],
    started_ns: u64,
    last_userspace_io_ns: u64,
    /// Taken over by an upgrade: look often until then (see `CATCH_UP`).
    catch_up_until: Option<Instant>,
}

/// One direction's state, as handed to an upgrade's next agent (`crate::upgrade`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DirectionState {
    pub eof: bool,
    pub shut: bool,
    pub copied: u64,
    pub read: u64,
    /// Travels beside the JSON, as raw bytes.
    #[serde(skip)]
    pub pending: Vec<u8>,
    pub redirected: u64,
    pub diverted: bool,
    pub limit: u64,
    pub refresh_at: u64,
    pub passed_mark: u64,
    pub over_budget_seen: u64,
    pub watching_data: bool,
    pub sink_base: u64,
}

/// A spliced session's state, as handed to an upgrade's next agent: everything it cannot
/// read back from the sockets and the maps.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    pub frontend: String,
    pub client_cookie: u64,
    pub upstream_cookie: u64,
    pub idle_timeout_ms: u64,
    pub max_lag: u64,
    /// CLOCK_MONOTONIC, the same for every process of the machine.
    pub started_ns: u64,
    pub last_userspace_io_ns: u64,
    pub directions: [DirectionState; 2],
}

impl SessionState {
    pub fn pair(&self) -> SplicedPair {
        SplicedPair {
            client: self.client_cookie,
            upstream: self.upstream_cookie,
        }
    }

    pub fn options(&self) -> SessionOptions {
        SessionOptions {
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            max_lag: self.max_lag,
        }
    }
}

/// A session on its way to the next agent: its state and both sockets.
#[derive(Debug)]
pub struct HandedSession {
    pub state: SessionState,
    pub client: TcpStream,
    pub upstream: TcpStream,
}

/// Runs until both directions are closed, a side resets, or the idle timeout hits (or an
/// upgrade takes the session: `End::HandedOver`).
///
/// Not an `async fn`: one would keep its arguments alongside the session for its whole
/// life (a spliced connection's task is mostly this future; see the fleet bench's memory).
pub fn run<'a>(
    datapath: &'a Datapath,
    spliced: Spliced,
    options: &'a SessionOptions,
    metrics: &'a L4Metrics,
    frontend: &'a str,
) -> impl Future<Output = Outcome> + 'a {
    let Spliced {
        pair,
        client,
        upstream,
        written_before,
        watch,
    } = spliced;
    let context = Context {
        datapath,
        options,
        metrics,
        frontend,
    };
    carry_on(
        context,
        pair,
        (client, upstream),
        watch,
        Begin::Fresh(written_before),
    )
}

/// Goes on with a session the previous agent handed over (`crate::upgrade`). Its sockets
/// are spliced already, in the maps this agent took over.
pub async fn adopt(
    datapath: &Datapath,
    handed: HandedSession,
    options: &SessionOptions,
    metrics: &L4Metrics,
) -> Outcome {
    let HandedSession {
        state,
        client,
        upstream,
    } = handed;
    let pair = state.pair();
    let watched = datapath.supervisor().and_then(|s| {
        s.watch(
            [pair.client, pair.upstream],
            [client.as_fd(), upstream.as_fd()],
        )
    });
    let watch = match watched {
        Ok(watch) => watch,
        Err(error) => {
            // Unwatched, a FIN or reset would go unseen: end it, loudly, instead.
            let _ = sys::set_linger_zero(client.as_fd());
            let _ = sys::set_linger_zero(upstream.as_fd());
            drop((client, upstream));
            datapath.release(pair);
            return Outcome::failed(Carrier::Kernel, error);
        }
    };
    for (side, d) in state.directions.iter().enumerate() {
        let src = if side == 0 { &client } else { &upstream };
        if d.watching_data && !d.shut {
            let _ = watch.watch_data(side, src.as_fd(), true);
        }
    }
    let frontend = state.frontend.clone();
    let context = Context {
        datapath,
        options,
        metrics,
        frontend: &frontend,
    };
    carry_on(
        context,
        pair,
        (client, upstream),
        watch,
        Begin::Restored(Box::new(state)),
    )
    .await
}

/// What a session runs with, whichever agent started it.
#[derive(Clone, Copy)]
struct Context<'a> {
    datapath: &'a Datapath,
    options: &'a SessionOptions,
    metrics: &'a L4Metrics,
    frontend: &'a str,
}

/// How a session starts: just spliced, or as the previous agent (or a failed hand-over)
/// left it.
enum Begin {
    Fresh(WrittenBefore),
    Restored(Box<SessionState>),
}

/// After taking a session over, look often for a while: the previous agent may have read
/// (and dropped) a report of the verdict's about it on its way out.
const CATCH_UP: Duration = Duration::from_secs(1);
const CATCH_UP_TICK: Duration = Duration::from_millis(50);

/// Supervises the pair to its end, handing it to the next agent if an upgrade asks.
async fn carry_on(
    cx: Context<'_>,
    pair: SplicedPair,
    (mut client, mut upstream): (TcpStream, TcpStream),
    watch: Watch,
    mut begin: Begin,
) -> Outcome {
    loop {
        let mut session = Session::begin(cx, pair, (&client, &upstream), begin);
        let driven = session.drive(&watch).await;
        drop(session);
        match driven {
            Driven::Ended(outcome) => {
                drop(watch);
                // Closing takes the sockets out of the socket map; then their entries go.
                drop((client, upstream));
                cx.datapath.release(pair);
                return outcome;
            }
            Driven::HandOver(state) => {
                let handed = Box::new(HandedSession {
                    state: *state,
                    client,
                    upstream,
                });
                match cx.datapath.hand_over(handed) {
                    // The sockets, the maps' entries and the listing are the next agent's.
                    Ok(()) => return Outcome::handed_over(),
                    Err(back) => {
                        tracing::warn!(
                            "hand-over to the new agent failed: the connection stays here"
                        );
                        watch.decline_handover();
                        (client, upstream) = (back.client, back.upstream);
                        begin = Begin::Restored(Box::new(back.state));
                    }
                }
            }
        }
    }
}

/// A session's end, or its state for the next agent.
enum Driven {
    Ended(Outcome),
    HandOver(Box<SessionState>),
}

impl<'a> Session<'a> {
    fn begin(
        cx: Context<'a>,
        pair: SplicedPair,
        (client, upstream): (&'a TcpStream, &'a TcpStream),
        begin: Begin,
    ) -> Self {
        let (dirs, started_ns, last_userspace_io_ns, catch_up_until) = match begin {
            Begin::Fresh(written_before) => (
                [
                    Direction::new(
                        (client, upstream),
                        0,
                        pair,
                        written_before.upstream,
                        cx.options.max_lag,
                    ),
                    Direction::new(
                        (upstream, client),
                        1,
                        pair,
                        written_before.client,
                        cx.options.max_lag,
                    ),
                ],
                sys::monotonic_ns(),
                0,
                None,
            ),
            Begin::Restored(state) => {
                let SessionState {
                    directions: [up, down],
                    started_ns,
                    last_userspace_io_ns,
                    ..
                } = *state;
                (
                    [
                        Direction::restore((client, upstream), 0, pair, up),
                        Direction::restore((upstream, client), 1, pair, down),
                    ],
                    started_ns,
                    last_userspace_io_ns,
                    Some(Instant::now() + CATCH_UP),
                )
            }
        };
        Self {
            datapath: cx.datapath,
            options: cx.options,
            metrics: cx.metrics,
            frontend: cx.frontend,
            dirs,
            started_ns,
            last_userspace_io_ns,
            catch_up_until,
        }
    }

    /// Supervises to the end and finishes, or packs the session up for an upgrade.
    /// Borrows the session (its owner keeps it): an `async fn` taking it by value would
    /// hold it twice for the session's whole life.
    async fn drive(&mut self, watch: &Watch) -> Driven {
        let end = self.supervise(watch).await;
        if matches!(end, End::HandedOver) {
            return Driven::HandOver(Box::new(self.state()));
        }
        // The kernel's last word: a direction nobody looked at lately has moved on since.
        let last = self
            .dirs
            .each_ref()
            .map(|d| self.datapath.counters(d.src_cookie).ok());
        for (d, c) in self.dirs.iter_mut().zip(&last) {
            if let Some(c) = c {
                d.redirected = c.redirected_bytes;
            }
        }
        let outcome = self.outcome(end);
        self.close(&outcome.end, &last);
        Driven::Ended(outcome)
    }

    /// Everything the next agent needs (`crate::upgrade`).
    fn state(&mut self) -> SessionState {
        SessionState {
            frontend: self.frontend.to_owned(),
            client_cookie: self.dirs[0].src_cookie,
            upstream_cookie: self.dirs[1].src_cookie,
            idle_timeout_ms: u64::try_from(self.options.idle_timeout.as_millis())
                .unwrap_or(u64::MAX),
            max_lag: self.options.max_lag,
            started_ns: self.started_ns,
            last_userspace_io_ns: self.last_userspace_io_ns,
            directions: [self.dirs[0].state(), self.dirs[1].state()],
        }
    }

    /// The first look: when quiet (the watch was there before the splice, so whatever
    /// happened since has been reported), or at once for a session taken over.
    fn first_look(&self) -> Instant {
        match self.catch_up_until {
            Some(_) => Instant::now(),
            None => self.quiet_until(self.started_ns),
        }
    }

    /// The session's life: wait for a wake-up, check resets, look at both directions,
    /// check the end, plan the next wake-up.
    async fn supervise(&mut self, watch: &Watch) -> End {
        let mut wake_at = self.first_look();
        let mut tick = ATTENTION_TICK;
        let mut last_progress = 0;
        loop {
            let bits = watch.wait_until(wake_at).await;
            if bits & wake::HANDOVER != 0 {
                return End::HandedOver;
            }
            metrics::add(&self.metrics.session_wakeups, 1);
            for d in &mut self.dirs {
                if bits & wake::hangup(d.side) != 0 {
                    d.eof = true;
                }
            }
            if bits & wake::ERROR != 0
                && let Some(end) = check_resets(&self.dirs)
            {
                return end;
            }
            // Boxed: a look is rare (a wake-up), and inline its future would size every
            // sleeping session's.
            let look = match Box::pin(self.look(watch)).await {
                Ok(look) => look,
                Err(error) => {
                    return check_resets(&self.dirs).unwrap_or(End::Error { side: None, error });
                }
            };
            if let Some(end) = self.ended(&look) {
                return end;
            }
            wake_at = if look.attention {
                tick = if look.progress > last_progress {
                    ATTENTION_TICK
                } else {
                    (tick * 2).min(MAX_ATTENTION_TICK)
                };
                Instant::now() + tick
            } else {
                tick = ATTENTION_TICK;
                self.quiet_until(look.last_active_ns)
            };
            if let Some(until) = self.catch_up_until {
                let now = Instant::now();
                if now < until {
                    wake_at = wake_at.min(now + CATCH_UP_TICK);
                } else {
                    self.catch_up_until = None;
                }
            }
            last_progress = look.progress;
        }
    }

    /// Steps both directions and gathers what the next wake-up depends on.
    async fn look(&mut self, watch: &Watch) -> io::Result<Look> {
        let mut look = Look::default();
        let mut stream_errors = 0;
        for i in 0..2 {
            let step = step(self.datapath, &mut self.dirs[i], self.options, self.metrics).await?;
            let d = &self.dirs[i];
            if step.copied > 0 {
                self.last_userspace_io_ns = sys::monotonic_ns();
            }
            // A shut direction's counters were not read by its step.
            let counters = match step.counters {
                Some(c) => Some(c),
                None => self.datapath.counters(d.src_cookie).ok(),
            };
            if let Some(c) = counters {
                stream_errors += c.stream_errors;
                look.last_active_ns = look.last_active_ns.max(c.last_active_ns);
            }
            look.attention |= step.attention;
            look.progress += d.redirected + d.copied;
            let on_userspace = step.on_userspace && !d.eof;
            if on_userspace != d.watching_data && !d.shut {
                watch.watch_data(d.side, d.src.as_fd(), on_userspace)?;
                self.dirs[i].watching_data = on_userspace;
            }
        }
        if stream_errors > 0 {
            return Err(io::Error::other(BrokenStream));
        }
        look.last_active_ns = look
            .last_active_ns
            .max(self.last_userspace_io_ns)
            .max(self.started_ns);
        Ok(look)
    }

    /// How the connection ended, if it has.
    fn ended(&self, look: &Look) -> Option<End> {
        if self.dirs.iter().all(|d| d.shut) {
            return Some(End::Closed);
        }
        let idle_ns = u64::try_from(self.options.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        (sys::monotonic_ns().saturating_sub(look.last_active_ns) > idle_ns)
            .then_some(End::IdleTimeout)
    }

    /// When a quiet session looks again: at its idle deadline, or `MAX_SLEEP`.
    fn quiet_until(&self, last_active_ns: u64) -> Instant {
        let idle_ns = u64::try_from(self.options.idle_timeout.as_nanos()).unwrap_or(u64::MAX);
        let deadline_ns = last_active_ns.saturating_add(idle_ns);
        // A millisecond late, so the look finds the timeout passed rather than just short.
        let until_idle = Duration::from_nanos(deadline_ns.saturating_sub(sys::monotonic_ns()))
            + Duration::from_millis(1);
        Instant::now() + until_idle.min(MAX_SLEEP)
    }

    fn outcome(&self, end: End) -> Outcome {
        let end = match end {
            End::Error { error, .. } if error.get_ref().is_some_and(|e| e.is::<BrokenStream>()) => {
                End::Broken
            }
            other => other,
        };
        let [up, down] = &self.dirs;
        Outcome {
            carrier: Carrier::Kernel,
            bytes_up: up.redirected + up.copied,
            bytes_down: down.redirected + down.copied,
            userspace_bytes: up.copied + down.copied,
            diverted: self.dirs.iter().any(|d| d.over_budget_seen > 0),
            end,
        }
    }

    /// Passes a reset on (RST, not FIN, to the surviving side) and checks the kernel's
    /// accounting.
    fn close(&self, end: &End, last: &[Option<SockCounters>; 2]) {
        if matches!(end, End::Reset { .. } | End::Broken) {
            for d in &self.dirs {
                let _ = sys::set_linger_zero(d.src.as_fd());
            }
        }
        for (d, counters) in self.dirs.iter().zip(last) {
            if let Some(counters) = counters {
                check_kernel_accounting(d, counters, self.metrics);
            }
        }
    }
}

/// The verdict met a segment it could not make exact and dropped it.
#[derive(Debug, thiserror::Error)]
#[error("the kernel could not cut a retransmitted segment's repeated bytes")]
struct BrokenStream;

/// Every byte a socket received meets the verdict once: redirected plus passed equals what
/// TCP received (plus one for a FIN), once the verdict has cut the repeated fronts of
/// retransmitted segments (counted here). More would mean bytes went to the peer twice:
/// logged and counted so it cannot go unnoticed.
fn check_kernel_accounting(d: &Direction<'_>, counters: &SockCounters, metrics: &L4Metrics) {
    let Ok(tcp) = sys::tcp_counts(d.src.as_fd()) else {
        return;
    };
    if counters.trimmed_bytes > 0 {
        metrics::add(&metrics.retransmit_overlap_bytes, counters.trimmed_bytes);
        tracing::debug!(
            bytes = counters.trimmed_bytes,
            segments = counters.trimmed_segments,
            "cut repeated bytes from retransmitted segments"
        );
    }
    if counters.events_lost > 0 {
        metrics::add(&metrics.kernel_events_lost, counters.events_lost);
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

/// A pending socket error on either side: that side was reset.
fn check_resets(dirs: &[Direction<'_>; 2]) -> Option<End> {
    for d in dirs {
        let side = Side::of(d.side);
        match sys::take_socket_error(d.src.as_fd()) {
            Ok(Some(err)) => {
                tracing::debug!(%err, ?side, "socket error: treating as reset");
                return Some(End::Reset { side: Some(side) });
            }
            Ok(None) => {}
            Err(error) => {
                return Some(End::Error {
                    side: Some(side),
                    error,
                });
            }
        }
    }
    None
}

struct StepOutcome {
    /// This direction needs another look soon: bytes to copy, a backlog to drain before a
    /// FIN, or a lag budget the sink has not yet made room in.
    attention: bool,
    /// The direction runs through userspace: its arriving bytes are ours to copy.
    on_userspace: bool,
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
        attention: false,
        on_userspace: false,
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
    if in_kernel && !d.eof && counters.redirected_bytes < d.refresh_at {
        // The kernel carries this direction well inside its budget: nothing to copy, and
        // the budget needs no move yet (so the sink's counters need no syscalls). The
        // verdict reports when it reaches the refresh mark.
        return Ok(outcome);
    }
    let sink = SinkState::read(d, &counters)?;
    if counters.over_budget > d.over_budget_seen {
        divert(d, &counters, sink.backlog, options, metrics);
    }
    if counters.passed_bytes != d.passed_mark || d.diverted {
        let (copied, attention) =
            step_userspace(datapath, d, &counters, &sink, options, metrics).await?;
        outcome.copied = copied;
        outcome.attention = attention;
        outcome.on_userspace = d.diverted || counters.passed_bytes != d.passed_mark;
    } else {
        move_budget(datapath, d, sink.acked, options.max_lag)?;
        // Still past the refresh mark: the sink has not made room yet, so look again soon
        // (the verdict reports a crossing only once).
        outcome.attention = !d.eof && d.redirected >= d.refresh_at;
    }
    if d.eof && !pass_on_fin(datapath, d)? {
        outcome.attention = true;
    }
    Ok(outcome)
}

/// Where a direction's sink stands.
struct SinkState {
    /// Everything this direction put into the sink: kernel redirects plus our copies.
    owed: u64,
    /// Of which the sink's send queue has not taken yet.
    backlog: u64,
    /// The sink's acknowledged bytes (its peer's), as TCP counts them.
    acked: u64,
}

impl SinkState {
    fn read(d: &Direction<'_>, counters: &SockCounters) -> io::Result<Self> {
        let sink = sys::tcp_bytes(d.sink.as_fd())?;
        let owed = counters.redirected_bytes + d.copied;
        let written = sink.written().saturating_sub(d.sink_base);
        Ok(Self {
            owed,
            backlog: owed.saturating_sub(written),
            acked: sink.acked,
        })
    }
}

/// The verdict found the sink behind by the whole budget and stopped redirecting: this
/// direction goes through userspace, where TCP flow control holds the sender, until the
/// sink catches up.
fn divert(
    d: &mut Direction<'_>,
    counters: &SockCounters,
    backlog: u64,
    options: &SessionOptions,
    metrics: &L4Metrics,
) {
    d.over_budget_seen = counters.over_budget;
    d.diverted = true;
    metrics::add(&metrics.diverted_slow_peer, 1);
    tracing::debug!(
        backlog,
        max_lag = options.max_lag,
        "peer fell behind; direction paused on the userspace path"
    );
}

/// A direction on the userspace path: copies what may follow the kernel's bytes, and
/// hands the direction back to the kernel once the sink has caught up. Returns (bytes
/// copied, whether it needs another look soon).
async fn step_userspace(
    datapath: &Datapath,
    d: &mut Direction<'_>,
    counters: &SockCounters,
    sink: &SinkState,
    options: &SessionOptions,
    metrics: &L4Metrics,
) -> io::Result<(u64, bool)> {
    tracing::trace!(
        redirected = counters.redirected_bytes,
        passed = counters.passed_bytes,
        copied = d.copied,
        backlog = sink.backlog,
        "direction on the userspace path"
    );
    let mut copied = 0;
    if sink.backlog == 0 {
        // The kernel's bytes are all in the sink: ours may follow without reordering.
        copied = copy_ready_bytes(d).await?;
        // Back to the kernel only once the sink's peer has acknowledged most of what it
        // was sent: a large send buffer empties the backlog long before that, and
        // resuming then would spend the budget at once and divert again.
        let unacked = sink
            .owed
            .saturating_sub(sink.acked.saturating_sub(d.sink_base));
        if !d.eof && d.diverted && unacked < options.max_lag / 2 {
            try_resume(datapath, d, options, metrics)?;
        }
    }
    // Passed bytes not yet copied (we wait for the backlog, the sink, or more to read).
    let attention = (counters.passed_bytes > d.read && !d.eof)
        || !d.pending.is_empty()
        || sink.backlog > 0
        || d.diverted;
    Ok((copied, attention))
}

/// Moves the budget along with what the sink's peer has acknowledged (not merely what
/// entered the send buffer: spliced sockets have large ones, see `SPLICE_SNDBUF`, and the
/// budget must bound them too); skips small moves to save map updates. Our own copies are
/// in the count too, hence the subtraction.
fn move_budget(
    datapath: &Datapath,
    d: &mut Direction<'_>,
    sink_acked: u64,
    max_lag: u64,
) -> io::Result<()> {
    let limit = sink_acked
        .saturating_sub(d.sink_base)
        .saturating_sub(d.copied)
        .saturating_add(max_lag);
    if limit >= d.limit.saturating_add(max_lag / 8) {
        d.set_link(datapath, limit, max_lag, d.passed_mark)?;
    }
    Ok(())
}

/// Shuts the sink's write side once every byte before `src`'s FIN has reached it: met
/// the verdict (or been read by us), been copied if passed, and left the sink's backlog.
/// Returns whether it did.
fn pass_on_fin(datapath: &Datapath, d: &mut Direction<'_>) -> io::Result<bool> {
    let src = sys::tcp_counts(d.src.as_fd())?;
    let counters = datapath.counters(d.src_cookie)?;
    d.redirected = counters.redirected_bytes;
    // The FIN takes one sequence number.
    let accounted = counters.redirected_bytes + counters.passed_bytes.max(d.read) + 1;
    let all_seen = accounted >= src.received;
    let all_copied = d.read >= counters.passed_bytes && d.pending.is_empty();
    let flushed = sys::tcp_bytes(d.sink.as_fd())?.written() >= counters.redirected_bytes + d.copied;
    if all_seen && all_copied && flushed {
        sys::shutdown_write(d.sink.as_fd())?;
        d.shut = true;
    }
    Ok(d.shut)
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
        let sink_acked = sys::tcp_counts(d.sink.as_fd())?
            .acked
            .saturating_sub(d.sink_base);
        let limit = sink_acked
            .saturating_sub(d.copied)
            .saturating_add(options.max_lag);
        d.set_link(datapath, limit, options.max_lag, now.passed_bytes)?;
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
fn copy_once(d: &mut Direction<'_>, buf: &mut [u8]) -> io::Result<Read> {
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
        match copy_once(d, &mut buf)? {
            Read::Copied(n) => total += n,
            Read::Empty | Read::Eof | Read::SinkFull => return Ok(total),
        }
        // A long copy yields now and then, so one busy direction does not hold a worker.
        tokio::task::yield_now().await;
    }
}
