//! Operator experience against a real running agent: `conns`, `stats` and `maps` read
//! from the pinned maps, Prometheus text on the admin address, and a SIGHUP-style reload
//! that adds, changes and removes frontends while a spliced connection keeps flowing.

use forwarder_tests::forwarder_binary;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use forwarder::agent::{self, RunOptions};
use forwarder::config::Config;
use forwarder::inspect::{self, Pinned};
use forwarder_tests::peers::{free_port, scratch_dir};
use forwarder_tests::{random_payload, require_root, sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

/// An upstream that greets each connection with `banner`, then echoes.
async fn upstream(banner: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                if w.write_all(banner).await.is_ok()
                    && tokio::io::copy(&mut r, &mut w).await.is_ok()
                {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

struct Agent {
    stop: watch::Sender<bool>,
    reload: mpsc::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn start_agent(path: &Path) -> Agent {
    let config = Config::load(path).expect("valid config");
    let (stop, stopped) = watch::channel(false);
    let (reload, reloads) = mpsc::channel(1);
    let options = RunOptions {
        config_path: Some(path.to_owned()),
        drain_deadline: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let task = tokio::spawn(agent::run(config, options, stopped, reloads));
    Agent { stop, reload, task }
}

async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects and reads the upstream's banner (3 bytes).
async fn connect_banner(port: u16) -> std::io::Result<(TcpStream, [u8; 3])> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut banner = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut banner))
        .await
        .map_err(|_| std::io::Error::other("no banner"))??;
    Ok((stream, banner))
}

fn write_config(path: &Path, instance: &str, admin: u16, frontends: &[(&str, u16, SocketAddr)]) {
    let mut text = format!("instance = \"{instance}\"\nadmin = \"127.0.0.1:{admin}\"\n");
    for (name, port, upstream) in frontends {
        text.push_str(&format!(
            "[[frontend]]\nname = \"{name}\"\nbind = \"127.0.0.1:{port}\"\nbackend = \"{name}\"\n\
             [[backend]]\nname = \"{name}\"\nservers = [{{ address = \"{upstream}\" }}]\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

async fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

/// `--user`: after start-up the agent runs as that user with three capabilities, on
/// every thread, and still splices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_drops_privileges_and_still_splices() {
    require_root();
    let dir = scratch_dir("operator-user");
    let instance = format!("user-{}", std::process::id());
    let (port, admin) = (free_port(), free_port());
    let up = upstream(b"U1:").await;
    let path = dir.join("forwarder.toml");
    write_config(&path, &instance, admin, &[("mqtt", port, up)]);
    let agent = forwarder_tests::peers::KillOnDrop::spawn(
        std::process::Command::new(forwarder_binary())
            .args(["run", "--drain-secs", "1", "--user", "nobody", "-c"])
            .arg(&path)
            .stdout(std::process::Stdio::null()),
    )
    .expect("start the agent");
    wait_until("the agent listens", async || {
        connect_banner(port).await.is_ok()
    })
    .await;

    // Every thread: uid nobody, CapEff = CAP_NET_BIND_SERVICE | CAP_NET_ADMIN | CAP_BPF.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", agent.id())).unwrap();
    let mut threads = 0;
    for task in tasks {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), "65534\t65534\t65534\t65534", "{status}");
        assert_eq!(field("CapEff:"), "000000c000001400", "{status}");
        assert_eq!(field("CapBnd:"), "000000c000001400", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1");
        threads += 1;
    }
    assert!(threads > 1, "the serving runtime's threads are checked too");

    let (mut stream, _) = connect_banner(port).await.unwrap();
    let payload = random_payload(256 << 10);
    stream.write_all(&payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(sha256(&echoed), sha256(&payload));
    let pinned = Pinned::open(&instance).expect("maps pinned");
    let client = stream.local_addr().unwrap().to_string();
    assert!(
        inspect::conns(&pinned)
            .iter()
            .any(|r| r.client == client && r.path == "kernel"),
        "the connection is not spliced after the drop"
    );
    drop(stream);
    let status = tokio::task::spawn_blocking(move || agent.stop(Duration::from_secs(10)))
        .await
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "the unprivileged agent did not stop cleanly: {status:?}"
    );
    // Unpinned by the agent; the emptied directory stays (its parent is root's) until
    // the instance's next start.
    let pin_dir = forwarder::ebpf::pin_dir_for(&instance);
    assert_eq!(
        std::fs::read_dir(&pin_dir).map(|d| d.count()).unwrap_or(0),
        0
    );
    let _ = std::fs::remove_dir(pin_dir);
}

/// A second agent with the same instance refuses to start and touches nothing: the
/// first one's pins, port and connections are intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_of_the_same_instance_refuses_and_touches_nothing() {
    require_root();
    let dir = scratch_dir("operator-lock");
    let instance = format!("lock-{}", std::process::id());
    let (port, admin) = (free_port(), free_port());
    let up = upstream(b"U1:").await;
    let first_path = dir.join("first.toml");
    write_config(&first_path, &instance, admin, &[("mqtt", port, up)]);
    let first = start_agent(&first_path).await;
    wait_until("the first agent listens", async || {
        connect_banner(port).await.is_ok()
    })
    .await;
    let (mut stream, _) = connect_banner(port).await.unwrap();

    // Same instance, another port: must fail before binding or touching the pins.
    let (second_port, second_admin) = (free_port(), free_port());
    let second_path = dir.join("second.toml");
    write_config(
        &second_path,
        &instance,
        second_admin,
        &[("mqtt", second_port, up)],
    );
    let second = start_agent(&second_path).await;
    let err = tokio::time::timeout(Duration::from_secs(10), second.task)
        .await
        .expect("the second agent gives up at once")
        .unwrap()
        .expect_err("a second agent of the same instance must not start");
    let err = format!("{err:#}");
    assert!(
        err.contains("another agent") && err.contains(&instance),
        "{err}"
    );
    assert!(
        TcpStream::connect(("127.0.0.1", second_port))
            .await
            .is_err(),
        "the second agent bound its port"
    );

    // The first agent's pins and its spliced connection are as they were.
    let pinned = Pinned::open(&instance).expect("the first agent's pins are intact");
    let client = stream.local_addr().unwrap().to_string();
    assert!(
        inspect::conns(&pinned)
            .iter()
            .any(|r| r.client == client && r.path == "kernel"),
        "the first agent's connection is no longer listed"
    );
    let payload = random_payload(64 << 10);
    stream.write_all(&payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(sha256(&echoed), sha256(&payload));
    drop(stream);
    first.stop.send(true).unwrap();
    first.task.await.unwrap().unwrap();
    assert!(
        Pinned::open(&instance).is_err(),
        "pins left after a clean stop"
    );
}

/// A reload replaces a changed frontend's listener: clients connecting in a tight loop
/// across 20 reloads must be served, not reset from the old listener's queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_never_reset_a_connecting_client() {
    require_root();
    let dir = scratch_dir("operator-handover");
    let instance = format!("handover-{}", std::process::id());
    let (port, admin) = (free_port(), free_port());
    let ups = [upstream(b"U1:").await, upstream(b"U1:").await];
    let path = dir.join("forwarder.toml");
    write_config(&path, &instance, admin, &[("mqtt", port, ups[0])]);
    let agent = start_agent(&path).await;
    wait_until("the agent listens", async || {
        connect_banner(port).await.is_ok()
    })
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut served, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match connect_banner(port).await {
                        Ok(_) => served += 1,
                        Err(err) => failed.push(err.to_string()),
                    }
                }
                (served, failed)
            })
        })
        .collect();
    for i in 1..=20 {
        // Another upstream: the frontend's spec changes, so its listener is replaced.
        write_config(&path, &instance, admin, &[("mqtt", port, ups[i % 2])]);
        agent.reload.send(()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut served, mut failed) = (0, Vec::new());
    for client in clients {
        let (s, f) = client.await.unwrap();
        served += s;
        failed.extend(f);
    }
    // A changed frontend on the same address goes on with the same listening socket, so
    // no listener closes and nothing queued can be reset (16 of 3,456 were before the
    // hand-over; about 1 in 4,000 still was with a new listener per reload, when the
    // kernel's migration of a closing listener's requests failed).
    let total = served as usize + failed.len();
    eprintln!(
        "{} of {total} connections failed across 20 reloads",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {total} connections failed across 20 reloads: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(served > 100, "only {served} connections in 3 s");
    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conns_stats_maps_and_metrics_show_a_live_spliced_connection() {
    require_root();
    let dir = scratch_dir("operator-inspect");
    let instance = format!("inspect-{}", std::process::id());
    let (port, admin) = (free_port(), free_port());
    let up = upstream(b"U1:").await;
    let path = dir.join("forwarder.toml");
    write_config(&path, &instance, admin, &[("mqtt", port, up)]);
    let agent = start_agent(&path).await;
    wait_until("the agent listens", async || {
        connect_banner(port).await.is_ok()
    })
    .await;

    let (mut stream, _) = connect_banner(port).await.unwrap();
    let payload = random_payload(1 << 20);
    stream.write_all(&payload).await.unwrap();
    let mut echoed = vec![0u8; payload.len()];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(sha256(&echoed), sha256(&payload));

    let pinned = Pinned::open(&instance).expect("maps pinned while the agent runs");
    let client = stream.local_addr().unwrap().to_string();
    let rows = inspect::conns(&pinned);
    let row = rows
        .iter()
        .find(|r| r.client == client)
        .unwrap_or_else(|| panic!("{client} not listed: {rows:?}"));
    assert_eq!(row.frontend, "mqtt");
    assert_eq!(row.upstream, up.to_string());
    assert_eq!(row.path, "kernel");
    assert_eq!(row.bytes_up, payload.len() as u64);
    assert_eq!(row.bytes_down, payload.len() as u64 + 3, "echo plus banner");
    let mut json = Vec::new();
    inspect::print_conns(&pinned, true, &mut json).unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json).expect("conns --json is JSON");
    assert!(parsed.as_array().is_some_and(|a| !a.is_empty()));
    let mut table = Vec::new();
    inspect::print_conns(&pinned, false, &mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.starts_with("FRONTEND") && table.contains(&client),
        "{table}"
    );

    // Counters are published every second.
    wait_until("stats published", async || {
        inspect::stats(&pinned)
            .get("mqtt")
            .is_some_and(|c| c.get("kernel_spliced").copied().unwrap_or(0) >= 2)
    })
    .await;
    let backend = inspect::stats(&pinned)
        .remove("backend:mqtt")
        .expect("backend counters published");
    assert_eq!(backend.get("connects"), Some(&2), "{backend:?}");
    let mut printed = Vec::new();
    inspect::print_stats(&pinned, false, &mut printed).unwrap();
    let printed = String::from_utf8(printed).unwrap();
    assert!(
        printed.contains("frontend mqtt") && printed.contains("backend mqtt"),
        "{printed}"
    );
    let mut maps = Vec::new();
    inspect::print_maps(&pinned, false, &mut maps).unwrap();
    let maps = String::from_utf8(maps).unwrap();
    for name in [
        "FWD_SOCKS",
        "FWD_LINKS",
        "FWD_COUNTERS",
        "FWD_CONNS",
        "FWD_STATS",
    ] {
        assert!(maps.contains(name), "{name} missing from `maps`:\n{maps}");
    }

    let metrics = http_get(admin, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("forwarder_kernel_spliced_total{frontend=\"mqtt\",mode=\"splice\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("forwarder_active{frontend=\"mqtt\",mode=\"splice\"} 1"));
    assert!(
        metrics.contains("forwarder_backend_connects_total{backend=\"mqtt\"} 2"),
        "{metrics}"
    );

    drop(stream);
    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
    let err = Pinned::open(&instance).err().expect("pins removed at exit");
    assert!(
        err.to_string().contains("no agent maps are pinned"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_changes_and_removes_frontends_without_dropping_a_spliced_connection() {
    require_root();
    let dir = scratch_dir("operator-reload");
    let instance = format!("reload-{}", std::process::id());
    let (port_a, port_b, admin) = (free_port(), free_port(), free_port());
    let (up1, up2) = (upstream(b"U1:").await, upstream(b"U2:").await);
    let path = dir.join("forwarder.toml");
    write_config(&path, &instance, admin, &[("a", port_a, up1)]);
    let agent = start_agent(&path).await;
    wait_until("the agent listens", async || {
        connect_banner(port_a).await.is_ok()
    })
    .await;

    // A live connection through "a" (to U1), spliced, with bytes in flight across the
    // reloads: the writer keeps sending while the frontends change around it.
    let (stream, banner) = connect_banner(port_a).await.unwrap();
    assert_eq!(&banner, b"U1:");
    let client = stream.local_addr().unwrap().to_string();
    let (mut r, mut w) = stream.into_split();
    let payload = random_payload(48 << 20);
    let expected = sha256(&payload);
    let (reloaded_tx, mut reloaded) = mpsc::channel::<()>(1);
    let writer = tokio::spawn(async move {
        let (first, rest) = payload.split_at(payload.len() / 3);
        w.write_all(first).await.unwrap();
        // Hold the rest until both reloads happened.
        reloaded.recv().await;
        w.write_all(rest).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
            .await
            .expect("echo finished")
            .expect("echo read");
        got
    });

    // Reload 1: "a" now goes to U2, "b" is new (to U1).
    write_config(
        &path,
        &instance,
        admin,
        &[("a", port_a, up2), ("b", port_b, up1)],
    );
    agent.reload.send(()).await.unwrap();
    wait_until("b is served", async || {
        connect_banner(port_b)
            .await
            .is_ok_and(|(_, b)| &b == b"U1:")
    })
    .await;
    wait_until("a goes to U2", async || {
        connect_banner(port_a)
            .await
            .is_ok_and(|(_, b)| &b == b"U2:")
    })
    .await;

    // Reload 2: "b" removed.
    write_config(&path, &instance, admin, &[("a", port_a, up2)]);
    agent.reload.send(()).await.unwrap();
    wait_until("b is gone", async || connect_banner(port_b).await.is_err()).await;

    // A broken file is refused and changes nothing.
    std::fs::write(&path, "instance = \"x\"\n[[frontend]]\nnam = 1\n").unwrap();
    agent.reload.send(()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        connect_banner(port_a)
            .await
            .is_ok_and(|(_, b)| &b == b"U2:")
    );

    // Still listed, still on the kernel path.
    let pinned = Pinned::open(&instance).unwrap();
    let rows = inspect::conns(&pinned);
    let row = rows
        .iter()
        .find(|r| r.client == client)
        .expect("live connection listed");
    assert_eq!(row.path, "kernel");
    assert_eq!(row.frontend, "a");

    reloaded_tx.send(()).await.unwrap();
    writer.await.unwrap();
    let got = reader.await.unwrap();
    assert_eq!(
        got.len(),
        48 << 20,
        "the live connection lost bytes across reloads"
    );
    assert!(
        sha256(&got) == expected,
        "the live connection's bytes changed"
    );

    let metrics = http_get(admin, "/metrics").await;
    assert!(metrics.contains("frontend=\"a\""), "{metrics}");
    assert!(
        !metrics.contains("frontend=\"b\""),
        "removed frontend still reported"
    );
    agent.stop.send(true).unwrap();
    agent.task.await.unwrap().unwrap();
}

/// The stop's drain also waits for connections of a frontend an earlier reload removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_waits_for_connections_of_frontends_removed_by_a_reload() {
    require_root();
    let dir = scratch_dir("operator-drain");
    let instance = format!("drain-{}", std::process::id());
    let (port_a, port_b, admin) = (free_port(), free_port(), free_port());
    let up = upstream(b"U1:").await;
    let path = dir.join("forwarder.toml");
    write_config(
        &path,
        &instance,
        admin,
        &[("a", port_a, up), ("b", port_b, up)],
    );
    let agent = start_agent(&path).await;
    wait_until("the agent listens", async || {
        connect_banner(port_b).await.is_ok()
    })
    .await;
    let (mut stream, _) = connect_banner(port_b).await.unwrap();
    let echo = async |stream: &mut TcpStream| {
        stream.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(&back, b"ping");
    };
    echo(&mut stream).await;

    write_config(&path, &instance, admin, &[("a", port_a, up)]);
    agent.reload.send(()).await.unwrap();
    wait_until("b is gone", async || connect_banner(port_b).await.is_err()).await;
    echo(&mut stream).await;

    // The drain deadline is 5 s: within it, the agent waits for this connection (past
    // the 2 s it gives connection tasks to let go of the data path after the drain).
    let stopped = Instant::now();
    agent.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        !agent.task.is_finished(),
        "the agent stopped without draining the removed frontend's connection"
    );
    echo(&mut stream).await;
    drop(stream);
    tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    assert!(
        stopped.elapsed() < Duration::from_millis(4500),
        "the drain ran to its deadline instead of ending with the last connection: {:?}",
        stopped.elapsed()
    );
}

#[test]
fn the_cli_checks_configs_and_says_clearly_when_no_agent_runs() {
    require_root();
    let binary = forwarder_binary();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&binary)
            .args(args)
            .output()
            .expect("run forwarder");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../forwarder.example.toml");
    let (ok, text) = run(&["check", "-c", example]);
    assert!(ok && text.contains("ok: 3 frontend(s)"), "{text}");

    let dir = scratch_dir("operator-cli");
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[frontend]]\nname = \"mqtt\"\nbind = \"0.0.0.0:8883\"\nbackend = \"hub\"\nidle_timout_secs = 60\n",
    )
    .unwrap();
    let (ok, text) = run(&["check", "-c", bad.to_str().unwrap()]);
    assert!(
        !ok && text.contains("idle_timout_secs") && text.contains("line 5"),
        "{text}"
    );
    let short = dir.join("short.toml");
    std::fs::write(
        &short,
        "[[frontend]]\nname = \"mqtt\"\nbind = \"0.0.0.0:8883\"\nbackend = \"hub\"\nidle_timeout_secs = 60\n\
         [[backend]]\nname = \"hub\"\nservers = [{ address = \"h.example:8883\" }]\n",
    )
    .unwrap();
    let (ok, text) = run(&["check", "-c", short.to_str().unwrap()]);
    assert!(
        ok && text.contains("warning") && text.contains("idle timeout 60 s"),
        "{text}"
    );

    // Connect pacing: shown per backend, off unless set; out-of-range values refused
    // with their line.
    assert!(
        text.contains("backend \"hub\": max_new_connections_per_sec off"),
        "{text}"
    );
    let paced = dir.join("paced.toml");
    let paced_config = |rate: &str| {
        format!(
            "[[frontend]]\nname = \"mqtt\"\nbind = \"0.0.0.0:8883\"\nbackend = \"hub\"\n\
             [[backend]]\nname = \"hub\"\nservers = [{{ address = \"h.example:8883\" }}]\n\
             max_new_connections_per_sec = {rate}\n"
        )
    };
    std::fs::write(&paced, paced_config("90")).unwrap();
    let (ok, text) = run(&["check", "-c", paced.to_str().unwrap()]);
    assert!(
        ok && text.contains(
            "backend \"hub\": max_new_connections_per_sec = 90 (burst 9), connect_queue = 10000, queue_timeout_ms = 30000"
        ),
        "{text}"
    );
    std::fs::write(&paced, paced_config("0")).unwrap();
    let (ok, text) = run(&["check", "-c", paced.to_str().unwrap()]);
    assert!(
        !ok && text.contains("max_new_connections_per_sec = 0 is out of range")
            && text.contains("line 8"),
        "{text}"
    );

    for command in ["conns", "stats", "maps"] {
        let (ok, text) = run(&[command, "--instance", "no-such-agent"]);
        assert!(!ok, "{command} succeeded without an agent");
        assert!(
            text.contains("no agent maps are pinned"),
            "{command}: {text}"
        );
    }
}
