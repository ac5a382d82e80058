//! The terminated HTTPS path against hostile or careless clients and overload: silent
//! TLS clients closed after the header timeout, idle HTTP/2 and keep-alive connections
//! closed after the idle timeout, TCP keepalive on client sockets, the cap on upstream
//! connections per backend, and an admin address that would steal a frontend's port.

use forwarder_tests::forwarder_binary;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::agent::{self, FrontendMetrics, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::{HttpMetrics, get};
use forwarder_tests::hub::{SLOW_ANSWER, TestHub};
use forwarder_tests::peers::scratch_dir;
use forwarder_tests::pki::{Leaf, TestCa};
use forwarder_tests::require_root;
use http::header::HOST;
use http::{Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::client::TlsStream;

const HUB: &str = "hub.test";
const PROXY: &str = "proxy.test";

type ClientBody = BoxBody<Bytes, io::Error>;

fn empty() -> ClientBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A body that stays open until the returned sender is dropped.
fn held_body() -> (mpsc::Sender<Bytes>, ClientBody) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, io::Error>(Frame::data(chunk)), rx))
    });
    (tx, BoxBody::new(StreamBody::new(stream)))
}

fn get_request(path: &str) -> Request<ClientBody> {
    Request::get(path)
        .header(HOST, PROXY)
        .body(empty())
        .unwrap()
}

struct Setup {
    ca: TestCa,
    hub_leaf: Leaf,
    proxy_leaf: Leaf,
}

impl Setup {
    fn new(test: &str) -> Self {
        require_root();
        let dir = scratch_dir(test);
        let ca = TestCa::new(&dir);
        let hub_leaf = ca.issue("hub", &[HUB]);
        let proxy_leaf = ca.issue("proxy", &[PROXY, "127.0.0.1"]);
        Self {
            ca,
            hub_leaf,
            proxy_leaf,
        }
    }

    async fn hub(&self) -> TestHub {
        TestHub::start(HUB, &self.hub_leaf.cert, &self.hub_leaf.key, None).await
    }

    /// One terminating frontend on an ephemeral port in front of `hub`.
    fn config(&self, hub: SocketAddr, tweak: impl FnOnce(&mut Frontend, &mut Backend)) -> Config {
        let mut frontend =
            Frontend::new("https", "127.0.0.1:0".parse().unwrap(), Mode::Http, "hub");
        frontend.tls_cert = Some(self.proxy_leaf.cert.clone());
        frontend.tls_key = Some(self.proxy_leaf.key.clone());
        let mut backend = Backend::new("hub", &hub.to_string());
        backend.host = Some(HUB.into());
        backend.ca_file = Some(self.ca.ca_pem.clone());
        tweak(&mut frontend, &mut backend);
        let config = Config::new(
            format!("http-limits-{}", forwarder_tests::netns::unique()),
            vec![frontend],
            vec![backend],
        );
        config.validate().expect("test config is valid");
        config
    }

    async fn tls(&self, addr: SocketAddr, alpn: &[u8]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let connector = tokio_rustls::TlsConnector::from(self.ca.client_config(&[alpn]));
        let name = ServerName::try_from(PROXY).expect("server name");
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(alpn));
        tls
    }

    async fn h1(&self, addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<ClientBody> {
        let tls = self.tls(addr, b"http/1.1").await;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        sender
    }
}

struct Forwarder {
    addr: SocketAddr,
    metrics: Arc<HttpMetrics>,
    _stop: watch::Sender<bool>,
}

async fn start_forwarder(config: &Config) -> Forwarder {
    let (stop, stopped) = watch::channel(false);
    let (running, _datapath) = agent::start(config, &RunOptions::default(), stopped)
        .await
        .expect("agent starts");
    let FrontendMetrics::Http(metrics) = &running[0].metrics else {
        panic!("frontend is not an HTTP frontend");
    };
    Forwarder {
        addr: running[0].addr,
        metrics: metrics.clone(),
        _stop: stop,
    }
}

/// Reads until the forwarder closes (at most `limit`); the time it took.
async fn time_until_closed(tls: &mut TlsStream<TcpStream>, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(limit, tls.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "still open after {limit:?}");
    started.elapsed()
}

