//! L4 passthrough (MQTT 8883, AMQP 5671, any TCP): accept, route (optionally by TLS SNI,
//! peeked, never consumed), connect the upstream, then splice the pair in the kernel or,
//! when that is impossible, copy in userspace. TLS bytes are never looked into beyond
//! the ClientHello's server name.

pub(crate) mod copy;
pub(crate) mod originate;
pub(crate) mod session;
pub mod sni;
pub(crate) mod supervisor;
pub mod upstream;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admission::Gate;
use crate::conn_list::Registration;
use crate::ebpf::{Datapath, SpliceError, SplicedPair};
pub use crate::keepalive::Keepalive;
use crate::keepalive::set_keepalive_or_warn;
use crate::log_limit::info_limited;
use crate::metrics::{self, ActiveGuard, L4Metrics};
use crate::sys;
use sni::ClientHello;
use upstream::Pool;

/// Send buffer of spliced sockets. The kernel's redirect worker, finding the peer's send
/// buffer full, retries a jiffy later (4 ms at HZ=250) rather than on write space; with
/// autotuned buffers (<= tcp_wmem's 4 MiB) a fast flow drains the buffer well before
/// that, the path idles, the lag budget fills and the direction pauses in userspace. The
/// lag budget counts unacknowledged bytes, so this does not loosen its memory bound.
/// (Measured, veth, one stream: userspace share of bytes 40% -> 4%, proxy CPU per GiB
/// 0.5 -> 0.15 s.)
const SPLICE_SNDBUF: libc::c_int = 8 << 20;

/// Per-connection limits of the L4 path.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Close a connection with no byte in either direction for this long (default: see
    /// `config::DEFAULT_IDLE_TIMEOUT_SECS`).
    pub idle_timeout: Duration,
    /// Bytes a spliced direction may queue in the kernel for a peer that does not read
    /// before that direction moves to the userspace path (where TCP flow control holds).
    pub max_lag: u64,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(crate::config::DEFAULT_IDLE_TIMEOUT_SECS),
            max_lag: crate::config::DEFAULT_MAX_LAG_BYTES,
        }
    }
}

/// Which path carried a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    Kernel,
    Userspace,
}

/// One end of an L4 connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

impl Side {
    /// The side of index 0 (client) or 1 (upstream) in a pair.
    pub fn of(index: usize) -> Self {
        if index == 0 {
            Self::Client
        } else {
            Self::Upstream
        }
    }

