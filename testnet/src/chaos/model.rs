//! The model of a trial: what each acknowledged operation left in a volume, what an
//! agent's mount shows, and the seeded contents and paths the operations write.

use super::*;

/// A file's content: its length and BLAKE3 hash (the bytes derive from a seed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Content {
    pub(super) size: u64,
    pub(super) hash: [u8; 32],
}

/// A volume's files, by path.
pub(super) type Tree = BTreeMap<String, Content>;
/// Changes written into a mount and not yet committed: a path's new content, or `None`
/// where it was deleted.
pub(super) type Pending = BTreeMap<String, Option<Content>>;

pub(super) fn apply(base: &Tree, pending: &Pending) -> Tree {
    let mut t = base.clone();
    for (p, c) in pending {
        match c {
            Some(c) => t.insert(p.clone(), *c),
            None => t.remove(p),
        };
    }
    t
}

/// The model's picture of one agent's mount of one volume.
#[derive(Clone, Debug, Default)]
pub(super) struct View {
    /// The committed snapshot the mount is on.
    pub(super) base: Tree,
    pub(super) pending: Pending,
    /// Directories the user made in the mount since its snapshot (the model tracks files
    /// only: a new directory left empty would be a change it does not know of, so the
    /// user removes it with its last file).
    pub(super) made: BTreeSet<String>,
}

impl View {
    pub(super) fn expected(&self) -> Tree {
        apply(&self.base, &self.pending)
    }

    /// A file deleted from the mount: a change only if the snapshot has it (one created
    /// and deleted since is no change at all, and leaves another writer's file alone).
    pub(super) fn delete(&mut self, path: String) {
        if self.base.contains_key(&path) {
            self.pending.insert(path, None);
        } else {
            self.pending.remove(&path);
        }
    }
}

/// Deterministic file bytes: BLAKE3 in XOF mode keyed by the seed.
pub(super) fn bytes_of(seed: u64, size: u64) -> Vec<u8> {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let mut out = vec![0u8; size as usize];
    blake3::Hasher::new_keyed(&key)
        .finalize_xof()
        .fill(&mut out);
    out
}

pub(super) fn content_of(bytes: &[u8]) -> Content {
    Content {
        size: bytes.len() as u64,
        hash: *blake3::hash(bytes).as_bytes(),
    }
}

/// The files under `dir` (directories are not compared: the model knows only files).
pub(super) fn read_tree(dir: &Path) -> anyhow::Result<Tree> {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) -> anyhow::Result<()> {
        for e in std::fs::read_dir(dir).with_context(|| dir.display().to_string())? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(root, &p, out)?;
            } else {
                let bytes = std::fs::read(&p).with_context(|| p.display().to_string())?;
                let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
                out.insert(rel, content_of(&bytes));
            }
        }
        Ok(())
    }
    let mut t = Tree::new();
    walk(dir, dir, &mut t)?;
    Ok(t)
}

/// The paths where two trees differ, for messages.
pub(super) fn diff(a: &Tree, b: &Tree) -> Vec<String> {
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |c: Option<&Content>| match c {
                None => "absent".to_string(),
                Some(c) => format!("{} bytes {}", c.size, hex8(&c.hash)),
            };
            format!("{k}: {} vs {}", show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

pub(super) fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// File paths the operations pick from: few enough that writers overlap often.
pub(super) fn random_path(rng: &mut SmallRng) -> String {
    format!("d{}/f{}", rng.random_range(0..3), rng.random_range(0..5))
}

pub(super) fn random_size(rng: &mut SmallRng) -> u64 {
    match rng.random_range(0..100) {
        0..5 => 0,
        5..80 => rng.random_range(1..32 << 10),
        80..97 => rng.random_range(64 << 10..1 << 20),
        _ => rng.random_range(2 << 20..6 << 20),
    }
}
