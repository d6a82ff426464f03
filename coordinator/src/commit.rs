//! Commits: a change set arrives in parts and is merged into the head per path (last
//! writer wins); the new head is signed once every part is applied.
//!
//! Each part is applied to the tree built from the parts before it, and that tree's new
//! pages are stored as it goes, so a change set of a million paths is never held whole.
//! The head moves only at the end: a part refused, or a stream cut short, leaves it as it
//! was (and at most a few pages no head names).

use std::time::Duration;

use voltool_protocol::VolPath;
use voltool_protocol::coord::{
    CommitPart, MAX_COMMIT_PART, MAX_COMMIT_PART_BYTES, MAX_OVERWRITTEN,
};
use voltool_protocol::tree::PageRef;

use super::volumes::{Reply, head_of, internal, meta_fail, record};
use super::*;

/// How long the coordinator waits for the next part of a commit (it holds the write lock
/// meanwhile).
const PART_TIMEOUT: Duration = Duration::from_secs(60);

/// A commit being applied.
struct Merge {
    name: String,
    id: VolumeId,
    head: SignedHead,
    /// The head's tree: priors are checked against it.
    current: PageRef,
    /// The head's tree with the parts so far applied.
    next: PageRef,
    changes: u64,
    overwritten: Vec<VolPath>,
    overwritten_total: u64,
    /// The links the merged tree must be checked for.
    links: super::links::LinkCheck,
    /// The pages written so far, recorded with the head where records are shared.
    pages: Vec<(Hash, u64)>,
}

/// Receives a commit's parts from `recv` and applies them (the caller holds the write
/// lock).
pub(super) async fn commit(
    state: &Arc<State>,
    recv: &mut RecvStream,
    name: String,
    volume: VolumeId,
    base_version: u64,
    peer: EndpointId,
) -> Reply {
    let st = state.clone();
    let mut merge = blocking(move || Merge::start(&st, name, volume, base_version)).await?;
    // The whole change set comes within the deadline, whatever the pace of its parts: the
    // lock held meanwhile stops every other commit.
    let deadline = tokio::time::Instant::now() + state.commit_deadline;
    loop {
        let wait = (tokio::time::Instant::now() + PART_TIMEOUT).min(deadline);
        let part: CommitPart = match tokio::time::timeout_at(
            wait,
            net::read_frame::<CommitPart>(recv, MAX_COMMIT_PART_BYTES),
        )
        .await
        {
            Ok(Ok(p)) if p.changes.is_empty() && !p.last => {
                return Err(fail(
                    ErrorKind::Invalid,
                    "an empty part of a commit's change set that is not its last",
                ));
            }
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                return Err(fail(
                    ErrorKind::Invalid,
                    format!("the commit's change set ended early or is malformed: {e}"),
                ));
            }
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(fail(
                    ErrorKind::Invalid,
                    format!(
                        "the commit's change set did not come whole within {} s",
                        state.commit_deadline.as_secs_f64()
                    ),
                ));
            }
            Err(_) => {
                return Err(fail(
                    ErrorKind::Invalid,
                    format!(
                        "no part of the commit's change set came for {} s",
                        PART_TIMEOUT.as_secs()
                    ),
                ));
            }
        };
        let last = part.last;
        let st = state.clone();
        merge = blocking(move || merge.part(&st, part).map(|()| merge)).await?;
        if last {
            break;
        }
    }
    let st = state.clone();
    blocking(move || merge.finish(&st, peer)).await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Fail> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(internal(e)))
}

fn tree_err(e: tree::TreeError) -> Fail {
    match e {
        tree::TreeError::Manifest(e) => fail(ErrorKind::Invalid, e.to_string()),
        e => internal(e),
    }
}

impl Merge {
    fn start(
        state: &State,
        name: String,
        volume: VolumeId,
        base_version: u64,
    ) -> Result<Self, Fail> {
        let rec = record(state, &name)?;
        if rec.id != volume {
            return Err(fail(
                ErrorKind::NotFound,
                format!("volume {name:?} was deleted and created again since this copy was made"),
            ));
        }
        let head = head_of(state, rec.id)?;
        if base_version > head.commit.version {
            return Err(fail(
                ErrorKind::Invalid,
                format!(
                    "base version {base_version} is newer than the head ({})",
                    head.commit.version
                ),
            ));
        }
        let current = head.commit.root();
        let links = super::links::LinkCheck::start(state, rec.id, head.commit.version, &current)?;
        Ok(Merge {
            name,
            id: rec.id,
            head,
            current,
            next: current,
            changes: 0,
            overwritten: Vec::new(),
            overwritten_total: 0,
            links,
            pages: Vec::new(),
        })
    }

