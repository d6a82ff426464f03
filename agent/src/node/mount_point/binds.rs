//! Whether a container binds a mount path: the snapshot shown there copied as the root of
//! a bind, in any mount namespace (which a switch beneath the snapshot would not reach).

use std::os::fd::AsFd;

use rustix::fs::{AtFlags, StatxFlags};

/// The id of the mount `fd` is in (as `/proc/*/mountinfo` numbers them).
fn mount_id(fd: &impl AsFd) -> Option<u64> {
    rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID)
        .ok()
        .map(|st| st.stx_mnt_id)
}

/// One line of a mountinfo table: the mount's id, its parent's, and its peer group
/// (`shared:N`) and master (`master:N`), if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MountLine {
    id: u64,
    parent: u64,
    shared: Option<u64>,
    master: Option<u64>,
}

fn parse_mountinfo(text: &str) -> Vec<MountLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let id = f.next()?.parse().ok()?;
            let parent = f.next()?.parse().ok()?;
            let mut m = MountLine {
                id,
                parent,
                ..Default::default()
            };
            // Optional fields run from the 7th to the `-` separator.
            for tag in f.skip(4).take_while(|t| *t != "-") {
                if let Some(n) = tag.strip_prefix("shared:") {
                    m.shared = n.parse().ok();
                } else if let Some(n) = tag.strip_prefix("master:") {
                    m.master = n.parse().ok();
                }
            }
            Some(m)
        })
        .collect()
}

/// Whether the snapshot shown at a mount point (the mount `top`, on the base) has a copy
/// that is the root of a bind somewhere, in this mount namespace or another: a copy that
/// is not itself on a copy of the base. Such a copy (Docker's `-v PATH:…:rslave`) follows
/// only what is mounted on the snapshot, never a switch beneath it; copies of the whole
/// path (a namespace made with slave propagation, a bind of a directory above it) follow
/// either.
pub(super) fn bound_elsewhere(top: &impl AsFd) -> bool {
    let Some(id) = mount_id(top) else {
        return false;
    };
    let Ok(own) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let own = parse_mountinfo(&own);
    let Some(me) = own.iter().find(|m| m.id == id).copied() else {
        return false;
    };
    let Some(group) = me.shared else {
        return false;
    };
    let base_group = own
        .iter()
        .find(|m| m.id == me.parent)
        .and_then(|b| b.shared);
    let is_copy =
        |m: &MountLine| m.id != id && (m.shared == Some(group) || m.master == Some(group));
    let on_base_copy = |table: &[MountLine], m: &MountLine| {
        table.iter().any(|p| {
            p.id == m.parent
                && base_group.is_some()
                && (p.shared == base_group || p.master == base_group)
        })
    };
    // Every mount namespace once: a table per namespace, read through one of its processes.
    let mut seen = std::collections::HashSet::new();
    let procs = std::fs::read_dir("/proc").into_iter().flatten().flatten();
    for p in procs {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(p.path().join("mountinfo")) else {
            continue;
        };
        let table = parse_mountinfo(&text);
        if table.iter().any(|m| is_copy(m) && !on_base_copy(&table, m)) {
            return true;
        }
    }
    false
}
