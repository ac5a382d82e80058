//! The L4 passthrough path end to end: a real listener, real upstream servers on
//! loopback, the real eBPF splice (and the userspace path, for the same suite). Every
//! test checks every byte arrives once and in order (SHA-256 both ways).

use std::sync::Arc;
use std::time::{Duration, Instant};

use forwarder::admission::{AgentCap, Gate};
use forwarder::ebpf::{Datapath, LoadOptions};
use forwarder::l4::upstream::{Pool, Server};
use forwarder::l4::{L4Frontend, SessionOptions, serve};
use forwarder::metrics::{L4Metrics, get};
use forwarder_tests::{random_payload, require_root, sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const LIMIT: Duration = Duration::from_secs(60);

struct Proxy {
    addr: std::net::SocketAddr,
    metrics: Arc<L4Metrics>,
    datapath: Option<Arc<Datapath>>,
    _stop: watch::Sender<bool>,
}

fn datapath() -> Arc<Datapath> {
    require_root();
    Arc::new(
        Datapath::load(&LoadOptions::default())
            .expect("eBPF must load: these tests never fall back"),
    )
}

async fn start_proxy(upstream: &str, kernel: bool, session: SessionOptions) -> Proxy {
    start_proxy_with_connect_timeout(upstream, kernel, session, Duration::from_secs(2)).await
}

async fn start_proxy_with_connect_timeout(
    upstream: &str,
    kernel: bool,
    session: SessionOptions,
    connect_timeout: Duration,
) -> Proxy {
    start_proxy_on(upstream, kernel.then(datapath), session, connect_timeout).await
}

/// A proxy that splices with `datapath` (`None`: userspace only).
async fn start_proxy_on(
    upstream: &str,
    datapath: Option<Arc<Datapath>>,
    session: SessionOptions,
    connect_timeout: Duration,
) -> Proxy {
    let kernel = datapath.is_some();
    let pool = Arc::new(Pool::new(
        "test",
        vec![Server {
            address: upstream.to_string(),
            weight: 1,
        }],
        connect_timeout,
    ));
    let frontend = Arc::new(L4Frontend {
        name: "test".into(),
        sni_routes: Default::default(),
        default_backend: Some(pool),
        session,
        kernel,
        client_hello_timeout: Duration::from_secs(5),
        keepalive: None,
        gate: Gate::new("test", 100_000, AgentCap::new(100_000), None),
        original_destination: None,
    });
    let listener = forwarder::listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(L4Metrics::default());
    let (stop, rx) = watch::channel(false);
    tokio::spawn(serve(
        listener,
        frontend,
        datapath.clone(),
        metrics.clone(),
        rx,
    ));
    Proxy {
        addr,
        metrics,
        datapath,
        _stop: stop,
    }
}

async fn read_to_end(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut out))
        .await
        .unwrap_or_else(|_| panic!("no EOF within {LIMIT:?} after {} bytes", out.len()))
        .expect("read to EOF");
    out
}

/// Waits until a condition on the metrics holds (the proxy finishes a connection
/// asynchronously after the peers are done).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fresh upstream listener and a proxy in front of it.
async fn proxy_to_new_upstream(kernel: bool, session: SessionOptions) -> (TcpListener, Proxy) {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = start_proxy(&server.local_addr().unwrap().to_string(), kernel, session).await;
    (server, proxy)
}

/// Client sends `up` right after connecting and half-closes; the server reads to EOF
/// (so the FIN came after every byte), then answers `down` and closes. Returns (bytes at
/// the server, bytes at the client).
async fn client_first_exchange(
    server: TcpListener,
    proxy: &Proxy,
    up: &[u8],
    down: Vec<u8>,
) -> (Vec<u8>, Vec<u8>) {
    let server_task = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let got = read_to_end(&mut s).await;
        s.write_all(&down).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(up).await.unwrap();
    client.shutdown().await.unwrap();
    let at_client = read_to_end(&mut client).await;
    (server_task.await.unwrap(), at_client)
}

