//! CIDR prefixes of the XDP allow/deny lists (`xdp::cidr`): any text parses to a prefix
//! or an error; a prefix prints as text that parses back to it and contains its own
//! address. The same bytes also drive `Cidr::new` and `contains` directly.
#![no_main]

use std::net::IpAddr;

use forwarder::xdp::Cidr;
use libfuzzer_sys::fuzz_target;

fn check(cidr: Cidr) {
    let max = if cidr.addr().is_ipv4() { 32 } else { 128 };
    assert!(cidr.prefix_len() <= max, "{cidr:?}");
    assert_eq!(cidr.to_string().parse::<Cidr>(), Ok(cidr));
    assert_eq!(Cidr::new(cidr.addr(), cidr.prefix_len()), Ok(cidr));
    assert!(cidr.contains(cidr.addr()), "{cidr}");
}

/// `Cidr::contains` computed another way: the first `prefix_len` bits, one by one.
fn contains_bitwise(cidr: &Cidr, ip: IpAddr) -> bool {
    let bytes = |a: IpAddr| match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    let (net, ip) = (bytes(cidr.addr()), bytes(ip));
    net.len() == ip.len()
        && (0..usize::from(cidr.prefix_len()))
            .all(|bit| (net[bit / 8] ^ ip[bit / 8]) & (0x80 >> (bit % 8)) == 0)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        match text.parse::<Cidr>() {
            Ok(cidr) => check(cidr),
            Err(err) => drop(err.to_string()),
        }
    }
    // Raw form: a prefix length, 4 or 16 address bytes, then a probe address (4 or 16).
    let Some((&len, rest)) = data.split_first() else {
        return;
    };
    let (addr, probe): (IpAddr, IpAddr) = match rest.len() {
        8 => (
            <[u8; 4]>::try_from(&rest[..4]).unwrap().into(),
            <[u8; 4]>::try_from(&rest[4..]).unwrap().into(),
        ),
        20 => (
            <[u8; 4]>::try_from(&rest[..4]).unwrap().into(),
            <[u8; 16]>::try_from(&rest[4..]).unwrap().into(),
        ),
        32 => (
            <[u8; 16]>::try_from(&rest[..16]).unwrap().into(),
            <[u8; 16]>::try_from(&rest[16..]).unwrap().into(),
        ),
        _ => return,
    };
    match Cidr::new(addr, len) {
        Ok(cidr) => {
            check(cidr);
            assert_eq!(
                cidr.contains(probe),
                contains_bitwise(&cidr, probe),
                "{cidr} {probe}"
            );
        }
        Err(err) => drop(err.to_string()),
    }
});
