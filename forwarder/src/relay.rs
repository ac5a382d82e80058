//! The one userspace copy engine: joins a client stream to its upstream's wherever the
//! kernel does not carry the bytes (the L4 fallback `l4::copy`, plain MQTT with TLS
//! originated by `l4::originate`, upgraded WebSockets in `http::tunnel`). One contract
//! for all of them:
//!
//! - **half-close**: a FIN (EOF) from one side is passed on as `shutdown(SHUT_WR)` to the
//!   other, and the other direction goes on;
//! - **reset**: when either side resets (or any I/O fails), both peers get a reset, not
//!   a FIN (a FIN would say the connection ended well). A side that has half-closed is
//!   no longer read, so it is watched for a reset: at once on a plain TCP stream, on a
//!   timer (at most a second) on a stream that hides its tokio registration (TLS);
//! - **idle**: nothing read in either direction for the idle timeout closes both;
//! - **counting**: bytes each way, reported on every watchdog tick and at the end.

use std::future::Future;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Notify;

use crate::l4::{End, Side};
use crate::sys;

/// Read buffer per direction.
const COPY_BUF: usize = 64 * 1024;
/// The longest a watchdog sleeps between looks (idle check, progress report).
const MAX_TICK: Duration = Duration::from_secs(1);
/// The shortest, for tiny idle timeouts.
const MIN_TICK: Duration = Duration::from_millis(10);

/// What a join moved, and how it ended (`Closed`, `IdleTimeout` or `Reset`).
#[derive(Debug)]
pub struct Copied {
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub end: End,
}

/// The counts so far, handed to the caller on every watchdog tick (`forwarder conns`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// `sys::monotonic_ns` of the last byte read from either side.
    pub last_io_ns: u64,
}

/// A stream the engine can carry: its two halves, copied concurrently.
pub trait Duplex {
    type Read: ReadHalf;
    type Write: WriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write);
}

/// The read half of a carried stream.
pub trait ReadHalf: AsyncRead + Unpin {
    /// Completes once the peer resets the connection after its EOF (its reads only say
    /// EOF by then). `every`: how often to look where the reset cannot be awaited.
    fn reset_after_eof(&self, every: Duration) -> impl Future<Output = ()> + Send;
}

/// The write half of a carried stream.
pub trait WriteHalf: AsyncWrite + Unpin {
    /// The number of the TCP socket under it, to reset (`None`: a stream that hides its
    /// socket; it is closed with a FIN instead). Valid while the half lives.
    fn socket(&self) -> Option<RawFd>;
}

/// A plain TCP stream: owned halves, no lock, and its reset is awaited on tokio's own
/// registration.
impl Duplex for TcpStream {
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;
    fn into_halves(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        self.into_split()
    }
}

impl ReadHalf for OwnedReadHalf {
    async fn reset_after_eof(&self, _every: Duration) {
        // After EOF the socket is always readable; only an error wakes this.
        let _ = self.ready(Interest::ERROR).await;
    }
}

impl WriteHalf for OwnedWriteHalf {
    fn socket(&self) -> Option<RawFd> {
        Some(self.as_ref().as_raw_fd())
    }
}

/// A stream whose TCP socket the engine can reach but whose tokio registration it cannot
/// (TLS over TCP, a counted or replayed stream): see `Polled`.
pub trait Socket {
    fn tcp(&self) -> Option<BorrowedFd<'_>>;
}

