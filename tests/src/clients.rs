//! Clients, hostile and legitimate, shared by `tests/tests/hostile.rs` and the soak's
//! load generator (`tests/src/bin/soak`): connections from a chosen loopback source,
//! partial ClientHellos, idle WebSockets, REST posts through 443 and `/metrics` scrapes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use http::StatusCode;
use http::header::HOST;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

/// A client WebSocket over TLS, as a device holds it.
pub type DeviceWebSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Loopback address number `i` of group `group` (127.group.x.y): a source of its own.
pub fn source(group: u8, i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        group,
        (i / 250) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// A TCP connection from `source` to `127.0.0.1:port`.
pub async fn connect_from(source: IpAddr, port: u16) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .ok()
}

/// A TLS record header that announces a 16 KiB ClientHello, and 100 bytes of it.
pub async fn partial_hello(source: IpAddr, port: u16) -> Option<TcpStream> {
    let mut stream = connect_from(source, port).await?;
    let mut bytes = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0x3f, 0xfc];
    bytes.resize(105, 0x03);
    stream.write_all(&bytes).await.ok()?;
    Some(stream)
}

/// TLS to `127.0.0.1:port` with SNI `name` (a silent HTTP/2 client when `tls` offers `h2`
/// and nothing more is sent).
pub async fn tls_connect(
    port: u16,
    name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .context("connect")?;
    let name = ServerName::try_from(name.to_owned()).context("server name")?;
    tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .context("TLS handshake")
}

/// A WebSocket (subprotocol `mqtt`) at `/$iothub/websocket` through `127.0.0.1:port`,
/// `tls` offering `http/1.1`.
pub async fn websocket(
    port: u16,
    name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<DeviceWebSocket> {
    let tls = tls_connect(port, name, tls).await?;
    let mut request = format!("wss://{name}/$iothub/websocket").into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse()?);
    let (ws, _) = tokio_tungstenite::client_async(request, tls)
        .await
        .context("WebSocket upgrade")?;
    Ok(ws)
}

/// One HTTP/1.1 connection to 443 for REST telemetry posts.
pub struct RestClient {
    sender: hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>,
    host: String,
}

impl RestClient {
    pub async fn connect(
        port: u16,
        name: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<Self> {
        let stream = tls_connect(port, name, tls).await?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP/1.1 handshake")?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            host: name.to_owned(),
        })
    }

    /// POSTs a small telemetry message; the status the hub (through the proxy) answered.
    pub async fn post_telemetry(&mut self, device: &str) -> anyhow::Result<StatusCode> {
        self.sender.ready().await.context("connection ready")?;
        let request = http::Request::post(format!(
            "/devices/{device}/messages/events?api-version=2021-04-12"
        ))
        .header(HOST, &self.host)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(b"{\"t\":1}")))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .context("response")?;
        let status = response.status();
        response.into_body().collect().await.context("body")?;
        Ok(status)
    }
}

/// The agent's Prometheus text from its admin port.
pub async fn scrape(port: u16) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await?;
    Ok(text)
}

/// The value of `metric` for `frontend` in Prometheus text (0 when absent).
pub fn metric_value(metrics: &str, metric: &str, frontend: &str) -> u64 {
    let prefix = format!("{metric}{{frontend=\"{frontend}\"");
    metrics
        .lines()
        .find(|line| line.starts_with(&prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
