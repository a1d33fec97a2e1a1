//! What the agent tells the orchestrator about its host's boot, so that a
//! reconnect after a reboot is told apart from one after a network blip or an
//! agent restart: the kernel's boot id (new at every boot) and the boot time.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

/// The kernel's boot id file (Linux).
pub const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// The kernel's statistics, with `btime` (Linux).
pub const STAT_FILE: &str = "/proc/stat";

/// The host's boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Boot {
    /// The boot id, when the kernel gives one.
    pub id: Option<String>,
    /// When the host booted, when known.
    pub time: Option<SystemTime>,
}

impl Boot {
    /// Reads this host's boot (Linux's files; nothing elsewhere).
    pub fn of_this_host() -> Self {
        Self::read(Path::new(BOOT_ID_FILE), Path::new(STAT_FILE))
    }

    /// Reads a boot id file and a stat file.
    pub fn read(boot_id: &Path, stat: &Path) -> Self {
        let id = std::fs::read_to_string(boot_id)
            .ok()
            .map(|text| text.trim().to_owned())
            .filter(|id| !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_graphic()));
        let time = std::fs::read_to_string(stat)
            .ok()
            .and_then(|text| boot_time(&text));
        Self { id, time }
    }
}

/// The `btime` line of /proc/stat: seconds since the epoch at boot.
fn boot_time(stat: &str) -> Option<SystemTime> {
    let seconds: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_id_and_btime_are_read_and_junk_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (id, stat) = (dir.path().join("boot_id"), dir.path().join("stat"));
        std::fs::write(&id, "0c5b5d9e-5a0e-4a39-8d2f-6b8f7f3f2a11\n").unwrap();
        std::fs::write(&stat, "cpu  1 2 3 4\nbtime 1764460800\nprocesses 42\n").unwrap();
        let boot = Boot::read(&id, &stat);
        assert_eq!(boot.id.as_deref(), Some("0c5b5d9e-5a0e-4a39-8d2f-6b8f7f3f2a11"));
        assert_eq!(
            boot.time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_460_800))
        );
        std::fs::write(&id, "not\na boot id with spaces").unwrap();
        std::fs::write(&stat, "cpu 1 2 3\n").unwrap();
        assert_eq!(Boot::read(&id, &stat), Boot::default());
        assert_eq!(
            Boot::read(&dir.path().join("none"), &dir.path().join("none")),
            Boot::default()
        );
    }

    #[test]
    fn this_linux_host_has_a_boot() {
        let boot = Boot::of_this_host();
        if Path::new(BOOT_ID_FILE).exists() {
            assert!(boot.id.is_some() && boot.time.is_some(), "{boot:?}");
        }
    }
}
