//! The volume registry at the coordinator: create, list, rename, delete.

use super::*;

impl Inner {
    /// Answers a registry request (anything else is refused as invalid).
    pub(super) async fn registry(&self, req: Request) -> OpResult<Reply> {
        match req {
            Request::VolumeCreate {
                name,
                allow_existing,
            } => {
                check_volume_name(&name).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                match self
                    .remote
                    .coord
                    .request(&CoordRequest::CreateVolume { name: name.clone() })
                    .await
                {
                    Ok(_) => Ok(Reply::Done(format!("created volume {name}"))),
                    Err(ClientError::Remote {
                        kind: ErrorKind::AlreadyExists,
                        ..
                    }) if allow_existing => Ok(Reply::Done(format!("volume {name} exists"))),
                    Err(e) => Err(e.into()),
                }
            }
            Request::VolumeList => match self
                .remote
                .coord
                .request(&CoordRequest::ListVolumes)
                .await?
            {
                CoordResponse::Volumes(v) => Ok(Reply::Volumes(
                    v.into_iter()
                        .map(|i| VolumeView {
                            name: i.name,
                            id: i.id.to_string(),
                            version: i.head.commit.version,
                            created_ms: i.created_ms,
                            updated_ms: i.head.commit.time_ms,
                        })
                        .collect(),
                )),
                _ => Err(failed("unexpected answer from the coordinator")),
            },
            Request::VolumeRename { from, to } => {
                check_volume_name(&to).map_err(|e| err(ErrorCode::Invalid, e.to_string()))?;
                self.remote
                    .coord
                    .request(&CoordRequest::RenameVolume {
                        from: from.clone(),
                        to: to.clone(),
                    })
                    .await?;
                Ok(Reply::Done(format!("renamed volume {from} to {to}")))
            }
            Request::VolumeDelete {
                name,
                allow_missing,
            } => match self
                .remote
                .coord
                .request(&CoordRequest::DeleteVolume { name: name.clone() })
                .await
            {
                Ok(_) => Ok(Reply::Done(format!("deleted volume {name}"))),
                Err(ClientError::Remote {
                    kind: ErrorKind::NotFound,
                    ..
                }) if allow_missing => Ok(Reply::Done(format!("volume {name} does not exist"))),
                Err(e) => Err(e.into()),
            },
            _ => Err(err(ErrorCode::Invalid, "not a volume registry request")),
        }
    }
}
