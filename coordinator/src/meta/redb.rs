//! The coordinator's state in one redb file: each write is one redb write transaction.

use std::ops::Range;
use std::path::Path;

use redb::{
    Database, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    TableDefinition,
};
use voltool_protocol::{Commit, Hash, SignedHead, VolumeId};

use super::{LinkUpdate, Meta, MetaError, VolumeRecord, check_successor, decode, encode};

const VOLUMES: TableDefinition<&str, &[u8]> = TableDefinition::new("volumes-1");
const HEADS: TableDefinition<[u8; 16], &[u8]> = TableDefinition::new("heads-1");
const VERSIONS: TableDefinition<([u8; 16], u64), &[u8]> = TableDefinition::new("versions-1");
/// A volume's links, with the paths each one's resolution looked up (postcard `Vec<String>`).
const LINKS: TableDefinition<([u8; 16], &str), &[u8]> = TableDefinition::new("links-0");
/// For each path a link's resolution looked up, the links that did.
const LINK_DEPS: MultimapTableDefinition<([u8; 16], &str), &str> =
    MultimapTableDefinition::new("link-deps-0");
/// The head version each volume's index describes.
const INDEXED: TableDefinition<[u8; 16], u64> = TableDefinition::new("links-indexed-0");
/// Providers left out of the tracker's answers, and until when (ms since the Unix epoch).
const DISTRUST: TableDefinition<[u8; 32], u64> = TableDefinition::new("distrust-0");

/// Tables of older versions whose formats this one does not read (heads of version 0 name
/// manifests of the old, flat encoding).
const OLD_TABLES: &[&str] = &["volumes-0", "heads-0", "versions-0"];

fn engine(e: impl std::fmt::Display) -> MetaError {
    MetaError::Engine(e.to_string())
}

/// The coordinator's state in a redb file.
#[derive(Debug)]
pub struct RedbMeta {
    db: Database,
}

impl RedbMeta {
    /// Opens (or creates) the state in `file`; refuses a file of an older format.
    pub fn open(file: &Path) -> Result<Self, MetaError> {
        let db = voltool_agent::store::open_db(file).map_err(engine)?;
        voltool_agent::store::refuse_old_tables(&db, file, OLD_TABLES).map_err(engine)?;
        let w = db.begin_write().map_err(engine)?;
        w.open_table(VOLUMES).map_err(engine)?;
        w.open_table(HEADS).map_err(engine)?;
        w.open_table(VERSIONS).map_err(engine)?;
        w.open_table(LINKS).map_err(engine)?;
        w.open_multimap_table(LINK_DEPS).map_err(engine)?;
        w.open_table(INDEXED).map_err(engine)?;
        w.open_table(DISTRUST).map_err(engine)?;
        w.commit().map_err(engine)?;
        Ok(RedbMeta { db })
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        f(&self.db.begin_read().map_err(engine)?)
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, MetaError>,
    ) -> Result<T, MetaError> {
        let w = self.db.begin_write().map_err(engine)?;
        let out = f(&w)?;
        w.commit().map_err(engine)?;
        Ok(out)
    }
}

fn head_in(
    t: &impl ReadableTable<[u8; 16], &'static [u8]>,
    id: VolumeId,
) -> Result<Option<SignedHead>, MetaError> {
    match t.get(id.0).map_err(engine)? {
        Some(v) => decode(|| format!("the head of volume {id}"), v.value()).map(Some),
        None => Ok(None),
    }
}