fn paths() -> [bool; 2] {
    [true, false]
}

/// Client speaks first, sends right after connect (bytes queued before the splice),
/// half-closes; the server reads to EOF (so the FIN came after every byte), then answers
/// and closes. Large payloads both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_first_half_close() {
    for kernel in paths() {
        let (server, proxy) = proxy_to_new_upstream(kernel, SessionOptions::default()).await;
        let up = random_payload(24 << 20);
        let down = random_payload(16 << 20);
        let (at_server, at_client) = client_first_exchange(server, &proxy, &up, down.clone()).await;
        assert!(
            sha256(&at_server) == sha256(&up),
            "kernel={kernel}: client->server bytes differ ({} of {})",
            at_server.len(),
            up.len()
        );
        assert!(
            sha256(&at_client) == sha256(&down),
            "kernel={kernel}: server->client bytes differ ({} of {})",
            at_client.len(),
            down.len()
        );
        expect_path(&proxy, kernel).await;
    }
}

/// The upstream speaks first (greeting before the client sends anything, often before
/// the splice is set up), then the client half-closes first in the other direction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_then_half_close_from_server() {
    for kernel in paths() {
        let (server, proxy) = proxy_to_new_upstream(kernel, SessionOptions::default()).await;
        let greeting = random_payload(53);
        let down = random_payload(8 << 20);
        let up = random_payload(8 << 20);
        let (greeting_s, down_s) = (greeting.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            s.write_all(&greeting_s).await.unwrap();
            s.write_all(&down_s).await.unwrap();
            s.shutdown().await.unwrap();
            read_to_end(&mut s).await
        });
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let at_client = read_to_end(&mut client).await;
        let mut expected = greeting.clone();
        expected.extend_from_slice(&down);
        assert!(
            sha256(&at_client) == sha256(&expected),
            "kernel={kernel}: server-first bytes differ"
        );
        // The server half-closed; the client can still send the other way.
        client.write_all(&up).await.unwrap();
        client.shutdown().await.unwrap();
        let at_server = server_task.await.unwrap();
        assert!(
            sha256(&at_server) == sha256(&up),
            "kernel={kernel}: bytes after half-close differ"
        );
        expect_path(&proxy, kernel).await;
    }
}

