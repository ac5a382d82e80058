//! CIDR prefixes as the XDP allow/deny lists hold them: parsed strictly, with the reason
//! when a string is not one.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix with no host bits set, e.g. `10.0.0.0/8` or `2001:db8::/32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP address ({1})")]
    Address(String, std::net::AddrParseError),
    #[error("{0:?}: prefix length {1:?} is not a number from 0 to {2}")]
    PrefixLen(String, String, u8),
    #[error("{0:?} has host bits set past /{1}: did you mean {2}?")]
    HostBits(String, u8, Cidr),
}

impl Cidr {
    /// Builds a prefix, failing if `addr` has bits set past `prefix_len`.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self, CidrError> {
        let max = max_len(addr);
        if prefix_len > max {
            return Err(CidrError::PrefixLen(
                addr.to_string(),
                prefix_len.to_string(),
                max,
            ));
        }
        let cidr = Self {
            addr: mask(addr, prefix_len),
            prefix_len,
        };
        if cidr.addr != addr {
            return Err(CidrError::HostBits(
                format!("{addr}/{prefix_len}"),
                prefix_len,
                cidr,
            ));
        }
        Ok(cidr)
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` lies in this prefix (used by tests and the CLI, not the data path).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }
}

fn max_len(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, prefix_len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V4((bits & keep).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix_len))
                .unwrap_or(0);
            IpAddr::V6((bits & keep).into())
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/LEN`, or a bare address meaning a single host (/32 or /128).
    fn from_str(text: &str) -> Result<Self, CidrError> {
        let text = text.trim();
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|e| CidrError::Address(addr_text.to_string(), e))?;
        let max = max_len(addr);
        let prefix_len = match len_text {
            None => max,
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| CidrError::PrefixLen(text.to_string(), l.to_string(), max))?,
        };
        Self::new(addr, prefix_len)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// As text (`"10.0.0.0/8"`), checked when read like any other.
impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v4_v6_and_bare_hosts() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!((c.to_string(), c.prefix_len()), ("10.0.0.0/8".into(), 8));
        assert_eq!(
            "192.0.2.7".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            " 2001:db8::/32 ".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix_len(), 128);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
        assert_eq!("::/0".parse::<Cidr>().unwrap().to_string(), "::/0");
    }

    #[test]
    fn rejects_with_the_reason() {
        let err = "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string();
        assert!(
            err.contains("host bits") && err.contains("10.0.0.0/8"),
            "{err}"
        );
        let err = "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string();
        assert!(
            err.contains("prefix length \"33\"") && err.contains("0 to 32"),
            "{err}"
        );
        let err = "2001:db8::/129".parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains("0 to 128"), "{err}");
        let err = "10.0.0/8".parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains("not an IP address"), "{err}");
        let err = "10.0.0.0/x".parse::<Cidr>().unwrap_err().to_string();
        assert!(err.contains("prefix length \"x\""), "{err}");
        assert!("".parse::<Cidr>().is_err());
        assert!("10.0.0.0/".parse::<Cidr>().is_err());
    }

    #[test]
    fn contains_matches_by_family_and_prefix() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::ffff:10.1.0.1".parse().unwrap()));
        let all: Cidr = "::/0".parse().unwrap();
        assert!(all.contains("2001:db8::1".parse().unwrap()));
        assert!(!all.contains("10.0.0.1".parse().unwrap()));
    }
}
