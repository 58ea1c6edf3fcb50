//! The maintenance thread: keeps the routing state true while peers come and go.
//!
//! It is fed by a crossbeam channel of [`Event`]s: a peer to measure (a newcomer we
//! learned of without knowing its proximity), a peer suspected dead (a call to it
//! failed), a timer tick, shutdown. Each event is handled by [`handle_event`], which
//! the simulator calls too.
//!
//! - Probe: measure the peer's proximity and offer it to R and M again at that
//!   proximity, so that nearer nodes win routing-table slots (the paper's locality).
//! - Suspect: ping the peer once more; if it stays silent, forget it everywhere and,
//!   if it was in the leaf set, repair the leaf set the paper's way: ask the farthest
//!   live member on the failed node's side for its leaf set.
//! - Tick: exchange leaf sets with every leaf-set member, all at once. This is
//!   both the heartbeat and the safety net that makes concurrent joins converge.
//!   A member whose lease has lapsed (no sign of life for `lease_ticks`
//!   heartbeats, see [`super::leases`]) is probed first. Heartbeats and probes wait
//!   no longer than a lease, so a peer that takes connections and never answers
//!   is found out within a few heartbeats, not after a call's long timeout.
//!   Also each tick: replication when the leaf set changed (anti-entropy every
//!   few ticks), the re-measurement of one routing-table row and of one
//!   neighborhood-set member, and every few ticks one node declared dead lately
//!   tried again, which is how the two sides of a network partition find each
//!   other once it ends (see `retry_departed`).
//!
//! Deviation: MSPastry sends heartbeats one way, to the left neighbour only, and
//! probes on a lapsed lease; here every exchange is a request and its reply, so
//! each member is heard from at every heartbeat and a lease only lapses when the
//! replies stop.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::join::{announce, announce_within, exchange_rows};
use super::transport::Transport;
use super::{KeyEntry, Node, ReplicationDue, ReplicationRound};
use crate::message_handler::{Reply, Request};
use crate::utils::NodeInfo;

/// What the maintenance thread is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Measure this newly learned peer.
    Probe(NodeInfo),
    /// A call to this peer failed: is it dead?
    Suspect(NodeInfo),
    /// Several suspected peers, probed all at once: the maintenance thread
    /// gathers the `Suspect` events waiting in its queue into one, so that a node
    /// that loses many peers at once (its side of a partition) waits one probe
    /// time for them all, not one per peer.
    SuspectAll(Vec<NodeInfo>),
    /// Periodic work.
    Tick,
    /// Stop the thread.
    Shutdown,
}

