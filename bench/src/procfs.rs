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