/// Thousands of tiny writes with no pause, both ways at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_small_writes_both_ways() {
    for kernel in paths() {
        let (server, proxy) = proxy_to_new_upstream(kernel, SessionOptions::default()).await;
        let up = random_payload(300_000);
        let down = random_payload(300_000);
        let down_s = down.clone();
        let server_task = tokio::spawn(async move {
            let (s, _) = server.accept().await.unwrap();
            let (mut r, mut w) = s.into_split();
            let writer = tokio::spawn(async move {
                for chunk in down_s.chunks(29) {
                    w.write_all(chunk).await.unwrap();
                }
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            tokio::time::timeout(LIMIT, r.read_to_end(&mut got))
                .await
                .unwrap()
                .unwrap();
            writer.await.unwrap();
            got
        });
        let client = TcpStream::connect(proxy.addr).await.unwrap();
        client.set_nodelay(true).unwrap();
        let (mut r, mut w) = client.into_split();
        let up_c = up.clone();
        let writer = tokio::spawn(async move {
            for chunk in up_c.chunks(31) {
                w.write_all(chunk).await.unwrap();
            }
            w.shutdown().await.unwrap();
        });
        let mut at_client = Vec::new();
        tokio::time::timeout(LIMIT, r.read_to_end(&mut at_client))
            .await
            .unwrap()
            .unwrap();
        writer.await.unwrap();
        let at_server = server_task.await.unwrap();
        assert!(
            sha256(&at_server) == sha256(&up),
            "kernel={kernel}: small writes up differ"
        );
        assert!(
            sha256(&at_client) == sha256(&down),
            "kernel={kernel}: small writes down differ"
        );
        expect_path(&proxy, kernel).await;
    }
}

/// A reset from either side reaches the other side promptly, and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_from_each_side_is_passed_on() {
    for kernel in paths() {
        for reset_by_client in [true, false] {
            let (server, proxy) = proxy_to_new_upstream(kernel, SessionOptions::default()).await;
            let mut client = TcpStream::connect(proxy.addr).await.unwrap();
            let (mut s, _) = server.accept().await.unwrap();
            client.write_all(b"hello").await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            let (resetter, mut survivor) = if reset_by_client {
                (client, s)
            } else {
                (s, client)
            };
            #[allow(deprecated)] // blocking on drop is what we want: an immediate RST
            resetter.set_linger(Some(Duration::ZERO)).unwrap();
            drop(resetter);
            let mut rest = Vec::new();
            // EOF or ECONNRESET: either ends the survivor's read; only a hang fails.
            let _ = tokio::time::timeout(Duration::from_secs(10), survivor.read_to_end(&mut rest))
                .await
                .unwrap_or_else(|_| panic!("kernel={kernel} client_reset={reset_by_client}: survivor never learned of the reset"));
            assert!(rest.is_empty(), "no stray bytes after a reset");
            let m = proxy.metrics.clone();
            eventually("reset counted and connection closed", || {
                get(&m.resets) == 1 && get(&m.active) == 0
            })
            .await;
            // A reset takes no sequence number, unlike a FIN: the accounting must know.
            assert_eq!(
                get(&m.kernel_duplicated_bytes),
                0,
                "false alarm after a reset"
            );
            assert_no_leaks(&proxy);
        }
    }
}

/// A side that half-closed and then resets: its socket is no longer read, but the reset
/// must still reach the other side at once, not at the idle session's next look (which
/// backs off to tens of seconds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_after_a_half_close_is_passed_on_at_once() {
    for kernel in paths() {
        let (server, proxy) = proxy_to_new_upstream(kernel, SessionOptions::default()).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut s, _) = server.accept().await.unwrap();
        client.write_all(b"hello").await.unwrap();
        // The bytes arrived, so the connection is set up (spliced on the kernel path).
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        client.shutdown().await.unwrap();
        assert!(
            read_to_end(&mut s).await.is_empty(),
            "kernel={kernel}: FIN passed on"
        );
        // Long enough for the idle session to sleep for seconds.
        tokio::time::sleep(Duration::from_secs(6)).await;
        #[allow(deprecated)] // blocking on drop is what we want: an immediate RST
        client.set_linger(Some(Duration::ZERO)).unwrap();
        drop(client);
        let started = Instant::now();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut rest))
            .await
            .unwrap_or_else(|_| panic!("kernel={kernel}: the server never learned of the reset"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "kernel={kernel}: reset passed on after {:?}",
            started.elapsed()
        );
        let m = proxy.metrics.clone();
        eventually("reset counted and connection closed", || {
            get(&m.resets) == 1 && get(&m.active) == 0
        })
        .await;
    }
}

/// Upstream refuses: the client is closed promptly and the failure counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_closes_client_and_counts() {
    for kernel in paths() {
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        let proxy = start_proxy(&dead, kernel, SessionOptions::default()).await;
        let started = Instant::now();
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let got = read_to_end(&mut client).await;
        assert!(got.is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "client must be closed promptly"
        );
        let m = proxy.metrics.clone();
        eventually("connect failure counted", || {
            get(&m.upstream_connect_failed) == 1
        })
        .await;
    }
}

/// Upstream never answers the SYN (full accept queue): the connect timeout closes the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connect_timeout_closes_client() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    let _silent = socket.listen(0).unwrap();
    // Fill the accept queue so further SYNs are dropped.
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = start_proxy(&addr.to_string(), true, SessionOptions::default()).await;
    let started = Instant::now();
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let got = read_to_end(&mut client).await;
    assert!(got.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(6),
        "closed after {waited:?}, expected the 2 s connect timeout"
    );
    assert_eq!(get(&proxy.metrics.upstream_connect_failed), 1);
}

