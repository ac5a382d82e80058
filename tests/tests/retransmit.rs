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
use forwarder_tests::netns::{FWD_V4, VethPair, in_ns, spawn_in_ns, unique, wait_until};
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
    let config = Config {
        instance: format!("rtx-{}", unique()),
        frontends: vec![Frontend::new(
            "mqtt",
            SocketAddr::new(FWD_V4.into(), PORT),
            Mode::Splice,
            "up",
        )],
        backends: vec![Backend::new("up", &upstream.to_string())],
        xdp: None,
        admin: None,
    };
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

#[test]
fn a_retransmission_repeating_delivered_bytes_is_forwarded_once() {
    require_root();
    let pair = VethPair::new();
    let (upstream, received) = start_sink(&pair.fwd_ns);
    let (metrics, stop, agent) = start_agent(&pair.fwd_ns, upstream);
    let dest = SocketAddr::new(FWD_V4.into(), PORT);
    // Segments stay under the veth's 1,500-byte MTU.
    let payload = random_payload(2000);

    // The repeating segment right behind the first (both may still wait in the receive
    // queue for the splice), then on a second connection well after the splice (the
    // verdict meets it on arrival).
    let cases = [
        (40_001, Duration::ZERO),
        (40_002, Duration::from_millis(300)),
    ];
    for (sport, settle) in cases {
        let client = RawTcpClient::connect(&pair, dest, sport).expect("handshake");
        client.send_at(0, &payload[..800]).expect("send");
        thread::sleep(settle);
        // Bytes 400..800 again, as a sender whose ACK got lost would resend them.
        client.send_at(400, &payload[400..1200]).expect("send");
        client.send_at(1200, &payload[1200..]).expect("send");
        // A FIN before the splice is set up sends the connection down the userspace path.
        thread::sleep(Duration::from_millis(300));
        client.send_fin(2000).expect("send");
        let got = received
            .recv_timeout(LIMIT)
            .expect("the upstream got a stream");
        assert_eq!(
            got.len(),
            payload.len(),
            "bytes at the upstream (case {sport})"
        );
        assert_eq!(sha256(&got), sha256(&payload), "content at the upstream");
    }

    assert!(
        wait_until(LIMIT, || get(&metrics.active) == 0),
        "both connections end"
    );
    assert_eq!(get(&metrics.kernel_spliced), 2, "spliced in the kernel");
    assert_eq!(
        get(&metrics.userspace_payload_bytes),
        0,
        "no byte crossed userspace"
    );
    assert_eq!(
        get(&metrics.retransmit_overlap_bytes),
        2 * 400,
        "the verdict cut each repeat"
    );
    assert_eq!(get(&metrics.kernel_duplicated_bytes), 0);
    assert_eq!(get(&metrics.kernel_stream_errors), 0);
    let _ = stop.send(());
    agent.join().expect("agent thread");
}
