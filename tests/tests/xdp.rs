//! XDP ingress guard: real program on a real veth pair between two namespaces made by
//! each test. Clients in the peer namespace; the guard and the listeners in the forwarder
//! namespace. Raw SYN frames with a fixed count let every drop counter be checked against
//! the packets actually sent.

use forwarder_tests::forwarder_binary;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use forwarder::config::{XdpAttach, XdpConfig};
use forwarder::xdp::cli::{Output, RuleAction, Target, XdpCommand};
use forwarder::xdp::{AttachedMode, Cidr, List, XdpGuard};
use forwarder_common::xdp_reason::{
    DROPPED_DENY, DROPPED_NOT_ALLOWED, DROPPED_SYN_RATE, DROPPED_TINY_FRAGMENT,
    DROPPED_UNPARSEABLE, PASSED, PASSED_FRAGMENT, PASSED_MALFORMED, PASSED_NOT_TCP,
    PASSED_OTHER_PORT,
};
use forwarder_tests::netns::*;
use forwarder_tests::rawtcp::{RAW_V4, route_raw_v4, syn_ack_seq};
use forwarder_tests::require_root;

/// The forwarder's (protected) port and a port no frontend uses.
const PORT: u16 = 18883;
const OTHER_PORT: u16 = 18080;
/// An unprotected port with no listener: SYNs there get a RST, and the peer answers
/// nothing, so the counter sees exactly the frames sent.
const CLOSED_PORT: u16 = 18081;
const REFUSED_IN: Duration = Duration::from_millis(1500);

fn to(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("test CIDR")
}

fn config(pair: &VethPair) -> XdpConfig {
    XdpConfig {
        interfaces: vec![pair.fwd_if.clone()],
        ..Default::default()
    }
}

/// Starts the guard in the forwarder namespace, protecting `PORT`. Never falls back.
fn start(pair: &VethPair, config: XdpConfig) -> XdpGuard {
    in_ns(&pair.fwd_ns, move || {
        XdpGuard::start(&config, &[PORT], None)
    })
    .unwrap_or_else(|err| panic!("the XDP guard must load and attach: {err:#}"))
}

fn stat(guard: &XdpGuard, reason: u32) -> u64 {
    guard.stats().expect("reading XDP stats").get(reason)
}

/// Waits for counter `reason` to reach `expected` (XDP on veth runs in softirq, a little
/// after the send returns), then checks it did not overshoot.
fn assert_stat_reaches(guard: &XdpGuard, reason: u32, expected: u64) {
    wait_until(Duration::from_secs(3), || stat(guard, reason) >= expected);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(stat(guard, reason), expected, "counter {reason}");
}

fn assert_refused(pair: &VethPair, source: IpAddr, dest: SocketAddr) {
    let err = connect_from(&pair.peer_ns, source, dest, REFUSED_IN)
        .expect_err("this source must not get a connection");
    assert_eq!(
        err.kind(),
        io::ErrorKind::TimedOut,
        "dropped, not reset: {err}"
    );
}

fn assert_no_xdp(pair: &VethPair) {
    let link = pair.fwd_link_json();
    assert!(
        !link.contains("\"xdp\""),
        "an XDP program is still attached: {link}"
    );
}

#[test]
fn denied_source_cannot_connect_and_every_dropped_syn_is_counted_native_and_generic() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    let dest = to(FWD_V4, PORT);
    for (mode, expected) in [
        (XdpAttach::Auto, AttachedMode::Native),
        (XdpAttach::Generic, AttachedMode::Generic),
    ] {
        let guard = start(
            &pair,
            XdpConfig {
                deny: vec![format!("{PEER2_V4}/32")],
                mode,
                ..config(&pair)
            },
        );
        assert_eq!(
            guard.attached()[0].mode,
            expected,
            "veth supports native XDP"
        );

        send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V4.into(), dest, 50);
        assert_stat_reaches(&guard, DROPPED_DENY, 50);
        assert_eq!(stat(&guard, PASSED), 0);

        // A real connect: at least its first SYN is dropped, and no RST comes back.
        assert_refused(&pair, PEER2_V4.into(), dest);
        assert!(stat(&guard, DROPPED_DENY) > 50);
        echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest)
            .expect("a source not on the deny-list connects");
        assert!(stat(&guard, PASSED) > 0);

        drop(guard);
        assert_no_xdp(&pair);
        echo_round_trip(&pair.peer_ns, PEER2_V4.into(), dest)
            .expect("after detach the denied source connects again");
    }
}

