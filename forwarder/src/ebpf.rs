//! Loads the embedded eBPF object, attaches the splice verdict to the socket map,
//! and wraps the maps in typed calls the rest of the agent uses.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::mpsc;

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, MapError, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::sys::SyscallError;
use aya::{Ebpf, EbpfLoader};
use forwarder_common::{ConnInfo, NAME_LEN, PeerLink, SockCounters, StatKey, names};

use crate::l4::session::HandedSession;
use crate::l4::supervisor::Supervisor;
use crate::sys;

/// The eBPF object built by build.rs from `forwarder-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/forwarder-ebpf"));

/// Why a pair of sockets could not be spliced in the kernel. Each kind has its own
/// userspace fallback counter.
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("the socket map is full")]
    MapFull,
    #[error("a socket is no longer established (closed during set-up)")]
    NotEstablished,
    #[error("socket map update failed: {0}")]
    Io(#[source] io::Error),
}

impl SpliceError {
    fn from_map(err: MapError) -> Self {
        let io_error = match err {
            MapError::SyscallError(SyscallError { io_error, .. }) => io_error,
            MapError::IoError(io_error) => io_error,
            other => return Self::Io(io::Error::other(other)),
        };
        Self::from_io(io_error)
    }

    fn from_io(io_error: io::Error) -> Self {
        match io_error.raw_os_error() {
            Some(libc::E2BIG) | Some(libc::ENOMEM) | Some(libc::ENOSPC) => Self::MapFull,
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Self::NotEstablished,
            _ => Self::Io(io_error),
        }
    }
}

struct Maps {
    socks: SockHash<MapData, u64>,
    links: HashMap<MapData, u64, PeerLink>,
    counters: HashMap<MapData, u64, SockCounters>,
    conns: HashMap<MapData, u64, ConnInfo>,
    stats: HashMap<MapData, StatKey, u64>,
}

/// Where to put the maps so `forwarder conns|stats|maps` can read them while we run.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Pin the maps under this directory (created, and removed again on drop).
    pub pin_dir: Option<PathBuf>,
    /// Reuse the maps pinned there by the agent this one upgrades (see `crate::upgrade`),
    /// instead of removing them as a crashed agent's.
    pub adopt: bool,
}

/// The maps pinned for the CLI and for an upgrade's next agent (the event ring too: the
/// spliced sockets' verdict reports into it, whichever agent reads it).
const PINNED: [&str; 6] = [
    names::SOCKS,
    names::LINKS,
    names::COUNTERS,
    names::CONNS,
    names::STATS,
    names::EVENTS,
];

/// The loaded and attached eBPF data path. Dropping it detaches the programs.
pub struct Datapath {
    // Owns the programs: they stay attached while this lives.
    ebpf: Mutex<Ebpf>,
    maps: Mutex<Maps>,
    pin_dir: Option<PathBuf>,
    /// Set when an upgrade's new agent took the maps over: the pins stay at drop.
    leave_pins: AtomicBool,
    /// The instance's lock: let go only after the pins are gone (fields drop after `drop`).
    instance_lock: Option<std::sync::Arc<crate::instance_lock::InstanceLock>>,
    /// The verdict's event ring until the supervisor takes it, then the supervisor: it
    /// starts with the first splice, on the runtime that serves the sessions.
    supervision: Mutex<Supervision>,
    /// During an upgrade: where spliced sessions hand themselves over (`crate::upgrade`).
    handover: Mutex<Option<mpsc::UnboundedSender<Box<HandedSession>>>>,
}

enum Supervision {
    NotStarted(RingBuf<MapData>),
    Running(std::sync::Arc<Supervisor>),
    Failed,
}

/// The two cookies of a spliced pair, needed to read counters and to undo the splice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplicedPair {
    pub client: u64,
    pub upstream: u64,
}

impl SplicedPair {
    /// Reads both sockets' cookies.
    pub fn of(client: BorrowedFd<'_>, upstream: BorrowedFd<'_>) -> io::Result<Self> {
        Ok(Self {
            client: sys::socket_cookie(client)?,
            upstream: sys::socket_cookie(upstream)?,
        })
    }
}

