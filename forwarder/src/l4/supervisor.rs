//! Wakes a spliced session only when it has something to do, never per message.
//!
//! A stream verdict's data-ready path wakes every poller of a spliced socket for each
//! segment it redirects (`sk_psock_verdict_data_ready` calls the socket's saved
//! `sk_data_ready`), so a session that waited on tokio's readiness (which registers
//! `EPOLLIN | EPOLLOUT`) was woken for every message although no byte was for it. Here
//! one task per data path owns two event sources and routes them to the sessions by
//! socket cookie:
//! - an epoll set of our own, where each spliced socket is registered for hang-up and
//!   error only (a FIN, a reset), plus data while a direction runs through userspace;
//! - the verdict's ring buffer (`FWD_EVENTS`), on which it reports the rare moments the
//!   agent must act: bytes passed to userspace, a lag budget half spent, a broken stream.
//!
//! The idle timeout needs no wake-up at all: each session sleeps until its deadline and
//! then reads the verdict's activity stamps.

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use forwarder_common::SpliceEvent;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use crate::sys::{self, Epoll};

/// What woke a session (bits of `Watch::wait`'s result).
pub mod wake {
    /// The client's (side 0) or the upstream's (side 1) FIN arrived.
    pub const fn hangup(side: usize) -> u32 {
        1 << side
    }
    /// Either socket reported an error or a hang-up: look for a reset.
    pub const ERROR: u32 = 1 << 2;
    /// Bytes arrived on a socket watched for data.
    pub const DATA: u32 = 1 << 3;
    /// The verdict reported on one of the sockets.
    pub const KERNEL: u32 = 1 << 4;
    /// `forwarder upgrade`: hand the session to the agent's next binary.
    pub const HANDOVER: u32 = 1 << 5;
}

/// One session's mailbox: wake bits, and a permit that survives until it is taken.
#[derive(Debug, Default)]
struct Signal {
    bits: AtomicU32,
    notify: Notify,
}

