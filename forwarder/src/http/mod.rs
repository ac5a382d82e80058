//! The terminated HTTPS path (443): TLS ends here (rustls), each request is rewritten
//! for the hub and re-originated over verified TLS (hyper), WebSocket upgrades are
//! joined after the hub's `101`. This is what fixes `401 IoTHubNotFound` behind a proxy.

pub mod connector;
pub mod counted;
pub mod headers;
pub mod proxy;
pub mod tls;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::admission::{Admitted, Gate};
use crate::ebpf::Datapath;
use crate::metrics::{self, ActiveGuard, HttpMetrics};
use counted::{CountedStream, Listing};
use proxy::Proxy;

/// A header value from a configured host name.
pub fn header_value(host: &str) -> anyhow::Result<http::HeaderValue> {
    Ok(http::HeaderValue::from_str(host)?)
}

/// Limits that protect the frontend from slow or hostile clients (the connection caps
/// are the frontend's `gate`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Time for the TLS handshake and for each request's headers.
    pub header_read_timeout: Duration,
    /// Request head size at most (HTTP/1.1 buffer, HTTP/2 header list); 431 above it.
    pub max_header_bytes: usize,
}

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

/// Accepts until `shutdown`, one task per connection.
pub async fn serve(
    listener: TcpListener,
    frontend: Arc<HttpFrontend>,
    metrics: Arc<HttpMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (http1, http2) = builders(&frontend.limits);
    let shared = Arc::new(Shared {
        http1,
        http2,
        listing: frontend
            .datapath
            .clone()
            .map(|dp| Listing::start(dp, &frontend.name, shutdown.clone())),
    });
    while let Some((stream, peer, admitted)) = frontend
        .gate
        .accept(&listener, &mut shutdown, &metrics.gate())
        .await
    {
        metrics::add(&metrics.accepted, 1);
        tokio::spawn(serve_connection(
            stream,
            peer,
            frontend.clone(),
            shared.clone(),
            metrics.clone(),
            Arc::new(admitted),
            shutdown.clone(),
        ));
    }
}

type Builder = auto::Builder<TokioExecutor>;

/// What every connection of a frontend uses.
struct Shared {
    http1: Builder,
    http2: Builder,
    /// Lists connections for `forwarder conns` (with the agent's maps).
    listing: Option<Arc<Listing>>,
}

/// One builder per protocol: ALPN already decided which one a connection speaks, so
/// hyper does not have to sniff (sniffing has no timeout against a silent client).
fn builders(limits: &Limits) -> (Builder, Builder) {
    let mut base = auto::Builder::new(TokioExecutor::new());
    base.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    base.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(256);
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
    let stream = CountedStream::new(stream, shared.listing.as_ref());
    let counts = stream.counts();
    let handshake = frontend.tls.accept(stream);
    let tls = match tokio::time::timeout(frontend.limits.header_read_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(err)) => {
            metrics::add(&metrics.tls_handshake_failed, 1);
            tracing::info!(frontend = %frontend.name, %peer, %err, "client TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics::add(&metrics.tls_handshake_failed, 1);
            tracing::info!(frontend = %frontend.name, %peer, "client TLS handshake timed out");
            return;
        }
    };
    let is_h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let builder = if is_h2 { &shared.http2 } else { &shared.http1 };
    let proxy = frontend.proxy.clone();
    let service = service_fn(move |request| {
        proxy
            .clone()
            .handle(request, peer, counts.clone(), admitted.clone())
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = shutdown.changed() => {
            // Finish the request in flight, then close (the agent's drain waits for it).
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(err) = result {
        classify_connection_error(&frontend.name, peer, &*err, &metrics);
    }
}

/// hyper has already answered 400/431 where it could; count and log the cause.
fn classify_connection_error(
    frontend: &str,
    peer: SocketAddr,
    err: &(dyn std::error::Error + Send + Sync + 'static),
    metrics: &HttpMetrics,
) {
    let Some(hyper_err) = err.downcast_ref::<hyper::Error>() else {
        tracing::debug!(%frontend, %peer, %err, "connection ended with an error");
        return;
    };
    if hyper_err.is_parse_too_large() {
        metrics::add(&metrics.headers_too_large, 1);
        tracing::info!(%frontend, %peer, "request headers too large: 431");
    } else if hyper_err.is_parse() {
        metrics::add(&metrics.bad_request, 1);
        tracing::info!(%frontend, %peer, err = %hyper_err, "malformed request: 400");
    } else if hyper_err.is_timeout() {
        metrics::add(&metrics.header_timeout, 1);
        tracing::info!(%frontend, %peer, "request headers not received in time: closed");
    } else {
        tracing::debug!(%frontend, %peer, err = %hyper_err, "connection ended with an error");
    }
}