/// Handles one event. Returns false on `Shutdown`.
pub fn handle_event(node: &Node, event: Event, transport: &dyn Transport) -> bool {
    match event {
        Event::Probe(peer) => {
            if !node.probe_still_useful(&peer.node_id) || !peer.is_genuine() {
                return true;
            }
            match transport.proximity_within(&peer, lease(node)) {
                Ok(p) => {
                    node.heard_from(&peer.node_id);
                    // A new leaf-set member must hear of us too, or its leaf set
                    // would stay without us.
                    if node.learn(peer, Some(p)) {
                        announce(node, transport, vec![peer]);
                    }
                }
                Err(_) => declare_dead(node, peer, transport),
            }
        }
        Event::Suspect(peer) => {
            return handle_event(node, Event::SuspectAll(vec![peer]), transport)
        }
        Event::SuspectAll(peers) => {
            let peers: Vec<NodeInfo> = peers
                .into_iter()
                .filter(|p| node.knows(&p.node_id))
                .collect();
            let answers = transport.proximity_all(&peers, lease(node));
            for (peer, answer) in peers.into_iter().zip(answers) {
                match answer {
                    Ok(_) => {
                        // Alive: a notice that it was leaving was early, or forged.
                        node.take_leaving(&peer.node_id);
                        node.heard_from(&peer.node_id);
                    }
                    Err(_) => declare_dead(node, peer, transport),
                }
            }
        }
        Event::Tick => {
            let tick = node.next_tick();
            // Members that have let their lease lapse are probed, and declared dead
            // if the probe fails too.
            let lapsed = node.lapsed_leases();
            if !lapsed.is_empty() {
                log::debug!("{} leases lapsed; probing them", lapsed.len());
                handle_event(node, Event::SuspectAll(lapsed), transport);
            }
            // The heartbeat: exchange leaf sets with every member, all at once, each
            // given no longer than a lease to answer.
            announce_within(node, transport, node.leaf_set_members(), lease(node));
            // Replication: when the leaf set has changed, some replica sets have
            // too (a newcomer became root or replica of some of our keys, or a
            // holder died): push our copies to the members new to their sets.
            // Now and then, anti-entropy with every member, as the safety net.
            match node.replication_due(tick) {
                Some(ReplicationDue::AntiEntropy) => anti_entropy(node, transport),
                Some(ReplicationDue::Push(round)) => push_replicas(node, transport, &round),
                None => {}
            }
            // Routing-table upkeep, one row per tick: measure every entry of the
            // row again (finding the dead, keeping proximities current), and
            // exchange rows with one of them (the paper's periodic refresh, which
            // also fills slots that no join ever filled).
            let rows = node.routing_rows_used();
            if rows > 0 {
                let row = (tick % rows as u64) as usize;
                let entries = node.routing_row(row);
                if node.is_stopping() {
                    return false;
                }
                let answers = transport.proximity_all(&entries, lease(node));
                for (e, answer) in entries.into_iter().zip(answers) {
                    match answer {
                        Ok(p) => {
                            node.heard_from(&e.node_id);
                            node.learn(e, Some(p));
                        }
                        Err(_) => declare_dead(node, e, transport),
                    }
                }
                let live = node.routing_row(row);
                if !live.is_empty() {
                    let pick = live[(tick / rows as u64) as usize % live.len()];
                    exchange_rows(node, transport, pick, lease(node));
                }
            }
            // The neighborhood set: the paper has a node check its members
            // periodically. One member per tick, in turn; the round trip also
            // keeps its proximity current. (Nothing else ever contacts a member
            // that is in neither L nor R, so without this a dead one stays.)
            let m = node.neighborhood_members();
            if !m.is_empty() && !node.is_stopping() {
                let peer = m[tick as usize % m.len()];
                match transport.proximity_within(&peer, lease(node)) {
                    Ok(p) => {
                        node.learn(peer, Some(p));
                    }
                    Err(_) => declare_dead(node, peer, transport),
                }
            }
            if tick % RETRY_DEPARTED_TICKS == RETRY_DEPARTED_TICKS - 1 && !node.is_stopping() {
                retry_departed(node, transport, tick);
            }
        }
        Event::Shutdown => return false,
    }
    true
}

/// The most a heartbeat or a probe waits for an answer: a lease (`lease_ticks`
/// heartbeats), but never less than [`MIN_PROBE_WAIT`], nor more than a call's
/// timeout.
fn lease(node: &Node) -> std::time::Duration {
    let c = node.config();
    let lease = c
        .tick
        .saturating_mul(c.lease_ticks.clamp(1, u32::MAX as u64) as u32);
    lease.max(MIN_PROBE_WAIT).min(c.call_timeout)
}

/// TCP resends a lost connection request after 1 s, and lost data after at
/// least 200 ms: on a link that loses packets, a wait shorter than this would
/// take a live peer for dead (with 100 ms heartbeats and 10% loss, the hosts
/// test saw 14 such false deaths with a 300 ms wait, against 1 or 2 with this).
const MIN_PROBE_WAIT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Every this many ticks, one node declared dead lately is tried again.
const RETRY_DEPARTED_TICKS: u64 = 10;

