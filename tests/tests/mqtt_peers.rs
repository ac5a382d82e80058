//! Real peers: mosquitto with a TLS listener as upstream, mosquitto_pub / mosquitto_sub
//! through the forwarder, verifying the broker's certificate end to end (the forwarder
//! never terminates TLS on this path).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::get;
use forwarder_tests::agent::StartedAgent;
use forwarder_tests::peers::{self, scratch_dir};
use forwarder_tests::pki::TestCa;
use forwarder_tests::require_root;

const MESSAGES: usize = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls_through_the_kernel_splice_loses_nothing() {
    require_root();
    let dir = scratch_dir("mqtt");
    let pki = TestCa::new(&dir);
    let broker_leaf = pki.issue("broker", &["127.0.0.1", "hub.test"]);
    let (_broker, broker_port) = peers::mosquitto_tls(&dir, &pki, &broker_leaf);

    let config = Config::new(
        format!("mqtt-{}", std::process::id()),
        vec![Frontend::new(
            "mqtt",
            "127.0.0.1:0".parse().unwrap(),
            Mode::Splice,
            "broker",
        )],
        vec![Backend::new("broker", &format!("127.0.0.1:{broker_port}"))],
    );
    let agent = StartedAgent::start(&config).await;
    let datapath = agent
        .datapath
        .clone()
        .expect("the kernel path must be loaded");
    let metrics = agent.l4(0);
    let proxy_port = agent.port(0).to_string();

    let ca = pki.ca_pem.clone();
    let tls = |cmd: &mut Command| {
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &proxy_port,
            "-t",
            "devices/d1/messages/events",
            "-q",
            "1",
            "--cafile",
        ])
        .arg(&ca);
    };
    let mut sub = Command::new("mosquitto_sub");
    tls(&mut sub);
    sub.args(["-C", &MESSAGES.to_string(), "-W", "60", "-i", "sub1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let sub = sub.spawn().unwrap();
    // Let the subscription reach the broker before publishing (QoS 1, no retained).
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&metrics.kernel_spliced) < 1 {
        assert!(
            Instant::now() < deadline,
            "subscriber never connected through the forwarder"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    let lines: Vec<String> = (0..MESSAGES)
        .map(|i| format!("{{\"seq\":{i},\"temp\":{}}}", 20 + i % 7))
        .collect();
    let mut publish = Command::new("mosquitto_pub");
    tls(&mut publish);
    publish
        .args(["-l", "-i", "pub1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut publisher = publish.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().unwrap();
        stdin
            .write_all((lines.join("\n") + "\n").as_bytes())
            .unwrap();
    }
    let pub_out = tokio::task::spawn_blocking(move || publisher.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        pub_out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&pub_out.stderr)
    );
    let sub_out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        sub_out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&sub_out.stderr)
    );
    let received: Vec<&str> = std::str::from_utf8(&sub_out.stdout)
        .unwrap()
        .lines()
        .collect();
    assert_eq!(
        received.len(),
        MESSAGES,
        "messages lost through the forwarder"
    );
    assert_eq!(
        received,
        lines.iter().map(String::as_str).collect::<Vec<_>>(),
        "messages changed or reordered"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&metrics.active) > 0 {
        assert!(Instant::now() < deadline, "connections did not close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        get(&metrics.kernel_spliced),
        2,
        "publisher and subscriber both spliced in the kernel"
    );
    assert_eq!(
        get(&metrics.userspace_payload_bytes),
        0,
        "TLS bytes crossed userspace: {:?}",
        metrics.snapshot()
    );
    assert!(
        get(&metrics.bytes_up) > 10_000 * 20,
        "kernel counters saw the traffic"
    );
    assert_eq!(datapath.entry_counts(), (0, 0, 0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Legacy devices on plain MQTT (1883): IoT Hub refuses MQTT without TLS, so the forwarder
/// originates TLS to the broker (verifying its certificate for the hub's name) and
/// relays. A wrong name is refused, never relayed unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_mqtt_on_1883_is_carried_over_verified_tls() {
    require_root();
    let dir = scratch_dir("mqtt-originate");
    let pki = TestCa::new(&dir);
    let broker_leaf = pki.issue("broker", &["hub.test"]);
    let (_broker, broker_port) = peers::mosquitto_tls(&dir, &pki, &broker_leaf);
    let backend = |name: &str, tls_name: &str| {
        let mut b = Backend::new(name, &format!("127.0.0.1:{broker_port}"));
        b.host = Some("hub.test".into());
        b.tls_server_name = Some(tls_name.into());
        b.ca_file = Some(pki.ca_pem.clone());
        b
    };
    let config = Config::new(
        format!("originate-{}", std::process::id()),
        vec![
            Frontend::new(
                "plain",
                "127.0.0.1:0".parse().unwrap(),
                Mode::Originate,
                "hub",
            ),
            Frontend::new(
                "wrong",
                "127.0.0.1:0".parse().unwrap(),
                Mode::Originate,
                "wrong",
            ),
        ],
        vec![backend("hub", "hub.test"), backend("wrong", "other.test")],
    );
    let agent = StartedAgent::start(&config).await;
    let plain_port = agent.port(0).to_string();
    let wrong_port = agent.port(1).to_string();

    const PLAIN_MESSAGES: usize = 500;
    let mut sub = Command::new("mosquitto_sub");
    sub.args([
        "-h",
        "127.0.0.1",
        "-p",
        &plain_port,
        "-t",
        "legacy/#",
        "-q",
        "1",
    ])
    .args([
        "-C",
        &PLAIN_MESSAGES.to_string(),
        "-W",
        "30",
        "-i",
        "legacy-sub",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let sub = sub.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut publish = Command::new("mosquitto_pub");
    publish
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &plain_port,
            "-t",
            "legacy/t",
            "-q",
            "1",
        ])
        .args(["-l", "-i", "legacy-pub"])
        .stdin(Stdio::piped());
    let mut publisher = publish.spawn().unwrap();
    {
        use std::io::Write;
        let mut stdin = publisher.stdin.take().unwrap();
        for i in 0..PLAIN_MESSAGES {
            writeln!(stdin, "reading {i}").unwrap();
        }
    }
    assert!(publisher.wait().unwrap().success(), "mosquitto_pub failed");
    let out = tokio::task::spawn_blocking(move || sub.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let expected: Vec<String> = (0..PLAIN_MESSAGES)
        .map(|i| format!("reading {i}"))
        .collect();
    assert_eq!(
        lines, expected,
        "messages lost or reordered over originated TLS"
    );

    // The broker's certificate does not name "other.test": nothing is relayed.
    let refused = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &wrong_port,
            "-t",
            "legacy/t",
            "-m",
            "x",
        ])
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "published through an unverified hub"
    );
    assert_eq!(get(&agent.l4(1).upstream_connect_failed), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
