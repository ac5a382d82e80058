//! The kernel floor for the splice: sockmap data-loss and crash fixes landed in 2025
//! (CVE-2025-38165, and the April 2025 fixes for lost or duplicated bytes on sockmap
//! redirect). They are in 6.1.142, 6.6.94, 6.12.34, 6.15.3 and every release from 6.16
//! on. Other stable lines older than 6.16 never got them (6.13 and 6.14 went end of life
//! first), so they count as below the floor. Below it the agent serves its splice
//! frontends in userspace unless told otherwise (`--allow-old-kernel`), as a distribution
//! kernel may carry the fixes under an older version number.

use std::fmt;

/// First release of each stable line with the fixes; a line not listed (and older than
/// 6.16) has none.
const FIXED_IN: [(u32, u32, u32); 4] = [(6, 1, 142), (6, 6, 94), (6, 12, 34), (6, 15, 3)];
/// Every release from this one on has the fixes.
const FIXED_FROM: (u32, u32) = (6, 16);

/// How the floor is written in messages and `forwarder check`.
pub const FLOOR: &str = "6.1.142, 6.6.94, 6.12.34, 6.15.3 or >= 6.16";

/// `major.minor.patch` of a `uname -r` release string: "6.12.34+deb13-amd64" is
/// (6, 12, 34), "6.18.0-1-amd64" (6, 18, 0), "6.16-rc3" (6, 16, 0). `None` when it does
/// not start with `major.minor`.
pub fn parse_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut numbers = release.trim().split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        (digits.parse::<u32>().ok(), digits.len() == part.len())
    });
    let (major, whole) = numbers.next()?;
    let major = major?;
    if !whole {
        return None;
    }
    let (minor, whole) = numbers.next()?;
    let minor = minor?;
    // "6.16-rc3": the minor ends the numbers; so does a missing patch.
    let patch = if whole {
        numbers.next().and_then(|(patch, _)| patch).unwrap_or(0)
    } else {
        0
    };
    Some((major, minor, patch))
}

/// Whether a kernel version carries the sockmap fixes.
pub fn sockmap_fixed((major, minor, patch): (u32, u32, u32)) -> bool {
    if (major, minor) >= FIXED_FROM {
        return true;
    }
    FIXED_IN
        .iter()
        .any(|&(ma, mi, p)| (major, minor) == (ma, mi) && patch >= p)
}

/// The running kernel against the floor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// The release carries the fixes.
    Fixed(String),
    /// Below the floor: the splice can lose or duplicate bytes.
    BelowFloor(String),
    /// The release could not be read or parsed.
    Unknown(String),
}

impl Status {
    pub fn of(release: &str) -> Self {
        match parse_release(release) {
            Some(version) if sockmap_fixed(version) => Self::Fixed(release.to_owned()),
            Some(_) => Self::BelowFloor(release.to_owned()),
            None => Self::Unknown(release.to_owned()),
        }
    }

    /// The running kernel's (`/proc/sys/kernel/osrelease`, what `uname -r` prints).
    pub fn running() -> Self {
        match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            Ok(release) => Self::of(release.trim()),
            Err(err) => Self::Unknown(format!("unreadable: {err}")),
        }
    }

    /// Whether the agent splices on this kernel by default. An unparseable release is
    /// given the benefit of the doubt (it loads the program or fails clearly).
    pub fn splice_by_default(&self) -> bool {
        !matches!(self, Self::BelowFloor(_))
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(r) => write!(f, "{r}: has the 2025 sockmap fixes (floor {FLOOR})"),
            Self::BelowFloor(r) => write!(
                f,
                "{r}: below the sockmap floor ({FLOOR}; CVE-2025-38165 and the 2025 \
                 data-loss fixes): splice frontends are served in userspace unless \
                 --allow-old-kernel is given"
            ),
            Self::Unknown(r) => write!(f, "{r}: release not recognised, floor {FLOOR} not checked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_as_uname_prints_them() {
        assert_eq!(parse_release("6.18.0-1-amd64"), Some((6, 18, 0)));
        assert_eq!(parse_release("6.1.141"), Some((6, 1, 141)));
        assert_eq!(parse_release("6.1.142-cloud"), Some((6, 1, 142)));
        assert_eq!(parse_release("5.15.0"), Some((5, 15, 0)));
        assert_eq!(parse_release("6.12.34+deb13"), Some((6, 12, 34)));
        assert_eq!(parse_release("6.12.34+deb13-amd64\n"), Some((6, 12, 34)));
        assert_eq!(parse_release("6.18.44-fc-v782"), Some((6, 18, 44)));
        assert_eq!(parse_release("6.16-rc3"), Some((6, 16, 0)));
        assert_eq!(parse_release("6.16"), Some((6, 16, 0)));
        assert_eq!(parse_release(""), None);
        assert_eq!(parse_release("linux"), None);
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("6a.1.2"), None);
    }

    #[test]
    fn the_floor_follows_the_stable_lines() {
        let fixed = |r: &str| sockmap_fixed(parse_release(r).unwrap());
        for ok in [
            "6.1.142-cloud",
            "6.6.94",
            "6.6.100",
            "6.12.34+deb13",
            "6.15.3",
            "6.16.0",
            "6.18.0-1-amd64",
            "7.0.1",
        ] {
            assert!(fixed(ok), "{ok} has the fixes");
        }
        for old in [
            "6.1.141", "6.6.93", "6.12.33", "6.15.2", "6.14.11", "6.13.12", "6.8.0-60", "5.15.0",
            "4.19.300",
        ] {
            assert!(!fixed(old), "{old} is below the floor");
        }
    }

    #[test]
    fn status_says_what_the_agent_does() {
        assert!(Status::of("6.12.34+deb13").splice_by_default());
        let old = Status::of("5.15.0");
        assert_eq!(old, Status::BelowFloor("5.15.0".into()));
        assert!(!old.splice_by_default());
        assert!(old.to_string().contains("--allow-old-kernel"));
        assert!(Status::of("weird").splice_by_default());
    }
}
