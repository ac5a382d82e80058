//! The soak's environment and load, run by `cargo xtask soak` (which samples the agent and
//! writes the report). On loopback: mosquitto with TLS (MQTT), a TLS echo server standing
//! in for the AMQP endpoint (the 5671 path is spliced L4 bytes whatever the protocol, so
//! an echo exercises exactly what RabbitMQ would), the stand-in HTTPS hub (REST, and
//! WebSocket frames echoed), and the release agent in front of them.
//!
//! Protocol with xtask, one line each:
//!   stdout `READY {json}`   the agent is up (pid, admin port, instance); no load yet
//!   stdin  `start`          run the load for `--secs`
//!   stdout `LOAD {json}`    the load's counters, every few seconds
//!   stdout `DONE {json}`    the load has stopped and every client connection is closed
//!   stdin  `stop` (or EOF)  stop the agent (SIGTERM) and everything else, then exit

use std::ffi::OsString;
use std::io::{BufRead as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use forwarder_tests::clients::{
    RestClient, connect_from, partial_hello, source, tls_connect, websocket,
};
use forwarder_tests::hub::TestHub;
use forwarder_tests::peers::{self, KillOnDrop, free_port, wait_for_port};
use forwarder_tests::pki::TestCa;
use futures_util::{SinkExt as _, StreamExt as _};
use http::StatusCode;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const PROXY: &str = "proxy.test";
const HUB: &str = "hub.test";
const AMQP: &str = "amqp.test";

/// Hostile clients per wave.
const SILENT: usize = 100;
const PARTIAL_HELLOS: usize = 200;
const PER_SOURCE_CAP: usize = 50;
const FLOOD: usize = 150;
const SILENT_H2: usize = 40;
const IDLE_WEBSOCKETS: usize = 40;
/// The agent's timeouts the hostile clients run into (short, so each wave is closed well
/// before the next one).
const HELLO_TIMEOUT_MS: u64 = 3_000;
const WS_IDLE_SECS: u64 = 10;
/// A hostile connection the agent has not closed after this counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// Legitimate load.
const AMQP_SESSIONS: usize = 40;
const MQTT_PUBLISHERS: usize = 2;
const MQTT_BATCH: u64 = 5;
const REST_WORKERS: usize = 2;
const WS_WORKERS: usize = 2;

#[derive(Parser)]
#[command(about = "soak environment and load for cargo xtask soak")]
struct Args {
    /// The agent binary (target/release/forwarder).
    #[arg(long)]
    forwarder: PathBuf,
    /// How long the load runs.
    #[arg(long)]
    secs: f64,
    /// A wave of hostile clients every this many seconds.
    #[arg(long, default_value_t = 30)]
    wave_secs: u64,
    /// Scratch directory (certificates, configs, the agent's log).
    #[arg(long)]
    dir: PathBuf,
}

/// What the load did; printed as JSON.
#[derive(Default)]
struct Counters {
    mqtt_published: AtomicU64,
    mqtt_publish_failed: AtomicU64,
    mqtt_received: AtomicU64,
    amqp_messages: AtomicU64,
    amqp_sessions: AtomicU64,
    amqp_failed: AtomicU64,
    rest_ok: AtomicU64,
    rest_failed: AtomicU64,
    ws_sessions: AtomicU64,
    ws_messages: AtomicU64,
    ws_failed: AtomicU64,
    hostile_waves: AtomicU64,
    hostile_opened: AtomicU64,
    hostile_closed: AtomicU64,
    hostile_stuck: AtomicU64,
}

impl Counters {
    fn json(&self) -> serde_json::Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "mqtt_published": get(&self.mqtt_published),
            "mqtt_publish_failed": get(&self.mqtt_publish_failed),
            "mqtt_received": get(&self.mqtt_received),
            "amqp_messages": get(&self.amqp_messages),
            "amqp_sessions": get(&self.amqp_sessions),
            "amqp_failed": get(&self.amqp_failed),
            "rest_ok": get(&self.rest_ok),
            "rest_failed": get(&self.rest_failed),
            "ws_sessions": get(&self.ws_sessions),
            "ws_messages": get(&self.ws_messages),
            "ws_failed": get(&self.ws_failed),
            "hostile_waves": get(&self.hostile_waves),
            "hostile_opened": get(&self.hostile_opened),
            "hostile_closed": get(&self.hostile_closed),
            "hostile_stuck": get(&self.hostile_stuck),
        })
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

