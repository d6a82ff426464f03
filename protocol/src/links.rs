//! Where a volume's symbolic links lead when the kernel follows them.
//!
//! Each link's target is checked lexically where it is made ([`crate::path::
//! check_symlink_target`]), but a chain of links can still leave the volume: `a/b/up -> ../..`
//! is the volume root, and `s -> a/b/up/../etc` then climbs above it, because the kernel
//! resolves `..` physically, from the directory a link led to. [`check_link`] resolves a
//! link as the kernel would, against the whole tree (looked up one path at a time): every
//! link it passes through is followed, `..` goes to the real parent of the directory reached,
//! and climbing above the volume root is an escape. A resolution that stops (a missing name,
//! a file used as a directory, more than [`MAX_FOLLOWS`] links) cannot escape today; the
//! paths it looked up, found or not, are returned, so that a later change of any of them
//! can check the link again.

use std::collections::BTreeSet;

use crate::manifest::Entry;
use crate::path::VolPath;
use crate::tree::TreeError;

/// Links followed in one resolution, as Linux's `MAXSYMLINKS` (40) allows, plus the link
/// itself: a chain the kernel refuses with `ELOOP` never escapes.
pub const MAX_FOLLOWS: u32 = 40;
/// Path components a link's resolution may walk, nested links included; a longer one is
/// refused rather than walked (the kernel would walk it, so it is checked or refused, never
/// let through unchecked).
pub const MAX_STEPS: usize = 4096;

/// Why a link was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Followed through the volume's own links, it leads outside the volume.
    #[error("symlink {link:?} -> {target:?} leads outside the volume when followed")]
    Escapes {
        /// The link.
        link: String,
        /// Its target.
        target: String,
    },
    /// Its resolution walks more than [`MAX_STEPS`] components.
    #[error("symlink {link:?} takes more than {MAX_STEPS} steps to follow: refused unchecked")]
    TooComplex {
        /// The link.
        link: String,
    },
    /// A lookup in the tree failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// Looks up one path of the tree a link is checked against.
pub type Lookup<'a> = dyn FnMut(&VolPath) -> Result<Option<Entry>, TreeError> + 'a;

/// Checks that the link at `link` with target `target`, followed as the kernel follows it
/// through the tree that `look` reads, stays inside the volume. Returns the paths its
/// resolution looked up (found or not): the link needs checking again exactly when one of
/// them changes.
pub fn check_link(
    link: &VolPath,
    target: &str,
    look: &mut Lookup<'_>,
) -> Result<BTreeSet<VolPath>, LinkError> {
    let mut w = Walk {
        look,
        deps: BTreeSet::new(),
        follows: 0,
        steps: 0,
        link,
    };
    let start: Vec<String> = link
        .parent()
        .map(|p| p.components().map(str::to_string).collect())
        .unwrap_or_default();
    match w.walk(start, target)? {
        End::Escape => Err(LinkError::Escapes {
            link: link.to_string(),
            target: target.to_string(),
        }),
        _ => Ok(w.deps),
    }
}

/// Where a resolution ended.
enum End {
    /// At this directory (its components).
    Dir(Vec<String>),
    /// At a file.
    File,
    /// Nowhere: a missing name, a file used as a directory, too many links.
    Stop,
    /// Above the volume root.
    Escape,
}

struct Walk<'a, 'b> {
    look: &'a mut Lookup<'b>,
    deps: BTreeSet<VolPath>,
    follows: u32,
    steps: usize,
    link: &'a VolPath,
}

