//! Joining: how a new node X enters the network through a node A it knows.
//!
//! The paper's procedure, as [`join`] carries it out:
//! 0. The paper assumes X knows a node A *near it* by the proximity metric, so
//!    that A's neighborhood set and routing-table row 0 are good for X too, and
//!    each later row comes from a node near the path. A user names any
//!    bootstrap, near or not; so X first runs nearest-neighbour discovery
//!    ([`discover`], from the paper's follow-up by Castro, Druschel, Hu and
//!    Rowstron, 2002) from the bootstrap, and uses the node it finds as A.
//!    Without it (`Config::discovery_width` = 0) a random bootstrap hands X
//!    state that is near the bootstrap, not X: route stretch 1.9 to 2.7 in the
//!    simulator instead of about 1.4 to 1.5 (figures in the README).
//! 1. X asks A to route a `join` message with key = X's id.
//! 2. The message travels to Z, the live node numerically closest to X. The i-th
//!    node on the path (A is the 0th) contributes its routing-table row i, whose
//!    entries share i digits with X too; Z, the last, also its deeper rows, and its
//!    leaf set; A, assumed near X, contributes its neighborhood set.
//! 3. and 4. X announces itself to every node it was told of. The announcement's
//!    round trip measures the node's proximity, so X takes each in at a measured
//!    proximity, keeping the nearest where several fit, without a separate probe.
//!    Each answers with its leaf set and the routing-table row it shares with X;
//!    the nodes named there are hearsay, measured by the maintenance thread before
//!    they enter X's state, and announced to if they enter its leaf set. This is
//!    how nodes that join at the same time, and so missed each other in step 2,
//!    find each other.
//!    Deviation: a node that discovery measured, and whose state (as its
//!    `status` showed it) has no place for X at that proximity, is not
//!    announced to: it would refuse X anyway, and skipping it saves the
//!    announcement and its dial-back.
//!
//! Cost: discovery's `status` requests come on top of the paper's join
//! (about 3 x 2^b x log16 N messages); `Config::discovery_width` caps how many
//! nodes it measures at each step, trading route stretch for messages.
//!
//! Consistency (from MSPastry): X announces itself first to the nodes nearest it,
//! Z and Z's leaf set, all at once, and is *inactive* until they have answered:
//! a request for a key X would be root of waits until then (see
//! `message_handler::deliver`), so X never answers from a half-built leaf set.
//! Deviation: MSPastry also waits for the probes of nodes those replies name
//! (nodes joining at the same time); here those are probed after activation, by
//! the maintenance thread, so two nodes joining side by side at the same moment
//! can each act as root for a key between them for a heartbeat or two.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use super::router::RoutingState;
use super::transport::{Transport, TransportError};
use super::Node;
use crate::message_handler::{Reply, Request};
use crate::utils::{NodeId, NodeInfo};

/// What a join did, for logs and the demo.
#[derive(Clone, Debug)]
pub struct JoinReport {
    /// The node numerically closest to our id when we joined.
    pub root: NodeInfo,
    /// The nodes the join message passed, bootstrap first.
    pub path: Vec<NodeInfo>,
    /// Node-to-node forwards of the join message.
    pub hops: u32,
    /// Nodes we were told about.
    pub learned: usize,
    /// Messages we sent: discovery's `status` requests, the join and the
    /// announcements.
    pub messages: usize,
}

/// Why a join failed.
#[derive(Debug)]
pub enum JoinError {
    /// The bootstrap node could not be reached.
    Unreachable(SocketAddr, TransportError),
    /// The network answered with an error.
    Refused(SocketAddr, String),
}

impl fmt::Display for JoinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinError::Unreachable(addr, e) => write!(f, "cannot join through {addr}: {e}"),
            JoinError::Refused(addr, m) => write!(f, "cannot join through {addr}: {m}"),
        }
    }
}

impl std::error::Error for JoinError {}

