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
//! - Tick: exchange leaf sets with every leaf-set member. This is both the
//!   heartbeat and the safety net that makes concurrent joins converge.
//!
//! Deviation: the lease-based failure detector, routing-table repair and
//! replication of the fault-tolerance work are not here yet.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::join::announce;
use super::transport::Transport;
use super::{KeyEntry, Node, ReplicationRound};
use crate::message_handler::{Reply, Request};
use crate::utils::NodeInfo;

/// What the maintenance thread is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Measure this newly learned peer.
    Probe(NodeInfo),
    /// A call to this peer failed: is it dead?
    Suspect(NodeInfo),
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
            match transport.proximity(&peer) {
                Ok(p) => {
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
            if node.knows(&peer.node_id) && transport.proximity(&peer).is_err() {
                declare_dead(node, peer, transport);
            }
        }
        Event::Tick => {
            let tick = node.next_tick();
            // The heartbeat: exchange leaf sets with every member.
            announce(node, transport, node.leaf_set_members());
            // Replication: when the leaf set has changed, some replica sets have
            // too (a newcomer became root or replica of some of our keys, or a
            // holder died): push our copies to every other member. Now and then
            // anyway, as the safety net.
            if let Some(round) = node.replication_due(tick) {
                push_replicas(node, transport, &round);
            }
            // Routing-table upkeep, one row per tick: measure every entry of the
            // row again (finding the dead, keeping proximities current), and
            // exchange rows with one of them (the paper's periodic refresh, which
            // also fills slots that no join ever filled).
            let rows = node.routing_rows_used();
            if rows > 0 {
                let row = (tick % rows as u64) as usize;
                let entries = node.routing_row(row);
                for e in &entries {
                    if node.is_stopping() {
                        return false;
                    }
                    match transport.proximity(e) {
                        Ok(p) => {
                            node.learn(*e, Some(p));
                        }
                        Err(_) => declare_dead(node, *e, transport),
                    }
                }
                let live = node.routing_row(row);
                if !live.is_empty() {
                    let pick = live[(tick / rows as u64) as usize % live.len()];
                    announce(node, transport, vec![pick]);
                }
            }
        }
        Event::Shutdown => return false,
    }
    true
}

/// Copies per `replicate` message, so that a batch stays well within the line
/// limit for small values (large ones are sent one per message).
const REPLICATE_BATCH_BYTES: usize = 256 * 1024;

/// Pushes every key we hold as root or replica to the other members of its
/// replica set, in batches. Receivers keep only what is newer than their copy.
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
    let count = entries.len();
    match transport.call(&peer, &Request::Replicate { entries }) {
        Ok(Reply::Replicated { applied, .. }) => {
            node.count_replicated(applied as u64);
            log::debug!(
                "{applied} of {count} copies taken by {}",
                peer.node_id.short()
            );
            applied
        }
        Ok(_) => 0,
        Err(_) => {
            node.suspect(peer);
            0
        }
    }
}

fn declare_dead(node: &Node, peer: NodeInfo, transport: &dyn Transport) {
    let forgotten = node.forget(&peer.node_id);
    if !forgotten.known {
        return;
    }
    node.count_peer_failed();
    log::warn!(
        "peer {} at {} failed; removed from our state",
        peer.node_id.short(),
        peer.addr
    );
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
            loop {
                // A tick is due even when events keep arriving: the heartbeat must
                // not wait for a quiet moment.
                let now = std::time::Instant::now();
                let event = if now >= next_tick {
                    next_tick = now + tick;
                    Event::Tick
                } else {
                    match events.recv_timeout(next_tick - now) {
                        Ok(e) => e,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                };
                // Stopping takes priority over whatever is still queued.
                if node.is_stopping() || !handle_event(&node, event, transport.as_ref()) {
                    return;
                }
            }
        })
}