impl Socket for TcpStream {
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

/// A layered stream (TLS, say) carried through `tokio::io::split`, its socket watched for
/// a reset after EOF by looking at the socket error on a timer.
pub struct Polled<S>(pub S);

/// The read half of a `Polled` stream, with its socket's number.
pub struct PolledRead<S> {
    half: tokio::io::ReadHalf<S>,
    /// Owned by the stream, which lives until both halves drop.
    socket: Option<RawFd>,
}

/// The write half of a `Polled` stream, with its socket's number.
pub struct PolledWrite<S> {
    half: tokio::io::WriteHalf<S>,
    socket: Option<RawFd>,
}

impl<S: AsyncRead + AsyncWrite + Socket + Send> Duplex for Polled<S> {
    type Read = PolledRead<S>;
    type Write = PolledWrite<S>;
    fn into_halves(self) -> (PolledRead<S>, PolledWrite<S>) {
        let socket = self.0.tcp().map(|fd| fd.as_raw_fd());
        let (read, write) = tokio::io::split(self.0);
        (
            PolledRead { half: read, socket },
            PolledWrite {
                half: write,
                socket,
            },
        )
    }
}

impl<S: AsyncRead> ReadHalf for PolledRead<S> {
    fn reset_after_eof(&self, every: Duration) -> impl Future<Output = ()> + Send {
        let socket = self.socket;
        async move {
            let Some(socket) = socket else {
                return std::future::pending().await;
            };
            loop {
                tokio::time::sleep(every).await;
                if matches!(sys::take_socket_error(socket), Ok(Some(_))) {
                    return;
                }
            }
        }
    }
}

impl<S: AsyncWrite> WriteHalf for PolledWrite<S> {
    fn socket(&self) -> Option<RawFd> {
        self.socket
    }
}

impl<S: AsyncRead> AsyncRead for PolledRead<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite> AsyncWrite for PolledWrite<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.half).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.half).poll_shutdown(cx)
    }
}

/// Carries `client` and `upstream` until both directions end, either side resets, or
/// nothing is read for `idle_timeout`. `on_tick` sees the counts on every watchdog tick.
pub async fn join<C: Duplex, U: Duplex>(
    client: C,
    upstream: U,
    idle_timeout: Duration,
    mut on_tick: impl FnMut(Progress),
) -> Copied {
    let (mut client_r, mut client_w) = client.into_halves();
    let (mut upstream_r, mut upstream_w) = upstream.into_halves();
    let counts = Counts::new();
    let tick = (idle_timeout / 4).clamp(MIN_TICK, MAX_TICK);
    let ended = Ended::default();
    let pumps = async {
        tokio::try_join!(
            pump(
                &mut client_r,
                &mut upstream_w,
                Side::Client,
                &counts,
                tick,
                &ended
            ),
            pump(
                &mut upstream_r,
                &mut client_w,
                Side::Upstream,
                &counts,
                tick,
                &ended
            ),
        )
    };
    let end = tokio::select! {
        result = pumps => match result {
            Ok(_) => End::Closed,
            Err(failed) => End::Reset { side: Some(failed) },
        },
        () = watchdog(&counts, tick, idle_timeout, &mut on_tick) => End::IdleTimeout,
    };
    if matches!(end, End::Reset { .. }) {
        // Both peers learn that the connection broke: the halves close on return.
        for socket in [client_w.socket(), upstream_w.socket()]
            .into_iter()
            .flatten()
        {
            let _ = sys::set_linger_zero(socket);
        }
    }
    let progress = counts.progress();
    Copied {
        bytes_up: progress.bytes_up,
        bytes_down: progress.bytes_down,
        end,
    }
}

/// Reports progress every `tick` and returns once nothing was read for `idle_timeout`.
async fn watchdog(
    counts: &Counts,
    tick: Duration,
    idle_timeout: Duration,
    on_tick: &mut impl FnMut(Progress),
) {
    let idle_ns = u64::try_from(idle_timeout.as_nanos()).unwrap_or(u64::MAX);
    loop {
        tokio::time::sleep(tick).await;
        let progress = counts.progress();
        on_tick(progress);
        if sys::monotonic_ns().saturating_sub(progress.last_io_ns) > idle_ns {
            return;
        }
    }
}

/// Bytes read each way and the time of the last one, shared by both directions.
struct Counts {
    up: AtomicU64,
    down: AtomicU64,
    last_io_ns: AtomicU64,
}

impl Counts {
    fn new() -> Self {
        Self {
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            last_io_ns: AtomicU64::new(sys::monotonic_ns()),
        }
    }

    fn add(&self, from: Side, n: usize) {
        let bytes = match from {
            Side::Client => &self.up,
            Side::Upstream => &self.down,
        };
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.last_io_ns
            .store(sys::monotonic_ns(), Ordering::Relaxed);
    }

