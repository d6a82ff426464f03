//! The volume registry, signed heads and commits (per path, last writer wins).

use super::*;

pub(super) type Reply = Result<CoordResponse, Fail>;

pub(super) fn internal(e: impl std::fmt::Display) -> Fail {
    fail(ErrorKind::Internal, e.to_string())
}

pub(super) fn record(state: &State, name: &str) -> Result<VolumeRecord, Fail> {
    let r = state.db.begin_read().map_err(internal)?;
    let t = r.open_table(VOLUMES).map_err(internal)?;
    let v = t
        .get(name)
        .map_err(internal)?
        .ok_or_else(|| fail(ErrorKind::NotFound, format!("no volume named {name:?}")))?;
    postcard::from_bytes(v.value()).map_err(internal)
}

pub(super) fn head_of(state: &State, id: VolumeId) -> Result<SignedHead, Fail> {
    let r = state.db.begin_read().map_err(internal)?;
    let t = r.open_table(HEADS).map_err(internal)?;
    let v = t
        .get(id.0)
        .map_err(internal)?
        .ok_or_else(|| internal(format!("volume {id} has no head")))?;
    postcard::from_bytes(v.value()).map_err(internal)
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
    let r = state.db.begin_read().map_err(internal)?;
    let t = r.open_table(VERSIONS).map_err(internal)?;
    let mut commits = Vec::new();
    for v in from..now {
        let Some(enc) = t.get((rec.id.0, v)).map_err(internal)? else {
            return Err(fail(
                ErrorKind::NotFound,
                format!("version {v} of {name} is no longer kept by the origin"),
            ));
        };
        commits
            .push(postcard::from_bytes::<voltool_protocol::Commit>(enc.value()).map_err(internal)?);
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
    state.pages.put_now(&pages).map_err(internal)?;
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
    let w = state.db.begin_write().map_err(internal)?;
    {
        let rec = postcard::to_stdvec(&VolumeRecord { id, created_ms }).map_err(internal)?;
        w.open_table(VOLUMES)
            .map_err(internal)?
            .insert(name, rec.as_slice())
            .map_err(internal)?;
        put_head(&w, &head)?;
    }
    w.commit().map_err(internal)?;
    info!(volume = name, %id, "created volume");
    Ok(CoordResponse::Volume(VolumeInfo {
        name: name.to_string(),
        id,
        created_ms,
        head,
    }))
}

pub(super) fn put_head(w: &redb::WriteTransaction, head: &SignedHead) -> Result<(), Fail> {
    let enc = postcard::to_stdvec(head).map_err(internal)?;
    let c = &head.commit;
    w.open_table(HEADS)
        .map_err(internal)?
        .insert(c.volume.0, enc.as_slice())
        .map_err(internal)?;
    w.open_table(VERSIONS)
        .map_err(internal)?
        .insert((c.volume.0, c.version), c.encode().as_slice())
        .map_err(internal)?;
    Ok(())
}

pub(super) fn list(state: &State) -> Reply {
    let names: Vec<String> = {
        let r = state.db.begin_read().map_err(internal)?;
        let t = r.open_table(VOLUMES).map_err(internal)?;
        t.iter()
            .map_err(internal)?
            .map(|e| e.map(|(k, _)| k.value().to_string()).map_err(internal))
            .collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for n in names {
        out.push(info(state, &n)?);
    }
    Ok(CoordResponse::Volumes(out))
}

pub(super) fn rename(state: &State, from: &str, to: &str) -> Reply {
    check_name(to)?;
    let rec = record(state, from)?;
    if record(state, to).is_ok() {
        return Err(fail(
            ErrorKind::AlreadyExists,
            format!("volume {to:?} already exists"),
        ));
    }
    let w = state.db.begin_write().map_err(internal)?;
    {
        let mut t = w.open_table(VOLUMES).map_err(internal)?;
        t.remove(from).map_err(internal)?;
        let enc = postcard::to_stdvec(&rec).map_err(internal)?;
        t.insert(to, enc.as_slice()).map_err(internal)?;
    }
    w.commit().map_err(internal)?;
    info!(from, to, "renamed volume");
    Ok(CoordResponse::Ok)
}

pub(super) fn delete(state: &State, name: &str) -> Reply {
    let rec = record(state, name)?;
    let w = state.db.begin_write().map_err(internal)?;
    {
        w.open_table(VOLUMES)
            .map_err(internal)?
            .remove(name)
            .map_err(internal)?;
        w.open_table(HEADS)
            .map_err(internal)?
            .remove(rec.id.0)
            .map_err(internal)?;
        w.open_table(VERSIONS)
            .map_err(internal)?
            .retain_in((rec.id.0, 0)..=(rec.id.0, u64::MAX), |_, _| false)
            .map_err(internal)?;
        super::links::forget(&w, rec.id)?;
    }
    w.commit().map_err(internal)?;
    info!(volume = name, "deleted volume");
    // Its blobs are freed now (those no other volume names).
    state.gc_now.notify_one();
    Ok(CoordResponse::Ok)
}
