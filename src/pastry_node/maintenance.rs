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
use super::Node;
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
            if node.knows(&peer.node_id) {
                match transport.proximity(&peer) {
                    Ok(p) => {
                        node.learn(peer, Some(p));
                    }
                    Err(_) => declare_dead(node, peer, transport),
                }
            }
        }
        Event::Suspect(peer) => {
            if node.knows(&peer.node_id) && transport.proximity(&peer).is_err() {
                declare_dead(node, peer, transport);
            }
        }
        Event::Tick => {
            announce(node, transport, node.leaf_set_members());
        }
        Event::Shutdown => return false,
    }
    true
}

fn declare_dead(node: &Node, peer: NodeInfo, transport: &dyn Transport) {
    let (known, repair_from) = node.forget(&peer.node_id);
    if !known {
        return;
    }
    node.count_peer_failed();
    log::warn!(
        "peer {} at {} failed; removed from our state",
        peer.node_id.short(),
        peer.addr
    );
    if let Some(from) = repair_from {
        announce(node, transport, vec![from]);
    }
}

/// Starts the maintenance thread of `node`.
pub fn spawn(node: Node, events: Receiver<Event>, transport: Arc<dyn Transport>) -> JoinHandle<()> {
    let tick = node.config().tick;
    std::thread::Builder::new()
        .name(format!("maintenance-{}", node.own().addr.port()))
        .spawn(move || {
            let mut next_tick = std::time::Instant::now() + tick;
            loop {
                let wait = next_tick.saturating_duration_since(std::time::Instant::now());
                let event = match events.recv_timeout(wait) {
                    Ok(e) => e,
                    Err(RecvTimeoutError::Timeout) => {
                        next_tick = std::time::Instant::now() + tick;
                        Event::Tick
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                };
                if !handle_event(&node, event, transport.as_ref()) {
                    return;
                }
            }
        })
        .expect("cannot start the maintenance thread")
}
