//! The terminated HTTPS path (443) against a strict stand-in hub: Host and SNI fixed,
//! REST telemetry, streamed bodies, MQTT over WebSocket with a real client library and
//! a real broker, WebSocket handshakes passed intact, and every error path counted.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::agent::{self, FrontendMetrics, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::{HttpMetrics, get};
use forwarder_tests::hub::TestHub;
use forwarder_tests::peers::{self, free_port, scratch_dir, wait_for_port};
use forwarder_tests::pki::{Leaf, TestCa};
use forwarder_tests::{init_logging, random_payload, sha256};
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::HOST;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const HUB: &str = "hub.test";
const PROXY: &str = "proxy.test";
const TELEMETRY: &str = "/devices/dev1/messages/events?api-version=2021-04-12";

type ClientBody = BoxBody<Bytes, io::Error>;

fn full(bytes: impl Into<Bytes>) -> ClientBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A CA, the hub's certificate (it also answers as the proxy's name, like a wildcard
/// would, so the TCP-mode mistake gets as far as the 401), and the forwarder's.
struct Setup {
    dir: std::path::PathBuf,
    ca: TestCa,
    hub_leaf: Leaf,
    proxy_leaf: Leaf,
}

impl Setup {
    fn new(test: &str) -> Self {
        init_logging();
        let dir = scratch_dir(test);
        let ca = TestCa::new(&dir);
        let hub_leaf = ca.issue("hub", &[HUB, PROXY]);
        let proxy_leaf = ca.issue("proxy", &[PROXY, "127.0.0.1"]);
        Self {
            dir,
            ca,
            hub_leaf,
            proxy_leaf,
        }
    }

    async fn hub(&self, broker: Option<SocketAddr>) -> TestHub {
        TestHub::start(HUB, &self.hub_leaf.cert, &self.hub_leaf.key, broker).await
    }

