//! The admin HTTP server (off unless `admin = "ADDR"` is set): Prometheus text metrics at
//! `/metrics`, for every frontend and backend (kept current across reloads), the XDP
//! guard, and the admin server itself. It holds few connections, each briefly: a slow or
//! silent client cannot keep the scraper out for long.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::agent::FrontendMetrics;
use crate::metrics::{self, AdminMetrics};

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
    /// The admin server's own counters.
    pub admin: AdminMetrics,
}

impl Registry {
    pub fn new(pin_dir: PathBuf) -> Self {
        Self {
            frontends: RwLock::default(),
            backends: RwLock::default(),
            pin_dir,
            admin: AdminMetrics::default(),
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
        for (counter, value) in self.admin.snapshot() {
            let (metric, kind) = metric_name("forwarder_admin_", counter);
            let _ = writeln!(out, "# TYPE {metric} {kind}\n{metric} {value}");
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

/// How many clients the admin server holds and for how long.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections at once; more wait in the accept queue (a scraper needs one or two).
    max_connections: usize,
    /// Time for a request's headers, also between keep-alive requests.
    header_read_timeout: Duration,
    /// A connection's whole life (a scrape takes milliseconds); then it is closed after
    /// the request in flight.
    max_lifetime: Duration,
}

const LIMITS: Limits = Limits {
    max_connections: 32,
    header_read_timeout: Duration::from_secs(5),
    max_lifetime: Duration::from_secs(60),
};

/// The "connection cap reached" warning at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Serves `/metrics` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: watch::Receiver<bool>,
) {
    serve_with(listener, registry, shutdown, LIMITS).await;
}

async fn serve_with(
    listener: TcpListener,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let started = tokio::time::Instant::now();
    let last_warned = AtomicU64::new(u64::MAX);
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                metrics::add(&registry.admin.at_capacity, 1);
                let now = started.elapsed().as_secs();
                let last = last_warned.load(Ordering::Relaxed);
                if last == u64::MAX || now.saturating_sub(last) >= WARN_EVERY.as_secs() {
                    last_warned.store(now, Ordering::Relaxed);
                    tracing::warn!(
                        max = limits.max_connections,
                        "admin: connection limit reached; new clients wait in the accept queue"
                    );
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                    _ = shutdown.changed() => return,
                }
            }
        };
        let Some((stream, peer)) = crate::listener::accept(&listener, &mut shutdown, "admin").await
        else {
            return;
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            registry.clone(),
            limits,
            permit,
        ));
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    registry: Arc<Registry>,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
) {
    let counters = registry.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let registry = registry.clone();
        async move { Ok::<_, Infallible>(respond(&registry, &request)) }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let result = match tokio::time::timeout(limits.max_lifetime, connection.as_mut()).await {
        Ok(result) => result,
        Err(_) => {
            metrics::add(&counters.admin.lifetime_exceeded, 1);
            tracing::debug!(%peer, "admin: connection open too long: closing");
            connection.as_mut().graceful_shutdown();
            let closing = tokio::time::timeout(limits.header_read_timeout, connection);
            closing.await.unwrap_or(Ok(()))
        }
    };
    match result {
        Err(err) if err.is_timeout() => {
            metrics::add(&counters.admin.header_timeout, 1);
            tracing::debug!(%peer, "admin: request headers not received in time: closed");
        }
        Err(err) => tracing::debug!(%peer, %err, "admin: connection ended with an error"),
        Ok(()) => {}
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

    #[tokio::test]
    async fn silent_clients_are_cut_and_the_connection_cap_holds_others_back() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(Registry::new(PathBuf::from("/nonexistent")));
        let (_stop, stopped) = watch::channel(false);
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(300),
            max_lifetime: Duration::from_secs(10),
        };
        tokio::spawn(serve_with(listener, registry.clone(), stopped, limits));

        // A silent client takes the only slot; a scraper waits until it is cut.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let mut scraper = TcpStream::connect(addr).await.unwrap();
        scraper
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), scraper.read_to_string(&mut answer))
            .await
            .expect("the scraper is served once the silent client is cut")
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("forwarder_admin_header_timeout_total 1")
                && answer.contains("# TYPE forwarder_admin_at_capacity_total counter"),
            "{answer}"
        );
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(1), silent.read_to_end(&mut rest));
        assert!(closed.await.is_ok(), "the silent client is still open");
        assert!(metrics::get(&registry.admin.at_capacity) >= 1);
    }

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