/// Joins the network of the node at `bootstrap`.
pub fn join(
    node: &Node,
    bootstrap: SocketAddr,
    transport: &dyn Transport,
) -> Result<JoinReport, JoinError> {
    let me = node.own();
    let boot = NodeInfo::new(bootstrap);
    if boot.node_id == me.node_id {
        return Err(JoinError::Refused(
            bootstrap,
            "that is this node's own address".into(),
        ));
    }
    // From here until our leaf set is confirmed we are inactive: a request for a
    // key we would be root of waits (see `message_handler::deliver`).
    node.set_active(false);
    // Step 0: find a node near us to join through, starting from the bootstrap.
    let found = match discover(node, boot, transport) {
        Ok(found) => found,
        Err(e) => {
            node.set_active(true);
            return Err(JoinError::Unreachable(bootstrap, e));
        }
    };
    let mut via = found.nearest;
    let mut messages = found.messages;
    let uninterested = found.uninterested;
    messages += 1;
    let reply = match transport.call(&via, &Request::Join { node: me }) {
        Ok(reply) => reply,
        // The node we found has gone since: the bootstrap will do.
        Err(_) if via.node_id != boot.node_id => {
            via = boot;
            messages += 1;
            match transport.call(&boot, &Request::Join { node: me }) {
                Ok(reply) => reply,
                Err(e) => {
                    node.set_active(true);
                    return Err(JoinError::Unreachable(bootstrap, e));
                }
            }
        }
        Err(e) => {
            node.set_active(true);
            return Err(JoinError::Unreachable(bootstrap, e));
        }
    };
    let (root, path, rows, leaf_set, neighborhood, hops) = match reply {
        Reply::Joined {
            root,
            path,
            rows,
            leaf_set,
            neighborhood,
            hops,
        } => (root, path, rows, leaf_set, neighborhood, hops),
        Reply::Error { message, .. } => {
            node.set_active(true);
            return Err(JoinError::Refused(bootstrap, message));
        }
        other => {
            node.set_active(true);
            return Err(JoinError::Refused(
                bootstrap,
                // Shown to the user: the reply as the wire had it, not Rust's debug form.
                format!(
                    "it answered the join with {}",
                    serde_json::to_string(&other).unwrap_or_else(|_| format!("{other:?}"))
                ),
            ));
        }
    };
    // Phase one, the leaf set: the root and its leaf set are the nodes nearest
    // our id. Announcing ourselves to them all at once confirms each one (it
    // answers), and their replies name any node near us that the root missed.
    // Until they have answered, we are inactive: they may route a key to us at
    // once, but we answer as its root only when our own leaf set is confirmed.
    let me_id = me.node_id;
    let mut seen: HashSet<NodeId> = HashSet::new();
    // The SHA-1 that checks an id is paid once per node, not once per mention.
    let mut fresh = |n: &NodeInfo| {
        n.node_id != me_id && !seen.contains(&n.node_id) && n.is_genuine() && seen.insert(n.node_id)
    };
    let nearest: Vec<NodeInfo> = std::iter::once(root)
        .chain(leaf_set)
        .filter(|n| fresh(n))
        .collect();
    messages += announce(node, transport, nearest.clone());
    node.set_active(true);
    // Phase two, the routing table and neighborhood set: the rest of what the
    // path told us. Each announcement measures the node's proximity too (its
    // round trip), so each candidate costs one message, not a probe and an
    // announcement. Nodes the replies name that we lack are measured by the
    // maintenance thread, and announced to if they enter our leaf set.
    let others: Vec<NodeInfo> = std::iter::once(via)
        .chain(path.iter().copied())
        .chain(rows)
        .chain(neighborhood)
        .filter(|n| !uninterested.contains(&n.node_id))
        .filter(|n| fresh(n))
        .collect();
    messages += announce(node, transport, others.clone());
    let learned = nearest.len() + others.len();
    log::info!(
        "joined through {bootstrap} in {hops} hops: id {}, leaf set {}, routing table {} entries",
        me.node_id,
        node.leaf_set_members().len(),
        node.snapshot().routing_table.len()
    );
    Ok(JoinReport {
        root,
        path,
        hops,
        learned,
        messages,
    })
}