impl Walk<'_, '_> {
    /// Resolves `target` from the directory `cur`.
    fn walk(&mut self, mut cur: Vec<String>, target: &str) -> Result<End, LinkError> {
        if target.starts_with('/') {
            return Ok(End::Escape);
        }
        let comps: Vec<&str> = target
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        for (i, c) in comps.iter().enumerate() {
            self.steps += 1;
            if self.steps > MAX_STEPS {
                return Err(LinkError::TooComplex {
                    link: self.link.to_string(),
                });
            }
            let last = i + 1 == comps.len();
            if *c == ".." {
                if cur.pop().is_none() {
                    return Ok(End::Escape);
                }
                continue;
            }
            cur.push((*c).to_string());
            // A name no volume path can have (too long) is never there.
            let Ok(p) = VolPath::new(&cur.join("/")) else {
                return Ok(End::Stop);
            };
            let found = (self.look)(&p)?;
            self.deps.insert(p);
            match found {
                None => return Ok(End::Stop),
                Some(Entry::Dir { .. }) => {}
                Some(Entry::File { .. }) => return Ok(if last { End::File } else { End::Stop }),
                Some(Entry::Symlink { target }) => {
                    if self.follows >= MAX_FOLLOWS {
                        return Ok(End::Stop);
                    }
                    self.follows += 1;
                    cur.pop();
                    match self.walk(cur, &target)? {
                        End::Dir(d) => cur = d,
                        End::File if last => return Ok(End::File),
                        End::File => return Ok(End::Stop),
                        other => return Ok(other),
                    }
                }
            }
        }
        Ok(End::Dir(cur))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::hash::Hash;

    fn p(s: &str) -> VolPath {
        VolPath::new(s).unwrap()
    }

    /// A tree from `(path, what)`: `/` a directory, `=target` a link, anything else a file.
    fn tree(items: &[(&str, &str)]) -> BTreeMap<VolPath, Entry> {
        items
            .iter()
            .map(|(path, what)| {
                let e = match *what {
                    "/" => Entry::Dir { mode: 0o755 },
                    w if w.starts_with('=') => Entry::Symlink {
                        target: w[1..].to_string(),
                    },
                    _ => Entry::File {
                        size: 1,
                        mode: 0o644,
                        mtime_ns: 0,
                        hash: Hash([1; 32]),
                    },
                };
                (p(path), e)
            })
            .collect()
    }

    fn check(t: &BTreeMap<VolPath, Entry>, link: &str) -> Result<BTreeSet<VolPath>, LinkError> {
        let Some(Entry::Symlink { target }) = t.get(&p(link)) else {
            panic!("{link} is no link")
        };
        check_link(&p(link), target, &mut |q| Ok(t.get(q).cloned()))
    }

    fn escapes(t: &BTreeMap<VolPath, Entry>, link: &str) -> bool {
        matches!(check(t, link), Err(LinkError::Escapes { .. }))
    }

    #[test]
    fn a_chain_through_a_link_to_the_root_escapes() {
        // Each link is harmless alone: `a/b/up` is the volume root, and `s` climbs above
        // it through `up`.
        let t = tree(&[
            ("a", "/"),
            ("a/b", "/"),
            ("a/b/up", "=../.."),
            ("s", "=a/b/up/../etc/hostname"),
        ]);
        assert!(!escapes(&t, "a/b/up"));
        assert!(escapes(&t, "s"));
        assert!(crate::path::check_symlink_target(&p("s"), "a/b/up/../etc/hostname").is_ok());
    }

    #[test]
    fn links_to_links_and_directories_reached_through_links() {
        let t = tree(&[
            ("d", "/"),
            ("d/e", "/"),
            ("d/e/f", "x"),
            ("deep", "=d/e"),
            ("l1", "=l2"),
            ("l2", "=deep"),
            // `l1` is `d/e`: `..` from there is `d`, and `../..` the root; one more leaves.
            ("ok", "=l1/../../d/e/f"),
            ("out", "=l1/../../.."),
            ("x", "/"),
            ("x/sneak", "=../l1/../../../y"),
        ]);
        assert!(!escapes(&t, "ok"));
        let deps = check(&t, "ok").unwrap();
        for d in ["l1", "l2", "deep", "d", "d/e", "d/e/f"] {
            assert!(deps.contains(&p(d)), "{d} not among {deps:?}");
        }
        assert!(escapes(&t, "out"));
        assert!(escapes(&t, "x/sneak"));
    }

    #[test]
    fn a_resolution_that_stops_cannot_escape_but_names_what_it_waits_for() {
        let t = tree(&[
            ("f", "x"),
            ("through_file", "=f/../.."),
            ("missing", "=nothere/../.."),
            ("loop", "=loop/../.."),
        ]);
        assert!(!escapes(&t, "through_file"));
        let deps = check(&t, "missing").unwrap();
        assert!(deps.contains(&p("nothere")));
        // A loop is ELOOP for the kernel.
        assert!(!escapes(&t, "loop"));
        // Once `nothere` is a directory, the same link escapes.
        let t = tree(&[("nothere", "/"), ("missing", "=nothere/../..")]);
        assert!(escapes(&t, "missing"));
    }

    #[test]
    fn a_long_chain_is_followed_up_to_the_kernels_limit() {
        // l0 -> l1 -> … -> l39 -> `..`: 40 links after the first, as the kernel follows.
        let mut items: Vec<(String, String)> = (0..40)
            .map(|i| (format!("l{i}"), format!("=l{}", i + 1)))
            .collect();
        items.push(("l40".into(), "=..".into()));
        let refs: Vec<(&str, &str)> = items
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert!(escapes(&tree(&refs), "l0"));
    }

    #[test]
    fn a_resolution_too_long_to_walk_is_refused() {
        // `l0` walks 1,400 components to the root; `l1` walks it three times.
        let long = format!("={}", "d/../".repeat(700));
        let t = tree(&[("d", "/"), ("l0", &long), ("l1", "=l0/l0/l0")]);
        assert!(!escapes(&t, "l0"));
        assert!(matches!(check(&t, "l1"), Err(LinkError::TooComplex { .. })));
    }

    proptest! {
        /// Whatever the tree and the target, the check ends without panicking, and an
        /// escape it reports is one: the same walk, without the lexical filter, climbs above
        /// the root.
        #[test]
        fn never_panics(
            names in proptest::collection::vec("[ab.]{1,2}", 1..6),
            targets in proptest::collection::vec("[ab./]{0,12}", 1..6),
        ) {
            let mut t = BTreeMap::new();
            for (i, n) in names.iter().enumerate() {
                let Ok(path) = VolPath::new(n) else { continue };
                let e = match i % 3 {
                    0 => Entry::Dir { mode: 0o755 },
                    1 => Entry::Symlink { target: targets[i % targets.len()].clone() },
                    _ => Entry::File { size: 0, mode: 0o644, mtime_ns: 0, hash: Hash::EMPTY },
                };
                t.insert(path, e);
            }
            for target in &targets {
                let _ = check_link(&p("a"), target, &mut |q| Ok(t.get(q).cloned()));
            }
        }
    }
}
