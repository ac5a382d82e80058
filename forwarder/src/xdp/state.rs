//! The XDP rules changed at run time (`forwarder xdp allow|deny add|del`), kept across
//! restarts. The CLI writes the pinned maps only; the agent notices the change (it reads
//! the lists every second) and saves it as differences from the configuration's lists
//! in `<state dir>/<instance>/xdp-rules.json`, and once more when it stops. At the next
//! start it applies the configuration's lists, then these differences. Kept as
//! differences, a rule edited in the configuration still takes effect.
//!
//! The file is on disk (`Config::state_dir`, by default /var/lib/forwarder/<instance>),
//! not beside the pins: bpffs holds only BPF objects and, like /run, is empty after a
//! reboot.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{Cidr, List, XdpMaps};
use crate::config::XdpConfig;

/// The file's name in the instance's state directory.
pub const FILE: &str = "xdp-rules.json";

/// Run-time changes against the configuration's lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleChanges {
    #[serde(default)]
    pub allow_added: Vec<Cidr>,
    #[serde(default)]
    pub allow_removed: Vec<Cidr>,
    #[serde(default)]
    pub deny_added: Vec<Cidr>,
    #[serde(default)]
    pub deny_removed: Vec<Cidr>,
}

impl RuleChanges {
    /// What turns the lists `base` into `now` (each `(allow, deny)`).
    pub fn between(base: (&[Cidr], &[Cidr]), now: (&[Cidr], &[Cidr])) -> Self {
        let minus = |a: &[Cidr], b: &[Cidr]| {
            let mut v: Vec<Cidr> = a.iter().filter(|c| !b.contains(c)).copied().collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        Self {
            allow_added: minus(now.0, base.0),
            allow_removed: minus(base.0, now.0),
            deny_added: minus(now.1, base.1),
            deny_removed: minus(base.1, now.1),
        }
    }

    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    fn count(&self) -> usize {
        self.allow_added.len()
            + self.allow_removed.len()
            + self.deny_added.len()
            + self.deny_removed.len()
    }
}

/// The agent's side: the configuration's lists, the file, and what it holds.
pub struct RuleFile {
    path: PathBuf,
    base_allow: Vec<Cidr>,
    base_deny: Vec<Cidr>,
    saved: RuleChanges,
}

impl RuleFile {
    pub fn new(state_dir: &Path, config: &XdpConfig) -> Self {
        let parse = |list: &[String]| list.iter().filter_map(|t| t.parse().ok()).collect();
        Self {
            path: state_dir.join(FILE),
            base_allow: parse(&config.allow),
            base_deny: parse(&config.deny),
            saved: RuleChanges::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies the saved changes to `maps` (filled from the configuration). A missing
    /// file is no change; an unreadable one is reported and left as it is.
    pub fn restore(&mut self, maps: &mut XdpMaps) -> anyhow::Result<()> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => {
                return Err(err).with_context(|| format!("reading {}", self.path.display()));
            }
        };
        let changes: RuleChanges = serde_json::from_str(&text)
            .with_context(|| format!("{} is not an XDP rules file", self.path.display()))?;
        for (list, added, removed) in [
            (List::Allow, &changes.allow_added, &changes.allow_removed),
            (List::Deny, &changes.deny_added, &changes.deny_removed),
        ] {
            for cidr in removed {
                maps.remove(list, *cidr)?;
            }
            for cidr in added {
                maps.add(list, *cidr)?;
            }
        }
        tracing::info!(
            path = %self.path.display(),
            allow_added = changes.allow_added.len(),
            allow_removed = changes.allow_removed.len(),
            deny_added = changes.deny_added.len(),
            deny_removed = changes.deny_removed.len(),
            "xdp: run-time rule changes re-applied"
        );
        self.saved = changes;
        Ok(())
    }

    /// Saves the lists in `maps` if they changed since the last save (an empty change
    /// removes the file). Written to a temporary file and renamed: never half-written.
    pub fn save(&mut self, maps: &XdpMaps) -> anyhow::Result<()> {
        let now = RuleChanges::between(
            (&self.base_allow, &self.base_deny),
            (&maps.rules(List::Allow)?, &maps.rules(List::Deny)?),
        );
        if now == self.saved {
            return Ok(());
        }
        // Remembered first: a failing disk is reported once per change, not every second.
        self.saved = now.clone();
        if now.is_empty() {
            match std::fs::remove_file(&self.path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                    return Err(err).with_context(|| format!("removing {}", self.path.display()));
                }
                _ => {}
            }
        } else {
            let dir = self.path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let tmp = self.path.with_extension("json.tmp");
            let text = serde_json::to_string_pretty(&now)? + "\n";
            std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &self.path)
                .with_context(|| format!("renaming {} into place", tmp.display()))?;
        }
        tracing::info!(path = %self.path.display(), changes = now.count(),
            "xdp: run-time rule changes saved (re-applied at the next start)");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(texts: &[&str]) -> Vec<Cidr> {
        texts.iter().map(|t| t.parse().unwrap()).collect()
    }

    #[test]
    fn changes_are_differences_from_the_configuration() {
        let base = (cidrs(&["10.0.0.0/8"]), cidrs(&["192.0.2.1/32"]));
        let now = (
            cidrs(&["10.0.0.0/8", "2001:db8::/32"]),
            cidrs(&["198.51.100.0/24"]),
        );
        let changes = RuleChanges::between((&base.0, &base.1), (&now.0, &now.1));
        assert_eq!(changes.allow_added, cidrs(&["2001:db8::/32"]));
        assert!(changes.allow_removed.is_empty());
        assert_eq!(changes.deny_added, cidrs(&["198.51.100.0/24"]));
        assert_eq!(changes.deny_removed, cidrs(&["192.0.2.1/32"]));
        let text = serde_json::to_string(&changes).unwrap();
        assert!(text.contains("\"2001:db8::/32\""), "{text}");
        assert_eq!(serde_json::from_str::<RuleChanges>(&text).unwrap(), changes);
        assert!(RuleChanges::between((&base.0, &base.1), (&base.0, &base.1)).is_empty());
        assert!(serde_json::from_str::<RuleChanges>(r#"{"deny_added":["10.1.2.3/8"]}"#).is_err());
    }
}
