//! cgroup v2 containment for stdio children, where this process may create cgroups.
//!
//! toolgate creates `toolgate-stdio.<pid>/` under its own cgroup and one cgroup per child
//! under that (`<server>.<n>`). A second pool in the same process (the tests run several
//! gateways in one) gets `toolgate-stdio.<pid>.<k>/`, so one pool's shutdown never removes
//! another's children. The launcher joins the child's cgroup before it starts the
//! server, so the server and every process it ever forks are in it, whatever they do with
//! process groups and sessions; `cgroup.kill` then ends all of them at once, atomically.
//!
//! Where this works: as root on a writable cgroup2 mount, or under systemd with `Delegate=yes`
//! (the unit's cgroup is then ours to subdivide). Under systemd without delegation toolgate
//! cannot create cgroups; it still lives in the unit's own cgroup, and systemd's default
//! `KillMode=control-group` ends every process in it (children and grandchildren included)
//! when toolgate exits for any reason, kill -9 included. No controllers are ever enabled
//! (`cgroup.subtree_control` is left empty), so toolgate and its launchers may live in the
//! inner cgroups next to the child cgroups.

use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Where this process's cgroup v2 directory is, if it can be found.
pub fn own_dir() -> Option<PathBuf> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    own_dir_from(&cgroup, &mountinfo)
}

/// [`own_dir`] from the text of `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub fn own_dir_from(cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
    for line in mountinfo.lines() {
        let Some((fields, fs)) = line.split_once(" - ") else {
            continue;
        };
        if fs.split_ascii_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = fields.split_ascii_whitespace().collect();
        let (Some(root), Some(mount)) = (f.get(3), f.get(4)) else {
            continue;
        };
        let rel = if *root == "/" {
            path
        } else if let Some(rest) = path.strip_prefix(root) {
            rest
        } else {
            continue;
        };
        let mut dir = PathBuf::from(unescape(mount));
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            if part == ".." {
                return None;
            }
            dir.push(part);
        }
        return Some(dir);
    }
    None
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b.get(i) == Some(&b'\\') {
            if let Some(oct) = s.get(i + 1..i + 4) {
                if let Ok(v) = u8::from_str_radix(oct, 8) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        if let Some(c) = b.get(i) {
            out.push(*c);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup toolgate's children live under: `<own cgroup>/toolgate-stdio.<pid>`.
#[derive(Debug, Clone)]
pub struct Base {
    pub dir: PathBuf,
}

impl Base {
    /// Creates the base cgroup under this process's own, after removing the bases of
    /// toolgate processes that no longer run. `Err` says why cgroups cannot be used here.
    pub fn create() -> Result<Base, String> {
        let own = own_dir().ok_or("no cgroup v2 hierarchy is mounted for this process")?;
        // Moving a process between two cgroups needs write access to the `cgroup.procs` of
        // their common ancestor: this process's own cgroup.
        std::fs::OpenOptions::new()
            .write(true)
            .open(own.join("cgroup.procs"))
            .map_err(|e| format!("{}: {e}", own.join("cgroup.procs").display()))?;
        remove_stale(&own);
        static BASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pid = std::process::id();
        let dir = match BASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
            0 => own.join(format!("toolgate-stdio.{pid}")),
            k => own.join(format!("toolgate-stdio.{pid}.{k}")),
        };
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        Ok(Base { dir })
    }

    /// A new, empty cgroup for one child.
    pub fn child(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(dir)
    }

    /// Kills everything left in the base and its children and removes them (at shutdown).
    pub fn remove(&self) {
        remove_tree(&self.dir);
    }
}

/// Removes `toolgate-stdio.<pid>[.<k>]` cgroups under `own` whose toolgate is gone.
fn remove_stale(own: &Path) {
    let Ok(entries) = std::fs::read_dir(own) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("toolgate-stdio."))
            .and_then(|p| p.split('.').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = super::procfs::stat(pid).is_some_and(|s| !s.is_zombie());
        if !alive {
            tracing::info!(cgroup = %e.path().display(), "removing the stdio cgroup of a toolgate that is gone");
            remove_tree(&e.path());
        }
    }
}

/// Kills every process in `dir` and below, then removes the directories (children first).
pub fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    kill(dir);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while populated(dir) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let _ = std::fs::remove_dir(dir);
}

/// The pids in `dir` (not below it).
pub fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Does `dir` or any cgroup below it hold a process?
pub fn populated(dir: &Path) -> bool {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(t) => t.lines().any(|l| l.trim() == "populated 1"),
        Err(_) => !procs(dir).is_empty(),
    }
}

/// Moves process `pid` into `dir`.
pub fn join(dir: &Path, pid: u32) -> Result<(), String> {
    let path = dir.join("cgroup.procs");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(pid.to_string().as_bytes()))
        .map_err(|e| format!("cannot move {pid} into {}: {e}", dir.display()))
}

/// Sends `sig` to every process in `dir` (not below it).
pub fn signal(dir: &Path, sig: rustix::process::Signal) {
    for pid in procs(dir) {
        if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
            let _ = rustix::process::kill_process(p, sig);
        }
    }
}

/// SIGKILLs every process in `dir` and below: `cgroup.kill` (Linux 5.14+), else one by one.
pub fn kill(dir: &Path) {
    let killed = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok();
    if !killed {
        signal(dir, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
24 30 0:22 / /sys type sysfs rw,nosuid - sysfs sysfs rw
35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn two_pools_in_one_process_never_share_a_base() {
        let (Ok(a), Ok(b)) = (Base::create(), Base::create()) else {
            eprintln!("SKIP: cgroups cannot be created here");
            return;
        };
        assert_ne!(a.dir, b.dir);
        let name = b.dir.file_name().unwrap().to_str().unwrap().to_string();
        let pid = std::process::id().to_string();
        assert!(
            name.starts_with(&format!("toolgate-stdio.{pid}.")),
            "{name}"
        );
        let child = a.child("alpha.1").unwrap();
        b.remove();
        assert!(child.is_dir(), "removing one base took another's child");
        // A base of this (living) process is not stale, whatever its suffix.
        remove_stale(a.dir.parent().unwrap());
        assert!(child.is_dir());
        a.remove();
        assert!(!a.dir.exists());
    }

    #[test]
    fn finds_the_unit_cgroup() {
        let d = own_dir_from("0::/system.slice/toolgate.service\n", MOUNTINFO);
        assert_eq!(
            d,
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/toolgate.service"
            ))
        );
    }

    #[test]
    fn hybrid_mounts_and_the_root_cgroup() {
        let mi = "40 30 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                  41 30 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let cg = "4:pids:/\n0::/\n";
        assert_eq!(
            own_dir_from(cg, mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn no_v2_hierarchy_no_dir() {
        let mi = "41 30 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        assert_eq!(own_dir_from("4:pids:/\n", mi), None);
        assert_eq!(own_dir_from("0::/a\n", mi), None);
        assert_eq!(own_dir_from("0::/../etc\n", MOUNTINFO), None);
    }

    #[test]
    fn mount_roots_inside_a_namespace() {
        let mi = "35 24 0:30 /ns /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            own_dir_from("0::/ns/app\n", mi),
            Some(PathBuf::from("/sys/fs/cgroup/app"))
        );
        assert_eq!(own_dir_from("0::/other\n", mi), None);
        assert_eq!(unescape(r"/mnt/with\040space"), "/mnt/with space");
    }
}
