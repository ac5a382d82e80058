//! Two network namespaces joined by a veth pair, made and removed per test, plus what the
//! tests do inside them: listen, connect from a chosen source, and send hand-made TCP
//! frames (a fixed count of SYNs, so drop counters can be checked against packets really
//! sent; or segments no socket API would send, see `rawtcp`).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// The forwarder's side (`fwd` namespace) and the clients' side (`peer` namespace).
pub const FWD_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 2);
/// A second client address on the peer side.
pub const PEER2_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 3);
pub const FWD_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2);
pub const PEER2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 3);
pub const FWD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x02];

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique suffix per test and process: `<pid>x<counter>`.
pub fn unique() -> String {
    format!(
        "{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Two namespaces and a veth pair between them; dropping it deletes both namespaces
/// (which destroys the veth pair and everything in them).
pub struct VethPair {
    pub fwd_ns: String,
    pub peer_ns: String,
    /// Interface in `fwd_ns`: the XDP guard attaches here.
    pub fwd_if: String,
    /// Interface in `peer_ns`.
    pub peer_if: String,
}

pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl VethPair {
    pub fn new() -> Self {
        let id = unique();
        let pair = Self {
            fwd_ns: format!("fxf{id}"),
            peer_ns: format!("fxp{id}"),
            fwd_if: format!("vf{id}"),
            peer_if: format!("vp{id}"),
        };
        assert!(pair.fwd_if.len() <= 15, "interface name too long");
        let (f, p) = (pair.fwd_ns.as_str(), pair.peer_ns.as_str());
        ip(&["netns", "add", f]);
        ip(&["netns", "add", p]);
        let mac = |m: [u8; 6]| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        };
        let (fmac, pmac) = (mac(FWD_MAC), mac(PEER_MAC));
        #[rustfmt::skip]
        ip(&["link", "add", "name", &pair.fwd_if, "address", &fmac, "netns", f, "type", "veth",
             "peer", "name", &pair.peer_if, "address", &pmac, "netns", p]);
        let v4 = |a: Ipv4Addr| format!("{a}/24");
        let v6 = |a: Ipv6Addr| format!("{a}/64");
        for (ns, dev, addrs) in [
            (f, &pair.fwd_if, vec![v4(FWD_V4), v6(FWD_V6)]),
            (
                p,
                &pair.peer_if,
                vec![v4(PEER_V4), v4(PEER2_V4), v6(PEER_V6), v6(PEER2_V6)],
            ),
        ] {
            for addr in addrs {
                let mut args = vec!["-n", ns, "addr", "add", &addr, "dev", dev];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ip(&args);
            }
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        pair
    }

    /// `ip -j link show` of the forwarder-side interface (shows any XDP program on it).
    pub fn fwd_link_json(&self) -> String {
        ip(&[
            "-n",
            &self.fwd_ns,
            "-j",
            "link",
            "show",
            "dev",
            &self.fwd_if,
        ])
    }
}

impl Default for VethPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.fwd_ns, &self.peer_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has joined network namespace `ns` (sockets it creates, and
/// interface names it resolves, belong to that namespace).
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_ns(ns, f)
        .join()
        .expect("namespace thread panicked")
}

/// Connects from `source` (an address of the namespace) to `dest` within `timeout`.
pub fn connect_from(
    ns: &str,
    source: IpAddr,
    dest: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    in_ns(ns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            let socket = match source {
                IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = tokio::time::timeout(timeout, socket.connect(dest))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let stream = stream.into_std()?;
            stream.set_nonblocking(false)?;
            Ok(stream)
        })
    })
}

