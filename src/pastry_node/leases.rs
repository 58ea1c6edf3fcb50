//! Leases: how a node notices that a leaf-set member has gone silent.
//!
//! MSPastry (Castro, Costa and Rowstron, "Performance and dependability of
//! structured peer-to-peer overlays", 2004) detects failures with heartbeats: a
//! member that has not been heard from for a few heartbeat periods has let its
//! *lease* lapse and is probed; if the probe is not answered either, it is
//! declared dead.
//!
//! Here every tick a node announces itself to every leaf-set member, and the
//! member's reply (or its own announcement) is the heartbeat. Any first-hand sign
//! of life renews the member's lease: a reply, an announcement, a probe answered.
//! A call that fails outright makes a node suspect its peer at once; the lease
//! catches the peer that fails *slowly*: one that takes connections or requests
//! and never answers (a host cut off, a process stopped with SIGSTOP), whose calls
//! would otherwise hang until their timeout.
//!
//! A node just declared dead may still have messages on their way to us, sent
//! before it died: MSPastry keeps such nodes in a *failed set* for a while so that
//! they are not taken back in. Here, for one lease, a recently failed node is not
//! taken back on its own word (an announcement), only when it answers a probe.
//!
//! Time is the node's tick count, passed in as `now`: the same code runs over TCP
//! (one tick per heartbeat period) and in the simulator (one tick per round), and
//! tests move the clock by hand. Pure: no clock, lock, socket or logging.

use std::collections::HashMap;

use crate::utils::{NodeId, NodeInfo};

/// When each leaf-set member was last heard from, in ticks.
#[derive(Clone, Debug, Default)]
pub struct Leases {
    last_heard: HashMap<NodeId, u64>,
    /// Nodes declared dead, and when.
    failed: HashMap<NodeId, u64>,
}

impl Leases {
    pub fn new() -> Leases {
        Leases::default()
    }

    /// `id` showed a sign of life at tick `now`.
    pub fn heard(&mut self, id: NodeId, now: u64) {
        let t = self.last_heard.entry(id).or_insert(now);
        *t = (*t).max(now);
    }

    /// The members whose lease of `lease` ticks has lapsed at tick `now`: not heard
    /// from at any of the ticks `now - lease ..= now`. A member seen here for the
    /// first time is granted a lease from `now` (it entered the leaf set because it
    /// answered us, or it will be probed soon anyway), and a node that has left the
    /// leaf set is no longer tracked.
    #[must_use]
    pub fn lapsed(&mut self, members: &[NodeInfo], now: u64, lease: u64) -> Vec<NodeInfo> {
        self.last_heard
            .retain(|id, _| members.iter().any(|m| m.node_id == *id));
        members
            .iter()
            .filter(|m| {
                let last = *self.last_heard.entry(m.node_id).or_insert(now);
                now.saturating_sub(last) > lease
            })
            .copied()
            .collect()
    }

    /// `id` was declared dead at tick `now`: its lease is void, and for one lease
    /// it is in the failed set.
    pub fn declared_dead(&mut self, id: NodeId, now: u64, lease: u64) {
        self.last_heard.remove(&id);
        self.failed.retain(|_, at| now.saturating_sub(*at) <= lease);
        self.failed.insert(id, now);
    }

    /// Whether `id` was declared dead within the last `lease` ticks.
    pub fn recently_failed(&self, id: &NodeId, now: u64, lease: u64) -> bool {
        self.failed
            .get(id)
            .is_some_and(|at| now.saturating_sub(*at) <= lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> NodeInfo {
        NodeInfo::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_member_heard_every_tick_keeps_its_lease() {
        let (a, b) = (node(1), node(2));
        let mut leases = Leases::new();
        for now in 0..100 {
            leases.heard(a.node_id, now);
            leases.heard(b.node_id, now);
            assert!(leases.lapsed(&[a, b], now, 3).is_empty(), "tick {now}");
        }
    }

    #[test]
    fn a_silent_member_lapses_after_the_lease_and_not_before() {
        let (a, b) = (node(1), node(2));
        let mut leases = Leases::new();
        leases.heard(a.node_id, 10);
        leases.heard(b.node_id, 10);
        for now in 11..=13 {
            leases.heard(a.node_id, now);
            assert!(leases.lapsed(&[a, b], now, 3).is_empty(), "tick {now}");
        }
        // b was last heard at 10: at 14 that is 4 ticks ago, more than 3.
        leases.heard(a.node_id, 14);
        assert_eq!(leases.lapsed(&[a, b], 14, 3), vec![b]);
        // Heard again, it is in good standing once more.
        leases.heard(b.node_id, 15);
        assert!(leases.lapsed(&[a, b], 15, 3).is_empty());
    }

    #[test]
    fn a_new_member_is_granted_a_lease_from_when_it_is_first_seen() {
        let a = node(1);
        let mut leases = Leases::new();
        assert!(leases.lapsed(&[a], 50, 3).is_empty());
        assert!(leases.lapsed(&[a], 53, 3).is_empty());
        assert_eq!(leases.lapsed(&[a], 54, 3), vec![a]);
    }

    #[test]
    fn a_node_that_left_the_leaf_set_starts_afresh_when_it_returns() {
        let a = node(1);
        let mut leases = Leases::new();
        leases.heard(a.node_id, 0);
        // Out of the leaf set for a long while, then back in.
        assert!(leases.lapsed(&[], 1, 3).is_empty());
        assert!(leases.lapsed(&[a], 100, 3).is_empty());
    }

    #[test]
    fn a_failed_node_stays_in_the_failed_set_for_one_lease() {
        let a = node(1);
        let mut leases = Leases::new();
        leases.heard(a.node_id, 7);
        leases.declared_dead(a.node_id, 10, 3);
        for now in 10..=13 {
            assert!(leases.recently_failed(&a.node_id, now, 3), "tick {now}");
        }
        assert!(!leases.recently_failed(&a.node_id, 14, 3));
        assert!(!leases.recently_failed(&node(2).node_id, 10, 3));
        // Its old lease is gone: back in the leaf set, it starts afresh.
        assert!(leases.lapsed(&[a], 20, 3).is_empty());
    }

    #[test]
    fn late_news_never_moves_the_clock_back() {
        let a = node(1);
        let mut leases = Leases::new();
        leases.heard(a.node_id, 20);
        leases.heard(a.node_id, 5);
        assert!(leases.lapsed(&[a], 23, 3).is_empty());
    }
}
