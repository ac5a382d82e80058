//! Hostile clients all at once against a real agent process, while legitimate devices
//! are served: silent clients and partial ClientHellos on an SNI-routed port, one source
//! opening connections beyond its cap, silent HTTP/2 clients and an idle WebSocket flood
//! on 443. Meanwhile mosquitto publishes 1,000 QoS 1 messages through the splice and an
//! HTTPS client posts. The legitimate traffic must go through with a normal round trip,
//! the agent's CPU must stay low while the hostile connections sit on it (no polling),
//! and every refusal must be counted.

use forwarder_tests::forwarder_binary;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forwarder_tests::clients::{
    RestClient, connect_from, metric_value, partial_hello, scrape, source, tls_connect, websocket,
};
use forwarder_tests::hub::TestHub;
use forwarder_tests::peers::{self, KillOnDrop, free_port, scratch_dir, wait_for_port};
use forwarder_tests::pki::TestCa;
use forwarder_tests::{raise_fd_limit, require_root};
use futures_util::future::join_all;
use http::StatusCode;

const SILENT: usize = 300;
const PARTIAL_HELLOS: usize = 1_000;
const PER_SOURCE_CAP: usize = 100;
const FLOOD: usize = 400;
const SILENT_H2: usize = 100;
const IDLE_WEBSOCKETS: usize = 100;
const MESSAGES: usize = 1_000;
/// Time a client gets for its ClientHello (SNI port) or TLS handshake and first request
/// (443): long enough for the load to be set up, short for the test.
const HELLO_TIMEOUT_MS: u64 = 5_000;
const PROXY: &str = "proxy.test";
const HUB: &str = "hub.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_are_absorbed_while_devices_are_served() {
    require_root();
    raise_fd_limit();
    let dir = scratch_dir("hostile");
    let pki = TestCa::new(&dir);
    let broker_leaf = pki.issue("broker", &["127.0.0.1"]);
    let (_broker, broker_port) = peers::mosquitto_tls(&dir, &pki, &broker_leaf);
    let hub_leaf = pki.issue("hub", &[HUB]);
    let hub = TestHub::start(HUB, &hub_leaf.cert, &hub_leaf.key, None).await;
    let proxy_leaf = pki.issue("proxy", &[PROXY]);

    let ports = Ports {
        mqtt: free_port(),
        https: free_port(),
        admin: free_port(),
    };
    let config = dir.join("forwarder.toml");
    std::fs::write(
        &config,
        format!(
            "instance = \"hostile-{pid}\"\nadmin = \"127.0.0.1:{admin}\"\n\
             [[frontend]]\nname = \"mqtt\"\nbind = \"127.0.0.1:{mqtt}\"\nbackend = \"broker\"\n\
             client_hello_timeout_ms = {HELLO_TIMEOUT_MS}\nmax_connections_per_source = {PER_SOURCE_CAP}\n\
             [frontend.sni_routes]\n\"other.test\" = \"broker\"\n\
             [[frontend]]\nname = \"https\"\nmode = \"http\"\nbind = \"127.0.0.1:{https}\"\nbackend = \"hub\"\n\
             tls_cert = \"{cert}\"\ntls_key = \"{key}\"\nheader_read_timeout_ms = {HELLO_TIMEOUT_MS}\n\
             [[backend]]\nname = \"broker\"\nservers = [{{ address = \"127.0.0.1:{broker_port}\" }}]\n\
             [[backend]]\nname = \"hub\"\nservers = [{{ address = \"{hub_addr}\" }}]\nhost = \"{HUB}\"\nca_file = \"{ca}\"\n",
            pid = std::process::id(),
            admin = ports.admin,
            mqtt = ports.mqtt,
            https = ports.https,
            cert = proxy_leaf.cert.display(),
            key = proxy_leaf.key.display(),
            hub_addr = hub.addr,
            ca = pki.ca_pem.display(),
        ),
    )
    .unwrap();
    let agent = start_agent(&config, &ports);

    // The hostile load, TLS clients first (their handshakes cost the agent CPU once).
    let tls = pki.client_config(&[b"h2"]);
    let silent_h2: Vec<_> = join_all(
        (0..SILENT_H2).map(|_| async { tls_connect(ports.https, PROXY, tls.clone()).await.ok() }),
    )
    .await;
    assert_eq!(
        silent_h2.iter().flatten().count(),
        SILENT_H2,
        "silent HTTP/2 clients could not complete TLS"
    );
    let websockets: Vec<_> = join_all((0..IDLE_WEBSOCKETS).map(|_| async {
        websocket(ports.https, PROXY, pki.client_config(&[b"http/1.1"]))
            .await
            .ok()
    }))
    .await;
    let silent = join_all((0..SILENT).map(|i| connect_from(source(1, i), ports.mqtt))).await;
    let partial =
        join_all((0..PARTIAL_HELLOS).map(|i| partial_hello(source(2, i), ports.mqtt))).await;
    let flood = join_all((0..FLOOD).map(|_| connect_from(source(3, 0), ports.mqtt))).await;
    let opened = silent.iter().chain(&flood).flatten().count() + partial.iter().flatten().count();
    assert!(
        opened >= SILENT + PARTIAL_HELLOS + PER_SOURCE_CAP,
        "only {opened} hostile connections opened"
    );

    // The agent's CPU while all of that sits on it: nothing to do, so (almost) nothing
    // done. A timed re-peek of the partial hellos alone took half a core.
    let window = Duration::from_secs(2);
    let before = cpu_seconds(agent.id());
    tokio::time::sleep(window).await;
    let used = cpu_seconds(agent.id()) - before;
    eprintln!("agent CPU with {opened} idle hostile connections: {used:.3} s in {window:?}");
    assert!(
        used < 0.2 * window.as_secs_f64(),
        "the agent used {used:.2} s of CPU in {window:?} with idle hostile clients"
    );

    // Legitimate devices, meanwhile: MQTT through the splice, REST through 443.
    let started = Instant::now();
    let received = publish_and_receive(ports.mqtt, &pki.ca_pem).await;
    let mqtt_took = started.elapsed();
    assert_eq!(received, MESSAGES, "messages lost through the forwarder");
    assert!(
        mqtt_took < Duration::from_secs(20),
        "1,000 QoS 1 messages took {mqtt_took:?}"
    );
    let rest = pki.client_config(&[b"http/1.1"]);
    for _ in 0..10 {
        let started = Instant::now();
        let mut client = RestClient::connect(ports.https, PROXY, rest.clone())
            .await
            .expect("REST client");
        let status = client.post_telemetry("dev1").await.expect("REST post");
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "a REST post took {:?} under hostile load",
            started.elapsed()
        );
    }

    // Every silent or partial client is closed at its timeout, and counted.
    tokio::time::sleep(Duration::from_millis(HELLO_TIMEOUT_MS) + Duration::from_secs(2)).await;
    let metrics = scrape(ports.admin).await.expect("scrape /metrics");
    let counter = |name: &str, frontend: &str| metric_value(&metrics, name, frontend);
    eprintln!(
        "MQTT {MESSAGES} messages in {mqtt_took:?}; refused_per_source {}, client_hello_timeout {}, \
         preface_timeout {}, websockets_active {}",
        counter("forwarder_refused_per_source_total", "mqtt"),
        counter("forwarder_client_hello_timeout_total", "mqtt"),
        counter("forwarder_preface_timeout_total", "https"),
        counter("forwarder_websockets_active", "https"),
    );
    assert_eq!(
        counter("forwarder_refused_per_source_total", "mqtt"),
        (FLOOD - PER_SOURCE_CAP) as u64,
        "{metrics}"
    );
    assert!(
        counter("forwarder_client_hello_timeout_total", "mqtt")
            >= (SILENT + PARTIAL_HELLOS + PER_SOURCE_CAP) as u64,
        "{metrics}"
    );
    assert!(
        counter("forwarder_preface_timeout_total", "https") >= SILENT_H2 as u64,
        "{metrics}"
    );
    assert_eq!(
        counter("forwarder_websockets_active", "https"),
        websockets.iter().flatten().count() as u64,
        "idle WebSockets are held (and counted against max_connections) until their idle timeout"
    );
    assert_eq!(counter("forwarder_session_errors_total", "mqtt"), 0);
    drop((silent_h2, websockets, silent, partial, flood));
    let status = agent.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not stop cleanly: {status:?}"
    );
}

