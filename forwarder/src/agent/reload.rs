//! SIGHUP: read the configuration again and apply the difference. Frontends whose
//! settings (and backends) are unchanged keep running untouched; a changed one on the same
//! address goes on with the same listening socket (the new accept loop starts on it, then
//! the old one stops: nothing queued is reset, as no listener closes); one whose address
//! changed gets a new listener first, then the old one stops; removed ones stop accepting. Established connections, spliced or
//! upgraded, belong to their own tasks and are never dropped by a reload. A frontend
//! whose certificate, key or CA file content changed counts as changed (rotation); a new
//! file that does not load is refused and the frontend keeps serving with the old one.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;

use super::{FrontendMetrics, Running, Shared, Spec, start_frontend};
use crate::config::{Config, Frontend};
use crate::l4::upstream::Pool;

/// Applies the configuration file's current content; returns it. On error nothing has
/// changed that the error concerns, and the agent goes on with what runs.
pub(super) async fn apply(
    current: &Config,
    shared: &Shared<'_>,
    running: &mut Vec<Running>,
    retired: &mut Vec<FrontendMetrics>,
) -> anyhow::Result<Config> {
    let next = read_next(current, shared)?;
    apply_config(next, shared, running, retired).await
}

/// Applies `next` (the file's content, or the running configuration again when only
/// certificate files changed) against what runs; returns it.
pub(super) async fn apply_config(
    next: Config,
    shared: &Shared<'_>,
    running: &mut Vec<Running>,
    retired: &mut Vec<FrontendMetrics>,
) -> anyhow::Result<Config> {
    let pools = super::build::pools(&next, &pools_in_use(running));
    let mut tally = Tally::default();
    let mut next_running = Vec::with_capacity(next.frontends.len());
    for f in &next.frontends {
        let change = Change {
            next: &next,
            pools: &pools,
            shared,
        };
        next_running.push(change.apply(f, running, retired, &mut tally).await);
    }
    let mut next_running: Vec<Running> = next_running.into_iter().flatten().collect();
    // What is left was removed from the configuration.
    for old in running.drain(..) {
        tracing::info!(frontend = %old.name, "reload: frontend removed; open connections go on");
        forget_stats(shared, &old, &next_running);
        stop(old, retired).await;
        tally.stopped += 1;
    }
    // Stopped listeners take no new connections: once a count is 0, it stays 0.
    retired.retain(|m| m.open() > 0);
    std::mem::swap(running, &mut next_running);
    let Tally {
        kept,
        started,
        stopped,
        rotations,
    } = tally;
    tracing::info!(kept, started, stopped, rotations, "configuration reloaded");
    Ok(next)
}

/// Reads the configuration file again and says what a reload cannot change.
fn read_next(current: &Config, shared: &Shared<'_>) -> anyhow::Result<Config> {
    let path = shared
        .options
        .config_path
        .as_ref()
        .context("this agent was started without -c FILE: there is nothing to reload")?;
    let next = Config::load(path)?;
    anyhow::ensure!(
        next.instance == current.instance,
        "instance cannot change on reload ({:?} -> {:?}): its pins are in use",
        current.instance,
        next.instance
    );
    crate::transparent::check_reload(current, &next).map_err(anyhow::Error::msg)?;
    if next.max_connections != current.max_connections {
        tracing::warn!("reload: the agent-wide max_connections takes effect at the next start");
    }
    if next.xdp != current.xdp {
        tracing::warn!(
            "reload: [xdp] changes take effect at the next start (rules: `forwarder xdp`)"
        );
    }
    for warning in next.warnings() {
        tracing::warn!("{warning}");
    }
    Ok(next)
}

/// Every running backend pool with its settings: a pool whose settings stay is reused.
fn pools_in_use(running: &[Running]) -> Vec<(crate::config::Backend, Arc<Pool>)> {
    running
        .iter()
        .flat_map(|r| {
            r.spec.backends.iter().filter_map(|b| {
                let pool = r.pools.iter().find(|p| p.name == b.name)?;
                Some((b.clone(), pool.clone()))
            })
        })
        .collect()
}

