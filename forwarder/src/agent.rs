//! The running agent: loads the eBPF data path, binds every frontend, serves until told
//! to stop, then drains open connections with a deadline and removes its pins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::TlsAcceptor;

use crate::config::{Config, Frontend, Mode};
use crate::ebpf::{Datapath, LoadOptions, pin_dir_for};
use crate::http::connector::UpstreamConnector;
use crate::http::proxy::Proxy;
use crate::http::{self, HttpFrontend, Limits};
use crate::l4::upstream::{Pool, Server};
use crate::l4::{self, Keepalive, L4Frontend, SessionOptions};
use crate::metrics::{HttpMetrics, L4Metrics, get};

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
    pub metrics: FrontendMetrics,
}

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
}

/// Binds everything and starts serving; returns once listening (the work runs in tasks).
pub async fn start(
    config: &Config,
    options: &RunOptions,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<(Vec<Running>, Option<Arc<Datapath>>)> {
    let splices = config.frontends.iter().any(|f| f.mode == Mode::Splice);
    let datapath = if !splices {
        None
    } else if options.no_ebpf {
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
        let listener = crate::listener::bind(f.bind)
            .with_context(|| format!("frontend {}: binding {}", f.name, f.bind))?;
        let addr = listener.local_addr()?;
        let metrics = match f.mode {
            Mode::Splice => {
                let frontend = l4_frontend(f, &pools, datapath.is_some());
                let metrics = Arc::new(L4Metrics::default());
                tracing::info!(frontend = %f.name, %addr, kernel = frontend.kernel, "listening (L4 passthrough)");
                tokio::spawn(l4::serve(
                    listener,
                    Arc::new(frontend),
                    datapath.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                FrontendMetrics::L4(metrics)
            }
            Mode::Http => {
                let metrics = Arc::new(HttpMetrics::default());
                let frontend = http_frontend(config, f, &pools, metrics.clone())?;
                tracing::info!(frontend = %f.name, %addr, "listening (HTTPS terminated, Host rewritten)");
                tracing::warn!(
                    frontend = %f.name,
                    "this frontend terminates TLS: device client certificates (X.509) cannot reach the hub \
                     through it. X.509 devices must use the passthrough ports (MQTT 8883, AMQP 5671)"
                );
                tokio::spawn(http::serve(
                    listener,
                    Arc::new(frontend),
                    metrics.clone(),
                    shutdown.clone(),
                ));
                FrontendMetrics::Http(metrics)
            }
        };
        running.push(Running {
            name: f.name.clone(),
            addr,
            metrics,
        });
    }
    Ok((running, datapath))
}

fn l4_frontend(f: &Frontend, pools: &HashMap<&str, Arc<Pool>>, kernel: bool) -> L4Frontend {
    let pool = |name: &String| pools.get(name.as_str()).cloned();
    L4Frontend {
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
        kernel,
        client_hello_timeout: Duration::from_millis(f.client_hello_timeout_ms),
        keepalive: (f.tcp_keepalive_secs > 0).then_some(Keepalive {
            idle: f.tcp_keepalive_secs,
            interval: 30,
            probes: 4,
        }),
    }
}

fn http_frontend(
    config: &Config,
    f: &Frontend,
    pools: &HashMap<&str, Arc<Pool>>,
    metrics: Arc<HttpMetrics>,
) -> anyhow::Result<HttpFrontend> {
    let name = &f.name;
    let (Some(cert), Some(key), Some(backend_name)) = (&f.tls_cert, &f.tls_key, &f.backend) else {
        anyhow::bail!("frontend {name}: mode http needs tls_cert, tls_key and backend");
    };
    let backend = config
        .backends
        .iter()
        .find(|b| &b.name == backend_name)
        .with_context(|| format!("frontend {name}: unknown backend {backend_name}"))?;
    let pool = pools
        .get(backend_name.as_str())
        .cloned()
        .with_context(|| format!("frontend {name}: unknown backend {backend_name}"))?;
    let host = backend
        .http_host()
        .with_context(|| format!("backend {backend_name}: no host name"))?;
    let server_name = backend
        .tls_server_name
        .clone()
        .unwrap_or_else(|| host.clone());
    let server_tls = http::tls::server_config(cert, key)
        .with_context(|| format!("frontend {name}: TLS certificate"))?;
    let client_tls = http::tls::client_config(backend.ca_file.as_deref())
        .with_context(|| format!("backend {backend_name}: trusted roots"))?;
    let server_name = rustls_pki_types::ServerName::try_from(server_name.clone())
        .with_context(|| format!("backend {backend_name}: bad TLS server name {server_name:?}"))?;
    let connect_timeout = Duration::from_millis(backend.connect_timeout_ms);
    let connector = UpstreamConnector::new(pool, client_tls, server_name, connect_timeout);
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .build(connector);
    Ok(HttpFrontend {
        name: name.clone(),
        tls: TlsAcceptor::from(server_tls),
        proxy: Arc::new(Proxy {
            frontend: name.clone(),
            hub_host: http::header_value(&host)
                .with_context(|| format!("backend {backend_name}: bad host {host:?}"))?,
            client,
            response_timeout: Duration::from_millis(backend.response_timeout_ms),
            upgraded_idle_timeout: Duration::from_secs(f.idle_timeout_secs),
            metrics,
        }),
        limits: Limits {
            max_connections: f.max_connections,
            header_read_timeout: Duration::from_millis(f.header_read_timeout_ms),
            max_header_bytes: f.max_header_bytes,
        },
    })
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
    while running.iter().any(|r| r.metrics.open() > 0) && started.elapsed() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    log_stats(&running);
    drop(xdp);
    drop(datapath);
    Ok(())
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
