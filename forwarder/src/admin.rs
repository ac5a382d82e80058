//! The admin HTTP server (off unless `admin = "ADDR"` is set): Prometheus text metrics at
//! `/metrics`, for every frontend and backend (kept current across reloads) and the XDP
//! guard.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::FrontendMetrics;

/// Counters that go up and down (the rest only go up), of frontends and backends.
const GAUGES: [&str; 4] = [
    "active",
    "websockets_active",
    "connect_queue_depth",
    "upstream_connections",
];

/// The metric name and Prometheus type of a counter: `_total` for counters only.
fn metric_name(prefix: &str, counter: &str) -> (String, &'static str) {
    if GAUGES.contains(&counter) {
        (format!("{prefix}{counter}"), "gauge")
    } else {
        (format!("{prefix}{counter}_total"), "counter")
    }
}

/// What `/metrics` reports: the agent replaces the list on every reload.
#[derive(Default)]
pub struct Registry {
    frontends: RwLock<Vec<(String, FrontendMetrics)>>,
    backends: RwLock<Vec<Arc<crate::l4::upstream::Pool>>>,
    /// Pin directory of the instance, where the XDP guard's counters are read.
    pin_dir: PathBuf,
}

impl Registry {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            frontends: RwLock::default(),
            backends: RwLock::default(),
            pin_dir,
        }
    }

    pub fn set(
        &self,
        frontends: Vec<(String, FrontendMetrics)>,
        backends: Vec<Arc<crate::l4::upstream::Pool>>,
    ) {
        if let Ok(mut current) = self.frontends.write() {
            *current = frontends;
        }
        if let Ok(mut current) = self.backends.write() {
            *current = backends;
        }
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let frontends = self.frontends.read().map(|f| f.clone()).unwrap_or_default();
        // Group by counter so each metric's HELP/TYPE comes once.
        let mut by_counter: std::collections::BTreeMap<&'static str, Vec<(String, &str, u64)>> =
            Default::default();
        for (name, metrics) in &frontends {
            let mode = match metrics {
                FrontendMetrics::L4(_) => "splice",
                FrontendMetrics::Http(_) => "http",
            };
            for (counter, value) in metrics.snapshot() {
                by_counter
                    .entry(counter)
                    .or_default()
                    .push((escape(name), mode, value));
            }
        }
        let mut out = String::new();
        for (counter, samples) in by_counter {
            let (metric, kind) = metric_name("forwarder_", counter);
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (frontend, mode, value) in samples {
                let _ = writeln!(
                    out,
                    "{metric}{{frontend=\"{frontend}\",mode=\"{mode}\"}} {value}"
                );
            }
        }
        let backends = self.backends.read().map(|b| b.clone()).unwrap_or_default();
        let mut by_counter: std::collections::BTreeMap<&'static str, Vec<(String, u64)>> =
            Default::default();
        for pool in &backends {
            for (counter, value) in pool.metrics.snapshot() {
                by_counter
                    .entry(counter)
                    .or_default()
                    .push((escape(&pool.name), value));
            }
        }
        for (counter, samples) in by_counter {
            let (metric, kind) = metric_name("forwarder_backend_", counter);
            let _ = writeln!(out, "# TYPE {metric} {kind}");
            for (backend, value) in samples {
                let _ = writeln!(out, "{metric}{{backend=\"{backend}\"}} {value}");
            }
        }
        if let Ok(stats) = crate::xdp::XdpMaps::open_pinned(&self.pin_dir).and_then(|m| m.stats()) {
            let _ = writeln!(out, "# TYPE forwarder_xdp_packets_total counter");
            for (reason, value) in stats.named() {
                let _ = writeln!(
                    out,
                    "forwarder_xdp_packets_total{{reason=\"{reason}\"}} {value}"
                );
            }
        }
        out
    }
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `/metrics` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let registry = registry.clone();
                async move { Ok::<_, Infallible>(respond(&registry, &request)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(registry: &Registry, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match request.uri().path() {
        "/metrics" => (
            StatusCode::OK,
            "text/plain; version=0.0.4",
            registry.render(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = http::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, value);
    }
    response
}

/// Binds the admin address; the caller spawns `serve`.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::listener::bind(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{HttpMetrics, L4Metrics};

    #[test]
    fn renders_counters_and_gauges_per_frontend() {
        let registry = Registry::new(PathBuf::from("/nonexistent"));
        let l4 = Arc::new(L4Metrics::default());
        l4.accepted.store(7, std::sync::atomic::Ordering::Relaxed);
        l4.active.store(2, std::sync::atomic::Ordering::Relaxed);
        let pool = Arc::new(crate::l4::upstream::Pool::new(
            "hub",
            Vec::new(),
            std::time::Duration::from_secs(1),
        ));
        pool.metrics
            .connects
            .store(5, std::sync::atomic::Ordering::Relaxed);
        pool.metrics
            .connect_queue_depth
            .store(3, std::sync::atomic::Ordering::Relaxed);
        registry.set(
            vec![
                ("mqtt".into(), FrontendMetrics::L4(l4)),
                (
                    "https".into(),
                    FrontendMetrics::Http(Arc::new(HttpMetrics::default())),
                ),
            ],
            vec![pool],
        );
        let text = registry.render();
        assert!(
            text.contains("# TYPE forwarder_accepted_total counter"),
            "{text}"
        );
        assert!(text.contains("forwarder_accepted_total{frontend=\"mqtt\",mode=\"splice\"} 7"));
        assert!(text.contains("forwarder_accepted_total{frontend=\"https\",mode=\"http\"} 0"));
        assert!(text.contains("# TYPE forwarder_active gauge"));
        assert!(text.contains("forwarder_active{frontend=\"mqtt\",mode=\"splice\"} 2"));
        // One TYPE line per metric, even with two frontends.
        assert_eq!(text.matches("# TYPE forwarder_accepted_total").count(), 1);
        assert!(
            text.contains("forwarder_backend_connects_total{backend=\"hub\"} 5"),
            "{text}"
        );
        // Pacing: the queue depth is a gauge, the refusals are counters.
        assert!(
            text.contains("# TYPE forwarder_backend_connect_queue_depth gauge")
                && text.contains("forwarder_backend_connect_queue_depth{backend=\"hub\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE forwarder_backend_connects_refused_queue_full_total counter")
                && text.contains(
                    "forwarder_backend_connects_refused_queue_timeout_total{backend=\"hub\"} 0"
                )
                && text.contains("forwarder_backend_connects_paced_total{backend=\"hub\"} 0"),
            "{text}"
        );
    }
}
