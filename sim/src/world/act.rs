//! What the simulated nodes' engines ask for, turned into messages of the model.

use voltool_protocol::swarm::{Action, Ask};

use super::{Ev, Pending, World, index_of, node_id};

impl World {
    /// Sends `ev` from node `n` to node `to`: it arrives after their latency.
    fn send_to(&mut self, n: usize, to: usize, ev: Ev) {
        let t = self.now + self.lat(n, to);
        self.push(t, ev);
    }

    /// Carries out one action of node `n`'s engine. The tracker lives at the origin (0).
    pub(super) fn act(&mut self, n: usize, a: Action) {
        match a {
            Action::Lookup { group } => {
                let blob = group.0 as usize;
                self.send_to(n, 0, Ev::Lookup { from: n, blob });
            }
            Action::Request {
                req,
                provider,
                group,
                ask,
                rank,
            } => {
                let prov = index_of(&provider);
                let unit = match &ask {
                    Ask::Units(u) => u[0],
                    Ask::Pick { .. } => u32::MAX,
                };
                self.pending.insert((n, req), (prov, None));
                let blob = group.0 as usize;
                let p = Pending {
                    from: n,
                    req,
                    rank,
                    blob,
                    unit,
                };
                self.send_to(n, prov, Ev::Serve { prov, p, ask });
            }
            Action::Cancel { req } => {
                let prov = match self.flowing.get(&(n, req)) {
                    Some(&f) => Some(self.links.flows[f].src),
                    None => self.pending.get(&(n, req)).map(|(p, _)| *p),
                };
                if let Some(prov) = prov {
                    self.send_to(n, prov, Ev::Cancel { prov, from: n, req });
                }
            }
            Action::Subscribe { provider, group } => {
                let prov = index_of(&provider);
                let blob = group.0 as usize;
                self.send_to(
                    n,
                    prov,
                    Ev::Subscribe {
                        prov,
                        from: n,
                        blob,
                    },
                );
            }
            Action::Unsubscribe { provider, group } => {
                let prov = index_of(&provider);
                let hash = self.hashes[group.0 as usize];
                self.nodes[prov].subs.unsubscribe(&node_id(n), &hash);
            }
            Action::Announce { blobs, complete } => {
                let ev = Ev::Announce {
                    from: n,
                    blobs,
                    complete,
                };
                self.send_to(n, 0, ev);
            }
            Action::Report { provider, hash } => {
                let liar = index_of(&provider);
                self.send_to(
                    n,
                    0,
                    Ev::Report {
                        from: n,
                        liar,
                        hash,
                    },
                );
            }
            Action::Done { .. } => {
                let node = &mut self.nodes[n];
                node.groups_done += 1;
                if node.groups_done == self.sc.blobs.len() {
                    node.result.done_at = Some(self.now as f64 / 1e9);
                    self.finished(n);
                }
            }
            Action::Failed { .. } => {
                if !self.nodes[n].result.failed {
                    self.nodes[n].result.failed = true;
                    self.finished(n);
                }
            }
        }
    }

    /// A downloader is through (done, failed or gone): record its figures.
    pub(super) fn finished(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        if let Some(e) = &node.engine {
            let s = e.stats();
            node.result.lookups = s.lookups;
            node.result.bans = s.banned.len();
            node.result.requests = s.requests;
            node.result.busy = s.busy;
            node.result.timeouts = s.timeouts;
            node.result.duplicate_bytes = s.duplicate_bytes;
            node.result.corrupt_accepted = s
                .by_provider
                .iter()
                .filter(|(id, _)| self.sc.nodes[index_of(id)].liar)
                .map(|(_, b)| *b)
                .sum();
        }
        self.downloading -= 1;
    }
}
