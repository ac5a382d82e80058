//! SIGHUP: read the configuration again and apply the difference. Frontends whose
//! settings (and backends) are unchanged keep running untouched; changed ones get a new
//! listener first (SO_REUSEPORT lets both hold the port for a moment) and then the old
//! one stops accepting; removed ones stop accepting. Established connections, spliced or
//! upgraded, belong to their own tasks and are never dropped by a reload. A frontend
//! whose certificate, key or CA file content changed counts as changed (rotation); a new
//! file that does not load is refused and the frontend keeps serving with the old one.

use std::sync::Arc;

use anyhow::Context as _;

use super::{FrontendMetrics, Running, Shared, Spec, start_frontend};
use crate::config::Config;

/// Applies the configuration file's current content; returns it. On error nothing has
/// changed that the error concerns, and the agent goes on with what runs.
pub(super) async fn apply(
    current: &Config,
    shared: &Shared<'_>,
    running: &mut Vec<Running>,
    retired: &mut Vec<FrontendMetrics>,
) -> anyhow::Result<Config> {
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
    let keep: Vec<_> = running
        .iter()
        .flat_map(|r| {
            r.spec.backends.iter().filter_map(|b| {
                let pool = r.pools.iter().find(|p| p.name == b.name)?;
                Some((b.clone(), pool.clone()))
            })
        })
        .collect();
    let pools = super::build::pools(&next, &keep);
    let (mut kept, mut started, mut stopped, mut rotations) = (0, 0, 0, 0u32);
    let mut next_running = Vec::with_capacity(next.frontends.len());
    for f in &next.frontends {
        let spec = Spec::of(&next, f);
        let old = running.iter().position(|r| r.name == f.name);
        if let Some(i) = old
            && running[i].spec == spec
        {
            next_running.push(running.remove(i));
            kept += 1;
            continue;
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
        match start_frontend(&next, f, &pools, shared, metrics, None) {
            Ok(new) => {
                if rotated {
                    rotations += 1;
                    tracing::info!(frontend = %f.name, "reload: TLS configuration rotated: \
                         new connections get the new certificate, open ones go on");
                }
                if let Some(i) = old {
                    stop(running.remove(i), retired).await;
                    stopped += 1;
                }
                next_running.push(new);
                started += 1;
            }
            Err(err) => {
                if rotated {
                    tracing::error!(frontend = %f.name, "reload: new certificate, key or CA file refused, \
                         the frontend keeps its current TLS configuration: {err:#}");
                } else {
                    tracing::error!(frontend = %f.name, "reload: not started: {err:#}");
                }
                if let Some(i) = old {
                    next_running.push(running.remove(i));
                }
            }
        }
    }
    // What is left was removed from the configuration.
    for old in running.drain(..) {
        tracing::info!(frontend = %old.name, "reload: frontend removed; open connections go on");
        if let Some(datapath) = shared.datapath {
            datapath.forget_stats(&old.name);
            for pool in &old.pools {
                // Still used by a frontend that stays? Then its counters stay too.
                if !running_uses(&next_running, pool) {
                    datapath.forget_stats(&format!("{}{}", super::BACKEND_PREFIX, pool.name));
                }
            }
        }
        stop(old, retired).await;
        stopped += 1;
    }
    // Stopped listeners take no new connections: once a count is 0, it stays 0.
    retired.retain(|m| m.open() > 0);
    *running = next_running;
    tracing::info!(kept, started, stopped, rotations, "configuration reloaded");
    Ok(next)
}

fn running_uses(running: &[Running], pool: &Arc<crate::l4::upstream::Pool>) -> bool {
    running
        .iter()
        .any(|r| r.pools.iter().any(|p| Arc::ptr_eq(p, pool)))
}

/// Stops a frontend's accept loop and waits until its listening socket is closed. Its
/// counters go to `retired`, so the drain at stop still waits for its open connections.
async fn stop(frontend: Running, retired: &mut Vec<FrontendMetrics>) {
    let _ = frontend.stop.send(true);
    let _ = frontend.task.await;
    retired.push(frontend.metrics);
}
