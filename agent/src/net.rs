//! QUIC endpoints without internet, frames over iroh streams, node addresses.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;

use iroh::endpoint::{
    Connection, ControllerFactory, PortmapperConfig, QuicTransportConfig, ReadError,
    ReadExactError, RecvStream, SendStream, presets,
};
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayMode, SecretKey};
use noq_proto::congestion;
use serde::Serialize;
use serde::de::DeserializeOwned;
use voltool_protocol::{blobs, frame};

/// A transport failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Binding the endpoint failed.
    #[error("cannot bind {addr}: {message}")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// Cause.
        message: String,
    },
    /// Connecting failed.
    #[error("cannot connect to {peer}: {message}")]
    Connect {
        /// Peer.
        peer: String,
        /// Cause.
        message: String,
    },
    /// The stream broke or ended early.
    #[error("stream failed: {0}")]
    Stream(String),
    /// The peer reset the stream with this application error code.
    #[error("stream reset by the peer (code {0})")]
    Reset(u64),
    /// The peer sent a frame we cannot accept.
    #[error("peer sent a bad frame: {0}")]
    Frame(#[from] frame::FrameError),
}

impl NetError {
    /// A stream failure, from its cause.
    pub fn stream(e: impl std::fmt::Display) -> Self {
        NetError::Stream(e.to_string())
    }
}

/// The congestion controller of every QUIC connection an endpoint makes or accepts.
///
/// Chosen by measurement under `tc tbf` links (`voltool-testnet bench --net netns`; the
/// figures are in README): see [`Congestion::default`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), loss-based.
    #[default]
    Cubic,
    /// NewReno (RFC 9002), loss-based.
    NewReno,
    /// BBRv3, model-based: paced at the measured bottleneck rate.
    Bbr,
}

impl Congestion {
    /// Every controller, by name.
    pub const NAMES: [&str; 3] = ["cubic", "newreno", "bbr"];

    fn factory(self) -> Arc<dyn ControllerFactory + Send + Sync> {
        match self {
            Congestion::Cubic => Arc::new(congestion::CubicConfig::default()),
            Congestion::NewReno => Arc::new(congestion::NewRenoConfig::default()),
            Congestion::Bbr => Arc::new(congestion::Bbr3Config::default()),
        }
    }
}

impl FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "newreno" => Ok(Congestion::NewReno),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "unknown congestion controller {s:?}: expected one of {}",
                Congestion::NAMES.join(", ")
            )),
        }
    }
}

/// How often an idle connection sends a packet.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// Silence after which a connection (or one of its paths) is taken for dead.
pub const MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(4);

