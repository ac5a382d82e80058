//! Foundation: the agent's loader puts the real verdict program into the kernel and two
//! TCP connections are spliced there, both ways, byte for byte.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use forwarder::ebpf::{Datapath, LoadOptions, SplicedPair};
use forwarder_tests::*;

const PAYLOAD: usize = 64 << 20;

#[test]
fn kernel_splice_carries_64_mib_each_way_with_matching_counters() {
    require_root();
    let datapath = Datapath::load(&LoadOptions::default())
        .expect("eBPF must load: this test never falls back");

    // client <-> proxy_client_side, proxy_upstream_side <-> server
    let (mut client, proxy_client_side) = tcp_pair();
    let (mut server, proxy_upstream_side) = tcp_pair();

    // Bytes that arrive before the splice must not stall in the proxy sockets' queues.
    let early_from_client = random_payload(37);
    let early_from_server = random_payload(41);
    client.write_all(&early_from_client).unwrap();
    server.write_all(&early_from_server).unwrap();
    std::thread::sleep(Duration::from_millis(50));

    let pair = SplicedPair::of(proxy_client_side.as_fd(), proxy_upstream_side.as_fd())
        .expect("socket cookies");
    datapath
        .splice(
            pair,
            proxy_client_side.as_fd(),
            proxy_upstream_side.as_fd(),
            forwarder_common::NO_LIMIT,
        )
        .expect("splice both sockets in the kernel");

    let mut got = vec![0u8; 37];
    server
        .read_exact(&mut got)
        .expect("early client bytes reach the server");
    assert_eq!(got, early_from_client);
    let mut got = vec![0u8; 41];
    client
        .read_exact(&mut got)
        .expect("early server bytes reach the client");
    assert_eq!(got, early_from_server);

    let up = random_payload(PAYLOAD);
    let down = random_payload(PAYLOAD);
    let (up_hash, down_hash) = (sha256(&up), sha256(&down));

    let client_reader = client.try_clone().unwrap();
    let server_reader = server.try_clone().unwrap();
    let w1 = spawn_writer(client, up);
    let w2 = spawn_writer(server, down);
    let r1 = std::thread::spawn(move || {
        let mut s = server_reader;
        read_until_len(&mut s, PAYLOAD)
    });
    let r2 = std::thread::spawn(move || {
        let mut s = client_reader;
        read_until_len(&mut s, PAYLOAD)
    });
    w1.join().unwrap();
    w2.join().unwrap();
    let at_server = r1.join().unwrap();
    let at_client = r2.join().unwrap();
    assert_eq!(at_server.len(), PAYLOAD);
    assert_eq!(at_client.len(), PAYLOAD);
    assert!(
        sha256(&at_server) == up_hash,
        "client->server payload differs"
    );
    assert!(
        sha256(&at_client) == down_hash,
        "server->client payload differs"
    );

    let from_client = datapath.counters(pair.client).unwrap();
    let from_server = datapath.counters(pair.upstream).unwrap();
    println!("kernel counters: client side {from_client:?}, upstream side {from_server:?}");
    assert_eq!(from_client.redirected_bytes, (PAYLOAD + 37) as u64);
    assert_eq!(from_server.redirected_bytes, (PAYLOAD + 41) as u64);
    assert_eq!(
        from_client.passed_bytes, 0,
        "no byte may take the userspace path"
    );
    assert_eq!(
        from_server.passed_bytes, 0,
        "no byte may take the userspace path"
    );
    assert!(from_client.redirected_segments > 0 && from_server.redirected_segments > 0);

    datapath.unsplice(pair);
    assert_eq!(
        datapath.entry_counts(),
        (0, 0, 0),
        "unsplice leaves no map entries"
    );
}

/// The splice does not forward FIN by itself (that is the session's job), so read by length.
fn read_until_len(stream: &mut std::net::TcpStream, len: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut out = vec![0u8; len];
    stream
        .read_exact(&mut out)
        .unwrap_or_else(|err| panic!("spliced stream stalled or broke: {err}"));
    out
}