    /// An agent with one terminating frontend in front of `upstream`, as a config file
    /// would describe it; `tweak` adjusts timeouts and limits.
    fn config(
        &self,
        upstream: SocketAddr,
        tweak: impl FnOnce(&mut Frontend, &mut Backend),
    ) -> Config {
        let mut frontend =
            Frontend::new("https", "127.0.0.1:0".parse().unwrap(), Mode::Http, "hub");
        frontend.tls_cert = Some(self.proxy_leaf.cert.clone());
        frontend.tls_key = Some(self.proxy_leaf.key.clone());
        let mut backend = Backend::new("hub", &upstream.to_string());
        backend.host = Some(HUB.into());
        backend.ca_file = Some(self.ca.ca_pem.clone());
        tweak(&mut frontend, &mut backend);
        let config = Config::new(
            format!("https-{}", forwarder_tests::netns::unique()),
            vec![frontend],
            vec![backend],
        );
        config.validate().expect("test config is valid");
        config
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

async fn tls_connect(
    addr: SocketAddr,
    ca: &TestCa,
    server_name: &str,
    alpn: &[&[u8]],
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(alpn));
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// An HTTP/1.1 client connection (keep-alive) to `addr`, verifying `server_name`.
async fn h1_client(
    addr: SocketAddr,
    ca: &TestCa,
    server_name: &str,
) -> hyper::client::conn::http1::SendRequest<ClientBody> {
    let tls = tls_connect(addr, ca, server_name, &[b"http/1.1"]).await;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

fn telemetry(host: &str, payload: &'static str) -> Request<ClientBody> {
    Request::post(TELEMETRY)
        .header(HOST, host)
        .header(
            "authorization",
            "SharedAccessSignature sr=hub.test%2Fdevices%2Fdev1&sig=x&se=1",
        )
        .header("content-type", "application/json")
        .body(full(payload))
        .expect("request")
}

/// An MQTT-over-WebSocket session through the forwarder at `addr` (as the proxy's name),
/// and the client's local address.
async fn mqtt_websocket(
    addr: SocketAddr,
    ca: &TestCa,
) -> (
    tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>,
    SocketAddr,
) {
    let tls = tls_connect(addr, ca, PROXY, &[b"http/1.1"]).await;
    let local = tls.get_ref().0.local_addr().expect("local address");
    let mut request = format!("wss://{PROXY}/$iothub/websocket")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .expect("WebSocket handshake through the forwarder");
    (ws, local)
}

async fn body_text(response: Response<Incoming>) -> String {
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("response body")
        .to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_mode_proxy_gets_iothubnotfound_and_the_forwarder_fixes_it() {
    let setup = Setup::new("https-notfound");
    let hub = setup.hub(None).await;

    // The seed's mistake: HAProxy in TCP mode in front of the hub. The device addresses
    // the proxy, so SNI and Host carry the proxy's name and the hub refuses.
    let haproxy_port = free_port();
    let conf = setup.dir.join("haproxy.cfg");
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  timeout server 10s\n\
             frontend iothub\n  bind 127.0.0.1:{haproxy_port}\n  default_backend hub\n\
             backend hub\n  server hub {}\n",
            hub.addr
        ),
    )
    .unwrap();
    let _haproxy = peers::spawn(
        "haproxy",
        &["-db".as_ref(), "-f".as_ref(), conf.as_os_str()],
    );
    wait_for_port(haproxy_port, "haproxy");
    let haproxy_addr: SocketAddr = ([127, 0, 0, 1], haproxy_port).into();
    let mut via_haproxy = h1_client(haproxy_addr, &setup.ca, PROXY).await;
    let response = via_haproxy
        .send_request(telemetry(PROXY, r#"{"t":21.5}"#))
        .await
        .expect("response through haproxy");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let text = body_text(response).await;
    assert!(text.contains("IoTHubNotFound"), "hub said: {text}");

    // The same device request through the forwarder's HTTP path succeeds.
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;
    let mut via_forwarder = h1_client(forwarder.addr, &setup.ca, PROXY).await;
    let response = via_forwarder
        .send_request(telemetry(PROXY, r#"{"t":21.5}"#))
        .await
        .expect("response through the forwarder");
    assert_eq!(
        response.status(),
        StatusCode::NO_CONTENT,
        "{}",
        body_text(response).await
    );

    let seen = hub.seen();
    let last = seen.last().expect("the hub saw the request");
    assert_eq!(last.sni.as_deref(), Some(HUB));
    assert_eq!(last.headers["host"], HUB);
    assert_eq!(last.headers["x-forwarded-host"], PROXY);
    assert_eq!(last.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(last.headers["x-forwarded-proto"], "https");
    assert_eq!(last.path_and_query, TELEMETRY);
    assert!(last.headers.contains_key("authorization"));
    assert_eq!(get(&forwarder.metrics.responses_relayed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_telemetry_flows_over_pooled_upstream_connections() {
    let setup = Setup::new("https-telemetry");
    let hub = setup.hub(None).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;
    const CLIENTS: usize = 4;
    const PER_CLIENT: usize = 50;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut client = h1_client(forwarder.addr, &setup.ca, PROXY).await;
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_CLIENT {
                let response = client
                    .send_request(telemetry(PROXY, r#"{"temperature":20}"#))
                    .await
                    .expect("telemetry response");
                assert_eq!(response.status(), StatusCode::NO_CONTENT);
                response.into_body().collect().await.expect("empty body");
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    assert_eq!(hub.seen().len(), CLIENTS * PER_CLIENT);
    // Keep-alive upstream: connections are reused. (A few more than the clients can open
    // when a response is still being returned to the pool as the next request starts.)
    assert!(
        hub.tls_connections() <= (CLIENTS * PER_CLIENT / 10) as u64,
        "{} upstream connections for {} requests",
        hub.tls_connections(),
        CLIENTS * PER_CLIENT
    );
    assert_eq!(
        get(&forwarder.metrics.requests),
        (CLIENTS * PER_CLIENT) as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_several_mib_stream_both_ways_unchanged() {
    let setup = Setup::new("https-stream");
    let hub = setup.hub(None).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;
    let payload = Bytes::from(random_payload(8 << 20));
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, io::Error>(Frame::data(chunk)), rx))
    });
    let request = Request::post("/echo")
        .header(HOST, PROXY)
        .body(BoxBody::new(StreamBody::new(stream)))
        .unwrap();
    let mut client = h1_client(forwarder.addr, &setup.ca, PROXY).await;
    let response_future = tokio::spawn(async move { client.send_request(request).await });

    // Half the body goes out; the echo of it must come back before the rest is sent,
    // which only happens if nothing on the way buffers whole bodies.
    let half = payload.len() / 2;
    for chunk in payload[..half].chunks(64 << 10) {
        tx.send(Bytes::copy_from_slice(chunk))
            .await
            .expect("send chunk");
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response_future)
        .await
        .expect("response headers while the request body is still open")
        .expect("task")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut echoed = Vec::with_capacity(payload.len());
    while echoed.len() < half / 2 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("echo of the first half arrives before the second half is sent")
            .expect("body not finished")
            .expect("body frame");
        if let Ok(data) = frame.into_data() {
            echoed.extend_from_slice(&data);
        }
    }
    let sender = tokio::spawn({
        let rest = payload.slice(half..);
        async move {
            for chunk in rest.chunks(64 << 10) {
                tx.send(Bytes::copy_from_slice(chunk))
                    .await
                    .expect("send chunk");
            }
        }
    });
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("echo keeps flowing")
    {
        if let Ok(data) = frame.expect("body frame").into_data() {
            echoed.extend_from_slice(&data);
        }
    }
    sender.await.expect("sender");
    assert_eq!(echoed.len(), payload.len());
    assert_eq!(sha256(&echoed), sha256(&payload));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket_through_the_forwarder_with_a_real_client() {
    let setup = Setup::new("https-mqtt-ws");
    let broker_port = free_port();
    let _broker = peers::mosquitto(
        &setup.dir,
        &format!("listener {broker_port} 127.0.0.1"),
        broker_port,
    );
    let hub = setup.hub(Some(([127, 0, 0, 1], broker_port).into())).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;

    let url = format!(
        "wss://127.0.0.1:{}/$iothub/websocket",
        forwarder.addr.port()
    );
    let options = |id: &str| {
        let mut options = rumqttc::MqttOptions::new(id, url.clone(), forwarder.addr.port());
        options.set_transport(rumqttc::Transport::wss_with_config(
            rumqttc::TlsConfiguration::Rustls(setup.ca.client_config(&[b"http/1.1"])),
        ));
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    const MESSAGES: usize = 1_000;
    let topic = "devices/dev1/messages/events/";

    let (subscriber, mut sub_loop) = rumqttc::AsyncClient::new(options("sub"), 64);
    subscriber
        .subscribe(topic, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (received_tx, mut received) = mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    let sub_task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match sub_loop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed_tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if received_tx.send(p.payload).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(err) => panic!("subscriber connection failed: {err}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK through the forwarder")
        .expect("subscriber alive");

    let (publisher, mut pub_loop) = rumqttc::AsyncClient::new(options("pub"), 64);
    let pub_task = tokio::spawn(async move {
        loop {
            if let Err(err) = pub_loop.poll().await {
                return err.to_string();
            }
        }
    });
    for i in 0..MESSAGES {
        publisher
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, format!("msg-{i}"))
            .await
            .expect("publish");
    }
    for i in 0..MESSAGES {
        let payload = tokio::time::timeout(Duration::from_secs(20), received.recv())
            .await
            .unwrap_or_else(|_| panic!("message {i} of {MESSAGES} did not arrive"))
            .expect("subscriber alive");
        assert_eq!(
            payload.as_ref(),
            format!("msg-{i}").as_bytes(),
            "order kept"
        );
    }
    sub_task.abort();
    pub_task.abort();

    let websocket_requests: Vec<_> = hub
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query == "/$iothub/websocket")
        .collect();
    assert_eq!(websocket_requests.len(), 2, "one upgrade per client");
    for seen in websocket_requests {
        assert_eq!(seen.sni.as_deref(), Some(HUB));
        assert_eq!(seen.headers["host"], HUB);
        assert_eq!(seen.headers["sec-websocket-protocol"], "mqtt");
        assert_eq!(seen.headers["upgrade"], "websocket");
    }
    assert_eq!(get(&forwarder.metrics.websocket_upgrades), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_handshakes_pass_intact_for_every_iot_hub_subprotocol() {
    let setup = Setup::new("https-ws-intact");
    let hub = setup.hub(None).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;
    let path = "/$iothub/websocket?iothub-no-client-cert=true";
    for protocol in ["MQTT", "AMQPWSB10", "mqtt"] {
        let tls = tls_connect(forwarder.addr, &setup.ca, PROXY, &[b"http/1.1"]).await;
        let mut request = format!("wss://{PROXY}{path}")
            .into_client_request()
            .unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
        let sent_key = request.headers()["sec-websocket-key"].clone();
        let (mut ws, response) = tokio_tungstenite::client_async(request, tls)
            .await
            .unwrap_or_else(|e| {
                panic!("{protocol}: WebSocket handshake through the forwarder: {e}")
            });
        assert_eq!(response.headers()["sec-websocket-protocol"], protocol);

        let seen = hub.seen().pop().expect("hub saw the upgrade");
        assert_eq!(seen.path_and_query, path, "path and query untouched");
        assert_eq!(seen.headers["sec-websocket-key"], sent_key);
        assert_eq!(seen.headers["sec-websocket-version"], "13");
        assert_eq!(seen.headers["sec-websocket-protocol"], protocol);
        assert_eq!(seen.headers["host"], HUB);

        // A large binary message and a small text one come back unchanged (hub echo).
        let big = Bytes::from(random_payload(256 << 10));
        ws.send(Message::Binary(big.clone())).await.expect("send");
        ws.send(Message::Text("ping".into())).await.expect("send");
        let echoed = ws.next().await.expect("echo").expect("frame");
        assert_eq!(echoed, Message::Binary(big));
        let echoed = ws.next().await.expect("echo").expect("frame");
        assert_eq!(echoed, Message::Text("ping".into()));
        ws.close(None).await.expect("close");
    }
    assert_eq!(get(&forwarder.metrics.websocket_upgrades), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_failures_become_502_or_504_and_others_keep_being_served() {
    let setup = Setup::new("https-upstream-errors");
    let hub = setup.hub(None).await;
    let get_request = |path: &str| {
        Request::get(path)
            .header(HOST, PROXY)
            .body(full(Bytes::new()))
            .unwrap()
    };

    // Nothing listens: 502.
    let closed: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let refused = start_forwarder(&setup.config(closed, |_, _| {})).await;
    let mut client = h1_client(refused.addr, &setup.ca, PROXY).await;
    let response = client.send_request(get_request("/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(get(&refused.metrics.upstream_unreachable), 1);

    // The hub's certificate does not match the configured name: verification is real.
    let wrong_name = start_forwarder(&setup.config(hub.addr, |_, b| {
        b.tls_server_name = Some("other.test".into());
    }))
    .await;
    let mut client = h1_client(wrong_name.addr, &setup.ca, PROXY).await;
    let response = client.send_request(telemetry(PROXY, "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(get(&wrong_name.metrics.upstream_unreachable), 1);

    // A server that accepts TCP but never speaks TLS: 504 after the connect timeout.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let mute = start_forwarder(&setup.config(silent_addr, |_, b| {
        b.connect_timeout = Duration::from_millis(300)
    }))
    .await;
    let mut client = h1_client(mute.addr, &setup.ca, PROXY).await;
    let started = Instant::now();
    let response = client.send_request(get_request("/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(get(&mute.metrics.upstream_timeout), 1);

    // The hub answers too slowly: 504 after the response timeout; then the same
    // forwarder still serves the next request.
    let slow = start_forwarder(&setup.config(hub.addr, |_, b| {
        b.response_timeout = Duration::from_millis(300)
    }))
    .await;
    let mut client = h1_client(slow.addr, &setup.ca, PROXY).await;
    let response = client.send_request(get_request("/hang")).await.unwrap();
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(get(&slow.metrics.upstream_timeout), 1);
    let mut client = h1_client(slow.addr, &setup.ca, PROXY).await;
    let response = client.send_request(telemetry(PROXY, "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

/// Sends raw bytes over TLS and returns what comes back until the forwarder closes.
async fn raw_exchange(addr: SocketAddr, ca: &TestCa, bytes: &[u8]) -> String {
    let mut tls = tls_connect(addr, ca, PROXY, &[b"http/1.1"]).await;
    // The forwarder may answer and close before it has read everything: not an error.
    let _ = tls.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_slow_clients_are_refused_while_others_are_served() {
    let setup = Setup::new("https-bad-clients");
    let hub = setup.hub(None).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |f, _| {
        f.header_read_timeout = Duration::from_millis(1_000);
        f.max_header_bytes = 16 << 10;
    }))
    .await;
    let m = &forwarder.metrics;

    let answer = raw_exchange(forwarder.addr, &setup.ca, b"GARBAGE\x01 / NOPE\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(get(&m.bad_request), 1);

    let huge = format!(
        "GET / HTTP/1.1\r\nHost: {PROXY}\r\nX-Big: {}\r\n\r\n",
        // Just over the limit, so the whole request is read (a close with unread bytes
        // would be a reset that can destroy the 431 before the client reads it).
        "a".repeat(20 << 10)
    );
    let answer = raw_exchange(forwarder.addr, &setup.ca, huge.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert_eq!(get(&m.headers_too_large), 1);

    // Plain HTTP on the TLS port: the handshake fails and is counted.
    let mut plain = TcpStream::connect(forwarder.addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut sink)).await;
    assert_eq!(get(&m.tls_handshake_failed), 1);

    // A slow client stalls mid-headers; it is cut after the header timeout while a
    // well-behaved client is served meanwhile.
    let mut slow = tls_connect(forwarder.addr, &setup.ca, PROXY, &[b"http/1.1"]).await;
    slow.write_all(format!("POST {TELEMETRY} HTTP/1.1\r\nHost: {PROXY}\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut good = h1_client(forwarder.addr, &setup.ca, PROXY).await;
    let response = good.send_request(telemetry(PROXY, "{}")).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the slow client was not cut off");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(4),
        "cut after {waited:?}"
    );
    assert_eq!(get(&m.header_timeout), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_queues_new_clients_until_a_slot_frees() {
    let setup = Setup::new("https-cap");
    let hub = setup.hub(None).await;
    let forwarder =
        start_forwarder(&setup.config(hub.addr, |f, _| f.max_connections = Some(2))).await;
    let first = h1_client(forwarder.addr, &setup.ca, PROXY).await;
    let _second = h1_client(forwarder.addr, &setup.ca, PROXY).await;

    // The third client's TCP connect succeeds (kernel backlog) but it is not served yet.
    let ca_config = setup.ca.client_config(&[b"http/1.1"]);
    let addr = forwarder.addr;
    let third = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let connector = tokio_rustls::TlsConnector::from(ca_config);
        let tls = connector
            .connect(ServerName::try_from(PROXY).unwrap(), tcp)
            .await
            .expect("TLS handshake once a slot is free");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        sender
            .send_request(telemetry(PROXY, "{}"))
            .await
            .expect("response")
            .status()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "a third client was served above the cap"
    );
    assert!(get(&forwarder.metrics.at_capacity) >= 1);
    drop(first);
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("the queued client is served once a slot frees")
        .expect("task");
    assert_eq!(status, StatusCode::NO_CONTENT);
}

/// hyper ends a connection's future at the upgrade; the WebSocket session must still
/// hold its client's slot, or a flood of idle upgrades escapes `max_connections`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_websocket_keeps_its_slot_under_the_cap() {
    let setup = Setup::new("https-ws-cap");
    let hub = setup.hub(None).await;
    let forwarder =
        start_forwarder(&setup.config(hub.addr, |f, _| f.max_connections = Some(1))).await;
    let (mut ws, _) = mqtt_websocket(forwarder.addr, &setup.ca).await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hello".into())
    );
    assert_eq!(get(&forwarder.metrics.websockets_active), 1);

    let (addr, ca) = (forwarder.addr, setup.ca.client_config(&[b"http/1.1"]));
    let second = tokio::spawn(async move {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        tokio_rustls::TlsConnector::from(ca)
            .connect(ServerName::try_from(PROXY).unwrap(), tcp)
            .await
            .is_ok()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a second client was served while the WebSocket held the only slot"
    );
    assert!(get(&forwarder.metrics.at_capacity) >= 1);
    drop(ws);
    let served = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the queued client is served once the WebSocket ends")
        .expect("task");
    assert!(served, "TLS handshake of the queued client failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upgraded_sessions_are_closed_and_counted() {
    let setup = Setup::new("https-ws-idle");
    let hub = setup.hub(None).await;
    let forwarder =
        start_forwarder(&setup.config(hub.addr, |f, _| f.idle_timeout = Duration::from_secs(1)))
            .await;
    let (mut ws, _) = mqtt_websocket(forwarder.addr, &setup.ca).await;
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::Text("hello".into())
    );
    let started = Instant::now();
    // Silence: the session must end by itself shortly after the 1 s idle timeout.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    assert!(end.is_ok(), "idle session still open after 5 s");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(get(&forwarder.metrics.websocket_idle_timeouts), 1);
    assert_eq!(get(&forwarder.metrics.websockets_active), 0);
    // Both sides' sockets were reached under hyper's upgrade (resets pass on as resets).
    assert_eq!(get(&forwarder.metrics.websocket_sockets_unreached), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_get_their_authority_rewritten_to_the_hub() {
    let setup = Setup::new("https-h2");
    let hub = setup.hub(None).await;
    let forwarder = start_forwarder(&setup.config(hub.addr, |_, _| {})).await;
    let tls = tls_connect(forwarder.addr, &setup.ca, PROXY, &[b"h2"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    for _ in 0..3 {
        let request = Request::post(format!("https://{PROXY}{TELEMETRY}"))
            .body(full(r#"{"t":1}"#))
            .unwrap();
        let response = sender.send_request(request).await.expect("h2 response");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let seen = hub.seen();
    assert_eq!(seen.len(), 3);
    assert!(
        seen.iter()
            .all(|s| s.headers["host"] == HUB && s.sni.as_deref() == Some(HUB))
    );
    assert!(seen.iter().all(|s| s.headers["x-forwarded-host"] == PROXY));
}

/// `forwarder conns` lists terminated connections too: a keep-alive HTTPS client as
/// `https` (no one upstream: its requests use pooled connections), and a WebSocket as
/// `websocket` with the hub as its upstream; bytes counted on the client's connection;
/// both gone once closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_websocket_connections_are_listed_by_conns() {
    let setup = Setup::new("https-conns");
    let hub = setup.hub(None).await;
    let mut config = setup.config(hub.addr, |_, _| {});
    config.instance = format!("https-conns-{}", std::process::id());
    let forwarder = start_forwarder(&config).await;
    let pinned = forwarder::inspect::Pinned::open(&config.instance).expect("maps pinned");
    let rows = |path: &str| -> Vec<forwarder::inspect::ConnRow> {
        forwarder::inspect::conns(&pinned)
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    };

    let mut rest = h1_client(forwarder.addr, &setup.ca, PROXY).await;
    let response = rest
        .send_request(telemetry(PROXY, r#"{"temperature":21}"#))
        .await
        .expect("telemetry response");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (mut ws, ws_local) = mqtt_websocket(forwarder.addr, &setup.ca).await;
    ws.send(Message::Binary(Bytes::from(random_payload(64 << 10))))
        .await
        .expect("send");
    ws.next().await.expect("echo").expect("frame");

    // The listing is published once a second.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (https, tunnels) = loop {
        let (https, tunnels) = (rows("https"), rows("websocket"));
        let counted = |r: &[forwarder::inspect::ConnRow]| {
            r.len() == 1 && r[0].bytes_up > 0 && r[0].bytes_down > 0
        };
        if counted(&https) && counted(&tunnels) || Instant::now() > deadline {
            break (https, tunnels);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(https.len(), 1, "one HTTPS client: {https:?}");
    assert_eq!(https[0].upstream, "-", "pooled requests: no one upstream");
    assert!(
        https[0].bytes_up > 0 && https[0].bytes_down > 0,
        "{https:?}"
    );
    assert_eq!(tunnels.len(), 1, "one tunnel: {tunnels:?}");
    assert_eq!(tunnels[0].client, ws_local.to_string());
    assert_eq!(
        tunnels[0].upstream,
        hub.addr.to_string(),
        "the hub it joined"
    );
    assert_eq!(tunnels[0].frontend, "https");
    // TLS records around the 64 KiB message went both ways.
    assert!(
        tunnels[0].bytes_up > 64 << 10 && tunnels[0].bytes_down > 64 << 10,
        "{tunnels:?}"
    );

    ws.close(None).await.expect("close");
    drop(ws);
    drop(rest);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !forwarder::inspect::conns(&pinned).is_empty() {
        assert!(Instant::now() < deadline, "closed connections stay listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