    /// The far end.
    pub fn other(self) -> Self {
        match self {
            Self::Client => Self::Upstream,
            Self::Upstream => Self::Client,
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed (FIN both ways).
    Closed,
    IdleTimeout,
    /// `side` (where known) reset the connection; the other side was reset too.
    Reset {
        side: Option<Side>,
    },
    /// The kernel path could not keep the byte stream exact (see
    /// `SockCounters::stream_errors`): both sides are reset.
    Broken,
    /// The agent could not go on (a failed syscall), on `side` where known.
    Error {
        side: Option<Side>,
        error: io::Error,
    },
    /// Not ended: handed to the agent's next binary (`crate::upgrade`), which counts its
    /// bytes and its end.
    HandedOver,
}

/// What happened to one connection, whatever path carried it: `finish` turns it into
/// counters and the closing log line.
#[derive(Debug)]
pub struct Outcome {
    pub carrier: Carrier,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Payload bytes that crossed userspace: 0 for a connection the kernel carried alone.
    pub userspace_bytes: u64,
    /// A direction moved to userspace because its peer fell behind.
    pub diverted: bool,
    pub end: End,
}

impl Outcome {
    /// A spliced connection the next agent took over.
    pub fn handed_over() -> Self {
        Self {
            carrier: Carrier::Kernel,
            bytes_up: 0,
            bytes_down: 0,
            userspace_bytes: 0,
            diverted: false,
            end: End::HandedOver,
        }
    }

    /// A connection the copy engine carried: every byte crossed userspace.
    pub fn copied(copied: crate::relay::Copied) -> Self {
        Self {
            carrier: Carrier::Userspace,
            bytes_up: copied.bytes_up,
            bytes_down: copied.bytes_down,
            userspace_bytes: copied.bytes_up + copied.bytes_down,
            diverted: false,
            end: copied.end,
        }
    }

    /// A connection that ended in an error before any byte moved.
    pub fn failed(carrier: Carrier, error: io::Error) -> Self {
        Self {
            carrier,
            bytes_up: 0,
            bytes_down: 0,
            userspace_bytes: 0,
            diverted: false,
            end: End::Error { side: None, error },
        }
    }
}

/// The one place a finished L4 connection is counted and logged.
pub fn finish(outcome: &Outcome, metrics: &L4Metrics) {
    metrics::add(&metrics.bytes_up, outcome.bytes_up);
    metrics::add(&metrics.bytes_down, outcome.bytes_down);
    metrics::add(&metrics.userspace_payload_bytes, outcome.userspace_bytes);
    match &outcome.end {
        End::Closed => {}
        End::IdleTimeout => metrics::add(&metrics.idle_timeouts, 1),
        End::Reset { .. } => metrics::add(&metrics.resets, 1),
        End::Broken => {
            metrics::add(&metrics.kernel_stream_errors, 1);
            tracing::error!(
                "the kernel could not cut a retransmitted segment's repeated bytes; \
                 reset the connection rather than forward them twice"
            );
        }
        End::Error { side, error } => {
            metrics::add(&metrics.session_errors, 1);
            tracing::warn!(?side, %error, "connection ended by an error");
        }
        End::HandedOver => {
            metrics::add(&metrics.handed_over, 1);
            return;
        }
    }
    tracing::debug!(
        carrier = ?outcome.carrier,
        up = outcome.bytes_up,
        down = outcome.bytes_down,
        userspace = outcome.userspace_bytes,
        diverted = outcome.diverted,
        end = ?outcome.end,
        "connection ended"
    );
}

/// A configured L4 frontend, ready to serve.
#[derive(Debug)]
pub struct L4Frontend {
    pub name: String,
    /// Backend per lower-case SNI host name; empty: no SNI peeking at all.
    pub sni_routes: HashMap<String, Arc<Pool>>,
    /// Backend for connections without a matching SNI route (None: close them).
    pub default_backend: Option<Arc<Pool>>,
    pub session: SessionOptions,
    /// Splice in the kernel (false: userspace copy only, e.g. `--no-ebpf`).
    pub kernel: bool,
    pub client_hello_timeout: Duration,
    pub keepalive: Option<Keepalive>,
    /// Connection caps in front of the listener.
    pub gate: Gate,
    /// Transparent mode: a connection no backend takes goes to its original destination
    /// (see `crate::transparent`).
    pub original_destination: Option<OriginalDestination>,
}

/// How a transparent frontend connects a device's original destination (no backend).
#[derive(Clone, Copy, Debug)]
pub struct OriginalDestination {
    pub connect_timeout: Duration,
    /// Write a PROXY v2 header first.
    pub send_proxy_v2: bool,
    /// Connect from the device's own address.
    pub preserve_source: bool,
}

/// Accepts until `shutdown` turns true. Each connection runs in its own task.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<L4Frontend>,
    datapath: Option<Arc<Datapath>>,
    metrics: Arc<L4Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    // Accepted sockets inherit the listener's keepalive: no per-connection syscalls.
    set_keepalive_or_warn(listener.as_fd(), frontend.keepalive);
    let counters = metrics.gate();
    let serve = |client, peer, admitted| {
        let (frontend, datapath, metrics) = (frontend.clone(), datapath.clone(), metrics.clone());
        async move {
            handle_connection((client, peer), &frontend, datapath.as_deref(), &metrics).await;
            drop(admitted);
        }
    };
    frontend
        .gate
        .serve(&listener, shutdown, &counters, serve)
        .await;
}

/// Serves one accepted connection to its end: route, connect, splice (or fall back to
/// the userspace copy), finish.
///
/// An `async` block, not an `async fn`: the latter copies its arguments into its body's
/// state, which a spliced connection's task would hold for its whole life.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold its arguments twice"
)]
pub fn handle_connection<'a>(
    (client, peer): (TcpStream, SocketAddr),
    frontend: &'a L4Frontend,
    datapath: Option<&'a Datapath>,
    metrics: &'a L4Metrics,
) -> impl Future<Output = ()> + 'a {
    async move {
        let _active = ActiveGuard::new(&metrics.active);
        metrics::add(&metrics.accepted, 1);
        let _ = client.set_nodelay(true);
        // Boxed: only the set-up needs it; inline it would size the whole task.
        let Some((upstream, upstream_addr)) =
            Box::pin(open_upstream(&client, peer, frontend, metrics)).await
        else {
            return;
        };
        let outcome = carry(
            (client, peer),
            (upstream, upstream_addr),
            frontend,
            datapath,
            metrics,
        )
        .await;
        finish(&outcome, metrics);
    }
}

