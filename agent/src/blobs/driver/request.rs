//! One request's I/O: a piece (asked for, or the origin's pick) verified and written, or
//! small blobs whole into the fetch's store batch; what happened goes back to the actor.

use super::*;

/// What one request asks, in the driver's terms.
pub(super) enum Ask2 {
    Piece {
        hash: Hash,
        size: u64,
        unit: u32,
    },
    Pick {
        hash: Hash,
        size: u64,
        among: PieceSet,
    },
    Many {
        blobs: Vec<(Hash, u64)>,
        units: Vec<u32>,
    },
}

/// One request's I/O.
pub(super) struct RequestTask {
    pub(super) ctx: SwarmCtx,
    pub(super) addr: NodeAddr,
    pub(super) req: ReqId,
    pub(super) group: GroupId,
    pub(super) provider: NodeId,
    pub(super) rank: u16,
    pub(super) io: mpsc::UnboundedSender<Io>,
    pub(super) writer: Option<mpsc::Sender<(Hash, Vec<u8>)>>,
}

impl RequestTask {
    pub(super) async fn run(self, what: Ask2) -> Done {
        let conn = match self.ctx.pool.get(&self.addr).await {
            Ok(c) => c,
            Err(e) => {
                debug!(provider = %self.addr.id.fmt_short(), "cannot reach: {e}");
                return self.answer(Outcome::Unreachable, None, Some((false, e.to_string())));
            }
        };
        let r = match what {
            Ask2::Piece { hash, size, unit } => {
                self.piece(&conn, hash, size, Some(unit), None).await
            }
            Ask2::Pick { hash, size, among } => {
                self.piece(&conn, hash, size, None, Some(among)).await
            }
            Ask2::Many { blobs, units } => self.many(&conn, &blobs, &units).await,
        };
        let Err(e) = r else {
            return self.answer(Outcome::Ok, None, None);
        };
        debug!(provider = %self.addr.id.fmt_short(), "request failed: {e}");
        let why = |corrupt: bool| Some((corrupt, e.to_string()));
        let (outcome, why) = match &e {
            FetchError::NotFound => (Outcome::NotFound, why(false)),
            // What it lacks, it did not send: the engine takes note.
            FetchError::Missing => (Outcome::Ok, None),
            FetchError::Busy => (Outcome::Busy, None),
            // Bytes that fail verification, or a copy that fails the provider's own check:
            // nothing more is taken from it in this download.
            FetchError::Corrupt(_) | FetchError::SelfCheck => {
                self.unit(0, false);
                (Outcome::Failed, why(true))
            }
            FetchError::Net(NetError::Connect { .. })
            | FetchError::Refused(GetHeader::Forbidden) => (Outcome::Unreachable, why(false)),
            FetchError::Store(_) => (Outcome::LocalStore, None),
            _ => (Outcome::Failed, why(false)),
        };
        let local = match e {
            FetchError::Store(e) => Some(e),
            _ => None,
        };
        self.answer(outcome, local, why)
    }

    fn answer(
        &self,
        outcome: Outcome,
        local: Option<StoreError>,
        why: Option<(bool, String)>,
    ) -> Done {
        Done::Answer {
            req: self.req,
            group: self.group,
            outcome,
            local,
            why,
        }
    }

    fn unit(&self, unit: u32, verified: bool) {
        let _ = self.io.send(Io::Unit {
            req: self.req,
            group: self.group,
            unit,
            provider: self.provider,
            verified,
        });
    }

    /// One piece (`unit`, or the provider's pick of `among`), verified and written.
    async fn piece(
        &self,
        conn: &Connection,
        hash: Hash,
        size: u64,
        unit: Option<u32>,
        among: Option<PieceSet>,
    ) -> Result<(), FetchError> {
        let pb = self.ctx.cfg.piece_bytes;
        let req = match (unit, among) {
            (Some(unit), _) => BlobRequest::Get {
                hash,
                size,
                ranges: piece_ranges(size, pb, unit),
                rank: self.rank,
            },
            (None, Some(among)) => BlobRequest::Pick {
                hash,
                size,
                piece_bytes: pb,
                among,
                rank: self.rank,
            },
            (None, None) => return Err(FetchError::Refused(GetHeader::Invalid)),
        };
        let (mut recv, header) = ask(conn, &req).await?;
        let unit = match (header, &req) {
            (GetHeader::Picked { unit }, BlobRequest::Pick { among, .. })
                if among.contains(unit) =>
            {
                let _ = self.io.send(Io::Picked {
                    req: self.req,
                    unit,
                });
                unit
            }
            (GetHeader::Ok, BlobRequest::Get { .. }) => unit.expect("a get names its unit"),
            // A piece not asked for, or a pick answered as a get.
            _ => return Err(FetchError::Refused(GetHeader::Invalid)),
        };
        let ranges = piece_ranges(size, pb, unit);
        let encoded = read_encoded(&mut recv, hash, size, &ranges, self.ctx.pool.ingress()).await?;
        let store = self.ctx.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            store.write_encoded_unsynced(&hash, size, &ranges, &encoded)
        })
        .await
        .map_err(|e| FetchError::Net(NetError::stream(e)))?;
        match written {
            Ok(()) => {
                self.unit(unit, true);
                Ok(())
            }
            Err(StoreError::Corrupt { message, .. }) => {
                let origin = self.addr.id == self.ctx.origin.id;
                Err(FetchError::Corrupt(format!(
                    "{} sent bytes of blob {} that fail verification ({message})",
                    if origin { "the origin" } else { "a peer" },
                    hash.short()
                )))
            }
            Err(e) => Err(FetchError::Store(e)),
        }
    }

    /// Small blobs whole, each checked against its hash, into the fetch's store batch.
    async fn many(
        &self,
        conn: &Connection,
        blobs: &[(Hash, u64)],
        units: &[u32],
    ) -> Result<(), FetchError> {
        let Some(writer) = &self.writer else {
            return Err(FetchError::Refused(GetHeader::Invalid));
        };
        let mut many = get_many(conn, blobs, self.rank, self.ctx.pool.ingress()).await?;
        while let Some((i, bytes)) = many.next().await? {
            let Some(bytes) = bytes else {
                continue;
            };
            writer
                .send((blobs[i].0, bytes))
                .await
                .map_err(|_| FetchError::Store(StoreError::Db("the store batch stopped".into())))?;
            self.unit(units[i], true);
        }
        Ok(())
    }
}
