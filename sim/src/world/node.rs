//! A simulated node: its engine, its provider side, what it holds and what it waits for.

use super::*;

pub(super) struct Node {
    pub(super) spec: Spec,
    pub(super) gone: bool,
    pub(super) engine: Option<Engine>,
    pub(super) adm: Admission,
    pub(super) subs: Subscribers,
    pub(super) held: Vec<PieceSet>,
    /// Requests waiting in this provider's admission queue, by token.
    pub(super) waiting: HashMap<u64, Pending>,
    pub(super) timer: Option<(u64, u32)>,
    pub(super) timer_gen: u32,
    pub(super) result: NodeResult,
    pub(super) bytes: u64,
    pub(super) groups_done: usize,
    /// Where its reader stands: the file and the offset in it.
    pub(super) reading: Option<(usize, u64)>,
}

#[derive(Clone, Debug)]
pub(crate) struct Pending {
    pub(super) from: usize,
    pub(super) req: ReqId,
    pub(super) rank: u16,
    pub(super) blob: usize,
    pub(super) unit: u32,
}

/// A flow carrying one unit to a requester.
#[derive(Clone, Debug)]
pub(crate) struct Carry {
    pub(super) prov: usize,
    pub(super) p: Pending,
    pub(super) bytes: f64,
    pub(super) corrupt: bool,
}

impl Node {
    /// Node `i` of the scenario: a downloader with its engine wanting every blob, or a
    /// provider holding them all.
    pub(super) fn new(sc: &Scenario, i: usize, hashes: &[Hash], units: &[u32]) -> Self {
        let (spec, cfg) = (&sc.nodes[i], &sc.cfg);
        let complete = spec.role != Role::Downloader;
        let held = units
            .iter()
            .map(|&u| {
                if complete {
                    PieceSet::full(u)
                } else {
                    PieceSet::empty(u)
                }
            })
            .collect();
        let engine = (spec.role == Role::Downloader).then(|| {
            let mut e = Engine::new(cfg.clone(), node_id(i), sc.seed.wrapping_add(i as u64));
            for (k, &size) in sc.blobs.iter().enumerate() {
                e.want(Blobs::Pieces {
                    hash: hashes[k],
                    size,
                    held: PieceSet::empty(units[k]),
                });
            }
            // A background download: held back at first, and ranked after foreground ones.
            e.set_paused(spec.paused_until.is_some());
            e.set_background(spec.paused_until.is_some());
            e
        });
        Node {
            spec: spec.clone(),
            gone: false,
            engine,
            adm: Admission::new(cfg.clone(), sc.seed ^ ((i as u64) << 1)),
            subs: Subscribers::new(cfg.clone()),
            held,
            waiting: HashMap::default(),
            timer: None,
            timer_gen: 0,
            result: NodeResult::default(),
            bytes: 0,
            groups_done: 0,
            reading: (engine_reads(spec)).then_some((0, 0)),
        }
    }
}

/// Whether a node's reader runs: a downloader's, when the scenario reads.
pub(super) fn engine_reads(spec: &Spec) -> bool {
    spec.role == Role::Downloader && spec.reader.is_some()
}

/// Node `i`'s id: its index in the first bytes.
pub(super) fn node_id(i: usize) -> voltool_protocol::swarm::NodeId {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    b[8] = 0xa5;
    voltool_protocol::swarm::NodeId(b)
}

pub(super) fn index_of(id: &voltool_protocol::swarm::NodeId) -> usize {
    u64::from_le_bytes(id.0[..8].try_into().expect("8 bytes")) as usize
}

pub(super) fn blob_hash(k: usize) -> Hash {
    let mut b = [0x5bu8; 32];
    b[..8].copy_from_slice(&(k as u64).to_le_bytes());
    Hash(b)
}
