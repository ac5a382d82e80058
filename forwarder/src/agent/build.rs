//! Turns configuration into running parts: upstream pools, L4 and HTTP frontends.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_rustls::TlsAcceptor;

use crate::admission::{AgentCap, Gate};
use crate::config::{Config, Frontend, Hub};
use crate::http::connector::UpstreamConnector;
use crate::http::proxy::Proxy;
use crate::http::{self, HttpFrontend, Limits};
use crate::l4::L4Frontend;
use crate::l4::originate::OriginateFrontend;
use crate::l4::upstream::{Pool, Server};
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
            let pool = Pool::new(b.name.clone(), servers, b.connect_timeout)
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
        session: f.session(),
        kernel,
        client_hello_timeout: f.client_hello_timeout,
        keepalive: f.keepalive(),
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

pub fn http_frontend(
    config: &Config,
    f: &Frontend,
    pools: &HashMap<String, Arc<Pool>>,
    metrics: Arc<HttpMetrics>,
    datapath: Option<Arc<crate::ebpf::Datapath>>,
    gate: Gate,
) -> anyhow::Result<HttpFrontend> {
    let name = &f.name;
    let terminating = config.terminating(f)?;
    let (backend, pool) = hub_pool(&terminating.hub, pools)?;
    let backend_name = &backend.name;
    let server_tls = http::tls::server_config(terminating.tls_cert, terminating.tls_key)
        .with_context(|| format!("frontend {name}: TLS certificate"))?;
    let client_tls = http::tls::client_config(backend.ca_file.as_deref())
        .with_context(|| format!("backend {backend_name}: trusted roots"))?;
    let server_name = terminating.hub.server_name.clone();
    let connect_timeout = backend.connect_timeout;
    let response_timeout = backend.response_timeout;
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
            hub_host: terminating.hub.host,
            client,
            response_timeout,
            upgraded_idle_timeout: f.idle_timeout,
            metrics,
        }),
        gate,
        limits: Limits {
            header_read_timeout: f.header_read_timeout,
            max_header_bytes: f.max_header_bytes,
            idle_timeout: f.http_idle_timeout,
            keepalive: f.keepalive(),
        },
        datapath,
    })
}

/// The hub's backend settings and its running pool.
fn hub_pool<'c>(
    hub: &Hub<'c>,
    pools: &HashMap<String, Arc<Pool>>,
) -> anyhow::Result<(&'c crate::config::Backend, Arc<Pool>)> {
    let backend = hub.backend;
    let pool = pools
        .get(&backend.name)
        .cloned()
        .with_context(|| format!("backend {}: no pool", backend.name))?;
    Ok((backend, pool))
}

/// Plain TCP in, verified TLS to the backend's host out (legacy MQTT on 1883).
pub fn originate_frontend(
    config: &Config,
    f: &Frontend,
    pools: &HashMap<String, Arc<Pool>>,
    gate: Gate,
) -> anyhow::Result<OriginateFrontend> {
    let hub = config.hub(f)?;
    let (backend, pool) = hub_pool(&hub, pools)?;
    let backend_name = &backend.name;
    let mut tls = (*http::tls::client_config(backend.ca_file.as_deref())
        .with_context(|| format!("backend {backend_name}: trusted roots"))?)
    .clone();
    // MQTT over TLS, not HTTP: no ALPN.
    tls.alpn_protocols.clear();
    Ok(OriginateFrontend {
        pool,
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        server_name: hub.server_name,
        handshake_timeout: backend.connect_timeout,
        idle_timeout: f.idle_timeout,
        keepalive: f.keepalive(),
        gate,
    })
}
