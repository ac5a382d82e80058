//! Turns configuration into running parts: upstream pools, L4 and HTTP frontends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::TlsAcceptor;

use crate::admission::{AgentCap, Gate};
use crate::config::{Config, Frontend};
use crate::http::connector::UpstreamConnector;
use crate::http::proxy::Proxy;
use crate::http::{self, HttpFrontend, Limits};
use crate::l4::originate::OriginateFrontend;
use crate::l4::upstream::{Pool, Server};
use crate::l4::{Keepalive, L4Frontend, SessionOptions};
use crate::metrics::HttpMetrics;

/// One pool per backend, by name. A pool in `keep` whose backend settings are the same
/// is reused, so a reload keeps its counters and its round-robin position.
pub fn pools(
    config: &Config,
    keep: &[(crate::config::Backend, Arc<Pool>)],
) -> HashMap<String, Arc<Pool>> {
    config
        .backends
        .iter()
        .map(|b| {
            if let Some((_, pool)) = keep.iter().find(|(old, _)| old == b) {
                return (b.name.clone(), pool.clone());
            }
            let servers = b
                .servers
                .iter()
                .map(|s| Server {
                    address: s.address.clone(),
                    weight: s.weight,
                })
                .collect();
            let pool = Pool::new(
                b.name.clone(),
                servers,
                Duration::from_millis(b.connect_timeout_ms),
            )
            .with_pacing(b.pacing())
            .with_proxy_v2(b.send_proxy_v2)
            .with_preserve_source(b.preserve_source);
            (b.name.clone(), Arc::new(pool))
        })
        .collect()
}

/// The connection caps of a frontend.
pub fn gate(f: &Frontend, agent: &Arc<AgentCap>) -> Gate {
    Gate::new(
        &f.name,
        f.max_connections(),
        agent.clone(),
        f.source_limit(),
    )
}

pub fn l4_frontend(
    f: &Frontend,
    pools: &HashMap<String, Arc<Pool>>,
    kernel: bool,
    gate: Gate,
) -> L4Frontend {
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
        keepalive: keepalive(f),
        gate,
        original_destination: (f.mode == crate::config::Mode::Transparent).then(|| {
            crate::l4::OriginalDestination {
                connect_timeout: Duration::from_millis(crate::config::DEFAULT_CONNECT_TIMEOUT_MS),
                send_proxy_v2: f.send_proxy_v2,
                preserve_source: f.preserve_source,
            }
        }),
    }
}

/// TCP keepalive of a frontend's sockets (`tcp_keepalive_secs`, 0: off).
fn keepalive(f: &Frontend) -> Option<Keepalive> {
    (f.tcp_keepalive_secs > 0).then_some(Keepalive {
        idle: f.tcp_keepalive_secs,
        interval: 30,
        probes: 4,
    })
}

pub fn http_frontend(
    config: &Config,
    f: &Frontend,
    pools: &HashMap<String, Arc<Pool>>,
    metrics: Arc<HttpMetrics>,
    datapath: Option<Arc<crate::ebpf::Datapath>>,
    gate: Gate,
) -> anyhow::Result<HttpFrontend> {
    let name = &f.name;
    let (Some(cert), Some(key), Some(backend_name)) = (&f.tls_cert, &f.tls_key, &f.backend) else {
        anyhow::bail!("frontend {name}: mode http needs tls_cert, tls_key and backend");
    };
    let (backend, pool, host) = hub_backend(config, f, backend_name, pools)?;
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
    let response_timeout = Duration::from_millis(backend.response_timeout_ms);
    let cap = backend
        .max_upstream_connections
        .and_then(|max| usize::try_from(max).ok());
    let connector = UpstreamConnector::new(
        pool,
        client_tls,
        server_name,
        connect_timeout,
        metrics.clone(),
    )
    .with_cap(cap, response_timeout);
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
            response_timeout,
            upgraded_idle_timeout: Duration::from_secs(f.idle_timeout_secs),
            metrics,
        }),
        gate,
        limits: Limits {
            header_read_timeout: Duration::from_millis(f.header_read_timeout_ms),
            max_header_bytes: f.max_header_bytes,
            idle_timeout: Duration::from_millis(f.http_idle_timeout_ms),
            keepalive: keepalive(f),
        },
        datapath,
    })
}

/// The backend a TLS-speaking frontend (http, originate) talks to: its settings, its
/// pool, and the hub's host name.
fn hub_backend<'a>(
    config: &'a Config,
    f: &Frontend,
    backend_name: &str,
    pools: &HashMap<String, Arc<Pool>>,
) -> anyhow::Result<(&'a crate::config::Backend, Arc<Pool>, String)> {
    let name = &f.name;
    let backend = config
        .backends
        .iter()
        .find(|b| b.name == backend_name)
        .with_context(|| format!("frontend {name}: unknown backend {backend_name}"))?;
    let pool = pools
        .get(backend_name)
        .cloned()
        .with_context(|| format!("frontend {name}: unknown backend {backend_name}"))?;
    let host = backend
        .http_host()
        .with_context(|| format!("backend {backend_name}: no host name"))?;
    Ok((backend, pool, host))
}

/// Plain TCP in, verified TLS to the backend's host out (legacy MQTT on 1883).
pub fn originate_frontend(
    config: &Config,
    f: &Frontend,
    pools: &HashMap<String, Arc<Pool>>,
    gate: Gate,
) -> anyhow::Result<OriginateFrontend> {
    let name = &f.name;
    let backend_name = f
        .backend
        .as_ref()
        .with_context(|| format!("frontend {name}: mode originate needs a backend"))?;
    let (backend, pool, host) = hub_backend(config, f, backend_name, pools)?;
    let server_name = backend.tls_server_name.clone().unwrap_or(host);
    let mut tls = (*http::tls::client_config(backend.ca_file.as_deref())
        .with_context(|| format!("backend {backend_name}: trusted roots"))?)
    .clone();
    // MQTT over TLS, not HTTP: no ALPN.
    tls.alpn_protocols.clear();
    Ok(OriginateFrontend {
        name: name.clone(),
        pool,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        server_name: rustls_pki_types::ServerName::try_from(server_name.clone()).with_context(
            || format!("backend {backend_name}: bad TLS server name {server_name:?}"),
        )?,
        handshake_timeout: Duration::from_millis(backend.connect_timeout_ms),
        idle_timeout: Duration::from_secs(f.idle_timeout_secs),
        keepalive: keepalive(f),
        gate,
    })
}
