//! `cargo xtask demo`: a newcomer's first five minutes. Starts a local stand-in for IoT
//! Hub (mosquitto for MQTT, RabbitMQ for AMQP 1.0 if installed, a strict HTTPS hub that
//! answers `401 IoTHubNotFound` to a wrong name), puts the forwarder in front of it with
//! the IoT Hub layout, sends real traffic through every path, and prints what
//! `forwarder conns` and `forwarder stats` show while connections are open.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use forwarder::agent::{self, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::inspect::{self, Pinned};
use forwarder_tests::hub::TestHub;
use forwarder_tests::peers::{self, KillOnDrop, free_port, scratch_dir, wait_for_port};
use forwarder_tests::pki::{Leaf, TestCa};
use http::header::HOST;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

const HUB: &str = "hub.test";

fn say(text: &str) {
    println!("\n== {text}");
}

fn mosquitto(dir: &Path, leaf: &Leaf, ca: &TestCa) -> (KillOnDrop, u16, u16) {
    let (tls_port, plain_port) = (free_port(), free_port());
    let broker = peers::mosquitto(
        dir,
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nlistener {plain_port} 127.0.0.1",
            ca.ca_pem.display(),
            leaf.cert.display(),
            leaf.key.display()
        ),
        tls_port,
    );
    wait_for_port(plain_port, "mosquitto (plain listener)");
    (broker, tls_port, plain_port)
}

fn mqtt_tls_args(cmd: &mut Command, port: u16, ca: &TestCa) {
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "--cafile",
    ])
    .arg(&ca.ca_pem)
    .args(["-t", "devices/demo/messages/events"]);
}

