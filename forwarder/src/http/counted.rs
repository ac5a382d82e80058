//! A terminating frontend's client connections, listed for `forwarder conns`: each
//! client stream counts its bytes (TLS included) and last activity in atomics, and the
//! frontend's [`Listing`] publishes what changed once a second. The stream lives as long
//! as the connection (hyper hands it to the tunnel after an upgrade), so its entry goes
//! exactly when the connection ends.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::conn_list::Registration;
use crate::ebpf::Datapath;
use crate::sys;

const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// One connection's counts: bumped by its stream, read by the listing.
#[derive(Debug, Default)]
pub struct ConnCounts {
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    last_active_ns: AtomicU64,
    /// Set once the hub answered `101`: the tunnel's upstream, if known.
    websocket: OnceLock<Option<SocketAddr>>,
}

impl ConnCounts {
    pub fn upgraded(&self, upstream: Option<SocketAddr>) {
        let _ = self.websocket.set(upstream);
    }

    /// Bytes received from the client so far (TLS included).
    pub fn bytes_up(&self) -> u64 {
        self.bytes_up.load(Ordering::Relaxed)
    }

    fn moved(&self, bytes: &AtomicU64, n: usize) {
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        self.last_active_ns
            .store(sys::monotonic_ns(), Ordering::Relaxed);
    }
}

struct Listed {
    counts: Arc<ConnCounts>,
    registration: Registration<Arc<Datapath>>,
    /// (up, down, websocket) as last published.
    published: (u64, u64, bool),
}

/// A frontend's listed connections, keyed by the client socket's cookie.
pub struct Listing {
    datapath: Arc<Datapath>,
    frontend: String,
    entries: Mutex<HashMap<u64, Listed>>,
}

impl Listing {
    /// Publishes every second until `shutdown` or until the listing is dropped.
    pub fn start(
        datapath: Arc<Datapath>,
        frontend: &str,
        mut shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        let listing = Arc::new(Self {
            datapath,
            frontend: frontend.to_string(),
            entries: Mutex::default(),
        });
        // Weak: ends with the last connection of a frontend a reload replaced.
        let publisher = Arc::downgrade(&listing);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => match publisher.upgrade() {
                        Some(listing) => listing.publish(),
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                }
            }
        });
        listing
    }

    /// Lists `client`; its key, or `None` if it could not be listed (served all the same).
    fn add(&self, client: &TcpStream, counts: Arc<ConnCounts>) -> Option<u64> {
        let cookie = sys::socket_cookie(client.as_fd()).ok()?;
        let registration = Registration::https(self.datapath.clone(), &self.frontend, client)?;
        let listed = Listed {
            counts,
            registration,
            published: (0, 0, false),
        };
        self.entries.lock().ok()?.insert(cookie, listed);
        Some(cookie)
    }

    fn remove(&self, cookie: u64) {
        // Dropping the registration removes the map entry.
        let removed = self.entries.lock().ok().and_then(|mut e| e.remove(&cookie));
        drop(removed);
    }

    fn publish(&self) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for listed in entries.values_mut() {
            let counts = &listed.counts;
            let up = counts.bytes_up.load(Ordering::Relaxed);
            let down = counts.bytes_down.load(Ordering::Relaxed);
            let websocket = counts.websocket.get();
            if let (Some(upstream), false) = (websocket, listed.published.2) {
                listed.registration.set_websocket(*upstream);
            }
            let now = (up, down, websocket.is_some());
            if now != listed.published {
                let last = counts.last_active_ns.load(Ordering::Relaxed);
                listed.registration.update(up, down, last);
                listed.published = now;
            }
        }
    }
}

/// The client's TCP stream, counting what it carries.
pub struct CountedStream {
    inner: TcpStream,
    counts: Arc<ConnCounts>,
    listed: Option<(Arc<Listing>, u64)>,
}

impl CountedStream {
    pub fn new(inner: TcpStream, listing: Option<&Arc<Listing>>) -> Self {
        let counts = Arc::new(ConnCounts::default());
        counts
            .last_active_ns
            .store(sys::monotonic_ns(), Ordering::Relaxed);
        let listed = listing.and_then(|l| Some((l.clone(), l.add(&inner, counts.clone())?)));
        Self {
            inner,
            counts,
            listed,
        }
    }
}

impl crate::relay::Socket for CountedStream {
    fn tcp(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        Some(self.inner.as_fd())
    }
}

impl CountedStream {
    /// The counts, for the request handler to mark an upgrade in.
    pub fn counts(&self) -> Arc<ConnCounts> {
        self.counts.clone()
    }
}

impl Drop for CountedStream {
    fn drop(&mut self) {
        if let Some((listing, cookie)) = self.listed.take() {
            listing.remove(cookie);
        }
    }
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.counts.moved(&self.counts.bytes_up, read);
        }
        result
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.counts.moved(&self.counts.bytes_down, n);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.counts.moved(&self.counts.bytes_down, n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
