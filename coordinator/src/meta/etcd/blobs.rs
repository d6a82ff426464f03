//! The fleet's blob records and the collections' condemnations.

use super::*;

impl EtcdMeta {
    pub(super) fn blob_key(&self, h: &Hash) -> Vec<u8> {
        self.key(&[b"b", h.to_hex().as_bytes()])
    }

    pub(super) fn condemned_key(&self, h: &Hash) -> Vec<u8> {
        self.key(&[b"g", h.to_hex().as_bytes()])
    }

    /// The revision of the leader key this writer's writes are fenced on (0: none).
    pub fn fence_revision(&self) -> i64 {
        self.fence
            .read()
            .expect("not poisoned")
            .as_ref()
            .map_or(0, |f| f.revision)
    }
}

impl BlobRecords for EtcdMeta {
    fn record_blobs(&self, blobs: &[(Hash, u64)]) -> Result<(), MetaError> {
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for (h, size) in blobs.iter().filter(|(h, _)| seen.insert(*h)) {
            ops.put(self.blob_key(h), size.to_be_bytes().to_vec());
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine(
                "a blob record's write was refused".into(),
            ));
        }
        Ok(())
    }

    fn condemn_blobs(&self, blobs: &[Hash]) -> Result<(), MetaError> {
        let by = self.fence_revision();
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for h in blobs.iter().filter(|h| seen.insert(**h)) {
            ops.delete(self.blob_key(h), None);
            ops.put(self.condemned_key(h), by.to_be_bytes().to_vec());
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine("a condemnation was refused".into()));
        }
        Ok(())
    }

    fn clear_condemned(&self, blobs: &[Hash]) -> Result<(), MetaError> {
        let mut ops = Ops::default();
        let mut seen = std::collections::HashSet::new();
        for h in blobs.iter().filter(|h| seen.insert(**h)) {
            ops.delete(self.condemned_key(h), None);
        }
        if !self.batches(&[], ops)? {
            return Err(MetaError::Engine(
                "clearing a condemnation was refused".into(),
            ));
        }
        Ok(())
    }

    fn condemned(&self) -> Result<Vec<(Hash, i64)>, MetaError> {
        let prefix = self.key(&[b"g", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let bad = |why: &str| MetaError::Corrupt {
                what: "a condemnation mark".to_string(),
                why: why.to_string(),
            };
            let mut h = [0u8; 32];
            hex::decode_to_slice(&kv.key()[prefix.len()..], &mut h)
                .map_err(|_| bad("its key is no hash"))?;
            let by: [u8; 8] = kv.value().try_into().map_err(|_| bad("not 8 bytes"))?;
            out.push((Hash(h), i64::from_be_bytes(by)));
        }
        Ok(out)
    }

    fn all_blobs(&self) -> Result<Vec<(Hash, u64)>, MetaError> {
        let prefix = self.key(&[b"b", b""]);
        let mut out = Vec::new();
        for kv in self.scan_prefix(prefix.clone(), false)? {
            let bad = |why: &str| MetaError::Corrupt {
                what: "a blob record".to_string(),
                why: why.to_string(),
            };
            let mut h = [0u8; 32];
            hex::decode_to_slice(&kv.key()[prefix.len()..], &mut h)
                .map_err(|_| bad("its key is no hash"))?;
            let size: [u8; 8] = kv.value().try_into().map_err(|_| bad("not 8 bytes"))?;
            out.push((Hash(h), u64::from_be_bytes(size)));
        }
        Ok(out)
    }
}
