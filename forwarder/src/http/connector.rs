//! Opens TLS connections to the hub for hyper's pooled client: the TCP connection comes
//! from the backend's server pool (weights, failover, connect timeout) and the TLS server
//! name is the configured one, independent of the address dialled. Each connection holds
//! one of the backend's `max_upstream_connections` slots until it closes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::l4::upstream::{ConnectError, Pool};
use crate::metrics::{self, HttpMetrics};

#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error(transparent)]
    Tcp(#[from] ConnectError),
    #[error("TLS handshake with {server} failed: {source}")]
    Tls {
        server: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS handshake with {0} timed out")]
    TlsTimeout(std::net::SocketAddr),
    #[error("{0} upstream connections open (max_upstream_connections) and none freed in time")]
    AtCapacity(usize),
}

impl ConnectFailure {
    /// Timeouts become 504, everything else 502 (at capacity: 503, see the proxy).
    pub fn timed_out(&self) -> bool {
        match self {
            Self::Tcp(err) => err.timed_out,
            Self::TlsTimeout(_) => true,
            Self::Tls { .. } | Self::AtCapacity(_) => false,
        }
    }
}

/// The cap on a frontend's upstream connections (`max_upstream_connections`).
#[derive(Clone)]
struct Cap {
    slots: Arc<Semaphore>,
    max: usize,
    /// Longest wait for a slot: the request's own time (`response_timeout_ms`) bounds
    /// it too, this only ends connects hyper left running after a pooled connection
    /// served their request.
    wait: Duration,
}

#[derive(Clone)]
pub struct UpstreamConnector {
    pool: Arc<Pool>,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    handshake_timeout: Duration,
    cap: Option<Cap>,
    metrics: Arc<HttpMetrics>,
}

impl UpstreamConnector {
    pub fn new(
        pool: Arc<Pool>,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        handshake_timeout: Duration,
        metrics: Arc<HttpMetrics>,
    ) -> Self {
        Self {
            pool,
            tls: TlsConnector::from(config),
            server_name,
            handshake_timeout,
            cap: None,
            metrics,
        }
    }

    /// At most `max` connections open at once (`None`: no cap); a connect waits up to
    /// `wait` for one to close.
    pub fn with_cap(mut self, max: Option<usize>, wait: Duration) -> Self {
        self.cap = max.map(|max| Cap {
            slots: Arc::new(Semaphore::new(max)),
            max,
            wait,
        });
        self
    }
}

tokio::task_local! {
    /// The slot wait of the request being sent: hyper's client gives the connector only
    /// a URI, so the request handler sets this around `Client::request` and a connect
    /// started for that request (inside the same task) marks in it while it waits.
    static SLOT_WAIT: SlotWait;
}

/// Whether a request is waiting for a free upstream slot, to tell "at capacity" (503)
/// from "the hub is slow" (504) when its time runs out.
#[derive(Clone, Default)]
pub struct SlotWait(Arc<AtomicBool>);

impl SlotWait {
    /// Runs `request` (a `Client::request` future) with this wait visible to connects.
    pub async fn scope<F: Future>(&self, request: F) -> F::Output {
        SLOT_WAIT.scope(self.clone(), request).await
    }

    pub fn waiting(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, waiting: bool) {
        self.0.store(waiting, Ordering::Relaxed);
    }
}

impl Cap {
    /// A slot, at once or after waiting (marked in `wait`) up to the cap's wait.
    async fn acquire(
        &self,
        wait: Option<SlotWait>,
    ) -> Result<OwnedSemaphorePermit, ConnectFailure> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        let wait = wait.unwrap_or_default();
        wait.set(true);
        let acquired = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
        wait.set(false);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphore is never closed; treat it like a timeout all the same.
            Ok(Err(_)) | Err(_) => Err(ConnectFailure::AtCapacity(self.max)),
        }
    }
}

/// An open upstream connection: counted in the gauge, holding its slot (with a cap).
struct Slot {
    _permit: Option<OwnedSemaphorePermit>,
    metrics: Arc<HttpMetrics>,
}

impl Slot {
    fn new(permit: Option<OwnedSemaphorePermit>, metrics: Arc<HttpMetrics>) -> Self {
        metrics::add(&metrics.upstream_connections, 1);
        Self {
            _permit: permit,
            metrics,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::sub(&self.metrics.upstream_connections, 1);
    }
}

/// The server a response came from: hyper's client puts it in every response's
/// extensions (a WebSocket tunnel is listed with it).
#[derive(Clone, Copy, Debug)]
pub struct UpstreamAddr(pub std::net::SocketAddr);

/// A TLS connection to the hub, as hyper's client wants it.
pub struct UpstreamStream {
    io: TokioIo<TlsStream<TcpStream>>,
    server: std::net::SocketAddr,
    _slot: Slot,
}

impl UpstreamStream {
    /// The TLS stream itself (a WebSocket tunnel relays on it after the upgrade).
    pub fn into_tls(self) -> TlsStream<TcpStream> {
        self.io.into_inner()
    }
}

impl Connection for UpstreamStream {
    fn connected(&self) -> Connected {
        Connected::new().extra(UpstreamAddr(self.server))
    }
}

impl hyper::rt::Read for UpstreamStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl tower_service::Service<Uri> for UpstreamConnector {
    type Response = UpstreamStream;
    type Error = ConnectFailure;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamStream, ConnectFailure>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// The URI only keys hyper's pool; where to connect comes from the backend.
    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        // Read here: `call` runs inside the request's task, the returned future may not.
        let wait = SLOT_WAIT.try_with(SlotWait::clone).ok();
        Box::pin(async move {
            let permit = match &this.cap {
                Some(cap) => Some(cap.acquire(wait).await?),
                None => None,
            };
            let (tcp, server) = this.pool.connect().await?;
            let handshake = this.tls.connect(this.server_name.clone(), tcp);
            match tokio::time::timeout(this.handshake_timeout, handshake).await {
                Ok(Ok(tls)) => Ok(UpstreamStream {
                    io: TokioIo::new(tls),
                    server,
                    _slot: Slot::new(permit, this.metrics.clone()),
                }),
                Ok(Err(source)) => Err(ConnectFailure::Tls { server, source }),
                Err(_) => Err(ConnectFailure::TlsTimeout(server)),
            }
        })
    }
}
