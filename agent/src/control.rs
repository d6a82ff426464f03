//! The local control socket (`DIR/agent.sock`): the async client of [`voltool_protocol::control`]
//! (whose messages it re-exports) for the `voltool` CLI, the testnet and the agent itself.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use voltool_protocol::frame;

pub use voltool_protocol::control::*;

/// Writes one frame to a Unix stream.
pub async fn write_msg<T: serde::Serialize>(s: &mut UnixStream, msg: &T) -> std::io::Result<()> {
    s.write_all(&frame::encode(msg)).await
}

/// Reads one frame, `None` at a clean end.
pub async fn read_msg<T: serde::de::DeserializeOwned>(
    s: &mut UnixStream,
) -> Result<Option<T>, ControlError> {
    let mut prefix = [0u8; frame::PREFIX_LEN];
    match s.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::body_len(prefix, MAX_FRAME)?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await?;
    Ok(Some(frame::decode(&body)?))
}

/// Sends a request to the agent whose data directory is `data`; calls `on_event` for every
/// event before the last and returns the final answer (a listing sent in parts joined
/// whole).
pub async fn call(
    data: &Path,
    req: &Request,
    mut on_event: impl FnMut(Event),
) -> Result<Result<Reply, ErrorReply>, ControlError> {
    let [admin, path] = sockets(data);
    let mut s = match UnixStream::connect(&admin).await {
        Ok(s) => s,
        Err(e) if try_next(&e) => {
            UnixStream::connect(&path)
                .await
                .map_err(|source| ControlError::Connect {
                    path: path.display().to_string(),
                    source,
                })?
        }
        Err(source) => {
            return Err(ControlError::Connect {
                path: admin.display().to_string(),
                source,
            });
        }
    };
    write_msg(&mut s, req).await?;
    let mut listed = Vec::new();
    loop {
        match read_msg::<Event>(&mut s).await? {
            Some(Event::Done(r)) => return Ok(join_listing(listed, *r)),
            Some(Event::Entries(part)) => listed.extend(part),
            Some(e) => on_event(e),
            None => return Err(ControlError::NoAnswer),
        }
    }
}
