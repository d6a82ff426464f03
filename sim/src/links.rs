//! Links at flow level: every node has an upload and a download capacity; the flows that
//! cross them share them max-min fairly. When a flow starts or ends, the rates of the flows
//! near it (those of its two ends, then of the ends of any flow that slowed) are refilled
//! by progressive filling, with the rest of the network held fixed. No congestion control,
//! no packet loss: compare with the testnet on loopback.

/// One transfer in progress.
#[derive(Debug, Clone)]
pub(crate) struct Flow {
    pub(crate) src: usize,
    pub(crate) dst: usize,
    /// Bytes still to send.
    pub(crate) left: f64,
    /// Bytes per second now.
    pub(crate) rate: f64,
    /// Nanoseconds when `left` was last brought up to date.
    at: u64,
    pub(crate) live: bool,
}

/// Capacities and flows.
#[derive(Debug, Default)]
pub(crate) struct Links {
    up: Vec<f64>,
    down: Vec<f64>,
    out: Vec<Vec<usize>>,
    inn: Vec<Vec<usize>>,
    pub(crate) flows: Vec<Flow>,
    free: Vec<usize>,
    scratch_set: Vec<usize>,
    /// Per flow: the fill it was last put in the set of (spares a search of the set).
    in_set: Vec<u32>,
    /// Per node and direction (2n: upload, 2n+1: download): the fill that last counted it,
    /// and its position among that fill's resources.
    slot: Vec<(u32, u32)>,
    /// Counts fills; 0 is never one.
    fill_gen: u32,
    /// When each flow with a rate finishes, kept up to date as rates change: the next
    /// completion is read here rather than from events (a rate changes several times in a
    /// flow's life; stale completion events would outnumber the flows).
    due: DueQueue,
}

const EPS: f64 = 1e-6;

impl Links {
    /// A node with these capacities (bytes per second); returns its index.
    pub(crate) fn add_node(&mut self, up: f64, down: f64) -> usize {
        self.up.push(up);
        self.down.push(down);
        self.out.push(Vec::new());
        self.inn.push(Vec::new());
        self.slot.extend([(0, 0), (0, 0)]);
        self.up.len() - 1
    }

    fn settle(&mut self, f: usize, now: u64) {
        let fl = &mut self.flows[f];
        let dt = now.saturating_sub(fl.at) as f64 / 1e9;
        fl.left = (fl.left - fl.rate * dt).max(0.0);
        fl.at = now;
    }

    /// Bytes sent so far of a flow of `total` bytes.
    pub(crate) fn sent(&mut self, f: usize, now: u64, total: f64) -> f64 {
        self.settle(f, now);
        total - self.flows[f].left
    }

    /// Starts a flow; returns its index.
    pub(crate) fn start(&mut self, now: u64, src: usize, dst: usize, bytes: f64) -> usize {
        let flow = Flow {
            src,
            dst,
            left: bytes,
            rate: 0.0,
            at: now,
            live: true,
        };
        let f = match self.free.pop() {
            Some(f) => {
                self.flows[f] = flow;
                f
            }
            None => {
                self.flows.push(flow);
                self.in_set.push(0);
                self.flows.len() - 1
            }
        };
        self.out[src].push(f);
        self.inn[dst].push(f);
        self.refill(now, &[src, dst]);
        f
    }

    /// Ends a flow (done or aborted).
    pub(crate) fn end(&mut self, now: u64, f: usize) {
        let (src, dst) = (self.flows[f].src, self.flows[f].dst);
        self.settle(f, now);
        self.flows[f].live = false;
        self.flows[f].rate = 0.0;
        self.due.remove(f);
        self.out[src].retain(|x| *x != f);
        self.inn[dst].retain(|x| *x != f);
        self.free.push(f);
        self.refill(now, &[src, dst]);
    }

    /// Flows of a node, both ways.
    pub(crate) fn flows_of(&self, n: usize) -> Vec<usize> {
        self.out[n].iter().chain(&self.inn[n]).copied().collect()
    }

    /// Refills the rates of the flows at `nodes`, then once more around the far ends of any
    /// flow that slowed (their other flows may use what it gave up).
    fn refill(&mut self, now: u64, nodes: &[usize]) {
        let slowed = self.fill(now, nodes);
        if !slowed.is_empty() {
            self.fill(now, &slowed);
        }
    }

