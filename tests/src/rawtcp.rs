//! A TCP client made of hand-built segments, sent and received as Ethernet frames on the
//! peer side of a [`VethPair`]. It sends what no socket API would: a retransmission that
//! partly repeats bytes the server already has, the way a sender does after a lost ACK.
//!
//! It uses [`RAW_V4`], an address no namespace owns: the peer namespace's own TCP stack
//! never sees the connection (so it sends no RST), and the forwarder's side reaches it
//! through a static neighbour entry.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::netns::{
    ACK, FIN, PEER_MAC, PSH, PacketSocket, SYN, Segment, VethPair, in_ns, ip, tcp_frame,
};

/// The raw client's address: in the veth pair's subnet, configured nowhere.
pub const RAW_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 9);

/// One connection from `RAW_V4` to a server in the forwarder's namespace.
pub struct RawTcpClient {
    socket: PacketSocket,
    dest: SocketAddr,
    sport: u16,
    /// Our initial sequence number: stream offset `n` is `isn + 1 + n`.
    isn: u32,
    /// The server's initial sequence number (from its SYN-ACK).
    server_isn: u32,
}

impl RawTcpClient {
    /// Completes a handshake with `dest` (in `pair.fwd_ns`) from `RAW_V4:sport`.
    pub fn connect(pair: &VethPair, dest: SocketAddr, sport: u16) -> io::Result<Self> {
        route_raw_v4(pair);
        let ifname = pair.peer_if.clone();
        let socket = in_ns(&pair.peer_ns, move || PacketSocket::open(&ifname))?;
        let isn = 0x4000_0000 ^ u32::from(sport);
        let mut client = Self {
            socket,
            dest,
            sport,
            isn,
            server_isn: 0,
        };
        client.send_segment(isn, 0, SYN, &[])?;
        client.server_isn = client.wait_for_syn_ack(Duration::from_secs(5))?;
        client.send_segment(
            isn.wrapping_add(1),
            client.server_isn.wrapping_add(1),
            ACK,
            &[],
        )?;
        Ok(client)
    }

    /// Sends `payload` as one segment starting at stream offset `offset` (any offset, also
    /// one the server has already received).
    pub fn send_at(&self, offset: u32, payload: &[u8]) -> io::Result<()> {
        self.send_segment(self.seq_at(offset), self.ack(), ACK | PSH, payload)
    }

    /// Ends our direction: a FIN after `offset` bytes.
    pub fn send_fin(&self, offset: u32) -> io::Result<()> {
        self.send_segment(self.seq_at(offset), self.ack(), ACK | FIN, &[])
    }

    fn seq_at(&self, offset: u32) -> u32 {
        self.isn.wrapping_add(1).wrapping_add(offset)
    }

    fn ack(&self) -> u32 {
        self.server_isn.wrapping_add(1)
    }

    fn send_segment(&self, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> io::Result<()> {
        let segment = Segment {
            sport: self.sport,
            seq,
            ack,
            flags,
        };
        self.socket
            .send(&tcp_frame(IpAddr::V4(RAW_V4), self.dest, segment, payload))
    }

    /// The server's sequence number from its SYN-ACK to us.
    fn wait_for_syn_ack(&self, limit: Duration) -> io::Result<u32> {
        let deadline = Instant::now() + limit;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Some(frame) = self.socket.recv(left)? else {
                break;
            };
            if let Some(seq) = self.syn_ack_seq(&frame) {
                return Ok(seq);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no SYN-ACK from the server",
        ))
    }

    fn syn_ack_seq(&self, frame: &[u8]) -> Option<u32> {
        syn_ack_seq(frame, self.dest, self.sport)
    }
}

/// Makes the forwarder's side send frames for [`RAW_V4`] to the peer interface (a static
/// neighbour entry), so replies to hand-made packets can be watched there.
pub fn route_raw_v4(pair: &VethPair) {
    let mac = PEER_MAC.map(|b| format!("{b:02x}")).join(":");
    let neighbour = RAW_V4.to_string();
    #[rustfmt::skip]
    ip(&["-n", &pair.fwd_ns, "neigh", "replace", &neighbour, "lladdr", &mac,
         "dev", &pair.fwd_if, "nud", "permanent"]);
}

/// The server's sequence number if `frame` is a SYN-ACK from `server` (IPv4) to
/// `RAW_V4:client_port`.
pub fn syn_ack_seq(frame: &[u8], server: SocketAddr, client_port: u16) -> Option<u32> {
    const ETH: usize = 14;
    let ip = frame.get(ETH..)?;
    let header = usize::from(ip.first()? & 0x0f) * 4;
    let (IpAddr::V4(server_ip), 6) = (server.ip(), *ip.get(9)?) else {
        return None;
    };
    if ip.get(12..16)? != server_ip.octets() || ip.get(16..20)? != RAW_V4.octets() {
        return None;
    }
    let tcp = ip.get(header..)?;
    let port = |at: usize| Some(u16::from_be_bytes([*tcp.get(at)?, *tcp.get(at + 1)?]));
    let flags = *tcp.get(13)?;
    if port(0)? != server.port() || port(2)? != client_port || flags & (SYN | ACK) != SYN | ACK {
        return None;
    }
    Some(u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?))
}