/// Announces this node to each of `targets`, passing on the routing-table entries
/// each can use. Each target that answers is taken in at the proximity the
/// exchange measured; the nodes its reply names (its leaf set, the entries it
/// offers us) are hearsay, handed to [`Node::hear_of`]. Returns the number of
/// announcements sent.
pub fn announce(node: &Node, transport: &dyn Transport, targets: Vec<NodeInfo>) -> usize {
    announce_within(node, transport, targets, node.config().call_timeout)
}

/// [`announce`], to all targets at once, waiting at most `timeout` for each reply.
/// A target that does not answer in time is suspected.
pub fn announce_within(
    node: &Node,
    transport: &dyn Transport,
    targets: Vec<NodeInfo>,
    timeout: Duration,
) -> usize {
    announce_all(node, transport, targets, timeout, false)
}

/// The periodic routing-table refresh (Castro et al., "Exploiting network
/// proximity in peer-to-peer overlay networks", 2002): exchange a row with one
/// of its entries, and have each entry of the row it sends measured if it might
/// be nearer than the node holding its slot, so that the table keeps improving
/// its locality after the join. Each such probe is one message; the node that
/// is nearer takes the slot.
pub fn exchange_rows(node: &Node, transport: &dyn Transport, target: NodeInfo, timeout: Duration) {
    announce_all(node, transport, vec![target], timeout, true);
}