/// Connects from `source`, writes a line, and expects it echoed back.
pub fn echo_round_trip(ns: &str, source: IpAddr, dest: SocketAddr) -> io::Result<()> {
    let mut stream = connect_from(ns, source, dest, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    let message = format!("hello from {source}\n");
    stream.write_all(message.as_bytes())?;
    let mut got = vec![0u8; message.len()];
    stream.read_exact(&mut got)?;
    assert_eq!(got, message.as_bytes(), "echo differs");
    Ok(())
}

/// An echo server on `addr` in namespace `ns`; stops and joins on drop.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &str, addr: SocketAddr) -> Self {
        let listener: TcpListener = in_ns(ns, move || {
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        });
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = stream.read(&mut buf) {
                                if n == 0 || stream.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends `count` TCP SYN frames from `source` to `dest` out of `ifname` in namespace `ns`
/// (AF_PACKET, so exactly these frames and nothing else), source ports counting up from
/// 20000. Paced in small batches so the veth ring never overflows: every frame reaches XDP.
pub fn send_syns(ns: &str, ifname: &str, source: IpAddr, dest: SocketAddr, count: u32) {
    send_frames(ns, ifname, count, move |i| {
        syn_frame(source, dest, 20_000 + (i % 40_000) as u16)
    });
}

/// Like `send_syns` for IPv6, with `ext` destination-options headers between the IPv6
/// and TCP headers (what an attacker would add to slip past a guard that does not walk
/// extension headers).
pub fn send_ipv6_syns_with_ext(
    ns: &str,
    ifname: &str,
    source: Ipv6Addr,
    dest: SocketAddr,
    count: u32,
    ext: usize,
) {
    send_frames(ns, ifname, count, move |i| {
        with_ipv6_ext(
            syn_frame(source.into(), dest, 20_000 + (i % 40_000) as u16),
            ext,
        )
    });
}

/// Inserts `ext` 8-octet destination-options headers (PadN) after the IPv6 header.
fn with_ipv6_ext(frame: Vec<u8>, ext: usize) -> Vec<u8> {
    const ETH: usize = 14;
    const IPV6: usize = 40;
    const DEST_OPTS: u8 = 60;
    let mut out = frame[..ETH + IPV6].to_vec();
    let payload_len = u16::from_be_bytes([out[ETH + 4], out[ETH + 5]]) + 8 * ext as u16;
    out[ETH + 4..ETH + 6].copy_from_slice(&payload_len.to_be_bytes());
    let tcp_proto = out[ETH + 6];
    if ext > 0 {
        out[ETH + 6] = DEST_OPTS;
    }
    for i in 0..ext {
        let next = if i + 1 == ext { tcp_proto } else { DEST_OPTS };
        // next header, length 0 (8 octets), PadN option of 4 zero octets.
        out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[ETH + IPV6..]);
    out
}

/// Sends `count` frames made by `make(i)` out of `ifname` in namespace `ns`.
fn send_frames(ns: &str, ifname: &str, count: u32, make: impl Fn(u32) -> Vec<u8> + Send + 'static) {
    let ifname = ifname.to_string();
    in_ns(ns, move || {
        let socket = PacketSocket::open(&ifname).expect("AF_PACKET socket");
        for i in 0..count {
            socket.send(&make(i)).expect("sending a frame");
            if i % 16 == 15 {
                thread::sleep(Duration::from_millis(1));
            }
        }
    });
}

/// An AF_PACKET socket on one interface: whole Ethernet frames out (to `FWD_MAC`), and
/// every IPv4 frame the interface receives in. Open it in the interface's namespace.
pub struct PacketSocket {
    socket: std::os::fd::OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    pub fn open(ifname: &str) -> io::Result<Self> {
        const ETH_P_IP: u16 = 0x0800;
        // SAFETY: plain socket creation; the fd is owned below.
        let fd =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(ETH_P_IP.to_be())) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nothing else.
        let socket: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).map_err(io::Error::other)?;
        // SAFETY: valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::other(format!("no interface {ifname}")));
        }
        let this = Self {
            socket,
            ifindex: ifindex as i32,
        };
        let mut addr = this.address();
        addr.sll_protocol = ETH_P_IP.to_be();
        // SAFETY: addr is a valid sockaddr_ll for the length given.
        let rc = unsafe {
            libc::bind(
                this.socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(this)
    }

    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    fn address(&self) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&FWD_MAC);
        addr
    }

    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let addr = self.address();
        // SAFETY: frame and addr outlive the call; lengths are theirs.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent != frame.len() as isize {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame received, or `None` once `timeout` passes without one.
    #[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let mut poll = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&raw mut poll, 1, millis) };
        if ready < 0 {
            return Err(io::Error::last_os_error());
        }
        if ready == 0 {
            return Ok(None);
        }
        let mut buf = vec![0u8; 65_536];
        // SAFETY: buf is writable for its length.
        let n = unsafe {
            libc::recv(
                self.socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(Some(buf))
    }
}

/// The TCP header fields a hand-made segment sets.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub sport: u16,
    pub seq: u32,
    pub ack: u32,
    /// TCP flag bits (`SYN`, `ACK`, `PSH`, `FIN`, `RST`).
    pub flags: u8,
}

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// An Ethernet frame holding a TCP SYN with valid IP and TCP checksums.
pub fn syn_frame(source: IpAddr, dest: SocketAddr, sport: u16) -> Vec<u8> {
    let segment = Segment {
        sport,
        seq: 0x1000_0000u32.wrapping_add(u32::from(sport)),
        ack: 0,
        flags: SYN,
    };
    tcp_frame(source, dest, segment, &[])
}