    /// Progressive filling over the flows touching `nodes`, every other flow held at its
    /// rate; the flows whose rate changed move in the due queue. Returns the far ends of the
    /// flows that slowed.
    fn fill(&mut self, now: u64, nodes: &[usize]) -> Vec<usize> {
        self.fill_gen += 1;
        let fill = self.fill_gen;
        let mut set = std::mem::take(&mut self.scratch_set);
        set.clear();
        for &n in nodes {
            for &f in self.out[n].iter().chain(&self.inn[n]) {
                if self.in_set[f] != fill {
                    self.in_set[f] = fill;
                    set.push(f);
                }
            }
        }
        if set.is_empty() {
            self.scratch_set = set;
            return Vec::new();
        }
        // Resources (node, is upload): what is left of each once the flows outside the set
        // are counted, and how many of the set's flows cross it unfrozen. Each flow of the
        // set crosses two: its sender's upload and its receiver's download.
        let mut left: Vec<f64> = Vec::with_capacity(2 * set.len());
        let mut unfrozen: Vec<u32> = Vec::with_capacity(2 * set.len());
        let mut ends: Vec<(usize, usize)> = Vec::with_capacity(set.len());
        for &f in &set {
            let (s, d) = (self.flows[f].src, self.flows[f].dst);
            let mut at = |n: usize, up: bool| {
                let key = 2 * n + usize::from(!up);
                let (g, r) = self.slot[key];
                if g == fill {
                    unfrozen[r as usize] += 1;
                    return r as usize;
                }
                let (cap, list) = if up {
                    (self.up[n], &self.out[n])
                } else {
                    (self.down[n], &self.inn[n])
                };
                let outside: f64 = list
                    .iter()
                    .filter(|g| self.in_set[**g] != fill)
                    .map(|g| self.flows[*g].rate)
                    .sum();
                left.push((cap - outside).max(0.0));
                unfrozen.push(1);
                self.slot[key] = (fill, left.len() as u32 - 1);
                left.len() - 1
            };
            let rs = at(s, true);
            let rd = at(d, false);
            ends.push((rs, rd));
        }
        let rate = progressive_fill(&mut left, &mut unfrozen, &ends);
        let mut slowed = Vec::new();
        for (k, &f) in set.iter().enumerate() {
            let old = self.flows[f].rate;
            if (rate[k] - old).abs() > EPS * (1.0 + old) {
                self.settle(f, now);
                self.flows[f].rate = rate[k];
                match self.finish_at(f) {
                    Some(t) => self.due.set(f, t.max(now)),
                    None => self.due.remove(f),
                }
                if rate[k] < old {
                    let fl = &self.flows[f];
                    for n in [fl.src, fl.dst] {
                        if !nodes.contains(&n) && !slowed.contains(&n) {
                            slowed.push(n);
                        }
                    }
                }
            }
        }
        self.scratch_set = set;
        slowed
    }

    /// For diagnosis: per node (out flows, used share of upload).
    pub(crate) fn upload_use(&self) -> Vec<(usize, f64)> {
        (0..self.up.len())
            .map(|n| {
                let used: f64 = self.out[n].iter().map(|f| self.flows[*f].rate).sum();
                (self.out[n].len(), used / self.up[n])
            })
            .collect()
    }

    /// The flow that finishes first at the current rates, and when (nanoseconds).
    pub(crate) fn next_due(&self) -> Option<(u64, usize)> {
        self.due.first()
    }

    /// When a flow finishes at its current rate, in nanoseconds.
    pub(crate) fn finish_at(&self, f: usize) -> Option<u64> {
        let fl = &self.flows[f];
        (fl.live && fl.rate > 0.0).then(|| fl.at + (fl.left / fl.rate * 1e9).ceil() as u64)
    }
}

/// A min-heap of (finish time, flow) that knows where each flow sits in it, so that a
/// flow's time moves in place when its rate changes.
#[derive(Debug, Default)]
struct DueQueue {
    heap: Vec<(u64, usize)>,
    /// Per flow: its position in `heap`, or `usize::MAX` when absent.
    pos: Vec<usize>,
}

impl DueQueue {
    fn first(&self) -> Option<(u64, usize)> {
        self.heap.first().copied()
    }

    /// Puts flow `f` at time `t` (adds it, or moves it).
    fn set(&mut self, f: usize, t: u64) {
        if self.pos.len() <= f {
            self.pos.resize(f + 1, usize::MAX);
        }
        let i = match self.pos[f] {
            usize::MAX => {
                self.heap.push((t, f));
                self.heap.len() - 1
            }
            i => {
                self.heap[i].0 = t;
                i
            }
        };
        self.pos[f] = i;
        let i = self.up(i);
        self.down(i);
    }

