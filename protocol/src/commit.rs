//! Commits and coordinator-signed heads.
//!
//! A head is the coordinator's ed25519 signature (its node key) over
//! `b"voltool/head/v1\0" || postcard(commit)`. The domain tag keeps a head signature from
//! ever being mistaken for any other use of the node key (TLS, for one).

use iroh_base::{PublicKey, SecretKey, Signature};
use serde::{Deserialize, Serialize};

use crate::hash::Hash;

/// Prefix of every signed head message.
pub const HEAD_DOMAIN: &[u8] = b"voltool/head/v1\0";

/// A volume's identity. Names can change (`rename`); the id never does, so a head stays
/// valid across a rename and a deleted-then-recreated name starts a new history.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub [u8; 16]);

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

/// One version of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commit {
    /// The volume.
    pub volume: VolumeId,
    /// 0 for the empty volume at creation, +1 per commit.
    pub version: u64,
    /// Hash of the parent commit's encoding, `None` at version 0.
    pub parent: Option<Hash>,
    /// Hash of the manifest's root page (see [`crate::tree`]).
    pub manifest: Hash,
    /// Size of the root page (the bao stream does not carry sizes).
    pub manifest_size: u64,
    /// Node id of the agent whose change set made this version.
    pub author: [u8; 32],
    /// Milliseconds since the Unix epoch, by the coordinator's clock.
    pub time_ms: u64,
}

impl Commit {
    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("encoding to a Vec cannot fail")
    }

    /// The root page of the manifest it names.
    pub fn root(&self) -> crate::tree::PageRef {
        crate::tree::PageRef {
            hash: self.manifest,
            size: self.manifest_size,
        }
    }

    /// The hash of the encoding (what a child's `parent` holds).
    pub fn hash(&self) -> Hash {
        Hash::of(&self.encode())
    }

    fn signed_message(&self) -> Vec<u8> {
        let mut m = HEAD_DOMAIN.to_vec();
        m.extend_from_slice(&self.encode());
        m
    }

    /// Signs the commit as coordinator.
    pub fn sign(self, key: &SecretKey) -> SignedHead {
        let sig = key.sign(&self.signed_message());
        SignedHead {
            commit: self,
            signature: sig.to_bytes(),
        }
    }
}

/// A commit with the coordinator's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHead {
    /// The commit.
    pub commit: Commit,
    /// ed25519 signature over [`HEAD_DOMAIN`] and the commit.
    #[serde(with = "serde_sig")]
    pub signature: [u8; 64],
}

/// Why a head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeadError {
    /// The signature does not verify under the coordinator's key.
    #[error("head signature does not verify against coordinator {0}")]
    BadSignature(String),
    /// The head is older than one already seen.
    #[error("head rollback refused: version {got} is older than version {seen} already seen")]
    Rollback {
        /// Version offered.
        got: u64,
        /// Highest version seen.
        seen: u64,
    },
    /// The head is for another volume than asked.
    #[error("head is for volume {got}, expected {expected}")]
    WrongVolume {
        /// Volume in the head.
        got: VolumeId,
        /// Volume expected.
        expected: VolumeId,
    },
    /// Same version as one seen, different content.
    #[error("head version {0} differs from the one already seen with that version")]
    Fork(u64),
    /// An older commit does not link to the next one (its hash is not the next one's
    /// parent, or its volume or version is not the next one's).
    #[error("version {0} is not the parent of the version after it: refused")]
    BrokenChain(u64),
}

/// Checks that `older` (oldest first) are the commits right before `head`, each the parent
/// of the next: a client that verified `head`'s signature may then trust each of them as
/// much. Returns the oldest (`head` itself if `older` is empty).
pub fn verify_chain<'a>(head: &'a Commit, older: &'a [Commit]) -> Result<&'a Commit, HeadError> {
    let mut next = head;
    for c in older.iter().rev() {
        let links = c.volume == next.volume
            && next.version.checked_sub(1) == Some(c.version)
            && next.parent == Some(c.hash());
        if !links {
            return Err(HeadError::BrokenChain(c.version));
        }
        next = c;
    }
    Ok(next)
}

impl SignedHead {
    /// Verifies the signature under the coordinator's key.
    pub fn verify(&self, coordinator: &PublicKey) -> Result<(), HeadError> {
        let sig = Signature::from_bytes(&self.signature);
        coordinator
            .verify(&self.commit.signed_message(), &sig)
            .map_err(|_| HeadError::BadSignature(coordinator.fmt_short().to_string()))
    }

