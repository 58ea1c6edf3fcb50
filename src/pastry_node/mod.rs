//! A Pastry node: its routing state (pure) and its network shell.
//!
//! - [`leaf_set`], [`routing_table`], [`neighborhood`], [`router`]: the paper's
//!   three sets and the routing decision. Pure code.
//! - [`store`]: the keys this node is root or replica of. Pure code.
//! - [`leases`]: when leaf-set members were last heard from (MSPastry's failure
//!   detector) and which nodes just failed. Pure code.
//! - [`anti_entropy`]: digests of the copies two replicas share, and replica
//!   sets on a ring. Pure code.
//! - [`Node`]: the handle over the node's shared state. Callers never see a lock;
//!   every method copies out what it needs and releases the lock before returning,
//!   so no lock is ever held across network I/O.
//! - [`join`]: how a new node enters the network, and how it learns leaf sets.
//! - [`transport`]: how a node reaches another (TCP here, memory in the simulator).
//! - [`server`]: the listener, one thread per connection, line framing.
//! - [`maintenance`]: the thread that probes peers, repairs state and exchanges
//!   leaf sets, fed by a crossbeam channel.
//! - [`RunningNode`]: all of the above started together, and stopped on drop.

pub mod anti_entropy;
pub mod join;
pub mod leaf_set;
pub mod leases;
pub mod maintenance;
pub mod neighborhood;
pub mod router;
pub mod routing_table;
pub mod server;
pub mod store;
pub mod transport;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use crate::message_handler::{LeafSetView, NeighborView, Reply, TableEntryView};
use crate::utils::{shl, NodeId, NodeInfo, LEAF_SET_SIZE, NEIGHBORHOOD_SIZE};
use maintenance::Event;
use router::{Route, RoutingState};
use store::{Store, Versioned};
use transport::TcpTransport;

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct Config {
    /// |L|: even, at least 2.
    pub leaf_set_size: usize,
    /// |M|.
    pub neighborhood_size: usize,
    /// The heartbeat period: how often the maintenance thread exchanges leaf sets
    /// with its members (`--heartbeat-ms`). All periodic work counts in ticks.
    pub tick: Duration,
    /// A leaf-set member not heard from for this many ticks has let its lease
    /// lapse and is probed; a heartbeat waits at most this long for a reply.
    pub lease_ticks: u64,
    /// Longest wait for a peer to accept a connection.
    pub connect_timeout: Duration,
    /// Longest wait for a peer's reply (or for a write to a peer).
    pub call_timeout: Duration,
    /// Longest line accepted, terminator excluded.
    pub max_line: usize,
    /// Most connections served at once (each has a thread); one more is answered
    /// with a `busy` error and closed.
    pub max_connections: usize,
    /// A connection that sends nothing for this long, between lines or in the
    /// middle of one, is closed.
    pub client_timeout: Duration,
    /// Every this many ticks a node runs anti-entropy with its leaf set even if
    /// the leaf set has not changed: digests compared, what differs sent, copies
    /// it no longer needs handed over and dropped, old tombstones expired. The
    /// safety net for a lost push.
    pub replication_period_ticks: u64,
    /// A tombstone is dropped this long after its delete: long enough for every
    /// replica to have had it (anti-entropy runs every few seconds), and for any
    /// node cut off from the network meanwhile to have been declared dead (a node
    /// cut off for longer could bring a deleted value back).
    pub tombstone_ttl: Duration,
    /// k: how many nodes hold each key (the root and its k - 1 nearest leaf-set
    /// neighbours); at most |L|/2.
    pub replicas: usize,
    /// A line must arrive whole within this long of its first byte; a client that
    /// sends half a line and stalls is let go sooner than an idle one.
    pub line_timeout: Duration,
    /// Longest key accepted, in bytes (UTF-8).
    pub max_key_bytes: usize,
    /// Longest value accepted, in bytes as compact JSON.
    pub max_value_bytes: usize,
    /// Most entries the store holds, tombstones included; a write of one more is
    /// refused with `store full`.
    pub max_store_keys: usize,
    /// Most bytes the store holds, counted as keys plus values as JSON; a write
    /// past it is refused with `store full`.
    pub max_store_bytes: usize,
    /// Most node-to-node forwards of one message; a message that arrives with more
    /// is refused (hop cap).
    pub max_hops: u32,
    /// Most nodes a joining node measures at each step of nearest-neighbour
    /// discovery (see [`join::discover`]); 0 turns discovery off, and the node
    /// joins through its bootstrap as given. Wider finds a nearer node to join
    /// through (lower route stretch) at more messages per join.
    pub discovery_width: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            leaf_set_size: LEAF_SET_SIZE,
            neighborhood_size: NEIGHBORHOOD_SIZE,
            tick: Duration::from_millis(1000),
            lease_ticks: 3,
            connect_timeout: Duration::from_millis(1000),
            call_timeout: Duration::from_millis(5000),
            max_line: 1 << 20,
            // Below the common open-file limit of 1024 by what a node holds
            // besides (`server::NODE_DESCRIPTORS`): past its own cap a node
            // answers `busy`; past the descriptor limit it could only fail to
            // accept, and the client would hear nothing.
            max_connections: 900,
            client_timeout: Duration::from_secs(60),
            replicas: 3,
            replication_period_ticks: 10,
            tombstone_ttl: Duration::from_secs(3600),
            line_timeout: Duration::from_secs(10),
            max_key_bytes: 1024,
            max_value_bytes: 64 * 1024,
            max_store_keys: 1_000_000,
            max_store_bytes: 256 << 20,
            max_hops: crate::utils::MAX_HOPS,
            discovery_width: DISCOVERY_WIDTH,
        }
    }
}

/// The default [`Config::discovery_width`]; see the README's "Reproducing the
/// paper" for what each width costs and buys. A narrow walk finds a nearby
/// enough node for the join within the paper's message bound; the periodic
/// routing-table refresh then does the rest (stretch 1.36 / 1.43 at 1,000 /
/// 10,000 nodes after 30 maintenance rounds, against 1.42 / 1.51 with width 16
/// and no rounds).
pub const DISCOVERY_WIDTH: usize = 2;

/// Most nodes queued for a probe at once (see [`Node::hear_of`]).
pub const MAX_PENDING_PROBES: usize = 1024;

/// A write refused because the store holds as many entries or bytes as its
/// caps allow (`Config::max_store_keys`, `Config::max_store_bytes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreFull;

