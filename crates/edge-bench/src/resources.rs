//! CPU time, peak memory and thread wake-ups of a VPN's processes, from `/proc`:
//! the pids a driver reports and every descendant of them (an agent's device, a
//! daemon's workers); and the whole host's busy CPU time and context switches, which
//! also count what a VPN makes the load generator, servers and emulator do. The
//! parsing is pure; reading `/proc` is the thin part.

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
    /// Busy CPU seconds of the whole host (every process and the kernel).
    #[serde(default)]
    pub host_cpu_seconds: f64,
    /// Context switches of the whole host, voluntary or not.
    #[serde(default)]
    pub host_switches: u64,
}

impl Usage {
    /// What was used from `before` to `self` (peak memory is `self`'s).
    pub fn since(&self, before: &Usage) -> Usage {
        Usage {
            cpu_seconds: (self.cpu_seconds - before.cpu_seconds).max(0.0),
            peak_rss_kib: self.peak_rss_kib,
            // Threads that ended in between take their counts with them.
            wakeups: self.wakeups.saturating_sub(before.wakeups),
            host_cpu_seconds: (self.host_cpu_seconds - before.host_cpu_seconds).max(0.0),
            host_switches: self.host_switches.saturating_sub(before.host_switches),
        }
    }

    /// Adds a later sample's counters to these; its peak memory replaces ours.
    pub fn add(&mut self, later: &Usage) {
        self.cpu_seconds += later.cpu_seconds;
        self.peak_rss_kib = later.peak_rss_kib;
        self.wakeups += later.wakeups;
        self.host_cpu_seconds += later.host_cpu_seconds;
        self.host_switches += later.host_switches;
    }
}

/// `(busy clock ticks, context switches)` of the whole host from the text of
/// `/proc/stat`: busy is user, nice, system, irq and softirq time of the `cpu` line;
/// not idle or iowait, nor steal (time a hypervisor ran something else: no work of
/// this host's), and guest time is already inside user and nice.
pub fn parse_host_stat(text: &str) -> Option<(u64, u64)> {
    let mut busy = None;
    let mut switches = None;
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("cpu") => {
                let times: Vec<u64> = fields.map(|f| f.parse().ok()).collect::<Option<_>>()?;
                // user nice system idle iowait irq softirq steal guest guest_nice
                busy = Some(
                    [0, 1, 2, 5, 6]
                        .iter()
                        .map(|&i| times.get(i))
                        .sum::<Option<u64>>()?,
                );
            }
            Some("ctxt") => switches = fields.next()?.parse().ok(),
            _ => {}
        }
    }
    Some((busy?, switches?))
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
    if let Some((busy, switches)) = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| parse_host_stat(&t))
    {
        usage.host_cpu_seconds = busy as f64 / ticks;
        usage.host_switches = switches;
    }
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
    fn host_busy_time_and_switches_from_proc_stat() {
        let text = "cpu  100 5 50 1000 20 3 2 1 7 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n\
                    intr 1 2 3\nctxt 98765\nbtime 1\n";
        // user + nice + system + irq + softirq = 160: not idle, iowait or steal.
        assert_eq!(parse_host_stat(text), Some((160, 98765)));
        assert_eq!(parse_host_stat("cpu 1 2 3 4\n"), None, "no ctxt line");
        assert_eq!(parse_host_stat("cpu 1 x 3 4 5 6 7\nctxt 5\n"), None);
        assert_eq!(
            parse_host_stat("cpu 1 2 3 4\nctxt 5\n"),
            None,
            "no irq time"
        );
    }

    #[test]
    fn since_subtracts_counters_and_keeps_the_later_peak() {
        let before = Usage {
            cpu_seconds: 1.0,
            peak_rss_kib: 10,
            wakeups: 5,
            host_cpu_seconds: 3.0,
            host_switches: 100,
        };
        let after = Usage {
            cpu_seconds: 1.5,
            peak_rss_kib: 12,
            wakeups: 4,
            host_cpu_seconds: 4.0,
            host_switches: 150,
        };
        assert_eq!(
            after.since(&before),
            Usage {
                cpu_seconds: 0.5,
                peak_rss_kib: 12,
                wakeups: 0,
                host_cpu_seconds: 1.0,
                host_switches: 50,
            }
        );
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
        assert!(u.host_switches > 0 && u.host_cpu_seconds > 0.0);
    }
}