    /// Verifies the signature and that this head does not roll back `seen` (the newest head
    /// accepted before for the same volume, if any).
    pub fn verify_against(
        &self,
        coordinator: &PublicKey,
        seen: Option<&Commit>,
    ) -> Result<(), HeadError> {
        self.verify(coordinator)?;
        if let Some(seen) = seen {
            if seen.volume != self.commit.volume {
                return Err(HeadError::WrongVolume {
                    got: self.commit.volume,
                    expected: seen.volume,
                });
            }
            if self.commit.version < seen.version {
                return Err(HeadError::Rollback {
                    got: self.commit.version,
                    seen: seen.version,
                });
            }
            if self.commit.version == seen.version && &self.commit != seen {
                return Err(HeadError::Fork(seen.version));
            }
        }
        Ok(())
    }
}

mod serde_sig {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let b = <std::borrow::Cow<'de, [u8]>>::deserialize(d)?;
        b.as_ref()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(b.len(), &"64 bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(version: u64) -> Commit {
        Commit {
            volume: VolumeId([7; 16]),
            version,
            parent: None,
            manifest: Hash::EMPTY,
            manifest_size: 2,
            author: [1; 32],
            time_ms: 5,
        }
    }

    #[test]
    fn sign_verify_forge_rollback() {
        let k = SecretKey::from_bytes(&[3; 32]);
        let other = SecretKey::from_bytes(&[4; 32]);
        let h = commit(2).sign(&k);
        h.verify(&k.public()).unwrap();
        assert!(matches!(
            h.verify(&other.public()),
            Err(HeadError::BadSignature(_))
        ));
        let forged = commit(2).sign(&other);
        assert!(forged.verify(&k.public()).is_err());
        let mut tampered = h.clone();
        tampered.commit.version = 3;
        assert!(tampered.verify(&k.public()).is_err());
        let old = commit(1).sign(&k);
        assert!(matches!(
            old.verify_against(&k.public(), Some(&h.commit)),
            Err(HeadError::Rollback { got: 1, seen: 2 })
        ));
        h.verify_against(&k.public(), Some(&h.commit)).unwrap();
        let dec: SignedHead = postcard::from_bytes(&postcard::to_stdvec(&h).unwrap()).unwrap();
        assert_eq!(dec, h);
    }

    /// Versions 0..=n, each the parent of the next.
    fn chain(n: u64) -> Vec<Commit> {
        let mut out: Vec<Commit> = Vec::new();
        for v in 0..=n {
            let mut c = commit(v);
            c.manifest = Hash::of(&v.to_le_bytes());
            c.parent = out.last().map(Commit::hash);
            out.push(c);
        }
        out
    }

    #[test]
    fn a_chain_links_each_version_to_the_next_and_nothing_else() {
        let all = chain(5);
        let (head, older) = all.split_last().unwrap();
        assert_eq!(verify_chain(head, older).unwrap().version, 0);
        assert_eq!(verify_chain(head, &older[3..]).unwrap().version, 3);
        assert_eq!(verify_chain(head, &[]).unwrap(), head);
        // A changed manifest, a gap, a reordering, another volume: refused.
        let mut bad = older.to_vec();
        bad[2].manifest = Hash::EMPTY;
        assert_eq!(verify_chain(head, &bad), Err(HeadError::BrokenChain(2)));
        let gap: Vec<Commit> = older.iter().filter(|c| c.version != 3).cloned().collect();
        assert!(verify_chain(head, &gap).is_err());
        let mut swapped = older.to_vec();
        swapped.swap(0, 1);
        assert!(verify_chain(head, &swapped).is_err());
        let mut other = older.to_vec();
        other[4].volume = VolumeId([8; 16]);
        assert!(verify_chain(head, &other).is_err());
    }

    proptest::proptest! {
        /// Whatever a coordinator sends as the older commits, checking them never panics
        /// and accepts only the true chain.
        #[test]
        fn checking_any_chain_never_panics(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            cut in 0usize..6,
        ) {
            let all = chain(5);
            let (head, older) = all.split_last().unwrap();
            let forged: Vec<Commit> = bytes
                .chunks(120)
                .filter_map(|b| postcard::from_bytes(b).ok())
                .collect();
            let r = verify_chain(head, &forged);
            proptest::prop_assert!(r.is_err() || forged.is_empty() || forged == older[older.len() - forged.len()..]);
            proptest::prop_assert!(verify_chain(head, &older[cut.min(older.len())..]).is_ok());
        }
    }
}
