//! The running agent: loads the eBPF data path, binds every frontend, serves until told
//! to stop (reloading its configuration on request), then drains open connections with a
//! deadline and removes its pins.

mod build;
pub mod fd_budget;
mod reload;
mod serving;
mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::admission::AgentCap;
use crate::config::{Backend, Config, Frontend, Mode};
use crate::ebpf::{Datapath, LoadOptions, pin_dir_for};
use crate::instance_lock::InstanceLock;
use crate::l4::upstream::Pool;
use crate::metrics::{HttpMetrics, L4Metrics, get};
use crate::{http, l4};
use fd_budget::FdBudget;

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Serve every connection in userspace (no eBPF splice). Counted as `userspace`.
    pub no_ebpf: bool,
    /// How long open connections may take to finish after a stop request.
    pub drain_deadline: Option<Duration>,
    /// Where the configuration came from: what a reload reads again.
    pub config_path: Option<PathBuf>,
    /// Splice even on a kernel below the sockmap floor (`crate::kernel`).
    pub allow_old_kernel: bool,
}

impl RunOptions {
    /// These options against the running kernel: below the sockmap floor, splice
    /// frontends are served in userspace (as with `no_ebpf`) unless `allow_old_kernel`.
    fn against_kernel(&self) -> Self {
        if self.no_ebpf {
            tracing::warn!("eBPF splice disabled by flag: every connection is copied in userspace");
            return self.clone();
        }
        self.against(&crate::kernel::Status::running())
    }

    fn against(&self, status: &crate::kernel::Status) -> Self {
        let mut options = self.clone();
        if status.splice_by_default() {
            tracing::info!("kernel {status}");
        } else if options.allow_old_kernel {
            tracing::warn!(
                "kernel {status}; --allow-old-kernel: splicing anyway (bytes may be lost or \
                 duplicated under the kernel bugs the floor avoids)"
            );
        } else {
            tracing::warn!(
                "kernel {status}: every connection is copied in userspace (the splice is off)"
            );
            options.no_ebpf = true;
        }
        options
    }
}

/// A frontend that is bound and serving.
pub struct Running {
    pub name: String,
    pub addr: SocketAddr,
    pub metrics: FrontendMetrics,
    /// Its configuration and its backends': what a reload compares.
    spec: Spec,
    /// The backends' pools this frontend uses (their counters, for `stats`).
    pub pools: Vec<Arc<Pool>>,
    /// Stops this frontend's listener (its open connections go on).
    stop: Arc<watch::Sender<bool>>,
    /// One agent per instance: held while any frontend runs.
    _instance: Arc<InstanceLock>,
    /// A copy of the listener's descriptor, for `forwarder upgrade` to hand over.
    listener_fd: Option<std::os::fd::OwnedFd>,
    /// An L4 frontend's caps, for the sessions an upgrade hands this agent.
    pub slots: Option<crate::admission::Slots>,
    task: JoinHandle<()>,
}

#[derive(Clone, Debug, PartialEq)]
struct Spec {
    frontend: Frontend,
    backends: Vec<Backend>,
    /// The certificate, key and CA files the frontend reads, with a hash of their
    /// content (`None`: unreadable): a reload rebuilds a frontend whose files changed
    /// even when its configuration text did not (certificate rotation).
    files: Vec<(PathBuf, Option<u64>)>,
}

impl Spec {
    fn of(config: &Config, frontend: &Frontend) -> Self {
        let used: Vec<&String> = frontend
            .backend
            .iter()
            .chain(frontend.sni_routes.values())
            .collect();
        let backends: Vec<Backend> = config
            .backends
            .iter()
            .filter(|b| used.contains(&&b.name))
            .cloned()
            .collect();
        let mut paths: Vec<&PathBuf> = Vec::new();
        if frontend.mode == Mode::Http {
            paths.extend(frontend.tls_cert.iter().chain(&frontend.tls_key));
        }
        if matches!(frontend.mode, Mode::Http | Mode::Originate) {
            paths.extend(backends.iter().filter_map(|b| b.ca_file.as_ref()));
        }
        let files = paths
            .into_iter()
            .map(|p| (p.clone(), content_hash(p)))
            .collect();
        Self {
            frontend: frontend.clone(),
            backends,
            files,
        }
    }