#[test]
fn allowed_source_connects_and_the_allow_list_drops_everyone_else() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    let mut guard = start(
        &pair,
        XdpConfig {
            allow: vec![format!("{PEER_V4}/32")],
            ..config(&pair)
        },
    );
    let dest = to(FWD_V4, PORT);
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest).expect("the allowed source connects");
    assert!(stat(&guard, PASSED) > 0);

    send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V4.into(), dest, 30);
    assert_stat_reaches(&guard, DROPPED_NOT_ALLOWED, 30);
    // The allow-list covers both families: an IPv6 source not on it is dropped too.
    send_syns(
        &pair.peer_ns,
        &pair.peer_if,
        PEER_V6.into(),
        to(FWD_V6, PORT),
        10,
    );
    assert_stat_reaches(&guard, DROPPED_NOT_ALLOWED, 40);
    assert_refused(&pair, PEER2_V4.into(), dest);
    assert_eq!(stat(&guard, DROPPED_DENY), 0);

    // Emptying the allow-list at run time turns it off.
    let removed = guard
        .maps()
        .remove(List::Allow, cidr(&format!("{PEER_V4}/32")))
        .expect("remove allow rule");
    assert!(removed);
    echo_round_trip(&pair.peer_ns, PEER2_V4.into(), dest)
        .expect("with the allow-list empty every source connects");
}

#[test]
fn syn_flood_from_one_source_is_limited_while_a_second_source_connects() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    let guard = start(
        &pair,
        XdpConfig {
            syn_rate_per_sec: 1,
            syn_burst: 5,
            ..config(&pair)
        },
    );
    let dest = to(FWD_V4, PORT);
    let started = std::time::Instant::now();
    send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V4.into(), dest, 100);
    // Burst 5 plus 1 token per second of sending.
    let refill = started.elapsed().as_secs() + 1;
    wait_until(Duration::from_secs(3), || {
        stat(&guard, DROPPED_SYN_RATE) >= 95 - refill
    });
    let dropped = stat(&guard, DROPPED_SYN_RATE);
    assert!(
        (95 - refill..=95).contains(&dropped),
        "100 SYNs at burst 5: {dropped} dropped"
    );

    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest)
        .expect("a second source has its own bucket and connects");
    // The flooding source is still limited.
    send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V4.into(), dest, 20);
    wait_until(Duration::from_secs(3), || {
        stat(&guard, DROPPED_SYN_RATE) >= dropped + 18
    });
    assert!(stat(&guard, DROPPED_SYN_RATE) >= dropped + 18);
}

#[test]
fn ipv6_sources_are_denied_and_allowed_by_prefix() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    let mut guard = start(
        &pair,
        XdpConfig {
            deny: vec!["fd00:200::3/128".into()],
            ..config(&pair)
        },
    );
    let dest = to(FWD_V6, PORT);
    send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V6.into(), dest, 40);
    assert_stat_reaches(&guard, DROPPED_DENY, 40);
    assert_refused(&pair, PEER2_V6.into(), dest);
    echo_round_trip(&pair.peer_ns, PEER_V6.into(), dest).expect("::2 is not denied");

    // An IPv6 allow prefix turns the allow-list on for both families.
    guard
        .maps()
        .add(List::Allow, cidr("fd00:200::/126"))
        .expect("add allow rule");
    echo_round_trip(&pair.peer_ns, PEER_V6.into(), dest).expect("::2 is allowed");
    let before = stat(&guard, DROPPED_NOT_ALLOWED);
    send_syns(
        &pair.peer_ns,
        &pair.peer_if,
        PEER_V4.into(),
        to(FWD_V4, PORT),
        10,
    );
    assert_stat_reaches(&guard, DROPPED_NOT_ALLOWED, before + 10);
    // Deny wins over allow: ::3 is inside the allowed /126 but still denied.
    let denied = stat(&guard, DROPPED_DENY);
    send_syns(&pair.peer_ns, &pair.peer_if, PEER2_V6.into(), dest, 5);
    assert_stat_reaches(&guard, DROPPED_DENY, denied + 5);

    // Extension headers do not hide a denied source: the guard walks them to TCP.
    let denied = stat(&guard, DROPPED_DENY);
    send_ipv6_syns_with_ext(&pair.peer_ns, &pair.peer_if, PEER2_V6, dest, 20, 2);
    assert_stat_reaches(&guard, DROPPED_DENY, denied + 20);
    // A chain longer than the guard walks is dropped rather than passed unjudged.
    send_ipv6_syns_with_ext(
        &pair.peer_ns,
        &pair.peer_if,
        PEER_V6,
        dest,
        10,
        forwarder_common::XDP_MAX_IPV6_EXT + 1,
    );
    assert_stat_reaches(&guard, DROPPED_UNPARSEABLE, 10);
}

