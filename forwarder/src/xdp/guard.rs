//! Loads the XDP guard object and attaches it to the configured interfaces: native
//! (driver) mode first, generic (skb) mode as the fallback, saying which. Refuses an
//! interface another XDP program holds unless told to replace it. Dropping the guard
//! detaches the program and removes its pins.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId};
use aya::{Ebpf, EbpfLoader};
use forwarder_common::names;

use super::maps::{List, XdpMaps, XdpStats};
use super::{Cidr, XDP_OBJECT};
use crate::config::{XdpAttach, XdpConfig};

/// The mode an interface ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native: run by the driver before an skb is allocated.
    Native,
    /// Generic: run by the stack on the skb (works on any interface, slower).
    Generic,
}

/// One interface the guard is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub interface: String,
    pub mode: AttachedMode,
}

/// The attached guard. Dropping it detaches from every interface and removes the pins.
pub struct XdpGuard {
    // Owns the program (and with it the links); the maps are taken out below.
    ebpf: Ebpf,
    links: Vec<XdpLinkId>,
    attached: Vec<Attached>,
    maps: XdpMaps,
    pin_dir: Option<PathBuf>,
    /// Where run-time rule changes are saved (`super::state`).
    rules: Option<super::state::RuleFile>,
}

impl XdpGuard {
    /// Loads the guard, fills its maps from `config` and `ports` (the frontends' bind
    /// ports), then attaches it to every interface of `config`. Maps are pinned under
    /// `pin_dir` for `forwarder xdp ...`.
    pub fn start(
        config: &XdpConfig,
        ports: &[u16],
        pin_dir: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        Self::start_with_rules(config, ports, pin_dir, None)
    }

