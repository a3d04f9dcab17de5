//! CPU time and memory of processes, from /proc.

use std::sync::OnceLock;

fn clk_tck() -> f64 {
    static TCK: OnceLock<f64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Fields of /proc/PID/stat that matter here.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stat {
    pub ppid: u32,
    /// utime + stime of the process (all its threads), seconds.
    pub cpu: f64,
    /// cutime + cstime: waited-for children, seconds.
    pub children_cpu: f64,
}

pub fn stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state); field n is f[n - 3].
    let num = |n: usize| -> Option<f64> { f.get(n - 3)?.parse::<f64>().ok() };
    Some(Stat {
        ppid: num(4)? as u32,
        cpu: (num(14)? + num(15)?) / clk_tck(),
        children_cpu: (num(16)? + num(17)?) / clk_tck(),
    })
}

/// A `Vm*` line of /proc/PID/status, in bytes.
pub fn vm_bytes(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line
        .trim_start_matches(field)
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// CPU seconds used so far by a PostgreSQL cluster: the postmaster, its live children, and the children
/// that already exited (the postmaster waits for them, so they count in its cutime/cstime).
pub fn cluster_cpu(postmaster: u32) -> f64 {
    let Some(pm) = stat(postmaster) else {
        return 0.0;
    };
    let mut total = pm.cpu + pm.children_cpu;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(s) = stat(pid)
                && s.ppid == postmaster
            {
                total += s.cpu;
            }
        }
    }
    total
}

/// Context switches of every thread of a process (voluntary + involuntary).
pub fn context_switches(pid: u32) -> u64 {
    let mut total = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let text = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            for l in text.lines() {
                if l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
                {
                    total += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    total
}

/// CPU seconds the whole machine has spent busy (all CPUs, everything but idle and iowait).
pub fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: f64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0.0) + f.get(4).copied().unwrap_or(0.0);
    (total - idle) / clk_tck()
}
