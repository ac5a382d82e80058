//! Retransmissions through the kernel splice. TCP queues a segment that partly repeats
//! bytes already received whole (its own reader skips the repeat by sequence number), and
//! the kernel hands the stream verdict whole segments: unless the verdict cuts the repeat,
//! the upstream gets those bytes twice. Under loss this is routine (a lost ACK, a
//! retransmission with other boundaries), so the test sends such a segment by hand from a
//! raw client in its own namespaces.

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use forwarder::config::{Backend, Config, Frontend, Mode};
use forwarder::metrics::{L4Metrics, get};
use forwarder_tests::agent::StartedAgent;
use forwarder_tests::netns::{FWD_V4, VethPair, in_ns, ip, spawn_in_ns, unique, wait_until};
use forwarder_tests::rawtcp::RawTcpClient;
use forwarder_tests::{random_payload, require_root, sha256};

const PORT: u16 = 8883;
const LIMIT: Duration = Duration::from_secs(10);

/// An upstream in `ns` that reads each connection to its end and hands over the bytes.
fn start_sink(ns: &str) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let listener = in_ns(ns, || {
        TcpListener::bind("127.0.0.1:0").expect("bind the sink")
    });
    let addr = listener.local_addr().expect("sink address");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(LIMIT));
                let mut got = Vec::new();
                let _ = stream.read_to_end(&mut got);
                let _ = tx.send(got);
            });
        }
    });
    (addr, rx)
}

/// The agent, spliced frontend on `FWD_V4:PORT`, running in `ns` until `stop` is sent.
fn start_agent(
    ns: &str,
    upstream: SocketAddr,
) -> (
    Arc<L4Metrics>,
    tokio::sync::oneshot::Sender<()>,
    thread::JoinHandle<()>,
) {
    let config = Config::new(
        format!("rtx-{}", unique()),
        vec![Frontend::new(
            "mqtt",
            SocketAddr::new(FWD_V4.into(), PORT),
            Mode::Splice,
            "up",
        )],
        vec![Backend::new("up", &upstream.to_string())],
    );
    let (metrics_tx, metrics_rx) = mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = spawn_in_ns(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let agent = StartedAgent::start(&config).await;
            assert!(agent.datapath.is_some(), "the kernel path must be loaded");
            metrics_tx
                .send(agent.l4(0).clone())
                .expect("hand over metrics");
            let _ = stopped.await;
        });
    });
    let metrics = metrics_rx.recv_timeout(LIMIT).expect("agent started");
    (metrics, stop, thread)
}

/// One connection's segments, as (first, end) byte offsets, in the order sent.
struct Case {
    sport: u16,
    /// Pause after the first segment: none leaves it (and the repeat) in the receive queue
    /// for the splice's hand-over; a long one lets the verdict meet the repeat on arrival.
    settle: Duration,
    segments: &'static [(usize, usize)],
}

impl Case {
    fn end(&self) -> usize {
        self.segments.iter().map(|s| s.1).max().unwrap_or(0)
    }

    /// Bytes sent again: what the verdict must cut.
    fn repeated(&self) -> u64 {
        let mut seen = 0;
        let mut repeated = 0;
        for &(first, end) in self.segments {
            repeated += seen.min(end).saturating_sub(first);
            seen = seen.max(end);
        }
        repeated as u64
    }
}

#[test]
fn a_retransmission_repeating_delivered_bytes_is_forwarded_once() {
    require_root();
    let pair = VethPair::new();
    // Large segments, as GRO builds them from a real NIC: a repeat above the 4,095 bytes one
    // `bpf_skb_adjust_room` call may cut takes several steps.
    for (ns, dev) in [(&pair.fwd_ns, &pair.fwd_if), (&pair.peer_ns, &pair.peer_if)] {
        ip(&["-n", ns, "link", "set", "dev", dev, "mtu", "65000"]);
    }
    let (upstream, received) = start_sink(&pair.fwd_ns);
    let (metrics, stop, agent) = start_agent(&pair.fwd_ns, upstream);
    let dest = SocketAddr::new(FWD_V4.into(), PORT);
    let cases = [
        // Bytes 400..800 again, as a sender whose ACK got lost would resend them.
        Case {
            sport: 40_001,
            settle: Duration::ZERO,
            segments: &[(0, 800), (400, 1200), (1200, 2000)],
        },
        Case {
            sport: 40_002,
            settle: Duration::from_millis(300),
            segments: &[(0, 800), (400, 1200), (1200, 2000)],
        },
        // 28,000 repeated bytes: seven cuts.
        Case {
            sport: 40_003,
            settle: Duration::from_millis(300),
            segments: &[(0, 30_000), (2_000, 40_000), (40_000, 50_000)],
        },
    ];
    for case in &cases {
        let payload = random_payload(case.end());
        let client = RawTcpClient::connect(&pair, dest, case.sport).expect("handshake");
        for (i, &(first, end)) in case.segments.iter().enumerate() {
            client
                .send_at(first as u32, &payload[first..end])
                .expect("send");
            if i == 0 {
                thread::sleep(case.settle);
            }
        }
        // A FIN before the splice is set up sends the connection down the userspace path.
        thread::sleep(Duration::from_millis(300));
        client.send_fin(case.end() as u32).expect("send");
        let got = received
            .recv_timeout(LIMIT)
            .expect("the upstream got a stream");
        assert_eq!(
            got.len(),
            payload.len(),
            "bytes at the upstream (case {})",
            case.sport
        );
        assert_eq!(sha256(&got), sha256(&payload), "content at the upstream");
    }

    assert!(
        wait_until(LIMIT, || get(&metrics.active) == 0),
        "every connection ends"
    );
    assert_eq!(
        get(&metrics.kernel_spliced),
        cases.len() as u64,
        "spliced in the kernel"
    );
    assert_eq!(
        get(&metrics.userspace_payload_bytes),
        0,
        "no byte crossed userspace"
    );
    assert_eq!(
        get(&metrics.retransmit_overlap_bytes),
        cases.iter().map(Case::repeated).sum::<u64>(),
        "the verdict cut each repeat"
    );
    assert_eq!(get(&metrics.kernel_duplicated_bytes), 0);
    assert_eq!(get(&metrics.kernel_stream_errors), 0);
    let _ = stop.send(());
    agent.join().expect("agent thread");
}
