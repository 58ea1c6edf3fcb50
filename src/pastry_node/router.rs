//! The routing decision: where a message with key D goes next from node A.
//!
//! The paper's procedure (Rowstron and Druschel, Table 1), as `route` implements it:
//! 1. If D lies within the range of the leaf set, deliver to the member of L ∪ {A}
//!    whose id is numerically closest to D (ties toward the smaller id). If that is
//!    A, A is the root of D.
//! 2. Otherwise let l = shl(D, A). If `R[l][D_l]` exists, forward to it: the next node
//!    shares at least one more digit with D.
//! 3. The rare case: forward to any known node T (in L, R or M) that shares at least
//!    l digits with D and is numerically closer to D than A. Of those, this code takes
//!    the numerically closest (the paper allows any). If there is none, A is the root.
//!
//! Every forward either lengthens the shared prefix (case 2) or keeps it and brings
//! the message strictly closer to D (cases 1 and 3), which is why routing terminates.
//!
//! The caller may pass a `skip` predicate: nodes it has just found unreachable, so
//! that a message is routed around them at this hop (MSPastry's per-hop retry).
//!
//! Pure: no sockets, locks, clocks or logging.

use super::leaf_set::LeafSet;
use super::neighborhood::NeighborhoodSet;
use super::routing_table::{InsertResult, RoutingTable};
use crate::utils::{closer_to, shl, NodeId, NodeInfo};

/// Which of the paper's three cases chose the next hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    LeafSet,
    RoutingTable,
    RareCase,
}

/// The routing decision.
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// This node is the root of the key.
    Deliver,
    /// Send the message on to `next`.
    Forward { next: NodeInfo, via: Via },
}

/// Everything a node knows about other nodes: L, R and M.
#[derive(Clone, Debug)]
pub struct RoutingState {
    pub own: NodeInfo,
    pub leaf_set: LeafSet,
    pub routing_table: RoutingTable,
    pub neighborhood: NeighborhoodSet,
}

impl RoutingState {
    pub fn new(own: NodeInfo, leaf_set_size: usize, neighborhood_size: usize) -> RoutingState {
        RoutingState {
            own,
            leaf_set: LeafSet::new(own.node_id, leaf_set_size),
            routing_table: RoutingTable::new(own.node_id),
            neighborhood: NeighborhoodSet::new(own.node_id, neighborhood_size),
        }
    }

    /// Routes a message for `key`, passing over nodes for which `skip` is true.
    pub fn route(&self, key: &NodeId, skip: impl Fn(&NodeId) -> bool) -> Route {
        let own = self.own.node_id;
        // Case 1: the key is within the leaf set's range.
        if self.leaf_set.covers(key) {
            return match self.leaf_set.closest(key, &skip) {
                None => Route::Deliver,
                Some(next) => Route::Forward {
                    next,
                    via: Via::LeafSet,
                },
            };
        }
        // Case 2: the routing table entry that matches one more digit.
        let l = shl(key, &own);
        if l == crate::utils::DIGITS {
            return Route::Deliver;
        }
        if let Some(e) = self.routing_table.get(l, key.digit(l)) {
            if !skip(&e.node.node_id) {
                return Route::Forward {
                    next: e.node,
                    via: Via::RoutingTable,
                };
            }
        }
        // Case 3, the rare case: any known node at least as good in prefix and
        // strictly closer numerically.
        let best = self
            .known()
            .filter(|t| !skip(&t.node_id))
            .filter(|t| shl(&t.node_id, key) >= l && closer_to(key, &t.node_id, &own).is_lt())
            .min_by(|a, b| closer_to(key, &a.node_id, &b.node_id));
        match best {
            Some(next) => Route::Forward {
                next: *next,
                via: Via::RareCase,
            },
            None => Route::Deliver,
        }
    }

    /// Every node in L, R and M (a node may be listed more than once).
    pub fn known(&self) -> impl Iterator<Item = &NodeInfo> {
        self.leaf_set
            .members()
            .chain(self.routing_table.entries().map(|(_, _, e)| &e.node))
            .chain(self.neighborhood.members().iter().map(|(n, _)| n))
    }

    /// Every node in L, R and M, each once.
    pub fn known_unique(&self) -> Vec<NodeInfo> {
        let mut v: Vec<NodeInfo> = self.known().copied().collect();
        v.sort_by_key(|n| n.node_id);
        v.dedup_by_key(|n| n.node_id);
        v
    }

    /// The entry for `id` in L, R or M.
    pub fn find(&self, id: &NodeId) -> Option<NodeInfo> {
        if let Some((row, col)) = self.routing_table.slot_of(id) {
            if let Some(e) = self.routing_table.get(row, col) {
                if e.node.node_id == *id {
                    return Some(e.node);
                }
            }
        }
        self.leaf_set
            .members()
            .chain(self.neighborhood.members().iter().map(|(n, _)| n))
            .find(|n| n.node_id == *id)
            .copied()
    }

    pub fn knows(&self, id: &NodeId) -> bool {
        // The routing table answers in constant time; the sets are scanned.
        self.routing_table.contains(id)
            || self.leaf_set.contains(id)
            || self.neighborhood.contains(id)
    }

    /// The measured proximity of `id`, if R or M holds one.
    pub fn proximity_of(&self, id: &NodeId) -> Option<u64> {
        self.neighborhood.proximity_of(id).or_else(|| {
            let (row, col) = self.routing_table.slot_of(id)?;
            let e = self.routing_table.get(row, col)?;
            if e.node.node_id == *id {
                e.proximity
            } else {
                None
            }
        })
    }

