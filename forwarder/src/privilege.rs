//! Least privilege: once the programs are loaded and attached, the maps pinned and the
//! listeners bound, the agent becomes an ordinary user (`user = "NAME"`, `--user NAME`)
//! and keeps only the capabilities it still needs, so TLS and HTTP parsing never run as
//! root.
//!
//! Kept, and why:
//! - `CAP_BPF`: the agent updates its maps for every connection (the socket map, links,
//!   counters) and reads the verdict's ring buffer; with `kernel.unprivileged_bpf_disabled`
//!   set (the default on most distributions) every `bpf()` call needs it.
//! - `CAP_NET_ADMIN`: `SO_SNDBUFFORCE` on spliced sockets (the send buffer the redirect
//!   worker needs, beyond `net.core.wmem_max`), and detaching the programs at exit.
//! - `CAP_NET_BIND_SERVICE`: a reload that adds a frontend on a port below 1024.
//! - `CAP_PERFMON`: `forwarder upgrade` starts the agent's new binary, which loads its
//!   programs; the verifier accepts ours (pointers into maps and the stack) only with it.
//!
//! Everything else is dropped from the bounding set too, and `no_new_privs` is set. The
//! kept four are also made ambient, so the new binary of an upgrade starts with them
//! (and with nothing more: the bounding set holds).
//!
//! Capabilities are per thread and the change must reach every thread, so the agent does
//! it while it is still one thread: the privileged start-up runs on a single-threaded
//! runtime, then the serving runtime's threads are created by the unprivileged process.

use std::path::Path;

use anyhow::Context as _;

use crate::sys;

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The capabilities the agent keeps after start-up (a bit mask).
pub const KEPT: u64 =
    (1 << CAP_NET_BIND_SERVICE) | (1 << CAP_NET_ADMIN) | (1 << CAP_PERFMON) | (1 << CAP_BPF);

/// A user to become.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Target {
    /// Looks `name` up in the passwd database (a number is taken as a uid, with the
    /// same gid, for users without an entry).
    pub fn lookup(name: &str) -> anyhow::Result<Self> {
        if let Some((uid, gid)) =
            sys::user_ids(name).with_context(|| format!("looking up user {name:?}"))?
        {
            return Ok(Self {
                name: name.to_owned(),
                uid,
                gid,
            });
        }
        match name.parse::<u32>() {
            Ok(uid) => Ok(Self {
                name: name.to_owned(),
                uid,
                gid: uid,
            }),
            Err(_) => anyhow::bail!(
                "user {name:?} does not exist (create it, e.g. `useradd --system forwarder`)"
            ),
        }
    }
}

/// Becomes `target` with only `KEPT` capabilities. `own` are directories the agent must
/// still change as that user (its pin directory: it unpins its maps at exit). Refuses
/// unless the process is one thread.
pub fn drop_to(target: &Target, own: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    anyhow::ensure!(
        threads == 1,
        "cannot drop privileges with {threads} threads running (capabilities are per thread)"
    );
    anyhow::ensure!(
        target.uid != 0,
        "user {:?} is root: nothing to drop",
        target.name
    );
    for dir in own {
        give(dir, target)?;
    }
    sys::drop_bounding_set_except(KEPT).context("dropping the capability bounding set")?;
    sys::set_keep_capabilities(true).context("PR_SET_KEEPCAPS")?;
    sys::set_user(target.uid, target.gid)
        .with_context(|| format!("switching to user {:?}", target.name))?;
    sys::set_keep_capabilities(false).context("PR_SET_KEEPCAPS")?;
    sys::set_capabilities(KEPT).context("setting the kept capabilities")?;
    sys::raise_ambient(KEPT).context("making the kept capabilities ambient")?;
    sys::set_no_new_privileges().context("PR_SET_NO_NEW_PRIVS")?;
    tracing::info!(
        user = %target.name,
        uid = target.uid,
        gid = target.gid,
        "privileges dropped: keeping CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE only"
    );
    Ok(())
}

/// For an agent started as an ordinary user with capabilities (systemd `User=` with
/// `AmbientCapabilities=`): keeps only the `KEPT` capabilities it was given. Lowering
/// needs no privilege; the process must still be one thread.
pub fn trim() -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let threads = status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse::<u32>().ok());
    anyhow::ensure!(
        threads == Some(1),
        "cannot trim capabilities with {threads:?} threads running (capabilities are per thread)"
    );
    let permitted = status
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .context("no CapPrm in /proc/self/status")?;
    sys::set_capabilities(KEPT & permitted).context("trimming capabilities")?;
    sys::raise_ambient(KEPT & permitted).context("making the kept capabilities ambient")?;
    sys::set_no_new_privileges().context("PR_SET_NO_NEW_PRIVS")?;
    tracing::info!(
        kept = format!("{:#x}", KEPT & permitted),
        "capabilities trimmed to CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE (those given)"
    );
    Ok(())
}

/// Hands a directory tree (not its files' contents) to `target`.
fn give(dir: &Path, target: &Target) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    std::os::unix::fs::chown(dir, Some(target.uid), Some(target.gid))
        .with_context(|| format!("giving {} to user {:?}", dir.display(), target.name))?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            give(&entry.path(), target)?;
        } else {
            // Pinned maps: `forwarder upgrade`'s new agent, started as this user, opens them.
            std::os::unix::fs::chown(entry.path(), Some(target.uid), Some(target.gid))
                .with_context(|| {
                    format!(
                        "giving {} to user {:?}",
                        entry.path().display(),
                        target.name
                    )
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_name_or_number() {
        let root = Target::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(Target::lookup("4242").unwrap().uid, 4242);
        let err = Target::lookup("no-such-user-here").unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn the_kept_set_is_exactly_four_capabilities() {
        assert_eq!(KEPT.count_ones(), 4);
        assert_eq!(KEPT, 0xc0_0000_1400);
    }
}
