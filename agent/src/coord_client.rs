//! The agent's side of `voltool/coord/1`.

use std::path::Path;

use iroh::Endpoint;
use iroh::endpoint::Connection;
use tokio::io::AsyncReadExt;
use voltool_protocol::Hash;
use voltool_protocol::coord::{self, CoordRequest, CoordResponse, ErrorKind, MAX_RESPONSE};

use crate::net::{self, NetError, NodeAddr};

/// A failed coordinator request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Transport failure.
    #[error("coordinator unreachable: {0}")]
    Net(#[from] NetError),
    /// The coordinator refused or failed.
    #[error("{message}")]
    Remote {
        /// Kind of failure.
        kind: ErrorKind,
        /// Its message.
        message: String,
    },
    /// An answer that does not fit the request.
    #[error("unexpected answer from the coordinator")]
    Unexpected,
    /// Reading a local file to upload failed.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A client that keeps one connection to the coordinator and reopens it when it breaks.
#[derive(Debug)]
pub struct CoordClient {
    ep: Endpoint,
    addr: NodeAddr,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl CoordClient {
    /// A client for the coordinator at `addr`.
    pub fn new(ep: Endpoint, addr: NodeAddr) -> Self {
        CoordClient {
            ep,
            addr,
            conn: Default::default(),
        }
    }

    /// The coordinator's address.
    pub fn addr(&self) -> &NodeAddr {
        &self.addr
    }

    async fn conn(&self) -> Result<Connection, NetError> {
        let mut c = self.conn.lock().await;
        if let Some(conn) = c.as_ref()
            && conn.close_reason().is_none()
        {
            return Ok(conn.clone());
        }
        let conn = net::connect(&self.ep, &self.addr, coord::ALPN).await?;
        *c = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a stream, reconnecting once if the cached connection turns out dead (the
    /// coordinator restarted): nothing was sent on it yet, so the retry is safe.
    async fn open(
        &self,
    ) -> Result<(iroh::endpoint::SendStream, iroh::endpoint::RecvStream), ClientError> {
        let conn = self.conn().await?;
        match conn.open_bi().await {
            Ok(s) => Ok(s),
            Err(_) => {
                *self.conn.lock().await = None;
                let conn = self.conn().await?;
                Ok(conn.open_bi().await.map_err(NetError::stream)?)
            }
        }
    }

    /// Sends a request, returns the answer; an error answer becomes [`ClientError::Remote`].
    pub async fn request(&self, req: &CoordRequest) -> Result<CoordResponse, ClientError> {
        let (mut send, mut recv) = self.open().await?;
        net::write_frame(&mut send, req).await?;
        send.finish().map_err(NetError::stream)?;
        let resp: CoordResponse = net::read_frame(&mut recv, MAX_RESPONSE).await?;
        match resp {
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            r => Ok(r),
        }
    }

    /// Uploads a blob from a file; the origin verifies it against `hash`.
    pub async fn upload(
        &self,
        hash: Hash,
        size: u64,
        path: &Path,
        on_bytes: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), ClientError> {
        let io = |source| ClientError::Io {
            path: path.display().to_string(),
            source,
        };
        let (mut send, mut recv) = self.open().await?;
        net::write_frame(&mut send, &CoordRequest::Upload { hash, size }).await?;
        let mut f = tokio::fs::File::open(path).await.map_err(io)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < size {
            let want = buf.len().min((size - sent) as usize);
            let n = f.read(&mut buf[..want]).await.map_err(io)?;
            if n == 0 {
                break;
            }
            send.write_all(&buf[..n]).await.map_err(NetError::stream)?;
            sent += n as u64;
            on_bytes(n as u64);
        }
        send.finish().map_err(NetError::stream)?;
        match net::read_frame(&mut recv, MAX_RESPONSE).await? {
            CoordResponse::Ok => Ok(()),
            CoordResponse::Error { kind, message } => Err(ClientError::Remote { kind, message }),
            _ => Err(ClientError::Unexpected),
        }
    }
}