    fn progress(&self) -> Progress {
        Progress {
            bytes_up: self.up.load(Ordering::Relaxed),
            bytes_down: self.down.load(Ordering::Relaxed),
            last_io_ns: self.last_io_ns.load(Ordering::Relaxed),
        }
    }
}

/// How many directions reached their EOF; the second wakes the first.
#[derive(Default)]
struct Ended {
    count: AtomicU64,
    both: Notify,
}

/// Copies one direction until EOF (then half-closes the sink) or an error (`Err` names
/// the side that failed). After its EOF, while the other direction still runs, `src` is
/// no longer read, so it is watched for a reset.
async fn pump<R: ReadHalf, W: WriteHalf>(
    src: &mut R,
    sink: &mut W,
    src_side: Side,
    counts: &Counts,
    tick: Duration,
    ended: &Ended,
) -> Result<(), Side> {
    let sink_side = src_side.other();
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = src.read(&mut buf).await.map_err(|_| src_side)?;
        if n == 0 {
            sink.shutdown().await.map_err(|_| sink_side)?;
            break;
        }
        counts.add(src_side, n);
        sink.write_all(&buf[..n]).await.map_err(|_| sink_side)?;
        // A layered sink (TLS) may hold back what it could not send yet.
        sink.flush().await.map_err(|_| sink_side)?;
    }
    drop(buf);
    if ended.count.fetch_add(1, Ordering::AcqRel) == 1 {
        // notify_one keeps a permit if the first direction is not waiting yet.
        ended.both.notify_one();
        return Ok(());
    }
    tokio::select! {
        () = src.reset_after_eof(tick) => Err(src_side),
        () = ended.both.notified() => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let (device, relay_a) = pair().await;
        let (hub, relay_b) = pair().await;
        let relay = tokio::spawn(join(relay_a, relay_b, Duration::from_secs(60), |_| {}));
        reset_after_half_close(device, hub, relay).await;
    }

    /// The same through streams whose socket is watched on a timer (as TLS streams are).
    #[tokio::test]
    async fn a_reset_after_a_half_close_is_passed_on_through_a_layered_stream() {
        let (device, relay_a) = pair().await;
        let (hub, relay_b) = pair().await;
        let relay = tokio::spawn(join(
            Polled(relay_a),
            Polled(relay_b),
            Duration::from_secs(60),
            |_| {},
        ));
        reset_after_half_close(device, hub, relay).await;
    }

    async fn reset_after_half_close(
        mut device: TcpStream,
        mut hub: TcpStream,
        relay: tokio::task::JoinHandle<Copied>,
    ) {
        device.write_all(b"hello").await.unwrap();
        device.shutdown().await.unwrap();
        let mut got = [0u8; 5];
        hub.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(hub.read(&mut got).await.unwrap(), 0, "the FIN is passed on");

        // The device, half-closed, now resets: the hub must see a reset, not silence.
        sys::set_linger_zero(device.as_fd()).unwrap();
        drop(device);
        let copied = tokio::time::timeout(Duration::from_secs(3), relay)
            .await
            .expect("the relay noticed the reset within its watchdog period")
            .unwrap();
        assert!(
            matches!(
                copied.end,
                End::Reset {
                    side: Some(Side::Client)
                }
            ),
            "{copied:?}"
        );
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
        let relay = tokio::spawn(join(relay_a, relay_b, Duration::from_secs(60), |_| {}));
        device.write_all(b"up").await.unwrap();
        device.shutdown().await.unwrap();
        hub.write_all(b"down!").await.unwrap();
        hub.shutdown().await.unwrap();
        let (mut at_hub, mut at_device) = (Vec::new(), Vec::new());
        hub.read_to_end(&mut at_hub).await.unwrap();
        device.read_to_end(&mut at_device).await.unwrap();
        assert_eq!((&at_hub[..], &at_device[..]), (&b"up"[..], &b"down!"[..]));
        let copied = relay.await.unwrap();
        assert_eq!((copied.bytes_up, copied.bytes_down), (2, 5), "{copied:?}");
        assert!(matches!(copied.end, End::Closed), "{copied:?}");
    }
}