/// A connection with no traffic is closed after the idle timeout, on both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_both_sides() {
    for kernel in paths() {
        let session = SessionOptions {
            idle_timeout: Duration::from_millis(800),
            ..Default::default()
        };
        let (server, proxy) = proxy_to_new_upstream(kernel, session).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut s, _) = server.accept().await.unwrap();
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).await.unwrap();
        let started = Instant::now();
        let at_client = read_to_end(&mut client).await;
        let at_server = read_to_end(&mut s).await;
        assert!(at_client.is_empty() && at_server.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(700) && waited < Duration::from_secs(5),
            "kernel={kernel}: idle close after {waited:?}"
        );
        let m = proxy.metrics.clone();
        eventually("idle timeout counted", || get(&m.idle_timeouts) == 1).await;
        assert_no_leaks(&proxy);
    }
}

/// A spliced connection's payload never crosses userspace: the agent's own counter of
/// bytes it read stays zero while the kernel counters equal the traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spliced_bytes_never_cross_userspace() {
    let (server, proxy) = proxy_to_new_upstream(true, SessionOptions::default()).await;
    let up = random_payload(32 << 20);
    let down = random_payload(32 << 20);
    let (at_server, at_client) = client_first_exchange(server, &proxy, &up, down.clone()).await;
    assert!(sha256(&at_server) == sha256(&up) && sha256(&at_client) == sha256(&down));
    let m = proxy.metrics.clone();
    eventually("connection finished", || get(&m.active) == 0).await;
    assert_eq!(get(&m.kernel_spliced), 1);
    assert_eq!(
        get(&m.bytes_up),
        up.len() as u64,
        "kernel counter equals bytes sent up"
    );
    assert_eq!(
        get(&m.bytes_down),
        down.len() as u64,
        "kernel counter equals bytes sent down"
    );
    assert_eq!(
        get(&m.userspace_payload_bytes),
        0,
        "the agent read payload bytes of a spliced connection"
    );
    assert_eq!(get(&m.userspace), 0);
    assert_no_leaks(&proxy);
}

