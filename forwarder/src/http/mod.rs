//! The terminated HTTPS path (443): TLS ends here (rustls), each request is rewritten
//! for the hub and re-originated over verified TLS (hyper), WebSocket upgrades are
//! joined after the hub's `101`. This is what fixes `401 IoTHubNotFound` behind a proxy.

pub(crate) mod connector;
pub(crate) mod counted;
pub mod headers;
pub(crate) mod idle;
pub(crate) mod preface;
pub(crate) mod proxy;
pub(crate) mod tls;
pub(crate) mod tunnel;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::{TlsAcceptor, server};

use crate::admission::{Admitted, Gate};
use crate::ebpf::Datapath;
use crate::keepalive::{Keepalive, set_keepalive_or_warn};
use crate::log_limit::info_limited;
use crate::metrics::{self, ActiveGuard, HttpMetrics};
use counted::{CountedStream, Listing};
use idle::{Activity, Tracked};
use preface::{Opening, Protocol, Replay};
use proxy::Proxy;

/// Limits that protect the frontend from slow or hostile clients (the connection caps
/// are the frontend's `gate`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time for the TLS handshake and for each request's headers.
    pub header_read_timeout: Duration,
    /// Request head size at most (HTTP/1.1 buffer, HTTP/2 header list); 431 above it.
    pub max_header_bytes: usize,
    /// Time a connection may stay open with no request in progress.
    pub idle_timeout: Duration,
    /// TCP keepalive on client sockets (`None`: off).
    pub keepalive: Option<Keepalive>,
}

/// HTTP/2 keep-alive: a PING after this long without a frame from the client...
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// ...and the connection closed if its answer takes longer than this.
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// After an idle close starts: a live HTTP/2 client answers the GOAWAY's PING within a
/// round trip; one that went away is dropped here instead of after the PING timeout.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(5);

pub struct HttpFrontend {
    pub name: String,
    pub tls: TlsAcceptor,
    pub proxy: Arc<Proxy>,
    pub limits: Limits,
    /// Connection caps in front of the listener; an upgraded WebSocket session keeps
    /// its client's slot.
    pub gate: Gate,
    /// The agent's maps, to list each connection for `forwarder conns` (none with
    /// `--no-ebpf`).
    pub datapath: Option<Arc<Datapath>>,
}

/// Accepts until `shutdown`, one task per connection. Connections close gracefully on
/// `connections` (the agent's stop), not on `shutdown`: a reload that replaces the
/// frontend (a new certificate, say) leaves its keep-alive connections open.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<HttpFrontend>,
    metrics: Arc<HttpMetrics>,
    shutdown: watch::Receiver<bool>,
    connections: watch::Receiver<bool>,
) {
    let (http1, http2) = builders(&frontend.limits);
    let shared = Arc::new(Shared {
        http1,
        http2,
        listing: frontend
            .datapath
            .clone()
            .map(|dp| Listing::start(dp, &frontend.name, connections.clone())),
    });
    let counters = metrics.gate();
    let serve = |stream, peer, admitted| {
        metrics::add(&metrics.accepted, 1);
        serve_connection(
            stream,
            peer,
            frontend.clone(),
            shared.clone(),
            metrics.clone(),
            Arc::new(admitted),
            connections.clone(),
        )
    };
    frontend
        .gate
        .serve(&listener, shutdown, &counters, serve)
        .await;
}

type Builder = auto::Builder<TokioExecutor>;

/// What every connection of a frontend uses.
struct Shared {
    http1: Builder,
    http2: Builder,
    /// Lists connections for `forwarder conns` (with the agent's maps).
    listing: Option<Arc<Listing>>,
}

