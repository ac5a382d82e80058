//! CPU accounting: the whole machine from /proc/stat (softirq and kworkers included, where
//! the kernel splice does its work) and the proxy's own processes from /proc/PID/stat;
//! memory: the proxy's resident set and the kernel's TCP buffers.

use anyhow::Context as _;

/// Clock ticks per second of /proc's counters.
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Machine {
    busy: u64,
    total: u64,
}

/// The aggregate `cpu` line: busy is everything but idle and iowait.
pub fn machine() -> anyhow::Result<Machine> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    let idle = get(3) + get(4);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    Ok(Machine {
        busy,
        total: busy + idle,
    })
}

impl Machine {
    /// (CPU seconds spent, share of all CPUs busy) since `earlier`.
    pub fn since(&self, earlier: &Machine) -> (f64, f64) {
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let total = self.total.saturating_sub(earlier.total) as f64;
        let share = if total > 0.0 { busy / total } else { 0.0 };
        (busy / ticks_per_second(), share)
    }
}

/// `pids` and all their descendants (nginx's workers), each once.
fn tree(pids: &[u32]) -> Vec<u32> {
    let mut seen = Vec::new();
    let mut todo: Vec<u32> = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if seen.contains(&pid) {
            continue;
        }
        seen.push(pid);
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            todo.extend(
                children
                    .split_whitespace()
                    .filter_map(|c| c.parse::<u32>().ok()),
            );
        }
    }
    seen
}

/// utime + stime of `pids` and their children (nginx's workers), in CPU seconds.
pub fn processes(pids: &[u32]) -> f64 {
    let mut ticks = 0u64;
    for pid in tree(pids) {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the ")" that closes the command name: state is field 3, utime 14.
            if let Some((_, rest)) = stat.rsplit_once(')') {
                let f: Vec<&str> = rest.split_whitespace().collect();
                let num = |i: usize| f.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
                ticks += num(11) + num(12);
            }
        }
    }
    ticks as f64 / ticks_per_second()
}

/// Resident memory of `pids` and their children, in KiB (VmRSS of each process: threads
/// share theirs, processes do not, so the sum is what the proxy holds).
pub fn rss_kib(pids: &[u32]) -> u64 {
    tree(pids)
        .into_iter()
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .sum()
}

/// Memory the kernel has charged to TCP sockets, in KiB (`TCP: ... mem P` of
/// /proc/net/sockstat, in pages; the counter is global, not per namespace).
#[allow(unsafe_code)] // raw libc calls, each with its `// SAFETY:` line
pub fn tcp_mem_kib() -> anyhow::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").context("reading sockstat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .context("no TCP line in /proc/net/sockstat")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let pages: u64 = fields
        .iter()
        .position(|f| *f == "mem")
        .and_then(|i| fields.get(i + 1)?.parse().ok())
        .context("no TCP mem in /proc/net/sockstat")?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096) / 1024)
}