    /// Same configuration, but a certificate, key or CA file's content differs.
    fn only_files_differ(&self, other: &Self) -> bool {
        self.frontend == other.frontend
            && self.backends == other.backends
            && self.files != other.files
    }
}

/// A hash of a file's content (`None` if it cannot be read): enough to notice a change.
fn content_hash(path: &std::path::Path) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let bytes = std::fs::read(path).ok()?;
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    Some(hasher.finish())
}

#[derive(Clone)]
pub enum FrontendMetrics {
    L4(Arc<L4Metrics>),
    Http(Arc<HttpMetrics>),
}

impl FrontendMetrics {
    /// Connections (and upgraded sessions) still open: what a drain waits for.
    pub fn open(&self) -> u64 {
        match self {
            Self::L4(m) => get(&m.active),
            Self::Http(m) => get(&m.active) + get(&m.websockets_active),
        }
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        match self {
            Self::L4(m) => m.snapshot(),
            Self::Http(m) => m.snapshot(),
        }
    }

    fn for_mode(mode: Mode) -> Self {
        match mode {
            Mode::Splice | Mode::Originate | Mode::Transparent => Self::L4(Arc::default()),
            Mode::Http => Self::Http(Arc::default()),
        }
    }

    fn same_kind(&self, mode: Mode) -> bool {
        matches!(
            (self, mode),
            (
                Self::L4(_),
                Mode::Splice | Mode::Originate | Mode::Transparent
            ) | (Self::Http(_), Mode::Http)
        )
    }
}

/// Loads the eBPF object: needed for the splice, and for the inspection maps
/// (`forwarder conns|stats`) of every agent. Only a splice makes a failure fatal.
fn load_datapath(
    config: &Config,
    options: &RunOptions,
    instance: &Arc<InstanceLock>,
    adopt: bool,
) -> anyhow::Result<Option<Arc<Datapath>>> {
    let splices = config
        .frontends
        .iter()
        .any(|f| matches!(f.mode, Mode::Splice | Mode::Transparent));
    let load = LoadOptions {
        pin_dir: Some(pin_dir_for(&config.instance)),
        adopt,
    };
    match Datapath::load(&load) {
        Ok(datapath) => Ok(Some(Arc::new(datapath.holding(instance.clone())))),
        Err(err) if adopt => Err(err.context("taking the running agent's maps over")),
        Err(err) if splices && !options.no_ebpf => Err(err),
        Err(err) => {
            tracing::warn!(
                "eBPF maps unavailable ({err:#}): serving without `forwarder conns|stats` inspection"
            );
            Ok(None)
        }
    }
}

/// Binds everything and starts serving; returns once listening (the work runs in tasks).
/// Frontends only: no XDP guard, no admin server, and no transparent interception (its
/// rules are removed again before this returns; see `run`).
pub async fn start(
    config: &Config,
    options: &RunOptions,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Vec<Running>, Option<Arc<Datapath>>)> {
    let prepared = prepare(config.clone(), options.clone()).await?;
    let started = launch(prepared, shutdown)?;
    Ok((started.running, started.prepared.datapath))
}

