//! The volume registry, signed heads and commits (per path, last writer wins).

use super::*;

type Reply = Result<CoordResponse, Fail>;

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
    }
    w.commit().map_err(internal)?;
    info!(volume = name, "deleted volume");
    Ok(CoordResponse::Ok)
}

pub(super) fn commit(
    state: &State,
    name: &str,
    volume: VolumeId,
    base_version: u64,
    changes: Vec<Change>,
    priors: Vec<Option<Entry>>,
    peer: EndpointId,
) -> Reply {
    let rec = record(state, name)?;
    if rec.id != volume {
        return Err(fail(
            ErrorKind::NotFound,
            format!("volume {name:?} was deleted and created again since this copy was made"),
        ));
    }
    if priors.len() != changes.len() {
        return Err(fail(
            ErrorKind::Invalid,
            "one prior entry per change expected",
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
    let current = head.commit.root();
    let tree_err = |e: tree::TreeError| match e {
        tree::TreeError::Manifest(e) => fail(ErrorKind::Invalid, e.to_string()),
        e => internal(e),
    };
    let mut overwritten = Vec::new();
    for (c, prior) in changes.iter().zip(&priors) {
        let now = tree::get(&state.pages, &current, &c.path).map_err(tree_err)?;
        let differs = match (&now, prior) {
            (None, None) => false,
            (Some(a), Some(b)) => !a.same_content(b),
            _ => true,
        };
        if differs {
            overwritten.push(c.path.clone());
        }
    }
    let mut pages = Vec::new();
    let next = tree::apply(
        &state.pages,
        &current,
        &changes,
        Shape::CANONICAL,
        &mut |r, b| pages.push((r, b)),
    )
    .map_err(tree_err)?;
    if next.root == current {
        return Ok(CoordResponse::Committed {
            head,
            overwritten: Vec::new(),
        });
    }
    // The new pages are durable before a head names them.
    state.pages.put_now(&pages).map_err(internal)?;
    let new = Commit {
        volume: rec.id,
        version: head.commit.version + 1,
        parent: Some(head.commit.hash()),
        manifest: next.root.hash,
        manifest_size: next.root.size,
        author: *peer.as_bytes(),
        time_ms: now_ms(),
    }
    .sign(&state.key);
    let w = state.db.begin_write().map_err(internal)?;
    put_head(&w, &new)?;
    w.commit().map_err(internal)?;
    info!(
        volume = name,
        version = new.commit.version,
        changes = changes.len(),
        overwritten = overwritten.len(),
        author = %peer.fmt_short(),
        "committed"
    );
    Ok(CoordResponse::Committed {
        head: new,
        overwritten,
    })
}
