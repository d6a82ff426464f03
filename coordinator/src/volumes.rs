//! The volume registry, signed heads and commits (per path, last writer wins).

use super::*;

pub(super) type Reply = Result<CoordResponse, Fail>;

pub(super) fn internal(e: impl std::fmt::Display) -> Fail {
    fail(ErrorKind::Internal, e.to_string())
}

/// A failure of the coordinator's state, as the answer says it.
pub(super) fn meta_fail(e: MetaError) -> Fail {
    match e {
        MetaError::NoVolume(_) => fail(ErrorKind::NotFound, e.to_string()),
        MetaError::Exists(_) => fail(ErrorKind::AlreadyExists, e.to_string()),
        e => internal(e),
    }
}

pub(super) fn record(state: &State, name: &str) -> Result<VolumeRecord, Fail> {
    state
        .meta
        .volume(name)
        .map_err(meta_fail)?
        .ok_or_else(|| meta_fail(MetaError::NoVolume(name.to_string())))
}

pub(super) fn head_of(state: &State, id: VolumeId) -> Result<SignedHead, Fail> {
    state
        .meta
        .head(id)
        .map_err(meta_fail)?
        .ok_or_else(|| internal(format!("volume {id} has no head")))
}

/// [`CoordRequest::GetVersions`]: the head of volume `name` and its commits from version
/// `from` on, oldest first, the head's own excluded.
pub(super) fn versions(state: &State, name: &str, from: u64) -> Reply {
    let rec = record(state, name)?;
    let head = head_of(state, rec.id)?;
    let now = head.commit.version;
    if from > now {
        return Err(fail(
            ErrorKind::NotFound,
            format!("{name} has no version {from}: its head is version {now}"),
        ));
    }
    if now - from > voltool_protocol::coord::MAX_VERSIONS {
        return Err(fail(
            ErrorKind::Invalid,
            format!(
                "version {from} of {name} is more than {} versions before its head",
                voltool_protocol::coord::MAX_VERSIONS
            ),
        ));
    }
    let mut commits = Vec::new();
    for (v, c) in (from..now).zip(state.meta.commits(rec.id, from..now).map_err(meta_fail)?) {
        let Some(c) = c else {
            return Err(fail(
                ErrorKind::NotFound,
                format!("version {v} of {name} is no longer kept by the origin"),
            ));
        };
        commits.push(c);
    }
    Ok(CoordResponse::Versions { head, commits })
}

pub(super) fn info(state: &State, name: &str) -> Result<VolumeInfo, Fail> {
    let rec = record(state, name)?;
    Ok(VolumeInfo {
        name: name.to_string(),
        id: rec.id,
        created_ms: rec.created_ms,
        head: head_of(state, rec.id)?,
    })
}

pub(super) fn check_name(name: &str) -> Result<(), Fail> {
    check_volume_name(name).map_err(|e| fail(ErrorKind::Invalid, e.to_string()))
}

pub(super) fn create(state: &State, name: &str) -> Reply {
    check_name(name)?;
    if record(state, name).is_ok() {
        return Err(fail(
            ErrorKind::AlreadyExists,
            format!("volume {name:?} already exists"),
        ));
    }
    let mut pages = Vec::new();
    let empty = Manifest::new().build(Shape::CANONICAL, &mut |r, b| pages.push((r, b)));
    state.put_pages(&pages)?;
    let id = VolumeId(rand::random());
    let created_ms = now_ms();
    let head = Commit {
        volume: id,
        version: 0,
        parent: None,
        manifest: empty.root.hash,
        manifest_size: empty.root.size,
        author: *state.key.public().as_bytes(),
        time_ms: created_ms,
    }
    .sign(&state.key);
    state
        .meta
        .create(name, VolumeRecord { id, created_ms }, &head)
        .map_err(meta_fail)?;
    info!(volume = name, %id, "created volume");
    Ok(CoordResponse::Volume(VolumeInfo {
        name: name.to_string(),
        id,
        created_ms,
        head,
    }))
}

pub(super) fn list(state: &State) -> Reply {
    let names: Vec<String> = state
        .meta
        .volumes()
        .map_err(meta_fail)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut out = Vec::new();
    for n in names {
        out.push(info(state, &n)?);
    }
    Ok(CoordResponse::Volumes(out))
}

pub(super) fn rename(state: &State, from: &str, to: &str) -> Reply {
    check_name(to)?;
    state.meta.rename(from, to).map_err(meta_fail)?;
    info!(from, to, "renamed volume");
    Ok(CoordResponse::Ok)
}

pub(super) fn delete(state: &State, name: &str) -> Reply {
    state.meta.delete(name).map_err(meta_fail)?;
    info!(volume = name, "deleted volume");
    // Its blobs are freed now (those no other volume names).
    state.gc_now.notify_one();
    Ok(CoordResponse::Ok)
}
