//! Joins an upgraded (WebSocket) client stream to the upstream's after the `101`: bytes
//! copied both ways untouched until either side closes, half-close and resets passed on
//! (see `relay`), and an idle timeout long enough for MQTT keep-alives.

use std::io;
use std::os::fd::BorrowedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio_rustls::{client, server};

use crate::admission::Admitted;
use crate::http::connector::UpstreamStream;
use crate::http::counted::CountedStream;
use crate::http::preface::Replay;
use crate::l4::End;
use crate::metrics::{self, ActiveGuard, HttpMetrics};
use crate::relay::{self, Socket};

/// The client's stream under hyper: TLS over the counted TCP socket, behind the bytes
/// `preface::read` looked at first.
type ClientStream = Replay<server::TlsStream<CountedStream>>;

/// Waits for both upgrades, then relays until both directions end or the session idles.
/// The session holds its client's slot under the connection caps (`admitted`) until it
/// ends: hyper ends the connection itself at the upgrade.
pub async fn join(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
    metrics: Arc<HttpMetrics>,
    admitted: Arc<Admitted>,
) {
    let _slot = admitted;
    let _active = ActiveGuard::new(&metrics.websockets_active);
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%err, "upgrade did not complete");
            return;
        }
    };
    let (mut client, client_ahead) = Peer::<ClientStream>::reach(client);
    let (mut upstream, upstream_ahead) = Peer::<client::TlsStream<_>>::reach_upstream(upstream);
    for opaque in [client.is_opaque(), upstream.is_opaque()] {
        metrics::add(&metrics.websocket_sockets_unreached, u64::from(opaque));
    }
    // Bytes hyper read past the upgrade on one side belong to the other, first.
    if let Err(err) = pass_ahead(&mut client, &upstream_ahead, &mut upstream, &client_ahead).await {
        tracing::debug!(%err, "upgraded session ended before the relay");
        return;
    }
    let copied = relay::join(
        relay::Polled(client),
        relay::Polled(upstream),
        idle_timeout,
        |_| {},
    )
    .await;
    if matches!(copied.end, End::IdleTimeout) {
        metrics::add(&metrics.websocket_idle_timeouts, 1);
        tracing::info!(?idle_timeout, "upgraded session closed: idle timeout");
    }
    let ahead = |b: &bytes::Bytes| b.len() as u64;
    metrics::add(
        &metrics.websocket_bytes_up,
        copied.bytes_up + ahead(&client_ahead),
    );
    metrics::add(
        &metrics.websocket_bytes_down,
        copied.bytes_down + ahead(&upstream_ahead),
    );
}

async fn pass_ahead<C, U>(
    client: &mut C,
    to_client: &[u8],
    upstream: &mut U,
    to_upstream: &[u8],
) -> io::Result<()>
where
    C: AsyncWrite + Unpin,
    U: AsyncWrite + Unpin,
{
    if !to_upstream.is_empty() {
        upstream.write_all(to_upstream).await?;
    }
    if !to_client.is_empty() {
        client.write_all(to_client).await?;
    }
    Ok(())
}

/// One side of the tunnel: the stream under hyper's upgrade when its type is the one
/// this agent made (so the relay reaches its TCP socket), else hyper's opaque stream.
enum Peer<T> {
    Reached(T),
    Opaque(TokioIo<Upgraded>),
}

impl Peer<ClientStream> {
    /// The client's TLS stream, and the bytes hyper read ahead of the upgrade.
    fn reach(upgraded: Upgraded) -> (Self, bytes::Bytes) {
        // hyper_util's auto server wraps the stream in a private type: its own downcast
        // sees through it.
        match auto::upgrade::downcast::<TokioIo<ClientStream>>(upgraded) {
            Ok(parts) => (Self::Reached(parts.io.into_inner()), parts.read_buf),
            Err(opaque) => (Self::opaque(opaque), bytes::Bytes::new()),
        }
    }
}

impl Peer<client::TlsStream<tokio::net::TcpStream>> {
    /// The upstream's TLS stream, and the bytes hyper read ahead of the upgrade.
    fn reach_upstream(upgraded: Upgraded) -> (Self, bytes::Bytes) {
        match upgraded.downcast::<UpstreamStream>() {
            Ok(parts) => (Self::Reached(parts.io.into_tls()), parts.read_buf),
            Err(opaque) => (Self::opaque(opaque), bytes::Bytes::new()),
        }
    }
}

impl<T> Peer<T> {
    fn opaque(upgraded: Upgraded) -> Self {
        tracing::warn!("upgraded stream of an unexpected type: its resets pass on as FINs");
        Self::Opaque(TokioIo::new(upgraded))
    }

    fn is_opaque(&self) -> bool {
        matches!(self, Self::Opaque(_))
    }
}

impl<T: Socket> Socket for Peer<T> {
    fn tcp(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::Reached(s) => s.tcp(),
            Self::Opaque(_) => None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Peer<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Reached(s) => Pin::new(s).poll_read(cx, buf),
            Self::Opaque(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Peer<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Reached(s) => Pin::new(s).poll_write(cx, buf),
            Self::Opaque(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Reached(s) => Pin::new(s).poll_flush(cx),
            Self::Opaque(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Reached(s) => Pin::new(s).poll_shutdown(cx),
            Self::Opaque(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
