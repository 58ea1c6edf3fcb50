//! The simulator: a whole Pastry network in one process, running the node's own code.
//!
//! Every simulated node is a real [`Node`] (the same state, the same locks) and every
//! message is handled by the same [`message_handler::handle`] that the TCP server
//! calls; maintenance events go through the same [`maintenance::handle_event`].
//! Only the [`Transport`] differs: [`SimLink`] hands a request straight to the
//! target's handler instead of writing it to a socket. Nodes join one after another
//! through [`join::join`], each through a random node already in the network, exactly
//! as `pastry-node` does; nothing is built by a shortcut.
//!
//! Time does not exist here: after every join or lookup the simulator "settles" the
//! network by handing each node's queued maintenance events to its handler until no
//! node has any left. That is what the maintenance threads would do, only
//! deterministically.
//!
//! Proximity: nodes are placed at random in a unit square, as in the paper, and the
//! proximity of two nodes is their Euclidean distance (in millionths). With
//! [`Proximity::Ignored`] every node reports the same proximity, so the routing table
//! keeps whichever node it heard of first: Pastry without locality, for comparison.
//!
//! Everything is seeded: the same seed gives the same network and the same figures.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crossbeam_channel::Receiver;

use crate::message_handler::{self, Reply, Request};
use crate::pastry_node::leaf_set::{self, LeafSet};
use crate::pastry_node::maintenance::{self, Event};
use crate::pastry_node::router::{Route, RoutingState};
use crate::pastry_node::transport::{Transport, TransportError};
use crate::pastry_node::{join, Config, Node};
use crate::utils::{closer_to, NodeId, NodeInfo};
use serde_json::json;

/// A small, fast, seeded pseudo-random generator (SplitMix64). Not for secrets; the
/// simulator only needs reproducible choices without a runtime dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A fast hash for the simulator's address index (FxHash's multiply-rotate). The
/// addresses are the simulator's own, so there is no one to mount a collision
/// attack; the node itself keeps the standard library's keyed hash.
#[derive(Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

/// How the simulated proximity metric is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proximity {
    /// Euclidean distance in the plane, as the paper's simulations.
    Plane,
    /// Every node equally near: routing-table entries are not chosen by proximity.
    Ignored,
}

/// One simulated node: the real node, its event queue and its place in the plane.
struct SimNode {
    node: Node,
    events: Receiver<Event>,
    pos: (f64, f64),
    alive: AtomicBool,
    /// Already on the list of nodes with events to handle.
    queued: AtomicBool,
    /// The node's rare-case forward count when last looked at, to tell which
    /// lookups took the rare case.
    rare_seen: AtomicU64,
}

/// Messages sent, by kind. A request and its reply count as one message.
#[derive(Default, Debug)]
struct Counters {
    /// `join` and the `forward`s that carry any routed message.
    routed: AtomicU64,
    /// `announce`: a node telling another it exists, answered with a leaf set.
    announce: AtomicU64,
    /// Proximity probes (`ping` over TCP).
    probe: AtomicU64,
    /// `status`: a joining node's nearest-neighbour discovery (see
    /// `join::discover`), which measures each node it asks.
    discovery: AtomicU64,
    /// Anything else (e.g. routing-table repair).
    other: AtomicU64,
}

/// A snapshot of the message counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Messages {
    pub routed: u64,
    pub announce: u64,
    pub probe: u64,
    pub discovery: u64,
    pub other: u64,
}

impl Messages {
    pub fn total(&self) -> u64 {
        self.routed + self.announce + self.probe + self.discovery + self.other
    }

    fn since(&self, before: &Messages) -> Messages {
        Messages {
            routed: self.routed - before.routed,
            announce: self.announce - before.announce,
            probe: self.probe - before.probe,
            discovery: self.discovery - before.discovery,
            other: self.other - before.other,
        }
    }
}