/// The IoT shape: a device exchanging small messages. The kernel wakes pollers of a
/// spliced socket for every segment it redirects; the agent must not be among them. Its
/// session wakes for the hand-over, the FINs and the close, not for the 1,000 messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_messages_do_not_wake_the_agent() {
    const MESSAGES: usize = 1_000;
    let (server, proxy) = proxy_to_new_upstream(true, SessionOptions::default()).await;
    let echo = tokio::spawn(async move {
        let (mut s, _) = server.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.set_nodelay(true).unwrap();
    let m = proxy.metrics.clone();
    eventually("spliced", || get(&m.kernel_spliced) == 1).await;
    let supervisor = proxy.datapath.as_ref().unwrap().supervisor().unwrap();
    let dispatch_before = supervisor.wakeups();
    let mut reply = [0u8; 64];
    for i in 0..MESSAGES {
        let message = [i as u8; 64];
        client.write_all(&message).await.unwrap();
        tokio::time::timeout(LIMIT, client.read_exact(&mut reply))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(reply, message, "message {i} came back changed");
    }
    let during = get(&m.session_wakeups);
    let dispatch_during = supervisor.wakeups() - dispatch_before;
    client.shutdown().await.unwrap();
    assert!(read_to_end(&mut client).await.is_empty());
    echo.await.unwrap();
    eventually("connection finished", || get(&m.active) == 0).await;
    let total = get(&m.session_wakeups);
    println!(
        "session wake-ups: {during} during {MESSAGES} round trips, {total} in all; \
         dispatch wake-ups during: {dispatch_during}"
    );
    assert!(
        dispatch_during <= 3,
        "the supervisor woke {dispatch_during} times for {MESSAGES} messages"
    );
    assert!(
        during <= 3,
        "the agent woke {during} times for {MESSAGES} messages: it must not wake per message"
    );
    assert!(total <= 20, "{total} wake-ups for one short connection");
    assert_eq!(get(&m.userspace_payload_bytes), 0);
    assert_eq!(get(&m.bytes_up), (MESSAGES * 64) as u64);
    assert_no_leaks(&proxy);
}

async fn expect_path(proxy: &Proxy, kernel: bool) {
    let m = proxy.metrics.clone();
    eventually("connection finished", || get(&m.active) == 0).await;
    if kernel {
        assert_eq!(
            (get(&m.kernel_spliced), get(&m.userspace)),
            (1, 0),
            "must be spliced in the kernel"
        );
        assert_eq!(
            get(&m.kernel_duplicated_bytes),
            0,
            "the verdict saw more bytes than TCP received"
        );
        assert_eq!(
            get(&m.userspace_payload_bytes),
            0,
            "spliced bytes crossed userspace"
        );
    } else {
        assert_eq!(
            (get(&m.kernel_spliced), get(&m.userspace)),
            (0, 1),
            "must use the userspace path"
        );
    }
    assert_no_leaks(proxy);
}

fn assert_no_leaks(proxy: &Proxy) {
    if let Some(dp) = &proxy.datapath {
        assert_eq!(dp.entry_counts(), (0, 0, 0), "map entries left behind");
    }
}

fn max_redirected(dp: &Datapath) -> u64 {
    dp.all_counters()
        .iter()
        .map(|(_, c)| c.redirected_bytes)
        .max()
        .unwrap_or(0)
}

/// Bytes in a socket's receive queue (FIONREAD).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn bytes_waiting(stream: &TcpStream) -> u64 {
    use std::os::fd::AsRawFd as _;
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which outlives the call.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut queued) };
    assert_eq!(rc, 0, "FIONREAD failed");
    u64::try_from(queued).unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// 10,000 sequential and 1,000 concurrent connections through the kernel path leave no
