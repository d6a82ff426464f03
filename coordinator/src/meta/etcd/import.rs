//! A fleet's state moved from one coordinator's redb file into etcd, for coordinators in
//! failover: every volume with its head, version records and link index, the distrusted
//! providers, and the origin's blob records.

use super::*;

/// What an import wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Imported {
    /// Volumes.
    pub volumes: usize,
    /// Version records.
    pub versions: usize,
    /// Entries of the link indexes.
    pub links: usize,
    /// Records of blobs the origin holds.
    pub blobs: usize,
}

impl EtcdMeta {
    /// Writes everything `from` holds, and the records of the origin's `blobs`, under this
    /// fleet's prefix, which must hold no volume yet (refused with [`MetaError::NotEmpty`]). No coordinator may run on either meanwhile. Blocking.
    pub fn import(&self, from: &dyn Meta, blobs: &[(Hash, u64)]) -> Result<Imported, MetaError> {
        if !self.volumes()?.is_empty() {
            return Err(MetaError::NotEmpty(format!(
                "etcd prefix {:?}",
                self.url.prefix
            )));
        }
        let mut done = Imported::default();
        let mut ops = Ops::default();
        for (name, rec) in from.volumes()? {
            let id = rec.id;
            let Some(head) = from.head(id)? else {
                continue;
            };
            let v = head.commit.version;
            for c in from.commits(id, 0..v + 1)?.into_iter().flatten() {
                ops.put(self.commit_key(id, c.version), c.encode());
                done.versions += 1;
            }
            for (link, deps) in from.links(id)? {
                let mut seen = std::collections::BTreeSet::new();
                for d in deps.iter().filter(|d| seen.insert(*d)) {
                    let mut k = self.dep_prefix(id, d);
                    k.extend_from_slice(link.as_bytes());
                    ops.put(k, Vec::new());
                }
                ops.put(self.link_key(id, &link), encode(&deps)?);
                done.links += 1;
            }
            if let Some(indexed) = from.links_indexed(id)? {
                ops.put(self.indexed_key(id), indexed.to_be_bytes().to_vec());
            }
            ops.put(self.head_key(id), encode(&head)?);
            ops.put(self.vol_key(&name), encode(&rec)?);
            done.volumes += 1;
        }
        for (node, until) in from.distrusted()? {
            ops.put(
                self.key(&[b"x", hex::encode(node).as_bytes()]),
                until.to_be_bytes().to_vec(),
            );
        }
        for (h, size) in blobs {
            ops.put(self.blob_key(h), size.to_be_bytes().to_vec());
            done.blobs += 1;
        }
        // A volume's record goes after its head and versions: an import cut short shows no
        // volume half there, and can run again.
        self.batches(&[], ops)?;
        Ok(done)
    }
}