/// A node declared dead is tried again for this many ticks after its death
/// (an hour at the default tick of 1 s); after that it is forgotten for good.
pub const DEPARTED_KEPT_TICKS: u64 = 3600;

/// Partition healing: tries one node declared dead lately (the one tried least
/// recently) again. If it answers, the network was partitioned rather than the
/// node dead: we take it back and announce ourselves to it, and the leaf sets
/// the two exchange bring each side the other's nodes, whose own leaf-set
/// exchanges then merge the two rings.
///
/// Why it is needed: when a link fails, the nodes on each side declare the
/// other side's nodes dead and forget them everywhere, leaf set, routing table
/// and neighborhood set alike, as the paper has it. Once that is done, no node
/// on either side knows anyone on the other, and nothing in the paper's
/// protocol makes them meet again when the link returns: the two halves would
/// stay two networks for ever, each the root of every key in its own eyes. The
/// paper does not treat partitions; FreePastry has a "partition handler" that
/// likewise pings nodes it has lost and its bootstrap nodes. Deviation: this
/// remembers at most |L| dead nodes for [`DEPARTED_KEPT_TICKS`], so a
/// partition that lasts longer, or in which more than |L| nodes died after the
/// other side's, is not healed without restarting a node with a bootstrap on
/// the other side.
fn retry_departed(node: &Node, transport: &dyn Transport, tick: u64) {
    let Some((peer, since)) = node.next_departed(tick.saturating_sub(DEPARTED_KEPT_TICKS)) else {
        return;
    };
    match transport.proximity_within(&peer, lease(node)) {
        Ok(p) => {
            log::info!(
                "peer {} at {}, declared dead earlier, answers again: taking it back",
                peer.node_id.short(),
                peer.addr
            );
            node.learn(peer, Some(p));
            announce(node, transport, vec![peer]);
        }
        Err(_) => node.remember_departed(peer, since),
    }
}

/// Copies per `replicate` message, so that a batch stays well within the line
/// limit for small values (large ones are sent one per message).
const REPLICATE_BATCH_BYTES: usize = 256 * 1024;

/// Pushes every key we hold as root or replica to the other members of its
/// replica set, in batches. Receivers keep only what ranks above their copy
/// (see `store::rank`).
fn push_replicas(node: &Node, transport: &dyn Transport, round: &ReplicationRound) {
    for (peer, entries) in node.replication_batches(round) {
        for chunk in batches(entries) {
            if node.is_stopping() {
                return;
            }
            send_batch(node, transport, peer, chunk);
        }
    }
}

/// The periodic safety net (see [`super::anti_entropy`]):
/// 1. with each leaf-set member, compare digests of the copies both should
///    hold, and send the copies in the buckets that differ;
/// 2. hand each copy we hold but no longer should (nodes joined between us and
///    its key) to its replica set, and drop it once every member has taken it;
/// 3. (first of all) drop tombstones older than their lifetime.
fn anti_entropy(node: &Node, transport: &dyn Transport) {
    // First, so that the digests made next (and cached) are not made stale by it.
    node.expire_tombstones();
    let me = node.own();
    let mut sent = 0;
    for (peer, digest) in node.digests() {
        if node.is_stopping() {
            return;
        }
        let buckets = digest.buckets.len();
        let request = Request::Digest {
            node: me,
            buckets: digest.buckets,
        };
        match transport.call(&peer, &request) {
            Ok(Reply::DigestDiff { differing }) if !differing.is_empty() => {
                let entries = node.shared_entries(&peer.node_id, buckets, &differing);
                sent += entries.len();
                for chunk in batches(entries) {
                    send_batch(node, transport, peer, chunk);
                }
            }
            Ok(_) => {}
            Err(_) => node.suspect(peer),
        }
    }
    if sent > 0 {
        log::info!("anti-entropy: sent {sent} copies whose digests differed");
    }

    // Copies we no longer need: grouped by receiver, then each dropped only if
    // every member of its replica set took the batch that carried it.
    let stale = node.stale_copies();
    if stale.is_empty() {
        return;
    }
    let mut per_peer: std::collections::HashMap<NodeInfo, Vec<KeyEntry>> = Default::default();
    for (entry, set) in &stale {
        for peer in set {
            per_peer.entry(*peer).or_default().push(entry.clone());
        }
    }
    let mut failed: std::collections::HashSet<NodeInfo> = Default::default();
    for (peer, entries) in per_peer {
        for chunk in batches(entries) {
            if node.is_stopping() {
                return;
            }
            if !send_batch_ok(node, transport, peer, chunk) {
                failed.insert(peer);
            }
        }
    }
    let dropped = stale
        .iter()
        .filter(|(_, set)| !set.iter().any(|p| failed.contains(p)))
        .filter(|(e, _)| node.drop_copy(&e.key, &e.entry))
        .count();
    if dropped > 0 {
        log::info!("dropped {dropped} copies now held by their replica sets");
    }
}

