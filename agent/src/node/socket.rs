//! The control sockets: bound with a fixed mode and group whatever the umask, and served
//! one request a connection, with the caller taken from the connection.

use super::*;

/// The lock file that keeps two agents from serving one run directory.
pub(super) const RUN_LOCK: &str = "agent.lock";

/// Claims `dir` for this agent's sockets: an exclusive lock on `dir/agent.lock`, held
/// while the returned file is open; refused while another agent holds it.
pub(super) fn claim_run_dir(dir: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(RUN_LOCK);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        std::io::Error::other(if e == rustix::io::Errno::WOULDBLOCK {
            format!(
                "another agent serves {} (its {RUN_LOCK} is locked): give this one a --run-dir of its own",
                dir.display()
            )
        } else {
            format!("{}: {e}", path.display())
        })
    })?;
    Ok(f)
}

/// Binds a control socket at `path` with exactly mode 0600, or 0660 and group `group`,
/// whatever the umask: bound in a fresh directory only this user may enter, given its mode
/// and group there, then moved into place, so nobody connects while it has another.
pub(super) fn bind_socket(path: &Path, group: Option<u32>) -> std::io::Result<UnixListener> {
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    let ctx = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    let staging = parent.join(format!(".sock-{:016x}", rand::random::<u64>()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(ctx(&staging))?;
    let bound = (|| {
        let at = staging.join("s");
        let l = UnixListener::bind(&at).map_err(ctx(&at))?;
        if let Some(g) = group {
            std::os::unix::fs::chown(&at, None, Some(g)).map_err(ctx(&at))?;
        }
        std::fs::set_permissions(&at, std::fs::Permissions::from_mode(mode)).map_err(ctx(&at))?;
        std::fs::rename(&at, path).map_err(ctx(path))?;
        Ok(l)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    bound
}

/// Serves a control socket; `admin`: the admin socket.
pub(super) async fn control_loop(
    inner: Arc<Inner>,
    listener: UnixListener,
    admin: bool,
    cancel: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { warn!("control socket: {e}"); continue; }
            },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            // The kernel let the caller open this socket (its groups); who it is, it says
            // in the connection's credentials.
            let caller = match stream.peer_cred() {
                Ok(c) => Caller {
                    uid: c.uid(),
                    admin: admin || c.uid() == 0,
                },
                Err(e) => return warn!("control socket: no credentials of the caller: {e}"),
            };
            let (mut input, mut stream) = stream.into_split();
            let req: Request = match control::read_msg(&mut input).await {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    let done = Event::Done(Box::new(Err(err(ErrorCode::Invalid, e.to_string()))));
                    let _ = control::write_msg(&mut stream, &done).await;
                    return;
                }
            };
            debug!(
                ?req,
                uid = caller.uid,
                admin = caller.admin,
                "control request"
            );
            let (tx, mut rx) = mpsc::channel(64);
            let events = Events { tx: Some(tx) };
            let op = tokio::spawn(inner.clone().run_op(req, caller, events, Some(input)));
            while let Some(ev) = rx.recv().await {
                if control::write_msg(&mut stream, &ev).await.is_err() {
                    break;
                }
            }
            let result = op
                .await
                .unwrap_or_else(|e| Err(failed(format!("operation panicked: {e}"))));
            let _ = control::write_msg(&mut stream, &Event::Done(Box::new(result))).await;
        });
    }
}