/// What the privileged part of start-up made. Everything that needs root is done: what
/// is left needs only the capabilities `privilege::KEPT`.
pub struct Prepared {
    config: Config,
    options: RunOptions,
    /// One agent per instance: held until the agent is gone.
    instance: Arc<InstanceLock>,
    /// The agent-wide connection cap, which frontends started by a reload share.
    agent_cap: Arc<AgentCap>,
    datapath: Option<Arc<Datapath>>,
    /// One bound listener per frontend, in the configuration's order.
    listeners: Vec<std::net::TcpListener>,
    /// Attached once the frontends are bound, so their ports are known; detached on drop.
    xdp: Option<crate::xdp::XdpGuard>,
    admin: Option<std::net::TcpListener>,
    /// Started by `forwarder upgrade`: where the previous agent's sessions arrive.
    arrivals: Option<crate::upgrade::Arrivals>,
    /// Transparent mode's steering and routing rules; removed on drop (see `serve`).
    transparent: Option<crate::transparent::Interception>,
}

impl Prepared {
    /// The directories the agent still writes after start-up, so a user it becomes must
    /// own them: its pin directory (it unpins at exit) and, with XDP, its state directory
    /// (run-time rules; created here).
    pub fn own_dirs(&self) -> anyhow::Result<Vec<std::path::PathBuf>> {
        let mut dirs = vec![pin_dir_for(&self.config.instance)];
        if self.config.xdp.is_some() {
            let state = self.config.state_dir();
            std::fs::create_dir_all(&state)
                .with_context(|| format!("creating {}", state.display()))?;
            dirs.push(state);
        }
        Ok(dirs)
    }
}

/// The privileged part of start-up: the instance lock, the fd limit, the eBPF data path,
/// every frontend's listener, the XDP guard and the admin port. Leaves no task behind,
/// so it can run on a runtime of its own before privileges are dropped.
pub async fn prepare(config: Config, options: RunOptions) -> anyhow::Result<Prepared> {
    prepare_with(config, options, None).await
}

/// `prepare`, or (`inherited`: started by `forwarder upgrade`) taking over the previous
/// agent's lock, maps, listeners and admin port instead of making new ones.
pub async fn prepare_with(
    config: Config,
    options: RunOptions,
    mut inherited: Option<crate::upgrade::Inherited>,
) -> anyhow::Result<Prepared> {
    let options = options.against_kernel();
    // First: a second agent of this instance must touch nothing (pins, ports).
    let instance = Arc::new(match inherited.as_mut() {
        Some(inherited) => {
            let lock = inherited.lock.try_clone()?;
            InstanceLock::inherit(lock, &config.instance)?
        }
        None => InstanceLock::acquire(&config.instance)?,
    });
    let budget = FdBudget::raise();
    budget.log(&config);
    let agent_cap = AgentCap::new(budget.agent_cap(&config));
    let datapath = load_datapath(&config, &options, &instance, inherited.is_some())?;
    crate::listener::enable_migration();
    let listeners = bind_frontends(&config, inherited.as_mut())?;
    let addrs = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    let transparent = crate::transparent::Interception::start(&config, &listeners)?;
    let xdp = crate::xdp::start_for(&config, addrs, inherited.is_some())?;
    let admin = bind_admin(&config, inherited.as_mut())?;
    Ok(Prepared {
        config,
        options,
        instance,
        agent_cap,
        datapath,
        listeners,
        xdp,
        admin,
        arrivals: inherited.map(crate::upgrade::Inherited::into_arrivals),
        transparent,
    })
}

/// Every frontend's listener, in the configuration's order: the previous agent's where
/// an upgrade handed one over for the same frontend and address, else a new one.
fn bind_frontends(
    config: &Config,
    mut inherited: Option<&mut crate::upgrade::Inherited>,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    config
        .frontends
        .iter()
        .map(|f| {
            if let Some(listener) = inherited
                .as_deref_mut()
                .and_then(|i| i.take_listener(&f.name, f.bind))
            {
                return Ok(listener);
            }
            crate::listener::bind(f.bind)
                .and_then(|l| l.into_std())
                .with_context(|| format!("frontend {}: binding {}", f.name, f.bind))
        })
        .collect()
}