/// A simulated network.
pub struct Network {
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize, BuildHasherDefault<FastHasher>>,
    /// Nodes that may have maintenance events waiting.
    dirty: Mutex<Vec<usize>>,
    counters: Counters,
    proximity: Proximity,
    config: Config,
    rng: Rng,
}

/// The transport of one simulated node: a call is a function call on the target.
pub struct SimLink<'a> {
    net: &'a Network,
    me: usize,
}

fn silent(to: &NodeInfo) -> TransportError {
    TransportError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{} does not answer (simulated failure)", to.addr),
    ))
}

impl SimLink<'_> {
    /// The live simulated node at `to`'s address, if it is the node `to` names.
    fn target(&self, to: &NodeInfo) -> Result<usize, TransportError> {
        let t = *self.net.by_addr.get(&to.addr).ok_or_else(|| silent(to))?;
        let sim = &self.net.nodes[t];
        if !sim.alive.load(Ordering::Relaxed) {
            return Err(silent(to));
        }
        if sim.node.own().node_id != to.node_id {
            return Err(TransportError::WrongNode(format!(
                "{} is {}, not {}",
                to.addr,
                sim.node.own().node_id,
                to.node_id
            )));
        }
        Ok(t)
    }
}

impl SimLink<'_> {
    /// Hands `request` to the target's handler; returns the reply and the
    /// target's index.
    fn exchange(&self, to: &NodeInfo, request: &Request) -> Result<(Reply, usize), TransportError> {
        let c = &self.net.counters;
        match request {
            Request::Join { .. } | Request::Forward { .. } => &c.routed,
            Request::Announce { .. } => &c.announce,
            Request::Ping => &c.probe,
            Request::Status => &c.discovery,
            _ => &c.other,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.net.mark(self.me);
        let t = self.target(to)?;
        self.net.mark(t);
        let link = SimLink {
            net: self.net,
            me: t,
        };
        let reply = message_handler::handle(&self.net.nodes[t].node, request.clone(), &link);
        Ok((reply, t))
    }
}

impl Transport for SimLink<'_> {
    fn call(&self, to: &NodeInfo, request: &Request) -> Result<Reply, TransportError> {
        self.exchange(to, request).map(|(reply, _)| reply)
    }

    fn call_measured(
        &self,
        to: &NodeInfo,
        request: &Request,
    ) -> Result<(Reply, u64), TransportError> {
        let (reply, t) = self.exchange(to, request)?;
        Ok((reply, self.net.proximity_between(self.me, t)))
    }

    fn proximity(&self, to: &NodeInfo) -> Result<u64, TransportError> {
        self.net.counters.probe.fetch_add(1, Ordering::Relaxed);
        self.net.mark(self.me);
        let t = self.target(to)?;
        Ok(self.net.proximity_between(self.me, t))
    }
}

/// The outcome of one lookup.
#[derive(Clone, Debug)]
pub struct Lookup {
    pub hops: u32,
    /// The lookup ended at the brute-force root.
    pub correct: bool,
    /// Some node on the path forwarded it by the rare case.
    pub rare_case: bool,
    /// Distance travelled in the plane and the direct distance from source to
    /// root, when the source was not the root: their ratio is the route's stretch.
    pub stretch: Option<(f64, f64)>,
    /// The lookup failed with an error (e.g. every next hop was dead).
    pub failed: bool,
}

/// What a join cost.
#[derive(Clone, Copy, Debug)]
pub struct JoinCost {
    /// Forwards of the join message.
    pub hops: u32,
    /// Every message the join caused, the maintenance it triggered included.
    pub messages: Messages,
}

impl Network {
    /// An empty network. `config` is what every node gets (leaf-set size etc.).
    pub fn new(seed: u64, proximity: Proximity, config: Config) -> Network {
        Network {
            nodes: Vec::new(),
            by_addr: HashMap::default(),
            dirty: Mutex::new(Vec::new()),
            counters: Counters::default(),
            proximity,
            config,
            rng: Rng::new(seed),
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn live(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.alive.load(Ordering::Relaxed))
            .count()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i].node
    }

