//! The agent while it serves: what each event of its loop does (a reload, an upgrade, the
//! once-a-second publishing), and the drain at the end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{
    FrontendMetrics, Prepared, Running, Shared, Spec, Started, backend_pools, log_stats,
    publish_stats, reload, upgrade,
};
use crate::admin::Registry;
use crate::admission::AgentCap;
use crate::config::Config;
use crate::ebpf::{Datapath, pin_dir_for};
use crate::instance_lock::InstanceLock;
use crate::xdp::XdpGuard;

pub(super) struct Serving {
    config: Config,
    options: super::RunOptions,
    instance: Arc<InstanceLock>,
    agent_cap: Arc<AgentCap>,
    datapath: Option<Arc<Datapath>>,
    xdp: Option<XdpGuard>,
    /// Transparent mode's steering and routing rules; removed first at a stop.
    transparent: Option<crate::transparent::Interception>,
    /// The Prometheus page's view of the frontends (`None`: no admin address).
    admin: Option<Arc<Registry>>,
    /// A copy of the admin listener, for an upgrade to hand over.
    admin_fd: Option<(SocketAddr, OwnedFd)>,
    pub(super) running: Vec<Running>,
    /// Counters of frontends a reload stopped while they still had open connections.
    retired: Vec<FrontendMetrics>,
    /// Certificate, key and CA file contents a rotation was refused for (frontend name ->
    /// the files' hashes then), so a broken file is reported once, not at every look.
    refused_files: HashMap<String, Vec<(std::path::PathBuf, Option<u64>)>>,
    shutdown: watch::Receiver<bool>,
}

impl Serving {
    /// Starts the admin server and, after an upgrade, the taking over of the previous
    /// agent's sessions.
    pub(super) fn start(started: Started, shutdown: watch::Receiver<bool>) -> anyhow::Result<Self> {
        let Started { running, prepared } = started;
        let Prepared {
            config,
            options,
            instance,
            agent_cap,
            datapath,
            listeners: _,
            xdp,
            admin,
            arrivals,
            mut transparent,
        } = prepared;
        if let Some(t) = transparent.as_mut() {
            t.spawn_refresh();
        }
        let admin_fd = admin.as_ref().and_then(|l| {
            Some((
                l.local_addr().ok()?,
                std::os::fd::AsFd::as_fd(l).try_clone_to_owned().ok()?,
            ))
        });
        let admin = admin
            .map(|listener| start_admin(&config, listener, &shutdown))
            .transpose()?;
        if let Some(arrivals) = arrivals {
            let takers = upgrade::takers(&config, &running);
            tokio::spawn(upgrade::receive(arrivals, takers, datapath.clone()));
        }
        let serving = Self {
            config,
            options,
            instance,
            agent_cap,
            datapath,
            xdp,
            transparent,
            admin,
            admin_fd,
            running,
            retired: Vec::new(),
            refused_files: HashMap::new(),
            shutdown,
        };
        serving.register();
        Ok(serving)
    }

    /// Shows the running frontends and their backends on the Prometheus page.
    fn register(&self) {
        if let Some(admin) = &self.admin {
            admin.set(
                self.running
                    .iter()
                    .map(|r| (r.name.clone(), r.metrics.clone()))
                    .collect(),
                backend_pools(&self.running),
            );
        }
    }

    /// SIGUSR2: hands everything to the binary on disk and exits, or (refused) goes on.
    pub(super) async fn upgrade(&mut self) {
        let holdings = upgrade::Holdings {
            instance: &self.instance,
            running: &self.running,
            admin: self.admin_fd.as_ref().map(|(addr, fd)| (*addr, fd)),
            xdp: self.xdp.as_mut(),
            demo: self.options.config_path.is_none()
                && self.config.instance == crate::demo::INSTANCE,
            transparent: self.transparent.is_some(),
        };
        match upgrade::start_next(holdings).await {
            Ok(next) => {
                let drain = self
                    .options
                    .drain_deadline
                    .unwrap_or(crate::config::DEFAULT_DRAIN);
                let running = std::mem::take(&mut self.running);
                let retired = std::mem::take(&mut self.retired);
                upgrade::hand_over_and_exit(next, running, retired, self.datapath.clone(), drain)
                    .await;
            }
            Err(err) => {
                tracing::error!("upgrade refused, still serving: {err:#}");
                if let Some(datapath) = &self.datapath
                    && let Err(err) = datapath.reattach_verdict()
                {
                    tracing::error!("after the failed upgrade: {err:#}");
                }
            }
        }
    }

