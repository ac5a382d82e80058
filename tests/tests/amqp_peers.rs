//! A real AMQP 1.0 exchange through the kernel splice: RabbitMQ with its built-in
//! amqp1_0 plugin and a TLS listener as the upstream, Apache Qpid Proton as the device,
//! verifying the broker's certificate and name end to end (the forwarder never sees the
//! plaintext), 1,000 messages sent and received back in order.

use std::process::Command;

use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::get;
use forwarder_tests::agent::StartedAgent;
use forwarder_tests::peers::{self, scratch_dir};
use forwarder_tests::pki::TestCa;
use forwarder_tests::require_root;

const MESSAGES: usize = 1_000;

/// Sends MESSAGES to a queue and receives them back, over AMQP 1.0 with TLS (SNI and
/// peer-name verification against `hub.test`) and SASL PLAIN.
const CLIENT: &str = r#"
import sys
from proton import Message, SSLDomain
from proton.utils import BlockingConnection

url, ca, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ssl = SSLDomain(SSLDomain.MODE_CLIENT)
ssl.set_trusted_ca_db(ca)
ssl.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
conn = BlockingConnection(url, ssl_domain=ssl, sasl_enabled=True, allowed_mechs="PLAIN",
                          user="guest", password="guest", virtual_host="hub.test", timeout=20)
sender = conn.create_sender("/queue/forwarder-test")
for i in range(count):
    sender.send(Message(body="msg-%d" % i))
receiver = conn.create_receiver("/queue/forwarder-test", credit=100)
for i in range(count):
    message = receiver.receive(timeout=20)
    if message.body != "msg-%d" % i:
        sys.exit("message %d: got %r" % (i, message.body))
    receiver.accept()
conn.close()
print("OK %d" % count)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_1_0_over_tls_through_the_kernel_splice_loses_nothing() {
    require_root();
    let dir = scratch_dir("amqp");
    let ca = TestCa::new(&dir);
    let broker_leaf = ca.issue("broker", &["hub.test", "127.0.0.1"]);
    let broker = peers::rabbitmq(&dir, &ca, &broker_leaf).expect("RabbitMQ starts");
    let tls_port = broker.tls_port;

    let mut frontend = Frontend::new("amqp", "127.0.0.1:0".parse().unwrap(), Mode::Splice, "hub");
    frontend.idle_timeout = std::time::Duration::from_secs(60);
    let config = Config::new(
        format!("amqp-{}", std::process::id()),
        vec![frontend],
        vec![Backend::new("hub", &format!("127.0.0.1:{tls_port}"))],
    );
    let agent = StartedAgent::start(&config).await;
    assert!(agent.datapath.is_some(), "the kernel path must be loaded");
    let metrics = agent.l4(0);
    // No probe connection: the agent listens once start returns, and a probe would be
    // a connection of its own (closed during set-up, so served in userspace).
    let port = agent.port(0);

    let script = dir.join("amqp_client.py");
    std::fs::write(&script, CLIENT).expect("write client script");
    let ca_pem = ca.ca_pem.clone();
    let out = tokio::task::spawn_blocking(move || {
        // Debian's python3-qpid-proton is importable from the system interpreter.
        Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(format!("amqps://127.0.0.1:{port}"))
            .arg(&ca_pem)
            .arg(MESSAGES.to_string())
            .output()
            .expect("run the Qpid Proton client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("OK {MESSAGES}")),
        "AMQP client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(get(&metrics.kernel_spliced) >= 1);
    assert_eq!(get(&metrics.userspace), 0, "served in userspace");
    assert_eq!(
        get(&metrics.userspace_payload_bytes),
        0,
        "payload crossed userspace on a spliced connection"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
