//! Typed access to the XDP guard's maps: taken from the loaded object by the agent, or
//! opened from their pins by the CLI while the agent runs. Both see the same kernel maps.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context as _;
use aya::Ebpf;
use aya::maps::lpm_trie::Key;
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use forwarder_common::{XdpSettings, names, xdp_reason};

use super::Cidr;

/// The maps pinned for the CLI (the SYN buckets are the kernel's alone).
pub(crate) const PINNED: [&str; 7] = [
    names::XDP_PORTS,
    names::XDP_ALLOW_V4,
    names::XDP_DENY_V4,
    names::XDP_ALLOW_V6,
    names::XDP_DENY_V6,
    names::XDP_SETTINGS,
    names::XDP_STATS,
];

/// Which source list a rule belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Allow,
    Deny,
}

impl List {
    pub fn name(self) -> &'static str {
        match self {
            List::Allow => "allow",
            List::Deny => "deny",
        }
    }
}

/// Packets per verdict reason, summed over CPUs (index: `forwarder_common::xdp_reason`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XdpStats(pub [u64; xdp_reason::COUNT as usize]);

impl XdpStats {
    pub fn get(&self, reason: u32) -> u64 {
        self.0.get(reason as usize).copied().unwrap_or(0)
    }

    /// (name, packets) in index order.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        xdp_reason::NAMES
            .iter()
            .copied()
            .zip(self.0.iter().copied())
    }

    /// Packets dropped for any reason.
    pub fn dropped(&self) -> u64 {
        (0..xdp_reason::COUNT)
            .filter(|&r| xdp_reason::is_drop(r))
            .map(|r| self.get(r))
            .sum()
    }
}

type Trie<const N: usize> = LpmTrie<MapData, [u8; N], u8>;

pub struct XdpMaps {
    ports: HashMap<MapData, u16, u8>,
    allow_v4: Trie<4>,
    deny_v4: Trie<4>,
    allow_v6: Trie<16>,
    deny_v6: Trie<16>,
    settings: Array<MapData, XdpSettings>,
    stats: PerCpuArray<MapData, u64>,
}

