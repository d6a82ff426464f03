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
}
