//! Loads the XDP guard object and attaches it to the configured interfaces: native
//! (driver) mode first, generic (skb) mode as the fallback, saying which. Refuses an
//! interface another XDP program holds unless told to replace it. Dropping the guard
//! detaches the program and removes its pins.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::{XdpLink, XdpLinkId};
use aya::programs::{ProgramError, Xdp, XdpMode};
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
    /// Links pinned for an upgrade's next agent (`pin_links`), until it takes them.
    handed: Vec<(PinnedLink, Attached)>,
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
        Self::start_with_rules(config, ports, pin_dir, None, false)
    }

    /// `start`, with the run-time rule changes saved in `rules` applied before the
    /// program is attached (so no source denied at run time slips in at a restart), and
    /// saved there from now on.
    pub fn start_with_rules(
        config: &XdpConfig,
        ports: &[u16],
        pin_dir: Option<PathBuf>,
        mut rules: Option<super::state::RuleFile>,
        // An upgrade: the running agent's pinned maps and links are taken over (its rules,
        // SYN-rate settings and counters go on), its program swapped for ours in place.
        adopt: bool,
    ) -> anyhow::Result<Self> {
        let mut ebpf = load_object(pin_dir.as_deref(), adopt)?;
        let pin_now = if adopt { None } else { pin_dir.as_deref() };
        let maps = XdpMaps::take(&mut ebpf, pin_now);
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
            handed: Vec::new(),
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
        guard.attach_all(config)?;
        Ok(guard)
    }

    /// Loads the program and attaches it to every configured interface: into the link a
    /// previous agent pinned for an upgrade where there is one, else afresh.
    fn attach_all(&mut self, config: &XdpConfig) -> anyhow::Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::XDP_GUARD)
            .context("the XDP guard program is missing from its object")?
            .try_into()?;
        program
            .load()
            .context("the kernel verifier rejected the XDP guard program")?;
        for interface in &config.interfaces {
            let left = self
                .pin_dir
                .as_deref()
                .and_then(|d| take_pinned_link(d, interface));
            let (link, mode) = match left {
                Some((link, mode)) => {
                    let id = program
                        .attach_to_link(link)
                        .with_context(|| format!("taking the XDP guard on {interface} over"))?;
                    tracing::info!(%interface, "XDP guard taken over: our program swapped in, no packet unguarded");
                    (id, mode)
                }
                None => attach(program, interface, config.mode, config.replace)?,
            };
            self.links.push(link);
            self.attached.push(Attached {
                interface: interface.clone(),
                mode,
            });
        }
        Ok(())
    }

    /// For an upgrade: pins each interface's link, so the next agent can swap its own
    /// program in without a moment unguarded. The program goes on filtering meanwhile.
    pub fn pin_links(&mut self) -> anyhow::Result<()> {
        let dir = self
            .pin_dir
            .clone()
            .context("the XDP guard has no pin directory")?;
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::XDP_GUARD)
            .context("the XDP guard program is missing")?
            .try_into()?;
        let links: Vec<_> = self.links.drain(..).zip(self.attached.drain(..)).collect();
        for (id, attached) in links {
            let link = program.take_link(id)?;
            let fd_link = FdLink::try_from(link).map_err(|_| {
                anyhow::anyhow!(
                    "the XDP guard on {} is attached through netlink (an old kernel?), not a \
                     BPF link: it cannot be handed over",
                    attached.interface
                )
            })?;
            let path = link_pin(&dir, &attached.interface, attached.mode);
            let _ = std::fs::remove_file(&path);
            let pinned = fd_link
                .pin(&path)
                .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
            self.handed.push((pinned, attached));
        }
        Ok(())
    }

    /// A failed upgrade: takes the pinned links back (see `pin_links`).
    pub fn unpin_links(&mut self) -> anyhow::Result<()> {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(names::XDP_GUARD)
            .context("the XDP guard program is missing")?
            .try_into()?;
        for (pinned, attached) in self.handed.drain(..) {
            let link = XdpLink::try_from(pinned.unpin()?)?;
            self.links.push(program.attach_to_link(link)?);
            self.attached.push(attached);
        }
        Ok(())
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

/// Where an upgrade leaves an interface's link for the next agent.
fn link_pin(dir: &Path, interface: &str, mode: AttachedMode) -> PathBuf {
    let mode = match mode {
        AttachedMode::Native => "native",
        AttachedMode::Generic => "generic",
    };
    dir.join(format!("xdp-link-{mode}-{interface}"))
}

/// The link the previous agent pinned for `interface` (an upgrade), unpinned: ours now.
fn take_pinned_link(dir: &Path, interface: &str) -> Option<(XdpLink, AttachedMode)> {
    for mode in [AttachedMode::Native, AttachedMode::Generic] {
        let path = link_pin(dir, interface, mode);
        if !path.exists() {
            continue;
        }
        let taken = PinnedLink::from_pin(&path)
            .map_err(anyhow::Error::from)
            .and_then(|pinned| Ok(pinned.unpin()?))
            .and_then(|fd_link| Ok(XdpLink::try_from(fd_link)?));
        match taken {
            Ok(link) => return Some((link, mode)),
            Err(err) => {
                tracing::warn!(%interface, "the previous agent's XDP link is unusable ({err:#}); attaching anew");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    None
}

/// Why one attach attempt failed.
enum AttachError {
    /// Another XDP program holds the interface (in this mode or the other).
    Busy(ProgramError),
    Other(ProgramError),
}

/// The guard's object, loaded (not yet verified); on an upgrade (`adopt`) its maps are
/// the ones the previous agent pinned in `pin_dir`.
fn load_object(pin_dir: Option<&Path>, adopt: bool) -> anyhow::Result<Ebpf> {
    if let Err(err) = crate::sys::raise_memlock_limit() {
        tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK; continuing");
    }
    let mut loader = EbpfLoader::new();
    if let (true, Some(dir)) = (adopt, pin_dir) {
        for name in super::maps::PINNED {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let ebpf = loader.load(XDP_OBJECT).context(
        "loading the XDP guard object failed: it needs root (or CAP_BPF + CAP_NET_ADMIN)",
    )?;
    if let Some(dir) = pin_dir {
        crate::ebpf::ensure_bpffs()?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(ebpf)
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