/// The link of a socket whose redirects may reach `limit`: the verdict reports when half
/// the budget (`lag_budget`) is left, so the agent moves it along in time.
pub fn peer_link(peer_cookie: u64, limit: u64, lag_budget: u64, passed_mark: u64) -> PeerLink {
    PeerLink {
        peer_cookie,
        redirect_limit: limit,
        passed_mark,
        refresh_at: limit.saturating_sub(lag_budget / 2),
    }
}

impl Datapath {
    /// Loads the object into the kernel and attaches the stream verdict to the socket map.
    /// Fails (it never falls back silently) when the kernel refuses either step.
    pub fn load(options: &LoadOptions) -> anyhow::Result<Self> {
        if let Err(err) = sys::raise_memlock_limit() {
            tracing::debug!(%err, "could not raise RLIMIT_MEMLOCK; continuing");
        }
        if let Some(dir) = &options.pin_dir {
            prepare_pin_dir(dir, options.adopt)?;
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &options.pin_dir {
            // Pinned as they are created, or (an upgrade) the running agent's maps reused:
            // its spliced sockets and their verdict program live on in them.
            for name in PINNED {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).context(
            "loading the eBPF object failed: the agent needs root (or CAP_BPF + CAP_NET_ADMIN) \
             and a kernel with BPF sockmap support (the 2025 sockmap fixes are in 6.1.142, 6.6.94, \
             6.12.34, 6.15.3 and >= 6.16; tested: 6.18)",
        )?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} is missing from the eBPF object"))
        };
        let socks: SockHash<MapData, u64> = take(&mut ebpf, names::SOCKS)?.try_into()?;
        let links: HashMap<MapData, u64, PeerLink> = take(&mut ebpf, names::LINKS)?.try_into()?;
        let counters: HashMap<MapData, u64, SockCounters> =
            take(&mut ebpf, names::COUNTERS)?.try_into()?;
        let conns: HashMap<MapData, u64, ConnInfo> = take(&mut ebpf, names::CONNS)?.try_into()?;
        let stats: HashMap<MapData, StatKey, u64> = take(&mut ebpf, names::STATS)?.try_into()?;
        let events: RingBuf<MapData> = take(&mut ebpf, names::EVENTS)?.try_into()?;

        let verdict: &mut SkSkb = ebpf
            .program_mut(names::VERDICT)
            .context("the splice verdict program is missing from the eBPF object")?
            .try_into()?;
        verdict
            .load()
            .context("the kernel verifier rejected the splice verdict program")?;
        verdict.attach(socks.fd()).context(
            "attaching the stream verdict to the socket map failed (CONFIG_BPF_STREAM_PARSER?)",
        )?;

        let pin_dir = options.pin_dir.clone();
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            maps: Mutex::new(Maps {
                socks,
                links,
                counters,
                conns,
                stats,
            }),
            pin_dir,
            // Until the previous agent has handed everything over, its pins are its own.
            leave_pins: AtomicBool::new(options.adopt),
            instance_lock: None,
            supervision: Mutex::new(Supervision::NotStarted(events)),
            handover: Mutex::new(None),
        })
    }

    /// Keeps the instance's lock until this data path (and its pins) is gone.
    pub fn holding(mut self, lock: std::sync::Arc<crate::instance_lock::InstanceLock>) -> Self {
        self.instance_lock = Some(lock);
        self
    }

    /// The wake-up sources of spliced sessions (started on first use, on the calling
    /// task's runtime).
    pub fn supervisor(&self) -> io::Result<std::sync::Arc<Supervisor>> {
        let mut supervision = self
            .supervision
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let started = match std::mem::replace(&mut *supervision, Supervision::Failed) {
            Supervision::Running(supervisor) => supervisor,
            Supervision::NotStarted(events) => std::sync::Arc::new(Supervisor::start(events)?),
            Supervision::Failed => {
                return Err(io::Error::other("the splice supervisor failed to start"));
            }
        };
        *supervision = Supervision::Running(started.clone());
        Ok(started)
    }

    /// Starts an upgrade's hand-over: every spliced session packs itself up and goes to
    /// `sessions` (see `hand_over`).
    pub fn begin_handover(&self, sessions: mpsc::UnboundedSender<Box<HandedSession>>) {
        *self.handover.lock().unwrap_or_else(|p| p.into_inner()) = Some(sessions);
        if let Ok(supervisor) = self.supervisor() {
            supervisor.begin_handover();
        }
    }

    /// Sends a session to the next agent; gives it back when the hand-over is not (or no
    /// longer) possible.
    pub fn hand_over(&self, session: Box<HandedSession>) -> Result<(), Box<HandedSession>> {
        let handover = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        match handover.as_ref() {
            Some(sessions) => sessions.send(session).map_err(|e| e.0),
            None => Err(session),
        }
    }

    /// The next agent owns the maps now: leave the pins when this one goes.
    pub fn leave_pins(&self) {
        self.leave_pins.store(true, Ordering::Release);
    }

    /// The pins are ours now (an upgrade's hand-over is complete): removed at our exit.
    pub fn own_pins(&self) {
        self.leave_pins.store(false, Ordering::Release);
    }

    /// Attaches our verdict to the socket map again: a failed upgrade's new agent may have
    /// replaced it (and detached its own on exit), and new connections need one.
    pub fn reattach_verdict(&self) -> anyhow::Result<()> {
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        let maps = self.maps();
        let verdict: &mut SkSkb = ebpf
            .program_mut(names::VERDICT)
            .context("the splice verdict program is missing")?
            .try_into()?;
        verdict
            .attach(maps.socks.fd())
            .context("attaching the stream verdict to the socket map again")?;
        Ok(())
    }

    /// The aya-log reader for this object's log records, for the agent to drive.
    pub fn logger(&self) -> anyhow::Result<aya_log::EbpfLogger<&'static dyn log::Log>> {
        // As with the maps: a panic elsewhere leaves the object usable.
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|p| p.into_inner());
        aya_log::EbpfLogger::init(&mut ebpf).context("attaching the eBPF log reader failed")
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        // A panic while holding the lock leaves the maps usable: recover the guard.
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Hands a connected pair to the kernel. On success every byte either socket receives
    /// from now on, and every byte already waiting in its receive queue, is redirected to
    /// the other socket in the kernel.
    ///
    /// Order matters: both sockets first get links and zeroed counters and a receive
    /// low-water mark so high that the kernel does not run the verdict; only once both are
    /// in the socket map is the mark dropped to 1, which runs the verdict over whatever is
    /// queued. So no byte meets a verdict while its peer is missing from the map, except
    /// after a FIN or under receive-memory pressure (both override the mark); the verdict
    /// then passes it to userspace and `SockCounters::passed_bytes` says so.
    ///
    /// `lag_budget` bounds what the kernel redirects ahead of what each peer has sent on
    /// (`NO_LIMIT` for none); keep it current with `set_link`.
    pub fn splice(
        &self,
        pair: SplicedPair,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        lag_budget: u64,
    ) -> Result<(), SpliceError> {
        for fd in [client, upstream] {
            sys::set_rcvlowat(fd, libc::c_int::MAX).map_err(SpliceError::Io)?;
        }
        let result = self.insert_pair(pair, client, upstream, lag_budget);
        // Release whatever the mark held back: through the verdict if inserted, or to the
        // userspace path if not.
        for fd in [client, upstream] {
            let _ = sys::set_rcvlowat(fd, 1);
        }
        result
    }

    fn insert_pair(
        &self,
        pair: SplicedPair,
        client: BorrowedFd<'_>,
        upstream: BorrowedFd<'_>,
        lag_budget: u64,
    ) -> Result<(), SpliceError> {
        let mut maps = self.maps();
        // Into the socket map upstream first: until both are in, a byte the verdict sees
        // on the first one has no peer and goes to userspace. The `SO_RCVLOWAT` hold keeps
        // queued bytes from the verdict, but not under memory pressure, which a client
        // sending megabytes right after connecting reaches; the upstream speaks when asked.
        let sides = [(pair.upstream, upstream), (pair.client, client)];
        let cookies = [pair.client, pair.upstream];
        let links = [
            peer_link(pair.upstream, lag_budget, lag_budget, 0),
            peer_link(pair.client, lag_budget, lag_budget, 0),
        ];
        // Both sides' entries of each map in one call each (set-up cost per connection).
        let mut inserted = 0;
        let mut outcome = sys::map_update_batch(&maps.links, &cookies, &links)
            .and_then(|()| {
                sys::map_update_batch(&maps.counters, &cookies, &[SockCounters::default(); 2])
            })
            .map_err(SpliceError::from_io);
        if outcome.is_ok() {
            for (cookie, fd) in sides {
                if let Err(err) = maps.socks.insert(cookie, fd.as_raw_fd(), 0) {
                    outcome = Err(SpliceError::from_map(err));
                    break;
                }
                inserted += 1;
            }
        }
        if outcome.is_err() {
            for (cookie, _) in &sides[..inserted] {
                let _ = maps.socks.remove(cookie);
            }
            for cookie in cookies {
                let _ = maps.links.remove(&cookie);
                let _ = maps.counters.remove(&cookie);
            }
        }
        outcome
    }

    /// What the kernel did with the bytes `cookie`'s socket received.
    pub fn counters(&self, cookie: u64) -> io::Result<SockCounters> {
        self.maps()
            .counters
            .get(&cookie, 0)
            .map_err(io::Error::other)
    }

    /// Moves `cookie`'s lag budget (see `peer_link`): the verdict redirects while its
    /// `redirected_bytes` stays at or below the limit and its `passed_bytes` equals the
    /// passed mark.
    pub fn set_link(&self, cookie: u64, link: &PeerLink) -> io::Result<()> {
        self.maps()
            .links
            .insert(cookie, *link, 0)
            .map_err(io::Error::other)
    }

    /// Lists a connection for `forwarder conns` (keyed by the client socket's cookie).
    /// Also used to refresh a userspace connection's byte counts.
    pub fn register_conn(&self, client_cookie: u64, info: &ConnInfo) -> io::Result<()> {
        self.maps()
            .conns
            .insert(client_cookie, info, 0)
            .map_err(io::Error::other)
    }

    /// A connection's listing, if it has one.
    pub fn conn_info(&self, client_cookie: u64) -> Option<ConnInfo> {
        self.maps().conns.get(&client_cookie, 0).ok()
    }

    pub fn forget_conn(&self, client_cookie: u64) {
        let _ = self.maps().conns.remove(&client_cookie);
    }

    /// Publishes one frontend's counters for `forwarder stats`.
    pub fn publish_stats(&self, frontend: &str, counters: &[(&str, u64)]) -> io::Result<()> {
        let mut maps = self.maps();
        for (name, value) in counters {
            let key = StatKey {
                frontend: padded_name(frontend),
                counter: padded_name(name),
            };
            maps.stats.insert(key, value, 0).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Drops a removed frontend's counters from `FWD_STATS`.
    pub fn forget_stats(&self, frontend: &str) {
        let name = padded_name(frontend);
        let mut maps = self.maps();
        let keys: Vec<StatKey> = maps
            .stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.frontend == name)
            .collect();
        for key in keys {
            let _ = maps.stats.remove(&key);
        }
    }

    /// Every socket's counters (cookie, counters): for the CLI and the tests.
    pub fn all_counters(&self) -> Vec<(u64, SockCounters)> {
        self.maps().counters.iter().filter_map(Result::ok).collect()
    }

    /// Takes a pair out of the kernel path and forgets its counters. Closing a socket
    /// removes it from the socket map by itself; links and counters are ours to delete.
    pub fn unsplice(&self, pair: SplicedPair) {
        let mut maps = self.maps();
        for cookie in [pair.client, pair.upstream] {
            let _ = maps.socks.remove(&cookie);
            let _ = maps.links.remove(&cookie);
            let _ = maps.counters.remove(&cookie);
        }
    }

    /// Forgets a pair whose sockets are closed: closing took them out of the socket map,
    /// so only links and counters are left to delete (two map calls fewer than `unsplice`).
    pub fn release(&self, pair: SplicedPair) {
        let mut maps = self.maps();
        let cookies = [pair.client, pair.upstream];
        // One call per map; if an entry is missing, the kernel stops there: go one by one.
        if sys::map_delete_batch(&maps.links, &cookies).is_err() {
            for cookie in &cookies {
                let _ = maps.links.remove(cookie);
            }
        }
        if sys::map_delete_batch(&maps.counters, &cookies).is_err() {
            for cookie in &cookies {
                let _ = maps.counters.remove(cookie);
            }
        }
    }

    /// Number of (sockets in the map, link entries, counter entries): for leak checks.
    pub fn entry_counts(&self) -> (usize, usize, usize) {
        let maps = self.maps();
        (
            maps.socks.keys().count(),
            maps.links.keys().count(),
            maps.counters.keys().count(),
        )
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if self.leave_pins.load(Ordering::Acquire) {
            return;
        }
        if let Some(dir) = &self.pin_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Makes the pin directory ready: checked, and emptied of a crashed agent's pins unless
/// `adopt` (an upgrade takes the running agent's maps over; then their layout must be
/// the one this binary's programs expect).
fn prepare_pin_dir(dir: &Path, adopt: bool) -> anyhow::Result<()> {
    ensure_bpffs()?;
    if let Some(root) = dir.parent() {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        // The CLI (as root) trusts what it finds here.
        crate::instance_lock::check_not_writable_by_others(root)?;
    }
    if adopt {
        return check_adoptable(dir);
    }
    if dir.exists() {
        // Left by an agent that crashed: its maps are not ours and nothing uses them.
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing stale pins in {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// The running agent's pinned maps have the key and value sizes this binary uses: a new
/// binary whose maps changed shape cannot take them over (it needs a restart).
fn check_adoptable(dir: &Path) -> anyhow::Result<()> {
    use std::mem::size_of;
    let expected = [
        (names::SOCKS, size_of::<u64>(), size_of::<u32>()),
        (names::LINKS, size_of::<u64>(), size_of::<PeerLink>()),
        (names::COUNTERS, size_of::<u64>(), size_of::<SockCounters>()),
        (names::CONNS, size_of::<u64>(), size_of::<ConnInfo>()),
        (names::STATS, size_of::<StatKey>(), size_of::<u64>()),
    ];
    for (name, key, value) in expected {
        let path = dir.join(name);
        let info = aya::maps::MapInfo::from_pin(&path)
            .with_context(|| format!("opening the running agent's map {}", path.display()))?;
        anyhow::ensure!(
            info.key_size() as usize == key && info.value_size() as usize == value,
            "map {name} of the running agent has {}-byte keys and {}-byte values, this binary \
             uses {key} and {value}: the new version cannot take its connections over (restart \
             it instead)",
            info.key_size(),
            info.value_size()
        );
    }
    anyhow::ensure!(
        dir.join(names::EVENTS).exists(),
        "the running agent pinned no {}: it is too old to be upgraded in place (restart it)",
        names::EVENTS
    );
    Ok(())
}

/// Mounts bpffs on /sys/fs/bpf if nothing is mounted there (a fresh machine has none).
pub(crate) fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .status()
        .context("running mount -t bpf")?;
    anyhow::ensure!(status.success(), "mounting bpffs on /sys/fs/bpf failed");
    Ok(())
}

/// A name as the inspection maps store it: NUL-padded, cut at `NAME_LEN` bytes.
pub fn padded_name(name: &str) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let bytes = name.as_bytes();
    let n = bytes.len().min(NAME_LEN);
    out[..n].copy_from_slice(&bytes[..n]);
    out
}

/// The name back from its NUL-padded form.
pub fn name_from_bytes(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The pin directory of an agent instance.
pub fn pin_dir_for(instance: &str) -> PathBuf {
    Path::new(names::PIN_ROOT).join(instance)
}