/// One builder per protocol. hyper still sniffs the version itself (it always does with
/// upgrades), but on bytes `preface::read` has already read under the header timeout.
fn builders(limits: &Limits) -> (Builder, Builder) {
    let mut base = auto::Builder::new(TokioExecutor::new());
    base.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    base.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256)
        // Finds peers that went away (idle connections are pinged too).
        .keep_alive_interval(PING_INTERVAL)
        .keep_alive_timeout(PING_TIMEOUT);
    (base.clone().http1_only(), base.http2_only())
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    frontend: Arc<HttpFrontend>,
    shared: Arc<Shared>,
    metrics: Arc<HttpMetrics>,
    admitted: Arc<Admitted>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _active = ActiveGuard::new(&metrics.active);
    let _ = stream.set_nodelay(true);
    let limits = &frontend.limits;
    // On each socket rather than the listener: the accept loop stays as it is.
    set_keepalive_or_warn(stream.as_fd(), limits.keepalive);
    let stream = CountedStream::new(stream, shared.listing.as_ref());
    let counts = stream.counts();
    let Some(tls) = accept_tls(stream, peer, &frontend, &metrics).await else {
        return;
    };
    let Some((protocol, tls)) = read_opening(tls, peer, &frontend, &metrics).await else {
        return;
    };
    let builder = match protocol {
        Protocol::Http2 => &shared.http2,
        Protocol::Http1 => &shared.http1,
    };
    let activity = Activity::new(counts.clone());
    let proxy = frontend.proxy.clone();
    let tracker = activity.clone();
    let service = service_fn(move |request| {
        let open = tracker.begin();
        let handled = proxy
            .clone()
            .handle(request, peer, counts.clone(), admitted.clone());
        async move {
            let response = handled.await?;
            Ok::<_, Infallible>(response.map(|body| Tracked::new(body, open)))
        }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let idle = activity.idle_for(limits.idle_timeout);
    tokio::pin!(idle);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.changed() => {
            // Finish the request in flight, then close (the agent's drain waits for it).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
        () = &mut idle => {
            metrics::add(&metrics.idle_timeout, 1);
            tracing::debug!(frontend = %frontend.name, %peer, ?protocol,
                "no request for the idle timeout: closing");
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(IDLE_CLOSE_GRACE, connection).await.unwrap_or(Ok(()))
        }
    };
    if let Err(err) = result {
        classify_connection_error(&frontend.name, peer, protocol, &activity, &*err, &metrics);
    }
}

/// The client's TLS handshake, within the header timeout; `None` (counted) when it
/// fails or takes too long.
async fn accept_tls(
    stream: CountedStream,
    peer: SocketAddr,
    frontend: &HttpFrontend,
    metrics: &HttpMetrics,
) -> Option<server::TlsStream<CountedStream>> {
    let handshake = frontend.tls.accept(stream);
    match tokio::time::timeout(frontend.limits.header_read_timeout, handshake).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(err)) => {
            metrics::add(&metrics.tls_handshake_failed, 1);
            info_limited!(frontend = %frontend.name, %peer, %err, "client TLS handshake failed");
            None
        }
        Err(_) => {
            metrics::add(&metrics.tls_handshake_failed, 1);
            info_limited!(frontend = %frontend.name, %peer, "client TLS handshake timed out");
            None
        }
    }
}

/// The protocol the client speaks, read under the header timeout (see `preface`);
/// `None` (counted) when the client closed or was too slow.
async fn read_opening(
    tls: server::TlsStream<CountedStream>,
    peer: SocketAddr,
    frontend: &HttpFrontend,
    metrics: &HttpMetrics,
) -> Option<(Protocol, Replay<server::TlsStream<CountedStream>>)> {
    let alpn_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    match preface::read(tls, alpn_h2, frontend.limits.header_read_timeout).await {
        Opening::Ready(protocol, tls) => Some((protocol, tls)),
        Opening::Closed => None,
        Opening::TimedOut { h2: true } => {
            metrics::add(&metrics.preface_timeout, 1);
            tracing::debug!(frontend = %frontend.name, %peer, "HTTP/2 preface not received in time: closed");
            None
        }
        Opening::TimedOut { h2: false } => {
            metrics::add(&metrics.header_timeout, 1);
            info_limited!(frontend = %frontend.name, %peer, "request headers not received in time: closed");
            None
        }
    }
}

/// hyper has already answered 400/431 where it could; count and log the cause.
fn classify_connection_error(
    frontend: &str,
    peer: SocketAddr,
    protocol: Protocol,
    activity: &Activity,
    err: &(dyn std::error::Error + Send + Sync + 'static),
    metrics: &HttpMetrics,
) {
    let Some(hyper_err) = err.downcast_ref::<hyper::Error>() else {
        tracing::debug!(%frontend, %peer, %err, "connection ended with an error");
        return;
    };
    if hyper_err.is_parse_too_large() {
        metrics::add(&metrics.headers_too_large, 1);
        info_limited!(%frontend, %peer, "request headers too large: 431");
    } else if hyper_err.is_parse() {
        metrics::add(&metrics.bad_request, 1);
        info_limited!(%frontend, %peer, err = %hyper_err, "malformed request: 400");
    } else if hyper_err.is_timeout() && protocol == Protocol::Http2 {
        // The only HTTP/2 timeout hyper has: a keep-alive PING went unanswered.
        metrics::add(&metrics.ping_timeout, 1);
        tracing::debug!(%frontend, %peer, "client stopped answering HTTP/2 PINGs: closed");
    } else if hyper_err.is_timeout() && activity.at_rest() {
        // hyper times the wait for the next keep-alive request as a header read: when it
        // is shorter than the idle timeout, this is where an idle connection ends.
        metrics::add(&metrics.idle_timeout, 1);
        tracing::debug!(%frontend, %peer, "keep-alive connection idle: closed");
    } else if hyper_err.is_timeout() {
        metrics::add(&metrics.header_timeout, 1);
        info_limited!(%frontend, %peer, "request headers not received in time: closed");
    } else {
        tracing::debug!(%frontend, %peer, err = %hyper_err, "connection ended with an error");
    }
}