/// The admin listener, if configured (the previous agent's on the same address).
fn bind_admin(
    config: &Config,
    inherited: Option<&mut crate::upgrade::Inherited>,
) -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(addr) = config.admin else {
        return Ok(None);
    };
    if let Some(listener) = inherited.and_then(|i| i.take_admin(addr)) {
        return Ok(Some(listener));
    }
    crate::admin::bind(addr)
        .and_then(|l| l.into_std())
        .map(Some)
        .with_context(|| format!("admin: binding {addr}"))
}

/// What `launch` started.
struct Started {
    running: Vec<Running>,
    prepared: Prepared,
}

/// Starts serving on what `prepare` bound (on the calling runtime).
fn launch(mut prepared: Prepared, shutdown: watch::Receiver<bool>) -> anyhow::Result<Started> {
    if let Some(datapath) = &prepared.datapath {
        spawn_ebpf_logger(datapath);
    }
    let config = &prepared.config;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let pools = build::pools(config, &[]);
    let shared = Shared {
        datapath: &prepared.datapath,
        options: &prepared.options,
        agent_cap: &prepared.agent_cap,
        instance: &prepared.instance,
        shutdown: &shutdown,
    };
    let listeners = std::mem::take(&mut prepared.listeners);
    let mut running = Vec::new();
    for (f, listener) in config.frontends.iter().zip(listeners) {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let metrics = FrontendMetrics::for_mode(f.mode);
        running.push(start_frontend(
            config,
            f,
            &pools,
            &shared,
            metrics,
            Some(listener),
        )?);
    }
    Ok(Started { running, prepared })
}

/// What every frontend of the agent shares.
struct Shared<'a> {
    datapath: &'a Option<Arc<Datapath>>,
    options: &'a RunOptions,
    agent_cap: &'a Arc<AgentCap>,
    instance: &'a Arc<InstanceLock>,
    shutdown: &'a watch::Receiver<bool>,
}

/// A frontend built from its configuration, not yet listening.
enum Built {
    Originate(l4::originate::OriginateFrontend, Arc<L4Metrics>),
    L4(l4::L4Frontend, bool, Arc<L4Metrics>),
    Http(http::HttpFrontend, Arc<HttpMetrics>),
}

/// Spawns a frontend's accept loop on its bound listener.
fn start_frontend(
    config: &Config,
    f: &Frontend,
    pools: &std::collections::HashMap<String, Arc<Pool>>,
    shared: &Shared<'_>,
    metrics: FrontendMetrics,
    // Bound by `prepare` (or the replaced frontend's, on a reload); `None`: bound here,
    // once the frontend is built (a broken certificate never opens, then closes, a
    // listener sharing the port).
    listener: Option<tokio::net::TcpListener>,
) -> anyhow::Result<Running> {
    // The files are hashed before they are read, so a change in between shows at the
    // next reload rather than being missed.
    let spec = Spec::of(config, f);
    // Everything that reads files or can fail is built before the listener is bound.
    let built = build_frontend(config, f, pools, shared, &metrics)?;
    let slots = match &built {
        Built::L4(frontend, ..) => Some(frontend.gate.slots()),
        Built::Originate(..) | Built::Http(..) => None,
    };
    let listener = match listener {
        Some(listener) => listener,
        None => crate::listener::bind(f.bind)
            .with_context(|| format!("frontend {}: binding {}", f.name, f.bind))?,
    };
    let addr = listener.local_addr()?;
    let listener_fd = std::os::fd::AsFd::as_fd(&listener)
        .try_clone_to_owned()
        .map_err(|err| tracing::debug!(%err, "no copy of the listener for upgrades"))
        .ok();
    let (stop, stopped) = frontend_stop(shared.shutdown.clone());
    let task = spawn_frontend(built, (&f.name, addr, f.mode), listener, shared, stopped);
    Ok(Running {
        name: f.name.clone(),
        addr,
        metrics,
        pools: spec
            .backends
            .iter()
            .filter_map(|b| pools.get(&b.name).cloned())
            .collect(),
        spec,
        stop,
        _instance: shared.instance.clone(),
        listener_fd,
        slots,
        task,
    })
}

