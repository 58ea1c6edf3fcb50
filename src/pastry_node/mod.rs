//! A Pastry node: its routing state (pure) and its network shell.
//!
//! - [`leaf_set`], [`routing_table`], [`neighborhood`], [`router`]: the paper's
//!   three sets and the routing decision. Pure code.
//! - [`store`]: the keys this node is root of. Pure code.
//! - [`Node`]: the handle over the node's shared state. Callers never see a lock;
//!   every method copies out what it needs and releases the lock before returning,
//!   so no lock is ever held across network I/O.
//! - [`join`]: how a new node enters the network, and how it learns leaf sets.
//! - [`transport`]: how a node reaches another (TCP here, memory in the simulator).
//! - [`server`]: the listener, one thread per connection, line framing.
//! - [`maintenance`]: the thread that probes peers, repairs state and exchanges
//!   leaf sets, fed by a crossbeam channel.
//! - [`RunningNode`]: all of the above started together, and stopped on drop.

pub mod join;
pub mod leaf_set;
pub mod maintenance;
pub mod neighborhood;
pub mod router;
pub mod routing_table;
pub mod server;
pub mod store;
pub mod transport;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde_json::Value;

use crate::message_handler::{LeafSetView, NeighborView, Reply, TableEntryView};
use crate::utils::{shl, NodeId, NodeInfo, LEAF_SET_SIZE, NEIGHBORHOOD_SIZE};
use maintenance::Event;
use router::{Route, RoutingState};
use store::Store;
use transport::TcpTransport;

/// Settings of one node.
#[derive(Clone, Debug)]
pub struct Config {
    /// |L|: even, at least 2.
    pub leaf_set_size: usize,
    /// |M|.
    pub neighborhood_size: usize,
    /// How often the maintenance thread exchanges leaf sets with its members.
    pub tick: Duration,
    /// Longest wait for a peer to accept a connection.
    pub connect_timeout: Duration,
    /// Longest wait for a peer's reply (or for a write to a peer).
    pub call_timeout: Duration,
    /// Longest line accepted, terminator excluded.
    pub max_line: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            leaf_set_size: LEAF_SET_SIZE,
            neighborhood_size: NEIGHBORHOOD_SIZE,
            tick: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(1000),
            call_timeout: Duration::from_millis(5000),
            max_line: 1 << 20,
        }
    }
}

/// Counters shown by `stats`.
#[derive(Default)]
struct Stats {
    messages: Mutex<BTreeMap<&'static str, u64>>,
    forwards: AtomicU64,
    /// Forwards chosen by the paper's rare case (step 3 of routing).
    rare_case: AtomicU64,
    errors: AtomicU64,
    connections_open: AtomicU64,
    peers_failed: AtomicU64,
}

struct Shared {
    own: NodeInfo,
    config: Config,
    routing: RwLock<RoutingState>,
    store: RwLock<Store>,
    stats: Stats,
    events: Sender<Event>,
    started: Instant,
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

    /// The routing-table entries a joining node with id `joiner` can use: rows
    /// 0 ..= shl(us, joiner), whose entries share the row's prefix with it too.
    /// Ourselves included: we belong in one of its rows.
    pub fn rows_for(&self, joiner: &NodeId) -> Vec<NodeInfo> {
        let r = self.routing();
        let last = shl(&self.shared.own.node_id, joiner);
        let mut out: Vec<NodeInfo> = r
            .routing_table
            .entries()
            .filter(|(row, _, _)| *row <= last)
            .map(|(_, _, e)| e.node)
            .collect();
        out.push(self.shared.own);
        out
    }

    /// Takes `node` into the routing state, at `proximity` if measured. A node not
    /// known before, with no measurement, is queued for the maintenance thread to
    /// measure. Returns true if it entered the leaf set.
    pub fn learn(&self, node: NodeInfo, proximity: Option<u64>) -> bool {
        if node.node_id == self.shared.own.node_id || !node.is_genuine() {
            return false;
        }
        let (was_known, now_leaf, leaf_len) = {
            let mut r = self.routing_mut();
            let was_known = r.knows(&node.node_id);
            let was_leaf = r.leaf_set.contains(&node.node_id);
            r.insert(node, proximity);
            let now_leaf = !was_leaf && r.leaf_set.contains(&node.node_id);
            (was_known, now_leaf, r.leaf_set.len())
        };
        if !was_known && proximity.is_none() {
            self.send(Event::Probe(node));
        }
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

    /// Forgets `id` everywhere. Returns the node on the failed side of the leaf set
    /// to ask for repair, if `id` was a leaf-set member.
    pub fn forget(&self, id: &NodeId) -> (bool, Option<NodeInfo>) {
        let mut r = self.routing_mut();
        let repair_from = if r.leaf_set.contains(id) {
            r.leaf_set.farthest_on_side_of(id)
        } else {
            None
        };
        let known = r.remove(id);
        (known, repair_from)
    }

    /// Reports that `peer` did not answer a call.
    pub fn suspect(&self, peer: NodeInfo) {
        self.send(Event::Suspect(peer));
    }

    pub(crate) fn send(&self, event: Event) {
        // The receiver is gone only when the node is shutting down.
        let _ = self.shared.events.send(event);
    }

    pub fn store_put(&self, key: &str, value: Value) {
        self.store_mut().put(key, value);
    }

    pub fn store_get(&self, key: &str) -> Option<Value> {
        self.store().get(key).cloned()
    }

    pub fn store_delete(&self, key: &str) -> bool {
        self.store_mut().delete(key)
    }

    pub fn key_count(&self) -> usize {
        self.store().len()
    }

    pub(crate) fn count_message(&self, kind: &'static str) {
        let mut m = self
            .shared
            .stats
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry(kind).or_insert(0) += 1;
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
        let messages = s
            .messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
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
        let maintenance = maintenance::spawn(node.clone(), events, transport.clone());
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

    /// Stops the server and maintenance threads and waits for them.
    pub fn shutdown(&mut self) {
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
