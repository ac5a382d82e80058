//! Pacing of new upstream connections per backend (`max_new_connections_per_sec`), end to
//! end: a real agent with its eBPF splice, real device and upstream sockets on loopback.
//! A reconnect storm reaches the upstream at the configured rate and every device is
//! served; devices beyond the queue, or whose slot is too far away, are refused at once
//! and counted in `forwarder stats` and on `/metrics`.
//!
//! These tests live apart from `l4.rs` because they measure time: bulk transfers running
//! in parallel in the same process would only add noise to the accept times.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use forwarder::agent::{self, RunOptions};
use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::inspect::{self, Pinned};
use forwarder::metrics::{BackendMetrics, get};
use forwarder_tests::agent::StartedAgent;
use forwarder_tests::peers::{free_port, scratch_dir};
use forwarder_tests::{raise_fd_limit, require_root};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};

/// Longest a device waits for its echo (or its refusal) before the test fails.
const LIMIT: Duration = Duration::from_secs(60);

/// An echo upstream that records when it accepted each connection. It accepts on its own
/// OS thread (blocking accept), so the times are not skewed by the test's busy workers.
struct RecordingEcho {
    addr: SocketAddr,
    accepted: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for RecordingEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn recording_echo() -> RecordingEcho {
    // A deep accept queue: the test must see the pacing, not its own backlog.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(4096).unwrap().into_std().unwrap();
    listener.set_nonblocking(false).unwrap();
    set_accept_timeout(&listener, Duration::from_millis(100));
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
    let (times, stopped) = (accepted.clone(), stop.clone());
    std::thread::spawn(move || {
        if !run_at_realtime_priority() {
            println!("accept thread: no real-time priority; timestamps may lag under load");
        }
        while !stopped.load(Ordering::Relaxed) {
            // Times out every 100 ms (SO_RCVTIMEO) to look at the stop flag.
            if let Ok((stream, _)) = listener.accept() {
                times.lock().unwrap().push(Instant::now());
                let _ = tx.send(stream);
            }
        }
    });
    tokio::spawn(async move {
        while let Some(stream) = rx.recv().await {
            stream.set_nonblocking(true).unwrap();
            let stream = TcpStream::from_std(stream).unwrap();
            tokio::spawn(echo(stream));
        }
    });
    RecordingEcho {
        addr,
        accepted,
        stop,
    }
}

/// SCHED_FIFO for the calling thread, so that on a busy 2-core machine an accept is
/// timestamped when the connection arrives rather than when the thread gets a core. The
/// thread only accepts and hands over: it cannot hog a core.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn run_at_realtime_priority() -> bool {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: changes the calling thread's scheduling policy; reads `param` only.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) == 0 }
}

/// SO_RCVTIMEO on a listener bounds a blocking accept(2).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn set_accept_timeout(listener: &std::net::TcpListener, timeout: Duration) {
    use std::os::fd::AsRawFd as _;
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: libc::suseconds_t::try_from(timeout.as_micros()).unwrap(),
    };
    // SAFETY: setsockopt reads `tv`, which outlives the call; the fd is the listener's.
    let rc = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&tv).cast(),
            libc::socklen_t::try_from(std::mem::size_of_val(&tv)).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO on the listener");
}

/// Echoes until EOF, then closes.
async fn echo(stream: TcpStream) {
    let (mut r, mut w) = stream.into_split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// A plain echo upstream (no timing).
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    addr
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Got its message echoed, closed, saw the upstream's EOF.
    Served,
    /// The forwarder closed it without an answer.
    Refused,
}

/// One device: connects, sends a message at once (before any upstream exists, as MQTT's
/// CONNECT does), waits for the echo, closes. Returns what happened and when (since
/// `since`).
async fn device(addr: SocketAddr, id: u64, since: Instant) -> (Outcome, Duration) {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("device {id}: the frontend must accept: {e}"));
    let message = id.to_be_bytes();
    if stream.write_all(&message).await.is_err() {
        return (Outcome::Refused, since.elapsed());
    }
    let mut answer = [0u8; 8];
    match tokio::time::timeout(LIMIT, stream.read_exact(&mut answer)).await {
        Err(_) => panic!("device {id}: neither served nor refused within {LIMIT:?}"),
        Ok(Err(_)) => return (Outcome::Refused, since.elapsed()),
        Ok(Ok(_)) => {}
    }
    let served = since.elapsed();
    assert_eq!(answer, message, "device {id}: wrong echo");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, stream.read_to_end(&mut rest))
        .await
        .unwrap_or_else(|_| panic!("device {id}: no EOF after the echo"))
        .unwrap_or_else(|e| panic!("device {id}: reading to EOF: {e}"));
    assert!(rest.is_empty(), "device {id}: bytes after the echo");
    (Outcome::Served, served)
}