fn build_frontend(
    config: &Config,
    f: &Frontend,
    pools: &std::collections::HashMap<String, Arc<Pool>>,
    shared: &Shared<'_>,
    metrics: &FrontendMetrics,
) -> anyhow::Result<Built> {
    let gate = build::gate(f, shared.agent_cap);
    Ok(match (metrics, f.mode) {
        (FrontendMetrics::L4(m), Mode::Originate) => Built::Originate(
            build::originate_frontend(config, f, pools, gate)?,
            m.clone(),
        ),
        (FrontendMetrics::L4(m), _) => {
            let kernel = shared.datapath.is_some() && !shared.options.no_ebpf;
            Built::L4(
                build::l4_frontend(f, pools, kernel, gate),
                kernel,
                m.clone(),
            )
        }
        (FrontendMetrics::Http(m), _) => Built::Http(
            build::http_frontend(config, f, pools, m.clone(), shared.datapath.clone(), gate)?,
            m.clone(),
        ),
    })
}

/// Starts the accept loop of a built frontend on `listener`.
fn spawn_frontend(
    built: Built,
    (name, addr, mode): (&str, SocketAddr, Mode),
    listener: tokio::net::TcpListener,
    shared: &Shared<'_>,
    stopped: watch::Receiver<bool>,
) -> JoinHandle<()> {
    match built {
        Built::Originate(frontend, m) => {
            tracing::info!(frontend = %name, %addr, "listening (plain TCP in, TLS to the hub originated here; relayed in userspace, cannot be spliced)");
            tokio::spawn(l4::originate::serve(
                listener,
                Arc::new(frontend),
                m,
                stopped,
            ))
        }
        Built::L4(frontend, kernel, m) => {
            let how = if mode == Mode::Transparent {
                "listening (transparent: intercepted connections, L4 passthrough)"
            } else {
                "listening (L4 passthrough)"
            };
            tracing::info!(frontend = %name, %addr, kernel, "{how}");
            tokio::spawn(l4::serve(
                listener,
                Arc::new(frontend),
                shared.datapath.clone(),
                m,
                stopped,
            ))
        }
        Built::Http(frontend, m) => {
            tracing::info!(frontend = %name, %addr, "listening (HTTPS terminated, Host rewritten)");
            tracing::warn!(
                frontend = %name,
                "this frontend terminates TLS: device client certificates (X.509) cannot reach the hub \
                 through it. X.509 devices must use the passthrough ports (MQTT 8883, AMQP 5671)"
            );
            tokio::spawn(http::serve(
                listener,
                Arc::new(frontend),
                m,
                stopped,
                shared.shutdown.clone(),
            ))
        }
    }
}

/// A stop signal for one frontend: set by a reload that removes or replaces it, or by
/// the agent's own stop (or when the agent's stop sender is gone).
fn frontend_stop(
    mut shutdown: watch::Receiver<bool>,
) -> (Arc<watch::Sender<bool>>, watch::Receiver<bool>) {
    let (stop, stopped) = watch::channel(false);
    let stop = Arc::new(stop);
    let forward = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => {}
            () = forward.closed() => return,
        }
        let _ = forward.send(true);
    });
    (stop, stopped)
}

/// Serves until `shutdown` turns true, then drains. Each message on `reload` reads the
/// configuration file again and applies the difference without dropping connections.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: watch::Receiver<bool>,
    reload: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    serve(prepare(config, options).await?, shutdown, reload).await
}

/// Serves what `prepare` set up until `shutdown`, then drains (see `run`).
pub async fn serve(
    prepared: Prepared,
    shutdown: watch::Receiver<bool>,
    reload: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let (_no_upgrades, upgrades) = mpsc::channel(1);
    serve_with_upgrades(prepared, shutdown, reload, upgrades).await
}