#[test]
fn non_forwarder_ports_and_non_tcp_traffic_pass_untouched() {
    require_root();
    let pair = VethPair::new();
    let any = std::net::Ipv6Addr::UNSPECIFIED;
    let _protected = EchoServer::start(&pair.fwd_ns, to(any, PORT));
    let _other = EchoServer::start(&pair.fwd_ns, to(any, OTHER_PORT));
    let guard = start(
        &pair,
        XdpConfig {
            deny: vec!["0.0.0.0/0".into(), "::/0".into()],
            ..config(&pair)
        },
    );
    send_syns(
        &pair.peer_ns,
        &pair.peer_if,
        PEER_V4.into(),
        to(FWD_V4, CLOSED_PORT),
        25,
    );
    send_syns(
        &pair.peer_ns,
        &pair.peer_if,
        PEER_V6.into(),
        to(FWD_V6, CLOSED_PORT),
        25,
    );
    assert_stat_reaches(&guard, PASSED_OTHER_PORT, 50);
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), to(FWD_V4, OTHER_PORT))
        .expect("IPv4 to a port no frontend uses is untouched");
    echo_round_trip(&pair.peer_ns, PEER_V6.into(), to(FWD_V6, OTHER_PORT))
        .expect("IPv6 to a port no frontend uses is untouched");
    assert_eq!(
        stat(&guard, DROPPED_DENY),
        0,
        "nothing to other ports is dropped"
    );
    // ARP and neighbour discovery went through (the connects needed them).
    assert!(stat(&guard, PASSED_NOT_TCP) > 0);
    // While the protected port is closed to everyone.
    assert_refused(&pair, PEER_V4.into(), to(FWD_V4, PORT));
    assert_refused(&pair, PEER_V6.into(), to(FWD_V6, PORT));
    assert!(stat(&guard, DROPPED_DENY) >= 2);
}

#[test]
fn an_interface_held_by_another_program_is_refused_unless_replace() {
    require_root();
    ensure_bpffs();
    let pair = VethPair::new();
    let pin = format!("/sys/fs/bpf/forwarder-test-{}", unique());
    attach_foreign_xdp(&pair.fwd_ns, &pair.fwd_if, &pin);
    let _ = std::fs::remove_file(&pin);
    assert!(
        pair.fwd_link_json().contains("\"xdp\""),
        "foreign program attached"
    );

    let try_start = |replace: bool| {
        let config = XdpConfig {
            replace,
            ..config(&pair)
        };
        in_ns(&pair.fwd_ns, move || {
            XdpGuard::start(&config, &[PORT], None)
        })
    };
    let err = try_start(false)
        .err()
        .expect("must refuse a held interface");
    let message = format!("{err:#}");
    assert!(
        message.contains("already has an XDP program") && message.contains("replace = true"),
        "{message}"
    );
    assert!(
        pair.fwd_link_json().contains("\"xdp\""),
        "foreign program untouched"
    );

    let guard = try_start(true).expect("replace takes a netlink-attached program's place");
    assert_eq!(guard.attached()[0].mode, AttachedMode::Native);
    assert!(pair.fwd_link_json().contains("xdp_guard"));

    // A guard holding the interface through a BPF link cannot be displaced, even with replace.
    assert!(try_start(false).is_err());
    let err = try_start(true)
        .err()
        .expect("a BPF link is its owner's to remove");
    assert!(format!("{err:#}").contains("BPF link"), "{err:#}");
    assert!(
        pair.fwd_link_json().contains("xdp_guard"),
        "first guard still attached"
    );
    drop(guard);
    assert_no_xdp(&pair);
}

