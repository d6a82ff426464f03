//! Length-prefixed frames: a `u32` little-endian body length, then a postcard body.
//!
//! The reader checks the length against the limit of the message it expects *before*
//! allocating, so no length a peer sends is trusted.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// A frame that cannot be accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced length exceeds the limit for this message.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: usize,
    },
    /// The body does not decode.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// The body decodes but leaves bytes over.
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("encoding to a Vec cannot fail");
    let mut out = Vec::with_capacity(PREFIX_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the body length from a prefix, refusing anything over `max`.
pub fn body_len(prefix: [u8; PREFIX_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(prefix) as u64;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len as usize)
}

/// Decodes one body.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(body)?;
    if !rest.is_empty() {
        return Err(FrameError::Trailing(rest.len()));
    }
    Ok(msg)
}
