//! How much memory a build may fill: the install's output is only read once more (to hash
//! it and send it to the service), so it is written to a tmpfs instead of a disk, as long as
//! the machine (or the cgroup velo runs in) has room for it.
//!
//! The parsers are pure functions over the text of `/proc/meminfo` and the cgroup files, so
//! they are tested without the files.

/// A build in memory may use at most this share of what is available: the rest stays for the
/// install itself and everything else on the machine.
const SHARE: u64 = 2;

/// Below this much, a build goes to disk: a tree would not fit anyway.
pub const MIN_BUDGET: u64 = 1 << 30;

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix("MemAvailable:")?;
        let mut words = rest.split_whitespace();
        let kib: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => kib.checked_mul(1024),
            Some(_) => None,
        }
    })
}

/// The cgroup v2 path of this process from `/proc/self/cgroup` (the `0::` line).
pub fn cgroup_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .filter(|p| p.starts_with('/'))
}

/// Room left under a cgroup's `memory.max` (`"max"`: no limit) given its `memory.current`.
pub fn cgroup_room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?; // "max" does not parse: no limit
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// The budget for a build in memory: half of what is available to this process (the
/// machine's `MemAvailable`, and the room under each enclosing cgroup's limit), or `None` if
/// it cannot be told.
pub fn build_budget() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut available = mem_available(&meminfo)?;
    if let Ok(text) = std::fs::read_to_string("/proc/self/cgroup")
        && let Some(path) = cgroup_path(&text)
    {
        // Each cgroup from this one up to the root may set a limit.
        let mut dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        loop {
            let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
            if let (Some(max), Some(current)) = (read("memory.max"), read("memory.current"))
                && let Some(room) = cgroup_room(&max, &current)
            {
                available = available.min(room);
            }
            if dir == std::path::Path::new("/sys/fs/cgroup") || !dir.pop() {
                break;
            }
        }
    }
    Some(available / SHARE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn mem_available_is_read_in_bytes() {
        let text = "MemTotal:       24563412 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(text), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
        assert_eq!(mem_available("MemAvailable: 5 MB\n"), None);
    }

    #[test]
    fn the_cgroup_path_is_the_v2_line() {
        assert_eq!(
            cgroup_path("0::/user.slice/user-1000.slice/session-2.scope\n"),
            Some("/user.slice/user-1000.slice/session-2.scope")
        );
        assert_eq!(cgroup_path("12:memory:/docker/abc\n"), None);
        assert_eq!(cgroup_path("0::relative\n"), None);
    }

    #[test]
    fn a_cgroup_without_a_limit_leaves_no_bound() {
        assert_eq!(cgroup_room("max\n", "12345\n"), None);
        assert_eq!(cgroup_room("4096\n", "1024\n"), Some(3072));
        assert_eq!(cgroup_room("1024\n", "4096\n"), Some(0));
    }

    proptest! {
        #[test]
        fn the_parsers_take_any_text_without_panicking(text in ".{0,200}") {
            let _ = mem_available(&text);
            let _ = cgroup_path(&text);
            let _ = cgroup_room(&text, &text);
        }
    }
}
