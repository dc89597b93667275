//! The process's file descriptors: the soft limit raised to the hard one, and the kernel's
//! descriptor table sized for every socket the server may hold, before any thread exists.
//!
//! Why the table: the kernel grows it by doubling (64, 256, 512, 1024, …) when a new descriptor
//! does not fit, and in a process with threads every growth waits for an RCU grace period
//! (`synchronize_rcu` in `expand_fdtable`) inside the `accept` that needed the room. That
//! worker thread serves nothing meanwhile: 10–25 ms on a 2-core VM, at 256, 512, 1024, …
//! open sockets, so a surge of joins stalled at every doubling (the benchmark's join p99). A
//! table grown while the process is still single-threaded costs no grace period, and the kernel
//! never shrinks it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd's default soft limit of 1024
/// wedged the original at ~1000 peers). Returns the soft limit in force, and why it could not
/// be raised (for the caller to log once logging is up).
pub fn raise_limit() -> (u64, Option<io::Error>) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => (n, None),
        Err(e) => {
            let soft = rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024);
            (soft, Some(e))
        }
    }
}

/// Grows the descriptor table to hold descriptors `0..count` (at most the soft limit `limit`):
/// a duplicate of `/dev/null` placed at the last number, closed at once. Call it before any
/// thread is started, or the growth waits for a grace period like any other.
pub fn presize_table(count: u64, limit: u64) -> io::Result<()> {
    let last = count.min(limit).saturating_sub(1);
    let last = libc::c_int::try_from(last).unwrap_or(libc::c_int::MAX);
    let dev_null = File::open("/dev/null")?;
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor we own and returns a new one (the
    // lowest free number ≥ `last`) that nothing else owns; it is closed when dropped.
    let fd = unsafe { libc::fcntl(dev_null.as_raw_fd(), libc::F_DUPFD_CLOEXEC, last) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned to us by fcntl and is owned by nothing else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `FDSize` line of this process's status: slots in its descriptor table.
    fn table_size() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("FDSize in /proc/self/status")
    }

    #[test]
    fn the_table_holds_the_count_and_stays_within_the_limit() {
        let (limit, _) = raise_limit();
        assert!(limit >= 3000, "this test needs 3000 descriptors");
        presize_table(2000, 3000).unwrap();
        assert!(table_size() >= 2000, "FDSize {} < 2000", table_size());
        // More than the limit allows: sized to the limit, not refused (fcntl would say EINVAL).
        presize_table(u64::MAX, 3000).unwrap();
        assert!(table_size() >= 3000, "FDSize {} < 3000", table_size());
    }
}
