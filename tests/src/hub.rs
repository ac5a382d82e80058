//! A stand-in for Azure IoT Hub's HTTPS front door, strict the way the real one is:
//! a request whose TLS SNI or `Host` is not the hub's name gets `401 IoTHubNotFound`.
//! It serves REST telemetry, echoes bodies (to prove streaming), and accepts MQTT over
//! WebSocket at `/$iothub/websocket` by bridging frames to a real mosquitto.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// Subprotocols IoT Hub accepts on its WebSocket endpoint (the C SDK spells MQTT upper-case).
const SUBPROTOCOLS: [&str; 3] = ["mqtt", "MQTT", "AMQPWSB10"];

/// How long `GET /slow` takes to answer.
pub const SLOW_ANSWER: Duration = Duration::from_millis(300);

/// What the hub saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub sni: Option<String>,
    pub method: String,
    pub path_and_query: String,
    pub headers: HeaderMap,
}

pub struct TestHub {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls_connections: Arc<AtomicU64>,
}

struct HubState {
    name: String,
    mqtt_broker: Option<SocketAddr>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

type HubBody = BoxBody<Bytes, hyper::Error>;

impl TestHub {
    /// Starts the hub on an ephemeral loopback port, presenting `cert`/`key`.
    pub async fn start(
        name: &str,
        cert: &Path,
        key: &Path,
        mqtt_broker: Option<SocketAddr>,
    ) -> Self {
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("hub certificate file")
            .collect::<Result<Vec<_>, _>>()
            .expect("hub certificate PEM");
        let key = PrivateKeyDer::from_pem_file(key).expect("hub key PEM");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("hub certificate and key");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind hub");
        let addr = listener.local_addr().expect("hub address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tls_connections = Arc::new(AtomicU64::new(0));
        let state = Arc::new(HubState {
            name: name.to_owned(),
            mqtt_broker,
            seen: seen.clone(),
        });
        let connections = tls_connections.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, state) = (acceptor.clone(), state.clone());
                connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                    let service = service_fn(move |request| {
                        let (state, sni) = (state.clone(), sni.clone());
                        async move { Ok::<_, Infallible>(state.handle(request, sni).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            addr,
            name: name.to_owned(),
            seen,
            tls_connections,
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// TLS connections the hub accepted (shows upstream keep-alive pooling).
    pub fn tls_connections(&self) -> u64 {
        self.tls_connections.load(Ordering::Relaxed)
    }
}

fn body(bytes: impl Into<Bytes>) -> HubBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

fn respond(status: StatusCode, text: &str) -> Response<HubBody> {
    let mut response = Response::new(body(text.to_owned()));
    *response.status_mut() = status;
    response
}

impl HubState {
    async fn handle(
        &self,
        mut request: Request<Incoming>,
        sni: Option<String>,
    ) -> Response<HubBody> {
        let path_and_query = request
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(Seen {
                sni: sni.clone(),
                method: request.method().to_string(),
                path_and_query: path_and_query.clone(),
                headers: request.headers().clone(),
            });
        }
        let host = request
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| h.rsplit_once(':').map_or(h, |(name, _)| name).to_owned());
        if sni.as_deref() != Some(self.name.as_str()) || host.as_deref() != Some(self.name.as_str())
        {
            // What the real hub answers when the name it is addressed by is not its own.
            return respond(
                StatusCode::UNAUTHORIZED,
                r#"{"Message":"ErrorCode:IoTHubNotFound;IotHub not found","ExceptionMessage":"Tracking ID:0-TimeStamp:0"}"#,
            );
        }
        let path = request.uri().path().to_owned();
        match (request.method().as_str(), path.as_str()) {
            ("POST", p) if p.starts_with("/devices/") && p.ends_with("/messages/events") => {
                match request.into_body().collect().await {
                    Ok(_) => respond(StatusCode::NO_CONTENT, ""),
                    Err(_) => respond(StatusCode::BAD_REQUEST, "body"),
                }
            }
            // Streams the body back as it arrives (no buffering), to prove the forwarder
            // streams both ways.
            ("POST", "/echo") => Response::new(request.into_body().boxed()),
            // Never answers within any sane timeout (for 504 tests); ends by itself.
            ("GET", "/hang") => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                respond(StatusCode::OK, "late")
            }
            // A slow answer (for tests that hold an upstream connection a while).
            ("GET", "/slow") => {
                tokio::time::sleep(SLOW_ANSWER).await;
                respond(StatusCode::OK, "slow")
            }
            ("GET", "/$iothub/websocket") => self.websocket(&mut request),
            _ => respond(StatusCode::NOT_FOUND, "no such route"),
        }
    }

    /// RFC 6455 handshake by hand (so every header the client sent can be checked),
    /// then MQTT frames bridged to mosquitto, or echoed for other subprotocols.
    fn websocket(&self, request: &mut Request<Incoming>) -> Response<HubBody> {
        let headers = request.headers();
        let upgrade_ok = headers
            .get(UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
        let Some(key) = headers
            .get("sec-websocket-key")
            .map(|k| k.as_bytes().to_vec())
        else {
            return respond(StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key");
        };
        let protocol = headers
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .find(|p| SUBPROTOCOLS.contains(p))
            .map(str::to_owned);
        let (true, Some(protocol)) = (upgrade_ok, protocol) else {
            return respond(StatusCode::BAD_REQUEST, "not an IoT Hub WebSocket request");
        };
        let on_upgrade = hyper::upgrade::on(request);
        let broker = self
            .mqtt_broker
            .filter(|_| protocol.eq_ignore_ascii_case("mqtt"));
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            match broker {
                Some(broker) => bridge_to_broker(ws, broker).await,
                None => echo(ws).await,
            }
        });
        let mut response = Response::new(body(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(UPGRADE, HeaderValue::from_static("websocket"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(&key)) {
            h.insert("sec-websocket-accept", accept);
        }
        if let Ok(protocol) = HeaderValue::from_str(&protocol) {
            h.insert("sec-websocket-protocol", protocol);
        }
        response
    }
}

type ServerWs = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

async fn echo(mut ws: ServerWs) {
    while let Some(Ok(message)) = ws.next().await {
        if message.is_close() || ws.send(message).await.is_err() {
            break;
        }
    }
}

/// Binary WebSocket messages <-> the broker's TCP byte stream.
async fn bridge_to_broker(ws: ServerWs, broker: SocketAddr) {
    let Ok(tcp) = TcpStream::connect(broker).await else {
        return;
    };
    let (mut tcp_read, mut tcp_write) = tcp.into_split();
    let (mut ws_write, mut ws_read) = ws.split();
    let to_broker = async {
        while let Some(Ok(message)) = ws_read.next().await {
            match message {
                Message::Binary(data) if tcp_write.write_all(&data).await.is_err() => break,
                Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = tcp_write.shutdown().await;
    };
    let to_client = async {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match tcp_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if ws_write.send(frame).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = ws_write.close().await;
    };
    tokio::join!(to_broker, to_client);
}