    pub fn is_alive(&self, i: usize) -> bool {
        self.nodes[i].alive.load(Ordering::Relaxed)
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    /// Messages sent so far.
    pub fn messages(&self) -> Messages {
        let c = &self.counters;
        Messages {
            routed: c.routed.load(Ordering::Relaxed),
            announce: c.announce.load(Ordering::Relaxed),
            probe: c.probe.load(Ordering::Relaxed),
            discovery: c.discovery.load(Ordering::Relaxed),
            other: c.other.load(Ordering::Relaxed),
        }
    }

    fn link(&self, me: usize) -> SimLink<'_> {
        SimLink { net: self, me }
    }

    fn mark(&self, i: usize) {
        if !self.nodes[i].queued.swap(true, Ordering::Relaxed) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).push(i);
        }
    }

    /// What a node measures as the proximity of another.
    fn proximity_between(&self, a: usize, b: usize) -> u64 {
        match self.proximity {
            Proximity::Plane => ((self.distance(a, b) * 1e6) as u64).max(1),
            Proximity::Ignored => 1,
        }
    }

    fn distance(&self, a: usize, b: usize) -> f64 {
        let (p, q) = (self.nodes[a].pos, self.nodes[b].pos);
        ((p.0 - q.0).powi(2) + (p.1 - q.1).powi(2)).sqrt()
    }

    /// Creates a node at a fresh random address and place, not yet in the network.
    fn spawn(&mut self) -> usize {
        let addr = loop {
            let r = self.rng.next_u64();
            // 127.x.y.z: the id is SHA-1 of a loopback address, as it would be for a
            // node run by hand, though no socket is ever opened.
            let ip = Ipv4Addr::new(127, (r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8);
            let port = 1024 + ((r >> 32) % (65536 - 1024)) as u16;
            let addr = SocketAddr::V4(SocketAddrV4::new(ip, port));
            if !self.by_addr.contains_key(&addr) {
                break addr;
            }
        };
        let pos = (self.rng.unit(), self.rng.unit());
        let (node, events) = Node::new(addr, self.config.clone());
        let i = self.nodes.len();
        self.nodes.push(SimNode {
            node,
            events,
            pos,
            alive: AtomicBool::new(true),
            queued: AtomicBool::new(false),
            rare_seen: AtomicU64::new(0),
        });
        self.by_addr.insert(addr, i);
        i
    }

    /// Hands every queued maintenance event to its node's handler, until no node has
    /// any left: what the maintenance threads would do given time.
    pub fn settle(&self) {
        loop {
            let batch = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
            if batch.is_empty() {
                return;
            }
            for i in batch {
                let sim = &self.nodes[i];
                sim.queued.store(false, Ordering::Relaxed);
                if !sim.alive.load(Ordering::Relaxed) {
                    while sim.events.try_recv().is_ok() {}
                    continue;
                }
                while let Ok(event) = sim.events.try_recv() {
                    maintenance::handle_event(&sim.node, event, &self.link(i));
                }
            }
        }
    }

    /// Adds one node: the first starts the network, every later one joins through a
    /// random live node with the real join protocol. Returns its index and, for a
    /// joiner, what the join cost.
    pub fn add_node(&mut self) -> Result<(usize, Option<JoinCost>), join::JoinError> {
        let live: usize = self.live();
        let i = self.spawn();
        if live == 0 {
            return Ok((i, None));
        }
        let bootstrap = loop {
            let b = self.rng.below(i);
            if self.is_alive(b) {
                break b;
            }
        };
        let before = self.messages();
        let report = join::join(
            &self.nodes[i].node,
            self.nodes[bootstrap].node.own().addr,
            &self.link(i),
        )?;
        self.mark(i);
        self.settle();
        Ok((
            i,
            Some(JoinCost {
                hops: report.hops,
                messages: self.messages().since(&before),
            }),
        ))
    }

    /// Live node ids in ring order, with their indices: the brute-force view of the
    /// network against which routing is checked.
    pub fn ring(&self) -> Vec<(NodeId, usize)> {
        let mut ring: Vec<(NodeId, usize)> = (0..self.nodes.len())
            .filter(|&i| self.is_alive(i))
            .map(|i| (self.nodes[i].node.own().node_id, i))
            .collect();
        ring.sort();
        ring
    }

    /// The brute-force root of `key`: the live node numerically closest to it
    /// (ties toward the smaller id).
    pub fn root_of(ring: &[(NodeId, usize)], key: &NodeId) -> usize {
        let n = ring.len();
        let p = ring.partition_point(|(id, _)| id < key);
        let (a, b) = (ring[p % n], ring[(p + n - 1) % n]);
        match closer_to(key, &a.0, &b.0) {
            std::cmp::Ordering::Greater => b.1,
            _ => a.1,
        }
    }

    /// Whether live node `i`'s leaf set is the ideal one: the |L|/2 live nodes on
    /// either side of it on the ring (found from the sorted ring, not by asking).
    pub fn has_ideal_leaf_set(&self, ring: &[(NodeId, usize)], i: usize) -> bool {
        let node = &self.nodes[i].node;
        let own = node.own().node_id;
        let size = self.config.leaf_set_size;
        let n = ring.len();
        let p = ring.partition_point(|(id, _)| *id < own);
        // The ideal leaf set only involves the |L| nearest on each side.
        let window = size.min(n.saturating_sub(1) / 2 + 1);
        let mut near: Vec<NodeInfo> = Vec::with_capacity(2 * window);
        for k in 1..=window {
            for j in [(p + k) % n, (p + n - k % n) % n] {
                let info = self.nodes[ring[j].1].node.own();
                if info.node_id != own && !near.iter().any(|x| x.node_id == info.node_id) {
                    near.push(info);
                }
            }
        }
        let ideal: LeafSet = leaf_set::ideal(own, size, &near);
        node.leaf_set() == ideal
    }

    /// The share of live nodes whose leaf set is the ideal one.
    pub fn ideal_leaf_set_share(&self) -> f64 {
        let ring = self.ring();
        let good = ring
            .iter()
            .filter(|(_, i)| self.has_ideal_leaf_set(&ring, *i))
            .count();
        good as f64 / ring.len().max(1) as f64
    }

    /// Sends a client request to live node `from`, as a client connected to it
    /// would, and lets the network settle afterwards.
    pub fn request(&self, from: usize, request: Request) -> Reply {
        let reply = message_handler::handle(&self.nodes[from].node, request, &self.link(from));
        self.settle();
        reply
    }

    /// A random live node.
    pub fn random_live(&mut self) -> usize {
        loop {
            let i = self.rng.below(self.nodes.len());
            if self.is_alive(i) {
                return i;
            }
        }
    }

    /// Routes one lookup for `key` from live node `from` with a `route` request, as
    /// a client would, and checks where it ended.
    pub fn lookup(&self, ring: &[(NodeId, usize)], from: usize, key: &str) -> Lookup {
        let root = Self::root_of(ring, &NodeId::for_key(key));
        let reply = message_handler::handle(
            &self.nodes[from].node,
            Request::Route {
                key: key.to_string(),
            },
            &self.link(from),
        );
        match reply {
            Reply::Route {
                path, owner, hops, ..
            } => {
                let idx: Vec<usize> = path.iter().map(|n| self.by_addr[&n.addr]).collect();
                let mut rare_case = false;
                for &i in &idx {
                    let now = self.nodes[i].node.rare_case_forwards();
                    rare_case |= self.nodes[i].rare_seen.swap(now, Ordering::Relaxed) < now;
                }
                let travelled: f64 = idx.windows(2).map(|w| self.distance(w[0], w[1])).sum();
                let direct = self.distance(from, root);
                Lookup {
                    hops,
                    correct: owner == self.nodes[root].node.own().node_id,
                    rare_case,
                    stretch: (hops > 0 && direct > 0.0).then_some((travelled, direct)),
                    failed: false,
                }
            }
            _ => Lookup {
                hops: 0,
                correct: false,
                rare_case: false,
                stretch: None,
                failed: true,
            },
        }
    }

    /// Forgets rare-case forwards made so far (by joins, say), so that the next
    /// lookups report only their own.
    pub fn reset_rare_case(&self) {
        for sim in &self.nodes {
            let now = sim.node.rare_case_forwards();
            sim.rare_seen.store(now, Ordering::Relaxed);
        }
    }

    /// Makes `count` random live nodes fail silently: they answer nothing from now
    /// on, and nobody is told.
    pub fn fail_random(&mut self, count: usize) -> Vec<usize> {
        let mut failed = Vec::with_capacity(count);
        let mut live: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.is_alive(i))
            .collect();
        for _ in 0..count.min(live.len()) {
            let k = self.rng.below(live.len());
            let i = live.swap_remove(k);
            self.nodes[i].alive.store(false, Ordering::Relaxed);
            failed.push(i);
        }
        failed
    }

    /// One maintenance round: every live node handles a timer tick (heartbeat to its
    /// leaf set, its share of routing-table upkeep), then the network settles.
    pub fn tick_all(&self) {
        for i in 0..self.nodes.len() {
            if self.is_alive(i) {
                maintenance::handle_event(&self.nodes[i].node, Event::Tick, &self.link(i));
            }
        }
        self.settle();
    }

    /// Churn: keys are stored, then for each round one random node fails silently,
    /// a new one joins, a few keys are read from random nodes, and every node runs
    /// one maintenance round (heartbeat, repair, replication). At the end every
    /// acknowledged key is read once more: any not found is lost.
    pub fn churn(&mut self, rounds: usize) -> Churn {
        let net = self;
        let keys = 1000;
        let key = |i: usize| format!("churn-{i}");
        let mut acknowledged = Vec::new();
        for i in 0..keys {
            let from = net.random_live();
            let put = Request::Put {
                key: key(i),
                value: json!(i),
            };
            if let Reply::PutOk { .. } = net.request(from, put) {
                acknowledged.push(i);
            }
        }
        let found = |net: &mut Network, i: usize| {
            let from = net.random_live();
            matches!(net.request(from, Request::Get { key: key(i) }),
                Reply::Value { value, .. } if value == json!(i))
        };
        let (mut reads_during, mut failed_during) = (0, 0);
        for _ in 0..rounds {
            net.fail_random(1);
            if net.add_node().is_err() {
                failed_during += 1;
            }
            for _ in 0..10 {
                let i = acknowledged[net.rng().below(acknowledged.len())];
                reads_during += 1;
                failed_during += usize::from(!found(net, i));
            }
            net.tick_all();
        }
        net.tick_all();
        let lost = acknowledged.iter().filter(|&&i| !found(net, i)).count();
        Churn {
            rounds,
            acknowledged: acknowledged.len(),
            reads_during,
            failed_during,
            lost,
        }
    }
}

