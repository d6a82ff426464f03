//! Manifests as trees of pages: what a head names, and what a one-file change moves.
//!
//! A manifest (the sorted map `path -> entry`, see [`crate::manifest`]) is stored as a tree
//! of *pages*, each a blob named by its BLAKE3 hash. A head names the root page
//! ([`crate::Commit::manifest`], with its size). Pages are small (tens of KiB), so an agent
//! that already holds one version fetches, decodes and compares only the pages on the paths
//! from the root to what changed: a one-file change in a million-file volume moves about
//! one page per level.
//!
//! # Encoding (version 2)
//! A page is `version: u8 = 2`, `level: u8`, a varint count, then the items in strictly
//! increasing path order, each in postcard:
//! - level 0 (a *leaf*): entries `(path, Entry)`;
//! - level `n > 0` (a *branch*): children [`Child`] `{ first, page, size, entries }`: the
//!   first path of the child page (at level `n - 1`), its hash, its encoded size, and the
//!   number of entries below it.
//!
//! Every key of a child lies in `[first, next child's first)`. The root is the one page of
//! the top level; an empty manifest is an empty leaf (the only page that may be empty).
//!
//! # Canonical splitting
//! The same entries always give the same pages, whatever edits led to them (heads compare
//! manifests by root hash). Boundaries are chosen by content: a page ends after an item
//! whose key `k` (the path, or a child's `first`) at level `l` has
//! `u32_le(blake3("voltool/page/v2\0" || l || k)[0..4]) mod 256 == 0` (for a branch: once
//! it has two children or more), or once its items take [`PAGE_FILL`] bytes or more (long
//! paths). Both depend only on the page's own items,
//! so an edit changes the pages it touches and, rarely, the next one, never the rest: one
//! flat directory of a million files is thousands of leaves, and edits anywhere keep the
//! others. Pages are at most [`MAX_PAGE_BYTES`].
//!
//! # Trust
//! Pages are verified blobs below a coordinator-signed head. Decoding still refuses what
//! no honest coordinator writes: unknown versions, items out of order, hostile paths and
//! symlinks, children at the wrong level or with the wrong first key, trailing bytes.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hash::Hash;
use crate::manifest::ManifestError;
use crate::path::VolPath;

mod diff;
mod page;
mod read;
mod write;

pub use diff::{Delta, diff, diff_each, missing_for_diff};
pub use page::Page;
pub use read::{children, get, mark, missing, missing_in, range, under};
pub use write::{Built, apply, build};

/// Encoding version, the first byte of every page.
pub const PAGE_VERSION: u8 = 2;
/// Largest encoded page accepted.
pub const MAX_PAGE_BYTES: usize = 1 << 20;
/// A page ends once its items take this many bytes.
pub const PAGE_FILL: usize = 256 << 10;
/// Deepest tree accepted. Branches have two children or more but the last of a level, so
/// even keys chosen to end pages everywhere make at most 23 levels of
/// [`crate::manifest::MAX_ENTRIES`]; a million entries make 3 or 4 in practice.
pub const MAX_LEVEL: u8 = 32;
const DOMAIN: &[u8] = b"voltool/page/v2\0";

/// Where a tree's pages are cut. [`Shape::CANONICAL`] is the only one heads use; others
/// make deep trees of few entries in tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// A key ends a page when the low `bits` bits of its boundary hash are zero.
    pub bits: u8,
    /// A page ends once its items take this many bytes.
    pub fill: usize,
}

impl Shape {
    /// 256 items per page on average, [`PAGE_FILL`] at most (plus one item).
    pub const CANONICAL: Shape = Shape {
        bits: 8,
        fill: PAGE_FILL,
    };

    fn boundary(&self, level: u8, key: &str) -> bool {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(&[level]);
        h.update(key.as_bytes());
        let b = h.finalize();
        let v = u32::from_le_bytes(b.as_bytes()[..4].try_into().expect("4 bytes"));
        v & ((1u32 << self.bits) - 1) == 0
    }
}

/// A page named by hash and encoded size (enough to fetch and verify it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PageRef {
    /// BLAKE3 of the encoded page.
    pub hash: Hash,
    /// Its encoded size.
    pub size: u64,
}

/// A branch's item: one child page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    /// The first path in the child page.
    pub first: VolPath,
    /// The child page.
    pub page: Hash,
    /// Its encoded size.
    pub size: u32,
    /// Entries below it.
    pub entries: u64,
}

impl Child {
    fn page_ref(&self) -> PageRef {
        PageRef {
            hash: self.page,
            size: u64::from(self.size),
        }
    }
}

/// Why a tree operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TreeError {
    /// A page the operation needs is not held; fetch it and try again.
    #[error("manifest page {} is not held", .0.hash.short())]
    Missing(PageRef),
    /// A page that is not a valid page, or not where it stands.
    #[error("bad manifest page {page}: {reason}")]
    Bad {
        /// The page.
        page: String,
        /// What is wrong.
        reason: String,
    },
    /// Entries that make no valid manifest.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The page source failed.
    #[error("cannot read manifest page: {0}")]
    Source(String),
}

fn bad(page: &Hash, reason: impl Into<String>) -> TreeError {
    TreeError::Bad {
        page: page.short(),
        reason: reason.into(),
    }
}

/// Where pages come from: the local store (agents and the origin), or memory.
pub trait PageSource {
    /// The page, decoded, or `None` when it is not held.
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError>;
}

/// Pages in memory: new pages not stored yet, and tests.
#[derive(Default, Debug, Clone)]
pub struct MemPages(pub HashMap<Hash, Arc<Page>>);

impl MemPages {
    /// Adds an encoded page.
    pub fn insert(&mut self, r: PageRef, bytes: &[u8]) -> Result<(), TreeError> {
        let p = Page::decode(bytes).map_err(|e| bad(&r.hash, e.to_string()))?;
        self.0.insert(r.hash, Arc::new(p));
        Ok(())
    }
}

impl PageSource for MemPages {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        Ok(self.0.get(&r.hash).cloned())
    }
}

/// The pages of the first source, then those of the second.
#[allow(missing_debug_implementations)]
pub struct Layered<'a>(pub &'a dyn PageSource, pub &'a dyn PageSource);

impl PageSource for Layered<'_> {
    fn page(&self, r: &PageRef) -> Result<Option<Arc<Page>>, TreeError> {
        match self.0.page(r)? {
            Some(p) => Ok(Some(p)),
            None => self.1.page(r),
        }
    }
}

#[cfg(test)]
mod tests;
