//! Joins an upgraded (WebSocket) client stream to the upstream's after the `101`: bytes
//! copied both ways untouched until either side closes, half-close passed on, and an
//! idle timeout long enough for MQTT keep-alives.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::{self, ActiveGuard, HttpMetrics};
use crate::sys;

/// Shared between both directions: when a byte last moved.
struct Activity {
    last_ns: AtomicU64,
}

/// A stream that stamps `Activity` and counts the bytes read from it.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
            self.activity
                .last_ns
                .store(sys::monotonic_ns(), Ordering::Relaxed);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Waits for both upgrades, then copies until both directions end or the session idles.
pub async fn join(
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Duration,
    metrics: Arc<HttpMetrics>,
) {
    let _active = ActiveGuard::new(&metrics.websockets_active);
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(err) => {
            tracing::debug!(%err, "upgrade did not complete");
            return;
        }
    };
    let activity = Arc::new(Activity {
        last_ns: AtomicU64::new(sys::monotonic_ns()),
    });
    let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut client = Watched {
        inner: TokioIo::new(client),
        activity: activity.clone(),
        read: up.clone(),
    };
    let mut upstream = Watched {
        inner: TokioIo::new(upstream),
        activity: activity.clone(),
        read: down.clone(),
    };
    let idle_ns = u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let watchdog = async {
        let period = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            let last = activity.last_ns.load(Ordering::Relaxed);
            if sys::monotonic_ns().saturating_sub(last) > idle_ns {
                return;
            }
        }
    };
    tokio::select! {
        result = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(err) = result {
                tracing::debug!(%err, "upgraded session ended with an error");
            }
        }
        () = watchdog => {
            metrics::add(&metrics.websocket_idle_timeouts, 1);
            tracing::info!(?idle_timeout, "upgraded session closed: idle timeout");
        }
    }
    metrics::add(&metrics.websocket_bytes_up, up.load(Ordering::Relaxed));
    metrics::add(&metrics.websocket_bytes_down, down.load(Ordering::Relaxed));
}
