//! Loads the sk_lookup steering program, fills its maps (listener per slot, intercepted
//! ports and prefixes) and attaches it to the agent's network namespace. The link is
//! held, not pinned: it goes away with the agent, also when the agent is killed.

use std::net::{IpAddr, TcpListener};

use anyhow::Context as _;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap, MapData, PerCpuArray, SockMap};
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::{TP_DEST_KEY_LEN, names};

use super::{Intercept, TRANSPARENT_OBJECT};

/// The attached program; dropping it detaches it.
pub struct Steer {
    // Owns the program and its link.
    _ebpf: Ebpf,
    stats: PerCpuArray<MapData, u64>,
    /// Changed at run time as `intercept_hosts` resolve to other addresses.
    dests: std::sync::Mutex<LpmTrie<MapData, [u8; TP_DEST_KEY_LEN], u8>>,
}

impl Steer {
    /// Steers each target's intercepted connections to its listener (slot = index).
    pub fn start(targets: &[(Intercept, &TcpListener)]) -> anyhow::Result<Self> {
        if let Err(err) = crate::sys::raise_memlock_limit() {
            tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK; continuing");
        }
        let mut ebpf = EbpfLoader::new().load(TRANSPARENT_OBJECT).context(
            "loading the transparent-mode eBPF object failed: it needs root (or CAP_BPF + \
             CAP_NET_ADMIN) and a kernel with sk_lookup (5.9; ingress_ifindex: 5.17)",
        )?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} is missing from the transparent object"))
        };
        let mut listeners: SockMap<MapData> = take(&mut ebpf, names::TP_LISTENERS)?.try_into()?;
        let mut ports: HashMap<MapData, u16, u32> = take(&mut ebpf, names::TP_PORTS)?.try_into()?;
        let mut dests: LpmTrie<MapData, [u8; TP_DEST_KEY_LEN], u8> =
            take(&mut ebpf, names::TP_DESTS)?.try_into()?;
        let stats: PerCpuArray<MapData, u64> = take(&mut ebpf, names::TP_STATS)?.try_into()?;
        for (slot, (intercept, listener)) in (0u32..).zip(targets) {
            listeners
                .set(slot, *listener, 0)
                .context("putting a transparent listener into TP_LISTENERS")?;
            for port in &intercept.ports {
                ports.insert(port, slot, 0).context("filling TP_PORTS")?;
            }
            for (addr, len) in prefixes(intercept) {
                dests
                    .insert(&dest_key(slot, addr, len), 1, 0)
                    .context("filling TP_DESTS")?;
            }
        }
        let program: &mut SkLookup = ebpf
            .program_mut(names::TP_STEER)
            .context("the steering program is missing from the transparent object")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the transparent steering program")?;
        let netns =
            std::fs::File::open("/proc/self/ns/net").context("opening /proc/self/ns/net")?;
        program
            .attach(netns)
            .context("attaching the sk_lookup program to the network namespace")?;
        Ok(Self {
            _ebpf: ebpf,
            stats,
            dests: std::sync::Mutex::new(dests),
        })
    }

    /// Intercepts (or no longer) connections to `addr` for the listener of `slot`.
    pub fn set_destination(&self, slot: u32, addr: IpAddr, on: bool) -> anyhow::Result<()> {
        let (data, len) = host_prefix(addr);
        let key = dest_key(slot, data, len);
        let mut dests = self.dests.lock().unwrap_or_else(|p| p.into_inner());
        if on {
            dests.insert(&key, 1, 0).context("adding to TP_DESTS")?;
        } else {
            dests.remove(&key).context("removing from TP_DESTS")?;
        }
        Ok(())
    }

    /// Connections counted under `reason` (a `tp_reason`) so far, all CPUs together.
    pub fn count(&self, reason: u32) -> u64 {
        self.stats
            .get(&reason, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }
}

/// A frontend's prefixes, IPv4 mapped into IPv6, with their length there; `::/0` (every
/// destination of both families) when it names none.
fn prefixes(intercept: &Intercept) -> Vec<([u8; 16], u32)> {
    if intercept.any {
        return vec![([0; 16], 0)];
    }
    intercept
        .destinations
        .iter()
        .map(|d| match d.addr() {
            IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 96 + u32::from(d.prefix_len())),
            IpAddr::V6(v6) => (v6.octets(), u32::from(d.prefix_len())),
        })
        .collect()
}

/// One address as a prefix of its own, IPv4 mapped into IPv6.
fn host_prefix(addr: IpAddr) -> ([u8; 16], u32) {
    match addr.to_canonical() {
        IpAddr::V4(v4) => (v4.to_ipv6_mapped().octets(), 128),
        IpAddr::V6(v6) => (v6.octets(), 128),
    }
}

/// `TP_DESTS` key: the slot, then the address; the prefix covers the slot whole.
fn dest_key(slot: u32, addr: [u8; 16], len: u32) -> Key<[u8; TP_DEST_KEY_LEN]> {
    let mut data = [0u8; TP_DEST_KEY_LEN];
    data[..4].copy_from_slice(&slot.to_be_bytes());
    data[4..].copy_from_slice(&addr);
    Key::new(32 + len, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_prefixes_are_keyed_as_mapped_ipv6_under_their_slot() {
        let intercept = Intercept::to(vec![8883], vec!["192.0.2.0/24".parse().unwrap()]);
        let [(addr, len)] = prefixes(&intercept)[..] else {
            panic!("one prefix");
        };
        assert_eq!(len, 120);
        let key = dest_key(3, addr, len);
        assert_eq!(key.prefix_len(), 152);
        assert_eq!(
            key.data(),
            [
                0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 0
            ]
        );
        let any = Intercept::any(vec![1]);
        assert_eq!(prefixes(&any), vec![([0; 16], 0)]);
    }
}
