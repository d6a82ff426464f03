//! The swarm engine, sans-IO in the shape of `quinn-proto`: the downloader ([`Engine`]), a
//! provider's admission ([`Admission`], [`Subscribers`]) and the tracker's bookkeeping
//! ([`Tracker`]). None of them does I/O, reads a clock or draws unseeded randomness: time
//! comes in with every call and randomness from a seed, so the agent's driver, unit tests
//! and the simulator (`voltool-sim`, thousands of nodes in one process) run the very same
//! code.
//!
//! # The downloader
//! A download is a set of groups ([`Engine::want`]): a large blob fetched in pieces of
//! [`Config::piece_bytes`], or a batch of small blobs fetched whole, many to a request. The
//! driver feeds [`Event`]s in with [`Engine::handle`], takes [`Action`]s out with
//! [`Engine::poll_action`], and calls [`Engine::handle_timeout`] at
//! [`Engine::poll_timeout`]. The engine decides:
//! - **who**: a group's providers come from tracker lookups (bounded answers, repeated at a
//!   growing gap while the blob is incomplete); partial holders are subscribed to and push
//!   what they newly hold ([`Event::Have`]), so nobody polls;
//! - **what**: a wanted piece a peer holds, the rarest of a few drawn at random (so
//!   simultaneous downloaders spread over the pieces), from the peer with the fewest
//!   requests in flight; the origin only for what no known peer holds, and then the origin
//!   picks ([`Ask::Pick`]): it sends each piece about once however many ask;
//! - **endgame**: with nothing left to hand out, a piece in flight for
//!   [`Config::endgame_after`] is asked of a second provider (never the one sending it);
//!   the first verified copy wins and the other is cancelled;
//! - **faults**: a busy answer rests the provider (doubling); a timeout or failure counts
//!   against it; an unreachable provider is dropped; a provider whose bytes fail
//!   verification is banned for the whole download, across groups, reported once
//!   ([`Action::Report`]), and nothing more is taken from it; a group no known provider
//!   can serve looks again a few times, then fails.
//!
//! Verification stays in the driver: it reports each unit verified or not
//! ([`Event::Unit`]).
//!
//! # Providers and the tracker
//! [`Admission`] gives a provider's sending slots, queue and busy answers, and the origin's
//! choice of piece (least sent; while its slots are full only never-sent pieces).
//! [`Subscribers`] coalesces pushes of newly held pieces. [`Tracker`] answers a lookup with
//! a bounded, ranked, partly random set of live, trusted holders (the caller adds the
//! origin), expires members that stopped announcing, and leaves out a provider that
//! [`Config::report_quorum`] members reported.

mod config;
mod engine;
mod handlers;
mod pieces;
mod schedule;
mod serve;
mod state;
mod tracker;
mod types;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_fleet;
#[cfg(test)]
mod tests_serve;

pub use config::{Config, KnobError};
pub use engine::{
    Action, Ask, Blobs, Engine, Event, Failure, GroupId, Outcome, ProviderInfo, ReqId, Stats,
};
pub use pieces::PieceSet;
pub use serve::{Admission, Admit, Push, Subscribers};
pub use tracker::{Holder, Tracker, rtt_band};

/// What a background download (a follow, a preheat) adds to the rank its requests carry
/// (how far along it is, permille): providers serve the lowest rank first, so every
/// foreground request goes before every background one, and among either kind the one
/// furthest behind first.
pub const BACKGROUND_RANK: u16 = 1001;

/// A fleet member's id: the bytes of its node key.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct NodeId(pub [u8; 32]);

impl std::fmt::Debug for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeId({})", hex::encode(&self.0[..5]))
    }
}
