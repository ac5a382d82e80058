//! The running agent: loads the eBPF data path, binds every frontend, serves until told
//! to stop, then drains open connections with a deadline and removes its pins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, Mode};
use crate::ebpf::{Datapath, LoadOptions, pin_dir_for};
use crate::l4::upstream::{Pool, Server};
use crate::l4::{self, Keepalive, L4Frontend, SessionOptions};
use crate::metrics::{L4Metrics, get};

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Serve every connection in userspace (no eBPF). Counted as `userspace`.
    pub no_ebpf: bool,
    /// How long open connections may take to finish after a stop request.
    pub drain_deadline: Option<Duration>,
}

/// A frontend that is bound and serving.
pub struct Running {
    pub name: String,
    pub addr: std::net::SocketAddr,
    pub metrics: Arc<L4Metrics>,
}

/// Binds everything and starts serving; returns once listening (the work runs in tasks).
pub async fn start(
    config: &Config,
    options: &RunOptions,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Vec<Running>, Option<Arc<Datapath>>)> {
    let datapath = if options.no_ebpf {
        tracing::warn!("eBPF disabled by flag: every connection is copied in userspace");
        None
    } else {
        let load = LoadOptions {
            pin_dir: Some(pin_dir_for(&config.instance)),
        };
        let datapath = Arc::new(Datapath::load(&load)?);
        spawn_ebpf_logger(&datapath);
        Some(datapath)
    };
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let pools: HashMap<&str, Arc<Pool>> = config
        .backends
        .iter()
        .map(|b| {
            let servers = b
                .servers
                .iter()
                .map(|s| Server {
                    address: s.address.clone(),
                    weight: s.weight,
                })
                .collect();
            (
                b.name.as_str(),
                Arc::new(Pool::new(
                    b.name.clone(),
                    servers,
                    Duration::from_millis(b.connect_timeout_ms),
                )),
            )
        })
        .collect();
    let mut running = Vec::new();
    for f in &config.frontends {
        anyhow::ensure!(
            f.mode == Mode::Splice,
            "frontend {}: only splice mode is available",
            f.name
        );
        let pool = |name: &String| pools.get(name.as_str()).cloned();
        let frontend = Arc::new(L4Frontend {
            name: f.name.clone(),
            sni_routes: f
                .sni_routes
                .iter()
                .filter_map(|(host, b)| Some((host.to_ascii_lowercase(), pool(b)?)))
                .collect(),
            default_backend: f.backend.as_ref().and_then(pool),
            session: SessionOptions {
                idle_timeout: Duration::from_secs(f.idle_timeout_secs),
                max_lag: f.max_lag_bytes,
            },
            kernel: datapath.is_some(),
            client_hello_timeout: Duration::from_millis(f.client_hello_timeout_ms),
            keepalive: (f.tcp_keepalive_secs > 0).then_some(Keepalive {
                idle: f.tcp_keepalive_secs,
                interval: 30,
                probes: 4,
            }),
        });
        let listener = TcpListener::bind(f.bind)
            .await
            .with_context(|| format!("frontend {}: binding {}", f.name, f.bind))?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(L4Metrics::default());
        tracing::info!(frontend = %f.name, %addr, kernel = frontend.kernel, "listening (L4 passthrough)");
        tokio::spawn(l4::serve(
            listener,
            frontend,
            datapath.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        running.push(Running {
            name: f.name.clone(),
            addr,
            metrics,
        });
    }
    Ok((running, datapath))
}

/// Serves until `shutdown` turns true, then drains.
pub async fn run(
    config: Config,
    options: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (running, datapath) = start(&config, &options, shutdown.clone()).await?;
    // Attached once the frontends are bound, so their ports are known; detached on drop.
    let xdp = crate::xdp::start_for(&config, running.iter().map(|r| r.addr))?;
    let mut report = tokio::time::interval(Duration::from_secs(30));
    report.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = report.tick() => log_stats(&running),
        }
    }
    let deadline = options.drain_deadline.unwrap_or(Duration::from_secs(30));
    tracing::info!(?deadline, "stopped accepting; draining open connections");
    let started = tokio::time::Instant::now();
    while running.iter().any(|r| get(&r.metrics.active) > 0) && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log_stats(&running);
    drop(xdp);
    drop(datapath);
    Ok(())
}

pub fn log_stats(running: &[Running]) {
    for r in running {
        let m = &r.metrics;
        tracing::info!(
            frontend = %r.name,
            active = get(&m.active),
            accepted = get(&m.accepted),
            kernel = get(&m.kernel_spliced),
            userspace = get(&m.userspace),
            bytes_up = get(&m.bytes_up),
            bytes_down = get(&m.bytes_down),
            upstream_failed = get(&m.upstream_connect_failed),
            "stats"
        );
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