    /// Checks a part (its blobs are at the origin; which paths it overwrites) and applies
    /// it; its new pages are durable before the next part reads them.
    fn part(&mut self, state: &State, part: CommitPart) -> Result<(), Fail> {
        let CommitPart {
            changes, priors, ..
        } = part;
        if priors.len() != changes.len() {
            return Err(fail(
                ErrorKind::Invalid,
                "one prior entry per change expected",
            ));
        }
        if changes.len() > MAX_COMMIT_PART {
            return Err(fail(
                ErrorKind::Invalid,
                format!(
                    "{} changes in one part of a commit; at most {MAX_COMMIT_PART}",
                    changes.len()
                ),
            ));
        }
        let blobs: Vec<Hash> = changes
            .iter()
            .filter_map(|c| c.entry.as_ref().and_then(|e| e.blob()))
            .map(|(h, _)| h)
            .collect();
        let held = state.origin.has_complete_many(&blobs).map_err(internal)?;
        let missing: Vec<String> = blobs
            .iter()
            .zip(held)
            .filter(|(_, held)| !held)
            .map(|(h, _)| h.short())
            .collect();
        if !missing.is_empty() {
            return Err(fail(
                ErrorKind::MissingBlobs,
                format!(
                    "the origin lacks {} blob(s): {}{}",
                    missing.len(),
                    missing[..missing.len().min(5)].join(", "),
                    if missing.len() > 5 { ", …" } else { "" }
                ),
            ));
        }
        for (c, prior) in changes.iter().zip(&priors) {
            let now = tree::get(&state.pages, &self.current, &c.path).map_err(tree_err)?;
            let differs = match (&now, prior) {
                (None, None) => false,
                (Some(a), Some(b)) => !a.same_content(b),
                _ => true,
            };
            if differs {
                self.overwritten_total += 1;
                if self.overwritten.len() < MAX_OVERWRITTEN {
                    self.overwritten.push(c.path.clone());
                }
            }
        }
        self.links.part(state, &changes)?;
        let mut pages = Vec::new();
        let built = tree::apply(
            &state.pages,
            &self.next,
            &changes,
            Shape::CANONICAL,
            &mut |r, b| pages.push((r, b)),
        )
        .map_err(tree_err)?;
        // The new pages are durable before a head, or the next part, names them.
        let written = state.write_pages(&pages)?;
        if state.meta.blob_records().is_some() {
            self.pages.extend(written);
        }
        self.next = built.root;
        self.changes += changes.len() as u64;
        Ok(())
    }

    /// Signs the merged tree as the new head (unless it is the head's own tree).
    fn finish(mut self, state: &State, peer: EndpointId) -> Reply {
        let head = &self.head;
        if self.next == self.current {
            return Ok(CoordResponse::Committed {
                head: head.clone(),
                overwritten: Vec::new(),
                overwritten_total: 0,
            });
        }
        let new = Commit {
            volume: self.id,
            version: head.commit.version + 1,
            parent: Some(head.commit.hash()),
            manifest: self.next.hash,
            manifest_size: self.next.size,
            author: *peer.as_bytes(),
            time_ms: now_ms(),
        }
        .sign(&state.key);
        // No link of the merged tree leads out of the volume; the index moves with the head,
        // which moves only from the head this commit merged into.
        let links = self.links.finish(state, &self.next)?;
        if let Some(hook) = &state.hooks.before_head_moves {
            hook();
        }
        state
            .meta
            .move_head(&new, &links, &self.pages)
            .map_err(meta_fail)?;
        info!(
            volume = self.name,
            version = new.commit.version,
            changes = self.changes,
            overwritten = self.overwritten_total,
            links_checked = self.links.checked,
            author = %peer.fmt_short(),
            "committed"
        );
        Ok(CoordResponse::Committed {
            head: new,
            overwritten: self.overwritten,
            overwritten_total: self.overwritten_total,
        })
    }
}