/// A leaving node's hand-off: every key it holds goes to the nodes that hold it
/// once it has gone. Returns how many copies were taken.
pub fn hand_off(node: &Node, transport: &dyn Transport) -> usize {
    let mut taken = 0;
    for (peer, entries) in node.replication_batches(&ReplicationRound::Leaving) {
        for chunk in batches(entries) {
            taken += send_batch(node, transport, peer, chunk);
        }
    }
    if taken > 0 {
        log::info!("handed {taken} copies to the nodes that keep our keys");
    }
    taken
}

/// Splits `entries` into `replicate` messages of about REPLICATE_BATCH_BYTES.
fn batches(entries: Vec<KeyEntry>) -> Vec<Vec<KeyEntry>> {
    let mut out = Vec::new();
    let mut batch: Vec<KeyEntry> = Vec::new();
    let mut bytes = 0;
    for e in entries {
        let size = e.key.len() + serde_json::to_string(&e.entry.value).map_or(0, |v| v.len());
        if !batch.is_empty() && bytes + size > REPLICATE_BATCH_BYTES {
            out.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += size;
        batch.push(e);
    }
    if !batch.is_empty() {
        out.push(batch);
    }
    out
}

/// Sends one batch of copies; returns how many the peer took.
fn send_batch(
    node: &Node,
    transport: &dyn Transport,
    peer: NodeInfo,
    entries: Vec<KeyEntry>,
) -> usize {
    send(node, transport, peer, entries).map_or(0, |(applied, _)| applied)
}

/// Sends one batch of copies; returns whether the peer answered that it holds
/// every one of them now (each taken, or a copy that ranks at least as high held
/// already), none refused (a full store refuses).
fn send_batch_ok(
    node: &Node,
    transport: &dyn Transport,
    peer: NodeInfo,
    entries: Vec<KeyEntry>,
) -> bool {
    send(node, transport, peer, entries).is_some_and(|(_, refused)| refused == 0)
}

/// Sends one batch of copies; returns how many the peer took and refused.
fn send(
    node: &Node,
    transport: &dyn Transport,
    peer: NodeInfo,
    entries: Vec<KeyEntry>,
) -> Option<(usize, usize)> {
    let count = entries.len();
    match transport.call(&peer, &Request::Replicate { entries }) {
        // A peer that holds a copy outranking ours (`stale`) has something newer
        // than what we would hand over: ours may go.
        Ok(Reply::Replicated {
            applied, refused, ..
        }) => {
            node.count_replicated(applied as u64);
            log::debug!(
                "{applied} of {count} copies taken by {} ({refused} refused)",
                peer.node_id.short()
            );
            Some((applied, refused))
        }
        Ok(_) => None,
        Err(_) => {
            node.suspect(peer);
            None
        }
    }
}

fn declare_dead(node: &Node, peer: NodeInfo, transport: &dyn Transport) {
    let left = node.take_leaving(&peer.node_id);
    let forgotten = node.forget(&peer.node_id);
    if !forgotten.known {
        return;
    }
    if left {
        // It said goodbye: nothing failed, and there is no partition to heal by
        // trying it again later.
        log::info!(
            "peer {} at {} left the network; removed from our state",
            peer.node_id.short(),
            peer.addr
        );
    } else {
        node.count_peer_failed();
        node.remember_departed(peer, node.ticks());
        log::warn!(
            "peer {} at {} failed; removed from our state",
            peer.node_id.short(),
            peer.addr
        );
    }
    // An announcement is how we ask: its reply carries the target's leaf set and
    // the rows of its routing table that we can use.
    let ask: Vec<NodeInfo> = forgotten
        .leaf_set_repair
        .into_iter()
        .chain(forgotten.table_repair)
        .collect();
    if !ask.is_empty() {
        announce(node, transport, ask);
    }
}

/// The last step of a graceful leave, once the node's port is closed: tells every
/// node in its state that it is leaving, all at once, each given a lease to
/// answer. Returns how many answered. Best effort: a node not told (or not in
/// our state, though we are in its) finds out by its lease, as for a failure.
pub fn say_goodbye(node: &Node, transport: &dyn Transport) -> usize {
    let me = node.own();
    let calls: Vec<(NodeInfo, Request)> = node
        .known_nodes()
        .into_iter()
        .map(|peer| (peer, Request::Leave { node: me }))
        .collect();
    let told = transport
        .call_all(&calls, lease(node))
        .iter()
        .filter(|r| r.is_ok())
        .count();
    log::info!("told {told} of {} nodes that we are leaving", calls.len());
    told
}

/// Starts the maintenance thread of `node`.
pub fn spawn(
    node: Node,
    events: Receiver<Event>,
    transport: Arc<dyn Transport>,
) -> std::io::Result<JoinHandle<()>> {
    let tick = node.config().tick;
    std::thread::Builder::new()
        .name(format!("maintenance-{}", node.own().addr.port()))
        .spawn(move || {
            let mut next_tick = std::time::Instant::now() + tick;
            // An event taken from the queue while gathering suspects, not yet handled.
            let mut held: Option<Event> = None;
            loop {
                // A tick is due even when events keep arriving: the heartbeat must
                // not wait for a quiet moment.
                let now = std::time::Instant::now();
                let event = if let Some(e) = held.take() {
                    e
                } else if now >= next_tick {
                    Event::Tick
                } else {
                    match events.recv_timeout(next_tick - now) {
                        Ok(e) => e,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                };
                // Suspects waiting behind this one are probed together with it;
                // the first other event waits for the next turn.
                let event = match event {
                    Event::Suspect(first) => {
                        let mut peers = vec![first];
                        while let Ok(next) = events.try_recv() {
                            match next {
                                Event::Suspect(p) if !peers.contains(&p) => peers.push(p),
                                Event::Suspect(_) => {}
                                other => {
                                    held = Some(other);
                                    break;
                                }
                            }
                        }
                        Event::SuspectAll(peers)
                    }
                    other => other,
                };
                let is_tick = event == Event::Tick;
                // Stopping takes priority over whatever is still queued.
                if node.is_stopping() || !handle_event(&node, event, transport.as_ref()) {
                    return;
                }
                // The next tick comes a period after this one ended, and no sooner
                // than this one took. A tick that waits on silent peers (a
                // heartbeat to a dead leaf-set member lasts the whole call
                // timeout) can take far longer than the period; counted from its
                // start, the next tick would be due at once, every time, and the
                // `Suspect` events the heartbeat queued would never be handled:
                // dead peers would never be declared dead. This way events get at
                // least as much of the thread's time as ticks do.
                if is_tick {
                    let took = now.elapsed();
                    next_tick = std::time::Instant::now() + tick.max(took);
                }
            }
        })
}