impl XdpMaps {
    /// Takes the maps out of the loaded object, pinning each under `pin_dir` if given.
    pub(crate) fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> anyhow::Result<Self> {
        Self::build(|name| {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} is missing from the XDP object"))?;
            if let Some(dir) = pin_dir {
                let path = dir.join(name);
                // A stale pin of a crashed agent would make pinning fail: it is not ours.
                let _ = std::fs::remove_file(&path);
                map.pin(&path)
                    .with_context(|| format!("pinning {name} at {}", path.display()))?;
            }
            Ok(map)
        })
    }

    /// Opens the maps a running agent pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        if !dir.join(names::XDP_SETTINGS).exists() {
            anyhow::bail!(
                "no XDP guard maps are pinned in {}: is `forwarder run` running for this \
                 instance with an [xdp] section? (reading pins also needs root)",
                dir.display()
            );
        }
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        })
    }

    /// Removes the pins `take` made (the directory too, if nothing else is left in it).
    pub(crate) fn unpin(dir: &Path) {
        for name in PINNED {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }

    fn build(mut get: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<Self> {
        // Only the pinned maps are taken by name here; the buckets stay in the object.
        Ok(Self {
            ports: get(names::XDP_PORTS)?.try_into()?,
            allow_v4: get(names::XDP_ALLOW_V4)?.try_into()?,
            deny_v4: get(names::XDP_DENY_V4)?.try_into()?,
            allow_v6: get(names::XDP_ALLOW_V6)?.try_into()?,
            deny_v6: get(names::XDP_DENY_V6)?.try_into()?,
            settings: get(names::XDP_SETTINGS)?.try_into()?,
            stats: get(names::XDP_STATS)?.try_into()?,
        })
    }

    /// Makes exactly `ports` the protected ones.
    pub fn set_ports(&mut self, ports: &[u16]) -> anyhow::Result<()> {
        let old: Vec<u16> = self.ports.keys().filter_map(Result::ok).collect();
        for port in old.iter().filter(|p| !ports.contains(p)) {
            self.ports.remove(port)?;
        }
        for &port in ports {
            self.ports
                .insert(port, 1, 0)
                .with_context(|| format!("protecting port {port}"))?;
        }
        Ok(())
    }

    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.ports.keys().filter_map(Result::ok).collect();
        ports.sort_unstable();
        ports
    }

    pub fn settings(&self) -> anyhow::Result<XdpSettings> {
        Ok(self.settings.get(&0, 0)?)
    }

    /// Sets the per-source SYN limit (`burst` 0: off). Keeps the allow-list flag.
    pub fn set_syn_limit(&mut self, rate_per_sec: u64, burst: u64) -> anyhow::Result<()> {
        let mut settings = self.settings()?;
        settings.syn_rate_per_sec = rate_per_sec;
        settings.syn_burst = burst;
        self.settings.set(0, settings, 0)?;
        Ok(())
    }

    /// Adds a prefix to a list. Adding to the allow-list turns it on.
    pub fn add(&mut self, list: List, cidr: Cidr) -> anyhow::Result<()> {
        let len = u32::from(cidr.prefix_len());
        let result = match (cidr.addr(), list) {
            (IpAddr::V4(a), List::Allow) => self.allow_v4.insert(&Key::new(len, a.octets()), 1, 0),
            (IpAddr::V4(a), List::Deny) => self.deny_v4.insert(&Key::new(len, a.octets()), 1, 0),
            (IpAddr::V6(a), List::Allow) => self.allow_v6.insert(&Key::new(len, a.octets()), 1, 0),
            (IpAddr::V6(a), List::Deny) => self.deny_v6.insert(&Key::new(len, a.octets()), 1, 0),
        };
        result.map_err(|err| match errno(&err) {
            Some(libc::E2BIG) | Some(libc::ENOSPC) | Some(libc::ENOMEM) => anyhow::anyhow!(
                "the {} list is full ({} prefixes per address family)",
                list.name(),
                forwarder_common::XDP_MAX_RULES
            ),
            _ => anyhow::Error::new(err)
                .context(format!("adding {cidr} to the {} list", list.name())),
        })?;
        self.refresh_allow_flag()
    }

    /// Removes a prefix (exactly as added); false if it was not there.
    pub fn remove(&mut self, list: List, cidr: Cidr) -> anyhow::Result<bool> {
        let len = u32::from(cidr.prefix_len());
        let result = match (cidr.addr(), list) {
            (IpAddr::V4(a), List::Allow) => self.allow_v4.remove(&Key::new(len, a.octets())),
            (IpAddr::V4(a), List::Deny) => self.deny_v4.remove(&Key::new(len, a.octets())),
            (IpAddr::V6(a), List::Allow) => self.allow_v6.remove(&Key::new(len, a.octets())),
            (IpAddr::V6(a), List::Deny) => self.deny_v6.remove(&Key::new(len, a.octets())),
        };
        let removed = match result {
            Ok(()) => true,
            Err(err) if errno(&err) == Some(libc::ENOENT) => false,
            Err(MapError::KeyNotFound) => false,
            Err(err) => return Err(err.into()),
        };
        self.refresh_allow_flag()?;
        Ok(removed)
    }

    /// The prefixes of a list, IPv4 first, each family sorted.
    pub fn rules(&self, list: List) -> anyhow::Result<Vec<Cidr>> {
        let (v4, v6) = match list {
            List::Allow => (&self.allow_v4, &self.allow_v6),
            List::Deny => (&self.deny_v4, &self.deny_v6),
        };
        let mut out = Vec::new();
        for key in v4.keys() {
            let key = key?;
            out.push(Cidr::new(IpAddr::from(key.data()), key.prefix_len() as u8)?);
        }
        for key in v6.keys() {
            let key = key?;
            out.push(Cidr::new(IpAddr::from(key.data()), key.prefix_len() as u8)?);
        }
        out.sort();
        Ok(out)
    }

    /// The kernel cannot cheaply ask whether a trie is empty, so userspace keeps a flag.
    fn refresh_allow_flag(&mut self) -> anyhow::Result<()> {
        let on = self.allow_v4.keys().next().is_some() || self.allow_v6.keys().next().is_some();
        let mut settings = self.settings()?;
        if (settings.allow_list_on != 0) != on {
            settings.allow_list_on = u32::from(on);
            self.settings.set(0, settings, 0)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> anyhow::Result<XdpStats> {
        let mut stats = XdpStats::default();
        // A map pinned by an older agent may hold fewer reasons: the rest read as 0.
        let pinned = self.stats.len() as usize;
        for (reason, slot) in stats.0.iter_mut().enumerate().take(pinned) {
            *slot = self.stats.get(&(reason as u32), 0)?.iter().sum();
        }
        Ok(stats)
    }
}

fn errno(err: &MapError) -> Option<i32> {
    match err {
        MapError::SyscallError(e) => e.io_error.raw_os_error(),
        MapError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}