/// The agent attaches the guard from `[xdp]`, protects its frontends' ports, pins the maps
/// for the CLI, applies CLI changes at once, and detaches and unpins when it stops.
#[test]
fn agent_attaches_from_config_and_the_cli_changes_rules_while_it_runs() {
    require_root();
    let pair = VethPair::new();
    let instance = format!("xdpt{}", unique());
    let _upstream = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv4Addr::LOCALHOST, 19000));
    let state = forwarder_tests::peers::scratch_dir(&instance);
    let toml = agent_config(
        &instance,
        &state,
        &pair,
        &format!(r#"deny = ["{PEER2_V4}/32"]"#),
    );
    let (stop, agent) = spawn_agent(&pair, &instance, &toml);
    let pins = forwarder::ebpf::pin_dir_for(&instance);
    let dest = to(FWD_V4, PORT);
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest).expect("through the forwarder");
    assert_refused(&pair, PEER2_V4.into(), dest);

    let target = || Target {
        instance: instance.clone(),
    };
    let json = |t| Output {
        target: t,
        json: true,
    };
    let stats = xdp_cli(XdpCommand::Stats(json(target())));
    assert!(!stats.contains("\"dropped_deny\":0"), "{stats}");
    let list = xdp_cli(XdpCommand::List(json(target())));
    assert!(
        list.contains(&format!("\"ports\":[{PORT}]")) && list.contains("10.200.0.3/32"),
        "{list}"
    );

    let out = xdp_cli(XdpCommand::Deny {
        action: RuleAction::Del {
            cidr: cidr(&format!("{PEER2_V4}/32")),
            target: target(),
        },
    });
    assert!(out.contains("removed"), "{out}");
    echo_round_trip(&pair.peer_ns, PEER2_V4.into(), dest).expect("no longer denied");

    let out = xdp_cli(XdpCommand::Allow {
        action: RuleAction::Add {
            cidr: cidr(&format!("{PEER_V4}/32")),
            target: target(),
        },
    });
    assert!(out.contains("allow-list is on"), "{out}");
    assert_refused(&pair, PEER2_V4.into(), dest);
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest).expect("on the allow-list");
    let text = xdp_cli(XdpCommand::Stats(Output {
        target: target(),
        json: false,
    }));
    assert!(text.contains("dropped_not_allowed"), "{text}");

    stop.send(true).expect("stop the agent");
    agent
        .join()
        .expect("agent thread")
        .expect("the agent exits cleanly");
    assert!(!pins.exists(), "pins removed on exit");
    assert_no_xdp(&pair);
    let mut out = Vec::new();
    let err = forwarder::xdp::cli::run(XdpCommand::Stats(json(target())), &mut out)
        .expect_err("no agent, no pins");
    assert!(
        format!("{err:#}").contains("no XDP guard maps are pinned"),
        "{err:#}"
    );
}

/// A driver without native XDP (a bridge) gets generic mode, next to a veth in native mode;
/// both detach when the guard drops.
#[test]
fn falls_back_to_generic_mode_where_the_driver_has_no_xdp() {
    require_root();
    let pair = VethPair::new();
    let bridge = format!("br{}", unique());
    ip(&["-n", &pair.fwd_ns, "link", "add", &bridge, "type", "bridge"]);
    ip(&["-n", &pair.fwd_ns, "link", "set", &bridge, "up"]);
    let guard = start(
        &pair,
        XdpConfig {
            interfaces: vec![pair.fwd_if.clone(), bridge.clone()],
            ..Default::default()
        },
    );
    let modes: Vec<_> = guard.attached().iter().map(|a| a.mode).collect();
    assert_eq!(modes, [AttachedMode::Native, AttachedMode::Generic]);
    let bridge_link = ip(&["-n", &pair.fwd_ns, "-j", "link", "show", "dev", &bridge]);
    assert!(bridge_link.contains("xdp_guard"), "{bridge_link}");
    drop(guard);
    assert_no_xdp(&pair);
    let bridge_link = ip(&["-n", &pair.fwd_ns, "-j", "link", "show", "dev", &bridge]);
    assert!(!bridge_link.contains("\"xdp\""), "{bridge_link}");
}

/// Where `fragmented_syn` cuts its 64-byte segment (a 40-byte header with options, then
/// data): after the whole header; after the fixed header, before its options; after the
/// ports and sequence number.
const WHOLE_HEADER: usize = 40;
const FIXED_HEADER_ONLY: usize = 24;
const PORTS_ONLY: usize = 8;

/// `count` SYNs from `source` to `dest`, source ports (and fragment ids) counting up from
/// `first_port`, each cut into fragments after `first` bytes. One list per packet.
fn fragmented_syns(
    source: IpAddr,
    dest: SocketAddr,
    first_port: u16,
    count: u16,
    first: usize,
) -> Vec<Vec<Vec<u8>>> {
    (first_port..first_port + count)
        .map(|port| fragmented_syn(source, dest, port, u32::from(port), first))
        .collect()
}

