//! One agent per instance. A second agent with the same instance name would delete the
//! live agent's pins as "stale", take a share of its connections through SO_REUSEPORT,
//! and remove the pins on exit. So an agent first takes an exclusive `flock` on
//! `/run/forwarder/<instance>.lock` and refuses to start, touching nothing, while
//! another holds it. The kernel drops the lock when the process ends, however it ends,
//! so a crash leaves no stale lock behind.

use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::sys;

/// Where the lock files live (a tmpfs: gone at reboot, like the agents).
pub const LOCK_DIR: &str = "/run/forwarder";

/// Held while the agent runs; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    path: PathBuf,
}

impl InstanceLock {
    /// Takes the instance's lock, or says which agent holds it.
    pub fn acquire(instance: &str) -> anyhow::Result<Self> {
        Self::acquire_in(Path::new(LOCK_DIR), instance)
    }

    pub fn acquire_in(dir: &Path, instance: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        check_not_writable_by_others(dir)?;
        let path = dir.join(format!("{instance}.lock"));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if let Err(err) = sys::lock_exclusive_now(&file) {
            if err.kind() == io::ErrorKind::WouldBlock {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                anyhow::bail!(
                    "another agent with instance {instance:?} is running (pid {}, lock {}): \
                     stop it first, or give this one another `instance`",
                    holder.trim(),
                    path.display()
                );
            }
            return Err(err).with_context(|| format!("locking {}", path.display()));
        }
        // Ours now: say who holds it, for the next one's message.
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file, path })
    }

    /// Takes over the lock the previous agent held (an upgrade passed its descriptor: the
    /// same open file, so the same `flock`), after checking it is this instance's file.
    pub fn inherit(fd: std::os::fd::OwnedFd, instance: &str) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd as _;
        let path = Path::new(LOCK_DIR).join(format!("{instance}.lock"));
        let named = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .context("reading the handed-over lock's path")?;
        anyhow::ensure!(
            named == path,
            "the previous agent's lock is {}, this instance's is {}: the new configuration \
             must keep the instance name",
            named.display(),
            path.display()
        );
        let mut file = File::from(fd);
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        Ok(Self { _file: file, path })
    }

    /// Writes this process's pid into the lock file again (a failed upgrade's new agent
    /// wrote its own before it gave up).
    pub fn claim(&self) -> io::Result<()> {
        let mut file = &self._file;
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())
    }

    /// The pid written in an instance's lock file (the agent holding it, or the last one).
    pub fn holder(instance: &str) -> anyhow::Result<u32> {
        let path = Path::new(LOCK_DIR).join(format!("{instance}.lock"));
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("no agent of instance {instance:?} ({})", path.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{} holds no pid", path.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock's descriptor, for an upgrade to hand over.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self._file.as_fd()
    }
}

/// Refuses a directory that another user could write to: they could swap the files an
/// agent running as root trusts.
pub fn check_not_writable_by_others(dir: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    let euid = sys::effective_uid();
    anyhow::ensure!(
        meta.uid() == 0 || meta.uid() == euid,
        "{} belongs to uid {}, not to root or this agent (uid {euid}): refusing to use it",
        dir.display(),
        meta.uid()
    );
    anyhow::ensure!(
        meta.mode() & 0o022 == 0,
        "{} is writable by group or others (mode {:o}): refusing to use it",
        dir.display(),
        meta.mode() & 0o7777
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("fwd-lock-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = scratch("twice");
        let first = InstanceLock::acquire_in(&dir, "edge").unwrap();
        let err = InstanceLock::acquire_in(&dir, "edge")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("another agent") && err.contains(&std::process::id().to_string()),
            "{err}"
        );
        assert!(InstanceLock::acquire_in(&dir, "other").is_ok());
        drop(first);
        assert!(InstanceLock::acquire_in(&dir, "edge").is_ok());
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = scratch("mode");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = InstanceLock::acquire_in(&dir, "edge")
            .unwrap_err()
            .to_string();
        assert!(err.contains("writable by group or others"), "{err}");
    }
}
