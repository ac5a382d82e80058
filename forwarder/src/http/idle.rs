//! Whether a client connection is in use, for its idle timeout. hyper has no idle timeout
//! for HTTP/2 (keep-alive PINGs only find dead peers; a live client that opens no stream
//! would stay for ever), so the service counts each request from its arrival until its
//! response body is done, and the connection is closed after a stretch with none open.
//! HTTP/1.1 is watched the same way between keep-alive requests.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::watch;

use crate::http::counted::ConnCounts;

/// One client connection's requests.
pub struct Activity {
    /// Requests open now; every change wakes the idle watch.
    open: watch::Sender<usize>,
    served: AtomicU64,
    /// The client's byte count when its last request ended.
    bytes_up_at_rest: AtomicU64,
    counts: Arc<ConnCounts>,
}

impl Activity {
    pub fn new(counts: Arc<ConnCounts>) -> Arc<Self> {
        Arc::new(Self {
            open: watch::Sender::new(0),
            served: AtomicU64::new(0),
            bytes_up_at_rest: AtomicU64::new(0),
            counts,
        })
    }

    /// A request arrived; it counts as open until the guard drops.
    pub fn begin(self: &Arc<Self>) -> Open {
        self.open.send_modify(|open| *open += 1);
        Open(self.clone())
    }

    /// Resolves once no request has been open for `timeout` in a row.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut open = self.open.subscribe();
        loop {
            let changed = if *open.borrow_and_update() > 0 {
                open.changed().await
            } else {
                match tokio::time::timeout(timeout, open.changed()).await {
                    Ok(changed) => changed,
                    Err(_) => return,
                }
            };
            if changed.is_err() {
                // Cannot happen while `self` holds the sender; never end on it.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Between requests: at least one served, none open, and not a byte from the client
    /// since the last one ended (so a timeout now is idleness, not a slow request).
    pub fn at_rest(&self) -> bool {
        *self.open.borrow() == 0
            && self.served.load(Ordering::Relaxed) > 0
            && self.bytes_up_at_rest.load(Ordering::Relaxed) == self.counts.bytes_up()
    }
}

/// An open request; dropped with its response body (or with the request if it never got
/// one, e.g. a stream the client reset).
pub struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        let activity = &self.0;
        activity.served.fetch_add(1, Ordering::Relaxed);
        activity
            .bytes_up_at_rest
            .store(activity.counts.bytes_up(), Ordering::Relaxed);
        activity
            .open
            .send_modify(|open| *open = open.saturating_sub(1));
    }
}

/// A response body that keeps its request open until hyper is done with it.
pub struct Tracked<B> {
    body: B,
    _open: Open,
}

impl<B> Tracked<B> {
    pub fn new(body: B, open: Open) -> Self {
        Self { body, _open: open }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const IDLE: Duration = Duration::from_millis(200);

    /// How long `idle_for` takes, run beside the caller.
    fn watch(activity: &Arc<Activity>) -> tokio::task::JoinHandle<Duration> {
        let activity = activity.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            activity.idle_for(IDLE).await;
            started.elapsed()
        })
    }

    fn assert_near(took: Duration, expected: Duration) {
        assert!(
            took >= expected && took < expected + IDLE / 2,
            "took {took:?}, expected {expected:?}"
        );
    }

    #[tokio::test]
    async fn idle_only_after_a_whole_stretch_without_requests() {
        let activity = Activity::new(Arc::default());
        assert_near(watch(&activity).await.unwrap(), IDLE);
        assert!(!activity.at_rest(), "nothing served yet");

        // A request held open for longer than the timeout keeps the connection in use;
        // the stretch starts again when it ends.
        let open = activity.begin();
        let idle = watch(&activity);
        tokio::time::sleep(IDLE * 2).await;
        drop(open);
        assert_near(idle.await.unwrap(), IDLE * 3);
        assert!(activity.at_rest());

        // A request that opens and closes within the stretch restarts it.
        let idle = watch(&activity);
        tokio::time::sleep(IDLE / 2).await;
        drop(activity.begin());
        assert_near(idle.await.unwrap(), IDLE / 2 + IDLE);
    }
}
