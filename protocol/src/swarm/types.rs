//! What the engine and its driver say to each other.

use std::collections::HashMap;

use super::{NodeId, PieceSet};
use crate::hash::Hash;

/// A blob, or a batch of small blobs, that one engine fetches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

/// One request to one provider.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ReqId(pub u64);

/// What a group fetches. Its units are the pieces of one large blob, or the blobs of a
/// batch of small ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blobs {
    /// One large blob in pieces of [`Config::piece_bytes`]; `held` the pieces already
    /// verified here (a resumed download).
    Pieces {
        /// The blob.
        hash: Hash,
        /// Its size, from the signed manifest.
        size: u64,
        /// Pieces held already.
        held: PieceSet,
    },
    /// Small blobs, each fetched whole, many to a request.
    Whole {
        /// The blobs and their sizes, from the signed manifest.
        blobs: Vec<(Hash, u64)>,
    },
}

/// One provider in a tracker's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProviderInfo {
    /// Who.
    pub id: NodeId,
    /// Holds every unit of the group (for a batch of small blobs: every blob of it).
    pub complete: bool,
    /// The origin: asked with [`Ask::Pick`], and only for what peers cannot send.
    pub origin: bool,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ask {
    /// These units.
    Units(Vec<u32>),
    /// One unit of `among`, the provider's choice: the one it has sent least (so the
    /// origin sends each piece about once however many downloaders ask it). Its answer
    /// names the unit first ([`Event::Picked`]).
    Pick {
        /// Units the requester may take.
        among: PieceSet,
    },
}

/// What the driver must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the tracker for the group's providers (a batch of small blobs: those holding all
    /// of [`Engine::lacking`]). Answered by [`Event::Providers`] or [`Event::LookupFailed`].
    Lookup {
        /// The group.
        group: GroupId,
    },
    /// Send a request; its bytes come back as [`Event::Unit`]s, then [`Event::Answer`].
    Request {
        /// Its id in later events.
        req: ReqId,
        /// To whom.
        provider: NodeId,
        /// For which group.
        group: GroupId,
        /// What.
        ask: Ask,
        /// How far along this download is, permille (providers serve those furthest
        /// behind first).
        rank: u16,
    },
    /// Stop a request: nothing more of it is wanted, and no further event may name it.
    Cancel {
        /// The request.
        req: ReqId,
    },
    /// Ask a partial holder to push what it newly holds of the group ([`Event::Have`]).
    Subscribe {
        /// The holder.
        provider: NodeId,
        /// The group.
        group: GroupId,
    },
    /// Stop the pushes of a subscription: the group is done.
    Unsubscribe {
        /// The holder.
        provider: NodeId,
        /// The group.
        group: GroupId,
    },
    /// Tell the tracker this node holds these blobs (complete, or in part).
    Announce {
        /// The blobs.
        blobs: Vec<Hash>,
        /// Whether held whole.
        complete: bool,
    },
    /// Tell the tracker a provider sent bytes that failed verification (once per provider).
    Report {
        /// The provider.
        provider: NodeId,
        /// The blob whose bytes failed verification.
        hash: Hash,
    },
    /// Every unit of the group is verified: make it durable and record it.
    Done {
        /// The group.
        group: GroupId,
    },
    /// The group cannot be fetched.
    Failed {
        /// The group.
        group: GroupId,
        /// Why.
        reason: Failure,
    },
}

/// Why a group failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// No provider could send these units, after several looks at the tracker.
    #[error("no provider could send {lacking} of its {units} part(s)")]
    NoProvider {
        /// Units not fetched.
        lacking: u32,
        /// Units of the group.
        units: u32,
    },
    /// The tracker could not be asked who holds the group (every lookup failed).
    #[error("{tries} lookups at the tracker failed in a row")]
    Tracker {
        /// Lookups tried.
        tries: u32,
    },
    /// The local store failed (a full disk): no provider is at fault.
    #[error("the local store failed")]
    LocalStore,
}

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The provider sent what it had; units it did not send it lacks.
    Ok,
    /// The provider is sending all it will now: not a failure.
    Busy,
    /// The provider holds none of it.
    NotFound,
    /// The provider cannot be reached: it is gone for the rest of this download.
    Unreachable,
    /// The transfer failed (a reset, a malformed answer).
    Failed,
    /// The local store failed while writing what came in.
    LocalStore,
}

/// What the driver tells the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The tracker's answer to [`Action::Lookup`], ranked (nearest first).
    Providers {
        /// The group.
        group: GroupId,
        /// Its providers.
        providers: Vec<ProviderInfo>,
    },
    /// The tracker could not be asked.
    LookupFailed {
        /// The group.
        group: GroupId,
    },
    /// A holder holds (at least) these units of a group: its answer to a subscription,
    /// and each push after it.
    Have {
        /// The holder.
        provider: NodeId,
        /// The group.
        group: GroupId,
        /// Units it holds.
        units: PieceSet,
    },
    /// The provider of an [`Ask::Pick`] chose this unit.
    Picked {
        /// The request.
        req: ReqId,
        /// The unit.
        unit: u32,
    },
    /// A unit of a request arrived and was verified (and written), or failed verification
    /// (and nothing of it was kept).
    Unit {
        /// The request.
        req: ReqId,
        /// The unit.
        unit: u32,
        /// Whether it verified.
        verified: bool,
    },
    /// The request is over.
    Answer {
        /// The request.
        req: ReqId,
        /// How it ended.
        outcome: Outcome,
    },
}

/// What a download took, and from whom.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Verified bytes from the origin.
    pub from_origin: u64,
    /// Verified bytes from peers.
    pub from_peers: u64,
    /// Verified bytes by provider.
    pub by_provider: HashMap<NodeId, u64>,
    /// Verified bytes of units that had already arrived (the late copy of an endgame twin).
    pub duplicate_bytes: u64,
    /// Providers banned for bytes that failed verification, once each.
    pub banned: Vec<NodeId>,
    /// Tracker lookups.
    pub lookups: u64,
    /// Requests sent.
    pub requests: u64,
    /// Busy answers.
    pub busy: u64,
    /// Requests that ran past their deadline.
    pub timeouts: u64,
}
