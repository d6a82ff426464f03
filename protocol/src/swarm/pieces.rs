//! A set of piece (or unit) indices of one blob or batch: a bitset, so that what a provider
//! holds and what a downloader lacks intersect in a few word operations.

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A set of indices below `len`. A decoded set is always consistent (no word or bit past
/// `len`), whatever the bytes said.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Raw")]
pub struct PieceSet {
    len: u32,
    words: Vec<u64>,
}

/// The wire form of a [`PieceSet`], before it is made consistent.
#[derive(Deserialize)]
struct Raw {
    len: u32,
    words: Vec<u64>,
}

impl From<Raw> for PieceSet {
    /// Never allocates for a claimed length: a set claiming more indices than its words
    /// hold ranges over what they hold (a receiver then refuses it for its length).
    fn from(r: Raw) -> Self {
        let len = r
            .len
            .min(u32::try_from(r.words.len() * 64).unwrap_or(u32::MAX));
        let mut s = PieceSet {
            len,
            words: r.words,
        };
        s.trim();
        s
    }
}

impl PieceSet {
    /// The empty set of indices below `len`.
    pub fn empty(len: u32) -> Self {
        PieceSet {
            len,
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    /// Every index below `len`.
    pub fn full(len: u32) -> Self {
        let mut s = Self::empty(len);
        for w in &mut s.words {
            *w = u64::MAX;
        }
        s.trim();
        s
    }

    /// The indices in `iter` (those at or past `len` are left out).
    pub fn from_iter(len: u32, iter: impl IntoIterator<Item = u32>) -> Self {
        let mut s = Self::empty(len);
        for i in iter {
            if i < len {
                s.insert(i);
            }
        }
        s
    }

    /// How many indices the set ranges over.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Clears bits past `len` (a decoded set may carry them).
    fn trim(&mut self) {
        self.words.resize(self.len.div_ceil(64) as usize, 0);
        debug_assert!(self.words.len() * 64 >= self.len as usize);
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }

    /// A set decoded from a peer, made consistent: its words fit `len` and no bit lies past it.
    pub fn fitted(mut self, len: u32) -> Self {
        self.len = len;
        self.trim();
        self
    }

    /// Whether `i` is in the set.
    pub fn contains(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds `i`; returns whether it was new.
    pub fn insert(&mut self, i: u32) -> bool {
        debug_assert!(i < self.len);
        let w = &mut self.words[(i / 64) as usize];
        let new = *w & (1 << (i % 64)) == 0;
        *w |= 1 << (i % 64);
        new
    }

    /// Removes `i`; returns whether it was there.
    pub fn remove(&mut self, i: u32) -> bool {
        if i >= self.len {
            return false;
        }
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w &= !(1 << (i % 64));
        was
    }

    /// Number of indices in the set.
    pub fn count(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// Whether every index below `len` is in the set.
    pub fn is_full(&self) -> bool {
        self.count() == self.len
    }

    /// Adds every index of `other`.
    pub fn union_with(&mut self, other: &PieceSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Adds the indices of `other` that are not in `except`, calling `added` with each one
    /// that was not in the set yet.
    pub fn absorb(&mut self, other: &PieceSet, except: &PieceSet, mut added: impl FnMut(u32)) {
        // Only the words where `other` has indices are read of `self` and `except`: a push
        // of one new piece touches one word of the receiver's sets, not all of them.
        for (k, &b) in other.words.iter().enumerate() {
            if b == 0 {
                continue;
            }
            let (Some(a), x) = (self.words.get_mut(k), except.words.get(k).copied()) else {
                break;
            };
            let mut new = b & !x.unwrap_or(0) & !*a;
            *a |= new;
            while new != 0 {
                added(k as u32 * 64 + new.trailing_zeros());
                new &= new - 1;
            }
        }
    }

    /// Whether every index of the set is in `other`.
    pub fn is_subset(&self, other: &PieceSet) -> bool {
        // `other`'s words are read only where `self` has indices.
        self.words
            .iter()
            .enumerate()
            .all(|(k, &a)| a == 0 || a & !other.words.get(k).copied().unwrap_or(0) == 0)
    }

    /// Removes every index of `other`.
    pub fn subtract(&mut self, other: &PieceSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= !b;
        }
    }

    /// Whether the two sets share an index.
    pub fn intersects(&self, other: &PieceSet) -> bool {
        // `other`'s words are read only where `self` has indices.
        self.words
            .iter()
            .zip(&other.words)
            .any(|(&a, b)| a != 0 && a & b != 0)
    }

    /// Number of indices the two sets share.
    pub fn count_and(&self, other: &PieceSet) -> u32 {
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a & b).count_ones())
            .sum()
    }

    /// The indices of both sets.
    pub fn and(&self, other: &PieceSet) -> PieceSet {
        PieceSet {
            len: self.len,
            words: self
                .words
                .iter()
                .zip(other.words.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a & b)
                .collect(),
        }
    }

    /// The indices in the set, in increasing order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(k, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(k as u32 * 64 + b)
            })
        })
    }

    /// The `n`-th index of the set (0-based), if it has that many.
    fn nth(&self, mut n: u32) -> Option<u32> {
        for (k, &w) in self.words.iter().enumerate() {
            let c = w.count_ones();
            if n < c {
                let mut w = w;
                for _ in 0..n {
                    w &= w - 1;
                }
                return Some(k as u32 * 64 + w.trailing_zeros());
            }
            n -= c;
        }
        None
    }

    /// An index of `self ∩ other` chosen uniformly at random, if they share one.
    pub fn random_common(&self, other: &PieceSet, rng: &mut impl Rng) -> Option<u32> {
        let n = self.count_and(other);
        if n == 0 {
            return None;
        }
        self.and(other).nth(rng.random_range(0..n))
    }

    /// An index of the set chosen uniformly at random, if it has one.
    pub fn random(&self, rng: &mut impl Rng) -> Option<u32> {
        let n = self.count();
        (n > 0).then(|| self.nth(rng.random_range(0..n)).expect("n < count"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    proptest! {
        #[test]
        fn set_operations_match_a_model(
            len in 1u32..300,
            a in proptest::collection::vec(0u32..400, 0..80),
            b in proptest::collection::vec(0u32..400, 0..80),
            seed in any::<u64>(),
        ) {
            let model = |v: &[u32]| -> std::collections::BTreeSet<u32> {
                v.iter().copied().filter(|i| *i < len).collect()
            };
            let (ma, mb) = (model(&a), model(&b));
            let (sa, sb) = (PieceSet::from_iter(len, a.clone()), PieceSet::from_iter(len, b.clone()));
            prop_assert_eq!(sa.iter().collect::<Vec<_>>(), ma.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(sa.count() as usize, ma.len());
            let both: Vec<u32> = ma.intersection(&mb).copied().collect();
            prop_assert_eq!(sa.and(&sb).iter().collect::<Vec<_>>(), both.clone());
            prop_assert_eq!(sa.count_and(&sb) as usize, both.len());
            prop_assert_eq!(sa.intersects(&sb), !both.is_empty());
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
            match sa.random_common(&sb, &mut rng) {
                Some(i) => prop_assert!(both.contains(&i)),
                None => prop_assert!(both.is_empty()),
            }
            let mut u = sa.clone();
            u.union_with(&sb);
            prop_assert_eq!(u.count() as usize, ma.union(&mb).count());
            u.subtract(&sb);
            prop_assert_eq!(u.iter().collect::<Vec<_>>(), ma.difference(&mb).copied().collect::<Vec<_>>());
            prop_assert!(PieceSet::full(len).is_full());
            prop_assert_eq!(PieceSet::full(len).count(), len);
            prop_assert_eq!(sa.is_subset(&sb), ma.is_subset(&mb));
            // Absorbing b except a into the set of a ∩ b adds b − a, and names each new one.
            let mut target = sa.and(&sb);
            let mut added = Vec::new();
            target.absorb(&sb, &sa, |i| added.push(i));
            let want: Vec<u32> = mb.difference(&ma).copied().collect();
            prop_assert_eq!(&added, &want);
            let all: Vec<u32> = mb.iter().copied().collect();
            prop_assert_eq!(target.iter().collect::<Vec<_>>(), all);
        }

        #[test]
        fn a_decoded_set_never_panics_once_fitted(len in 0u32..300, words in proptest::collection::vec(any::<u64>(), 0..10), claimed in any::<u32>()) {
            let bytes = postcard::to_stdvec(&(claimed, words)).unwrap();
            if let Ok(s) = postcard::from_bytes::<PieceSet>(&bytes) {
                prop_assert!(s.iter().all(|i| i < s.len()));
                prop_assert_eq!(s.words.len(), s.len().div_ceil(64) as usize);
                let s = s.fitted(len);
                prop_assert!(s.count() <= len);
                prop_assert!(s.iter().all(|i| i < len));
                let other = PieceSet::full(len);
                prop_assert_eq!(s.count_and(&other), s.count());
            }
        }
    }

    #[test]
    fn random_choice_covers_every_member() {
        let s = PieceSet::from_iter(200, [3, 64, 65, 199]);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            seen.insert(s.random(&mut rng).unwrap());
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![3, 64, 65, 199]);
        assert_eq!(PieceSet::empty(10).random(&mut rng), None);
    }
}