/// How often the agent looks at certificate, key and CA files for a renewal (reading and
/// hashing a few small files).
const CERTIFICATE_LOOK: Duration = Duration::from_secs(5);

/// `serve`, where each message on `upgrade` hands the agent over to its binary on disk
/// (`crate::upgrade`); once that succeeds, this process exits.
pub async fn serve_with_upgrades(
    prepared: Prepared,
    mut shutdown: watch::Receiver<bool>,
    mut reload: mpsc::Receiver<()>,
    mut upgrade: mpsc::Receiver<()>,
) -> anyhow::Result<()> {
    let started = launch(prepared, shutdown.clone())?;
    let mut serving = serving::Serving::start(started, shutdown.clone())?;
    crate::notify::ready();
    let mut report = tokio::time::interval(Duration::from_secs(30));
    report.tick().await;
    let mut publish = tokio::time::interval(Duration::from_secs(1));
    let mut files = tokio::time::interval(CERTIFICATE_LOOK);
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = files.tick() => serving.rotate_changed_files().await,
            Some(()) = upgrade.recv() => serving.upgrade().await,
            Some(()) = reload.recv() => serving.reload().await,
            _ = publish.tick() => serving.publish(),
            _ = report.tick() => log_stats(&serving.running),
        }
    }
    serving.drain().await;
    Ok(())
}

/// Counters into the pinned `FWD_STATS` map, for `forwarder stats`: per frontend, and
/// per backend under `backend:<name>`.
fn publish_stats(running: &[Running], datapath: Option<&Datapath>) {
    let Some(datapath) = datapath else {
        return;
    };
    for r in running {
        if let Err(err) = datapath.publish_stats(&r.name, &r.metrics.snapshot()) {
            tracing::debug!(%err, frontend = %r.name, "stats not published");
        }
    }
    for pool in backend_pools(running) {
        let key = format!("{BACKEND_PREFIX}{}", pool.name);
        if let Err(err) = datapath.publish_stats(&key, &pool.metrics.snapshot()) {
            tracing::debug!(%err, backend = %pool.name, "stats not published");
        }
    }
}

/// How backend counters are named in `FWD_STATS` (beside the frontends').
pub const BACKEND_PREFIX: &str = "backend:";

/// Every backend pool in use, once each.
pub fn backend_pools(running: &[Running]) -> Vec<Arc<Pool>> {
    let mut pools: Vec<Arc<Pool>> = Vec::new();
    for pool in running.iter().flat_map(|r| &r.pools) {
        if !pools.iter().any(|p| Arc::ptr_eq(p, pool)) {
            pools.push(pool.clone());
        }
    }
    pools
}

pub fn log_stats(running: &[Running]) {
    for r in running {
        let counters = r
            .metrics
            .snapshot()
            .into_iter()
            .filter(|(_, value)| *value > 0)
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" ");
        tracing::info!(frontend = %r.name, "stats: {counters}");
    }
}

fn spawn_ebpf_logger(datapath: &Datapath) {
    let logger = match datapath.logger() {
        Ok(logger) => logger,
        Err(err) => {
            tracing::debug!(%err, "no eBPF log reader");
            return;
        }
    };
    let mut logger = match crate::sys::async_fd_readable(logger) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::debug!(%err, "eBPF log reader not pollable");
            return;
        }
    };
    tokio::spawn(async move {
        while let Ok(mut guard) = logger.readable_mut().await {
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Status;

    #[test]
    fn below_the_kernel_floor_the_splice_is_off_unless_allowed() {
        let default = RunOptions::default();
        assert!(!default.against(&Status::of("6.12.34+deb13")).no_ebpf);
        assert!(default.against(&Status::of("6.12.33")).no_ebpf);
        assert!(default.against(&Status::of("6.14.11")).no_ebpf);
        let allowed = RunOptions {
            allow_old_kernel: true,
            ..Default::default()
        };
        assert!(!allowed.against(&Status::of("5.15.0")).no_ebpf);
    }
}