/// `n` devices connecting at once.
async fn storm(addr: SocketAddr, n: u64, since: Instant) -> Vec<(Outcome, Duration)> {
    let tasks: Vec<_> = (0..n)
        .map(|id| tokio::spawn(device(addr, id, since)))
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    outcomes
}

/// The most times inside any closed window `[t, t + width]`.
fn max_in_window(times: &[Instant], width: Duration) -> usize {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mut first = 0;
    let mut best = 0;
    for last in 0..sorted.len() {
        while sorted[last] - sorted[first] > width {
            first += 1;
        }
        best = best.max(last - first + 1);
    }
    best
}

/// How many times fall in each whole second after the first one.
fn per_second(times: &[Instant]) -> Vec<usize> {
    let Some(first) = times.iter().min() else {
        return Vec::new();
    };
    let mut counts = Vec::new();
    for t in times {
        let second = usize::try_from((*t - *first).as_secs()).unwrap();
        if counts.len() <= second {
            counts.resize(second + 1, 0);
        }
        counts[second] += 1;
    }
    counts
}

/// Samples the pool's queue gauge every 5 ms until told to stop; returns the highest
/// value seen.
fn watch_peak(
    pool: Arc<forwarder::l4::upstream::Pool>,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut peak = 0;
        while !stopped.load(Ordering::Relaxed) {
            peak = peak.max(get(&pool.metrics.connect_queue_depth));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        peak
    });
    (stop, task)
}

fn paced_backend(name: &str, upstream: SocketAddr, rate: u32) -> Backend {
    let mut backend = Backend::new(name, &upstream.to_string());
    backend.max_new_connections_per_sec = Some(rate);
    backend
}

/// An agent with one splice frontend in front of `upstream`, paced at `rate` per second.
async fn paced_agent(upstream: SocketAddr, rate: u32) -> StartedAgent {
    let config = Config::new(
        format!("pacing-storm-{}", std::process::id()),
        vec![Frontend::new(
            "storm",
            "127.0.0.1:0".parse().unwrap(),
            Mode::Splice,
            "hub",
        )],
        vec![paced_backend("hub", upstream, rate)],
    );
    let agent = StartedAgent::start(&config).await;
    assert!(agent.datapath.is_some(), "the kernel path must be loaded");
    agent
}

/// What the upstream saw: (accepts in the busiest 1 s window, first to last accept).
fn upstream_figures(accepted: &[Instant]) -> (usize, Duration) {
    let (Some(first), Some(last)) = (accepted.iter().min(), accepted.iter().max()) else {
        return (0, Duration::ZERO);
    };
    (
        max_in_window(accepted, Duration::from_secs(1)),
        last.duration_since(*first),
    )
}

/// 2,000 devices connect at once to a splice frontend whose backend allows 500 new
/// connections per second (burst 50): the upstream sees at most 550 accepts in any one
/// second (sliding window), spread over about 3.9 s, and every device is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_2000_devices_reaches_the_upstream_at_the_paced_rate() {
    require_root();
    let fds = raise_fd_limit();
    assert!(
        fds >= 9_000,
        "2,000 devices need about 8,000 descriptors here (client, agent x2, upstream); the hard limit is {fds}"
    );
    let upstream = recording_echo();
    let agent = paced_agent(upstream.addr, 500).await;
    let addr: SocketAddr = ([127, 0, 0, 1], agent.port(0)).into();
    let pool = agent.running[0].pools[0].clone();
    let pacing = pool.pacing().expect("the backend's pool is paced");
    assert_eq!((pacing.rate_per_sec, pacing.burst()), (500, 50));
    let (stop_watch, peak) = watch_peak(pool.clone());

    let started = Instant::now();
    let outcomes = tokio::time::timeout(LIMIT, storm(addr, 2_000, started))
        .await
        .expect("the storm is served within the limit");
    let total = started.elapsed();
    stop_watch.store(true, Ordering::Relaxed);
    let peak = peak.await.unwrap();
    let accepted = upstream.accepted.lock().unwrap().clone();
    let served = outcomes.iter().filter(|(o, _)| *o == Outcome::Served);
    let (served, (max_second, span)) = (served.count(), upstream_figures(&accepted));
    let m = &pool.metrics;
    println!(
        "storm: {served} of 2000 served in {total:.2?}; upstream accepts: {} over {span:.2?}, \
         at most {max_second} in any 1 s window, per second {:?}; paced {}, refused full {} / \
         timeout {}, peak queue {peak}",
        accepted.len(),
        per_second(&accepted),
        get(&m.connects_paced),
        get(&m.connects_refused_queue_full),
        get(&m.connects_refused_queue_timeout),
    );
    assert_eq!(served, 2_000, "every device must be served");
    assert_eq!(accepted.len(), 2_000, "one upstream connection per device");
    assert!(
        max_second <= 550,
        "{max_second} upstream connects in one second: the hub would throttle"
    );
    // Meaningful only if the devices really came at once and pacing spread them: the
    // schedule puts the last connect 3.9 s after the first.
    assert!(
        span >= Duration::from_millis(3_500),
        "upstream accepts spanned only {span:?}"
    );
    assert_pacing_counters(m, 2_000, 1_500, peak);
    let l4 = agent.l4(0);
    assert_eq!(
        get(&l4.kernel_spliced),
        2_000,
        "every device spliced in the kernel"
    );
    assert_eq!(get(&l4.upstream_connect_failed), 0);
}

