//! CPU time, peak memory and thread wake-ups of a VPN's processes, from `/proc`:
//! the pids a driver reports and every descendant of them (an agent's device, a
//! daemon's workers). The parsing is pure; reading `/proc` is the thin part.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// User + system CPU seconds, summed over the processes.
    pub cpu_seconds: f64,
    /// Sum of the processes' peak resident set sizes (VmHWM), in KiB.
    pub peak_rss_kib: u64,
    /// Voluntary context switches of all their threads: how often a thread slept
    /// waiting for work, so (nearly) how often one was woken. Older reports lack it.
    #[serde(default)]
    pub wakeups: u64,
}

/// `(ppid, utime + stime in clock ticks)` from the text of `/proc/PID/stat`. The
/// command name (field 2) may hold spaces and parentheses: fields are counted
/// after its last `)`.
pub fn parse_stat(text: &str) -> Option<(u32, u64)> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15); index = field - 3.
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// VmHWM in KiB from the text of `/proc/PID/status`.
pub fn parse_peak_rss(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `voluntary_ctxt_switches` from the text of `/proc/PID/task/TID/status`.
pub fn parse_voluntary_switches(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `roots` and all their descendants, given every process as `(pid, ppid)`.
pub fn with_descendants(roots: &[u32], processes: &[(u32, u32)]) -> BTreeSet<u32> {
    let mut set: BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = set.len();
        for (pid, ppid) in processes {
            if set.contains(ppid) {
                set.insert(*pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// The usage of `roots` and their descendants now.
pub fn measure(roots: &[u32]) -> Usage {
    let mut stats = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = std::fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
            {
                stats.push((pid, s));
            }
        }
    }
    let tree: Vec<(u32, u32)> = stats.iter().map(|(pid, (ppid, _))| (*pid, *ppid)).collect();
    let wanted = with_descendants(roots, &tree);
    let ticks = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    };
    let mut usage = Usage::default();
    for (pid, (_, cpu)) in stats.iter().filter(|(pid, _)| wanted.contains(pid)) {
        usage.cpu_seconds += *cpu as f64 / ticks;
        usage.peak_rss_kib += std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|t| parse_peak_rss(&t))
            .unwrap_or(0);
        // A process's own status counts only its main thread: sum the threads.
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                usage.wakeups += std::fs::read_to_string(t.path().join("status"))
                    .ok()
                    .and_then(|t| parse_voluntary_switches(&t))
                    .unwrap_or(0);
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_a_tricky_name() {
        let text = "42 (a (b) c) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 1 1";
        assert_eq!(parse_stat(text), Some((7, 300)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn peak_rss_from_status() {
        let text = "Name:\tx\nVmPeak:\t  9000 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_peak_rss(text), Some(1234));
        assert_eq!(parse_peak_rss("Name: x\n"), None);
    }

    #[test]
    fn descendants_follow_the_tree() {
        let procs = [(2, 1), (3, 2), (4, 3), (5, 1), (6, 5)];
        assert_eq!(
            with_descendants(&[2], &procs)
                .into_iter()
                .collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        assert!(with_descendants(&[], &procs).is_empty());
    }

    #[test]
    fn voluntary_switches_from_status() {
        let text = "Name:\tx\nvoluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t5\n";
        assert_eq!(parse_voluntary_switches(text), Some(1234));
        assert_eq!(parse_voluntary_switches("Name:\tx\n"), None);
    }

    #[test]
    fn this_process_uses_some_memory_and_sleeps() {
        // A thread that sleeps once switches voluntarily at least once.
        std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(5)))
            .join()
            .unwrap();
        let u = measure(&[std::process::id()]);
        assert!(u.peak_rss_kib > 0);
        assert!(u.wakeups > 0);
    }
}