/// What became of a copy offered to the store ([`Node::store_offer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// It replaced what the store held, or was the first copy.
    Taken,
    /// The store holds this very copy (same version, tombstone flag and value).
    AlreadyHeld,
    /// The store holds a copy that outranks it (or it is an expired tombstone):
    /// this node does not hold what was offered.
    NotKept,
}

/// Counters shown by `stats`.
#[derive(Default)]
struct Stats {
    /// Requests handled, by kind (indexed as `message_handler::KINDS`).
    messages: [AtomicU64; crate::message_handler::KINDS.len()],
    forwards: AtomicU64,
    /// Forwards chosen by the paper's rare case (step 3 of routing).
    rare_case: AtomicU64,
    errors: AtomicU64,
    connections_open: AtomicU64,
    peers_failed: AtomicU64,
    /// Copies other nodes took from our replication pushes.
    keys_replicated: AtomicU64,
    /// Copies dropped because their replica set, which no longer includes us,
    /// holds them.
    copies_dropped: AtomicU64,
}

struct Shared {
    own: NodeInfo,
    config: Config,
    routing: RwLock<RoutingState>,
    store: RwLock<Store>,
    stats: Stats,
    events: Sender<Event>,
    /// Nodes queued for a probe, and why, so that a node named in many replies is
    /// probed once, and only if it is still of use when its turn comes.
    probing: Mutex<HashMap<NodeId, ProbeReason>>,
    /// Set when the node is stopping: the maintenance thread then stops at once,
    /// whatever is still queued.
    stopping: AtomicBool,
    /// Timer ticks so far: which routing-table row the next tick looks after.
    ticks: AtomicU64,
    /// When each leaf-set member was last heard from, in ticks.
    leases: Mutex<leases::Leases>,
    /// False while the node is joining, until its leaf set has been confirmed:
    /// until then it does not act as the root of any key (MSPastry's consistent
    /// routing). `active` is read on every routed request; the mutex and the
    /// condition variable wake the requests that wait for activation.
    active: AtomicBool,
    activation: Mutex<()>,
    activated: Condvar,
    /// Our digests from the last anti-entropy round, kept up to date as copies
    /// change, so that answering a peer's `digest` costs no walk of the store.
    digest_cache: Mutex<Option<DigestCache>>,
    /// The leaf set at the last replication round.
    last_replicated_leaf_set: Mutex<Vec<NodeInfo>>,
    /// Nodes declared dead lately, with the tick of their death, least recently
    /// tried first: tried again now and then, so that the two sides of a
    /// partition find each other when it ends (`maintenance::retry_departed`).
    departed: Mutex<VecDeque<(NodeInfo, u64)>>,
    /// Nodes that said they are leaving, until the probe that checks it is done:
    /// if they are silent, their removal is a departure, not a failure.
    leaving: Mutex<HashSet<NodeId>>,
    started: Instant,
}

/// A key and one version of it, as replicas exchange them.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyEntry {
    pub key: String,
    #[serde(flatten)]
    pub entry: Versioned,
}

/// Which copies a replication round pushes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationRound {
    /// After a leaf-set change, with the leaf set as it was: each key only to the
    /// members that were not in its replica set before (a newcomer, or the node
    /// that moved up when a holder died).
    Since(Vec<NodeInfo>),
    /// We are leaving: every key to the k nodes of our leaf set closest to it,
    /// its replica set once we have gone.
    Leaving,
}

/// A node's anti-entropy digests as of its last round (see `Node::digests`).
struct DigestCache {
    ring: anti_entropy::ReplicaRing,
    me: usize,
    k: usize,
    /// One per ring member: `None` for us and for members we share nothing with.
    digests: Vec<Option<anti_entropy::Digest>>,
}

/// What replication work a tick has to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationDue {
    /// The periodic safety net: anti-entropy with every leaf-set member
    /// (`maintenance::anti_entropy`).
    AntiEntropy,
    /// A push of copies.
    Push(ReplicationRound),
}

/// Milliseconds since the Unix epoch: the versions of writes, and the age of
/// tombstones.
fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What a digest counts of a stored copy (its value hashed from the stored
/// text), taken under the store's lock.
fn summary(r: &store::Record<'_>) -> anti_entropy::Summary {
    anti_entropy::Summary::new(r.version, r.text())
}

/// What [`Node::forget`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forgotten {
    /// The node was in our state.
    pub known: bool,
    /// It was a leaf-set member: ask this node, the farthest live member on its
    /// side, for its leaf set.
    pub leaf_set_repair: Option<NodeInfo>,
    /// It was a routing-table entry: ask these nodes for their rows.
    pub table_repair: Vec<NodeInfo>,
}

/// Why a node was queued for a probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ProbeReason {
    /// We heard of it, and it would fill a gap in our leaf set or routing table.
    FillsGap,
    /// It announced itself, and may be nearer than its routing-table slot's holder.
    MayBeNearer,
}

/// A handle to one node's state; cheap to clone, shared by every thread of the node.
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

impl Node {
    /// A node listening at `addr` (its id is SHA-1 of it), and the receiving end of
    /// its maintenance events.
    pub fn new(addr: SocketAddr, config: Config) -> (Node, Receiver<Event>) {
        let own = NodeInfo::new(addr);
        let (tx, rx) = crossbeam_channel::unbounded();
        let routing = RoutingState::new(own, config.leaf_set_size, config.neighborhood_size);
        let node = Node {
            shared: Arc::new(Shared {
                own,
                config,
                routing: RwLock::new(routing),
                store: RwLock::new(Store::new()),
                stats: Stats::default(),
                events: tx,
                probing: Mutex::new(HashMap::new()),
                stopping: AtomicBool::new(false),
                ticks: AtomicU64::new(0),
                leases: Mutex::new(leases::Leases::new()),
                active: AtomicBool::new(true),
                activation: Mutex::new(()),
                activated: Condvar::new(),
                digest_cache: Mutex::new(None),
                last_replicated_leaf_set: Mutex::new(Vec::new()),
                departed: Mutex::new(VecDeque::new()),
                leaving: Mutex::new(HashSet::new()),
                started: Instant::now(),
            }),
        };
        (node, rx)
    }

