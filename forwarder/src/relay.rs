//! Joins two byte streams in userspace until both directions end (a FIN is passed on as a
//! half-close) or nothing moves for the idle timeout. Used where the kernel cannot
//! splice: upgraded WebSockets after TLS termination, and TLS originated for plain MQTT.
//!
//! Resets are passed on as on the L4 paths: when the relay fails (a peer reset), both
//! peers get a reset, not a FIN. A peer that resets after its own half-close is no
//! longer read (its reads only say EOF), so the relay's watchdog looks at that peer's
//! socket error on each tick (at most a second later) and ends the relay the same way.

use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// The relay failed (a reset or an I/O error); both peers were reset.
    pub error: bool,
}

/// A relayed stream whose TCP socket the relay can reach, to watch for a reset after its
/// EOF and to pass a reset on (`None`: a stream that hides its socket; it is closed with
/// a FIN instead).
pub trait Socket {
    fn tcp(&self) -> Option<BorrowedFd<'_>>;
}

impl Socket for tokio::net::TcpStream {
    fn tcp(&self) -> Option<BorrowedFd<'_>> {
        Some(self.as_fd())
    }
}

impl<S: Socket> Socket for tokio_rustls::client::TlsStream<S> {
    fn tcp(&self) -> Option<BorrowedFd<'_>> {
        self.get_ref().0.tcp()
    }
}

impl<S: Socket> Socket for tokio_rustls::server::TlsStream<S> {
    fn tcp(&self) -> Option<BorrowedFd<'_>> {
        self.get_ref().0.tcp()
    }
}

impl Socket for hyper_util::rt::TokioIo<hyper::upgrade::Upgraded> {
    fn tcp(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// A stream that stamps the shared activity clock, counts the bytes read from it and
/// notes its EOF.
struct Watched<S> {
    inner: S,
    last_ns: Arc<AtomicU64>,
    read: Arc<AtomicU64>,
    eof: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.read.fetch_add(n, Ordering::Relaxed);
            self.last_ns.store(sys::monotonic_ns(), Ordering::Relaxed);
        } else if wanted && matches!(poll, Poll::Ready(Ok(()))) {
            self.eof.store(true, Ordering::Relaxed);
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

/// Why the watchdog ended a relay.
enum Watchdog {
    Idle,
    /// A peer that had sent its EOF reset the connection.
    ResetAfterEof,
}

pub async fn join<A, B>(a: A, b: B, idle_timeout: Duration) -> Relayed
where
    A: AsyncRead + AsyncWrite + Socket + Unpin,
    B: AsyncRead + AsyncWrite + Socket + Unpin,
{
    let last_ns = Arc::new(AtomicU64::new(sys::monotonic_ns()));
    let (from_a, from_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (eof_a, eof_b) = (Arc::default(), Arc::default());
    let mut a = Watched {
        inner: a,
        last_ns: last_ns.clone(),
        read: from_a.clone(),
        eof: Arc::clone(&eof_a),
    };
    let mut b = Watched {
        inner: b,
        last_ns: last_ns.clone(),
        read: from_b.clone(),
        eof: Arc::clone(&eof_b),
    };
    // The sockets' numbers, for the watchdog while the copy borrows the streams. `a` and
    // `b` own them and live until this function returns, so the numbers stay theirs.
    let sockets = [
        a.inner.tcp().map(|fd| fd.as_raw_fd()),
        b.inner.tcp().map(|fd| fd.as_raw_fd()),
    ];
    let idle_ns = u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    let watchdog = async {
        let period = (idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            tokio::time::sleep(period).await;
            for (socket, eof) in sockets.iter().zip([&eof_a, &eof_b]) {
                if let Some(socket) = socket
                    && eof.load(Ordering::Relaxed)
                    && matches!(sys::take_socket_error(*socket), Ok(Some(_)))
                {
                    return Watchdog::ResetAfterEof;
                }
            }
            let last = last_ns.load(Ordering::Relaxed);
            if sys::monotonic_ns().saturating_sub(last) > idle_ns {
                return Watchdog::Idle;
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
        end = watchdog => match end {
            Watchdog::Idle => (true, false),
            Watchdog::ResetAfterEof => (false, true),
        },
    };
    if error {
        // Both peers learn that the connection broke (a FIN would say it ended well).
        for socket in sockets.iter().flatten() {
            let _ = sys::set_linger_zero(*socket);
        }
    }
    Relayed {
        bytes_a_to_b: from_a.load(Ordering::Relaxed),
        bytes_b_to_a: from_b.load(Ordering::Relaxed),
        idle_timeout,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};

    /// (the outer end a peer holds, the inner end the relay holds)
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let outer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (inner, _) = listener.accept().await.unwrap();
        (outer, inner)
    }

    #[tokio::test]
    async fn a_reset_after_a_half_close_is_passed_on() {
        let (mut device, relay_a) = pair().await;
        let (mut hub, relay_b) = pair().await;
        let relay = tokio::spawn(join(relay_a, relay_b, Duration::from_secs(60)));

        device.write_all(b"hello").await.unwrap();
        device.shutdown().await.unwrap();
        let mut got = [0u8; 5];
        hub.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(hub.read(&mut got).await.unwrap(), 0, "the FIN is passed on");

        // The device, half-closed, now resets: the hub must see a reset, not silence.
        sys::set_linger_zero(device.as_fd()).unwrap();
        drop(device);
        let relayed = tokio::time::timeout(Duration::from_secs(3), relay)
            .await
            .expect("the relay noticed the reset within its watchdog period")
            .unwrap();
        assert!(relayed.error && !relayed.idle_timeout, "{relayed:?}");
        // The hub has read the FIN, so its reads say EOF; the reset shows as its socket
        // error (EPIPE once the FIN was in).
        let mut error = None;
        for _ in 0..100 {
            error = sys::take_socket_error(hub.as_fd()).unwrap();
            if error.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let error = error.expect("the hub saw no reset");
        assert!(
            matches!(error.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)),
            "{error}"
        );
    }

    #[tokio::test]
    async fn both_directions_closing_end_the_relay_cleanly() {
        let (mut device, relay_a) = pair().await;
        let (mut hub, relay_b) = pair().await;
        let relay = tokio::spawn(join(relay_a, relay_b, Duration::from_secs(60)));
        device.write_all(b"up").await.unwrap();
        device.shutdown().await.unwrap();
        hub.write_all(b"down!").await.unwrap();
        hub.shutdown().await.unwrap();
        let (mut at_hub, mut at_device) = (Vec::new(), Vec::new());
        hub.read_to_end(&mut at_hub).await.unwrap();
        device.read_to_end(&mut at_device).await.unwrap();
        assert_eq!((&at_hub[..], &at_device[..]), (&b"up"[..], &b"down!"[..]));
        let relayed = relay.await.unwrap();
        assert_eq!(
            relayed,
            Relayed {
                bytes_a_to_b: 2,
                bytes_b_to_a: 5,
                idle_timeout: false,
                error: false
            }
        );
    }
}
