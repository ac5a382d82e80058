//! Opens TLS connections to the hub for hyper's pooled client: the TCP connection comes
//! from the backend's server pool (weights, failover, connect timeout) and the TLS server
//! name is the configured one, independent of the address dialled.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::l4::upstream::{ConnectError, Pool};

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
}

impl ConnectFailure {
    /// Timeouts become 504, everything else 502.
    pub fn timed_out(&self) -> bool {
        match self {
            Self::Tcp(err) => err.timed_out,
            Self::TlsTimeout(_) => true,
            Self::Tls { .. } => false,
        }
    }
}

#[derive(Clone)]
pub struct UpstreamConnector {
    pool: Arc<Pool>,
    tls: TlsConnector,
    server_name: ServerName<'static>,
    handshake_timeout: Duration,
}

impl UpstreamConnector {
    pub fn new(
        pool: Arc<Pool>,
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        handshake_timeout: Duration,
    ) -> Self {
        Self {
            pool,
            tls: TlsConnector::from(config),
            server_name,
            handshake_timeout,
        }
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
        Box::pin(async move {
            let (tcp, server) = this.pool.connect().await?;
            let handshake = this.tls.connect(this.server_name.clone(), tcp);
            match tokio::time::timeout(this.handshake_timeout, handshake).await {
                Ok(Ok(tls)) => Ok(UpstreamStream {
                    io: TokioIo::new(tls),
                    server,
                }),
                Ok(Err(source)) => Err(ConnectFailure::Tls { server, source }),
                Err(_) => Err(ConnectFailure::TlsTimeout(server)),
            }
        })
    }
}