/// Sends every fragment of `packets`; returns how many frames went out.
fn send_packets(pair: &VethPair, packets: Vec<Vec<Vec<u8>>>) -> u64 {
    let frames: Vec<Vec<u8>> = packets.into_iter().flatten().collect();
    let sent = frames.len() as u64;
    send_frame_list(&pair.peer_ns, &pair.peer_if, frames);
    sent
}

/// An AF_PACKET socket on the peer's interface: it sees the SYN-ACKs the forwarder's
/// stack sends to `RAW_V4`, which it can only send for a reassembled SYN.
fn watch_replies(pair: &VethPair) -> PacketSocket {
    let ifname = pair.peer_if.clone();
    in_ns(&pair.peer_ns, move || PacketSocket::open(&ifname)).expect("AF_PACKET socket")
}

/// Source ports (in `ports`) that got a SYN-ACK from `server` within `limit`; returns
/// early once every port has.
fn syn_acked_ports(
    socket: &PacketSocket,
    server: SocketAddr,
    ports: std::ops::Range<u16>,
    limit: Duration,
) -> std::collections::BTreeSet<u16> {
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + limit;
    while seen.len() < ports.len() {
        let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
            break;
        };
        let Ok(Some(frame)) = socket.recv(left) else {
            break;
        };
        for port in ports.clone() {
            if syn_ack_seq(&frame, server, port).is_some() {
                seen.insert(port);
            }
        }
    }
    seen
}

/// Issue 13: a denied source that fragments every packet must not get through. Every
/// fragment is judged by source (the later ones carry no port), and a first fragment too
/// short for the TCP header is dropped before the rest could complete it.
#[test]
fn every_fragment_from_a_denied_source_is_dropped_and_counted_ipv4_and_ipv6() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    route_raw_v4(&pair);
    let guard = start(
        &pair,
        XdpConfig {
            deny: vec![format!("{RAW_V4}/32"), format!("{PEER2_V6}/128")],
            ..config(&pair)
        },
    );
    let replies = watch_replies(&pair);
    let dest = to(FWD_V4, PORT);

    // Whole TCP header in the first fragment: 3 fragments per SYN, all denied.
    let sent = send_packets(
        &pair,
        fragmented_syns(RAW_V4.into(), dest, 30_000, 10, WHOLE_HEADER),
    );
    assert_eq!(sent, 30);
    assert_stat_reaches(&guard, DROPPED_DENY, 30);

    // The attack from the issue: 8 bytes of TCP in the first fragment. That one is
    // dropped as tiny, the 4 later ones of each SYN as denied.
    send_packets(
        &pair,
        fragmented_syns(RAW_V4.into(), dest, 30_010, 10, PORTS_ONLY),
    );
    assert_stat_reaches(&guard, DROPPED_TINY_FRAGMENT, 10);
    assert_stat_reaches(&guard, DROPPED_DENY, 70);
    let acked = syn_acked_ports(&replies, dest, 30_000..30_020, Duration::from_secs(1));
    assert!(acked.is_empty(), "SYNs reassembled and answered: {acked:?}");

    // IPv6 too, even when the later fragments' fragment headers claim UDP (the kernel
    // takes the protocol from the first fragment only).
    let packets = fragmented_syns(PEER2_V6.into(), to(FWD_V6, PORT), 30_100, 10, WHOLE_HEADER)
        .into_iter()
        .map(claim_udp_after_first)
        .collect();
    assert_eq!(send_packets(&pair, packets), 30);
    assert_stat_reaches(&guard, DROPPED_DENY, 100);

    for reason in [PASSED, PASSED_FRAGMENT, PASSED_MALFORMED] {
        assert_eq!(stat(&guard, reason), 0, "counter {reason}");
    }
}

/// Sets the next-header field of the fragment header of every fragment but the first
/// of an IPv6 packet to UDP.
fn claim_udp_after_first(mut fragments: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    const FRAGMENT_HEADER: usize = 14 + 40;
    const UDP: u8 = 17;
    for fragment in fragments.iter_mut().skip(1) {
        fragment[FRAGMENT_HEADER] = UDP;
    }
    fragments
}

