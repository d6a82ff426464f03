//! The readers' model (`--read-rate`): a node's reader reads the files in order as the
//! bytes arrive, and what it waits for its engine fetches first.

use voltool_protocol::swarm::{GroupId, PieceSet};

use super::World;
use super::events::Ev;

/// How often a reader moves on (simulated nanoseconds).
const READ_TICK: u64 = 10_000_000;

impl World {
    /// Node `n`'s reader moves on through what is here, at most its rate's worth of a
    /// tick; where it meets a piece not here it waits, and the engine fetches the next
    /// [`Scenario::read_window`] pieces first.
    pub(super) fn read(&mut self, n: usize) {
        let Some(rate) = self.nodes[n].spec.reader else {
            return;
        };
        if self.nodes[n].gone {
            return;
        }
        let piece = self.sc.cfg.piece_bytes;
        let mut budget = (rate * READ_TICK as f64 / 1e9) as u64;
        let now_s = self.now as f64 / 1e9;
        loop {
            let Some((blob, offset)) = self.nodes[n].reading else {
                return;
            };
            if blob >= self.sc.blobs.len() {
                self.nodes[n].reading = None;
                self.nodes[n].result.read_done_at = Some(now_s);
                return;
            }
            let size = self.sc.blobs[blob];
            if offset >= size {
                self.nodes[n].reading = Some((blob + 1, 0));
                continue;
            }
            let unit = (offset / piece) as u32;
            if !self.nodes[n].held[blob].contains(unit) {
                let units = self.units[blob];
                let window = PieceSet::from_iter(
                    units,
                    unit..unit.saturating_add(self.sc.read_window.max(1)).min(units),
                );
                let now = self.instant();
                self.hand_over(n);
                if let Some(e) = &mut self.nodes[n].engine {
                    e.want_now(now, GroupId(blob as u32), &window);
                }
                self.run_node(n);
                break;
            }
            if budget == 0 {
                break;
            }
            let end = ((unit as u64 + 1) * piece).min(size);
            let step = (end - offset).min(budget);
            budget -= step;
            self.nodes[n].reading = Some((blob, offset + step));
            self.nodes[n].result.read_first_at.get_or_insert(now_s);
        }
        self.push(self.now + READ_TICK, Ev::Read(n));
    }

    /// A reader still reading when every download ended reads the rest from its store.
    pub(super) fn finish_reading(&mut self) {
        let now_s = self.now as f64 / 1e9;
        for node in &mut self.nodes {
            let (Some(rate), Some((blob, offset))) = (node.spec.reader, node.reading) else {
                continue;
            };
            if node.gone || node.result.done_at.is_none() {
                continue;
            }
            let left: u64 = self.sc.blobs[blob.min(self.sc.blobs.len())..]
                .iter()
                .sum::<u64>()
                .saturating_sub(offset);
            node.result.read_first_at.get_or_insert(now_s);
            node.result.read_done_at = Some(now_s + left as f64 / rate);
        }
    }
}
