//! The broker-wide connection count for `limits.max_connections`: one counter per worker in
//! a small file in the mesh directory, mapped shared by every worker process.
//!
//! Each worker writes only its own slot (its admitted connections, one cache line apart so
//! workers do not contend) and sums all slots when it admits a connection: a handful of
//! loads, no messages, exact to the moment. A worker that dies leaves its last count until
//! its successor starts and zeroes the slot, so during a restart the broker counts the dead
//! worker's connections a little longer: it errs towards refusing, never towards admitting.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes between two workers' slots (a cache line).
const SLOT: usize = 64;

pub struct Census {
    base: *mut u8,
    len: usize,
    index: usize,
    count: usize,
}

impl Census {
    /// Maps `{dir}/connections` (created if missing) and zeroes this worker's slot.
    pub fn open(dir: &Path, index: u16, count: u16) -> std::io::Result<Census> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("connections"))?;
        let len = SLOT * usize::from(count.max(1));
        if file.metadata()?.len() < len as u64 {
            // Every worker may do this; growing to the same size is idempotent, and the
            // kernel zero-fills the new bytes.
            file.set_len(len as u64)?;
        }
        // SAFETY: a fresh shared mapping of a file we just sized to `len`; it stays valid
        // until `munmap` in Drop (closing the file does not unmap it).
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let census = Census {
            base: base.cast(),
            len,
            index: usize::from(index),
            count: usize::from(count.max(1)),
        };
        census.set_local(0);
        Ok(census)
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < self.count);
        // SAFETY: slot `i` lies inside the mapping (count * SLOT bytes), is 64-byte
        // aligned (mappings are page aligned), and is only ever accessed atomically.
        unsafe { &*self.base.add(i * SLOT).cast::<AtomicU64>() }
    }

    /// This worker now has `n` admitted connections.
    pub fn set_local(&self, n: usize) {
        self.slot(self.index).store(n as u64, Ordering::Relaxed);
    }

    /// Admitted connections of every worker.
    pub fn total(&self) -> usize {
        (0..self.count)
            .map(|i| self.slot(i).load(Ordering::Relaxed) as usize)
            .sum()
    }
}

impl Drop for Census {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `open`, once.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::Census;

    #[test]
    fn workers_see_each_others_counts() {
        let dir = std::env::temp_dir().join(format!("mqttd-census-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Census::open(&dir, 0, 3).unwrap();
        let b = Census::open(&dir, 2, 3).unwrap();
        a.set_local(5);
        b.set_local(7);
        assert_eq!(a.total(), 12);
        assert_eq!(b.total(), 12);
        // A restarted worker starts from zero.
        let b2 = Census::open(&dir, 2, 3).unwrap();
        assert_eq!(a.total(), 5);
        drop((a, b, b2));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
