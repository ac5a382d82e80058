//! Real peers: mosquitto with a TLS listener as upstream, mosquitto_pub / mosquitto_sub
//! through the forwarder, verifying the broker's certificate end to end (the forwarder
//! never terminates TLS on this path).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::ebpf::{Datapath, LoadOptions};
use forwarder::l4::upstream::{Pool, Server};
use forwarder::l4::{L4Frontend, SessionOptions, serve};
use forwarder::metrics::{L4Metrics, get};
use forwarder_tests::require_root;
use tokio::net::TcpListener;

const MESSAGES: usize = 10_000;

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a broker certificate for 127.0.0.1, made with the real openssl.
fn make_pki(dir: &Path) {
    let d = |f: &str| dir.join(f);
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=forwarder test CA",
        ])
        .arg("-keyout")
        .arg(d("ca.key"))
        .arg("-out")
        .arg(d("ca.pem")));
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ])
        .arg("-keyout")
        .arg(d("server.key"))
        .arg("-out")
        .arg(d("server.csr")));
    std::fs::write(d("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:hub.test\n").unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(d("server.csr"))
        .arg("-CA")
        .arg(d("ca.pem"))
        .arg("-CAkey")
        .arg(d("ca.key"))
        .arg("-extfile")
        .arg(d("ext.cnf"))
        .arg("-out")
        .arg(d("server.pem")));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_over_tls_through_the_kernel_splice_loses_nothing() {
    require_root();
    let dir = std::env::temp_dir().join(format!("fwd-mqtt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    make_pki(&dir);
    let broker_port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener {broker_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\nmax_inflight_messages 0\nmax_queued_messages 0\n",
            ca = dir.join("ca.pem").display(),
            cert = dir.join("server.pem").display(),
            key = dir.join("server.key").display(),
        ),
    )
    .unwrap();
    let _broker = KillOnDrop(
        Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto is installed by cargo xtask setup"),
    );
    wait_for_port(broker_port);

    let datapath = Arc::new(Datapath::load(&LoadOptions::default()).expect("eBPF must load"));
    let pool = Arc::new(Pool::new(
        "broker",
        vec![Server {
            address: format!("127.0.0.1:{broker_port}"),
            weight: 1,
        }],
        Duration::from_secs(2),
    ));
    let frontend = Arc::new(L4Frontend {
        name: "mqtt".into(),
        sni_routes: Default::default(),
        default_backend: Some(pool),
        session: SessionOptions::default(),
        kernel: true,
        client_hello_timeout: Duration::from_secs(5),
        keepalive: None,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port().to_string();
    let metrics = Arc::new(L4Metrics::default());
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(serve(
        listener,
        frontend,
        Some(datapath.clone()),
        metrics.clone(),
        stopped,
    ));

    let ca = dir.join("ca.pem");
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
        "TLS bytes crossed userspace"
    );
    assert!(
        get(&metrics.bytes_up) > 10_000 * 20,
        "kernel counters saw the traffic"
    );
    assert_eq!(datapath.entry_counts(), (0, 0, 0));
    let _ = std::fs::remove_dir_all(&dir);
}