#[derive(Clone, Copy)]
struct Ports {
    mqtt: u16,
    https: u16,
    admin: u16,
}

fn start_agent(config: &Path, ports: &Ports) -> KillOnDrop {
    let agent = KillOnDrop::spawn(
        Command::new(forwarder_binary())
            .args(["run", "--drain-secs", "1", "-c"])
            .arg(config)
            .env("RUST_LOG", "forwarder=warn")
            .stdout(Stdio::null()),
    )
    .expect("start the forwarder");
    for (port, what) in [
        (ports.mqtt, "mqtt frontend"),
        (ports.https, "https frontend"),
        (ports.admin, "admin"),
    ] {
        wait_for_port(port, what);
    }
    agent
}

/// mosquitto_sub and mosquitto_pub through the spliced port; messages received.
async fn publish_and_receive(port: u16, ca: &Path) -> usize {
    let common = |cmd: &mut Command| {
        cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-t", "devices/d1/messages/events", "-q", "1", "--cafile"])
            .arg(ca);
    };
    let mut sub = Command::new("mosquitto_sub");
    common(&mut sub);
    let sub = sub
        .args(["-C", &MESSAGES.to_string(), "-W", "60", "-i", "hostile-sub"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // Let the subscription reach the broker before publishing (QoS 1, nothing retained).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let mut publish = Command::new("mosquitto_pub");
    common(&mut publish);
    let mut publisher = publish
        .args(["-l", "-i", "hostile-pub"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_pub");
    let lines: String = (0..MESSAGES)
        .map(|i| format!("{{\"seq\":{i}}}\n"))
        .collect();
    publisher
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("publish");
    let published = tokio::task::spawn_blocking(move || publisher.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        published.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&published.stderr)
    );
    let got = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        got.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&got.stderr)
    );
    String::from_utf8_lossy(&got.stdout).lines().count()
}

/// utime + stime of a process, in seconds.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("agent stat");
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}