/// An Ethernet frame (`PEER_MAC` to `FWD_MAC`) holding one TCP segment, with valid IP and
/// TCP checksums, no TCP options and a 64,240-byte window.
pub fn tcp_frame(source: IpAddr, dest: SocketAddr, segment: Segment, payload: &[u8]) -> Vec<u8> {
    tcp_frame_with_options(source, dest, segment, &[], payload)
}

/// Like [`tcp_frame`], with `options` (a multiple of 4 bytes, at most 40) in the TCP
/// header.
pub fn tcp_frame_with_options(
    source: IpAddr,
    dest: SocketAddr,
    segment: Segment,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "TCP options come in 32-bit words, at most 10"
    );
    let header_words = 5 + options.len() as u8 / 4;
    let mut tcp = Vec::with_capacity(20 + options.len() + payload.len());
    tcp.extend_from_slice(&segment.sport.to_be_bytes());
    tcp.extend_from_slice(&dest.port().to_be_bytes());
    tcp.extend_from_slice(&segment.seq.to_be_bytes());
    tcp.extend_from_slice(&segment.ack.to_be_bytes());
    tcp.extend_from_slice(&[header_words << 4, segment.flags]);
    tcp.extend_from_slice(&64240u16.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent
    tcp.extend_from_slice(options);
    tcp.extend_from_slice(payload);
    let tcp_len = u16::try_from(tcp.len()).expect("segment fits an IP packet");
    let mut frame = Vec::with_capacity(14 + 40 + tcp.len());
    frame.extend_from_slice(&FWD_MAC);
    frame.extend_from_slice(&PEER_MAC);
    match (source, dest.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 6]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&[0x08, 0x00]);
            let total = (20 + tcp_len).to_be_bytes();
            let mut hdr = vec![0x45, 0, total[0], total[1], 0, 0, 0x40, 0, 64, 6, 0, 0];
            hdr.extend_from_slice(&s.octets());
            hdr.extend_from_slice(&d.octets());
            let sum = checksum(&[&hdr]);
            hdr[10..12].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&hdr);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0]);
            pseudo.extend_from_slice(&tcp_len.to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 6]);
            let sum = checksum(&[&pseudo, &tcp]);
            tcp[16..18].copy_from_slice(&sum.to_be_bytes());
            frame.extend_from_slice(&[0x86, 0xdd]);
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&tcp_len.to_be_bytes());
            frame.extend_from_slice(&[6, 64]);
            frame.extend_from_slice(&s.octets());
            frame.extend_from_slice(&d.octets());
        }
        _ => panic!("source and destination must be the same address family"),
    }
    frame.extend_from_slice(&tcp);
    frame
}

/// TCP options a real SYN carries (MSS, SACK permitted, timestamps, NOP, window scale):
/// 20 bytes, so a SYN's header is 40.
pub const SYN_OPTIONS: [u8; 20] = [
    2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
];

/// A SYN from `source:sport` to `dest` with [`SYN_OPTIONS`] and 24 bytes of data (64 bytes
/// of TCP in all), cut into IP fragments by [`fragment`]: the first holds `first` bytes of
/// the segment, the others 16 (the last the rest).
pub fn fragmented_syn(
    source: IpAddr,
    dest: SocketAddr,
    sport: u16,
    id: u32,
    first: usize,
) -> Vec<Vec<u8>> {
    let segment = Segment {
        sport,
        seq: 0x2000_0000u32.wrapping_add(u32::from(sport)),
        ack: 0,
        flags: SYN,
    };
    let frame = tcp_frame_with_options(source, dest, segment, &SYN_OPTIONS, &[0x5a; 24]);
    fragment(&frame, first, 16, id)
}

/// Cuts the IP packet in `frame` (one made by [`tcp_frame`]) into fragments, as a router
/// would: the first carries `first` bytes of the IP payload, the others `rest` (both
/// multiples of 8), the last whatever remains. IPv4 fragments get identification `id`
/// (low 16 bits) with DF cleared; IPv6 ones a fragment header with `id`.
pub fn fragment(frame: &[u8], first: usize, rest: usize, id: u32) -> Vec<Vec<u8>> {
    const ETH: usize = 14;
    assert!(
        first.is_multiple_of(8) && rest.is_multiple_of(8) && first > 0 && rest > 0,
        "fragment sizes are multiples of 8"
    );
    let ipv4 = frame[12..14] == [0x08, 0x00];
    let header = if ipv4 {
        usize::from(frame[ETH] & 0x0f) * 4
    } else {
        40
    };
    let payload = &frame[ETH + header..];
    let mut fragments = Vec::new();
    let mut offset = 0;
    while offset < payload.len() {
        let size = if offset == 0 { first } else { rest };
        let end = (offset + size).min(payload.len());
        let more = end < payload.len();
        let head = &frame[..ETH + header];
        let chunk = &payload[offset..end];
        fragments.push(if ipv4 {
            ipv4_fragment(head, chunk, offset, more, id as u16)
        } else {
            ipv6_fragment(head, chunk, offset, more, id)
        });
        offset = end;
    }
    fragments
}

