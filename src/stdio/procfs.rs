//! The process table as `/proc` shows it: pid, parent, process group and state of every
//! process. The launcher uses it to find descendants that left the process group; tests use it
//! to count what is still running.

use std::path::Path;

/// One line of `/proc/<pid>/stat`, the fields we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    /// The state letter: `R`, `S`, `D`, `Z` (zombie), `T`, …
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

impl Stat {
    pub fn is_zombie(&self) -> bool {
        self.state == 'Z' || self.state == 'X'
    }
}

/// Parses `/proc/<pid>/stat` text. The command name is in parentheses and may itself hold
/// spaces and parentheses, so the fields are read after the last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_once(' ')?.0.trim().parse().ok()?;
    let mut f = tail.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(Stat {
        pid,
        state,
        ppid,
        pgrp,
    })
}

/// The stat of one process, if it exists.
pub fn stat(pid: u32) -> Option<Stat> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| parse_stat(&t))
}

/// Every process visible in `/proc` (a process that ends while we read is skipped).
pub fn all() -> Vec<Stat> {
    all_in(Path::new("/proc"))
}

fn all_in(proc_dir: &Path) -> Vec<Stat> {
    let Ok(dir) = std::fs::read_dir(proc_dir) else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .collect()
}

/// The processes below `root` (children, grandchildren, …), not `root` itself.
pub fn descendants(root: u32) -> Vec<Stat> {
    descendants_in(&all(), root)
}

/// [`descendants`] over a given table.
pub fn descendants_in(table: &[Stat], root: u32) -> Vec<Stat> {
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for s in table.iter().filter(|s| s.ppid == p && s.pid != root) {
            if !out.iter().any(|o: &Stat| o.pid == s.pid) {
                out.push(*s);
                frontier.push(s.pid);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names() {
        let s = parse_stat("4242 (node) S 4200 4242 4242 0 -1 4194304 1 0 0 0").unwrap();
        assert_eq!((s.pid, s.state, s.ppid, s.pgrp), (4242, 'S', 4200, 4242));
        let s = parse_stat("7 (a b) c)) Z 1 7 7 0").unwrap();
        assert_eq!((s.pid, s.state, s.ppid, s.pgrp), (7, 'Z', 1, 7));
        assert!(s.is_zombie());
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn descendants_walk_the_tree() {
        let t = |pid, ppid| Stat {
            pid,
            state: 'S',
            ppid,
            pgrp: pid,
        };
        let table = [t(10, 1), t(11, 10), t(12, 11), t(13, 1), t(14, 12)];
        let mut d: Vec<u32> = descendants_in(&table, 10).iter().map(|s| s.pid).collect();
        d.sort_unstable();
        assert_eq!(d, vec![11, 12, 14]);
        assert!(descendants_in(&table, 13).is_empty());
    }

    #[test]
    fn this_process_is_in_the_table() {
        let me = std::process::id();
        assert!(all().iter().any(|s| s.pid == me));
        assert_eq!(stat(me).map(|s| s.pid), Some(me));
    }
}
