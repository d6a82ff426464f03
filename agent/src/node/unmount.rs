//! `voltool unmount`: a mount's path goes, its snapshot is detached and removed.

use super::reload::dirty_refusal;
use super::*;

impl Inner {
    /// Removes the mount of `name`: refused while it holds uncommitted changes unless
    /// `mode` discards them or commits them first, and (overlay mode) while a file in it is
    /// open for writing. The host path is removed first, so no reader sees a half-removed
    /// tree; the overlay is then turned read-only and detached lazily (a process inside it
    /// keeps its view), and its layers go to the trash.
    pub(super) async fn unmount(
        &self,
        name: &str,
        mode: ReloadMode,
        events: &Events,
    ) -> OpResult<Reply> {
        let lock = self.lock_for(name);
        let _g = lock.lock().await;
        let mut rec = self.mount(name)?;
        let mut committed = None;
        if !rec.read_only && mode != ReloadMode::Discard {
            let local = self.local_state(&rec, Take::Hash).await.map_err(|e| {
                err(
                    e.code,
                    format!("cannot check for uncommitted changes: {}", e.message),
                )
            })?;
            let dirty = self.local_changes(local_root(rec.manifest), &local).await?;
            if !dirty.is_empty() {
                if mode == ReloadMode::Refuse {
                    return Err(dirty_refusal(name, &dirty, "unmount"));
                }
                committed = Some(self.commit_locked(name, events).await?);
                rec = self.mount(name)?;
            }
        }
        self.freeze_for_switch(&rec, local_root(rec.manifest), mode, "unmount")
            .await?;
        // A path whose directory is no longer the one mounted in is left as it is.
        match self.mount_point(&rec) {
            Ok(mp) => self
                .snapshots
                .remove(&mp)
                .map_err(|e| failed(format!("cannot remove the mount at its path: {e}")))?,
            Err(e) => warn!(
                volume = name,
                "the mount's path is left alone: {}", e.message
            ),
        }
        self.drop_mount(&rec)?;
        self.follow_mount(&rec, control::Follow::No)?;
        self.forget_prepared(&rec);
        self.stop_fill(name);
        self.mounted
            .mount_points
            .lock()
            .expect("not poisoned")
            .remove(name);
        if let Err(e) = self.retire(&rec, None, HashSet::new()).await {
            warn!(
                volume = name,
                "cannot retire the unmounted snapshot: {}", e.message
            );
        }
        Ok(Reply::Done(match committed {
            Some(c) => format!(
                "committed {} change(s) (version {}), then unmounted {name} from {}",
                c.changed,
                c.version,
                rec.path.display()
            ),
            None => format!("unmounted {name} from {}", rec.path.display()),
        }))
    }
}