/// A first fragment that cannot hold the whole TCP header (options included) is dropped
/// under its own reason, whoever sends it and to whatever port, so the packet is never
/// reassembled; the later fragments of an acceptable source pass.
#[test]
fn a_first_fragment_too_short_for_the_tcp_header_is_dropped_as_tiny() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    route_raw_v4(&pair);
    let guard = start(&pair, config(&pair));
    let replies = watch_replies(&pair);
    let dest = to(FWD_V4, PORT);

    // Ports and sequence number only: 1 tiny + 4 later fragments per SYN.
    send_packets(
        &pair,
        fragmented_syns(RAW_V4.into(), dest, 31_000, 10, PORTS_ONLY),
    );
    assert_stat_reaches(&guard, DROPPED_TINY_FRAGMENT, 10);
    assert_stat_reaches(&guard, PASSED_FRAGMENT, 40);
    // The fixed header but not its options: 1 tiny + 3 later fragments per SYN.
    send_packets(
        &pair,
        fragmented_syns(RAW_V4.into(), dest, 31_010, 10, FIXED_HEADER_ONLY),
    );
    assert_stat_reaches(&guard, DROPPED_TINY_FRAGMENT, 20);
    assert_stat_reaches(&guard, PASSED_FRAGMENT, 70);
    // A port no frontend uses is no exception: a tiny first fragment hides its port.
    send_packets(
        &pair,
        fragmented_syns(
            RAW_V4.into(),
            to(FWD_V4, CLOSED_PORT),
            31_020,
            5,
            PORTS_ONLY,
        ),
    );
    assert_stat_reaches(&guard, DROPPED_TINY_FRAGMENT, 25);
    assert_stat_reaches(&guard, PASSED_FRAGMENT, 90);
    // IPv6: the same cut after the fragment header.
    send_packets(
        &pair,
        fragmented_syns(PEER_V6.into(), to(FWD_V6, PORT), 31_030, 5, PORTS_ONLY),
    );
    assert_stat_reaches(&guard, DROPPED_TINY_FRAGMENT, 30);
    assert_stat_reaches(&guard, PASSED_FRAGMENT, 110);

    let acked = syn_acked_ports(&replies, dest, 31_000..31_020, Duration::from_secs(1));
    assert!(acked.is_empty(), "tiny-fragmented SYNs answered: {acked:?}");
    for reason in [PASSED, DROPPED_DENY, PASSED_MALFORMED, PASSED_OTHER_PORT] {
        assert_eq!(stat(&guard, reason), 0, "counter {reason}");
    }
}

/// A legitimately fragmented SYN from an allowed source is judged in full on its first
/// fragment, its later fragments pass by source, and the kernel reassembles and answers
/// it; a source off the allow-list loses every fragment.
#[test]
fn an_allowed_source_s_fragmented_syns_pass_and_are_reassembled() {
    require_root();
    let pair = VethPair::new();
    let _server = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv6Addr::UNSPECIFIED, PORT));
    route_raw_v4(&pair);
    let guard = start(
        &pair,
        XdpConfig {
            allow: vec![format!("{RAW_V4}/32")],
            ..config(&pair)
        },
    );
    let replies = watch_replies(&pair);
    let dest = to(FWD_V4, PORT);

    send_packets(
        &pair,
        fragmented_syns(RAW_V4.into(), dest, 32_000, 10, WHOLE_HEADER),
    );
    let acked = syn_acked_ports(&replies, dest, 32_000..32_010, Duration::from_secs(5));
    assert_eq!(acked.len(), 10, "SYN-ACKs for reassembled SYNs: {acked:?}");
    assert_stat_reaches(&guard, PASSED, 10);
    assert_stat_reaches(&guard, PASSED_FRAGMENT, 20);

    send_packets(
        &pair,
        fragmented_syns(PEER2_V4.into(), dest, 32_100, 5, WHOLE_HEADER),
    );
    assert_stat_reaches(&guard, DROPPED_NOT_ALLOWED, 15);
    assert_eq!(stat(&guard, PASSED_FRAGMENT), 20);
    assert_eq!(stat(&guard, DROPPED_TINY_FRAGMENT), 0);
}