/// map entries, no descriptors and no connection tasks behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_leaks_after_10000_sequential_and_1000_concurrent() {
    // A deep accept queue: 1,000 connects arrive at once, and under a loaded CI machine
    // the echo task may accept them slower than they come (a full queue drops SYNs).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = socket.listen(4096).unwrap();
    let server_addr = server.local_addr().unwrap().to_string();
    // Echo upstream: every connection gets its bytes back, then EOF.
    tokio::spawn(async move {
        while let Ok((s, _)) = server.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    // This test is about leaks, not about upstream capacity: give connects time.
    let proxy = start_proxy_with_connect_timeout(
        &server_addr,
        true,
        SessionOptions::default(),
        Duration::from_secs(15),
    )
    .await;
    let baseline_fds = open_fds();

    async fn one(addr: std::net::SocketAddr, i: u32) {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let msg = i.to_be_bytes();
        c.write_all(&msg).await.unwrap();
        // Wait for the echo before the FIN, like a device that talks before it leaves
        // (a FIN that beats the splice is served in userspace, by design).
        let mut echo = [0u8; 4];
        tokio::time::timeout(LIMIT, c.read_exact(&mut echo))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(echo, msg, "connection {i} echoed wrong bytes");
        c.shutdown().await.unwrap();
        assert!(read_to_end(&mut c).await.is_empty());
    }
    for i in 0..10_000u32 {
        one(proxy.addr, i).await;
    }
    let mut tasks = Vec::new();
    for i in 0..1_000u32 {
        tasks.push(tokio::spawn(one(proxy.addr, i)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = proxy.metrics.clone();
    eventually("every connection finished", || get(&m.active) == 0).await;
    assert_eq!(get(&m.accepted), 11_000);
    assert_eq!(get(&m.kernel_spliced) + get(&m.userspace), 11_000);
    println!(
        "kernel {} userspace {} (peers that close before the splice fall back)",
        get(&m.kernel_spliced),
        get(&m.userspace)
    );
    assert_eq!(
        get(&m.kernel_spliced),
        11_000,
        "every connection must be spliced"
    );
    assert_no_leaks(&proxy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds() > baseline_fds + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds() <= baseline_fds + 2,
        "descriptors leaked: {} now vs {baseline_fds}",
        open_fds()
    );
}

/// An upstream that stops reading must not make the kernel queue without limit: the
/// verdict stops at the lag budget and the direction pauses on the userspace path (TCP
/// flow control), the client is throttled; when the upstream reads again every byte
/// arrives in order, and once it has caught up the direction is back in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_bounded_then_resumes() {
    let session = SessionOptions {
        max_lag: 4 << 20,
        ..Default::default()
    };
    let (server, proxy) = proxy_to_new_upstream(true, session).await;
    let payload = random_payload(256 << 20);
    let expected = sha256(&payload);
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut upstream, _) = server.accept().await.unwrap();
    // The client sends 192 MiB, then (once the upstream has caught up and the direction is
    // back in the kernel) the last 64 MiB.
    let (caught_up, wait_for_catch_up) = tokio::sync::oneshot::channel::<()>();
    let first_part = 192 << 20;
    let writer = tokio::spawn(async move {
        client.write_all(&payload[..first_part]).await.unwrap();
        wait_for_catch_up.await.unwrap();
        client.write_all(&payload[first_part..]).await.unwrap();
        client.shutdown().await.unwrap();
        client
    });
    // The upstream reads nothing for a while: the client must stall, not fill the kernel.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let m = proxy.metrics.clone();
    assert_eq!(
        get(&m.diverted_slow_peer),
        1,
        "the lag bound must move the direction to userspace"
    );
    assert!(
        !writer.is_finished(),
        "the client was not throttled: 256 MiB went somewhere"
    );
    let dp = proxy.datapath.as_ref().unwrap();
    let (socks, _, _) = dp.entry_counts();
    assert_eq!(socks, 2);
    // The budget is enforced per segment in the verdict: what the kernel took in beyond
    // what reached the upstream is at most the budget, plus the forwarder's send buffer
    // (flow-controlled by TCP), plus one segment.
    let counters = dp.all_counters();
    let redirected = counters
        .iter()
        .map(|(_, c)| c.redirected_bytes)
        .max()
        .unwrap();
    assert_eq!(counters.iter().map(|(_, c)| c.over_budget).sum::<u64>(), 1);
    let at_upstream = bytes_waiting(&upstream);
    let send_buffer_max: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let overshoot = redirected.saturating_sub(at_upstream);
    println!(
        "redirected {redirected} B, at the upstream {at_upstream} B: {overshoot} B in between"
    );
    assert!(
        overshoot <= (4 << 20) + send_buffer_max + (256 << 10),
        "the kernel queued {overshoot} bytes for a stalled upstream (budget 4 MiB)"
    );
    let tcp_mem_pages: u64 = std::fs::read_to_string("/proc/net/sockstat")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "mem")
                .nth(1)
                .map(|v| v.parse().unwrap())
        })
        .unwrap();
    // Machine-wide, so other tests running in parallel add to it: shown, not asserted
    // (the per-connection bound above is the assertion).
    println!(
        "TCP memory (whole machine) while the upstream is stalled: {} KiB",
        tcp_mem_pages * 4
    );

    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let resumed = Instant::now();
    let mut caught_up = Some(caught_up);
    let mut redirected_at_resume = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), upstream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("upstream read failed after {} bytes: {e}", got.len()),
            Err(_) => panic!(
                "stalled: {} of {} bytes after {:?}, counters {:?}",
                got.len(),
                256 << 20,
                resumed.elapsed(),
                proxy.metrics.snapshot()
            ),
        }
        if got.len() == first_part
            && let Some(caught_up) = caught_up.take()
        {
            // The sender has paused and the upstream holds everything: the direction
            // must go back to the kernel path by itself.
            let m = proxy.metrics.clone();
            eventually("the direction resumes on the kernel path", || {
                get(&m.resumed_kernel) >= 1
            })
            .await;
            redirected_at_resume = Some(max_redirected(dp));
            caught_up.send(()).unwrap();
        }
    }
    println!("resumed and finished in {:?}", resumed.elapsed());
    let _client = writer.await.unwrap();
    assert_eq!(got.len(), 256 << 20);
    assert!(
        sha256(&got) == expected,
        "bytes after the stall arrived out of order or changed"
    );
    // After the resume the last part went through the kernel again.
    let redirected_after = max_redirected(dp) - redirected_at_resume.unwrap();
    println!("redirected in the kernel after the resume: {redirected_after} B");
    assert!(
        redirected_after > 0,
        "nothing was redirected after the resume: {:?}",
        proxy.metrics.snapshot()
    );
}