#[derive(Default)]
struct Tally {
    kept: u32,
    started: u32,
    stopped: u32,
    rotations: u32,
}

/// What one frontend of the new configuration is applied against.
struct Change<'a> {
    next: &'a Config,
    pools: &'a HashMap<String, Arc<Pool>>,
    shared: &'a Shared<'a>,
}

impl Change<'_> {
    /// Keeps, replaces or starts frontend `f`; returns what runs for it now (`None`: a new
    /// frontend that did not start).
    async fn apply(
        &self,
        f: &Frontend,
        running: &mut Vec<Running>,
        retired: &mut Vec<FrontendMetrics>,
        tally: &mut Tally,
    ) -> Option<Running> {
        let spec = Spec::of(self.next, f);
        let old = running.iter().position(|r| r.name == f.name);
        if let Some(i) = old
            && running[i].spec == spec
        {
            tally.kept += 1;
            return Some(running.remove(i));
        }
        let rotated = old.is_some_and(|i| running[i].spec.only_files_differ(&spec));
        if rotated {
            tracing::info!(frontend = %f.name, "reload: certificate, key or CA file changed on disk: loading it");
        }
        // Counters go on under the same name while the kind of frontend stays.
        let metrics = match old.map(|i| &running[i].metrics) {
            Some(m) if m.same_kind(f.mode) => m.clone(),
            _ => FrontendMetrics::for_mode(f.mode),
        };
        let same_socket = old.and_then(|i| same_listener(&running[i], f));
        match start_frontend(self.next, f, self.pools, self.shared, metrics, same_socket) {
            Ok(new) => {
                if rotated {
                    tally.rotations += 1;
                    tracing::info!(frontend = %f.name, "reload: TLS configuration rotated: \
                         new connections get the new certificate, open ones go on");
                }
                if let Some(i) = old {
                    stop(running.remove(i), retired).await;
                    tally.stopped += 1;
                }
                tally.started += 1;
                Some(new)
            }
            Err(err) => {
                if rotated {
                    tracing::error!(frontend = %f.name, "reload: new certificate, key or CA file refused, \
                         the frontend keeps its current TLS configuration: {err:#}");
                } else {
                    tracing::error!(frontend = %f.name, "reload: not started: {err:#}");
                }
                old.map(|i| running.remove(i))
            }
        }
    }
}

/// Drops a removed frontend's counters from `FWD_STATS`, and its backends' unless a
/// frontend that stays still uses them.
fn forget_stats(shared: &Shared<'_>, old: &Running, staying: &[Running]) {
    let Some(datapath) = shared.datapath else {
        return;
    };
    datapath.forget_stats(&old.name);
    for pool in &old.pools {
        if !running_uses(staying, pool) {
            datapath.forget_stats(&format!("{}{}", super::BACKEND_PREFIX, pool.name));
        }
    }
}

/// The running frontend's listening socket, for its successor on the same address: no
/// listener closes, so no connection queued in it (or being set up for it) is reset.
fn same_listener(old: &Running, f: &crate::config::Frontend) -> Option<tokio::net::TcpListener> {
    if old.spec.frontend.bind != f.bind {
        return None;
    }
    let fd = old.listener_fd.as_ref()?.try_clone().ok()?;
    tokio::net::TcpListener::from_std(std::net::TcpListener::from(fd))
        .map_err(|err| tracing::warn!(%err, "reload: a new listener instead of the same one"))
        .ok()
}

fn running_uses(running: &[Running], pool: &Arc<Pool>) -> bool {
    running
        .iter()
        .any(|r| r.pools.iter().any(|p| Arc::ptr_eq(p, pool)))
}

/// Stops a frontend's accept loop and waits until its listening socket is closed. Its
/// counters go to `retired`, so the drain at stop still waits for its open connections.
async fn stop(mut frontend: Running, retired: &mut Vec<FrontendMetrics>) {
    // Our copy of the listener must not keep it open once its accept loop lets go.
    frontend.listener_fd = None;
    let _ = frontend.stop.send(true);
    let _ = frontend.task.await;
    retired.push(frontend.metrics);
}