async fn https_post(addr: SocketAddr, ca: &TestCa, name: &str) -> anyhow::Result<u16> {
    let connector = tokio_rustls::TlsConnector::from(ca.client_config(&[b"http/1.1"]));
    let tls = connector
        .connect(
            ServerName::try_from(name.to_owned())?,
            TcpStream::connect(addr).await?,
        )
        .await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    let request = http::Request::post("/devices/demo/messages/events?api-version=2021-04-12")
        .header(HOST, name)
        .body(Full::new(Bytes::from_static(br#"{"temperature":21.5}"#)))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

/// The stand-in hub: its brokers and its HTTPS front, with the certificates they use.
struct StandIns {
    ca: TestCa,
    proxy_leaf: Leaf,
    hub: TestHub,
    _mosquitto: KillOnDrop,
    mqtt_port: u16,
    rabbit: Option<peers::Rabbit>,
}

async fn start_stand_ins(dir: &Path) -> StandIns {
    let ca = TestCa::new(dir);
    let broker_leaf = ca.issue("broker", &["127.0.0.1", HUB]);
    let hub_leaf = ca.issue("hub", &[HUB, "127.0.0.1"]);
    let proxy_leaf = ca.issue("proxy", &["127.0.0.1", "proxy.test"]);
    say(
        "starting a local stand-in hub: mosquitto (MQTT over TLS), RabbitMQ (AMQP 1.0 over TLS, if installed), a strict HTTPS hub",
    );
    let (mosquitto, mqtt_port, mqtt_plain) = mosquitto(dir, &broker_leaf, &ca);
    let hub = TestHub::start(
        HUB,
        &hub_leaf.cert,
        &hub_leaf.key,
        Some(([127, 0, 0, 1], mqtt_plain).into()),
    )
    .await;
    let rabbit = match peers::rabbitmq(dir, &ca, &broker_leaf) {
        Ok(rabbit) => Some(rabbit),
        Err(err) => {
            println!("   (AMQP part skipped: {err:#})");
            None
        }
    };
    StandIns {
        ca,
        proxy_leaf,
        hub,
        _mosquitto: mosquitto,
        mqtt_port,
        rabbit,
    }
}

/// The IoT Hub layout in front of the stand-ins: MQTT (and AMQP) spliced, HTTPS terminated.
fn forwarder_config(instance: &str, hub: &StandIns) -> anyhow::Result<Config> {
    let mut frontends = vec![Frontend::new(
        "mqtt",
        "127.0.0.1:0".parse()?,
        Mode::Splice,
        "mqtt",
    )];
    let mut backends = vec![Backend::new(
        "mqtt",
        &format!("127.0.0.1:{}", hub.mqtt_port),
    )];
    if let Some(rabbit) = &hub.rabbit {
        let port = rabbit.tls_port;
        frontends.push(Frontend::new(
            "amqp",
            "127.0.0.1:0".parse()?,
            Mode::Splice,
            "amqp",
        ));
        backends.push(Backend::new("amqp", &format!("127.0.0.1:{port}")));
    }
    let mut https = Frontend::new("https", "127.0.0.1:0".parse()?, Mode::Http, "https");
    https.tls_cert = Some(hub.proxy_leaf.cert.clone());
    https.tls_key = Some(hub.proxy_leaf.key.clone());
    frontends.push(https);
    let mut hub_backend = Backend::new("https", &hub.hub.addr.to_string());
    hub_backend.host = Some(HUB.into());
    hub_backend.ca_file = Some(hub.ca.ca_pem.clone());
    backends.push(hub_backend);
    let config = Config::new(instance, frontends, backends);
    config.validate()?;
    Ok(config)
}

/// The MQTT clients of the tour, still running: a subscriber counting 100 messages, the
/// publisher, and an idle subscriber for `conns` to show.
struct MqttClients {
    sub: std::process::Child,
    publisher: std::process::Child,
    _idle_sub: KillOnDrop,
}

async fn tour_mqtt(mqtt: u16, ca: &TestCa) -> anyhow::Result<MqttClients> {
    say(
        "MQTT over TLS (8883-style, passthrough): mosquitto_sub stays connected, mosquitto_pub sends 100 messages",
    );
    let mut sub = Command::new("mosquitto_sub");
    mqtt_tls_args(&mut sub, mqtt, ca);
    sub.args(["-i", "demo-sub", "-C", "100", "-W", "30"])
        .stdout(Stdio::piped());
    let sub = sub.spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publish = Command::new("mosquitto_pub");
    mqtt_tls_args(&mut publish, mqtt, ca);
    publish.args(["-i", "demo-pub", "-l"]).stdin(Stdio::piped());
    let mut publisher = publish.spawn()?;
    if let Some(mut stdin) = publisher.stdin.take() {
        for i in 0..100 {
            writeln!(stdin, "{{\"seq\":{i},\"temperature\":21.5}}")?;
        }
    }
    // A second subscriber that stays connected, so `conns` has something to show.
    let mut idle_sub = Command::new("mosquitto_sub");
    mqtt_tls_args(&mut idle_sub, mqtt, ca);
    idle_sub.args(["-i", "demo-idle"]).stdout(Stdio::null());
    let idle_sub = KillOnDrop::spawn(&mut idle_sub)?;
    Ok(MqttClients {
        sub,
        publisher,
        _idle_sub: idle_sub,
    })
}

async fn tour_https(https_addr: SocketAddr, hub: SocketAddr, ca: &TestCa) -> anyhow::Result<()> {
    say(
        "HTTPS (443-style): the device addresses the proxy; the forwarder rewrites Host and SNI to the hub",
    );
    for _ in 0..20 {
        let status = https_post(https_addr, ca, "proxy.test").await?;
        anyhow::ensure!(
            status == 204,
            "telemetry POST through the forwarder: {status}"
        );
    }
    println!("   20 telemetry POSTs through the forwarder: 204 No Content each");
    // What a TCP-mode proxy produces: the hub is addressed by another name.
    let wrong_name = https_post(hub, ca, "127.0.0.1").await?;
    println!(
        "   the same POST straight to the hub under another name (what a TCP-mode proxy passes on): {wrong_name} IoTHubNotFound"
    );
    Ok(())
}

/// Publishes once over MQTT-over-WebSocket and keeps the session open (abort the task
/// to end it).
async fn tour_websocket(
    https_addr: SocketAddr,
    ca: &TestCa,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    say(
        "MQTT over WebSocket (wss://.../$iothub/websocket, subprotocol mqtt) with rumqttc, kept open",
    );
    let url = format!("wss://127.0.0.1:{}/$iothub/websocket", https_addr.port());
    let mut options = rumqttc::MqttOptions::new("demo-ws", url, https_addr.port());
    options.set_transport(rumqttc::Transport::wss_with_config(
        rumqttc::TlsConfiguration::Rustls(ca.client_config(&[b"http/1.1"])),
    ));
    let (ws_client, mut ws_loop) = rumqttc::AsyncClient::new(options, 16);
    ws_client
        .publish(
            "devices/demo/messages/events",
            rumqttc::QoS::AtLeastOnce,
            false,
            "over websocket",
        )
        .await?;
    Ok(tokio::spawn(async move {
        let mut acked = false;
        while let Ok(event) = ws_loop.poll().await {
            if matches!(event, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) && !acked {
                acked = true;
                println!("   PUBACK received over the WebSocket");
            }
        }
    }))
}

fn tour_amqp(dir: &Path, amqp: SocketAddr, ca: &TestCa) -> anyhow::Result<()> {
    say("AMQP 1.0 over TLS (5671-style, passthrough): Qpid Proton sends and receives 100 messages");
    let script = dir.join("amqp_demo.py");
    std::fs::write(
        &script,
        "import sys\nfrom proton import Message, SSLDomain\nfrom proton.utils import BlockingConnection\n\
         ssl = SSLDomain(SSLDomain.MODE_CLIENT)\nssl.set_trusted_ca_db(sys.argv[2])\n\
         ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)\n\
         c = BlockingConnection(sys.argv[1], ssl_domain=ssl, sasl_enabled=True, allowed_mechs='PLAIN', user='guest', password='guest', virtual_host='hub.test', timeout=20)\n\
         s = c.create_sender('/queue/demo')\n[s.send(Message(body='m%d' % i)) for i in range(100)]\n\
         r = c.create_receiver('/queue/demo', credit=100)\nfor i in range(100):\n    r.receive(timeout=20); r.accept()\n\
         c.close()\nprint('   100 AMQP messages sent and received through the splice')\n",
    )?;
    let status = Command::new("/usr/bin/python3")
        .arg(&script)
        .arg(format!("amqps://127.0.0.1:{}", amqp.port()))
        .arg(&ca.ca_pem)
        .status();
    if !status.is_ok_and(|s| s.success()) {
        println!("   (the AMQP client failed: is python3-qpid-proton installed?)");
    }
    Ok(())
}

/// What `forwarder conns` and `forwarder stats` show while the tour's connections are open.
fn show_inspection(instance: &str, running: &[agent::Running]) -> anyhow::Result<()> {
    let pinned = Pinned::open(instance)?;
    say(&format!(
        "forwarder conns --instance {instance}   (open connections, read from the pinned eBPF maps)"
    ));
    inspect::print_conns(&pinned, false, &mut std::io::stdout())?;
    say(&format!("forwarder stats --instance {instance}"));
    // The agent publishes counters every second from `agent::run`; here the library is
    // driven directly, so the counters are printed from the running frontends.
    for r in running {
        println!("frontend {}", r.name);
        for (name, value) in r.metrics.snapshot().into_iter().filter(|(_, v)| *v > 0) {
            println!("  {name:<26} {value}");
        }
    }
    println!(
        "\nWhat to notice: the MQTT and AMQP connections are on the `kernel` path and their \
         `userspace_payload_bytes` is 0 (bytes never crossed userspace); the HTTPS frontend \
         relayed every request with the hub's name, and the WebSocket is joined after the hub's 101."
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = scratch_dir("demo");
    let hub = start_stand_ins(&dir).await;
    say(
        "starting the forwarder with the IoT Hub layout: MQTT and AMQP spliced in the kernel, HTTPS terminated",
    );
    let instance = format!("demo-tour-{}", std::process::id());
    let config = forwarder_config(&instance, &hub)?;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let (running, _datapath) = agent::start(&config, &RunOptions::default(), stopped).await?;
    let port_of = |name: &str| running.iter().find(|r| r.name == name).map(|r| r.addr);
    for r in &running {
        println!("   {:<6} listening on {}", r.name, r.addr);
    }
    let mqtt = port_of("mqtt").map(|a| a.port()).unwrap_or_default();
    let https_addr = port_of("https").ok_or_else(|| anyhow::anyhow!("no https frontend"))?;

    let mut clients = tour_mqtt(mqtt, &hub.ca).await?;
    tour_https(https_addr, hub.hub.addr, &hub.ca).await?;
    let ws_task = tour_websocket(https_addr, &hub.ca).await?;
    if let (Some(_), Some(amqp)) = (&hub.rabbit, port_of("amqp")) {
        tour_amqp(&dir, amqp, &hub.ca)?;
    }

    let received = tokio::task::spawn_blocking(move || clients.sub.wait_with_output()).await??;
    println!(
        "   mosquitto_sub received {} MQTT messages through the forwarder",
        String::from_utf8_lossy(&received.stdout).lines().count()
    );
    let _ = clients.publisher.wait();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    show_inspection(&instance, &running)?;
    ws_task.abort();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
