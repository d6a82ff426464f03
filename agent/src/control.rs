//! The local control socket (`DIR/agent.sock`): the async client of [`voltool_protocol::control`]
//! (whose messages it re-exports) for the `voltool` CLI, the testnet and the agent itself.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use voltool_protocol::frame;

pub mod export;
pub mod upload;

pub use voltool_protocol::control::*;

/// Writes one frame to a Unix stream.
pub async fn write_msg<T: serde::Serialize>(
    s: &mut (impl tokio::io::AsyncWrite + Unpin),
    msg: &T,
) -> std::io::Result<()> {
    s.write_all(&frame::encode(msg)).await
}

/// Reads one frame, `None` at a clean end.
pub async fn read_msg<T: serde::de::DeserializeOwned>(
    s: &mut (impl tokio::io::AsyncRead + Unpin),
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

/// Sends a request to the agent whose run directory (that of its sockets) is `data`; calls `on_event` for every
/// event before the last and returns the final answer (a listing sent in parts joined
/// whole).
pub async fn call(
    data: &Path,
    req: &Request,
    on_event: impl FnMut(Event),
) -> Result<Result<Reply, ErrorReply>, ControlError> {
    let mut s = connect(data).await?;
    write_msg(&mut s, req).await?;
    answer(s, on_event).await
}

/// Connects to the agent whose run directory is `data`: through its admin socket if the
/// kernel lets this user, else its control socket.
pub async fn connect(data: &Path) -> Result<UnixStream, ControlError> {
    let [admin, path] = sockets(data);
    let s = match UnixStream::connect(&admin).await {
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
    Ok(s)
}

/// Reads the agent's answer on `s`: calls `on_event` for every event before the last and
/// returns the final answer (a listing sent in parts joined whole).
pub async fn answer(
    mut s: UnixStream,
    mut on_event: impl FnMut(Event),
) -> Result<Result<Reply, ErrorReply>, ControlError> {
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