fn volume_in(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<Option<VolumeRecord>, MetaError> {
    match t.get(name).map_err(engine)? {
        Some(v) => decode(|| format!("the record of volume {name:?}"), v.value()).map(Some),
        None => Ok(None),
    }
}

/// Removes the volume's whole link index.
fn forget_links(w: &redb::WriteTransaction, id: VolumeId) -> Result<(), MetaError> {
    let id = id.0;
    let mut links = w.open_table(LINKS).map_err(engine)?;
    let mut deps = w.open_multimap_table(LINK_DEPS).map_err(engine)?;
    let mut all = Vec::new();
    for e in links.range((id, "")..).map_err(engine)? {
        let (k, v) = e.map_err(engine)?;
        let (vol, path) = k.value();
        if vol != id {
            break;
        }
        // An entry that does not decode still goes; its dependencies are found below.
        let looked: Vec<String> = postcard::from_bytes(v.value()).unwrap_or_default();
        all.push((path.to_string(), looked));
    }
    for (link, looked) in &all {
        for d in looked {
            deps.remove((id, d.as_str()), link.as_str())
                .map_err(engine)?;
        }
        links.remove((id, link.as_str())).map_err(engine)?;
    }
    // Whatever dependency an undecodable entry left behind.
    let mut stale = Vec::new();
    for e in deps.range((id, "")..).map_err(engine)? {
        let (k, _) = e.map_err(engine)?;
        let (vol, path) = k.value();
        if vol != id {
            break;
        }
        stale.push(path.to_string());
    }
    for p in stale {
        deps.remove_all((id, p.as_str())).map_err(engine)?;
    }
    w.open_table(INDEXED)
        .map_err(engine)?
        .remove(id)
        .map_err(engine)?;
    Ok(())
}

impl Meta for RedbMeta {
    fn engine(&self) -> &'static str {
        "redb"
    }

    fn volume(&self, name: &str) -> Result<Option<VolumeRecord>, MetaError> {
        self.read(|r| volume_in(&r.open_table(VOLUMES).map_err(engine)?, name))
    }

    fn volumes(&self) -> Result<Vec<(String, VolumeRecord)>, MetaError> {
        self.read(|r| {
            let t = r.open_table(VOLUMES).map_err(engine)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(engine)? {
                let (k, v) = e.map_err(engine)?;
                let name = k.value().to_string();
                let rec = decode(|| format!("the record of volume {name:?}"), v.value())?;
                out.push((name, rec));
            }
            Ok(out)
        })
    }

    fn head(&self, id: VolumeId) -> Result<Option<SignedHead>, MetaError> {
        self.read(|r| head_in(&r.open_table(HEADS).map_err(engine)?, id))
    }

    fn heads(&self) -> Result<Vec<SignedHead>, MetaError> {
        self.read(|r| {
            let t = r.open_table(HEADS).map_err(engine)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(engine)? {
                let (k, v) = e.map_err(engine)?;
                let id = VolumeId(k.value());
                out.push(decode(|| format!("the head of volume {id}"), v.value())?);
            }
            Ok(out)
        })
    }

    fn commits(
        &self,
        id: VolumeId,
        versions: Range<u64>,
    ) -> Result<Vec<Option<Commit>>, MetaError> {
        self.read(|r| {
            let t = r.open_table(VERSIONS).map_err(engine)?;
            let mut out = Vec::new();
            for v in versions {
                out.push(match t.get((id.0, v)).map_err(engine)? {
                    Some(enc) => Some(decode(
                        || format!("version {v} of volume {id}"),
                        enc.value(),
                    )?),
                    None => None,
                });
            }
            Ok(out)
        })
    }

    fn create(&self, name: &str, rec: VolumeRecord, head: &SignedHead) -> Result<(), MetaError> {
        self.write(|w| {
            let mut volumes = w.open_table(VOLUMES).map_err(engine)?;
            if volume_in(&volumes, name)?.is_some() {
                return Err(MetaError::Exists(name.to_string()));
            }
            volumes
                .insert(name, encode(&rec)?.as_slice())
                .map_err(engine)?;
            let c = &head.commit;
            w.open_table(HEADS)
                .map_err(engine)?
                .insert(rec.id.0, encode(head)?.as_slice())
                .map_err(engine)?;
            w.open_table(VERSIONS)
                .map_err(engine)?
                .insert((rec.id.0, c.version), c.encode().as_slice())
                .map_err(engine)?;
            Ok(())
        })
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), MetaError> {
        self.write(|w| {
            let mut t = w.open_table(VOLUMES).map_err(engine)?;
            let rec = volume_in(&t, from)?.ok_or_else(|| MetaError::NoVolume(from.to_string()))?;
            if volume_in(&t, to)?.is_some() {
                return Err(MetaError::Exists(to.to_string()));
            }
            t.remove(from).map_err(engine)?;
            t.insert(to, encode(&rec)?.as_slice()).map_err(engine)?;
            Ok(())
        })
    }

    fn delete(&self, name: &str) -> Result<VolumeRecord, MetaError> {
        self.write(|w| {
            let rec = {
                let mut t = w.open_table(VOLUMES).map_err(engine)?;
                let rec =
                    volume_in(&t, name)?.ok_or_else(|| MetaError::NoVolume(name.to_string()))?;
                t.remove(name).map_err(engine)?;
                rec
            };
            w.open_table(HEADS)
                .map_err(engine)?
                .remove(rec.id.0)
                .map_err(engine)?;
            w.open_table(VERSIONS)
                .map_err(engine)?
                .retain_in((rec.id.0, 0)..=(rec.id.0, u64::MAX), |_, _| false)
                .map_err(engine)?;
            forget_links(w, rec.id)?;
            Ok(rec)
        })
    }

    /// The pages' records are the origin store's own here: `pages` is not needed.
    fn move_head(
        &self,
        head: &SignedHead,
        links: &LinkUpdate,
        _pages: &[(Hash, u64)],
    ) -> Result<(), MetaError> {
        let c = &head.commit;
        let id = c.volume;
        self.write(|w| {
            let mut heads = w.open_table(HEADS).map_err(engine)?;
            let now = head_in(&heads, id)?.map(|h| h.commit.version);
            check_successor(id, now, head)?;
            heads
                .insert(id.0, encode(head)?.as_slice())
                .map_err(engine)?;
            w.open_table(VERSIONS)
                .map_err(engine)?
                .insert((id.0, c.version), c.encode().as_slice())
                .map_err(engine)?;
            let mut table = w.open_table(LINKS).map_err(engine)?;
            let mut deps = w.open_multimap_table(LINK_DEPS).map_err(engine)?;
            for e in &links.entries {
                let link = e.link.as_str();
                table.remove((id.0, link)).map_err(engine)?;
                for d in e.old.iter().flatten() {
                    deps.remove((id.0, d.as_str()), link).map_err(engine)?;
                }
                if let Some(new) = &e.new {
                    for d in new {
                        deps.insert((id.0, d.as_str()), link).map_err(engine)?;
                    }
                    table
                        .insert((id.0, link), encode(new)?.as_slice())
                        .map_err(engine)?;
                }
            }
            w.open_table(INDEXED)
                .map_err(engine)?
                .insert(id.0, c.version)
                .map_err(engine)?;
            Ok(())
        })
    }

    fn drop_versions(&self, id: VolumeId, first: u64) -> Result<u64, MetaError> {
        self.write(|w| {
            let mut dropped = 0;
            w.open_table(VERSIONS)
                .map_err(engine)?
                .retain_in((id.0, 0)..(id.0, first), |_, _| {
                    dropped += 1;
                    false
                })
                .map_err(engine)?;
            Ok(dropped)
        })
    }

    fn links_indexed(&self, id: VolumeId) -> Result<Option<u64>, MetaError> {
        self.read(|r| {
            Ok(r.open_table(INDEXED)
                .map_err(engine)?
                .get(id.0)
                .map_err(engine)?
                .map(|v| v.value()))
        })
    }

    fn has_links(&self, id: VolumeId) -> Result<bool, MetaError> {
        self.read(|r| {
            let t = r.open_table(LINKS).map_err(engine)?;
            let first = t.range((id.0, "")..).map_err(engine)?.next();
            Ok(match first {
                Some(e) => e.map_err(engine)?.0.value().0 == id.0,
                None => false,
            })
        })
    }

    fn links(&self, id: VolumeId) -> Result<Vec<(String, Vec<String>)>, MetaError> {
        self.read(|r| {
            let t = r.open_table(LINKS).map_err(engine)?;
            let mut out = Vec::new();
            for e in t.range((id.0, "")..).map_err(engine)? {
                let (k, v) = e.map_err(engine)?;
                let (vol, path) = k.value();
                if vol != id.0 {
                    break;
                }
                let looked = decode(|| format!("the index entry of link {path:?}"), v.value())?;
                out.push((path.to_string(), looked));
            }
            Ok(out)
        })
    }

    fn link(&self, id: VolumeId, path: &str) -> Result<Option<Vec<String>>, MetaError> {
        self.read(|r| {
            match r
                .open_table(LINKS)
                .map_err(engine)?
                .get((id.0, path))
                .map_err(engine)?
            {
                Some(v) => {
                    decode(|| format!("the index entry of link {path:?}"), v.value()).map(Some)
                }
                None => Ok(None),
            }
        })
    }

    fn link_deps(&self, id: VolumeId, path: &str) -> Result<Vec<String>, MetaError> {
        self.read(|r| {
            let t = r.open_multimap_table(LINK_DEPS).map_err(engine)?;
            let mut out = Vec::new();
            for l in t.get((id.0, path)).map_err(engine)? {
                out.push(l.map_err(engine)?.value().to_string());
            }
            Ok(out)
        })
    }

    fn links_below(&self, id: VolumeId, dir: &str) -> Result<Vec<String>, MetaError> {
        // Paths below `dir` sort between `dir/` and `dir0` ('0' follows '/').
        let (lo, hi) = (format!("{dir}/"), format!("{dir}0"));
        self.read(|r| {
            let t = r.open_table(LINKS).map_err(engine)?;
            let mut out = Vec::new();
            for e in t
                .range((id.0, lo.as_str())..(id.0, hi.as_str()))
                .map_err(engine)?
            {
                let (k, _) = e.map_err(engine)?;
                out.push(k.value().1.to_string());
            }
            Ok(out)
        })
    }

    fn distrusted(&self) -> Result<Vec<([u8; 32], u64)>, MetaError> {
        self.read(|r| {
            let t = r.open_table(DISTRUST).map_err(engine)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(engine)? {
                let (k, v) = e.map_err(engine)?;
                out.push((k.value(), v.value()));
            }
            Ok(out)
        })
    }

    fn distrust(&self, node: [u8; 32], until_ms: u64) -> Result<(), MetaError> {
        self.write(|w| {
            w.open_table(DISTRUST)
                .map_err(engine)?
                .insert(node, until_ms)
                .map_err(engine)?;
            Ok(())
        })
    }

    fn forget_distrust(&self, now_ms: u64) -> Result<(), MetaError> {
        self.write(|w| {
            w.open_table(DISTRUST)
                .map_err(engine)?
                .retain(|_, until| until > now_ms)
                .map_err(engine)?;
            Ok(())
        })
    }
}