#[derive(Clone, Copy)]
struct Ports {
    mqtt: u16,
    amqp: u16,
    https: u16,
    admin: u16,
}

struct Env {
    pki: TestCa,
    ports: Ports,
    ca: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    forwarder_tests::raise_fd_limit();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let dir = args.dir.as_path();
    let pki = TestCa::new(dir);
    let broker_leaf = pki.issue("broker", &["127.0.0.1"]);
    let (_broker, broker_port) = peers::mosquitto_tls(dir, &pki, &broker_leaf);
    let hub_leaf = pki.issue("hub", &[HUB]);
    let hub = TestHub::start(HUB, &hub_leaf.cert, &hub_leaf.key, None).await;
    let amqp_leaf = pki.issue("amqp", &[AMQP]);
    let echo_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    tokio::spawn(forwarder_tests::echo::serve(
        echo_addr,
        Some((amqp_leaf.cert.clone(), amqp_leaf.key.clone())),
    ));
    wait_for_port(echo_addr.port(), "AMQP stand-in (TLS echo)");
    let proxy_leaf = pki.issue("proxy", &[PROXY]);

    let ports = Ports {
        mqtt: free_port(),
        amqp: free_port(),
        https: free_port(),
        admin: free_port(),
    };
    let instance = format!("soak-{}", std::process::id());
    let config = dir.join("forwarder.toml");
    std::fs::write(
        &config,
        format!(
            "instance = \"{instance}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{mqtt}\"\nbackend = \"broker\"\n\
             client_hello_timeout_ms = {HELLO_TIMEOUT_MS}\nmax_connections_per_source = {PER_SOURCE_CAP}\n\
             [frontend.sni_routes]\n\"other.test\" = \"broker\"\n\
             [[frontend]]\nname = \"amqp\"\nbind = \"127.0.0.1:{amqp}\"\nbackend = \"amqp\"\n\
             [[frontend]]\nname = \"https\"\nmode = \"http\"\nbind = \"127.0.0.1:{https}\"\nbackend = \"hub\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\nheader_read_timeout_ms = {HELLO_TIMEOUT_MS}\n\
             idle_timeout_secs = {WS_IDLE_SECS}\n\
             [[backend]]\nname = \"broker\"\nservers = [{{ address = \"127.0.0.1:{broker_port}\" }}]\n\
             [[backend]]\nname = \"amqp\"\nservers = [{{ address = \"{echo_addr}\" }}]\n\
             [[backend]]\nname = \"hub\"\nservers = [{{ address = \"{hub_addr}\" }}]\nhost = \"{HUB}\"\nca_file = \"{ca}\"\n",
            admin = ports.admin,
            mqtt = ports.mqtt,
            amqp = ports.amqp,
            https = ports.https,
            cert = proxy_leaf.cert.display(),
            key = proxy_leaf.key.display(),
            hub_addr = hub.addr,
            ca = pki.ca_pem.display(),
        ),
    )?;
    let log = std::fs::File::create(dir.join("forwarder.log"))?;
    let agent = KillOnDrop::spawn(
        Command::new(&args.forwarder)
            .args(["run", "--drain-secs", "1", "-c"])
            .arg(&config)
            .env("RUST_LOG", "forwarder=warn")
            .stdout(Stdio::null())
            .stderr(log),
    )
    .with_context(|| format!("starting {}", args.forwarder.display()))?;
    for (port, what) in [
        (ports.mqtt, "mqtt frontend"),
        (ports.amqp, "amqp frontend"),
        (ports.https, "https frontend"),
        (ports.admin, "admin"),
    ] {
        wait_for_port(port, what);
    }
    say(&format!(
        "READY {}",
        serde_json::json!({
            "pid": agent.id(), "admin": ports.admin, "instance": instance,
            "config": config, "log": dir.join("forwarder.log"),
        })
    ));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    match stdin.next_line().await? {
        Some(line) if line.trim() == "start" => {}
        other => bail!("expected `start` on stdin, got {other:?}"),
    }

