//! The agent's side of `forwarder upgrade` (see `crate::upgrade` for the whole story):
//! handing everything to the next binary and exiting, or taking it over at start.

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::Instrument as _;

use super::{FrontendMetrics, Running};
use crate::admission::{Held, Slots};
use crate::config::{Config, Mode};
use crate::conn_list::Registration;
use crate::ebpf::Datapath;
use crate::instance_lock::InstanceLock;
use crate::l4::{self, SessionOptions};
use crate::metrics::{self, ActiveGuard, L4Metrics};
use crate::upgrade::{self, Arrival, Arrivals, HandedSession, Next, Offer, wire::ListenerEntry};

/// What the running agent holds that an upgrade hands over.
pub(super) struct Holdings<'a> {
    pub instance: &'a InstanceLock,
    pub running: &'a [Running],
    pub admin: Option<(std::net::SocketAddr, &'a std::os::fd::OwnedFd)>,
    pub xdp: Option<&'a mut crate::xdp::XdpGuard>,
    pub demo: bool,
    /// Transparent interception is on (its hand-over is not built yet).
    pub transparent: bool,
}

/// Starts the next binary and hands it the listeners; `Err` leaves this agent serving.
pub(super) async fn start_next(mut holdings: Holdings<'_>) -> anyhow::Result<Next> {
    anyhow::ensure!(
        !holdings.transparent,
        "transparent mode's interception cannot be handed over yet: restart the agent to \
         upgrade it"
    );
    anyhow::ensure!(
        !holdings.demo,
        "the built-in demo's stand-in upstream lives in this process: restart it instead"
    );
    let listeners = holdings
        .running
        .iter()
        .filter_map(|r| {
            let fd = r.listener_fd.as_ref()?;
            Some((
                ListenerEntry {
                    frontend: r.name.clone(),
                    addr: r.addr,
                },
                fd.as_fd(),
            ))
        })
        .collect();
    let offer = Offer {
        lock: holdings.instance.as_fd(),
        listeners,
        admin: holdings.admin.map(|(addr, fd)| (addr, fd.as_fd())),
    };
    // The XDP guard's links, pinned for the new agent to swap its program in.
    let pinned = match holdings
        .xdp
        .as_deref_mut()
        .map(crate::xdp::XdpGuard::pin_links)
    {
        Some(Err(err)) => Err(err.context("handing the XDP guard over")),
        _ => Ok(()),
    };
    let started = match pinned {
        Ok(()) => upgrade::start_next(offer).await,
        Err(err) => Err(err),
    };
    let next = match started {
        Ok(next) => next,
        Err(err) => {
            if let Some(guard) = holdings.xdp.as_deref_mut()
                && let Err(unpin) = guard.unpin_links()
            {
                tracing::error!("after the failed upgrade, the XDP guard: {unpin:#}");
            }
            if let Err(claim) = holdings.instance.claim() {
                tracing::warn!(%claim, "could not write our pid into the instance lock again");
            }
            return Err(err);
        }
    };
    tracing::info!(
        pid = next.pid,
        "upgrade: the new agent serves; handing over"
    );
    Ok(next)
}

/// Stops accepting, sends every spliced session to `next`, drains the connections that
/// cannot be sent (userspace copies, terminated HTTPS), then exits the process: the pins,
/// the maps and the listeners live on in the new agent.
pub(super) async fn hand_over_and_exit(
    next: Next,
    running: Vec<Running>,
    retired: Vec<FrontendMetrics>,
    datapath: Option<Arc<Datapath>>,
    drain: Duration,
) -> ! {
    let started = tokio::time::Instant::now();
    for r in &running {
        // The new agent accepts on the same sockets now; what this one already took from
        // their queues it serves (spliced connections then come over like the rest).
        let _ = r.stop.send(true);
    }
    let (sessions, mut arriving) = mpsc::unbounded_channel::<Box<HandedSession>>();
    if let Some(datapath) = &datapath {
        datapath.begin_handover(sessions);
    } else {
        drop(sessions);
    }
    let open = || {
        running.iter().map(|r| r.metrics.open()).sum::<u64>()
            + retired.iter().map(FrontendMetrics::open).sum::<u64>()
    };
    let (sent, failed) = forward_sessions(&next, &mut arriving, &open, drain, started).await;
    if let Some(datapath) = &datapath {
        datapath.leave_pins();
    }
    let left = open();
    if let Err(err) = next.done(sent).await {
        tracing::error!(%err, "upgrade: the new agent did not hear the end of the hand-over");
    }
    crate::notify::main_pid(next.pid);
    tracing::info!(
        sessions = sent,
        failed,
        cut_by_drain_deadline = left,
        new_pid = next.pid,
        elapsed = ?started.elapsed(),
        "upgrade: handed over; exiting"
    );
    // No destructors: they would detach programs and remove pins the new agent uses. The
    // kernel closes our descriptors; the new agent holds its own.
    std::process::exit(0)
}

