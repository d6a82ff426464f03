//! What one trial found, added up over a run.

use super::*;

/// What one trial found.
#[derive(Debug, Default, Serialize)]
pub(super) struct Outcome {
    pub(super) faults: BTreeMap<&'static str, u64>,
    pub(super) operations: u64,
    pub(super) acknowledged: u64,
    pub(super) lost: u64,
    /// Versions of a volume with two commits, or version records that do not chain.
    pub(super) forks: u64,
    pub(super) mixed_snapshots: u64,
    pub(super) unverified_bytes: u64,
    pub(super) stuck_agents: u64,
    /// Operations that failed with no fault to explain it (each retried until it went
    /// through; the first messages are in `problems`).
    pub(super) unexplained_errors: u64,
    pub(super) problems: Vec<String>,
}

impl Outcome {
    /// Adds trial `seed`'s outcome.
    pub(super) fn add(&mut self, seed: u64, o: &Outcome) {
        for (k, v) in &o.faults {
            *self.faults.entry(k).or_default() += v;
        }
        self.operations += o.operations;
        self.acknowledged += o.acknowledged;
        self.lost += o.lost;
        self.forks += o.forks;
        self.mixed_snapshots += o.mixed_snapshots;
        self.unverified_bytes += o.unverified_bytes;
        self.stuck_agents += o.stuck_agents;
        self.unexplained_errors += o.unexplained_errors;
        for p in &o.problems {
            if self.problems.len() < 50 {
                self.problems.push(format!("seed {seed}: {p}"));
            }
        }
    }

    /// Whether the trial broke a promise: anything lost, forked, mixed, unverified or stuck, or an
    /// error that no fault of the trial explains.
    pub(super) fn failed(&self) -> bool {
        self.lost
            + self.forks
            + self.mixed_snapshots
            + self.unverified_bytes
            + self.stuck_agents
            + self.unexplained_errors
            > 0
    }

    pub(super) fn fault(&mut self, kind: &'static str) {
        *self.faults.entry(kind).or_default() += 1;
    }

    pub(super) fn problem(&mut self, msg: String) {
        if self.problems.len() < 20 {
            self.problems.push(msg);
        }
    }
}