/// What the churn experiment saw.
pub struct Churn {
    pub rounds: usize,
    pub acknowledged: usize,
    pub reads_during: usize,
    pub failed_during: usize,
    pub lost: usize,
}

/// The paper's routing rule on *ideal* state, as a yardstick for the network the
/// joins built: every node's leaf set is exactly its |L| ring neighbours, and
/// every routing-table slot for which some node exists holds one (a random one:
/// proximity changes which node a slot holds, not how many digits it fixes).
/// Lookups are routed by the same [`RoutingState::route`] the nodes use.
///
/// It answers a question the measured figures alone cannot: is a lookup that
/// takes more hops than expected a fault of the state the protocol built, or
/// does the rule itself take that many hops on this set of ids? (At 1,000 nodes
/// a few lookups in 10,000 take ceil(log16 N) + 1 hops even here: where more
/// nodes than usual share a prefix, the prefix hops can end at a node that
/// shares the most digits with the key and is still not its root, and the leaf
/// set takes one more hop.)
pub struct Reference {
    /// Sorted by id, as [`Network::ring`].
    ring: Vec<(NodeId, usize)>,
    /// For each node of the network, its place in `ring` (dead nodes have none).
    place: Vec<Option<usize>>,
    states: Vec<RoutingState>,
}

impl Reference {
    /// Ideal state for every live node of `net`, routing-table slots filled by
    /// `rng`.
    pub fn build(net: &Network, rng: &mut Rng) -> Reference {
        let ring = net.ring();
        let n = ring.len();
        let info = |k: usize| net.node(ring[k % n].1).own();
        let size = net.config.leaf_set_size;
        let states = (0..n)
            .map(|k| {
                let own = info(k);
                let mut state = RoutingState::new(own, size, 0);
                let half = (size / 2).min(n);
                state
                    .leaf_set
                    .insert_all((1..=half).flat_map(|j| [info(k + j), info(k + n - j)]));
                // Row l, column d: the nodes whose first l digits are ours and
                // whose digit l is d, a contiguous run of the sorted ring.
                for l in 0..crate::utils::DIGITS {
                    let run = |d: usize| {
                        let cmp = |id: &NodeId| {
                            (0..l)
                                .map(|i| id.digit(i).cmp(&own.node_id.digit(i)))
                                .find(|o| o.is_ne())
                                .unwrap_or_else(|| id.digit(l).cmp(&d))
                        };
                        let lo = ring.partition_point(|(id, _)| cmp(id).is_lt());
                        let hi = ring.partition_point(|(id, _)| !cmp(id).is_gt());
                        lo..hi
                    };
                    let mine = run(own.node_id.digit(l));
                    for d in (0..crate::utils::BASE).filter(|&d| d != own.node_id.digit(l)) {
                        let r = run(d);
                        if !r.is_empty() {
                            let pick = r.start + rng.below(r.len());
                            let _ = state.routing_table.insert(info(pick), None);
                        }
                    }
                    // Deeper rows hold only nodes that share this row's prefix
                    // and our next digit; once we are alone in it, they are empty.
                    if mine.len() <= 1 {
                        break;
                    }
                }
                state
            })
            .collect();
        let mut place = vec![None; net.len()];
        for (k, (_, i)) in ring.iter().enumerate() {
            place[*i] = Some(k);
        }
        Reference {
            ring,
            place,
            states,
        }
    }