impl Signal {
    fn raise(&self, bits: u32) {
        self.bits.fetch_or(bits, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// Socket cookie -> (its session's signal, which side it is).
type Routes = Mutex<HashMap<u64, (Arc<Signal>, usize)>>;

/// The wake-up sources of one data path, shared by all its spliced sessions.
#[derive(Debug)]
pub struct Supervisor {
    epoll: Arc<Epoll>,
    routes: Arc<Routes>,
    wakeups: Arc<AtomicU64>,
    /// Set when an upgrade begins: every session, and every one watched from then on, is
    /// woken to hand itself over (a wake bit, so a session's wait needs nothing more).
    handing_over: AtomicBool,
    /// Dropping it ends the dispatch task (with the data path).
    _stop: oneshot::Sender<()>,
}

impl Supervisor {
    /// Starts the dispatch task on the current tokio runtime.
    pub fn start(events: RingBuf<MapData>) -> io::Result<Self> {
        let epoll = Arc::new(Epoll::new()?);
        let routes: Arc<Routes> = Arc::default();
        let epoll_fd = sys::async_fd_readable(epoll.clone())?;
        let ring = sys::async_fd_readable(events)?;
        let (stop, stopped) = oneshot::channel();
        let wakeups = Arc::new(AtomicU64::new(0));
        let sources = Sources {
            epoll: epoll_fd,
            ring,
        };
        tokio::spawn(dispatch(sources, routes.clone(), wakeups.clone(), stopped));
        Ok(Self {
            epoll,
            routes,
            wakeups,
            handing_over: AtomicBool::new(false),
            _stop: stop,
        })
    }

    /// Times the dispatch task woke (for any session): with every spliced connection
    /// healthy, it stays still however many messages flow.
    pub fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// Wakes every session to hand itself over (`crate::upgrade`).
    pub fn begin_handover(&self) {
        self.handing_over.store(true, Ordering::Release);
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for (signal, _) in routes.values() {
            signal.raise(wake::HANDOVER);
        }
    }

    /// Routes wake-ups for a spliced pair (client first) to a new `Watch`. The sockets
    /// are watched for hang-ups and errors only; a FIN or reset that came before this call
    /// is reported at once.
    pub fn watch(&self, cookies: [u64; 2], fds: [BorrowedFd<'_>; 2]) -> io::Result<Watch> {
        let signal = Arc::new(Signal::default());
        {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            for (side, cookie) in cookies.into_iter().enumerate() {
                routes.insert(cookie, (signal.clone(), side));
            }
        }
        let watch = Watch {
            epoll: self.epoll.clone(),
            routes: self.routes.clone(),
            signal,
            cookies,
            handover_declined: AtomicBool::new(false),
        };
        if self.handing_over.load(Ordering::Acquire) {
            watch.signal.raise(wake::HANDOVER);
        }
        for (fd, cookie) in fds.into_iter().zip(cookies) {
            self.epoll.add(fd, sys::HANGUP_ONLY, cookie)?;
        }
        Ok(watch)
    }
}

/// A session's end of the supervisor. Dropping it stops the routing; closing the sockets
/// ends their epoll registrations.
#[derive(Debug)]
pub struct Watch {
    epoll: Arc<Epoll>,
    routes: Arc<Routes>,
    signal: Arc<Signal>,
    cookies: [u64; 2],
    /// The hand-over failed for this session: it stays here.
    handover_declined: AtomicBool,
}

impl Watch {
    /// Waits for a wake-up or until `deadline`; returns the `wake` bits (0: the deadline).
    pub async fn wait_until(&self, deadline: Instant) -> u32 {
        let bits = self.signal.bits.swap(0, Ordering::AcqRel);
        if bits != 0 {
            return self.unless_declined(bits);
        }
        tokio::select! {
            () = self.signal.notify.notified() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
        self.unless_declined(self.signal.bits.swap(0, Ordering::AcqRel))
    }

    /// A session that could not be handed over ignores the request from then on.
    fn unless_declined(&self, bits: u32) -> u32 {
        if self.handover_declined.load(Ordering::Relaxed) {
            bits & !wake::HANDOVER
        } else {
            bits
        }
    }

    /// The session could not be handed over: it stays with this agent.
    pub fn decline_handover(&self) {
        self.handover_declined.store(true, Ordering::Relaxed);
    }

    /// Also wakes the session when bytes arrive on `side`'s socket (a direction on the
    /// userspace path), or stops doing so (back on the kernel path).
    pub fn watch_data(&self, side: usize, fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
        let events = if on {
            sys::HANGUP_AND_DATA
        } else {
            sys::HANGUP_ONLY
        };
        self.epoll.modify(fd, events, self.cookies[side])
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        for cookie in self.cookies {
            routes.remove(&cookie);
        }
    }
}

/// What the dispatch task waits on.
struct Sources {
    epoll: AsyncFd<Arc<Epoll>>,
    ring: AsyncFd<RingBuf<MapData>>,
}

/// Routes epoll and verdict events to sessions until the supervisor is dropped.
async fn dispatch(
    sources: Sources,
    routes: Arc<Routes>,
    wakeups: Arc<AtomicU64>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Sources { epoll, mut ring } = sources;
    let mut ready = Vec::new();
    loop {
        wakeups.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = &mut stopped => return,
            guard = epoll.readable() => {
                let Ok(mut guard) = guard else { return dispatch_failed("epoll set") };
                drain_epoll(guard.get_inner(), &routes, &mut ready);
                guard.clear_ready();
            }
            guard = ring.readable_mut() => {
                let Ok(mut guard) = guard else { return dispatch_failed("event ring") };
                drain_ring(guard.get_inner_mut(), &routes);
                guard.clear_ready();
            }
        }
    }
}

/// Only tokio's reactor going away ends a readiness wait; sessions then still see their
/// idle deadlines and safety ticks, but FINs and resets late. Said loudly.
fn dispatch_failed(source: &str) {
    tracing::error!(
        source,
        "spliced sessions' wake-up source failed: FINs and resets are now seen only at each \
         session's safety tick (30 s)"
    );
}

fn drain_epoll(epoll: &Epoll, routes: &Routes, ready: &mut Vec<(u64, u32)>) {
    loop {
        ready.clear();
        match epoll.ready_now(ready) {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) => {
                tracing::warn!(%err, "reading the spliced sockets' epoll set failed");
                return;
            }
        }
        let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
        for &(cookie, events) in ready.iter() {
            if let Some((signal, side)) = routes.get(&cookie) {
                signal.raise(wake_bits(*side, events));
            }
        }
    }
}

/// Session wake bits for epoll `events` on `side`'s socket.
fn wake_bits(side: usize, events: u32) -> u32 {
    let mut bits = 0;
    if events & libc::EPOLLRDHUP as u32 != 0 {
        bits |= wake::hangup(side);
    }
    if events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
        bits |= wake::ERROR;
    }
    if events & libc::EPOLLIN as u32 != 0 {
        bits |= wake::DATA;
    }
    bits
}

fn drain_ring(ring: &mut RingBuf<MapData>, routes: &Routes) {
    let routes = routes.lock().unwrap_or_else(|p| p.into_inner());
    while let Some(item) = ring.next() {
        let Some(event) = parse_event(&item) else {
            continue;
        };
        // An event for a session that has ended (or not yet started: its first look at
        // the counters covers it) has nobody to wake.
        if let Some((signal, _)) = routes.get(&event.cookie) {
            signal.raise(wake::KERNEL);
        }
    }
}

fn parse_event(bytes: &[u8]) -> Option<SpliceEvent> {
    let cookie = u64::from_ne_bytes(bytes.get(0..8)?.try_into().ok()?);
    let kind = u32::from_ne_bytes(bytes.get(8..12)?.try_into().ok()?);
    Some(SpliceEvent {
        cookie,
        kind,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_events_map_to_wake_bits() {
        let rdhup = libc::EPOLLRDHUP as u32;
        assert_eq!(wake_bits(0, rdhup), wake::hangup(0));
        assert_eq!(wake_bits(1, rdhup), wake::hangup(1));
        let reset = (libc::EPOLLERR | libc::EPOLLHUP | libc::EPOLLRDHUP | libc::EPOLLIN) as u32;
        assert_eq!(
            wake_bits(1, reset),
            wake::hangup(1) | wake::ERROR | wake::DATA
        );
    }

    #[test]
    fn short_ring_records_are_ignored() {
        assert_eq!(parse_event(&[0; 11]), None);
        let mut record = 7u64.to_ne_bytes().to_vec();
        record.extend_from_slice(&2u32.to_ne_bytes());
        record.extend_from_slice(&[0; 4]);
        assert_eq!(
            parse_event(&record),
            Some(SpliceEvent {
                cookie: 7,
                kind: 2,
                _pad: 0
            })
        );
    }
}
