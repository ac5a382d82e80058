//! `forwarder upgrade` (SIGUSR2): the agent's binary on disk takes over a running agent
//! without dropping a device.
//!
//! A spliced connection lives in the kernel: two sockets in the socket map, redirected by
//! the verdict program, counted in maps. So the agent that set it up is only its
//! supervisor, and a new one can take that job over. On SIGUSR2 the running (old) agent:
//! 1. starts its binary again (the path it was started from: a package that replaced the
//!    file starts the new version) with the same arguments and one end of a Unix socket
//!    pair (`wire`), and passes it the instance lock, every frontend's listener and the
//!    admin listener (`SCM_RIGHTS`). The same sockets: nothing in their accept queues is
//!    lost, and no port is ever closed.
//! 2. The new agent takes the pinned maps over (`ebpf::LoadOptions::adopt`) instead of
//!    creating its own, attaches its verdict for new connections (sockets already spliced
//!    keep the program they were spliced with), starts serving on the listeners, and says
//!    `Ready`. If it cannot, it says why (or just exits) and the old agent goes on as if
//!    nothing happened.
//! 3. The old agent stops accepting, and every spliced session packs itself up at its
//!    next wake-up (`l4::session`: its state and both sockets) and is sent over; the new
//!    agent goes on with it (`l4::session::adopt`). Connections copied in userspace and
//!    terminated HTTPS/WebSocket connections are drained by the old agent instead (their
//!    state is in its memory: TLS sessions, HTTP/2 streams), for at most `--drain-secs`.
//! 4. The old agent says `Done` and exits at once, leaving the pins in place. Under
//!    systemd (`Type=notify`, `NotifyAccess=all`) it first names the new one `MAINPID`.

pub mod wire;

use std::net::SocketAddr;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;

pub use crate::l4::session::HandedSession;
use crate::sys;
use wire::{Channel, ListenerEntry, Message};

/// How the old agent tells its next binary where the hand-over channel is.
pub const FD_ENV: &str = "FORWARDER_UPGRADE_FD";

/// How long the new agent may take to start serving before the old one gives up on it.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

static EXE: OnceLock<PathBuf> = OnceLock::new();

/// Remembers the path this binary was started from. Called first thing: once a package
/// has replaced the file, `/proc/self/exe` names the old, deleted one.
pub fn remember_exe() {
    if let Ok(exe) = std::env::current_exe() {
        let _ = EXE.set(exe);
    }
}

/// What the old agent hands over besides its sessions.
pub struct Offer<'a> {
    pub lock: BorrowedFd<'a>,
    pub listeners: Vec<(ListenerEntry, BorrowedFd<'a>)>,
    pub admin: Option<(SocketAddr, BorrowedFd<'a>)>,
}

/// The next agent, started and serving: sessions go to it.
pub struct Next {
    channel: Channel,
    pub pid: u32,
}

/// Starts the binary on disk as the next agent and hands it `offer`; returns once it
/// serves. On any failure the next agent is gone and the caller goes on serving.
pub async fn start_next(offer: Offer<'_>) -> anyhow::Result<Next> {
    let exe = EXE
        .get()
        .context("the agent's binary path is unknown (remember_exe was not called)")?;
    let (ours, theirs) = sys::seqpacket_pair().context("creating the hand-over channel")?;
    sys::clear_cloexec(theirs.as_fd())?;
    let mut child = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env(FD_ENV, theirs.as_raw_fd().to_string())
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    drop(theirs);
    let channel = Channel::new(ours)?;
    let mut fds = vec![offer.lock];
    fds.extend(offer.listeners.iter().map(|(_, fd)| *fd));
    fds.extend(offer.admin.iter().map(|(_, fd)| *fd));
    let inventory = Message::Inventory {
        old_pid: std::process::id(),
        listeners: offer.listeners.iter().map(|(e, _)| e.clone()).collect(),
        admin: offer.admin.map(|(addr, _)| addr),
    };
    let answer = async {
        channel.send(&inventory, &[], &fds).await?;
        channel.recv().await
    };
    let failure = match tokio::time::timeout(READY_TIMEOUT, answer).await {
        Ok(Ok(Some(r))) => match r.message {
            Message::Ready { pid } => return Ok(Next { channel, pid }),
            Message::Failed { reason } => reason,
            other => format!("unexpected first message {other:?}"),
        },
        Ok(Ok(None)) => "it exited before serving (see its log above)".to_owned(),
        Ok(Err(err)) => format!("the hand-over channel failed: {err}"),
        Err(_) => format!("it did not serve within {READY_TIMEOUT:?}"),
    };
    // Give it a moment to finish saying why (its log), then make sure it is gone.
    for _ in 0..50 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!(
        "the new agent ({}) did not take over: {failure}",
        exe.display()
    )
}

impl Next {
    /// Sends one session (its sockets go with it; ours close when `session` drops).
    pub async fn send(&self, session: Box<HandedSession>) -> std::io::Result<()> {
        let HandedSession {
            mut state,
            client,
            upstream,
        } = *session;
        let pending = state
            .directions
            .each_mut()
            .map(|d| std::mem::take(&mut d.pending));
        let message = Message::Session {
            pending: [pending[0].len(), pending[1].len()],
            state: Box::new(state),
        };
        let fds = [client.as_fd(), upstream.as_fd()];
        self.channel
            .send(&message, &[&pending[0], &pending[1]], &fds)
            .await
    }

    /// Says every session is sent.
    pub async fn done(&self, sessions: u64) -> std::io::Result<()> {
        self.channel
            .send(&Message::Done { sessions }, &[], &[])
            .await
    }
}

/// What the previous agent handed to this one at start (an upgrade), until start-up
/// has used it.
pub struct Inherited {
    channel: OwnedFd,
    pub old_pid: u32,
    pub lock: OwnedFd,
    listeners: Vec<(ListenerEntry, std::net::TcpListener)>,
    admin: Option<(SocketAddr, std::net::TcpListener)>,
}

impl Inherited {
    /// The previous agent's offer, if this process was started by an upgrade. Blocking:
    /// it runs before any runtime (the channel joins the serving one later).
    pub fn receive() -> anyhow::Result<Option<Self>> {
        let Some(raw) = std::env::var_os(FD_ENV) else {
            return Ok(None);
        };
        let raw: i32 = raw
            .to_str()
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{FD_ENV} is not a descriptor number"))?;
        let channel = sys::inherited_fd(raw).context("the hand-over channel")?;
        let received = wire::recv_blocking(channel.as_fd())?
            .context("the previous agent closed the hand-over channel")?;
        let Message::Inventory {
            old_pid,
            listeners,
            admin,
        } = received.message
        else {
            anyhow::bail!("unexpected first hand-over message: {:?}", received.message);
        };
        let expected = 1 + listeners.len() + usize::from(admin.is_some());
        anyhow::ensure!(
            received.fds.len() == expected,
            "the previous agent sent {} descriptors, {expected} expected",
            received.fds.len()
        );
        let mut fds = received.fds.into_iter();
        let lock = fds.next().context("no lock descriptor")?;
        let listeners = listeners
            .into_iter()
            .zip(fds.by_ref())
            .map(|(entry, fd)| (entry, std::net::TcpListener::from(fd)))
            .collect();
        let admin = admin.zip(fds.next().map(std::net::TcpListener::from));
        tracing::info!(old_pid, "upgrade: taking over from the running agent");
        Ok(Some(Self {
            channel,
            old_pid,
            lock,
            listeners,
            admin,
        }))
    }

    /// A second handle on the channel, to say why start-up failed (`report_failure`).
    pub fn reporter(&self) -> std::io::Result<OwnedFd> {
        self.channel.try_clone()
    }

    /// The listener `frontend` had on `addr`, if handed over.
    pub fn take_listener(
        &mut self,
        frontend: &str,
        addr: SocketAddr,
    ) -> Option<std::net::TcpListener> {
        let i = self
            .listeners
            .iter()
            .position(|(e, _)| e.frontend == frontend && e.addr == addr)?;
        Some(self.listeners.swap_remove(i).1)
    }

    /// The admin listener, if it was on `addr`.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        match self.admin.take() {
            Some((was, listener)) if was == addr => Some(listener),
            _ => None,
        }
    }

    /// Start-up is done with the offer: listeners of frontends the new configuration no
    /// longer has are closed here (the old agent closes its copies when it exits).
    pub fn into_arrivals(self) -> Arrivals {
        for (entry, _) in &self.listeners {
            tracing::info!(
                frontend = %entry.frontend,
                addr = %entry.addr,
                "upgrade: frontend not in the new configuration; its listener closes"
            );
        }
        Arrivals {
            channel: self.channel,
            old_pid: self.old_pid,
        }
    }
}