fn announce_all(
    node: &Node,
    transport: &dyn Transport,
    targets: Vec<NodeInfo>,
    timeout: Duration,
    improve: bool,
) -> usize {
    // A stopping node does not start waiting on peers.
    if node.is_stopping() {
        return 0;
    }
    let me = node.own();
    let mut done: HashSet<NodeId> = HashSet::new();
    let calls: Vec<(NodeInfo, Request)> = targets
        .into_iter()
        .filter(|t| t.node_id != me.node_id && done.insert(t.node_id))
        .map(|target| {
            let announce = Request::Announce {
                node: me,
                rows: node.shared_row(&target.node_id),
            };
            (target, announce)
        })
        .collect();
    let results = transport.call_all(&calls, timeout);
    for ((target, _), result) in calls.iter().zip(results) {
        match result {
            Ok((
                Reply::LeafSet {
                    node: from,
                    leaf_set,
                    rows,
                },
                proximity,
            )) if from.node_id == target.node_id => {
                node.heard_from(&target.node_id);
                node.learn(*target, Some(proximity));
                for n in leaf_set {
                    node.hear_of(n);
                }
                for n in rows {
                    node.hear_of(n);
                    if improve {
                        node.consider(n);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => node.suspect(*target),
        }
    }
    calls.len()
}

/// What nearest-neighbour discovery found.
#[derive(Clone, Debug)]
pub struct Discovery {
    /// The nearest node found, the one to join through.
    pub nearest: NodeInfo,
    /// Its proximity to us, as we measured it (0 when discovery is off).
    pub proximity: u64,
    /// `status` requests sent (each one also measured the node asked).
    pub messages: usize,
    /// The nodes that answered, each measured and offered to our state.
    pub measured: HashSet<NodeId>,
    /// Those of them whose state, as they showed it, has no place for us at the
    /// proximity measured: not in their leaf set's range, not nearer than the
    /// routing-table entry whose slot we would take, nor than the farthest
    /// member of their neighborhood set. Announcing ourselves to them would be
    /// refused, so the join does not (see [`join`]).
    pub uninterested: HashSet<NodeId>,
}

/// A node's state as its `status` reply shows it, for discovery: its leaf set,
/// its routing table by row and its neighborhood set, each entry with the
/// proximity the node measured to it, if any.
struct Seen {
    leaf_set: Vec<NodeInfo>,
    rows: Vec<Vec<(NodeInfo, Option<u64>)>>,
    neighborhood: Vec<(NodeInfo, Option<u64>)>,
}

impl Seen {
    /// Whether `owner`, whose state this is, would keep `node` (us) in it if we
    /// announced ourselves at proximity `p`: the same decision its own
    /// [`Node::learn`] makes, taken on a copy of the state it showed us.
    fn would_keep(&self, node: &Node, owner: NodeInfo, p: u64) -> bool {
        let c = node.config();
        let mut state = RoutingState::new(owner, c.leaf_set_size, c.neighborhood_size);
        state.leaf_set.insert_all(self.leaf_set.iter().copied());
        for (n, prox) in self.rows.iter().flatten() {
            let _ = state.routing_table.insert(*n, *prox);
        }
        for (n, prox) in &self.neighborhood {
            if let Some(prox) = prox {
                state.neighborhood.insert(*n, *prox);
            }
        }
        state.insert(node.own(), Some(p))
    }

    fn from_reply(reply: Reply, expected: &NodeId) -> Option<Seen> {
        let Reply::Status {
            node_id,
            leaf_set,
            routing_table,
            neighborhood,
            ..
        } = reply
        else {
            return None;
        };
        if node_id != *expected {
            return None;
        }
        let info = |node_id, addr| NodeInfo { node_id, addr };
        let mut rows: Vec<Vec<(NodeInfo, Option<u64>)>> = Vec::new();
        for e in routing_table {
            // Rows past the id's digits cannot exist: a reply naming one is bogus,
            // and its entry is skipped rather than trusted with a huge allocation.
            if e.row >= crate::utils::DIGITS {
                continue;
            }
            if rows.len() <= e.row {
                rows.resize(e.row + 1, Vec::new());
            }
            rows[e.row].push((info(e.node_id, e.addr), e.proximity));
        }
        Some(Seen {
            leaf_set: leaf_set
                .smaller
                .into_iter()
                .chain(leaf_set.larger)
                .collect(),
            rows,
            neighborhood: neighborhood
                .into_iter()
                .map(|m| (info(m.node_id, m.addr), Some(m.proximity)))
                .collect(),
        })
    }
}

/// Nearest-neighbour discovery (Castro, Druschel, Hu and Rowstron, "Exploiting
/// network proximity in peer-to-peer overlay networks", 2002): finds a node near
/// us, starting from `boot`, which may be anywhere.
///
/// 1. Ask the bootstrap for its state and measure the members of its leaf set:
///    their ids are close to the bootstrap's, so they are spread at random over
///    the network, and the nearest of them is a fair start.
/// 2. From the nearest node so far, walk its routing table from the bottom row up
///    to row 0: measure the row's entries and move to the nearest. Entries of the
///    bottom rows are few and far apart (they match many digits), entries of row
///    0 are the nearest nodes to their holder: the walk takes long strides first,
///    short ones last.
/// 3. At row 0, also measure the current node's neighborhood set, and repeat
///    while a nearer node turns up.
///
/// Each measurement is a `status` request: its round trip is the proximity, and
/// its reply is the state the next step needs, so no node is asked twice.
///
/// Deviations, to keep the cost near the paper's join budget: an entry is
/// measured only if the triangle inequality leaves it a chance to be nearer than
/// the current node; and at most `Config::discovery_width` nodes are measured at
/// each step, those the inequality leaves the best chance (the smallest lower
/// bound |prox(here, e) - prox(us, here)|) first. The node we stand on measured its entry e; if
/// prox(here, e) >= 2 * prox(us, here), then prox(us, e) >= prox(us, here) and e
/// is skipped. Round-trip times keep the inequality only roughly, so this may
/// skip a node that was a little nearer.
///
/// Every node measured answered as the node it was named, so it is learned at
/// its measured proximity: discovery seeds our routing table and neighborhood
/// set with near nodes before the join starts.
pub fn discover(
    node: &Node,
    boot: NodeInfo,
    transport: &dyn Transport,
) -> Result<Discovery, TransportError> {
    let me = node.own().node_id;
    let timeout = node.config().call_timeout;
    let width = node.config().discovery_width;
    if width == 0 {
        return Ok(Discovery {
            nearest: boot,
            proximity: 0,
            messages: 0,
            measured: HashSet::new(),
            uninterested: HashSet::new(),
        });
    }
    let (reply, p) = transport.call_measured(&boot, &Request::Status)?;
    let mut messages = 1;
    let Some(seen) = Seen::from_reply(reply, &boot.node_id) else {
        // Not a node we can walk from (an old version, or a liar): join through
        // it as given.
        return Ok(Discovery {
            nearest: boot,
            proximity: p,
            messages,
            measured: HashSet::new(),
            uninterested: HashSet::new(),
        });
    };
    node.learn(boot, Some(p));
    let mut uninterested: HashSet<NodeId> = HashSet::new();
    if !seen.would_keep(node, boot, p) {
        uninterested.insert(boot.node_id);
    }
    let mut asked: HashSet<NodeId> = HashSet::from([me, boot.node_id]);
    let mut here = (boot, p, seen);
    // Measures `candidates` (those not asked yet and not ruled out by the
    // triangle inequality), and moves `here` to the nearest if it is nearer.
    // Returns whether it moved.
    let mut step = |here: &mut (NodeInfo, u64, Seen),
                    candidates: Vec<(NodeInfo, Option<u64>)>,
                    messages: &mut usize| {
        let bound = here.1.saturating_mul(2);
        let mut candidates: Vec<(NodeInfo, Option<u64>)> = candidates
            .into_iter()
            .filter(|(_, from_here)| from_here.is_none_or(|d| d < bound))
            .filter(|(n, _)| !asked.contains(&n.node_id))
            .collect();
        let lower = |d: Option<u64>| d.map_or(0, |d| d.abs_diff(here.1));
        candidates.sort_by_key(|(_, d)| lower(*d));
        // The best `width` genuine ones: ids are checked in that order, so only
        // the few measured pay for the SHA-1, not the whole row.
        let calls: Vec<(NodeInfo, Request)> = candidates
            .into_iter()
            .filter(|(n, _)| n.is_genuine())
            .take(width)
            .filter(|(n, _)| asked.insert(n.node_id))
            .map(|(n, _)| (n, Request::Status))
            .collect();
        *messages += calls.len();
        let mut moved = false;
        for ((n, _), result) in calls.iter().zip(transport.call_all(&calls, timeout)) {
            let Ok((reply, p)) = result else { continue };
            let Some(seen) = Seen::from_reply(reply, &n.node_id) else {
                continue;
            };
            node.learn(*n, Some(p));
            if !seen.would_keep(node, *n, p) {
                uninterested.insert(n.node_id);
            }
            if p < here.1 {
                *here = (*n, p, seen);
                moved = true;
            }
        }
        moved
    };
    let leaf_set = here.2.leaf_set.iter().map(|n| (*n, None)).collect();
    step(&mut here, leaf_set, &mut messages);
    let mut row = here.2.rows.len().saturating_sub(1);
    loop {
        let mut candidates = here.2.rows.get(row).cloned().unwrap_or_default();
        if row == 0 {
            candidates.extend(here.2.neighborhood.iter().copied());
        }
        let moved = step(&mut here, candidates, &mut messages);
        if row > 0 {
            row -= 1;
        } else if !moved {
            break;
        }
    }
    Ok(Discovery {
        nearest: here.0,
        proximity: here.1,
        messages,
        measured: asked,
        uninterested,
    })
}
