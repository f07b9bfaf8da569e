//! The broker's process tree as /proc shows it: the supervisor's worker children and the
//! flags they were started with.

use std::collections::BTreeSet;

/// (state, parent pid) from /proc/PID/stat; None if the process is gone.
pub fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces, so split after its closing paren.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Live (non-zombie) child processes of `parent`.
pub fn children(parent: u32) -> BTreeSet<u32> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if stat(pid).is_some_and(|(state, ppid)| ppid == parent && state != 'Z') {
            pids.insert(pid);
        }
    }
    pids
}

/// The value after the last `name` on `pid`'s command line (e.g. `--worker-index`).
pub fn flag(pid: u32, name: &str) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().rposition(|a| a == name)?;
    args.get(at + 1).cloned()
}

/// Live worker processes of the supervisor `parent`: (worker index, pid), sorted.
pub fn worker_pids(parent: u32) -> Vec<(u16, u32)> {
    let mut found: Vec<(u16, u32)> = children(parent)
        .into_iter()
        .filter_map(|pid| Some((flag(pid, "--worker-index")?.parse().ok()?, pid)))
        .collect();
    found.sort();
    found
}

/// Waits (polling, up to `within`) until `pid` has exited; panics if it has not by then.
pub async fn wait_until_gone(pid: u32, within: std::time::Duration) {
    let deadline = std::time::Instant::now() + within;
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "process {pid} still alive after {within:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