    pub fn own(&self) -> NodeInfo {
        self.shared.own
    }

    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    // A panic in another thread must not take the node down with it: the state is
    // only ever changed by complete method calls, so a poisoned lock holds a
    // consistent value.
    fn routing(&self) -> RwLockReadGuard<'_, RoutingState> {
        self.shared
            .routing
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn routing_mut(&self) -> RwLockWriteGuard<'_, RoutingState> {
        self.shared
            .routing
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self) -> RwLockReadGuard<'_, Store> {
        self.shared.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn store_mut(&self) -> RwLockWriteGuard<'_, Store> {
        self.shared.store.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the routing state, for inspection.
    pub fn snapshot(&self) -> RoutingState {
        self.routing().clone()
    }

    /// The routing decision for `key`, passing over nodes for which `skip` is true.
    pub fn route(&self, key: &NodeId, skip: impl Fn(&NodeId) -> bool) -> Route {
        self.routing().route(key, skip)
    }

    pub fn knows(&self, id: &NodeId) -> bool {
        self.routing().knows(id)
    }

    /// The measured proximity of `id`, if we hold one (in R or M).
    pub fn proximity_of(&self, id: &NodeId) -> Option<u64> {
        self.routing().proximity_of(id)
    }

    pub fn known_nodes(&self) -> Vec<NodeInfo> {
        self.routing().known_unique()
    }

    pub fn leaf_set_members(&self) -> Vec<NodeInfo> {
        self.routing().leaf_set.members().copied().collect()
    }

    pub fn in_leaf_set(&self, id: &NodeId) -> bool {
        self.routing().leaf_set.contains(id)
    }

    pub fn neighborhood_members(&self) -> Vec<NodeInfo> {
        let r = self.routing();
        r.neighborhood.members().iter().map(|(n, _)| *n).collect()
    }

    /// The routing-table row that `peer` shares with us, row shl(us, peer), and
    /// ourselves: what an announcement and its reply pass on. That row is where
    /// the peer's own table is sparsest and hearsay helps most; the rows above it
    /// it fills easily from anyone. (Sending every usable row would triple the
    /// traffic for little gain.)
    pub fn shared_row(&self, peer: &NodeId) -> Vec<NodeInfo> {
        let r = self.routing();
        let row = shl(&self.shared.own.node_id, peer);
        let mut out: Vec<NodeInfo> = r.routing_table.row(row).map(|e| e.node).collect();
        out.push(self.shared.own);
        out
    }

    /// What the node at `position` on a join's path (the bootstrap is 0) gives
    /// the joining node `joiner`, as the paper has it: the i-th node gives its
    /// row i, whose entries share i digits with the joiner too. The root, the
    /// last node, also gives its deeper rows up to the prefix it shares with the
    /// joiner, since no node after it will. Ourselves included: we belong in one
    /// of the joiner's rows.
    pub fn rows_for(&self, joiner: &NodeId, position: usize, is_root: bool) -> Vec<NodeInfo> {
        let r = self.routing();
        let shared = shl(&self.shared.own.node_id, joiner);
        let first = position.min(shared);
        let last = if is_root { shared } else { first };
        let mut out: Vec<NodeInfo> = r
            .routing_table
            .entries()
            .filter(|(row, _, _)| (first..=last).contains(row))
            .map(|(_, _, e)| e.node)
            .collect();
        out.push(self.shared.own);
        out
    }

    /// Takes in `node`, which we know to be alive because it talked to us or we
    /// measured it, at `proximity` if measured. Unmeasured, it only fills a gap
    /// (the leaf set, an empty routing-table slot). Returns true if it entered the
    /// leaf set.
    ///
    /// A node we only *heard of* from another node goes through [`Node::hear_of`]
    /// instead: it may have died since, or never existed.
    pub fn learn(&self, node: NodeInfo, proximity: Option<u64>) -> bool {
        if node.node_id == self.shared.own.node_id {
            return false;
        }
        // A node declared dead a moment ago may have sent messages before it died
        // that arrive only now: it comes back only by answering a probe.
        if proximity.is_none() && self.recently_failed(&node.node_id) {
            return false;
        }
        // Most nodes we hear of we know already or have no room for: decide that
        // under the read lock, before paying for the SHA-1 that checks the id.
        let known = {
            let r = self.routing();
            if proximity.is_none() && !r.would_take(&node.node_id) {
                return false;
            }
            r.find(&node.node_id) == Some(node)
        };
        // A node we hold at the same address was checked when it came in.
        if !known && !node.is_genuine() {
            return false;
        }
        let (now_leaf, leaf_len) = {
            let mut r = self.routing_mut();
            let was_leaf = r.leaf_set.contains(&node.node_id);
            r.insert(node, proximity);
            let now_leaf = !was_leaf && r.leaf_set.contains(&node.node_id);
            (now_leaf, r.leaf_set.len())
        };
        if now_leaf {
            log::info!(
                "{} entered our leaf set ({} at {}; leaf set now {})",
                node.node_id.short(),
                node.node_id,
                node.addr,
                leaf_len
            );
        }
        now_leaf
    }

    /// `id` has shown a sign of life first-hand (it answered us, or called us):
    /// its lease is renewed. Only leaf-set members hold leases; any other node is
    /// not tracked (a node that joins the leaf set later is granted a lease then).
    pub fn heard_from(&self, id: &NodeId) {
        if !self.in_leaf_set(id) {
            return;
        }
        let now = self.shared.ticks.load(Ordering::Relaxed);
        self.leases().heard(*id, now);
    }

    /// The leaf-set members whose lease has lapsed: not heard from for more than
    /// `lease_ticks` ticks. The maintenance thread probes them.
    pub fn lapsed_leases(&self) -> Vec<NodeInfo> {
        let members = self.leaf_set_members();
        let now = self.shared.ticks.load(Ordering::Relaxed);
        let lease = self.shared.config.lease_ticks.max(1);
        self.leases().lapsed(&members, now, lease)
    }

    fn recently_failed(&self, id: &NodeId) -> bool {
        let lease = self.shared.config.lease_ticks.max(1);
        self.leases().recently_failed(id, self.ticks(), lease)
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, leases::Leases> {
        self.shared.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a node another node told us about. It is not taken in on hearsay: if
    /// we have a use for it, the maintenance thread measures it first and takes it
    /// in only if it answers. (Taking it in directly would let a dead node come
    /// back through the leaf set of a neighbour that has not noticed the death
    /// yet, over and over, and would let anyone fill our state with invented
    /// nodes.)
    ///
    /// Only nodes that would fill a gap are probed; a node that would merely
    /// compete for a routing-table slot is not worth a probe on hearsay.
    pub fn hear_of(&self, node: NodeInfo) {
        let (useful, known) = {
            let r = self.routing();
            let useful = r.would_take(&node.node_id);
            (useful, useful && r.knows(&node.node_id))
        };
        if useful && known {
            // Already in our state, so checked before: it only moves into L.
            self.learn(node, None);
        } else if useful {
            self.queue_probe(node, ProbeReason::FillsGap);
        }
    }

    /// After [`Node::learn`] without a measurement: has `node` measured if that
    /// could improve our routing table (it is an unmeasured entry now, or it might
    /// be nearer than the entry holding its slot). This is how existing nodes keep
    /// the paper's locality as newcomers announce themselves.
    pub fn consider(&self, node: NodeInfo) {
        let r = self.routing();
        let worth = if r.knows(&node.node_id) {
            r.routing_table.contains(&node.node_id) && r.proximity_of(&node.node_id).is_none()
        } else {
            // It took no slot: its slot holds another node, which it may beat.
            r.routing_table.slot_of(&node.node_id).is_some()
        };
        drop(r);
        if worth {
            self.queue_probe(node, ProbeReason::MayBeNearer);
        }
    }

    fn queue_probe(&self, node: NodeInfo, reason: ProbeReason) {
        let mut probing = self
            .shared
            .probing
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Hearsay is cheap to invent and each probe may wait out a timeout: past
        // this many pending probes, what we hear is dropped rather than queued.
        if probing.len() >= MAX_PENDING_PROBES {
            return;
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = probing.entry(node.node_id) {
            slot.insert(reason);
            self.send(Event::Probe(node));
        }
    }

    /// The maintenance thread takes up the probe of `id`: is it still worth
    /// sending? Not if the node was measured meanwhile (say, by an announcement's
    /// round trip), or, heard of to fill a gap, the gap has been filled since.
    pub(crate) fn probe_still_useful(&self, id: &NodeId) -> bool {
        let reason = self
            .shared
            .probing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let r = self.routing();
        let measured_entry = r.routing_table.contains(id) && r.proximity_of(id).is_some();
        match reason {
            Some(ProbeReason::FillsGap) => r.would_take(id),
            Some(ProbeReason::MayBeNearer) => !measured_entry,
            None => false,
        }
    }

    /// Marks the node as joining (inactive) or as having a confirmed leaf set
    /// (active). A node that starts a network is active from the start.
    pub fn set_active(&self, active: bool) {
        let _guard = self
            .shared
            .activation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.active.store(active, Ordering::SeqCst);
        if active {
            self.shared.activated.notify_all();
        }
    }

    /// Whether the node may act as the root of a key.
    pub fn is_active(&self) -> bool {
        self.shared.active.load(Ordering::SeqCst)
    }

    /// Waits up to `timeout` for the node to become active; returns whether it is.
    /// A request that arrives at a joining node waits here rather than be routed,
    /// or answered, from a leaf set not yet confirmed.
    pub fn wait_active(&self, timeout: Duration) -> bool {
        if self.is_active() {
            return true;
        }
        let guard = self
            .shared
            .activation
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = self
            .shared
            .activated
            .wait_timeout_while(guard, timeout, |_| !self.is_active())
            .unwrap_or_else(|e| e.into_inner());
        self.is_active()
    }

    /// True once the node has been asked to stop.
    pub fn is_stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Relaxed)
    }

    /// Forgets `id` everywhere, and says whom to ask to repair the hole it leaves.
    pub fn forget(&self, id: &NodeId) -> Forgotten {
        let mut r = self.routing_mut();
        let leaf_set_repair = if r.leaf_set.contains(id) {
            r.leaf_set.farthest_on_side_of(id)
        } else {
            None
        };
        // The paper's lazy routing-table repair: another entry of the same row
        // shares our prefix up to that row, so its own row holds candidates for the
        // empty slot; failing that, an entry of the next row does.
        let mut table_repair = Vec::new();
        if let Some((row, _)) = r.routing_table.slot_of(id) {
            if r.routing_table.contains(id) {
                for candidate_row in [row, row + 1] {
                    table_repair.extend(
                        r.routing_table
                            .row(candidate_row)
                            .map(|e| e.node)
                            .filter(|n| n.node_id != *id)
                            .take(2 - table_repair.len().min(2)),
                    );
                }
            }
        }
        let known = r.remove(id);
        drop(r);
        if known {
            let now = self.ticks();
            let lease = self.shared.config.lease_ticks.max(1);
            self.leases().declared_dead(*id, now, lease);
        }
        Forgotten {
            known,
            leaf_set_repair,
            table_repair,
        }
    }

    /// Timer ticks (heartbeats) so far.
    pub fn ticks(&self) -> u64 {
        self.shared.ticks.load(Ordering::Relaxed)
    }

    /// Counts a timer tick; returns how many came before it.
    pub(crate) fn next_tick(&self) -> u64 {
        self.shared.ticks.fetch_add(1, Ordering::Relaxed)
    }

    /// Remembers `peer`, declared dead at tick `since`, to be tried again later
    /// (last in line); only the |L| most recent are kept.
    pub(crate) fn remember_departed(&self, peer: NodeInfo, since: u64) {
        let mut d = self
            .shared
            .departed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        d.retain(|(n, _)| n.node_id != peer.node_id);
        d.push_back((peer, since));
        while d.len() > self.shared.config.leaf_set_size {
            d.pop_front();
        }
    }

    /// Takes the departed node to try next off the list: the least recently
    /// tried that died after tick `after` and that we have not taken back since.
    pub(crate) fn next_departed(&self, after: u64) -> Option<(NodeInfo, u64)> {
        loop {
            let next = self
                .shared
                .departed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front()?;
            if next.1 >= after && !self.knows(&next.0.node_id) {
                return Some(next);
            }
        }
    }

    /// The entries of routing-table row `row`.
    pub fn routing_row(&self, row: usize) -> Vec<NodeInfo> {
        self.routing()
            .routing_table
            .row(row)
            .map(|e| e.node)
            .collect()
    }

    /// Rows of the routing table in use.
    pub fn routing_rows_used(&self) -> usize {
        self.routing().routing_table.rows_used()
    }

    /// Reports that `peer` did not answer a call.
    pub fn suspect(&self, peer: NodeInfo) {
        self.send(Event::Suspect(peer));
    }

    /// `peer`, a node we know, says it is leaving: it is probed like a suspect,
    /// and removed if silent (see `Request::Leave`).
    pub fn note_leaving(&self, peer: NodeInfo) {
        self.leaving().insert(peer.node_id);
        self.suspect(peer);
    }

    /// Whether `id` said it was leaving; forgets that it did.
    pub(crate) fn take_leaving(&self, id: &NodeId) -> bool {
        self.leaving().remove(id)
    }

    fn leaving(&self) -> std::sync::MutexGuard<'_, HashSet<NodeId>> {
        self.shared
            .leaving
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn send(&self, event: Event) {
        // The receiver is gone only when the node is shutting down.
        let _ = self.shared.events.send(event);
    }

    /// The root's write of `key` (a delete when `value` is `None`), versioned by
    /// the wall clock; refused if it would take the store past its caps.
    pub fn store_write(&self, key: &str, value: Option<Value>) -> Result<Versioned, StoreFull> {
        let now_ms = wall_clock_ms();
        let c = &self.shared.config;
        // Encoded and measured before the lock is taken.
        let key_id = NodeId::for_key(key);
        let text = value.as_ref().map(Value::to_string);
        let charge = store::charge(key, text.as_deref());
        // The version is the store's to pick; the value's hash is known now.
        let mut new = anti_entropy::Summary::new(0, text.as_deref().map(str::as_bytes));
        let mut store = self.store_mut();
        // The check and the write under one lock: concurrent writers cannot
        // overshoot the caps together.
        let fits = store.fits(key, charge, c.max_store_keys, c.max_store_bytes);
        if !fits {
            return Err(StoreFull);
        }
        let old = store.record_at(key_id, key).map(|r| summary(&r));
        let version = store.write_text(key_id, key, text, now_ms);
        drop(store);
        new.version = version;
        self.digest_change(&key_id, old, Some(new));
        Ok(Versioned {
            version,
            deleted: value.is_none(),
            value: value.unwrap_or(Value::Null),
        })
    }

    /// Takes in a copy of `key` from another node if it ranks above ours
    /// ([`store::rank`]: newer, or the winner of a same-version tie). Returns
    /// whether it was taken; `Err` if it ranks above ours but would take the
    /// store past its caps.
    pub fn store_apply(&self, key: &str, entry: &Versioned) -> Result<bool, StoreFull> {
        self.store_offer(key, entry).map(|o| o == Offer::Taken)
    }

    /// [`Node::store_apply`], saying why a copy was not taken: the comparison
    /// of ranks is made here, under the store's lock, so a caller need not read
    /// the key back to learn it.
    pub fn store_offer(&self, key: &str, entry: &Versioned) -> Result<Offer, StoreFull> {
        // A tombstone past its lifetime has been dropped here, or soon will be:
        // taking it back in would only start another round of expiry.
        if entry.deleted && entry.version < self.tombstone_cutoff() {
            return Ok(Offer::NotKept);
        }
        let c = &self.shared.config;
        // Encoded before the lock is taken: the text is what the store keeps,
        // what its cap counts, and what breaks a same-version tie.
        let key_id = NodeId::for_key(key);
        let text = entry.text();
        let bytes = text.as_deref().map(str::as_bytes);
        let charge = store::charge(key, text.as_deref());
        let new = anti_entropy::Summary::new(entry.version, bytes);
        let rank = store::rank(entry.version, bytes);
        let mut store = self.store_mut();
        let old = store.record_at(key_id, key);
        match old.map(|r| rank.cmp(&r.rank())) {
            Some(std::cmp::Ordering::Equal) => return Ok(Offer::AlreadyHeld),
            Some(std::cmp::Ordering::Less) => return Ok(Offer::NotKept),
            _ => {}
        }
        if !store.fits(key, charge, c.max_store_keys, c.max_store_bytes) {
            return Err(StoreFull);
        }
        let old = old.map(|r| summary(&r));
        let applied = store.apply_text(key_id, key, entry.version, text);
        drop(store);
        if applied {
            self.digest_change(&key_id, old, Some(new));
            Ok(Offer::Taken)
        } else {
            Ok(Offer::NotKept)
        }
    }

    /// Tombstones with a version below this have outlived `tombstone_ttl`.
    fn tombstone_cutoff(&self) -> u64 {
        let ttl = self.shared.config.tombstone_ttl.as_millis() as u64;
        wall_clock_ms().saturating_sub(ttl)
    }

    /// Our entry for `key`, tombstone included.
    pub fn store_entry(&self, key: &str) -> Option<Versioned> {
        self.store().entry(key)
    }

    /// [`Node::store_entry`] for a key whose id the caller has already computed
    /// (the store is ordered by key id; this saves hashing the key again).
    pub fn store_entry_at(&self, key_id: &NodeId, key: &str) -> Option<Versioned> {
        self.store().record_at(*key_id, key).map(|r| r.versioned())
    }

    /// Our live value for `key`.
    pub fn store_get(&self, key: &str) -> Option<Value> {
        self.store().get(key)
    }

    /// The replica set of `key_id` as we see it: the k nodes of L ∪ {us}
    /// numerically closest to it, closest first (the root first).
    pub fn replica_set(&self, key_id: &NodeId) -> Vec<NodeInfo> {
        let (ring, _) = self.replica_ring();
        let mut set = Vec::new();
        ring.replica_set(key_id, self.replicas(), &mut set);
        set.into_iter().map(|i| ring.nodes()[i]).collect()
    }

    /// k, bounded by what the leaf set can see: |L|/2. With k = |L|/2 + 1 a node
    /// at the edge of a key's replica set, as its own leaf set shows it, would
    /// count itself in while nodes that see further count it out: it would never
    /// hand the key over nor hear of its deletes, and, once the tombstone expired
    /// elsewhere, bring the deleted value back (found by review, with a test).
    pub fn replicas(&self) -> usize {
        let c = &self.shared.config;
        c.replicas.clamp(1, (c.leaf_set_size / 2).max(1))
    }

    /// What a replication round sends: for each node, the copies it should get
    /// of the keys we hold (see [`ReplicationRound`] for which).
    pub fn replication_batches(
        &self,
        round: &ReplicationRound,
    ) -> HashMap<NodeInfo, Vec<KeyEntry>> {
        let own = self.shared.own;
        let k = self.replicas();
        // One look at the leaf set for the whole round, not one per key.
        let leaf_set = self.leaf_set_members();
        if leaf_set.is_empty() {
            // Alone: nobody to send to, and no reason to copy every key.
            return HashMap::new();
        }
        // Who holds each key now (leaving: once we have gone) and, after a
        // leaf-set change, who held it before.
        let with_us = |mut nodes: Vec<NodeInfo>| {
            nodes.push(own);
            anti_entropy::ReplicaRing::new(nodes)
        };
        let (now, before) = match round {
            ReplicationRound::Leaving => (anti_entropy::ReplicaRing::new(leaf_set), None),
            ReplicationRound::Since(previous) => {
                (with_us(leaf_set), Some(with_us(previous.clone())))
            }
        };
        let (mut set, mut old) = (Vec::with_capacity(k), Vec::with_capacity(k));
        let mut out: HashMap<NodeInfo, Vec<KeyEntry>> = HashMap::new();
        // Under the store's read lock: replica sets are found in O(log |L| + k)
        // and only the copies that go somewhere are taken out.
        let store = self.store();
        for r in store.iter() {
            now.replica_set(&r.key_id, k, &mut set);
            old.clear();
            if let Some(before) = &before {
                before.replica_set(&r.key_id, k, &mut old);
                let was = |i: &usize| before.nodes()[*i] == own;
                let is = |i: &usize| now.nodes()[*i] == own;
                // Whoever was or is in the set passes the key on; a node that
                // was in neither did so already, or holds a stale copy.
                if !set.iter().any(is) && !old.iter().any(was) {
                    continue;
                }
            }
            let had_it: Vec<NodeInfo> = match &before {
                Some(b) => old.iter().map(|&i| b.nodes()[i]).collect(),
                None => Vec::new(),
            };
            for &i in &set {
                let n = now.nodes()[i];
                if n != own && !had_it.contains(&n) {
                    out.entry(n).or_default().push(KeyEntry {
                        key: r.key.to_string(),
                        entry: r.versioned(),
                    });
                }
            }
        }
        out
    }

    /// L ∪ {us} as a ring, and our place in it.
    fn replica_ring(&self) -> (anti_entropy::ReplicaRing, usize) {
        let own = self.shared.own;
        let mut members = self.leaf_set_members();
        members.push(own);
        let ring = anti_entropy::ReplicaRing::new(members);
        let me = ring
            .nodes()
            .iter()
            .position(|n| n.node_id == own.node_id)
            .unwrap_or_default();
        (ring, me)
    }

    /// The key id and digest summary of every copy we hold, expired tombstones
    /// left out (one side may have dropped its copy already: they must not make
    /// digests differ). Copied out so that the store's lock is held only for a
    /// quick walk (hashing each value as it goes), not while replica sets are
    /// worked out.
    fn copies(&self) -> Vec<(NodeId, anti_entropy::Summary)> {
        let cutoff = self.tombstone_cutoff();
        self.store()
            .iter()
            .filter(|r| !(r.deleted && r.version < cutoff))
            .map(|r| (r.key_id, summary(&r)))
            .collect()
    }

    /// For each leaf-set member, the anti-entropy digest of the copies both it
    /// and we should hold (both are in the key's replica set as we see it), in
    /// one pass over our copies.
    pub fn digests(&self) -> Vec<(NodeInfo, anti_entropy::Digest)> {
        let (ring, me) = self.replica_ring();
        let k = self.replicas();
        let copies = self.copies();
        // Which copies each member shares with us, as (copy, member) pairs.
        let mut shared: Vec<(u32, u8)> = Vec::new();
        let mut counts = vec![0usize; ring.nodes().len()];
        let mut set = Vec::with_capacity(k);
        for (c, (key_id, _)) in copies.iter().enumerate() {
            ring.replica_set(key_id, k, &mut set);
            if set.contains(&me) {
                for &m in set.iter().filter(|&&m| m != me) {
                    shared.push((c as u32, m as u8));
                    counts[m] += 1;
                }
            }
        }
        let mut digests: Vec<anti_entropy::Digest> = counts
            .iter()
            .map(|&n| anti_entropy::Digest::new(anti_entropy::bucket_count(n)))
            .collect();
        for (c, m) in shared {
            let (key_id, copy) = &copies[c as usize];
            digests[m as usize].add(key_id, copy);
        }
        // A member we share nothing with gets no digest: what it holds that we
        // should have, it sends us in its own round.
        let out: Vec<(NodeInfo, anti_entropy::Digest)> = ring
            .nodes()
            .iter()
            .zip(&digests)
            .enumerate()
            .filter(|(m, _)| *m != me && counts[*m] > 0)
            .map(|(_, (n, d))| (*n, d.clone()))
            .collect();
        // Kept for answering the members' own digests until the next round. A
        // write between the copy above and this line is missing from it: the
        // member then sees a bucket differ and gets ~32 copies it may have, and
        // the next round starts afresh.
        let digests = digests
            .into_iter()
            .enumerate()
            .map(|(m, d)| (m != me && counts[m] > 0).then_some(d))
            .collect();
        *self.digest_cache() = Some(DigestCache {
            ring,
            me,
            k,
            digests,
        });
        out
    }

    fn digest_cache(&self) -> std::sync::MutexGuard<'_, Option<DigestCache>> {
        self.shared
            .digest_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the cached digests true when a copy changes: `old` and `new` are
    /// the copy's summaries before and after (value hash included: a copy
    /// replaced by one of the same version changes the digest too), `None` for
    /// no copy.
    fn digest_change(
        &self,
        key_id: &NodeId,
        old: Option<anti_entropy::Summary>,
        new: Option<anti_entropy::Summary>,
    ) {
        let mut cache = self.digest_cache();
        let Some(c) = cache.as_mut() else {
            return;
        };
        let mut set = Vec::with_capacity(c.k);
        c.ring.replica_set(key_id, c.k, &mut set);
        if !set.contains(&c.me) {
            return;
        }
        for m in set {
            if let Some(Some(d)) = c.digests.get_mut(m) {
                if let Some(copy) = &old {
                    d.remove(key_id, copy);
                }
                if let Some(copy) = &new {
                    d.add(key_id, copy);
                }
            }
        }
    }

    /// Our digest, in `buckets` buckets, of the copies both we and `peer`
    /// should hold: how we answer a `digest` request.
    pub fn digest_for(&self, peer: &NodeId, buckets: usize) -> anti_entropy::Digest {
        let (ring, me) = self.replica_ring();
        // From the cache when it was made with the same leaf set and buckets.
        {
            let cache = self.digest_cache();
            if let Some(c) = cache.as_ref() {
                let same_ring = c.ring.nodes() == ring.nodes() && c.k == self.replicas();
                let cached = c
                    .ring
                    .nodes()
                    .iter()
                    .position(|n| n.node_id == *peer)
                    .and_then(|m| c.digests[m].as_ref());
                if let Some(d) = cached.filter(|d| same_ring && d.buckets.len() == buckets) {
                    return d.clone();
                }
            }
        }
        let mut digest = anti_entropy::Digest::new(buckets);
        let Some(p) = ring.nodes().iter().position(|n| n.node_id == *peer) else {
            return digest;
        };
        let k = self.replicas();
        let mut set = Vec::with_capacity(k);
        for (key_id, copy) in self.copies() {
            ring.replica_set(&key_id, k, &mut set);
            if set.contains(&me) && set.contains(&p) {
                digest.add(&key_id, &copy);
            }
        }
        digest
    }

    /// The copies both we and `peer` should hold that fall in the `differing`
    /// buckets of a digest of `buckets` buckets: what anti-entropy sends.
    pub fn shared_entries(
        &self,
        peer: &NodeId,
        buckets: usize,
        differing: &[u32],
    ) -> Vec<KeyEntry> {
        let (ring, me) = self.replica_ring();
        let Some(p) = ring.nodes().iter().position(|n| n.node_id == *peer) else {
            return Vec::new();
        };
        let k = self.replicas();
        let wanted: std::collections::HashSet<u32> = differing.iter().copied().collect();
        let cutoff = self.tombstone_cutoff();
        let mut set = Vec::with_capacity(k);
        let mut out = Vec::new();
        let store = self.store();
        for r in store.iter() {
            if !wanted.contains(&(anti_entropy::bucket_of(&r.key_id, buckets) as u32))
                || (r.deleted && r.version < cutoff)
            {
                continue;
            }
            ring.replica_set(&r.key_id, k, &mut set);
            if set.contains(&me) && set.contains(&p) {
                out.push(KeyEntry {
                    key: r.key.to_string(),
                    entry: r.versioned(),
                });
            }
        }
        out
    }

    /// The copies we hold whose replica set, as we see it, does not include us
    /// (nodes have joined between us and the key), each with that replica set:
    /// once they all hold it, our copy can go.
    pub fn stale_copies(&self) -> Vec<(KeyEntry, Vec<NodeInfo>)> {
        let (ring, me) = self.replica_ring();
        if ring.nodes().len() < 2 {
            return Vec::new();
        }
        let k = self.replicas();
        let mut set = Vec::with_capacity(k);
        let mut out = Vec::new();
        let store = self.store();
        for r in store.iter() {
            ring.replica_set(&r.key_id, k, &mut set);
            if !set.contains(&me) {
                out.push((
                    KeyEntry {
                        key: r.key.to_string(),
                        entry: r.versioned(),
                    },
                    set.iter().map(|&i| ring.nodes()[i]).collect(),
                ));
            }
        }
        out
    }

    /// Drops our copy of `key` if it is still `copy` (the one we handed over).
    pub fn drop_copy(&self, key: &str, copy: &Versioned) -> bool {
        let text = copy.text();
        let mut store = self.store_mut();
        let old = store.record(key).map(|r| summary(&r));
        let dropped = store.remove_copy(key, copy.version, text.as_deref());
        drop(store);
        if dropped {
            self.digest_change(&NodeId::for_key(key), old, None);
            self.shared
                .stats
                .copies_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        dropped
    }

    /// Tombstones held (deleted keys whose tombstone has not expired yet).
    pub fn tombstone_count(&self) -> usize {
        self.store().tombstones()
    }

    /// Drops the tombstones older than the tombstone lifetime; returns how many.
    pub fn expire_tombstones(&self) -> usize {
        if self.store().tombstones() == 0 {
            return 0;
        }
        let cutoff = self.tombstone_cutoff();
        let removed = self.store_mut().remove_tombstones_before(cutoff);
        if removed > 0 {
            // Which copies went is not known here: the next round starts afresh.
            *self.digest_cache() = None;
        }
        removed
    }

    /// Which replication work is due at this tick, if any: the periodic
    /// anti-entropy, or, when the leaf set has changed since the last round (a
    /// node joined or died near us), the push for that change.
    pub(crate) fn replication_due(&self, tick: u64) -> Option<ReplicationDue> {
        let now = self.leaf_set_members();
        let mut last = self
            .shared
            .last_replicated_leaf_set
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let previous = std::mem::replace(&mut *last, now.clone());
        // The first anti-entropy comes a whole period after the start: a new
        // node has nothing to compare, and an old one pushed when its leaf set
        // changed.
        let period = self.shared.config.replication_period_ticks.max(1);
        if tick % period == period - 1 {
            Some(ReplicationDue::AntiEntropy)
        } else if previous != now {
            Some(ReplicationDue::Push(ReplicationRound::Since(previous)))
        } else {
            None
        }
    }

    pub fn key_count(&self) -> usize {
        self.store().len()
    }

    pub(crate) fn count_message(&self, kind_index: usize) {
        if let Some(c) = self.shared.stats.messages.get(kind_index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_forward(&self, via: router::Via) {
        self.shared.stats.forwards.fetch_add(1, Ordering::Relaxed);
        if via == router::Via::RareCase {
            self.shared.stats.rare_case.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forwards this node made by the rare case, since it started.
    pub fn rare_case_forwards(&self) -> u64 {
        self.shared.stats.rare_case.load(Ordering::Relaxed)
    }

    /// This node's leaf set.
    pub fn leaf_set(&self) -> leaf_set::LeafSet {
        self.routing().leaf_set.clone()
    }

    /// Entries in this node's routing table.
    pub fn routing_table_len(&self) -> usize {
        self.routing().routing_table.len()
    }

    pub(crate) fn count_replicated(&self, n: u64) {
        self.shared
            .stats
            .keys_replicated
            .fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn count_error(&self) {
        self.shared.stats.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_peer_failed(&self) {
        self.shared
            .stats
            .peers_failed
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.shared
            .stats
            .connections_open
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.shared
            .stats
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// The `status` reply.
    pub fn status(&self) -> Reply {
        let keys = self.key_count();
        let r = self.routing();
        Reply::Status {
            node_id: self.shared.own.node_id,
            addr: self.shared.own.addr,
            leaf_set: LeafSetView {
                smaller: r.leaf_set.smaller().to_vec(),
                larger: r.leaf_set.larger().to_vec(),
            },
            routing_table: r
                .routing_table
                .entries()
                .map(|(row, col, e)| TableEntryView {
                    row,
                    col,
                    node_id: e.node.node_id,
                    addr: e.node.addr,
                    proximity: e.proximity,
                })
                .collect(),
            neighborhood: r
                .neighborhood
                .members()
                .iter()
                .map(|(n, p)| NeighborView {
                    node_id: n.node_id,
                    addr: n.addr,
                    proximity: *p,
                })
                .collect(),
            keys,
        }
    }

    /// The `stats` reply.
    pub fn stats(&self) -> Reply {
        let s = &self.shared.stats;
        let messages: BTreeMap<String, u64> = crate::message_handler::KINDS
            .iter()
            .zip(&s.messages)
            .map(|(k, c)| (k.to_string(), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        Reply::Stats {
            node_id: self.shared.own.node_id,
            messages,
            forwards: s.forwards.load(Ordering::Relaxed),
            rare_case: s.rare_case.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            keys: self.key_count(),
            connections_open: s.connections_open.load(Ordering::Relaxed),
            peers_failed: s.peers_failed.load(Ordering::Relaxed),
            keys_replicated: s.keys_replicated.load(Ordering::Relaxed),
            tombstones: self.tombstone_count(),
            copies_dropped: s.copies_dropped.load(Ordering::Relaxed),
            maintenance_queue: self.shared.events.len(),
            uptime_ms: self.shared.started.elapsed().as_millis() as u64,
        }
    }
}

/// A node with its server and maintenance threads running. Dropping it stops them.
pub struct RunningNode {
    node: Node,
    transport: Arc<TcpTransport>,
    server: Option<server::Server>,
    maintenance: Option<JoinHandle<()>>,
}

impl RunningNode {
    /// Starts a node on an already-bound listener (bind port 0 in tests), as the
    /// first node of a network. Call [`RunningNode::join`] to join an existing one.
    pub fn start(listener: TcpListener, config: Config) -> std::io::Result<RunningNode> {
        let addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{addr} cannot be a node's address: peers must be able to dial it; give the address of an interface"),
            ));
        }
        let (node, events) = Node::new(addr, config.clone());
        let transport = Arc::new(TcpTransport::new(&config));
        let server = server::Server::start(listener, node.clone(), transport.clone())?;
        let maintenance = maintenance::spawn(node.clone(), events, transport.clone())?;
        Ok(RunningNode {
            node,
            transport,
            server: Some(server),
            maintenance: Some(maintenance),
        })
    }

    /// Joins the network that the node at `bootstrap` belongs to.
    pub fn join(&self, bootstrap: SocketAddr) -> Result<join::JoinReport, join::JoinError> {
        join::join(&self.node, bootstrap, self.transport.as_ref())
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn addr(&self) -> SocketAddr {
        self.node.own().addr
    }

    pub fn id(&self) -> NodeId {
        self.node.own().node_id
    }

    /// Leaves the network gracefully: hands every key this node holds to the
    /// nodes that hold it once it has gone, then stops. Returns how many copies
    /// the others took.
    pub fn leave(&mut self) -> usize {
        let taken = maintenance::hand_off(&self.node, self.transport.as_ref());
        // Closed first, so that the nodes told next find the port shut when they
        // check, and remove us at once instead of waiting out a lease.
        self.shutdown();
        maintenance::say_goodbye(&self.node, self.transport.as_ref());
        taken
    }

    /// Stops the server and maintenance threads and waits for them, without a
    /// word to anyone: to the rest of the network this is a failure.
    pub fn shutdown(&mut self) {
        // Stop the maintenance thread's calls first: a node that has stopped
        // answering must not go on announcing itself, or peers that have just
        // declared it dead would take it back in.
        self.node.shared.stopping.store(true, Ordering::Relaxed);
        if let Some(mut s) = self.server.take() {
            s.shutdown();
        }
        self.node.send(Event::Shutdown);
        if let Some(m) = self.maintenance.take() {
            let _ = m.join();
        }
        self.transport.close_all();
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A node with `n` leaf-set members (never contacted: nothing here sends).
    fn node_with_leaf_set(n: u16) -> Node {
        let (node, _events) =
            Node::new(SocketAddr::from(([127, 0, 0, 1], 4000)), Config::default());
        for p in 1..=n {
            let peer = NodeInfo::new(SocketAddr::from(([127, 0, 0, 2], 5000 + p)));
            node.learn(peer, Some(1));
        }
        node
    }

    /// The cached digests, kept up to date through writes, copies taken (one
    /// that wins a same-version tie among them), deletes and dropped copies,
    /// equal digests made afresh from the store.
    #[test]
    fn cached_digests_stay_equal_to_fresh_ones() {
        let node = node_with_leaf_set(16);
        for i in 0..3000 {
            node.store_write(&format!("k{i}"), Some(json!(i))).unwrap();
        }
        let round = node.digests();
        assert!(!round.is_empty());
        for i in 0..3000 {
            match i % 5 {
                0 => {
                    node.store_write(&format!("k{i}"), Some(json!("new")))
                        .unwrap();
                }
                1 => {
                    node.store_write(&format!("k{i}"), None).unwrap();
                }
                2 => {
                    let e = node.store_entry(&format!("k{i}")).unwrap();
                    assert!(node.drop_copy(&format!("k{i}"), &e));
                }
                3 => {
                    let copy = Versioned {
                        version: u64::MAX / 2,
                        deleted: false,
                        value: json!("copy"),
                    };
                    node.store_apply(&format!("new{i}"), &copy).unwrap();
                }
                _ => {
                    // Same version, greater text (`{` sorts above digits):
                    // replaces the value only.
                    let mut copy = node.store_entry(&format!("k{i}")).unwrap();
                    copy.value = json!({ "tie": i });
                    assert!(node.store_apply(&format!("k{i}"), &copy).unwrap());
                }
            }
        }
        let cached: Vec<_> = round
            .iter()
            .map(|(peer, d)| node.digest_for(&peer.node_id, d.buckets.len()))
            .collect();
        *node.digest_cache() = None;
        let mut compared = 0;
        for ((peer, d), cached) in round.iter().zip(cached) {
            let fresh = node.digest_for(&peer.node_id, d.buckets.len());
            assert_eq!(cached, fresh, "peer {}", peer.node_id);
            assert_ne!(&cached, d, "the writes changed the digest");
            compared += 1;
        }
        assert!(compared > 0);
    }
}