    /// SIGHUP: applies the configuration file's current content, or keeps the running one.
    pub(super) async fn reload(&mut self) {
        let shared = Shared {
            datapath: &self.datapath,
            options: &self.options,
            agent_cap: &self.agent_cap,
            instance: &self.instance,
            shutdown: &self.shutdown,
        };
        let applied = reload::apply(&self.config, &shared, &mut self.running, &mut self.retired);
        let next = match applied.await {
            Ok(next) => next,
            Err(err) => {
                tracing::error!(
                    "reload refused, still serving the previous configuration: {err:#}"
                );
                return;
            }
        };
        if let Some(guard) = self.xdp.as_mut() {
            let ports: Vec<u16> = self.running.iter().map(|r| r.addr.port()).collect();
            if let Err(err) = guard.maps().set_ports(&ports) {
                tracing::warn!(%err, "reload: XDP protected ports not updated");
            }
        }
        if next.admin != self.config.admin {
            tracing::warn!("reload: a new admin address takes effect at the next start");
        }
        self.register();
        self.config = next;
    }

    /// Every few seconds: rotates the certificates of frontends whose certificate, key or
    /// CA files changed on disk (a renewal by certbot, cert-manager, ...), as a reload
    /// would, with the running configuration (the configuration file is not read: an
    /// edit in progress there waits for SIGHUP).
    pub(super) async fn rotate_changed_files(&mut self) {
        let changed: Vec<String> = self
            .running
            .iter()
            .filter_map(|r| {
                let now = Spec::of(&self.config, &r.spec.frontend).files;
                let refused = self.refused_files.get(&r.name) == Some(&now);
                (now != r.spec.files && !refused).then(|| r.name.clone())
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        tracing::info!(frontends = ?changed, "certificate, key or CA files changed on disk: rotating");
        let shared = Shared {
            datapath: &self.datapath,
            options: &self.options,
            agent_cap: &self.agent_cap,
            instance: &self.instance,
            shutdown: &self.shutdown,
        };
        let again = self.config.clone();
        let applied =
            reload::apply_config(again, &shared, &mut self.running, &mut self.retired).await;
        if let Err(err) = applied {
            tracing::error!("certificate rotation refused: {err:#}");
        }
        // A frontend still on the old files refused the new ones (logged by the reload):
        // remember them until they change again.
        self.refused_files.clear();
        for r in &self.running {
            let now = Spec::of(&self.config, &r.spec.frontend).files;
            if now != r.spec.files {
                self.refused_files.insert(r.name.clone(), now);
            }
        }
        self.register();
    }

    /// Once a second: counters for `forwarder stats`, run-time XDP rules to their file.
    pub(super) fn publish(&mut self) {
        publish_stats(&self.running, self.datapath.as_deref());
        if let (Some(t), Some(dp)) = (&self.transparent, self.datapath.as_deref()) {
            t.publish(dp);
        }
        if let Some(guard) = self.xdp.as_mut() {
            guard.save_rules();
        }
    }

    /// After a stop: waits (up to the drain deadline) for open connections, those of
    /// frontends earlier reloads retired too, then detaches and unpins.
    pub(super) async fn drain(mut self) {
        // Stop intercepting first: while the agent drains, new connections go on to their
        // destination through the host's ordinary routing instead of being reset.
        drop(self.transparent.take());
        let deadline = self
            .options
            .drain_deadline
            .unwrap_or(crate::config::DEFAULT_DRAIN);
        tracing::info!(?deadline, "stopped accepting; draining open connections");
        let started = tokio::time::Instant::now();
        let retired_open: u64 = self.retired.iter().map(FrontendMetrics::open).sum();
        if retired_open > 0 {
            tracing::info!(
                connections = retired_open,
                "draining also the connections of frontends removed or replaced by earlier reloads"
            );
        }
        let open = |m: &FrontendMetrics| m.open() > 0;
        while (self.running.iter().any(|r| open(&r.metrics)) || self.retired.iter().any(open))
            && started.elapsed() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        log_stats(&self.running);
        let Self {
            datapath,
            xdp,
            running,
            ..
        } = self;
        drop(xdp);
        drop(running);
        if let Some(datapath) = datapath {
            // Connection tasks let go of their handle as they finish: wait for them
            // (briefly) so the programs are detached and the pins gone when we return.
            let until = tokio::time::Instant::now() + Duration::from_secs(2);
            while Arc::strong_count(&datapath) > 1 && tokio::time::Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            drop(datapath);
        }
    }
}

fn start_admin(
    config: &Config,
    listener: std::net::TcpListener,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<Arc<Registry>> {
    let registry = Arc::new(Registry::new(pin_dir_for(&config.instance)));
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "admin: Prometheus metrics at /metrics");
    tokio::spawn(crate::admin::serve(
        listener,
        registry.clone(),
        shutdown.clone(),
    ));
    Ok(registry)
}