    /// `start`, with the run-time rule changes saved in `rules` applied before the
    /// program is attached (so no source denied at run time slips in at a restart), and
    /// saved there from now on.
    pub fn start_with_rules(
        config: &XdpConfig,
        ports: &[u16],
        pin_dir: Option<PathBuf>,
        mut rules: Option<super::state::RuleFile>,
    ) -> anyhow::Result<Self> {
        if let Err(err) = crate::sys::raise_memlock_limit() {
            tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK; continuing");
        }
        let mut ebpf = EbpfLoader::new().load(XDP_OBJECT).context(
            "loading the XDP guard object failed: it needs root (or CAP_BPF + CAP_NET_ADMIN)",
        )?;
        if let Some(dir) = &pin_dir {
            crate::ebpf::ensure_bpffs()?;
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let maps = XdpMaps::take(&mut ebpf, pin_dir.as_deref());
        // From here on, Drop cleans up whatever was pinned or attached, also on error.
        let mut guard = Self {
            ebpf,
            links: Vec::new(),
            attached: Vec::new(),
            maps: match maps {
                Ok(maps) => maps,
                Err(err) => {
                    if let Some(dir) = &pin_dir {
                        XdpMaps::unpin(dir);
                    }
                    return Err(err);
                }
            },
            pin_dir,
            rules: None,
        };
        guard.configure(config, ports)?;
        if let Some(rules) = &mut rules
            && let Err(err) = rules.restore(&mut guard.maps)
        {
            tracing::warn!(
                "xdp: run-time rule changes not re-applied, serving the configuration's lists: {err:#}"
            );
        }
        guard.rules = rules;
        let program: &mut Xdp = guard
            .ebpf
            .program_mut(names::XDP_GUARD)
            .context("the XDP guard program is missing from its object")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the XDP guard program")?;
        for interface in &config.interfaces {
            let (link, mode) = attach(program, interface, config.mode, config.replace)?;
            guard.links.push(link);
            guard.attached.push(Attached {
                interface: interface.clone(),
                mode,
            });
        }
        Ok(guard)
    }

    fn configure(&mut self, config: &XdpConfig, ports: &[u16]) -> anyhow::Result<()> {
        self.maps.set_ports(ports)?;
        self.maps
            .set_syn_limit(config.syn_rate_per_sec, config.syn_burst)?;
        for (list, texts) in [(List::Allow, &config.allow), (List::Deny, &config.deny)] {
            for text in texts {
                let cidr: Cidr = text
                    .parse()
                    .with_context(|| format!("xdp.{}", list.name()))?;
                self.maps.add(list, cidr)?;
            }
        }
        Ok(())
    }

    pub fn attached(&self) -> &[Attached] {
        &self.attached
    }

    /// The guard's maps, for rule changes in-process.
    pub fn maps(&mut self) -> &mut XdpMaps {
        &mut self.maps
    }

    pub fn stats(&self) -> anyhow::Result<XdpStats> {
        self.maps.stats()
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    /// Saves the rules if `forwarder xdp` changed them since the last save.
    pub fn save_rules(&mut self) {
        if let Some(rules) = &mut self.rules
            && let Err(err) = rules.save(&self.maps)
        {
            tracing::warn!("xdp: run-time rule changes not saved: {err:#}");
        }
    }
}

impl Drop for XdpGuard {
    fn drop(&mut self) {
        // The last changes, while the maps are still there.
        self.save_rules();
        let program: Option<&mut Xdp> = self
            .ebpf
            .program_mut(names::XDP_GUARD)
            .and_then(|p| p.try_into().ok());
        if let Some(program) = program {
            for (link, attached) in self.links.drain(..).zip(&self.attached) {
                match program.detach(link) {
                    Ok(()) => tracing::info!(interface = %attached.interface, "XDP guard detached"),
                    Err(err) => {
                        tracing::warn!(interface = %attached.interface, %err, "XDP guard detach failed")
                    }
                }
            }
        }
        if let Some(dir) = &self.pin_dir {
            XdpMaps::unpin(dir);
        }
    }
}

/// Why one attach attempt failed.
enum AttachError {
    /// Another XDP program holds the interface (in this mode or the other).
    Busy(ProgramError),
    Other(ProgramError),
}

fn attach(
    program: &mut Xdp,
    interface: &str,
    preference: XdpAttach,
    replace: bool,
) -> anyhow::Result<(XdpLinkId, AttachedMode)> {
    match attach_in_modes(program, interface, preference) {
        Ok(done) => Ok(done),
        Err(AttachError::Busy(_)) if replace => {
            tracing::warn!(%interface, "replacing the XDP program already on the interface");
            remove_netlink_programs(interface)?;
            attach_in_modes(program, interface, preference).map_err(|e| match e {
                AttachError::Busy(err) => anyhow::Error::new(err).context(format!(
                    "{interface} is still held by another XDP program after removing netlink-attached \
                     ones: a BPF link of a running process holds it; stop that process"
                )),
                AttachError::Other(err) => anyhow::Error::new(err)
                    .context(format!("attaching the XDP guard to {interface}")),
            })
        }
        Err(AttachError::Busy(err)) => Err(anyhow::Error::new(err).context(format!(
            "{interface} already has an XDP program: refusing to replace it; set `replace = true` \
             in [xdp] to take the interface over"
        ))),
        Err(AttachError::Other(err)) => {
            Err(anyhow::Error::new(err).context(format!("attaching the XDP guard to {interface}")))
        }
    }
}

fn attach_in_modes(
    program: &mut Xdp,
    interface: &str,
    preference: XdpAttach,
) -> Result<(XdpLinkId, AttachedMode), AttachError> {
    let try_mode = |program: &mut Xdp, mode: XdpMode| {
        program.attach(interface, mode).map_err(|err| {
            if matches!(errno(&err), Some(libc::EBUSY) | Some(libc::EEXIST)) {
                AttachError::Busy(err)
            } else {
                AttachError::Other(err)
            }
        })
    };
    match preference {
        XdpAttach::Native => {
            let link = try_mode(program, XdpMode::Driver)?;
            tracing::info!(%interface, "XDP guard attached in native (driver) mode");
            Ok((link, AttachedMode::Native))
        }
        XdpAttach::Generic => {
            let link = try_mode(program, XdpMode::Skb)?;
            tracing::info!(%interface, "XDP guard attached in generic (skb) mode, as configured");
            Ok((link, AttachedMode::Generic))
        }
        XdpAttach::Auto => match try_mode(program, XdpMode::Driver) {
            Ok(link) => {
                tracing::info!(%interface, "XDP guard attached in native (driver) mode");
                Ok((link, AttachedMode::Native))
            }
            Err(AttachError::Busy(err)) => Err(AttachError::Busy(err)),
            Err(AttachError::Other(native_err)) => {
                let link = try_mode(program, XdpMode::Skb)?;
                tracing::warn!(
                    %interface,
                    reason = %error_chain(&native_err),
                    "native XDP is not available on this interface: XDP guard attached in generic (skb) mode"
                );
                Ok((link, AttachedMode::Generic))
            }
        },
    }
}

/// Detaches programs attached through netlink (`ip link set ... xdp`, libbpf, or a
/// crashed agent on an old kernel), in both modes. A BPF link cannot be removed this
/// way, by design: its owner decides.
fn remove_netlink_programs(interface: &str) -> anyhow::Result<()> {
    for mode in ["xdpdrv", "xdpgeneric"] {
        let output = std::process::Command::new("ip")
            .args(["link", "set", "dev", interface, mode, "off"])
            .output()
            .context("running `ip link set ... off` (iproute2) to replace the XDP program")?;
        if !output.status.success() {
            tracing::debug!(
                %interface,
                mode,
                stderr = %String::from_utf8_lossy(&output.stderr).trim(),
                "ip link set off failed"
            );
        }
    }
    Ok(())
}

/// The first OS error code in an error's chain.
fn errno(err: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        if let Some(nl) = e.downcast_ref::<aya::sys::NetlinkError>() {
            return nl.raw_os_error();
        }
        current = e.source();
    }
    None
}

fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut current = err.source();
    while let Some(e) = current {
        parts.push(e.to_string());
        current = e.source();
    }
    parts.join(": ")
}