/// A full socket map is not an outage: with the link map at its entry limit, a new
/// connection is served in userspace, byte-exact, and counted as `fallback_map_full`;
/// once entries are free again, the next one is spliced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_map_falls_back_to_userspace_and_counts_it() {
    use aya::maps::{HashMap, Map, MapData};
    use forwarder_common::PeerLink;

    require_root();
    let pin_dir = forwarder::ebpf::pin_dir_for(&format!("l4-full-map-{}", std::process::id()));
    let datapath = Arc::new(
        Datapath::load(&LoadOptions {
            pin_dir: Some(pin_dir.clone()),
            adopt: false,
        })
        .expect("eBPF must load"),
    );
    let pinned = MapData::from_pin(pin_dir.join(forwarder_common::names::LINKS)).unwrap();
    let mut links: HashMap<MapData, u64, PeerLink> =
        HashMap::try_from(Map::HashMap(pinned)).unwrap();
    // Keys no socket cookie reaches (they count up from 1).
    let filler = |i: u32| u64::MAX - u64::from(i);
    let mut filled = 0;
    while links.insert(filler(filled), PeerLink::default(), 0).is_ok() {
        filled += 1;
    }
    assert_eq!(
        filled,
        forwarder_common::MAX_SPLICED_SOCKETS,
        "the map filled up"
    );

    // One listening socket for both connections (a copy of its descriptor each).
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listening.set_nonblocking(true).unwrap();
    let upstream = listening.local_addr().unwrap().to_string();
    let server = || TcpListener::from_std(listening.try_clone().unwrap()).unwrap();
    let proxy = start_proxy_on(
        &upstream,
        Some(datapath),
        SessionOptions::default(),
        Duration::from_secs(2),
    )
    .await;
    let (up, down) = (random_payload(256 * 1024), random_payload(128 * 1024));
    let (at_server, at_client) = client_first_exchange(server(), &proxy, &up, down.clone()).await;
    assert_eq!(sha256(&at_server), sha256(&up));
    assert_eq!(sha256(&at_client), sha256(&down));
    let m = proxy.metrics.clone();
    eventually("connection finished", || get(&m.active) == 0).await;
    assert_eq!(
        (
            get(&m.kernel_spliced),
            get(&m.userspace),
            get(&m.fallback_map_full)
        ),
        (0, 1, 1),
        "served in userspace and counted as a full map"
    );

    // Room for one pair again: the next connection is spliced.
    for i in 0..2 {
        links.remove(&filler(i)).unwrap();
    }
    let (at_server, at_client) = client_first_exchange(server(), &proxy, &up, down.clone()).await;
    assert_eq!(sha256(&at_server), sha256(&up));
    assert_eq!(sha256(&at_client), sha256(&down));
    eventually("second connection finished", || get(&m.active) == 0).await;
    assert_eq!(get(&m.kernel_spliced), 1, "spliced once the map had room");
    for i in 2..filled {
        let _ = links.remove(&filler(i));
    }
    assert_no_leaks(&proxy);
}