/// Routes the client and connects its upstream; `None` when the client was turned away.
async fn open_upstream(
    client: &TcpStream,
    peer: SocketAddr,
    frontend: &L4Frontend,
    metrics: &L4Metrics,
) -> Option<(TcpStream, SocketAddr)> {
    let pool = match route(client, frontend, metrics).await {
        Ok(pool) => pool,
        Err(reason) => {
            // Counted by kind in `route`; a flood of silent clients must not flood the log.
            info_limited!(%reason, "connection refused by routing");
            if reason.is_unknown_name() {
                // TLS alert unrecognized_name (fatal): the client's TLS stack says why. Seven
                // bytes into a fresh send buffer: a write that cannot wait is enough.
                let _ = client.try_write(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70]);
            }
            return None;
        }
    };
    // The device's address, for an upstream that preserves it.
    let source = Some(peer.ip());
    let original = frontend.original_destination;
    let connected = match &pool {
        Some(pool) => pool
            .connect_as(source)
            .await
            .map_err(|err| upstream_failed(&err, metrics)),
        None => {
            let timeout = original.map_or(Duration::from_secs(5), |o| o.connect_timeout);
            let from = source.filter(|_| original.is_some_and(|o| o.preserve_source));
            crate::transparent::upstream::connect_original(client, timeout, from)
                .await
                .map_err(|err| {
                    metrics::add(&metrics.upstream_connect_failed, 1);
                    info_limited!(%err, "original destination unreachable; closing client");
                })
        }
    };
    let Ok((upstream, upstream_addr)) = connected else {
        return None;
    };
    let proxy_v2 = match &pool {
        Some(pool) => pool.send_proxy_v2,
        None => original.is_some_and(|o| o.send_proxy_v2),
    };
    if proxy_v2
        && let Err(err) = crate::transparent::upstream::send_proxy_v2(&upstream, client).await
    {
        metrics::add(&metrics.upstream_connect_failed, 1);
        tracing::warn!(%err, "could not send the PROXY v2 header upstream; closing client");
        return None;
    }
    // The client's came with it from the listener (see `serve`).
    set_keepalive_or_warn(upstream.as_fd(), frontend.keepalive);
    Some((upstream, upstream_addr))
}

/// Counts and logs a client turned away for want of an upstream. A device refused by
/// connect pacing is counted by its backend and logged at debug: in a reconnect storm
/// there are thousands, and the log must not flood.
pub fn upstream_failed(err: &upstream::ConnectError, metrics: &L4Metrics) {
    if err.paced.is_some() {
        tracing::debug!(%err, "device refused by connect pacing; closing client");
    } else {
        metrics::add(&metrics.upstream_connect_failed, 1);
        tracing::warn!(%err, "upstream unreachable; closing client");
    }
}

