//! The HTTPS side of `cargo xtask bench`: test certificates, a TLS upstream that plays the
//! hub, and a load client, as one small program the bench runs inside its namespaces.
//!
//! Usage:
//!   bench_http pki DIR
//!   bench_http upstream ADDR CERT KEY
//!   bench_http load get|post|ws ADDR SERVER_NAME CA_FILE CONNECTIONS SECONDS
//!
//! `load` prints one line: `count=N seconds=S p50_us=X p99_us=Y errors=E`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{CONNECTION, HOST, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use forwarder_tests::pki::TestCa;

/// A small telemetry-sized answer for GET.
const SMALL_BODY: &[u8] =
    br#"{"deviceId":"dev1","status":"enabled","connectionState":"Connected"}"#;
const POST_BYTES: usize = 1 << 20;
const WS_MESSAGE: usize = 64;
const WS_PATH: &str = "/$iothub/websocket";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("missing argument {i}; see the usage in the source"))
    };
    match arg(0)? {
        "pki" => pki(Path::new(arg(1)?)),
        "upstream" => upstream(arg(1)?.parse()?, Path::new(arg(2)?), Path::new(arg(3)?)).await,
        "load" => {
            let mode = Mode::parse(arg(1)?)?;
            let addr: SocketAddr = arg(2)?.parse()?;
            let name = arg(3)?.to_owned();
            let ca = PathBuf::from(arg(4)?);
            let connections: usize = arg(5)?.parse()?;
            let seconds: f64 = arg(6)?.parse()?;
            load(mode, addr, name, &ca, connections, seconds).await
        }
        other => bail!("unknown command {other:?}: pki, upstream or load"),
    }
}

/// One CA; `hub.test` for the upstream, `proxy.test` for the proxies (PEM files, plus
/// cert+key in one file for HAProxy).
fn pki(dir: &Path) -> anyhow::Result<()> {
    let ca = TestCa::new(dir);
    ca.issue("hub", &["hub.test"]);
    let proxy = ca.issue("proxy", &["proxy.test"]);
    let mut both = std::fs::read(&proxy.cert)?;
    both.extend(std::fs::read(&proxy.key)?);
    std::fs::write(dir.join("proxy-full.pem"), both)?;
    Ok(())
}

type Body = BoxBody<Bytes, hyper::Error>;

fn body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Serves GET (small answer), POST (body counted, never buffered whole) and WebSocket
/// echo on `WS_PATH`, over TLS with ALPN http/1.1.
async fn upstream(addr: SocketAddr, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let certs = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service =
                service_fn(|request| async { Ok::<_, Infallible>(handle(request).await) });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(mut request: Request<Incoming>) -> Response<Body> {
    if request.uri().path() == WS_PATH {
        return websocket(&mut request);
    }
    if request.method() == http::Method::POST {
        let mut body = request.into_body();
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len()),
                Err(_) => return status(StatusCode::BAD_REQUEST),
            }
        }
        return Response::new(body_of(format!("{{\"received\":{total}}}")));
    }
    Response::new(body(Bytes::from_static(SMALL_BODY)))
}

fn body_of(text: String) -> Body {
    body(Bytes::from(text))
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(body(Bytes::new()));
    *response.status_mut() = code;
    response
}

fn websocket(request: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = request.headers().get("sec-websocket-key").cloned() else {
        return status(StatusCode::BAD_REQUEST);
    };
    let protocol = request.headers().get("sec-websocket-protocol").cloned();
    let on_upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = ws.next().await {
            if message.is_close() || ws.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut response = status(StatusCode::SWITCHING_PROTOCOLS);
    let h = response.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
        h.insert("sec-websocket-accept", accept);
    }
    if let Some(protocol) = protocol {
        h.insert("sec-websocket-protocol", protocol);
    }
    response
}

#[derive(Clone, Copy)]
enum Mode {
    Get,
    Post,
    Ws,
}

impl Mode {
    fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "get" => Self::Get,
            "post" => Self::Post,
            "ws" => Self::Ws,
            _ => bail!("mode {s:?}: get, post or ws"),
        })
    }
}

fn client_config(ca: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut config = forwarder_tests::pki::client_config_trusting(ca)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
) -> anyhow::Result<Tls> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    Ok(connector
        .connect(ServerName::try_from(name.to_owned())?, tcp)
        .await?)
}

/// `connections` keep-alive clients, each sending requests (or WebSocket messages) one
/// after the other until the time is up; latencies of every request.
async fn load(
    mode: Mode,
    addr: SocketAddr,
    name: String,
    ca: &Path,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<()> {
    let config = client_config(ca)?;
    let post_body = Bytes::from(vec![b'x'; POST_BYTES]);
    let duration = Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    // Every connection is set up before the clock starts.
    for _ in 0..connections {
        clients.push(Client::open(mode, addr, &name, &config).await?);
    }
    let started = Instant::now();
    let deadline = started + duration;
    for mut client in clients {
        let (name, post_body) = (name.clone(), post_body.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match client.once(&name, &post_body).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await?;
        all.extend(latencies);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pick = |q: f64| {
        all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    println!(
        "count={} seconds={elapsed:.3} p50_us={:.1} p99_us={:.1} errors={errors}",
        all.len(),
        pick(0.5),
        pick(0.99)
    );
    Ok(())
}

enum Client {
    Http(hyper::client::conn::http1::SendRequest<Full<Bytes>>, Mode),
    Ws(Box<WebSocketStream<Tls>>),
}

impl Client {
    async fn open(
        mode: Mode,
        addr: SocketAddr,
        name: &str,
        config: &Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let tls = connect(addr, name, config).await?;
        if let Mode::Ws = mode {
            let mut request = format!("wss://{name}{WS_PATH}").into_client_request()?;
            request
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
            let (ws, response) = tokio_tungstenite::client_async(request, tls).await?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                bail!("WebSocket upgrade answered {}", response.status());
            }
            return Ok(Self::Ws(Box::new(ws)));
        }
        let (sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)).await?;
        tokio::spawn(connection);
        Ok(Self::Http(sender, mode))
    }

    async fn once(&mut self, name: &str, post_body: &Bytes) -> anyhow::Result<()> {
        match self {
            Self::Http(sender, mode) => {
                let request = match mode {
                    Mode::Post => Request::post("/devices/dev1/messages/events")
                        .header(HOST, name)
                        .body(Full::new(post_body.clone()))?,
                    _ => Request::get("/devices/dev1")
                        .header(HOST, name)
                        .body(Full::new(Bytes::new()))?,
                };
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                if !response.status().is_success() {
                    bail!("status {}", response.status());
                }
                response.into_body().collect().await?;
                Ok(())
            }
            Self::Ws(ws) => {
                ws.send(Message::Binary(Bytes::from_static(&[7u8; WS_MESSAGE])))
                    .await?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(data))) if data.len() == WS_MESSAGE => {
                            return Ok(());
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(other)) => bail!("unexpected message {other:?}"),
                        Some(Err(err)) => return Err(err.into()),
                        None => bail!("WebSocket closed"),
                    }
                }
            }
        }
    }
}
