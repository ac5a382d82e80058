//! One passthrough port serving two hubs, chosen by the TLS server name the forwarder
//! peeks from the ClientHello. Real peers on both ends: `openssl s_server` as the two
//! hubs, `openssl s_client` as the device, verifying each hub's own certificate through
//! the kernel splice; an unknown name gets a TLS `unrecognized_name` alert.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::get;
use forwarder_tests::agent::StartedAgent;
use forwarder_tests::peers::{self, KillOnDrop, free_port, scratch_dir, wait_for_port};
use forwarder_tests::pki::{Leaf, TestCa};
use forwarder_tests::require_root;

fn s_server(leaf: &Leaf, port: u16) -> KillOnDrop {
    let server = peers::spawn(
        "openssl",
        &[
            "s_server".as_ref(),
            "-accept".as_ref(),
            format!("127.0.0.1:{port}").as_ref(),
            "-cert".as_ref(),
            leaf.cert.as_os_str(),
            "-key".as_ref(),
            leaf.key.as_os_str(),
            // Answers each GET with a status page, then closes.
            "-www".as_ref(),
        ],
    );
    wait_for_port(port, "openssl s_server");
    server
}

/// `openssl s_client` through the forwarder: (exit success, stdout + stderr).
fn s_client(port: u16, server_name: &str, ca_pem: &Path) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", server_name, "-verify_hostname", server_name])
        .arg("-CAfile")
        .arg(ca_pem)
        .args(["-verify_return_error", "-ign_eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .expect("request to s_client");
    }
    let out = child.wait_with_output().expect("s_client output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_port_routes_two_hubs_by_sni_and_refuses_unknown_names() {
    require_root();
    let dir = scratch_dir("sni-routing");
    let ca = TestCa::new(&dir);
    let (port_a, port_b) = (free_port(), free_port());
    let _hub_a = s_server(&ca.issue("a", &["a.hub.test"]), port_a);
    let _hub_b = s_server(&ca.issue("b", &["b.hub.test"]), port_b);

    let mut frontend = Frontend::new("mqtt", "127.0.0.1:0".parse().unwrap(), Mode::Splice, "x");
    frontend.backend = None;
    frontend.sni_routes = BTreeMap::from([
        ("a.hub.test".into(), "hub-a".into()),
        ("B.HUB.TEST".into(), "hub-b".into()),
    ]);
    let config = Config::new(
        format!("sni-{}", std::process::id()),
        vec![frontend],
        vec![
            Backend::new("hub-a", &format!("127.0.0.1:{port_a}")),
            Backend::new("hub-b", &format!("127.0.0.1:{port_b}")),
        ],
    );
    let agent = StartedAgent::start(&config).await;
    assert!(agent.datapath.is_some(), "the kernel path must be loaded");
    let metrics = agent.l4(0);
    let port = agent.port(0);

    for name in ["a.hub.test", "b.hub.test"] {
        let ca_pem = ca.ca_pem.clone();
        let (ok, out) = tokio::task::spawn_blocking(move || s_client(port, name, &ca_pem))
            .await
            .unwrap();
        assert!(ok, "s_client to {name} failed:\n{out}");
        assert!(out.contains("Verify return code: 0 (ok)"), "{name}:\n{out}");
        assert!(
            out.contains(&format!("CN={name}")) || out.contains(&format!("CN = {name}")),
            "{name}: the hub's own certificate was not presented:\n{out}"
        );
        assert!(
            out.contains("HTTP/1.0 200 ok"),
            "{name}: no answer through the splice:\n{out}"
        );
    }
    assert_eq!(get(&metrics.kernel_spliced), 2);

    let ca_pem = ca.ca_pem.clone();
    let (ok, out) = tokio::task::spawn_blocking(move || s_client(port, "c.hub.test", &ca_pem))
        .await
        .unwrap();
    assert!(!ok, "an unknown name must not be served:\n{out}");
    assert!(
        out.contains("unrecognized name") || out.contains("alert number 112"),
        "no unrecognized_name alert:\n{out}"
    );
    assert_eq!(get(&metrics.sni_unknown), 1);
    let _ = std::fs::remove_dir_all(&dir);
}