/// Carries a connected pair to its end: in the kernel when it can, else in userspace.
///
/// The splice is set up here, before the returned future runs. Both paths' futures are
/// boxed: moved out of the returned future's captures into its await, either would be held
/// twice for the connection's whole life (a spliced connection's task lives for months:
/// see the fleet bench's memory per connection).
fn carry<'a>(
    (client, peer): (TcpStream, SocketAddr),
    (upstream, upstream_addr): (TcpStream, SocketAddr),
    frontend: &'a L4Frontend,
    datapath: Option<&'a Datapath>,
    metrics: &'a L4Metrics,
) -> impl Future<Output = Outcome> + 'a {
    let pair = SplicedPair::of(client.as_fd(), upstream.as_fd());
    // Listed for `forwarder conns` while it lives (needs the maps, not the splice).
    let mut registration = match (datapath, &pair) {
        (Some(dp), Ok(pair)) => Registration::l4(
            dp,
            &frontend.name,
            peer,
            upstream_addr,
            *pair,
            frontend.kernel,
        ),
        _ => None,
    };
    let path = match (frontend.kernel, datapath, pair) {
        (true, Some(datapath), Ok(pair)) => {
            match splice(datapath, pair, client, upstream, frontend.session.max_lag) {
                Ok(spliced) => {
                    metrics::add(&metrics.kernel_spliced, 1);
                    tracing::debug!(%upstream_addr, cookie = pair.client, "spliced in the kernel");
                    Path::Kernel(Box::pin(session::run(
                        datapath,
                        spliced,
                        &frontend.session,
                        metrics,
                        &frontend.name,
                    )))
                }
                Err(Unspliced::Fallback(client, upstream, err)) => {
                    metrics::add(fallback_counter(&err, metrics), 1);
                    tracing::info!(%err, "kernel splice unavailable; serving in userspace");
                    Path::Userspace(client, upstream)
                }
                Err(Unspliced::Lost(error)) => Path::Failed(error),
            }
        }
        (true, _, _) => {
            metrics::add(&metrics.fallback_other, 1);
            Path::Userspace(client, upstream)
        }
        (false, _, _) => Path::Userspace(client, upstream),
    };
    async move {
        match path {
            Path::Kernel(session) => {
                let outcome = session.await;
                if matches!(outcome.end, End::HandedOver) {
                    // The next agent lists it from now on (same entry, same map).
                    if let Some(registration) = registration {
                        registration.hand_over();
                    }
                }
                outcome
            }
            Path::Userspace(client, upstream) => {
                metrics::add(&metrics.userspace, 1);
                if let Some(registration) = registration.as_mut() {
                    registration.set_userspace();
                }
                let copy = copy::run(client, upstream, &frontend.session, registration.as_mut());
                Box::pin(copy).await
            }
            Path::Failed(error) => Outcome::failed(Carrier::Kernel, error),
        }
    }
}

/// Which way `carry` goes on with a connected pair.
enum Path<S> {
    /// Spliced: the session that watches it.
    Kernel(Pin<Box<S>>),
    Userspace(TcpStream, TcpStream),
    /// Lost between tokio and the agent's own polling (see `Unspliced::Lost`).
    Failed(io::Error),
}

fn fallback_counter<'m>(err: &SpliceError, metrics: &'m L4Metrics) -> &'m AtomicU64 {
    match err {
        SpliceError::MapFull => &metrics.fallback_map_full,
        SpliceError::NotEstablished => &metrics.fallback_not_established,
        SpliceError::Io(_) => &metrics.fallback_other,
    }
}

/// Why `splice` gave the pair back (or could not).
enum Unspliced {
    /// The kernel did not take it: serve it in userspace.
    Fallback(TcpStream, TcpStream, SpliceError),
    /// Moving a socket between tokio and the agent's own polling failed (the kernel
    /// refused an epoll change); tokio closes the socket then, so the connection ends.
    Lost(io::Error),
}

/// Hands the pair to the kernel. The sockets leave tokio first: tokio's registration
/// (`EPOLLIN | EPOLLOUT`) would wake the agent for every redirected segment (see
/// `supervisor`). On failure they come back, for the userspace path.
fn splice(
    datapath: &Datapath,
    pair: SplicedPair,
    client: TcpStream,
    upstream: TcpStream,
    max_lag: u64,
) -> Result<session::Spliced, Unspliced> {
    let (client, upstream) = match (client.into_std(), upstream.into_std()) {
        (Ok(c), Ok(u)) => (c, u),
        (Err(err), _) | (_, Err(err)) => return Err(Unspliced::Lost(err)),
    };
    for s in [&client, &upstream] {
        if let Err(err) = sys::set_sndbuf_force(s.as_fd(), SPLICE_SNDBUF) {
            tracing::debug!(%err, "could not raise the send buffer");
        }
    }
    let written_before = session::WrittenBefore::measure(&client, &upstream).unwrap_or_default();
    let watched = datapath.supervisor().and_then(|s| {
        s.watch(
            [pair.client, pair.upstream],
            [client.as_fd(), upstream.as_fd()],
        )
    });
    let spliced = watched.map_err(SpliceError::Io).and_then(|watch| {
        datapath.splice(pair, client.as_fd(), upstream.as_fd(), max_lag)?;
        Ok(watch)
    });
    match spliced {
        Ok(watch) => Ok(session::Spliced {
            pair,
            client,
            upstream,
            written_before,
            watch,
        }),
        Err(err) => match (TcpStream::from_std(client), TcpStream::from_std(upstream)) {
            (Ok(c), Ok(u)) => Err(Unspliced::Fallback(c, u, err)),
            (Err(e), _) | (_, Err(e)) => Err(Unspliced::Lost(e)),
        },
    }
}
#[derive(Debug, thiserror::Error)]
enum RouteError {
    #[error("no route for server name {0:?} and no default backend")]
    UnknownName(Option<String>),
    #[error("no complete ClientHello within {0:?}")]
    HelloTimeout(Duration),
    #[error("client went away before sending a ClientHello: {0}")]
    Gone(String),
}

