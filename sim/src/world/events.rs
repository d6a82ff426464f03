//! The simulator's events: what one node sends another, what a provider is asked, and the
//! heap's entries that order them.

use voltool_protocol::Hash;
use voltool_protocol::swarm::{Ask, Event, PieceSet, ReqId};

use super::Pending;

pub(super) enum Ev {
    Timer(usize, u32),
    ToNode(usize, Event),
    /// One push of what `from` newly holds, to several subscribers at once.
    Haves {
        from: usize,
        to: Vec<usize>,
        blob: usize,
        units: PieceSet,
    },
    Serve {
        prov: usize,
        p: Pending,
        ask: Ask,
    },
    Cancel {
        prov: usize,
        from: usize,
        req: ReqId,
    },
    Subscribe {
        prov: usize,
        from: usize,
        blob: usize,
    },
    Lookup {
        from: usize,
        blob: usize,
    },
    Announce {
        from: usize,
        blobs: Vec<Hash>,
        complete: bool,
    },
    Report {
        from: usize,
        liar: usize,
        hash: Hash,
    },
    Leave(usize),
    /// A paused (background) download goes on.
    Resume(usize),
    Heartbeat,
    /// A node's reader moves on.
    Read(usize),
}

/// The kind (see [`Ev::KINDS`]) counting flows that finish: they are no events of the
/// heap (see [`Links::next_due`]).
pub(super) const FLOW_DONE: usize = 10;

impl Ev {
    /// Names of the kinds of events, for the tally `VOLTOOL_SIM_DEBUG` prints.
    pub(crate) const KINDS: [&'static str; 15] = [
        "timer",
        "providers",
        "have",
        "unit",
        "answer",
        "other_to_node",
        "haves_push",
        "serve",
        "cancel",
        "subscribe",
        "flow_done",
        "lookup",
        "announce_report",
        "leave_resume_heartbeat",
        "read",
    ];

    pub(super) fn kind(&self) -> usize {
        match self {
            Ev::Timer(..) => 0,
            Ev::ToNode(_, Event::Providers { .. }) => 1,
            Ev::ToNode(_, Event::Have { .. }) => 2,
            Ev::ToNode(_, Event::Unit { .. }) => 3,
            Ev::ToNode(_, Event::Answer { .. }) => 4,
            Ev::ToNode(..) => 5,
            Ev::Haves { .. } => 6,
            Ev::Serve { .. } => 7,
            Ev::Cancel { .. } => 8,
            Ev::Subscribe { .. } => 9,
            Ev::Lookup { .. } => 11,
            Ev::Announce { .. } | Ev::Report { .. } => 12,
            Ev::Leave(..) | Ev::Resume(..) | Ev::Heartbeat => 13,
            Ev::Read(..) => 14,
        }
    }
}

/// (time, sequence, slot of the event in the slab): small, so the heap moves little.
pub(super) struct Item(pub(super) u64, pub(super) u64, pub(super) u32);

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}
