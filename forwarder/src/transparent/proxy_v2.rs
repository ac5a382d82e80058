//! The PROXY protocol version 2 header (haproxy.org's proxy-protocol.txt, section 2.2):
//! written to an upstream connection before any of the device's bytes, so a broker that
//! expects it learns the device's address and port, and the destination it asked for.
//! Only `PROXY` over TCP, without TLVs: the payload that follows is spliced untouched.

use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY (a relayed connection).
const VERSION_PROXY: u8 = 0x21;
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;

/// The header for a connection from `source` to `destination`. Mixed families are sent
/// as IPv6 (IPv4 mapped); an IPv4-mapped pair as plain IPv4.
pub fn header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (src, dst) = (source.ip().to_canonical(), destination.ip().to_canonical());
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP_OVER_IPV4);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP_OVER_IPV6);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_matches_the_specification_byte_for_byte() {
        let h = header(
            "192.0.2.10:40000".parse().unwrap(),
            "198.51.100.1:8883".parse().unwrap(),
        );
        let mut want = SIGNATURE.to_vec();
        want.extend([0x21, 0x11, 0, 12, 192, 0, 2, 10, 198, 51, 100, 1]);
        want.extend(40000u16.to_be_bytes());
        want.extend(8883u16.to_be_bytes());
        assert_eq!(h, want);
    }

    #[test]
    fn ipv6_and_mixed_families_use_the_ipv6_form() {
        let h = header(
            "[2001:db8::1]:1234".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
        );
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        let mixed = header(
            "192.0.2.10:1".parse().unwrap(),
            "[2001:db8::2]:443".parse().unwrap(),
        );
        assert_eq!(
            &mixed[16..32],
            &"::ffff:192.0.2.10"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        // A dual-stack socket's IPv4-mapped pair is plain IPv4.
        let mapped = header(
            "[::ffff:192.0.2.10]:1".parse().unwrap(),
            "[::ffff:192.0.2.11]:2".parse().unwrap(),
        );
        assert_eq!(mapped[13], 0x11);
    }
}
