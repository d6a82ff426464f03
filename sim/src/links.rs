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

/// Capacities and flows. Rates are brought up to date by [`Links::flush`], which must come
/// between a flow's start or end and the next read of a rate or of [`Links::next_due`].
#[derive(Debug, Default)]
pub(crate) struct Links {
    up: Vec<f64>,
    down: Vec<f64>,
    /// Per node and direction (as `slot`): the sum of its flows' rates, kept up to date as
    /// rates change, so that a fill learns what the flows outside it use without reading
    /// them.
    used: Vec<f64>,
    out: Vec<Vec<usize>>,
    inn: Vec<Vec<usize>>,
    pub(crate) flows: Vec<Flow>,
    free: Vec<usize>,
    scratch_set: Vec<usize>,
    /// Per flow: the fill it was last put in the set of (spares a search of the set).
    in_set: Vec<u64>,
    /// Per node and direction (2n: upload, 2n+1: download): the fill that last counted it,
    /// and its position among that fill's resources.
    slot: Vec<(u64, u32)>,
    /// Counts fills; 0 is never one.
    fill_gen: u64,
    /// When each flow with a rate finishes, kept up to date as rates change: the next
    /// completion is read here rather than from events (a rate changes several times in a
    /// flow's life; stale completion events would outnumber the flows).
    due: DueQueue,
    /// Room for a fill's working lists, kept between fills.
    scratch: Scratch,
    /// Nodes whose flows started or ended since the last [`Links::flush`], and a mark per
    /// node of being among them: a flow that ends and the one its sender starts next at
    /// the same instant are refilled together, once.
    pending: Vec<usize>,
    is_pending: Vec<bool>,
}