    let env = Arc::new(Env {
        ca: pki.ca_pem.clone(),
        pki,
        ports,
    });
    let counters = Arc::new(Counters::default());
    let deadline = Instant::now() + Duration::from_secs_f64(args.secs);
    // xtask going away (EOF) or Ctrl-C ends the load early; the agent is still stopped
    // below, and every client process is killed as its task is dropped.
    let finished = tokio::select! {
        result = load(&env, &counters, deadline, args.wave_secs) => Some(result),
        _ = stdin.next_line() => None,
        _ = tokio::signal::ctrl_c() => None,
    };
    match finished {
        Some(Ok(())) => {
            say(&format!("DONE {}", counters.json()));
            // Whatever comes (`stop` or EOF): stop the agent the way an operator does.
            let _ = stdin.next_line().await;
        }
        Some(Err(err)) => eprintln!("soak: the load failed: {err:#}"),
        None => eprintln!("soak: stopped before the end of the load"),
    }
    let status = agent.stop(Duration::from_secs(15));
    say(&format!(
        "STOPPED {}",
        serde_json::json!({ "clean": status.is_some_and(|s| s.success()) })
    ));
    Ok(())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Every kind of traffic until `deadline`, then waits for every client to finish.
async fn load(
    env: &Arc<Env>,
    counters: &Arc<Counters>,
    deadline: Instant,
    wave_secs: u64,
) -> anyhow::Result<()> {
    let subscriber = MqttSubscriber::start(env, counters)?;
    // The subscription reaches the broker before anything is published (QoS 1, nothing
    // retained, so a message published before it would be lost to it).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let mut tasks = JoinSet::new();
    for i in 0..MQTT_PUBLISHERS {
        tasks.spawn(mqtt_publisher(env.clone(), counters.clone(), deadline, i));
    }
    for i in 0..AMQP_SESSIONS {
        tasks.spawn(amqp_session(env.clone(), counters.clone(), deadline, i));
    }
    for _ in 0..REST_WORKERS {
        tasks.spawn(rest_worker(env.clone(), counters.clone(), deadline));
    }
    for _ in 0..WS_WORKERS {
        tasks.spawn(websocket_worker(env.clone(), counters.clone(), deadline));
    }
    tasks.spawn(hostile_waves(
        env.clone(),
        counters.clone(),
        deadline,
        wave_secs,
    ));
    let reporter = {
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                say(&format!("LOAD {}", counters.json()));
            }
        })
    };
    while let Some(done) = tasks.join_next().await {
        done.context("a load task panicked")?;
    }
    // The last QoS 1 messages reach the subscriber.
    let expected = counters.mqtt_published.load(Ordering::Relaxed);
    let wait_until = Instant::now() + Duration::from_secs(10);
    while counters.mqtt_received.load(Ordering::Relaxed) < expected && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(subscriber);
    reporter.abort();
    Ok(())
}

/// mosquitto_sub on one long-lived spliced connection, counting what arrives; killed
/// when dropped.
struct MqttSubscriber(std::process::Child);