/// The agents' configuration: one frontend on `PORT` to an echo server on 19000 in the
/// forwarder namespace, the guard on the forwarder's veth (`xdp_rules`: more lines of
/// its `[xdp]` table).
fn agent_config(
    instance: &str,
    state: &std::path::Path,
    pair: &VethPair,
    xdp_rules: &str,
) -> String {
    format!(
        r#"
instance = "{instance}"
state_dir = {state:?}
[[frontend]]
name = "mqtt"
bind = "0.0.0.0:{PORT}"
backend = "up"
[[backend]]
name = "up"
servers = [{{ address = "127.0.0.1:19000" }}]
[xdp]
interfaces = ["{}"]
{xdp_rules}
"#,
        pair.fwd_if
    )
}

/// `forwarder xdp ...` (the command names its agent); its output.
fn xdp_cli(command: XdpCommand) -> String {
    let mut out = Vec::new();
    forwarder::xdp::cli::run(command, &mut out).expect("forwarder xdp ...");
    String::from_utf8(out).expect("utf-8 output")
}

/// Starts the agent of `toml` in the forwarder namespace; returns its stop sender and
/// thread once its XDP guard is attached.
fn spawn_agent(
    pair: &VethPair,
    instance: &str,
    toml: &str,
) -> (
    tokio::sync::watch::Sender<bool>,
    std::thread::JoinHandle<anyhow::Result<()>>,
) {
    let config = forwarder::config::Config::parse(toml, "test").expect("valid config");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = spawn_in_ns(&pair.fwd_ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let options = forwarder::agent::RunOptions {
            drain_deadline: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let (_, reloads) = tokio::sync::mpsc::channel(1);
        runtime.block_on(forwarder::agent::run(config, options, stopped, reloads))
    });
    let pins = forwarder::ebpf::pin_dir_for(instance);
    assert!(
        wait_until(Duration::from_secs(20), || pins
            .join("XDP_SETTINGS")
            .exists()),
        "the agent did not pin the XDP maps in {}",
        pins.display()
    );
    // The maps are pinned (and filled) before the program is attached.
    assert!(
        wait_until(Duration::from_secs(20), || pair
            .fwd_link_json()
            .contains("\"xdp\"")),
        "the agent did not attach the XDP guard"
    );
    (stop, agent)
}

