//! Broker process sampling from `/proc`: CPU time (utime + stime from
//! `/proc/PID/stat`) and resident set size (VmRSS from `/proc/PID/status`).
//! Used to report broker CPU seconds per message and memory per connection.

use anyhow::{bail, Context, Result};

/// CPU seconds (user + system) the process has consumed so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is parenthesised and may contain spaces.
    let after = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat")?;
    // After ')' come fields 3.. ; utime and stime are fields 14 and 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    if fields.len() < 13 {
        bail!("short /proc/{pid}/stat");
    }
    let utime: u64 = fields[11].parse()?;
    let stime: u64 = fields[12].parse()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Ok((utime + stime) as f64 / ticks)
}

/// Resident set size in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    for line in status.lines() {
        if let Some(rest) = line.strip_prefix("VmRSS:") {
            let kb: u64 = rest
                .split_whitespace()
                .next()
                .context("empty VmRSS")?
                .parse()?;
            return Ok(kb * 1024);
        }
    }
    bail!("no VmRSS in /proc/{pid}/status")
}

/// Poll RSS every `interval` until it changes by less than `tolerance` bytes
/// over `stable_samples` consecutive samples, or `timeout` passes. Returns the
/// last sample and whether it settled.
pub fn settle_rss(
    pid: u32,
    interval: std::time::Duration,
    stable_samples: u32,
    tolerance: u64,
    timeout: std::time::Duration,
) -> Result<(u64, bool)> {
    let start = std::time::Instant::now();
    let mut prev = rss_bytes(pid)?;
    let mut stable = 0;
    loop {
        std::thread::sleep(interval);
        let now = rss_bytes(pid)?;
        if now.abs_diff(prev) <= tolerance {
            stable += 1;
            if stable >= stable_samples {
                return Ok((now, true));
            }
        } else {
            stable = 0;
        }
        prev = now;
        if start.elapsed() >= timeout {
            return Ok((now, false));
        }
    }
}

/// Raise this process's soft open-file limit to its hard limit; returns the
/// new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// The pid and all its descendants (mqttd runs a supervisor with worker
/// children; broker cost is the sum over the tree). Found by scanning
/// `/proc/*/stat` for parent pids, so it works without CONFIG_PROC_CHILDREN.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|v| v.parse::<u32>().ok());
            if let Some(pp) = ppid {
                parent_of.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|(_, pp)| *pp == cur)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    tree
}

/// Open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn fd_count(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count() as u64)
}

/// Broker figures summed over a process and its descendants.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TreeSample {
    pub processes: usize,
    pub cpu_s: f64,
    pub rss_bytes: u64,
    pub fds: u64,
}

/// Sample CPU seconds, RSS and fds over `pid` and its children. Fails only
/// when `pid` itself is gone; vanished children are skipped.
pub fn tree_sample(pid: u32) -> Result<TreeSample> {
    cpu_seconds(pid)?;
    let mut s = TreeSample::default();
    for p in process_tree(pid) {
        if let (Ok(c), Ok(r)) = (cpu_seconds(p), rss_bytes(p)) {
            s.processes += 1;
            s.cpu_s += c;
            s.rss_bytes += r;
            s.fds += fd_count(p).unwrap_or(0);
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_tree_includes_children() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let tree = process_tree(me);
        assert_eq!(tree[0], me);
        assert!(tree.contains(&child.id()));
        let s = tree_sample(me).unwrap();
        assert!(s.processes >= 2 && s.rss_bytes > 0 && s.fds > 0);
        child.kill().unwrap();
        let _ = child.wait();
    }
}
