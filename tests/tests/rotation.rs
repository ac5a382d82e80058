//! Certificate rotation: a reload (SIGHUP) with the configuration text unchanged reads
//! the certificate and key files again. New connections are shown the new certificate,
//! connections opened before (keep-alive HTTPS, an upgraded WebSocket) go on untouched,
//! and a broken new file is refused while the previous certificate stays in service.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use forwarder::agent::{self, RunOptions};
use forwarder::config::Config;
use forwarder_tests::hub::TestHub;
use forwarder_tests::init_logging;
use forwarder_tests::peers::{free_port, scratch_dir};
use forwarder_tests::pki::TestCa;
use futures_util::{SinkExt as _, StreamExt as _};
use http::Request;
use http::header::HOST;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const HUB: &str = "hub.test";
const PROXY: &str = "proxy.test";

type ClientBody = BoxBody<Bytes, io::Error>;

async fn tls_connect(port: u16, ca: &TestCa) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]))
        .connect(ServerName::try_from(PROXY).unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// The leaf certificate a new connection is shown.
async fn served_certificate(port: u16, ca: &TestCa) -> CertificateDer<'static> {
    let tls = tls_connect(port, ca).await;
    tls.get_ref().1.peer_certificates().expect("a certificate")[0]
        .clone()
        .into_owned()
}

fn leaf_on_disk(path: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).expect("leaf PEM")
}

async fn get_ok(sender: &mut hyper::client::conn::http1::SendRequest<ClientBody>) {
    let request = Request::post("/devices/dev1/messages/events?api-version=2021-04-12")
        .header(HOST, PROXY)
        .header("authorization", "SharedAccessSignature sr=x&sig=x&se=1")
        .body(
            Full::new(Bytes::from_static(b"{}"))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = sender.send_request(request).await.expect("response");
    assert!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    let _ = response.into_body().collect().await;
}

/// A running agent with one terminating HTTPS frontend in front of a stand-in hub, its
/// certificate and key in files of its own (`leaf`) that the tests rewrite.
struct Rig {
    ca: TestCa,
    leaf: forwarder_tests::pki::Leaf,
    port: u16,
    stop: watch::Sender<bool>,
    reload: mpsc::Sender<()>,
    agent: tokio::task::JoinHandle<anyhow::Result<()>>,
    _hub: TestHub,
}

impl Rig {
    async fn start(name: &str) -> Self {
        init_logging();
        let dir = scratch_dir(name);
        let ca = TestCa::new(&dir);
        let hub_leaf = ca.issue("hub", &[HUB]);
        let hub = TestHub::start(HUB, &hub_leaf.cert, &hub_leaf.key, None).await;
        let leaf = ca.issue("proxy", &[PROXY]);
        let port = free_port();
        let config_path = dir.join("forwarder.toml");
        std::fs::write(
            &config_path,
            format!(
                "instance = \"{name}-{pid}\"\n\
                 [[frontend]]\nname = \"https\"\nbind = \"127.0.0.1:{port}\"\nmode = \"http\"\n\
                 backend = \"hub\"\ntls_cert = {cert:?}\ntls_key = {key:?}\n\
                 [[backend]]\nname = \"hub\"\nservers = [{{ address = \"{hub}\" }}]\n\
                 host = \"{HUB}\"\nca_file = {ca_file:?}\n",
                pid = std::process::id(),
                hub = hub.addr,
                cert = leaf.cert,
                key = leaf.key,
                ca_file = ca.ca_pem,
            ),
        )
        .unwrap();
        let config = Config::load(&config_path).expect("valid config");
        let (stop, stopped) = watch::channel(false);
        let (reload, reloads) = mpsc::channel(1);
        let options = RunOptions {
            config_path: Some(config_path),
            drain_deadline: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let agent = tokio::spawn(agent::run(config, options, stopped, reloads));
        forwarder_tests::peers::wait_for_port(port, "the forwarder");
        Self {
            ca,
            leaf,
            port,
            stop,
            reload,
            agent,
            _hub: hub,
        }
    }

    async fn served_certificate(&self) -> CertificateDer<'static> {
        served_certificate(self.port, &self.ca).await
    }

    /// A keep-alive HTTPS connection, with one request through it.
    async fn keepalive(&self) -> hyper::client::conn::http1::SendRequest<ClientBody> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(
            tls_connect(self.port, &self.ca).await,
        ))
        .await
        .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        get_ok(&mut sender).await;
        sender
    }

    /// Issues the proxy's certificate again, over the same files.
    fn renew(&self) -> CertificateDer<'static> {
        let renewed = self.ca.issue("proxy", &[PROXY]);
        leaf_on_disk(&renewed.cert)
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.agent)
            .await
            .expect("the agent stops")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_certificates_keeps_open_connections_and_refuses_broken_files() {
    // Certificate A, in the files the configuration names.
    let rig = Rig::start("rotation").await;
    let (port, ca, leaf) = (rig.port, &rig.ca, &rig.leaf);
    let cert_a = leaf_on_disk(&leaf.cert);
    assert_eq!(rig.served_certificate().await, cert_a);

    // Opened before the rotation: a keep-alive HTTPS connection and a WebSocket.
    let mut keepalive = rig.keepalive().await;
    let mut request = format!("wss://{PROXY}/$iothub/websocket")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request, tls_connect(port, ca).await)
        .await
        .expect("WebSocket handshake");
    let echo = async |ws: &mut tokio_tungstenite::WebSocketStream<_>, text: &str| {
        ws.send(Message::Text(text.into())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::Text(text.into()),
            "the WebSocket opened before the rotation stopped echoing"
        );
    };
    echo(&mut ws, "before").await;

    // Certificate B over the same files; the configuration text is unchanged.
    let cert_b = rig.renew();
    assert_ne!(cert_a, cert_b);
    rig.reload.send(()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while rig.served_certificate().await != cert_b {
        assert!(
            Instant::now() < deadline,
            "new connections still see the old certificate after the reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    get_ok(&mut keepalive).await;
    echo(&mut ws, "after the rotation").await;

    // Broken files: unparseable PEM, then a certificate whose key is not the one on disk.
    std::fs::write(&leaf.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    rig.reload.send(()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..5 {
        assert_eq!(
            rig.served_certificate().await,
            cert_b,
            "a broken certificate file replaced the working one"
        );
    }
    let other = ca.issue("other", &[PROXY]);
    std::fs::copy(&other.cert, &leaf.cert).unwrap();
    rig.reload.send(()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..5 {
        assert_eq!(
            rig.served_certificate().await,
            cert_b,
            "a certificate that does not match its key replaced the working one"
        );
    }
    get_ok(&mut keepalive).await;
    echo(&mut ws, "after the refused files").await;

    drop((ws, keepalive));
    rig.stop().await;
}

/// Renewed files are picked up without a reload: the agent looks at them every few
/// seconds, and new connections get the new certificate (a renewal that writes the
/// certificate before the key passes through a mismatched pair, refused until the key
/// follows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_files_renewed_on_disk_rotate_without_a_reload() {
    let rig = Rig::start("rotation-watch").await;
    let cert_a = leaf_on_disk(&rig.leaf.cert);
    assert_eq!(rig.served_certificate().await, cert_a);
    let mut keepalive = rig.keepalive().await;

    // The renewal: certificate B over the same files, and no SIGHUP.
    let cert_b = rig.renew();
    assert_ne!(cert_a, cert_b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while rig.served_certificate().await != cert_b {
        assert!(
            Instant::now() < deadline,
            "new connections still see the old certificate 20 s after the renewal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    get_ok(&mut keepalive).await;

    drop(keepalive);
    rig.stop().await;
}