    fn remove(&mut self, f: usize) {
        let Some(&i) = self.pos.get(f).filter(|i| **i != usize::MAX) else {
            return;
        };
        self.pos[f] = usize::MAX;
        let last = self.heap.pop().expect("a flow in the queue");
        if i < self.heap.len() {
            self.heap[i] = last;
            self.pos[last.1] = i;
            let i = self.up(i);
            self.down(i);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.pos[self.heap[a].1] = a;
        self.pos[self.heap[b].1] = b;
    }

    fn up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent] <= self.heap[i] {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
        i
    }

    fn down(&mut self, mut i: usize) {
        loop {
            let (l, r) = (2 * i + 1, 2 * i + 2);
            let mut m = i;
            if l < self.heap.len() && self.heap[l] < self.heap[m] {
                m = l;
            }
            if r < self.heap.len() && self.heap[r] < self.heap[m] {
                m = r;
            }
            if m == i {
                return;
            }
            self.swap(i, m);
            i = m;
        }
    }
}

/// Max-min fair rates of flows over resources: every unfrozen flow grows at the same pace
/// until a resource it crosses is used up, which freezes the flows crossing it. `left`: what
/// each resource has, `unfrozen`: its flows, `ends`: each flow's two resources.
fn progressive_fill(left: &mut [f64], unfrozen: &mut [u32], ends: &[(usize, usize)]) -> Vec<f64> {
    let mut rate = vec![0.0f64; ends.len()];
    let mut frozen = vec![false; ends.len()];
    loop {
        let mut delta = f64::INFINITY;
        for (r, n) in unfrozen.iter().enumerate() {
            if *n > 0 {
                delta = delta.min(left[r] / *n as f64);
            }
        }
        if !delta.is_finite() {
            break;
        }
        for (k, r) in rate.iter_mut().enumerate() {
            if !frozen[k] {
                *r += delta;
            }
        }
        for (r, n) in unfrozen.iter().enumerate() {
            left[r] -= delta * *n as f64;
        }
        let mut any = false;
        for k in 0..ends.len() {
            let (rs, rd) = ends[k];
            if !frozen[k] && (left[rs] <= EPS * (1.0 + delta) || left[rd] <= EPS * (1.0 + delta)) {
                frozen[k] = true;
                unfrozen[rs] -= 1;
                unfrozen[rd] -= 1;
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    rate
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_share_a_bottleneck_fairly_and_use_what_is_left() {
        let mut l = Links::default();
        let a = l.add_node(100.0, 100.0);
        let b = l.add_node(100.0, 100.0);
        let c = l.add_node(100.0, 30.0);
        let f1 = l.start(0, a, b, 1000.0);
        assert!((l.flows[f1].rate - 100.0).abs() < 1e-3);
        // a also sends to c, whose download is 30: a gives c 30 and b the remaining 70.
        let f2 = l.start(0, a, c, 1000.0);
        assert!(
            (l.flows[f2].rate - 30.0).abs() < 1e-3,
            "{}",
            l.flows[f2].rate
        );
        assert!(
            (l.flows[f1].rate - 70.0).abs() < 1e-3,
            "{}",
            l.flows[f1].rate
        );
        // When the flow to c ends, b gets all of a's upload again.
        l.end(1_000_000_000, f2);
        assert!((l.flows[f1].rate - 100.0).abs() < 1e-3);
        // 70 bytes went in the first second: 930 left, at 100 a second.
        assert_eq!(l.finish_at(f1), Some(1_000_000_000 + 9_300_000_000));
        assert_eq!(l.next_due(), Some((10_300_000_000, f1)));
        l.end(10_300_000_000, f1);
        assert_eq!(l.next_due(), None);
    }

    #[test]
    fn the_due_queue_always_yields_the_earliest_flow() {
        let mut q = DueQueue::default();
        let mut model = std::collections::BTreeMap::new();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = (x % 64) as usize;
            if x.is_multiple_of(3) {
                q.remove(f);
                model.retain(|_, v| *v != f);
            } else {
                let t = (x >> 20) % 1000;
                q.set(f, t);
                model.retain(|_, v| *v != f);
                model.insert((t, f), f);
            }
            assert_eq!(q.first(), model.keys().next().copied());
        }
    }
}
