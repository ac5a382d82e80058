//! Transparent mode on a gateway: a device namespace routes through a gateway namespace
//! (forwarding on, the agent runs here as a real process) to a hub namespace. The device
//! connects to the hub's own address, with no DNS or configuration change, and verifies
//! the hub's certificate; the agent intercepts, splices in the kernel, and leaves no
//! routing rule behind after a stop, or after a SIGKILL once it has started again.

use forwarder_tests::forwarder_binary;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::inspect::{self, Pinned};
use forwarder::transparent::Identity;
use forwarder_tests::netns::{EchoServer, in_ns, spawn_in_ns, unique};
use forwarder_tests::peers::{KillOnDrop, scratch_dir};
use forwarder_tests::pki::TestCa;
use forwarder_tests::{random_payload, require_root, sha256};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

const DEVICE: &str = "10.61.0.2";
const GW_DEVICE_SIDE: &str = "10.61.0.1";
const GW_HUB_SIDE: &str = "10.62.0.1";
const HUB: &str = "10.62.0.2";
/// Another address of the hub namespace, outside a frontend's intercepted prefix.
const OTHER: &str = "10.62.0.3";
/// The name the hub's certificate carries besides its address.
const HUB_NAME: &str = "hub.test";

/// device ns --veth-- gateway ns --veth-- hub ns; removed on drop.
struct Gateway {
    id: String,
    device: String,
    gateway: String,
    hub: String,
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Gateway {
    fn new() -> Self {
        let id = unique();
        let g = Self {
            id: id.clone(),
            device: format!("tpd{id}"),
            gateway: format!("tpg{id}"),
            hub: format!("tph{id}"),
        };
        let (d, w, h) = (g.device.as_str(), g.gateway.as_str(), g.hub.as_str());
        for ns in [d, w, h] {
            run(&["ip", "netns", "add", ns]);
            g.ip(ns, &["link", "set", "lo", "up"]);
        }
        let (dv, gd, gh, hv) = (
            format!("td{id}"),
            format!("tg{id}"),
            format!("tk{id}"),
            format!("th{id}"),
        );
        run(&[
            "ip", "link", "add", &dv, "netns", d, "type", "veth", "peer", "name", &gd, "netns", w,
        ]);
        run(&[
            "ip", "link", "add", &gh, "netns", w, "type", "veth", "peer", "name", &hv, "netns", h,
        ]);
        for (ns, dev, addr) in [
            (d, &dv, DEVICE),
            (w, &gd, GW_DEVICE_SIDE),
            (w, &gh, GW_HUB_SIDE),
            (h, &hv, HUB),
        ] {
            g.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", dev]);
            g.ip(ns, &["link", "set", dev, "up"]);
        }
        g.ip(d, &["route", "add", "default", "via", GW_DEVICE_SIDE]);
        g.ip(h, &["route", "add", "default", "via", GW_HUB_SIDE]);
        g.exec(w, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        g
    }

    fn exec(&self, ns: &str, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    fn ip(&self, ns: &str, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Every rule of both families and every route in `table`, in the gateway.
    fn routing(&self, table: u32) -> (Vec<String>, Vec<String>) {
        let mut rules = Vec::new();
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            rules.extend(
                self.ip(&self.gateway, &[family, "rule", "show"])
                    .lines()
                    .map(str::to_owned),
            );
            routes.extend(
                self.ip(&self.gateway, &[family, "route", "show", "table", "all"])
                    .lines()
                    .filter(|l| {
                        l.contains(&format!("table {table} "))
                            || l.ends_with(&format!("table {table}"))
                    })
                    .map(str::to_owned),
            );
        }
        (rules, routes)
    }

    /// Only the kernel's own rules, and nothing in the instance's table.
    fn assert_clean(&self, table: u32, when: &str) {
        let (rules, routes) = self.routing(table);
        let foreign: Vec<&String> = rules
            .iter()
            .filter(|l| {
                !(l.starts_with("0:") || l.starts_with("32766:") || l.starts_with("32767:"))
            })
            .collect();
        assert!(foreign.is_empty(), "{when}: rules left behind: {foreign:?}");
        assert!(
            routes.is_empty(),
            "{when}: routes left in table {table}: {routes:?}"
        );
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        for ns in [&self.device, &self.gateway, &self.hub] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The agent as a process in the gateway namespace, with `config`; started once its
/// rules are in.
fn start_agent(gw: &Gateway, config: &Path, instance: &str, table: u32) -> KillOnDrop {
    start_agent_as(gw, config, instance, table, None)
}

/// `start_agent` with `hosts` bind-mounted over /etc/hosts, in a mount namespace of the
/// agent's own (what names resolve to, changed by the test while it runs).
fn start_agent_with_hosts(
    gw: &Gateway,
    config: &Path,
    instance: &str,
    table: u32,
    hosts: &Path,
) -> KillOnDrop {
    start_agent_inner(gw, config, instance, table, None, Some(hosts))
}

/// `start_agent`, becoming `user` after start-up (`--user`) when given.
fn start_agent_as(
    gw: &Gateway,
    config: &Path,
    instance: &str,
    table: u32,
    user: Option<&str>,
) -> KillOnDrop {
    start_agent_inner(gw, config, instance, table, user, None)
}

fn start_agent_inner(
    gw: &Gateway,
    config: &Path,
    instance: &str,
    table: u32,
    user: Option<&str>,
    hosts: Option<&Path>,
) -> KillOnDrop {
    // Into the gateway's network namespace only (`ip netns exec` would also give it a
    // mount namespace of its own, and its pins would not be seen here).
    let netns = std::fs::File::open(format!("/run/netns/{}", gw.gateway)).expect("netns");
    let mut command = Command::new(forwarder_binary());
    command
        .args(["run", "--drain-secs", "1", "-c"])
        .arg(config)
        .stdout(Stdio::null());
    if let Some(user) = user {
        command.args(["--user", user]);
    }
    {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let fd = netns.as_raw_fd();
        let hosts = hosts
            .map(|p| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("hosts path"));
        #[allow(unsafe_code)] // a raw pre-exec hook
        // SAFETY: the hook runs in the forked child before exec and only makes system
        // calls (setns, unshare, mount) with a descriptor the parent keeps open until the
        // spawn returns and C strings made before the fork.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(hosts) = &hosts {
                    let none = std::ptr::null();
                    let private = libc::MS_REC | libc::MS_PRIVATE;
                    if libc::unshare(libc::CLONE_NEWNS) != 0
                        || libc::mount(none, c"/".as_ptr(), none, private, std::ptr::null()) != 0
                        || libc::mount(
                            hosts.as_ptr(),
                            c"/etc/hosts".as_ptr(),
                            none,
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let agent = KillOnDrop::spawn(&mut command).expect("start the agent");
    // Counters are first published once every frontend serves, which is after the
    // interception is in place.
    let serving = || Pinned::open(instance).is_ok_and(|p| !inspect::stats(&p).is_empty());
    assert!(
        wait(Duration::from_secs(15), serving),
        "the agent did not start serving"
    );
    assert!(
        gw.routing(table)
            .0
            .iter()
            .any(|l| l.contains(&format!("lookup {table}"))),
        "the agent serves without its rules"
    );
    agent
}

/// Stops the agent and checks it unpinned its maps. An agent that dropped its privileges
/// cannot remove the instance's directory itself (its parent is root's): that goes here.
fn stop_agent(agent: KillOnDrop, instance: &str) {
    let status = agent.stop(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "the agent did not stop cleanly: {status:?}"
    );
    let pin_dir = forwarder::ebpf::pin_dir_for(instance);
    if pin_dir.exists() {
        std::fs::remove_dir(&pin_dir)
            .unwrap_or_else(|err| panic!("pins left behind in {}: {err}", pin_dir.display()));
    }
}

fn wait(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

/// A frontend's counter as last published (every second).
fn counter(instance: &str, frontend: &str, name: &str) -> u64 {
    Pinned::open(instance)
        .ok()
        .and_then(|p| inspect::stats(&p).get(frontend)?.get(name).copied())
        .unwrap_or(0)
}

/// Waits (bounded) for a frontend's counter to reach `at_least`; its value then.
fn wait_counter(instance: &str, frontend: &str, name: &str, at_least: u64) -> u64 {
    wait(Duration::from_secs(10), || {
        counter(instance, frontend, name) >= at_least
    });
    counter(instance, frontend, name)
}

/// Something listening on `addr` in `ns` (bounded wait).
fn wait_listening(ns: &str, addr: SocketAddr) {
    let ns = ns.to_owned();
    let up = in_ns(&ns, move || {
        wait(Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
    });
    assert!(up, "nothing listens on {addr}");
}

fn write_config(dir: &Path, instance: &str, body: &str) -> PathBuf {
    let path = dir.join("forwarder.toml");
    std::fs::write(&path, format!("instance = \"{instance}\"\n{body}")).unwrap();
    path
}

fn hub_addr(port: u16) -> SocketAddr {
    SocketAddr::new(HUB.parse().unwrap(), port)
}

/// mosquitto_pub then mosquitto_sub (the retained message) from the device, both to
/// the hub's own address with its certificate verified: the bytes the subscriber got.
fn mqtt_round_trip(gw: &Gateway, ca: &Path, payload_file: &Path, topic: &str) -> Vec<u8> {
    let ca = ca.to_str().unwrap();
    let common = [
        "-h", HUB, "-p", "8883", "--cafile", ca, "-t", topic, "-q", "1",
    ];
    let mut publish = vec!["mosquitto_pub"];
    publish.extend_from_slice(&common);
    publish.extend_from_slice(&["-r", "-f", payload_file.to_str().unwrap()]);
    gw.exec(&gw.device, &publish);
    let mut subscribe = vec!["mosquitto_sub"];
    subscribe.extend_from_slice(&common);
    subscribe.extend_from_slice(&["-C", "1", "-W", "15", "-N"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &gw.device])
        .args(&subscribe)
        .output()
        .expect("mosquitto_sub");
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// MQTT over TLS on 8883 through a real mosquitto: intercepted, spliced, exact; the
/// rules are gone after a stop, and after a SIGKILL once the agent has run again.
#[test]
fn mqtt_tls_to_the_hubs_own_address_is_intercepted_spliced_and_cleaned_up() {
    require_root();
    let gw = Gateway::new();
    let dir = scratch_dir(&format!("transparent-mqtt-{}", unique()));
    let ca = TestCa::new(&dir.join("pki"));
    let leaf = ca.issue("hub", &[HUB, HUB_NAME]);
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\nlistener 8883 {HUB}\ncafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous true\n",
            ca.ca_pem.display(),
            leaf.cert.display(),
            leaf.key.display()
        ),
    )
    .unwrap();
    let _broker = KillOnDrop::spawn(
        Command::new("ip")
            .args(["netns", "exec", &gw.hub, "mosquitto", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("mosquitto");
    wait_listening(&gw.hub, hub_addr(8883));

    let instance = format!("tp-mqtt-{}", unique());
    let table = Identity::of(&instance).table;
    let config = write_config(
        &dir,
        &instance,
        "[[frontend]]\nname = \"mqtt\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [8883]\n",
    );
    gw.assert_clean(table, "before the agent");
    let payload = random_payload(64 << 10);
    let payload_file = dir.join("payload.bin");
    std::fs::write(&payload_file, &payload).unwrap();

    let agent = start_agent(&gw, &config, &instance, table);
    let got = mqtt_round_trip(&gw, &ca.ca_pem, &payload_file, "t/first");
    assert_eq!(got.len(), payload.len());
    assert_eq!(sha256(&got), sha256(&payload), "bytes differ");
    // Publisher and subscriber: both carried by the agent, both spliced in the kernel.
    assert!(wait_counter(&instance, "mqtt", "kernel_spliced", 2) >= 2);
    let stats = inspect::stats(&Pinned::open(&instance).unwrap());
    let mqtt = &stats["mqtt"];
    assert_eq!(
        mqtt.get("upstream_connect_failed").copied().unwrap_or(0),
        0,
        "{mqtt:?}"
    );
    assert_eq!(mqtt.get("userspace").copied().unwrap_or(0), 0, "{mqtt:?}");
    // The steering program counted both connections (`forwarder stats`).
    assert!(wait_counter(&instance, forwarder::transparent::STATS_KEY, "steered", 2) >= 2);
    // The gateway's own connections to the same port are not intercepted (the agent's
    // upstream connections among them): this one reaches the hub directly.
    let spliced = wait_counter(&instance, "mqtt", "kernel_spliced", 2);
    let own = Command::new("ip")
        .args([
            "netns",
            "exec",
            &gw.gateway,
            "mosquitto_pub",
            "-h",
            HUB,
            "-p",
            "8883",
        ])
        .args([
            "--cafile",
            ca.ca_pem.to_str().unwrap(),
            "-t",
            "t/own",
            "-m",
            "x",
        ])
        .status()
        .expect("mosquitto_pub from the gateway");
    assert!(own.success());
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        counter(&instance, "mqtt", "accepted"),
        spliced,
        "the gateway's own connection went through the agent"
    );
    assert_eq!(
        counter(&instance, forwarder::transparent::STATS_KEY, "steered"),
        spliced,
        "the gateway's own connection was steered"
    );
    stop_agent(agent, &instance);
    gw.assert_clean(table, "after a stop");

    // A crash leaves the rules; the next start clears them and intercepts again.
    let crashed = start_agent(&gw, &config, &instance, table);
    drop(crashed); // SIGKILL
    let (rules, _) = gw.routing(table);
    assert!(
        rules.iter().any(|l| l.contains(&format!("lookup {table}"))),
        "a SIGKILL cannot remove rules: {rules:?}"
    );
    // The killed agent's pins stay too (their clean-up at the next start is tested in
    // operator.rs); removed here so that `start_agent` waits for the new agent's.
    std::fs::remove_dir_all(forwarder::ebpf::pin_dir_for(&instance)).expect("stale pins");
    let again = start_agent(&gw, &config, &instance, table);
    let rules = gw.routing(table).0;
    let ours = rules
        .iter()
        .filter(|l| l.contains(&format!("lookup {table}")))
        .count();
    assert_eq!(
        ours, 2,
        "one interception rule per family, not doubled: {rules:?}"
    );
    let got = mqtt_round_trip(&gw, &ca.ca_pem, &payload_file, "t/second");
    assert_eq!(
        sha256(&got),
        sha256(&payload),
        "bytes differ after the restart"
    );
    assert!(wait_counter(&instance, "mqtt", "kernel_spliced", 2) >= 2);
    stop_agent(again, &instance);
    gw.assert_clean(table, "after SIGKILL, restart and stop");
}

/// A tokio runtime on a thread in `ns`, running `serve` for the rest of the test.
fn serve_in_ns<F>(ns: &str, serve: impl FnOnce() -> F + Send + 'static)
where
    F: std::future::Future<Output = ()> + 'static,
{
    drop(spawn_in_ns(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(serve());
    }));
}

fn tls_acceptor(cert: &Path, key: &Path) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A WebSocket-over-TLS echo at `/$iothub/websocket` (the hub's 443, not terminated by
/// the agent: the device's TLS session ends here).
async fn wss_echo(listen: SocketAddr, acceptor: tokio_rustls::TlsAcceptor) {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .expect("bind 443");
    while let Ok((tcp, _)) = listener.accept().await {
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                return;
            };
            while let Some(Ok(message)) = ws.next().await {
                if message.is_binary() && ws.send(message).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// TLS to the hub's own address from the device namespace, verifying its certificate.
async fn device_tls(
    addr: SocketAddr,
    ca: &TestCa,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(HUB_NAME).unwrap();
    tokio_rustls::TlsConnector::from(ca.client_config(alpn))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with the hub's own certificate")
}

/// WebSocket over TLS on 443 and a TLS echo on 5671: both passed through untouched
/// (the device completes TLS with the hub's certificate) and spliced.
#[test]
fn wss_on_443_and_tls_on_5671_pass_through_spliced() {
    require_root();
    let gw = Gateway::new();
    let dir = scratch_dir(&format!("transparent-wss-{}", unique()));
    let ca = Arc::new(TestCa::new(&dir.join("pki")));
    let leaf = ca.issue("hub", &[HUB_NAME, HUB]);
    let (cert, key) = (leaf.cert.clone(), leaf.key.clone());
    serve_in_ns(&gw.hub, move || async move {
        let _ = forwarder_tests::echo::serve(hub_addr(5671), Some((cert, key))).await;
    });
    let acceptor = tls_acceptor(&leaf.cert, &leaf.key);
    serve_in_ns(&gw.hub, move || wss_echo(hub_addr(443), acceptor));
    wait_listening(&gw.hub, hub_addr(5671));
    wait_listening(&gw.hub, hub_addr(443));

    let instance = format!("tp-wss-{}", unique());
    let table = Identity::of(&instance).table;
    let config = write_config(
        &dir,
        &instance,
        &format!(
            "[[frontend]]\nname = \"amqp\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [5671]\nintercept_destinations = [\"{HUB}/32\"]\n\
             [[frontend]]\nname = \"https\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [443]\n"
        ),
    );
    // Unprivileged after start-up: the rules must still go at exit (CAP_NET_ADMIN passed
    // on to `ip` as an ambient capability).
    let agent = start_agent_as(&gw, &config, &instance, table, Some("nobody"));

    // 5671 is intercepted for the hub's address only: another address of the hub
    // namespace is reached directly, the gateway forwarding it as usual.
    gw.ip(
        &gw.hub,
        &[
            "addr",
            "add",
            &format!("{OTHER}/24"),
            "dev",
            &format!("th{}", gw.id),
        ],
    );
    let other = SocketAddr::new(OTHER.parse().unwrap(), 5671);
    let _other_echo = EchoServer::start(&gw.hub, other);
    forwarder_tests::netns::echo_round_trip(&gw.device, DEVICE.parse().unwrap(), other)
        .expect("the other address answers directly");

    let ca_device = ca.clone();
    in_ns(&gw.device, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            tokio::time::timeout(Duration::from_secs(30), async {
                // 5671: 1 MiB through a TLS echo, exact.
                let tls = device_tls(hub_addr(5671), &ca_device, &[]).await;
                let (mut r, mut w) = tokio::io::split(tls);
                let payload = random_payload(1 << 20);
                let sent = payload.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&sent).await.unwrap();
                    w.flush().await.unwrap();
                    w
                });
                let mut echoed = vec![0u8; payload.len()];
                r.read_exact(&mut echoed).await.unwrap();
                assert_eq!(sha256(&echoed), sha256(&payload), "5671 echo differs");
                drop(writer.await.unwrap());

                // 443: WebSocket over TLS, 200 binary messages echoed exactly.
                let tls = device_tls(hub_addr(443), &ca_device, &[b"http/1.1"]).await;
                let request = format!("wss://{HUB_NAME}/$iothub/websocket")
                    .into_client_request()
                    .unwrap();
                let (mut ws, _) = tokio_tungstenite::client_async(request, tls)
                    .await
                    .expect("WebSocket upgrade with the hub");
                for i in 0..200u32 {
                    let message = random_payload(100 + (i as usize * 37) % 4000);
                    ws.send(Message::binary(message.clone())).await.unwrap();
                    let back = ws.next().await.expect("an echo").unwrap();
                    assert_eq!(back.into_data().as_ref(), message.as_slice(), "message {i}");
                }
                let _ = ws.close(None).await;
            })
            .await
            .expect("the device's exchanges finished in time");
        });
    });
    assert!(wait_counter(&instance, "amqp", "kernel_spliced", 1) >= 1);
    assert!(wait_counter(&instance, "https", "kernel_spliced", 1) >= 1);
    let stats = inspect::stats(&Pinned::open(&instance).unwrap());
    assert_eq!(
        stats["amqp"].get("accepted").copied(),
        Some(1),
        "only the connection to the hub's address was intercepted: {:?}",
        stats["amqp"]
    );
    for frontend in ["amqp", "https"] {
        assert_eq!(
            stats[frontend].get("userspace").copied().unwrap_or(0),
            0,
            "{frontend}: {:?}",
            stats[frontend]
        );
    }
    stop_agent(agent, &instance);
    gw.assert_clean(table, "after a stop");
}

/// PROXY protocol v2 written before the splice and read by a real nginx
/// (`listen ... proxy_protocol`), which relays to an echo and logs the address it took
/// from the header: the device's. The payload behind the header is spliced, exact.
#[test]
fn proxy_v2_tells_a_real_nginx_the_devices_address() {
    require_root();
    let gw = Gateway::new();
    let dir = scratch_dir(&format!("transparent-proxy-{}", unique()));
    let echo_addr = hub_addr(9000);
    let _echo = EchoServer::start(&gw.hub, echo_addr);
    let access_log = dir.join("access.log");
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nuser root;\ndaemon off;\nmaster_process off;\npid {pid};\nerror_log {err} info;\nevents {{}}\n\
             stream {{\n log_format seen '$proxy_protocol_addr:$proxy_protocol_port $remote_addr';\n access_log {log} seen;\n\
             server {{ listen {HUB}:8883 proxy_protocol; proxy_pass {echo_addr}; }}\n}}\n",
            pid = dir.join("nginx.pid").display(),
            err = dir.join("nginx.err").display(),
            log = access_log.display(),
        ),
    )
    .unwrap();
    let _nginx = KillOnDrop::spawn(
        Command::new("ip")
            .args(["netns", "exec", &gw.hub, "nginx", "-c"])
            .arg(&nginx_conf)
            .args(["-p"])
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("nginx");
    wait_listening(&gw.hub, hub_addr(8883));

    let instance = format!("tp-proxy-{}", unique());
    let table = Identity::of(&instance).table;
    let config = write_config(
        &dir,
        &instance,
        &format!(
            "[[backend]]\nname = \"broker\"\nsend_proxy_v2 = true\nservers = [{{ address = \"{HUB}:8883\" }}]\n\
             [[frontend]]\nname = \"mqtt\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [8883]\nbackend = \"broker\"\n"
        ),
    );
    let agent = start_agent(&gw, &config, &instance, table);
    let payload = random_payload(256 << 10);
    let (sent, len) = (payload.clone(), payload.len());
    let (device_addr, echoed) = in_ns(&gw.device, move || {
        use std::io::{Read as _, Write as _};
        let mut stream =
            std::net::TcpStream::connect_timeout(&hub_addr(8883), Duration::from_secs(5))
                .expect("connect to the hub's address");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // Wait for the splice before sending, so the bytes take the kernel path.
        std::thread::sleep(Duration::from_millis(300));
        let mut writer = stream.try_clone().unwrap();
        let writing = std::thread::spawn(move || writer.write_all(&sent).unwrap());
        let mut echoed = vec![0u8; len];
        stream
            .read_exact(&mut echoed)
            .expect("the echo through nginx");
        writing.join().unwrap();
        (stream.local_addr().unwrap(), echoed)
    });
    assert_eq!(sha256(&echoed), sha256(&payload), "bytes differ");
    assert!(wait_counter(&instance, "mqtt", "kernel_spliced", 1) >= 1);
    // nginx writes its log line when the session ends (the readiness probe's, without a
    // header, is "-:-").
    let line = || {
        std::fs::read_to_string(&access_log)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.starts_with("-:-"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        wait(Duration::from_secs(10), || !line().is_empty()),
        "no nginx log line"
    );
    assert_eq!(
        line(),
        format!("{}:{} {GW_HUB_SIDE}", device_addr.ip(), device_addr.port()),
        "nginx saw the device's address in the header, over the gateway's connection"
    );
    stop_agent(agent, &instance);
    gw.assert_clean(table, "after a stop");
}

/// `preserve_source`: the agent connects to the original destination from the device's
/// own address, so the server sees the device (it routes the device's network back
/// through the gateway, as the hub namespace does); the payload is spliced, exact.
#[test]
fn preserve_source_shows_the_server_the_devices_address() {
    require_root();
    let gw = Gateway::new();
    let dir = scratch_dir(&format!("transparent-source-{}", unique()));
    // A server that names its peer, then echoes.
    let listener = in_ns(&gw.hub, || {
        std::net::TcpListener::bind(hub_addr(8883)).unwrap()
    });
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let peer = stream.peer_addr().unwrap();
                let _ = stream.write_all(format!("{peer}\n").as_bytes());
                let mut buf = [0u8; 16384];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });

    let instance = format!("tp-source-{}", unique());
    let table = Identity::of(&instance).table;
    let config = write_config(
        &dir,
        &instance,
        "[[frontend]]\nname = \"mqtt\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [8883]\npreserve_source = true\n",
    );
    let agent = start_agent(&gw, &config, &instance, table);
    let (rules, _) = gw.routing(table);
    assert!(
        rules.iter().any(|l| l.contains("sport 8883")),
        "replies to the device's address are taken in: {rules:?}"
    );
    let payload = random_payload(256 << 10);
    let (sent, len) = (payload.clone(), payload.len());
    let (device_addr, seen, echoed) = in_ns(&gw.device, move || {
        use std::io::{BufRead as _, Read as _, Write as _};
        let stream = std::net::TcpStream::connect_timeout(&hub_addr(8883), Duration::from_secs(5))
            .expect("connect to the hub's address");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
        let mut seen = String::new();
        reader.read_line(&mut seen).expect("the server's line");
        let mut writer = stream.try_clone().unwrap();
        let writing = std::thread::spawn(move || writer.write_all(&sent).unwrap());
        let mut echoed = vec![0u8; len];
        reader.read_exact(&mut echoed).expect("the echo");
        writing.join().unwrap();
        (stream.local_addr().unwrap(), seen, echoed)
    });
    let seen: SocketAddr = seen.trim().parse().expect("an address");
    assert_eq!(
        seen.ip(),
        device_addr.ip(),
        "the server saw the device's address"
    );
    assert_eq!(sha256(&echoed), sha256(&payload), "bytes differ");
    assert!(wait_counter(&instance, "mqtt", "kernel_spliced", 1) >= 1);
    stop_agent(agent, &instance);
    gw.assert_clean(table, "after a stop");
}

/// `intercept_hosts`: the hub's name is resolved at start and again every second; when
/// it moves to another address, the interception moves with it (rules and steering), and
/// the old address is routed on untouched.
#[test]
fn intercept_hosts_follow_the_hubs_address() {
    require_root();
    let gw = Gateway::new();
    let dir = scratch_dir(&format!("transparent-hosts-{}", unique()));
    gw.ip(
        &gw.hub,
        &[
            "addr",
            "add",
            &format!("{OTHER}/24"),
            "dev",
            &format!("th{}", gw.id),
        ],
    );
    let (first, second) = (
        hub_addr(8883),
        SocketAddr::new(OTHER.parse().unwrap(), 8883),
    );
    let _echo_first = EchoServer::start(&gw.hub, first);
    let _echo_second = EchoServer::start(&gw.hub, second);
    let hosts = dir.join("hosts");
    std::fs::write(&hosts, format!("{HUB} {HUB_NAME}\n")).unwrap();

    let instance = format!("tp-hosts-{}", unique());
    let table = Identity::of(&instance).table;
    let config = write_config(
        &dir,
        &instance,
        &format!(
            "[[frontend]]\nname = \"mqtt\"\nmode = \"transparent\"\nbind = \"127.0.0.1:0\"\nintercept_ports = [8883]\nintercept_hosts = [\"{HUB_NAME}\"]\nintercept_hosts_refresh_secs = 1\n"
        ),
    );
    let agent = start_agent_with_hosts(&gw, &config, &instance, table, &hosts);
    let device: std::net::IpAddr = DEVICE.parse().unwrap();
    let round_trip = |to: SocketAddr| {
        forwarder_tests::netns::echo_round_trip(&gw.device, device, to)
            .unwrap_or_else(|e| panic!("echo through {to}: {e}"));
    };
    let accepted = || {
        std::thread::sleep(Duration::from_millis(1200)); // published every second
        counter(&instance, "mqtt", "accepted")
    };
    round_trip(first);
    assert_eq!(accepted(), 1, "the name's address is intercepted");
    round_trip(second);
    assert_eq!(accepted(), 1, "another address is not");

    // The name moves (written in place: the bind mount keeps the file).
    std::fs::write(&hosts, format!("{OTHER} {HUB_NAME}\n")).unwrap();
    let moved = wait(Duration::from_secs(10), || {
        let (rules, _) = gw.routing(table);
        rules.iter().any(|l| l.contains(&format!("to {OTHER} ")))
            && !rules.iter().any(|l| l.contains(&format!("to {HUB} ")))
    });
    assert!(
        moved,
        "the rules did not follow the name: {:?}",
        gw.routing(table).0
    );
    round_trip(second);
    assert_eq!(accepted(), 2, "the name's new address is intercepted");
    round_trip(first);
    assert_eq!(accepted(), 2, "its old address is not any more");
    stop_agent(agent, &instance);
    gw.assert_clean(table, "after a stop");
}