/// Sends each session as it packs itself up, until no connection is left here (or the
/// drain deadline); returns (sent, failed).
async fn forward_sessions(
    next: &Next,
    arriving: &mut mpsc::UnboundedReceiver<Box<HandedSession>>,
    open: &impl Fn() -> u64,
    drain: Duration,
    started: tokio::time::Instant,
) -> (u64, u64) {
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut send = async |session| match next.send(session).await {
        Ok(()) => sent += 1,
        Err(err) => {
            // The sockets closed with the failed send: that connection is lost.
            failed += 1;
            tracing::error!(%err, "upgrade: sending a session to the new agent failed");
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tokio::select! {
            Some(session) = arriving.recv() => send(session).await,
            _ = tick.tick() => {
                if open() == 0 || started.elapsed() >= drain {
                    break;
                }
            }
        }
    }
    // Sessions still packing up stay here; those already packed still go.
    arriving.close();
    while let Ok(session) = arriving.try_recv() {
        send(session).await;
    }
    (sent, failed)
}

/// A frontend that can take sessions over.
pub(super) struct Taker {
    metrics: Arc<L4Metrics>,
    options: SessionOptions,
    /// Its caps: a session taken over holds slots like a connection it accepted.
    slots: Option<Slots>,
}

/// The frontends that can take sessions over, by name.
pub(super) type Takers = HashMap<String, Taker>;

pub(super) fn takers(config: &Config, running: &[Running]) -> Takers {
    running
        .iter()
        .filter_map(|r| {
            let FrontendMetrics::L4(metrics) = &r.metrics else {
                return None;
            };
            let f = config
                .frontends
                .iter()
                .find(|f| f.name == r.name && f.mode == Mode::Splice)?;
            let taker = Taker {
                metrics: metrics.clone(),
                options: f.session(),
                slots: r.slots.clone(),
            };
            Some((r.name.clone(), taker))
        })
        .collect()
}

/// Says ready to the previous agent, then takes over each session it sends.
pub(super) async fn receive(arrivals: Arrivals, takers: Takers, datapath: Option<Arc<Datapath>>) {
    let Some(datapath) = datapath else {
        // Not saying ready makes the previous agent stop this one and go on serving.
        tracing::error!("upgrade: no eBPF data path here to take the sessions over");
        return;
    };
    let arrivals = match arrivals.ready().await {
        Ok(incoming) => incoming,
        Err(err) => {
            tracing::error!(%err, "upgrade: could not tell the previous agent we serve");
            return;
        }
    };
    // Sessions of a frontend the new configuration lacks keep their own options.
    let orphans = Arc::new(L4Metrics::default());
    let mut taken = 0u64;
    let mut over_cap = 0u64;
    loop {
        match arrivals.next().await {
            Ok(Some(Arrival::Session(session))) => {
                taken += 1;
                let frontend = session.state.frontend.clone();
                let (metrics, options, held) = match takers.get(&frontend) {
                    Some(t) => {
                        let held = t.slots.as_ref().map(Slots::hold);
                        over_cap += u64::from(held.as_ref().is_some_and(Held::is_owed));
                        (t.metrics.clone(), t.options.clone(), held)
                    }
                    None => (orphans.clone(), session.state.options(), None),
                };
                let span = tracing::info_span!("conn", %frontend, adopted = true);
                let taker = (metrics, options, held);
                tokio::spawn(adopt(session, datapath.clone(), taker).instrument(span));
            }
            Ok(Some(Arrival::Done { sessions })) => {
                datapath.own_pins();
                tracing::info!(
                    sessions,
                    taken,
                    old_pid = arrivals.old_pid,
                    "upgrade: took over from the previous agent"
                );
                if over_cap > 0 {
                    // Served all the same (they are open); new clients wait until the
                    // count is back under the caps.
                    tracing::info!(
                        over_cap,
                        "upgrade: sessions taken over beyond max_connections wait for slots"
                    );
                }
                return;
            }
            Ok(None) => {
                datapath.own_pins();
                tracing::error!(
                    taken,
                    "upgrade: the previous agent left without finishing the hand-over"
                );
                return;
            }
            Err(err) => {
                datapath.own_pins();
                tracing::error!(taken, "upgrade: the hand-over channel failed: {err:#}");
                return;
            }
        }
    }
}

/// Serves a session taken over to its end, holding its slots under the caps (if it got
/// them) until then.
async fn adopt(
    session: Box<HandedSession>,
    datapath: Arc<Datapath>,
    (metrics, options, _held): (Arc<L4Metrics>, SessionOptions, Option<Held>),
) {
    let _active = ActiveGuard::new(&metrics.active);
    metrics::add(&metrics.adopted, 1);
    let _listed = Registration::adopt(&*datapath, session.state.client_cookie);
    let outcome = l4::session::adopt(&datapath, *session, &options, &metrics).await;
    l4::finish(&outcome, &metrics);
}