impl RouteError {
    fn is_unknown_name(&self) -> bool {
        matches!(self, Self::UnknownName(_))
    }
}

/// The backend for this client; `None`: its original destination (transparent mode).
async fn route(
    client: &TcpStream,
    frontend: &L4Frontend,
    metrics: &L4Metrics,
) -> Result<Option<Arc<Pool>>, RouteError> {
    if frontend.sni_routes.is_empty() {
        return match &frontend.default_backend {
            Some(pool) => Ok(Some(pool.clone())),
            None if frontend.original_destination.is_some() => Ok(None),
            None => Err(RouteError::UnknownName(None)),
        };
    }
    let name =
        match tokio::time::timeout(frontend.client_hello_timeout, peek_server_name(client)).await {
            Ok(Ok(name)) => name,
            Ok(Err(err)) => return Err(RouteError::Gone(err.to_string())),
            Err(_) => {
                metrics::add(&metrics.client_hello_timeout, 1);
                return Err(RouteError::HelloTimeout(frontend.client_hello_timeout));
            }
        };
    if let Some(pool) = name.as_deref().and_then(|n| frontend.sni_routes.get(n)) {
        return Ok(Some(pool.clone()));
    }
    match &frontend.default_backend {
        Some(pool) => Ok(Some(pool.clone())),
        None if frontend.original_destination.is_some() => Ok(None),
        None => {
            metrics::add(&metrics.sni_unknown, 1);
            Err(RouteError::UnknownName(name))
        }
    }
}

/// Peeks (MSG_PEEK: the bytes stay queued for the upstream) until the ClientHello's
/// first record is complete. Event-driven: while the record is incomplete, `SO_RCVLOWAT`
/// asks the kernel to wake the task only once every byte the record still needs is
/// queued (or at EOF or error), so a silent or partial hello costs nothing until its
/// timeout. (A peek leaves the bytes queued, so readiness alone would report them again
/// and again.)
async fn peek_server_name(client: &TcpStream) -> io::Result<Option<String>> {
    let _restore = RcvLowatReset(client);
    let mut buf = vec![0u8; sni::MAX_CLIENT_HELLO];
    loop {
        client.readable().await?;
        let looked = client.try_io(tokio::io::Interest::READABLE, || {
            let n = sys::peek_now(client.as_fd(), &mut buf)?;
            if n == 0 {
                return Ok(Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF")));
            }
            match sni::parse_client_hello(&buf[..n]) {
                ClientHello::Parsed { server_name } => Ok(Ok(server_name)),
                ClientHello::NotTls => Ok(Ok(None)),
                ClientHello::Incomplete { need } if need > buf.len() || n == buf.len() => {
                    Ok(Ok(None))
                }
                ClientHello::Incomplete { need } => {
                    // Setting it re-checks the queue: bytes that arrived since the peek
                    // raise a fresh readiness event, so none is missed.
                    sys::set_rcvlowat(client.as_fd(), need.try_into().unwrap_or(i32::MAX))?;
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
        });
        match looked {
            Ok(done) => return done,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
}

/// Puts `SO_RCVLOWAT` back to 1 however the peek ends (the splice and the copy path
/// rely on it).
struct RcvLowatReset<'a>(&'a TcpStream);

impl Drop for RcvLowatReset<'_> {
    fn drop(&mut self) {
        let _ = sys::set_rcvlowat(self.0.as_fd(), 1);
    }
}