/// Binds an endpoint on `addr` with the given key and ALPNs: no relays, no discovery, no
/// port mapping; peers are dialled by explicit address.
pub async fn bind(
    key: SecretKey,
    addr: SocketAddr,
    alpns: Vec<Vec<u8>>,
    congestion: Congestion,
) -> Result<Endpoint, NetError> {
    let err = |e: &dyn std::fmt::Display| NetError::Bind {
        addr,
        message: e.to_string(),
    };
    // A peer that dies without closing (kill -9, a host gone) holds its connections open
    // at the other end until they idle out: iroh's defaults (a packet every 5 s, 15 s of
    // silence per path, 30 s per connection) held a request to a dead peer for its whole
    // 10 s deadline. With a keep-alive every second, 4 s of silence is a dead peer.
    let transport = QuicTransportConfig::builder()
        // What one peer may make this node hold: streams open at once, bytes received and
        // not yet read (over all its streams), bytes queued to send to it.
        .max_concurrent_bidi_streams(blobs::CONNECTION_STREAMS.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(blobs::CONNECTION_RECEIVE_WINDOW.into())
        .send_window(blobs::CONNECTION_SEND_WINDOW)
        .congestion_controller_factory(congestion.factory())
        .keep_alive_interval(KEEP_ALIVE)
        .default_path_keep_alive_interval(KEEP_ALIVE)
        .default_path_max_idle_timeout(MAX_IDLE)
        .max_idle_timeout(Some(MAX_IDLE.try_into().expect("seconds fit a VarInt")))
        .build();
    Endpoint::builder(presets::Minimal)
        .transport_config(transport)
        .secret_key(key)
        .relay_mode(RelayMode::Disabled)
        .portmapper_config(PortmapperConfig::Disabled)
        .clear_ip_transports()
        .bind_addr(addr)
        .map_err(|e| err(&e))?
        .alpns(alpns)
        .bind()
        .await
        .map_err(|e| err(&e))
}

/// The socket address an endpoint listens on.
pub fn local_addr(ep: &Endpoint) -> SocketAddr {
    ep.bound_sockets()
        .into_iter()
        .next()
        .expect("an endpoint bound on an IP address has a socket")
}

/// A node's id and address, written `NODE_ID@IP:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    /// The node id (its public key).
    pub id: EndpointId,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl NodeAddr {
    /// As iroh wants it.
    pub fn endpoint_addr(&self) -> EndpointAddr {
        EndpointAddr::new(self.id).with_ip_addr(self.addr)
    }
}

impl std::fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// A `NODE_ID@IP:PORT` string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("expected NODE_ID@IP:PORT, got {0:?}")]
pub struct ParseNodeAddrError(String);

impl FromStr for NodeAddr {
    type Err = ParseNodeAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseNodeAddrError(s.to_string());
        let (id, addr) = s.trim().split_once('@').ok_or_else(bad)?;
        Ok(NodeAddr {
            id: id.parse().map_err(|_| bad())?,
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

/// Connects to a node on one ALPN.
/// Connects to `peer` offering `alpn`, then `also` (the answer's [`Connection::alpn`] says
/// which the peer chose).
pub async fn connect_offering(
    ep: &Endpoint,
    peer: &NodeAddr,
    alpn: &[u8],
    also: &[&[u8]],
) -> Result<Connection, NetError> {
    let err = |e: &dyn std::fmt::Display| NetError::Connect {
        peer: peer.to_string(),
        message: e.to_string(),
    };
    let opts = iroh::endpoint::ConnectOptions::new()
        .with_additional_alpns(also.iter().map(|a| a.to_vec()).collect());
    ep.connect_with_opts(peer.endpoint_addr(), alpn, opts)
        .await
        .map_err(|e| err(&e))?
        .await
        .map_err(|e| err(&e))
}

pub async fn connect(ep: &Endpoint, peer: &NodeAddr, alpn: &[u8]) -> Result<Connection, NetError> {
    ep.connect(peer.endpoint_addr(), alpn)
        .await
        .map_err(|e| NetError::Connect {
            peer: peer.to_string(),
            message: e.to_string(),
        })
}

/// Writes one frame.
pub async fn write_frame<T: Serialize>(send: &mut SendStream, msg: &T) -> Result<(), NetError> {
    send.write_all(&frame::encode(msg))
        .await
        .map_err(NetError::stream)
}

/// Reads one frame of at most `max` body bytes.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<T, NetError> {
    read_frame_or_end(recv, max)
        .await?
        .ok_or_else(|| NetError::Stream("stream ended before a frame".into()))
}

/// How much of a frame's body is read (and allocated) at a time.
const FRAME_STEP: usize = 64 << 10;

/// Reads one frame of at most `max` body bytes, or `None` when the stream ends cleanly
/// where a frame would start.
pub async fn read_frame_or_end<T: DeserializeOwned>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<T>, NetError> {
    let mut prefix = [0u8; frame::PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_exact_err(e)),
    }
    let len = frame::body_len(prefix, max)?;
    // Memory follows the bytes that came, not the length the peer announced: a prefix of
    // `max` followed by nothing costs nothing.
    let mut body = Vec::with_capacity(len.min(FRAME_STEP));
    while body.len() < len {
        let at = body.len();
        body.resize((at + FRAME_STEP).min(len), 0);
        recv.read_exact(&mut body[at..])
            .await
            .map_err(|e| match e {
                ReadExactError::FinishedEarly(n) => {
                    read_exact_err(ReadExactError::FinishedEarly(at + n))
                }
                e => read_exact_err(e),
            })?;
    }
    Ok(Some(frame::decode(&body)?))
}

fn read_exact_err(e: ReadExactError) -> NetError {
    match e {
        ReadExactError::FinishedEarly(n) => {
            NetError::Stream(format!("stream ended early, after {n} bytes of a frame"))
        }
        ReadExactError::ReadError(ReadError::Reset(code)) => NetError::Reset(code.into_inner()),
        ReadExactError::ReadError(e) => NetError::stream(e),
    }
}