fn assert_between(waited: Duration, low_ms: u64, high_ms: u64) {
    assert!(
        waited >= Duration::from_millis(low_ms) && waited < Duration::from_millis(high_ms),
        "closed after {waited:?}, expected {low_ms}..{high_ms} ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_clients_are_closed_after_the_header_timeout() {
    let setup = Setup::new("http-limits-silent");
    let hub = setup.hub().await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |f, _| {
        f.header_read_timeout = Duration::from_millis(1_000);
    }))
    .await;
    let m = &forwarder.metrics;

    // ALPN h2, then nothing: no connection preface.
    let mut h2 = setup.tls(forwarder.addr, b"h2").await;
    assert_between(
        time_until_closed(&mut h2, Duration::from_secs(5)).await,
        800,
        4_000,
    );
    assert_eq!(get(&m.preface_timeout), 1);

    // The preface's first line but no SETTINGS frame: the preface is incomplete.
    let mut half = setup.tls(forwarder.addr, b"h2").await;
    half.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert_between(
        time_until_closed(&mut half, Duration::from_secs(5)).await,
        800,
        4_000,
    );
    assert_eq!(get(&m.preface_timeout), 2);

    // ALPN http/1.1, then nothing: no request line.
    let mut h1 = setup.tls(forwarder.addr, b"http/1.1").await;
    assert_between(
        time_until_closed(&mut h1, Duration::from_secs(5)).await,
        800,
        4_000,
    );
    assert_eq!(get(&m.header_timeout), 1);

    assert_eq!(get(&m.idle_timeout), 0);
    let deadline = Instant::now() + Duration::from_secs(2);
    while get(&m.active) != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&m.active), 0, "closed clients still hold their slot");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_and_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let setup = Setup::new("http-limits-idle");
    let hub = setup.hub().await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |f, _| {
        f.http_idle_timeout = Duration::from_millis(1_000);
    }))
    .await;
    let m = &forwarder.metrics;

    // Preface and SETTINGS (hyper's client sends both and answers PINGs), then no stream.
    let tls = setup.tls(forwarder.addr, b"h2").await;
    let started = Instant::now();
    let (_sender, connection) = hyper::client::conn::http2::handshake::<_, _, ClientBody>(
        TokioExecutor::new(),
        TokioIo::new(tls),
    )
    .await
    .expect("HTTP/2 handshake");
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "idle HTTP/2 connection still open after 5 s");
    assert_between(started.elapsed(), 900, 4_000);
    assert_eq!(get(&m.idle_timeout), 1);
    assert_eq!(get(&m.preface_timeout), 0);

    // A stream that stays open longer than the idle timeout is not cut; once it ends,
    // the idle timeout runs again.
    let tls = setup.tls(forwarder.addr, b"h2").await;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    let connection = tokio::spawn(connection);
    let (tx, body) = held_body();
    let request = Request::post(format!("https://{PROXY}/echo"))
        .body(body)
        .unwrap();
    let response = sender.send_request(request).await.expect("h2 response");
    assert_eq!(response.status(), StatusCode::OK);
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    drop(tx);
    let echoed = response.into_body().collect().await.expect("echo body");
    assert_eq!(echoed.to_bytes(), Bytes::from_static(b"firstsecond"));
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "HTTP/2 connection still open after 5 s idle");
    assert_between(started.elapsed(), 800, 4_000);
    assert_eq!(get(&m.idle_timeout), 2);

    // HTTP/1.1 keep-alive between requests: closed after the idle timeout too (the
    // header timeout, 10 s by default, is longer here).
    let mut tls = setup.tls(forwarder.addr, b"http/1.1").await;
    tls.write_all(format!("GET /slow HTTP/1.1\r\nHost: {PROXY}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await;
    assert!(
        read.is_ok(),
        "idle keep-alive connection still open after 5 s"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_between(
        started.elapsed(),
        SLOW_ANSWER.as_millis() as u64 + 900,
        4_500,
    );
    assert_eq!(get(&m.idle_timeout), 3);
    assert_eq!(get(&m.header_timeout), 0);
}

/// The agent's socket of a client, from /proc/net/tcp: (timer kind, seconds to expiry).
/// Timer kind 2 is the keepalive timer (0: none).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn server_socket_timer(server_port: u16, client_port: u16) -> Option<(u32, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("read /proc/net/tcp");
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let port = |field: &str| {
        field
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
    };
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if port(fields.get(1)?)? != server_port || port(fields.get(2)?)? != client_port {
            return None;
        }
        let (kind, when) = fields.get(5)?.split_once(':')?;
        let kind = u32::from_str_radix(kind, 16).ok()?;
        let when = u64::from_str_radix(when, 16).ok()? as f64 / ticks;
        Some((kind, when))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_sockets_get_tcp_keepalive() {
    let setup = Setup::new("http-limits-keepalive");
    let hub = setup.hub().await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |f, _| {
        f.tcp_keepalive_secs = 77;
    }))
    .await;
    let tls = setup.tls(forwarder.addr, b"http/1.1").await;
    let client_port = tls.get_ref().0.local_addr().unwrap().port();
    // Let the handshake's last bytes be acknowledged (a retransmit timer would show).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let timer = server_socket_timer(forwarder.addr.port(), client_port);
    let Some((kind, when)) = timer else {
        panic!("the agent's socket is not in /proc/net/tcp");
    };
    assert_eq!(kind, 2, "no keepalive timer on the agent's socket");
    assert!((60.0..=77.5).contains(&when), "keepalive fires in {when} s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_upstream_connections_caps_the_connections_to_the_hub() {
    let setup = Setup::new("http-limits-upstream-cap");
    let hub = setup.hub().await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, b| {
        b.max_upstream_connections = Some(1);
    }))
    .await;
    let m = &forwarder.metrics;

    // Several clients at once, each with a slow request: they take turns on one
    // upstream connection instead of opening one each.
    const CLIENTS: usize = 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = setup.h1(forwarder.addr).await;
        tasks.push(tokio::spawn(async move {
            let response = client.send_request(get_request("/slow")).await;
            response.expect("response").status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("client task"), StatusCode::OK);
    }
    assert_eq!(hub.seen().len(), CLIENTS);
    assert_eq!(
        hub.tls_connections(),
        1,
        "the hub saw more than one connection"
    );
    assert!(
        started.elapsed() >= SLOW_ANSWER * CLIENTS as u32,
        "the slow requests ran in parallel: {:?}",
        started.elapsed()
    );
    assert_eq!(get(&m.upstream_connections), 1);
    assert_eq!(get(&m.upstream_at_capacity), 0);

    // A request that finds the one connection busy for longer than the response timeout
    // is answered 503 (and counted); once the connection frees, requests flow again.
    let hub = setup.hub().await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, b| {
        b.max_upstream_connections = Some(1);
        b.response_timeout = Duration::from_millis(500);
    }))
    .await;
    let m = &forwarder.metrics;
    let mut holder = setup.h1(forwarder.addr).await;
    let (tx, body) = held_body();
    let request = Request::post("/echo")
        .header(HOST, PROXY)
        .body(body)
        .unwrap();
    let held = holder.send_request(request).await.expect("echo response");
    assert_eq!(held.status(), StatusCode::OK);

    let mut waiter = setup.h1(forwarder.addr).await;
    let started = Instant::now();
    let response = waiter.send_request(get_request("/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_between(started.elapsed(), 400, 3_000);
    assert_eq!(get(&m.upstream_at_capacity), 1);
    assert_eq!(get(&m.upstream_timeout), 0);

    drop(tx);
    held.into_body().collect().await.expect("echo body");
    let mut next = setup.h1(forwarder.addr).await;
    let response = next.send_request(get_request("/slow")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(hub.tls_connections(), 1);
}

#[test]
fn check_refuses_an_admin_address_on_a_frontends_port() {
    let dir = scratch_dir("http-limits-admin-check");
    let path = dir.join("forwarder.toml");
    let check = |admin: &str| {
        std::fs::write(
            &path,
            format!(
                "admin = \"{admin}\"\n\
                 [[frontend]]\nname = \"mqtt\"\nbind = \"0.0.0.0:8883\"\nbackend = \"hub\"\n\
                 [[backend]]\nname = \"hub\"\nservers = [{{ address = \"h.example:8883\" }}]\n"
            ),
        )
        .unwrap();
        let out = std::process::Command::new(forwarder_binary())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run forwarder check");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    for admin in ["0.0.0.0:8883", "127.0.0.1:8883", "[::]:8883"] {
        let (ok, text) = check(admin);
        assert!(
            !ok && text.contains("admin") && text.contains("\"mqtt\""),
            "{admin}: {text}"
        );
    }
    let (ok, text) = check("127.0.0.1:9100");
    assert!(ok, "{text}");
}
