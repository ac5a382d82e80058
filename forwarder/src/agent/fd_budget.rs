//! File descriptors against connection caps. A shell's soft limit of 1,024 fds serves
//! about 500 spliced devices and then accepts nothing (EMFILE), so the agent raises the
//! soft limit to the hard one at start, and keeps its connections within what the
//! limit allows: the agent-wide cap defaults to it, so the limit is never hit.

use crate::config::Config;

/// fds the agent keeps for itself beyond its connections (listeners, maps, epoll sets,
/// the log ring, the HTTPS path's pooled upstream connections): an eighth of the limit,
/// between these bounds, so a small limit still serves most of what it can.
const RESERVED_MIN: u64 = 64;
const RESERVED_MAX: u64 = 1_024;
/// fds one client connection needs at most: its own socket and its upstream's.
const PER_CONNECTION: u64 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    /// RLIMIT_NOFILE in force.
    pub limit: u64,
}

impl FdBudget {
    /// Raises the soft limit to the hard one, and reads what is in force.
    pub fn raise() -> Self {
        match crate::sys::raise_nofile_limit() {
            Ok(limit) => Self { limit },
            Err(err) => {
                let limit = crate::sys::nofile_limits().map_or(1_024, |(soft, _)| soft);
                tracing::warn!(%err, limit, "could not raise the fd limit");
                Self { limit }
            }
        }
    }

    /// What this process could raise its limit to (for `forwarder check`).
    pub fn hard() -> Self {
        Self {
            limit: crate::sys::nofile_limits().map_or(1_024, |(_, hard)| hard),
        }
    }

    fn reserved(&self) -> u64 {
        (self.limit / 8).clamp(RESERVED_MIN, RESERVED_MAX)
    }

    /// Client connections the limit holds.
    pub fn connections(&self) -> usize {
        let n = self.limit.saturating_sub(self.reserved()) / PER_CONNECTION;
        usize::try_from(n).unwrap_or(usize::MAX).max(1)
    }

    /// The agent-wide cap: as configured, else what the limit holds.
    pub fn agent_cap(&self, config: &Config) -> usize {
        config.max_connections.unwrap_or_else(|| self.connections())
    }

    /// Configured caps the limit cannot hold: the agent would run out of fds first.
    pub fn warnings(&self, config: &Config) -> Vec<String> {
        let fits = self.connections();
        let mut warnings = Vec::new();
        if let Some(max) = config.max_connections
            && max > fits
        {
            warnings.push(format!(
                "max_connections = {max}, but the fd limit ({}) holds about {fits} connections \
                 ({PER_CONNECTION} fds each, {} kept): accepts will fail with EMFILE \
                 first; raise LimitNOFILE (or ulimit -Hn) or lower the cap",
                self.limit,
                self.reserved()
            ));
        }
        if config.max_connections.is_none() {
            for f in &config.frontends {
                if let Some(max) = f.max_connections
                    && max > fits
                {
                    warnings.push(format!(
                        "frontend {:?}: max_connections = {max}, but the fd limit ({}) holds \
                         about {fits} connections: the agent takes at most {fits} at once \
                         (more wait in the accept queue); raise LimitNOFILE (or ulimit -Hn)",
                        f.name, self.limit
                    ));
                }
            }
        }
        warnings
    }

    /// One line at start: the budget and the caps in force.
    pub fn log(&self, config: &Config) {
        let frontends: usize = config
            .frontends
            .iter()
            .map(|f| f.max_connections())
            .fold(0, usize::saturating_add);
        tracing::info!(
            fd_limit = self.limit,
            agent_max_connections = self.agent_cap(config),
            frontends_max_connections = frontends,
            "connection budget: the agent holds at most agent_max_connections clients at once"
        );
        for warning in self.warnings(config) {
            tracing::warn!("{warning}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Backend, Frontend, Mode};

    fn config() -> Config {
        Config::new(
            "t",
            vec![Frontend::new(
                "mqtt",
                "127.0.0.1:0".parse().unwrap(),
                Mode::Splice,
                "hub",
            )],
            vec![Backend::new("hub", "127.0.0.1:1")],
        )
    }

    #[test]
    fn the_agent_cap_defaults_to_what_the_fds_hold() {
        let budget = FdBudget { limit: 21_024 };
        let mut c = config();
        assert_eq!(budget.connections(), 10_000);
        assert_eq!(budget.agent_cap(&c), 10_000);
        assert!(budget.warnings(&c).is_empty(), "defaults never warn");
        c.frontends[0].max_connections = Some(50_000);
        assert_eq!(budget.warnings(&c).len(), 1);
        c.max_connections = Some(20_000);
        assert_eq!(budget.agent_cap(&c), 20_000);
        let warnings = budget.warnings(&c);
        assert!(
            warnings.len() == 1 && warnings[0].contains("EMFILE"),
            "{warnings:?}"
        );
        assert_eq!(FdBudget { limit: 10 }.connections(), 1);
        // A shell's limit still serves most of what it can.
        assert_eq!(FdBudget { limit: 1_024 }.connections(), 448);
    }
}
