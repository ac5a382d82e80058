//! Joins two byte streams in userspace until both directions end (a FIN is passed on as a
//! half-close) or nothing moves for the idle timeout. Used where the kernel cannot
//! splice: upgraded WebSockets after TLS termination, and TLS originated for plain MQTT.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::sys;

/// How a relay ended, and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub bytes_a_to_b: u64,
    pub bytes_b_to_a: u64,
    pub idle_timeout: bool,
    pub error: bool,
}

/// A stream that stamps the shared activity clock and counts the bytes read from it.
struct Watched<S> {
    inner: S,
    last_ns: Arc<AtomicU64>,
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
            self.last_ns.store(sys::monotonic_ns(), Ordering::Relaxed);
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

pub async fn join<A, B>(a: A, b: B, idle_timeout: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last_ns = Arc::new(AtomicU64::new(sys::monotonic_ns()));
    let (from_a, from_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut a = Watched {
        inner: a,
        last_ns: last_ns.clone(),
        read: from_a.clone(),
    };
    let mut b = Watched {
        inner: b,
        last_ns: last_ns.clone(),
        read: from_b.clone(),
    };
    let idle_ns = u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let watchdog = async {
        let period = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            let last = last_ns.load(Ordering::Relaxed);
            if sys::monotonic_ns().saturating_sub(last) > idle_ns {
                return;
            }
        }
    };
    let (idle_timeout, error) = tokio::select! {
        result = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(err) = &result {
                tracing::debug!(%err, "relay ended with an error");
            }
            (false, result.is_err())
        }
        () = watchdog => (true, false),
    };
    Relayed {
        bytes_a_to_b: from_a.load(Ordering::Relaxed),
        bytes_b_to_a: from_b.load(Ordering::Relaxed),
        idle_timeout,
        error,
    }
}