/// Rules changed with `forwarder xdp` while the agent runs are saved in the instance's
/// state directory and applied again at the next start, on top of the configuration's.
#[test]
fn run_time_rules_survive_a_restart_of_the_agent() {
    require_root();
    let pair = VethPair::new();
    let instance = format!("xdps{}", unique());
    let _upstream = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv4Addr::LOCALHOST, 19000));
    let state = forwarder_tests::peers::scratch_dir(&instance);
    // The configuration denies a prefix the run-time change removes again.
    let toml = agent_config(&instance, &state, &pair, r#"deny = ["192.0.2.0/24"]"#);
    let target = || Target {
        instance: instance.clone(),
    };
    let list = || {
        xdp_cli(XdpCommand::List(Output {
            target: target(),
            json: true,
        }))
    };
    let dest = to(FWD_V4, PORT);
    let file = state.join(&instance).join(forwarder::xdp::state::FILE);

    let (stop, agent) = spawn_agent(&pair, &instance, &toml);
    echo_round_trip(&pair.peer_ns, PEER2_V4.into(), dest).expect("not denied yet");
    xdp_cli(XdpCommand::Deny {
        action: RuleAction::Add {
            cidr: cidr(&format!("{PEER2_V4}/32")),
            target: target(),
        },
    });
    xdp_cli(XdpCommand::Deny {
        action: RuleAction::Del {
            cidr: cidr("192.0.2.0/24"),
            target: target(),
        },
    });
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(&file)
            .is_ok_and(|t| t.contains("192.0.2.0/24"))),
        "the agent did not save the run-time changes to {}",
        file.display()
    );
    stop.send(true).expect("stop the agent");
    agent.join().expect("agent thread").expect("clean exit");
    assert_no_xdp(&pair);

    let (stop, agent) = spawn_agent(&pair, &instance, &toml);
    let after = list();
    assert!(
        after.contains(&format!("\"deny\":[\"{PEER2_V4}/32\"]")),
        "the run-time deny rule is back and the removed configured one stays removed: {after}"
    );
    assert_refused(&pair, PEER2_V4.into(), dest);
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest).expect("others still connect");

    // Removing the run-time rule again leaves nothing to save but the removed prefix.
    xdp_cli(XdpCommand::Deny {
        action: RuleAction::Del {
            cidr: cidr(&format!("{PEER2_V4}/32")),
            target: target(),
        },
    });
    stop.send(true).expect("stop the agent");
    agent.join().expect("agent thread").expect("clean exit");
    let saved = std::fs::read_to_string(&file).expect("state file");
    assert!(
        !saved.contains(&PEER2_V4.to_string()) && saved.contains("192.0.2.0/24"),
        "{saved}"
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// `forwarder upgrade` with the guard on: the new agent swaps its program into the same
/// BPF link (no moment unguarded) and takes the pinned maps over, so a rule added at run
/// time, the counters and a spliced connection all carry on; the old process is gone.
#[test]
fn an_upgrade_keeps_the_guard_its_rules_and_counters() {
    require_root();
    let pair = VethPair::new();
    let instance = format!("xdpu{}", unique());
    let _upstream = EchoServer::start(&pair.fwd_ns, to(std::net::Ipv4Addr::LOCALHOST, 19000));
    let dir = forwarder_tests::peers::scratch_dir(&instance);
    let config = dir.join("forwarder.toml");
    std::fs::write(&config, agent_config(&instance, &dir, &pair, "")).unwrap();
    let binary = forwarder_binary();
    let old = forwarder_tests::peers::KillOnDrop::spawn(
        // nsenter, not `ip netns exec`: that one also gives the process a /sys of its own,
        // where the pins would be out of the CLI's sight.
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", pair.fwd_ns))
            .arg(&binary)
            .args(["run", "--drain-secs", "1", "-c"])
            .arg(&config)
            .stdout(std::fs::File::create(dir.join("agent.log")).unwrap()),
    )
    .expect("start the agent");
    assert!(
        wait_until(Duration::from_secs(20), || pair
            .fwd_link_json()
            .contains("\"xdp\"")),
        "the agent did not attach the XDP guard"
    );
    let dest = to(FWD_V4, PORT);
    let mut stream = connect_from(&pair.peer_ns, PEER_V4.into(), dest, Duration::from_secs(3))
        .expect("connect through the agent");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let echo = |stream: &mut std::net::TcpStream, text: &[u8]| {
        use std::io::{Read as _, Write as _};
        stream.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).unwrap();
        assert_eq!(back, text);
    };
    echo(&mut stream, b"before\n");
    let target = || Target {
        instance: instance.clone(),
    };
    xdp_cli(XdpCommand::Deny {
        action: RuleAction::Add {
            cidr: cidr(&format!("{PEER2_V4}/32")),
            target: target(),
        },
    });
    assert_refused(&pair, PEER2_V4.into(), dest);
    let stats = || {
        let out = xdp_cli(XdpCommand::Stats(Output {
            target: target(),
            json: true,
        }));
        let json: serde_json::Value = serde_json::from_str(&out).expect("stats JSON");
        json["dropped_deny"].as_u64().expect("dropped_deny counter")
    };
    let denied_before = stats();
    assert!(denied_before > 0, "the refused SYNs were counted");
    let link_before = pair.fwd_link_json();

    let upgraded = std::process::Command::new(&binary)
        .args(["upgrade", "--instance", &instance, "--wait-secs", "20"])
        .output()
        .expect("run forwarder upgrade");
    let log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    assert!(
        upgraded.status.success(),
        "forwarder upgrade: {}{}\n{}",
        String::from_utf8_lossy(&upgraded.stdout),
        String::from_utf8_lossy(&upgraded.stderr),
        log()
    );
    let status = old.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "old agent: {status:?}\n{}",
        log()
    );
    let new_pid = forwarder::instance_lock::InstanceLock::holder(&instance).unwrap();
    assert!(
        log().contains("XDP guard taken over"),
        "the new agent swapped its program into the link: {}",
        log()
    );
    let link_after = pair.fwd_link_json();
    assert!(
        link_after.contains("\"xdp\""),
        "{link_before} -> {link_after}"
    );

    // The run-time rule and the counters live on in the maps the new agent took over.
    assert_refused(&pair, PEER2_V4.into(), dest);
    assert!(
        stats() > denied_before,
        "counting goes on from where it was"
    );
    echo(&mut stream, b"after, same connection\n");
    echo_round_trip(&pair.peer_ns, PEER_V4.into(), dest).expect("new connections too");

    drop(stream);
    forwarder::sys::send_signal(new_pid, libc::SIGTERM).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            !forwarder_tests::process_running(new_pid)
        }),
        "the new agent did not stop"
    );
    assert_no_xdp(&pair);
    let _ = std::fs::remove_dir_all(&dir);
}