    /// Whether an unmeasured `node` would enter L or R: it belongs in the leaf set
    /// and is not there yet, or in an empty routing-table slot. (Unmeasured nodes
    /// never displace a routing-table entry and never enter M.)
    pub fn would_take(&self, node: &NodeId) -> bool {
        *node != self.own.node_id
            && (self.leaf_set.would_take(node) || self.routing_table.is_vacant_for(node))
    }

    /// Offers `node` to L, R and M (M only when its proximity is measured).
    /// Returns true if any of them changed.
    pub fn insert(&mut self, node: NodeInfo, proximity: Option<u64>) -> bool {
        if node.node_id == self.own.node_id {
            return false;
        }
        let in_leaf = self.leaf_set.insert(node);
        let in_table = !matches!(
            self.routing_table.insert(node, proximity),
            InsertResult::Ignored
        );
        let in_m = proximity.is_some_and(|p| self.neighborhood.insert(node, p));
        in_leaf || in_table || in_m
    }

    /// Forgets the node `id` everywhere. Returns true if it was known.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let a = self.leaf_set.remove(id);
        let b = self.routing_table.remove(id);
        let c = self.neighborhood.remove(id);
        a || b || c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pastry_node::leaf_set;

    fn n(hex: &str) -> NodeInfo {
        NodeInfo {
            node_id: format!("{hex:0<40}").parse().unwrap(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    fn id(hex: &str) -> NodeId {
        n(hex).node_id
    }

    fn state(own: &str, others: &[&str], leaf: usize) -> RoutingState {
        let mut s = RoutingState::new(n(own), leaf, 32);
        for o in others {
            s.insert(n(o), None);
        }
        s
    }

    #[test]
    fn the_three_cases() {
        // Leaf set of 2 around 80: 7f and 81. Routing table holds the rest.
        let s = state("80", &["7f", "81", "3", "c", "85", "8f"], 2);
        assert_eq!(s.leaf_set.len(), 2);
        let none = |_: &NodeId| false;
        // Case 1: within the leaf set's range.
        assert_eq!(s.route(&id("8002"), none), Route::Deliver);
        assert_eq!(
            s.route(&id("80ff"), none),
            Route::Forward {
                next: n("81"),
                via: Via::LeafSet
            }
        );
        // Case 2: one more digit from the routing table.
        assert_eq!(
            s.route(&id("31"), none),
            Route::Forward {
                next: n("3"),
                via: Via::RoutingTable
            }
        );
        assert_eq!(
            s.route(&id("8f1"), none),
            Route::Forward {
                next: n("8f"),
                via: Via::RoutingTable
            }
        );
        // Case 3: R[0][d] is empty for "d...", so any closer node with shl >= 0:
        // "c" is the closest known.
        assert_eq!(
            s.route(&id("d"), none),
            Route::Forward {
                next: n("c"),
                via: Via::RareCase
            }
        );
        // The rare case with an empty R[0][9]: the leaf-set member 81 is closer.
        let sparse = state("80", &["7f", "81", "3"], 2);
        assert_eq!(
            sparse.route(&id("90"), none),
            Route::Forward {
                next: n("81"),
                via: Via::RareCase
            }
        );
    }

    #[test]
    fn skip_routes_around_a_dead_hop() {
        let s = state("80", &["7f", "81", "3", "2f", "c"], 2);
        let dead = id("3");
        let r = s.route(&id("31"), |x| *x == dead);
        assert_eq!(
            r,
            Route::Forward {
                next: n("2f"),
                via: Via::RareCase
            }
        );
    }

    /// Property: every forward strictly lengthens the shared prefix or strictly
    /// shortens the numeric distance; and routing over a network whose state
    /// was built by insertion ends at the brute-force root.
    #[test]
    fn every_forward_improves_and_routing_reaches_the_root() {
        let all: Vec<NodeInfo> = (0..300)
            .map(|i| {
                NodeInfo::new(
                    format!("127.0.0.{}:{}", i % 200 + 1, 2000 + i)
                        .parse()
                        .unwrap(),
                )
            })
            .collect();
        // Each node knows a pseudo-random third of the others plus its ideal leaf set.
        let states: Vec<RoutingState> = all
            .iter()
            .enumerate()
            .map(|(i, me)| {
                let mut s = RoutingState::new(*me, 16, 32);
                for (j, o) in all.iter().enumerate() {
                    if (i * 7 + j * 13) % 3 == 0 {
                        s.insert(*o, Some(((i * 31 + j * 17) % 97) as u64));
                    }
                }
                for o in leaf_set::ideal(me.node_id, 16, &all).members() {
                    s.insert(*o, None);
                }
                s
            })
            .collect();
        let index = |id: &NodeId| all.iter().position(|n| n.node_id == *id).unwrap();
        for k in 0..500 {
            let key = NodeId::for_key(&format!("key{k}"));
            let root = all
                .iter()
                .min_by(|a, b| closer_to(&key, &a.node_id, &b.node_id))
                .unwrap();
            let mut at = k % all.len();
            let mut hops = 0;
            loop {
                let here = all[at].node_id;
                match states[at].route(&key, |_| false) {
                    Route::Deliver => break,
                    Route::Forward { next, .. } => {
                        let (p0, p1) = (shl(&here, &key), shl(&next.node_id, &key));
                        assert!(
                            p1 > p0 || closer_to(&key, &next.node_id, &here).is_lt(),
                            "a forward that does not improve"
                        );
                        at = index(&next.node_id);
                        hops += 1;
                        assert!(hops < 20);
                    }
                }
            }
            assert_eq!(all[at].node_id, root.node_id, "key {k} misdelivered");
        }
    }
}
