//! Who may do what over the control sockets.
//!
//! The agent listens on two sockets in its data directory: `agent.sock`, which members of
//! `--socket-group` may open, and `admin.sock`, which members of `--admin-group` may open
//! (without the groups, root alone may open either). The kernel checks the groups at
//! connect, from the caller's own credentials; the agent learns the caller's user from the
//! connection (`SO_PEERCRED`) and which socket it came through.
//!
//! | request | `agent.sock` | `admin.sock` | root |
//! | --- | --- | --- | --- |
//! | status, volume list, ls, read, get to stdout | yes | yes | yes |
//! | mount, commit, reload, unmount | its own mounts | its own mounts | every mount |
//! | volume create, delete, rename, rm, cp, upload (`put`: the CLI streams the files) | no | yes | yes |
//! | put of local files by name, get into local files by name | no | no | yes |
//!
//! A mount belongs to the user who made it; a user other than root mounts only in a
//! directory of its own. `put` and `get` of local paths make the agent open the files the
//! caller names: root's alone; the CLI streams what it read itself (`VolumeUpload`) and
//! writes what the agent streams (`VolumeExport`).

use super::*;

/// Who sent a request, as the control socket learned it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The caller's user id.
    pub uid: u32,
    /// Whether it came through the admin socket (root always counts as admin).
    pub admin: bool,
}

impl Caller {
    /// Root: every request, every mount.
    pub const ROOT: Caller = Caller {
        uid: 0,
        admin: true,
    };

    /// Whether this is root.
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }
}

pub use control::ADMIN_SOCKET;

fn denied(why: impl Into<String>) -> ErrorReply {
    err(ErrorCode::Forbidden, why)
}

impl Inner {
    /// Refuses what `caller` may not ask for (before anything of it is done).
    pub(super) fn authorize(&self, req: &Request, caller: &Caller) -> OpResult<()> {
        if caller.is_root() {
            return Ok(());
        }
        match req {
            Request::Status
            | Request::VolumeList
            | Request::VolumeLs { .. }
            | Request::VolumeRead { .. }
            | Request::VolumeExport { .. }
            | Request::VolumeGet { .. }
            | Request::Prefetch { .. } => Ok(()),
            Request::Mount { .. }
            | Request::Commit { .. }
            | Request::Reload { .. }
            | Request::Unmount { .. } => Ok(()),
            Request::VolumeCreate { .. }
            | Request::VolumeDelete { .. }
            | Request::VolumeRename { .. }
            | Request::VolumeRm { .. }
            | Request::VolumeCp { .. }
            | Request::VolumeUpload { .. }
            | Request::Follow { .. }
                if caller.admin =>
            {
                Ok(())
            }
            Request::VolumeCreate { .. }
            | Request::VolumeDelete { .. }
            | Request::VolumeRename { .. }
            | Request::VolumeRm { .. }
            | Request::VolumeCp { .. }
            | Request::VolumeUpload { .. } => Err(denied(format!(
                "uid {} may not change volumes: that takes the agent's admin group (admin.sock)",
                caller.uid
            ))),
            Request::Follow { .. } => Err(denied(format!(
                "uid {} may not make this host follow a volume: that takes the agent's admin group (admin.sock); a mount may follow its own volume (mount --follow)",
                caller.uid
            ))),
        }
    }

    /// The mount a command of `caller` names (its only mount if `None`): a user other than
    /// root sees only its own mounts. With `check_path`, its path's directory must still be
    /// the one it was mounted in.
    pub(super) fn caller_mount(
        &self,
        name: Option<String>,
        caller: &Caller,
        check_path: bool,
    ) -> OpResult<String> {
        let name = match name {
            Some(n) => n,
            None if caller.is_root() => return self.which_mount(None),
            None => {
                let own: Vec<String> = self
                    .mounts()?
                    .into_iter()
                    .filter(|m| m.owner == caller.uid)
                    .map(|m| m.name)
                    .collect();
                match own.as_slice() {
                    [one] => one.clone(),
                    [] => return Err(err(ErrorCode::NotMounted, "you have no mount here")),
                    _ => {
                        return Err(err(
                            ErrorCode::Invalid,
                            "you have several mounts here: name one",
                        ));
                    }
                }
            }
        };
        let m = self.mount(&name)?;
        if !caller.is_root() && m.owner != caller.uid {
            return Err(denied(format!(
                "the mount of {name} belongs to uid {}, not to uid {}",
                m.owner, caller.uid
            )));
        }
        if check_path {
            self.mount_point(&m)?;
        }
        Ok(name)
    }
}