/// The new agent's end of the channel once it serves: sessions arrive here.
pub struct Arrivals {
    channel: OwnedFd,
    pub old_pid: u32,
}

/// What arrived.
pub enum Arrival {
    Session(Box<HandedSession>),
    /// The old agent sent everything (`sessions` in all) and exits.
    Done {
        sessions: u64,
    },
}

/// `Arrivals` on the serving runtime.
pub struct Incoming {
    channel: Channel,
    pub old_pid: u32,
}

impl Arrivals {
    /// Joins the calling runtime and tells the previous agent this one serves.
    pub async fn ready(self) -> std::io::Result<Incoming> {
        let channel = Channel::new(self.channel)?;
        let pid = std::process::id();
        channel.send(&Message::Ready { pid }, &[], &[]).await?;
        Ok(Incoming {
            channel,
            old_pid: self.old_pid,
        })
    }
}

impl Incoming {
    /// The next arrival; `None` when the old agent closed the channel without `Done`.
    pub async fn next(&self) -> anyhow::Result<Option<Arrival>> {
        let Some(received) = self.channel.recv().await? else {
            return Ok(None);
        };
        match received.message {
            Message::Done { sessions } => Ok(Some(Arrival::Done { sessions })),
            Message::Session { mut state, pending } => {
                anyhow::ensure!(
                    received.fds.len() == 2 && pending[0] + pending[1] == received.extra.len(),
                    "a handed-over session came with {} descriptors and {} raw bytes",
                    received.fds.len(),
                    received.extra.len()
                );
                let (first, second) = received.extra.split_at(pending[0]);
                state.directions[0].pending = first.to_vec();
                state.directions[1].pending = second.to_vec();
                let mut fds = received.fds.into_iter();
                let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
                    anyhow::bail!("a handed-over session without its sockets");
                };
                Ok(Some(Arrival::Session(Box::new(HandedSession {
                    state: *state,
                    client: std::net::TcpStream::from(client),
                    upstream: std::net::TcpStream::from(upstream),
                }))))
            }
            other => anyhow::bail!("unexpected hand-over message: {other:?}"),
        }
    }
}

/// Tells the previous agent why this one could not start (it goes on serving). Blocking:
/// start-up failed, there is no runtime to lean on.
pub fn report_failure(reporter: &OwnedFd, error: &anyhow::Error) {
    let message = Message::Failed {
        reason: format!("{error:#}"),
    };
    if let Ok(record) = wire::encode(&message, &[]) {
        let _ = sys::send_with_fds(reporter.as_fd(), &record, &[]);
    }
}