/// A fill's working lists.
#[derive(Debug, Default)]
struct Scratch {
    left: Vec<f64>,
    unfrozen: Vec<u32>,
    ends: Vec<(usize, usize)>,
    rate: Vec<f64>,
    frozen: Vec<bool>,
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
        self.used.extend([0.0, 0.0]);
        self.is_pending.push(false);
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
        self.touch(src);
        self.touch(dst);
        f
    }

    fn touch(&mut self, n: usize) {
        if !self.is_pending[n] {
            self.is_pending[n] = true;
            self.pending.push(n);
        }
    }

    /// Refills the rates around the flows started and ended since the last call. Rates are
    /// only read after it: flows that start and end at one instant move no bytes meanwhile.
    pub(crate) fn flush(&mut self, now: u64) {
        if self.pending.is_empty() {
            return;
        }
        let nodes = std::mem::take(&mut self.pending);
        for &n in &nodes {
            self.is_pending[n] = false;
        }
        self.refill(now, &nodes);
        self.pending = nodes;
        self.pending.clear();
    }

    /// Ends a flow (done or aborted).
    pub(crate) fn end(&mut self, now: u64, f: usize) {
        let (src, dst) = (self.flows[f].src, self.flows[f].dst);
        self.settle(f, now);
        self.flows[f].live = false;
        self.set_rate(f, 0.0);
        self.due.remove(f);
        self.out[src].retain(|x| *x != f);
        self.inn[dst].retain(|x| *x != f);
        // What rounding left of the sums goes with the last flow.
        if self.out[src].is_empty() {
            self.used[2 * src] = 0.0;
        }
        if self.inn[dst].is_empty() {
            self.used[2 * dst + 1] = 0.0;
        }
        self.free.push(f);
        self.touch(src);
        self.touch(dst);
    }

    /// Flows of a node, both ways.
    pub(crate) fn flows_of(&self, n: usize) -> Vec<usize> {
        self.out[n].iter().chain(&self.inn[n]).copied().collect()
    }

    /// Refills the rates of the flows at `nodes`, then around the far ends of any flow that
    /// slowed (their other flows may use what it gave up), and so on until no flow slows:
    /// no link is left with room that a flow crossing it could use.
    fn refill(&mut self, now: u64, nodes: &[usize]) {
        let mut slowed = self.fill(now, nodes);
        // Bounded, in case float rounding kept a cascade going.
        for _ in 0..64 {
            if slowed.is_empty() {
                break;
            }
            slowed = self.fill(now, &slowed);
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
        let mut sc = std::mem::take(&mut self.scratch);
        sc.left.clear();
        sc.unfrozen.clear();
        sc.ends.clear();
        for &f in &set {
            let (s, d, rate) = (self.flows[f].src, self.flows[f].dst, self.flows[f].rate);
            let mut at = |key: usize, cap: f64| {
                let (g, r) = self.slot[key];
                let r = if g == fill {
                    sc.unfrozen[r as usize] += 1;
                    r as usize
                } else {
                    sc.left.push(cap - self.used[key]);
                    sc.unfrozen.push(1);
                    self.slot[key] = (fill, sc.left.len() as u32 - 1);
                    sc.left.len() - 1
                };
                // The set's own flows are refilled: what they use is free to them.
                sc.left[r] += rate;
                r
            };
            let rs = at(2 * s, self.up[s]);
            let rd = at(2 * d + 1, self.down[d]);
            sc.ends.push((rs, rd));
        }
        for l in &mut sc.left {
            *l = l.max(0.0);
        }
        progressive_fill(&mut sc);
        let mut slowed = Vec::new();
        for (k, &f) in set.iter().enumerate() {
            let old = self.flows[f].rate;
            let new = sc.rate[k];
            if (new - old).abs() > EPS * (1.0 + old) {
                self.settle(f, now);
                self.set_rate(f, new);
                match self.finish_at(f) {
                    Some(t) => self.due.set(f, t.max(now)),
                    None => self.due.remove(f),
                }
                if new < old {
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
        self.scratch = sc;
        slowed
    }

    /// Sets a flow's rate, keeping the sums of its two ends.
    fn set_rate(&mut self, f: usize, rate: f64) {
        let fl = &mut self.flows[f];
        let delta = rate - fl.rate;
        fl.rate = rate;
        let (s, d) = (fl.src, fl.dst);
        self.used[2 * s] += delta;
        self.used[2 * d + 1] += delta;
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
        debug_assert!(self.pending.is_empty(), "rates read before a flush");
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
/// each resource has, `unfrozen`: its flows, `ends`: each flow's two resources; the rates
/// go to `rate`.
fn progressive_fill(sc: &mut Scratch) {
    let Scratch {
        left,
        unfrozen,
        ends,
        rate,
        frozen,
    } = sc;
    rate.clear();
    rate.resize(ends.len(), 0.0);
    frozen.clear();
    frozen.resize(ends.len(), false);
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
        l.flush(0);
        assert!((l.flows[f1].rate - 100.0).abs() < 1e-3);
        // a also sends to c, whose download is 30: a gives c 30 and b the remaining 70.
        let f2 = l.start(0, a, c, 1000.0);
        l.flush(0);
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
        l.flush(1_000_000_000);
        assert!((l.flows[f1].rate - 100.0).abs() < 1e-3);
        // 70 bytes went in the first second: 930 left, at 100 a second.
        assert_eq!(l.finish_at(f1), Some(1_000_000_000 + 9_300_000_000));
        assert_eq!(l.next_due(), Some((10_300_000_000, f1)));
        l.end(10_300_000_000, f1);
        l.flush(10_300_000_000);
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

    /// Random flows start and end among a few nodes: no capacity is ever exceeded, no flow
    /// is left below what its ends allow, the due queue yields the earliest completion,
    /// every node's sums match its flows, and a lone flow gets its bottleneck.
    #[test]
    fn random_flows_never_exceed_a_capacity_and_the_sums_stay_true() {
        let mut l = Links::default();
        let caps = [100.0, 250.0, 40.0, 1000.0, 75.0, 300.0];
        for (i, c) in caps.iter().enumerate() {
            l.add_node(*c, caps[(i + 2) % caps.len()]);
        }
        let mut live: Vec<usize> = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut now = 0;
        for _ in 0..4000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            now += x % 1000;
            if live.len() > 12 || (!live.is_empty() && x.is_multiple_of(3)) {
                let f = live.swap_remove((x >> 8) as usize % live.len());
                l.end(now, f);
            } else {
                let (s, d) = ((x >> 8) as usize % 6, (x >> 16) as usize % 6);
                if s != d {
                    live.push(l.start(now, s, d, 1e9));
                }
            }
            l.flush(now);
            // No flow could go faster: each crosses a resource that is used up.
            let full = |used: f64, cap: f64| used >= cap * (1.0 - 1e-6);
            for &f in &live {
                let fl = &l.flows[f];
                assert!(
                    full(l.used[2 * fl.src], l.up[fl.src])
                        || full(l.used[2 * fl.dst + 1], l.down[fl.dst]),
                    "flow {f} at {} has room at both ends",
                    fl.rate
                );
            }
            // The next completion is the earliest of the live flows'.
            let earliest = live
                .iter()
                .filter_map(|f| l.finish_at(*f).map(|t| (t, *f)))
                .min();
            assert_eq!(
                l.next_due().map(|(t, _)| t),
                earliest.map(|(t, _)| t.max(now))
            );
            for n in 0..caps.len() {
                let up: f64 = l.out[n].iter().map(|f| l.flows[*f].rate).sum();
                let down: f64 = l.inn[n].iter().map(|f| l.flows[*f].rate).sum();
                assert!(up <= l.up[n] * (1.0 + 1e-6), "node {n} sends {up}");
                assert!(down <= l.down[n] * (1.0 + 1e-6), "node {n} receives {down}");
                assert!((l.used[2 * n] - up).abs() < 1e-6 * (1.0 + up));
                assert!((l.used[2 * n + 1] - down).abs() < 1e-6 * (1.0 + down));
            }
        }
        for f in live {
            l.end(now, f);
        }
        let f = l.start(now, 2, 3, 1e9);
        l.flush(now);
        // Node 2 sends at most 40, node 3 receives at most caps[5] = 300.
        assert!((l.flows[f].rate - 40.0).abs() < 1e-6);
    }
}