    /// Routing-table slots that some node fits, over all live nodes, and how many
    /// of them `net`'s nodes have filled: how complete the state is that the
    /// protocol built.
    pub fn slots_filled(&self, net: &Network) -> (usize, usize) {
        let (mut filled, mut fillable) = (0, 0);
        for (k, (_, i)) in self.ring.iter().enumerate() {
            let ours = net.node(*i).snapshot();
            for (row, col, _) in self.states[k].routing_table.entries() {
                fillable += 1;
                filled += usize::from(ours.routing_table.get(row, col).is_some());
            }
        }
        (filled, fillable)
    }

    /// The ideal state of live node `i` (an index of the network).
    pub fn state(&self, i: usize) -> Option<&RoutingState> {
        Some(&self.states[self.place.get(i).copied().flatten()?])
    }

    /// Routes a lookup for `key` from live node `from` (an index of the network):
    /// the number of hops, or `None` if it did not end at the key's root (never
    /// expected; a hop cap stops a loop).
    pub fn lookup(&self, from: usize, key: &NodeId) -> Option<u32> {
        let mut at = self.place.get(from).copied().flatten()?;
        for hops in 0..crate::utils::MAX_HOPS {
            match self.states[at].route(key, |_| false) {
                Route::Deliver => {
                    let root = Network::root_of(&self.ring, key);
                    return (self.ring[at].1 == root).then_some(hops);
                }
                Route::Forward { next, .. } => {
                    at = self
                        .ring
                        .binary_search_by(|(id, _)| id.cmp(&next.node_id))
                        .ok()?;
                }
            }
        }
        None
    }
}
