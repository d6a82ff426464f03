//! Metadata layers (the layered kinds): a full layer of a tree, or the thin layer that
//! turns one tree into another, written durably under a volume's mounts directory.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use voltool_protocol::tree::{self, Delta, PageRef};
use voltool_protocol::{Entry, VolPath};

use crate::overlay::layer;
use crate::scan;

use super::super::Inner;
use super::super::error::{OpResult, failed};
use super::owner_of;

/// Where built layers live in a volume's mounts directory. A layer is named by its path
/// relative to that directory: `layers/<name>` for built ones, `<snapshot>/upper` for the
/// upper layer of a snapshot frozen by a commit.
pub(super) const LAYERS: &str = "layers";

/// Entries a full layer writes at a time.
const LAYER_PART: usize = 16_384;

/// What a layer holds: every entry of a tree, or the thin layer of a change.
pub(super) enum LayerPart {
    Full(PageRef),
    Thin(Vec<(VolPath, Option<Entry>)>),
}

/// Writes the layer named after `snapshot` in the volume directory `vol` (blocking),
/// durable before it returns (one syncfs, not one per file); its name relative to `vol`.
/// Nothing of it is left when it fails.
pub(super) fn write_layer(
    vol: &Path,
    snapshot: &str,
    part: LayerPart,
    pages: &crate::store::Pages,
    owner: Option<u32>,
) -> Result<String, String> {
    let name = format!("{LAYERS}/{snapshot}");
    let dir = vol.join(&name);
    std::fs::create_dir_all(vol.join(LAYERS)).map_err(|e| e.to_string())?;
    let written = write_part(&dir, part, pages, owner)
        .and_then(|()| crate::store::sync_fs_of(&dir).map_err(|e| e.to_string()));
    if let Err(e) = written {
        let _ = scan::remove_tree(&dir);
        return Err(format!("cannot write a snapshot layer: {e}"));
    }
    Ok(name)
}

/// What a layer is written from: the whole tree at a root, or the changes (`deltas`) that
/// turn the tree the layers under it show into the tree at `root`.
pub(in super::super) enum LayerOf {
    Full(PageRef),
    Thin { deltas: Vec<Delta>, root: PageRef },
}

impl Inner {
    /// Writes a layer of volume `id` at `version` (a compaction, a follow preparing its
    /// switch), its entries `owner`'s: its name.
    pub(in super::super) async fn layer_of(
        &self,
        id: voltool_protocol::VolumeId,
        version: u64,
        of: LayerOf,
        owner: u32,
    ) -> OpResult<String> {
        let snapshot = format!("v{version}-{:08x}", rand::random::<u32>());
        let (vol, pages) = (self.mounts_dir(id), self.pages.clone());
        tokio::task::spawn_blocking(move || {
            let part = match of {
                LayerOf::Full(root) => LayerPart::Full(root),
                LayerOf::Thin { deltas, root } => {
                    LayerPart::Thin(thin_layer(&deltas, &pages, &root).map_err(|e| e.to_string())?)
                }
            };
            write_layer(&vol, &snapshot, part, &pages, owner_of(owner))
        })
        .await
        .map_err(failed)?
        .map_err(failed)
    }
}

/// Writes a layer, a full one in parts as its entries are read.
fn write_part(
    dir: &Path,
    part: LayerPart,
    pages: &crate::store::Pages,
    owner: Option<u32>,
) -> Result<(), String> {
    let mut w = layer::LayerWriter::create(dir, owner).map_err(|e| e.to_string())?;
    match part {
        LayerPart::Thin(entries) => w.add(&entries).map_err(|e| e.to_string())?,
        LayerPart::Full(root) => {
            let mut chunk = Vec::with_capacity(LAYER_PART);
            let mut failed = None;
            tree::range(pages, &root, "", &mut |p, e| {
                chunk.push((p.clone(), Some(e.clone())));
                if chunk.len() == LAYER_PART {
                    if let Err(e) = w.add(&chunk) {
                        failed = Some(e.to_string());
                        return false;
                    }
                    chunk.clear();
                }
                true
            })
            .map_err(|e| e.to_string())?;
            if let Some(e) = failed {
                return Err(e);
            }
            w.add(&chunk).map_err(|e| e.to_string())?;
        }
    }
    w.finish().map_err(|e| e.to_string())
}

/// What turns the layers showing one tree into another (`deltas` between them, the new
/// tree at `new`): changed entries, whiteouts for removed ones (the topmost removed path
/// only), and the parent directories of both with their modes in the new tree.
pub(super) fn thin_layer(
    deltas: &[Delta],
    pages: &crate::store::Pages,
    new: &PageRef,
) -> Result<Vec<(VolPath, Option<Entry>)>, tree::TreeError> {
    let mut out: BTreeMap<VolPath, Option<Entry>> = BTreeMap::new();
    // A change below a removed path or below a path that became a non-directory is hidden
    // by that one already.
    let hiding: HashSet<&VolPath> = deltas
        .iter()
        .filter(|d| d.new.as_ref().is_none_or(|e| !e.is_dir()))
        .map(|d| &d.path)
        .collect();
    for d in deltas {
        if d.path.ancestors().any(|a| hiding.contains(&a)) {
            continue;
        }
        for a in d.path.ancestors() {
            if out.contains_key(&a) {
                break;
            }
            if let Some(e) = tree::get(pages, new, &a)? {
                out.insert(a, Some(e));
            }
        }
        out.insert(d.path.clone(), d.new.clone());
    }
    Ok(out.into_iter().collect())
}