/// After the storm: all connects made, most of them paced, none refused, queue empty.
fn assert_pacing_counters(m: &BackendMetrics, connects: u64, min_paced: u64, peak: u64) {
    assert_eq!(get(&m.connects), connects);
    assert!(
        get(&m.connects_paced) >= min_paced,
        "only {} connects waited for a slot",
        get(&m.connects_paced)
    );
    assert_eq!(get(&m.connects_refused_queue_full), 0);
    assert_eq!(get(&m.connects_refused_queue_timeout), 0);
    assert_eq!(get(&m.connect_queue_depth), 0, "the queue must be empty");
    assert!(peak >= 1_000, "the queue held at most {peak} devices");
}

/// The agent as `forwarder run -c FILE` runs it (admin server, stats publishing).
struct RunningAgent {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

async fn run_agent(path: &Path) -> RunningAgent {
    let config = Config::load(path).expect("valid config");
    let (stop, stopped) = watch::channel(false);
    let (_reload, reloads) = mpsc::channel(1);
    let options = RunOptions {
        config_path: Some(path.to_owned()),
        drain_deadline: Some(Duration::from_secs(5)),
        ..Default::default()
    };
    let task = tokio::spawn(agent::run(config, options, stopped, reloads));
    RunningAgent { stop, task }
}

/// GET on the admin address; `None` until it listens.
async fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_for_metrics(admin: u16, what: &str, wanted: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = http_get(admin, "/metrics").await.unwrap_or_default();
        if wanted.iter().all(|w| text.contains(w)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write_queue_config(path: &Path, instance: &str, admin: u16, ports: [u16; 2], up: SocketAddr) {
    let [full, late] = ports;
    let text = format!(
        "instance = \"{instance}\"\nadmin = \"127.0.0.1:{admin}\"\n\
         [[frontend]]\nname = \"full\"\nbind = \"127.0.0.1:{full}\"\nbackend = \"full\"\n\
         [[frontend]]\nname = \"late\"\nbind = \"127.0.0.1:{late}\"\nbackend = \"late\"\n\
         [[backend]]\nname = \"full\"\nservers = [{{ address = \"{up}\" }}]\n\
         max_new_connections_per_sec = 1\nconnect_queue = 5\n\
         [[backend]]\nname = \"late\"\nservers = [{{ address = \"{up}\" }}]\n\
         max_new_connections_per_sec = 2\nqueue_timeout_ms = 1200\n"
    );
    std::fs::write(path, text).unwrap();
}

/// Served and refused devices of one storm; refused ones must have been refused at once.
fn tally(outcomes: &[(Outcome, Duration)], frontend: &str) -> (usize, usize, Duration) {
    let served = outcomes.iter().filter(|(o, _)| *o == Outcome::Served);
    let last_served = served.clone().map(|(_, t)| *t).max().unwrap_or_default();
    let refused: Vec<Duration> = outcomes
        .iter()
        .filter(|(o, _)| *o == Outcome::Refused)
        .map(|(_, t)| *t)
        .collect();
    let slowest_refusal = refused.iter().max().copied().unwrap_or_default();
    println!(
        "{frontend}: {} served (last after {last_served:.2?}), {} refused (slowest refusal after {slowest_refusal:.2?})",
        served.count(),
        refused.len()
    );
    assert!(
        slowest_refusal < Duration::from_millis(450),
        "{frontend}: a refused device waited {slowest_refusal:?}: refusals must come at once"
    );
    (outcomes.len() - refused.len(), refused.len(), last_served)
}

/// Rate 1/s with a queue of 5: of 20 devices at once, one goes at once, five wait (their
/// slots 1 to 5 s away) and fourteen are refused at once. Rate 2/s with a queue timeout of
/// 1.2 s: one goes at once, two wait (0.5 s and 1 s), seventeen are refused at once. The
/// counters show in `forwarder stats` (table and JSON) and on `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_beyond_the_queue_or_its_timeout_are_refused_and_counted() {
    require_root();
    raise_fd_limit();
    let dir = scratch_dir("pacing-queue");
    let instance = format!("pacing-queue-{}", std::process::id());
    let (admin, ports) = (free_port(), [free_port(), free_port()]);
    let path = dir.join("forwarder.toml");
    write_queue_config(&path, &instance, admin, ports, echo_upstream().await);
    let agent = run_agent(&path).await;
    // The admin server starts once every frontend is bound (probing a frontend would
    // take a slot).
    wait_for_metrics(admin, "the agent", &["forwarder_backend_connects_total"]).await;

    let started = Instant::now();
    let full = tokio::spawn(storm(([127, 0, 0, 1], ports[0]).into(), 20, started));
    let late = tokio::spawn(storm(([127, 0, 0, 1], ports[1]).into(), 20, started));
    // While the first slots are still ahead: the queue gauges hold the waiting devices.
    wait_for_metrics(
        admin,
        "the queues",
        &[
            "forwarder_backend_connect_queue_depth{backend=\"full\"} 5",
            "forwarder_backend_connects_refused_queue_full_total{backend=\"full\"} 14",
            "forwarder_backend_connects_refused_queue_timeout_total{backend=\"late\"} 17",
        ],
    )
    .await;
    let full = tokio::time::timeout(LIMIT, full).await.unwrap().unwrap();
    let late = tokio::time::timeout(LIMIT, late).await.unwrap().unwrap();
    let (served, refused, last) = tally(&full, "full");
    assert_eq!((served, refused), (6, 14));
    assert!(
        last >= Duration::from_millis(4_900),
        "5 paced slots at 1/s, last after {last:?}"
    );
    let (served, refused, last) = tally(&late, "late");
    assert_eq!((served, refused), (3, 17));
    assert!(
        last >= Duration::from_millis(950),
        "2 paced slots at 2/s, last after {last:?}"
    );

    assert_stats_show_pacing(&instance).await;
    assert_metrics_show_pacing(admin).await;
    agent.stop.send(true).unwrap();
    tokio::time::timeout(LIMIT, agent.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `/metrics` once every device is done: the queues are empty, the counters final.
async fn assert_metrics_show_pacing(admin: u16) {
    let metrics = wait_for_metrics(
        admin,
        "the final counters",
        &[
            "# TYPE forwarder_backend_connect_queue_depth gauge",
            "forwarder_backend_connect_queue_depth{backend=\"full\"} 0",
            "forwarder_backend_connect_queue_depth{backend=\"late\"} 0",
            "forwarder_backend_connects_paced_total{backend=\"full\"} 5",
            "forwarder_backend_connects_paced_total{backend=\"late\"} 2",
            "forwarder_backend_connects_total{backend=\"late\"} 3",
        ],
    )
    .await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
}

/// `forwarder stats` (from the pinned maps, published every second), table and JSON.
async fn assert_stats_show_pacing(instance: &str) {
    let pinned = Pinned::open(instance).expect("maps pinned while the agent runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    let expected = [
        ("backend:full", "connects", 6),
        ("backend:full", "connects_paced", 5),
        ("backend:full", "connects_refused_queue_full", 14),
        ("backend:full", "connects_refused_queue_timeout", 0),
        ("backend:full", "connect_queue_depth", 0),
        ("backend:late", "connects", 3),
        ("backend:late", "connects_paced", 2),
        ("backend:late", "connects_refused_queue_timeout", 17),
        ("backend:late", "connects_refused_queue_full", 0),
    ];
    loop {
        let stats = inspect::stats(&pinned);
        let seen = |b: &str, c: &str| stats.get(b).and_then(|m| m.get(c)).copied();
        if expected.iter().all(|(b, c, v)| seen(b, c) == Some(*v)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed {expected:?}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut table = Vec::new();
    inspect::print_stats(&pinned, false, &mut table).unwrap();
    let table = String::from_utf8(table).unwrap();
    assert!(
        table.contains("backend full")
            && table.contains("connects_refused_queue_full")
            && table.contains("connect_queue_depth"),
        "{table}"
    );
    let mut json = Vec::new();
    inspect::print_stats(&pinned, true, &mut json).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(
        json["frontends"]["backend:late"]["connects_refused_queue_timeout"], 17,
        "{json}"
    );
}