impl Drop for MqttSubscriber {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl MqttSubscriber {
    fn start(env: &Env, counters: &Arc<Counters>) -> anyhow::Result<Self> {
        let mut child = Command::new("mosquitto_sub")
            .args(mqtt_args(env))
            .args(["-i", "soak-sub", "-k", "60"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("mosquitto_sub")?;
        let stdout = child.stdout.take().context("mosquitto_sub stdout")?;
        let counters = counters.clone();
        std::thread::spawn(move || {
            for _ in std::io::BufReader::new(stdout).lines() {
                add(&counters.mqtt_received, 1);
            }
        });
        Ok(Self(child))
    }
}

/// Broker address (the agent's MQTT frontend), topic, QoS 1 and the CA to trust.
fn mqtt_args(env: &Env) -> Vec<OsString> {
    let port = env.ports.mqtt.to_string();
    let mut args: Vec<OsString> = ["-h", "127.0.0.1", "-p", &port, "-t", "soak/telemetry"]
        .iter()
        .chain(&["-q", "1", "--cafile"])
        .map(OsString::from)
        .collect();
    args.push(env.ca.clone().into_os_string());
    args
}

/// Connect, publish a few QoS 1 messages, disconnect; again until the deadline.
async fn mqtt_publisher(env: Arc<Env>, counters: Arc<Counters>, deadline: Instant, worker: usize) {
    let mut round = 0u64;
    while Instant::now() < deadline {
        round += 1;
        let mut cmd = tokio::process::Command::new("mosquitto_pub");
        cmd.args(mqtt_args(&env))
            .args(["-l", "-i", &format!("soak-pub-{worker}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let ok = async {
            let mut child = cmd.spawn().ok()?;
            let lines: String = (0..MQTT_BATCH)
                .map(|i| format!("{{\"worker\":{worker},\"round\":{round},\"seq\":{i}}}\n"))
                .collect();
            let mut stdin = child.stdin.take()?;
            stdin.write_all(lines.as_bytes()).await.ok()?;
            drop(stdin);
            let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
                .await
                .ok()?
                .ok()?;
            status.success().then_some(())
        }
        .await;
        match ok {
            Some(()) => add(&counters.mqtt_published, MQTT_BATCH),
            None => add(&counters.mqtt_publish_failed, 1),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A long-lived spliced TLS connection sending 64 bytes a second and checking the echo;
/// it closes after 20 to 60 s and a new one takes its place (map entries churn).
async fn amqp_session(env: Arc<Env>, counters: Arc<Counters>, deadline: Instant, i: usize) {
    // Spread the starts over the first seconds.
    tokio::time::sleep(Duration::from_millis(100 * i as u64)).await;
    let tls = env.pki.client_config(&[b"amqp"]);
    let mut generation = 0u64;
    while Instant::now() < deadline {
        generation += 1;
        let lifetime = Duration::from_secs(20 + (i as u64 * 7 + generation * 13) % 41);
        let ended = Instant::now() + lifetime;
        let result: anyhow::Result<()> = async {
            let mut stream = tls_connect(env.ports.amqp, AMQP, tls.clone()).await?;
            add(&counters.amqp_sessions, 1);
            let mut seq = 0u64;
            while Instant::now() < ended.min(deadline) {
                seq += 1;
                let mut message = format!("session {i} gen {generation} seq {seq} ").into_bytes();
                message.resize(64, b'.');
                stream.write_all(&message).await?;
                stream.flush().await?;
                let mut echo = vec![0u8; message.len()];
                tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
                    .await
                    .context("echo timed out")??;
                if echo != message {
                    bail!("echo differs");
                }
                add(&counters.amqp_messages, 1);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            stream.shutdown().await?;
            Ok(())
        }
        .await;
        if let Err(err) = result {
            eprintln!("soak: AMQP session {i}: {err:#}");
            add(&counters.amqp_failed, 1);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// REST telemetry through 443: 20 posts on one keep-alive connection, then a new one.
async fn rest_worker(env: Arc<Env>, counters: Arc<Counters>, deadline: Instant) {
    let tls = env.pki.client_config(&[b"http/1.1"]);
    while Instant::now() < deadline {
        let result: anyhow::Result<()> = async {
            let mut client = RestClient::connect(env.ports.https, PROXY, tls.clone()).await?;
            for _ in 0..20 {
                if Instant::now() >= deadline {
                    break;
                }
                let status = client.post_telemetry("soak-device").await?;
                if status != StatusCode::NO_CONTENT {
                    bail!("status {status}");
                }
                add(&counters.rest_ok, 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            eprintln!("soak: REST: {err:#}");
            add(&counters.rest_failed, 1);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// WebSocket sessions opening, exchanging 10 echoed messages, and closing.
async fn websocket_worker(env: Arc<Env>, counters: Arc<Counters>, deadline: Instant) {
    let tls = env.pki.client_config(&[b"http/1.1"]);
    while Instant::now() < deadline {
        let result: anyhow::Result<()> = async {
            let mut ws = websocket(env.ports.https, PROXY, tls.clone()).await?;
            for seq in 0..10u8 {
                let message = vec![seq; 100];
                ws.send(Message::binary(message.clone())).await?;
                loop {
                    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
                        .await
                        .context("echo timed out")?
                        .context("closed early")??;
                    match got {
                        Message::Binary(data) if data[..] == message[..] => break,
                        Message::Ping(_) | Message::Pong(_) => {}
                        other => bail!("unexpected {other:?}"),
                    }
                }
                add(&counters.ws_messages, 1);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            ws.close(None).await?;
            // The close handshake completes (the hub answers the close frame).
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                while let Some(Ok(_)) = ws.next().await {}
            })
            .await;
            add(&counters.ws_sessions, 1);
            Ok(())
        }
        .await;
        if let Err(err) = result {
            eprintln!("soak: WebSocket: {err:#}");
            add(&counters.ws_failed, 1);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// A wave of hostile clients every `wave_secs` (the first after 5 s); each connection is
/// held until the agent closes it (timeout or cap), or counted as stuck.
async fn hostile_waves(env: Arc<Env>, counters: Arc<Counters>, deadline: Instant, wave_secs: u64) {
    let mut next = Instant::now() + Duration::from_secs(5);
    let mut held = JoinSet::new();
    // A wave needs the agent's longest timeout (the WebSockets' idle) to be closed.
    while next + Duration::from_secs(WS_IDLE_SECS + 2) < deadline {
        tokio::time::sleep_until(next.into()).await;
        next += Duration::from_secs(wave_secs);
        add(&counters.hostile_waves, 1);
        let ports = env.ports;
        let h2 = env.pki.client_config(&[b"h2"]);
        let h1 = env.pki.client_config(&[b"http/1.1"]);
        for _ in 0..SILENT_H2 {
            let (counters, h2) = (counters.clone(), h2.clone());
            held.spawn(async move {
                match tls_connect(ports.https, PROXY, h2).await {
                    Ok(stream) => hold(stream, &counters).await,
                    Err(err) => eprintln!("soak: silent HTTP/2 client: {err:#}"),
                }
            });
        }
        for _ in 0..IDLE_WEBSOCKETS {
            let (counters, h1) = (counters.clone(), h1.clone());
            held.spawn(async move {
                match websocket(ports.https, PROXY, h1).await {
                    Ok(mut ws) => {
                        add(&counters.hostile_opened, 1);
                        let closed = tokio::time::timeout(STUCK_AFTER, async {
                            while let Some(Ok(_)) = ws.next().await {}
                        })
                        .await;
                        closed_or_stuck(closed.is_ok(), &counters);
                    }
                    Err(err) => eprintln!("soak: idle WebSocket: {err:#}"),
                }
            });
        }
        for i in 0..SILENT {
            let counters = counters.clone();
            held.spawn(async move {
                if let Some(stream) = connect_from(source(1, i), ports.mqtt).await {
                    hold(stream, &counters).await;
                }
            });
        }
        for i in 0..PARTIAL_HELLOS {
            let counters = counters.clone();
            held.spawn(async move {
                if let Some(stream) = partial_hello(source(2, i), ports.mqtt).await {
                    hold(stream, &counters).await;
                }
            });
        }
        for _ in 0..FLOOD {
            let counters = counters.clone();
            held.spawn(async move {
                if let Some(stream) = connect_from(source(3, 0), ports.mqtt).await {
                    hold(stream, &counters).await;
                }
            });
        }
        // Reap the finished ones as we go.
        while held.try_join_next().is_some() {}
    }
    while held.join_next().await.is_some() {}
}

/// Counts a hostile connection opened, waits for the agent to close it, counts the end.
async fn hold<S: AsyncRead + Unpin>(mut stream: S, counters: &Counters) {
    add(&counters.hostile_opened, 1);
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(STUCK_AFTER, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    closed_or_stuck(closed.is_ok(), counters);
}

fn closed_or_stuck(closed: bool, counters: &Counters) {
    add(
        if closed {
            &counters.hostile_closed
        } else {
            &counters.hostile_stuck
        },
        1,
    );
}