/// One IPv4 fragment: `head` (Ethernet and IPv4 headers) with length, flags, offset and
/// checksum rewritten, then `chunk`.
fn ipv4_fragment(head: &[u8], chunk: &[u8], offset: usize, more: bool, id: u16) -> Vec<u8> {
    const ETH: usize = 14;
    let mut out = head.to_vec();
    let total = u16::try_from(head.len() - ETH + chunk.len()).expect("fragment fits");
    let frags = (offset / 8) as u16 | if more { 0x2000 } else { 0 };
    out[ETH + 2..ETH + 4].copy_from_slice(&total.to_be_bytes());
    out[ETH + 4..ETH + 6].copy_from_slice(&id.to_be_bytes());
    out[ETH + 6..ETH + 8].copy_from_slice(&frags.to_be_bytes());
    out[ETH + 10..ETH + 12].copy_from_slice(&[0, 0]);
    let sum = checksum(&[&out[ETH..]]);
    out[ETH + 10..ETH + 12].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(chunk);
    out
}

/// One IPv6 fragment: `head` (Ethernet and IPv6 headers, no extension headers) with a
/// fragment header after it, then `chunk`.
fn ipv6_fragment(head: &[u8], chunk: &[u8], offset: usize, more: bool, id: u32) -> Vec<u8> {
    const ETH: usize = 14;
    const FRAGMENT: u8 = 44;
    let mut out = head.to_vec();
    let next = out[ETH + 6];
    out[ETH + 6] = FRAGMENT;
    let payload_len = u16::try_from(8 + chunk.len()).expect("fragment fits");
    out[ETH + 4..ETH + 6].copy_from_slice(&payload_len.to_be_bytes());
    let frag = offset as u16 | u16::from(more);
    out.extend_from_slice(&[next, 0]);
    out.extend_from_slice(&frag.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(chunk);
    out
}

/// Sends `frames` in order out of `ifname` in namespace `ns`, paced like `send_syns`.
pub fn send_frame_list(ns: &str, ifname: &str, frames: Vec<Vec<u8>>) {
    let count = u32::try_from(frames.len()).expect("frame count");
    send_frames(ns, ifname, count, move |i| frames[i as usize].clone());
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        for chunk in part.chunks(2) {
            let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Polls `probe` until it returns true or `limit` passes; returns the last answer.
pub fn wait_until(limit: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if probe() {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Loads a two-instruction XDP program (`return XDP_PASS`) by raw bpf(2), pins it at
/// `pin`, and attaches it to `ifname` in `ns` in generic mode through netlink (iproute2),
/// the way another tool would: the "other program" the guard must not silently replace.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn attach_foreign_xdp(ns: &str, ifname: &str, pin: &str) {
    // r0 = 2 (XDP_PASS); exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 2, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = b"GPL\0";
    // bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, then zeros.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&6u32.to_ne_bytes()); // BPF_PROG_TYPE_XDP
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    // SAFETY: attr is a zero-padded bpf_attr whose pointers outlive the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_ptr(), attr.len()) }; // BPF_PROG_LOAD
    assert!(fd >= 0, "BPF_PROG_LOAD: {}", io::Error::last_os_error());
    let path = std::ffi::CString::new(pin).expect("pin path");
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(path.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above; BPF_OBJ_PIN = 6.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, attr.as_ptr(), attr.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN {pin}: {}", io::Error::last_os_error());
    // SAFETY: fd is ours; the pin keeps the program alive.
    unsafe { libc::close(fd as i32) };
    // Not `ip -n`: that remounts /sys in a private mount namespace, hiding the pin.
    let (ifname, pin) = (ifname.to_string(), pin.to_string());
    in_ns(ns, move || {
        ip(&["link", "set", "dev", &ifname, "xdpgeneric", "pinned", &pin])
    });
}

/// Like [`in_ns`] but returns at once: for long-running work (an agent) in a namespace.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn spawn_in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns on a valid namespace fd; it changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there (for pins made by tests).
pub fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting bpffs on /sys/fs/bpf failed");
    }
}
