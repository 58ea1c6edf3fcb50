//! The leaf set L: the nodes whose ids are nearest to ours on the ring.
//!
//! The paper: "the set of nodes with the |L|/2 numerically closest larger nodeIds,
//! and the |L|/2 numerically closest smaller nodeIds". The leaf set decides the last
//! hop of every route, so it must be exact; this module keeps it so.
//!
//! How this code reads the paper, point by point:
//! - "Larger" and "smaller" are taken on the ring: the `larger` side holds the nodes
//!   reached first going clockwise (increasing ids, wrapping past 2^160 - 1 to 0), the
//!   `smaller` side those reached first going counter-clockwise.
//! - No node appears twice and we never appear in our own leaf set. In a network of
//!   at most |L| + 1 nodes every other node is a member; the `larger` side is filled
//!   first and the `smaller` side takes the rest (the paper does not say; FreePastry
//!   lets one node sit on both sides, which this code avoids so that every member has
//!   exactly one place).
//! - Each insertion recomputes both sides from the current members plus the new node.
//!   Because each side keeps the |L|/2 nearest in its direction, the result equals the
//!   ideal leaf set of every node ever inserted (minus removed ones): nothing a later
//!   insertion needs has been thrown away.
//!
//! Pure: no sockets, locks, clocks or logging.

use crate::utils::{closer_to, in_arc, NodeId, NodeInfo};

/// The leaf set of the node `own`.
#[derive(Clone, Debug)]
pub struct LeafSet {
    own: NodeId,
    /// |L|/2: the capacity of each side.
    half: usize,
    /// Nearest first, going counter-clockwise from `own`.
    smaller: Vec<NodeInfo>,
    /// Nearest first, going clockwise from `own`.
    larger: Vec<NodeInfo>,
}

impl LeafSet {
    /// An empty leaf set of total size `size` (|L|, even, at least 2).
    pub fn new(own: NodeId, size: usize) -> LeafSet {
        let half = (size / 2).max(1);
        LeafSet {
            own,
            half,
            smaller: Vec::with_capacity(half),
            larger: Vec::with_capacity(half),
        }
    }

    /// |L|, the configured size.
    pub fn capacity(&self) -> usize {
        2 * self.half
    }

    pub fn smaller(&self) -> &[NodeInfo] {
        &self.smaller
    }

    pub fn larger(&self) -> &[NodeInfo] {
        &self.larger
    }

    /// All members, smaller side first.
    pub fn members(&self) -> impl Iterator<Item = &NodeInfo> {
        self.smaller.iter().chain(self.larger.iter())
    }

    pub fn len(&self) -> usize {
        self.smaller.len() + self.larger.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.members().any(|n| n.node_id == *id)
    }

    /// True when both sides are full. A leaf set that is not full holds every node
    /// we know of, which in a consistent network means every node there is.
    pub fn is_full(&self) -> bool {
        self.smaller.len() == self.half && self.larger.len() == self.half
    }

    /// Offers `node` to the leaf set. Returns true if it became a member.
    pub fn insert(&mut self, node: NodeInfo) -> bool {
        if !self.would_take(&node.node_id) {
            return false;
        }
        let mut all: Vec<NodeInfo> = Vec::with_capacity(self.len() + 1);
        all.extend(self.members().copied());
        all.push(node);
        self.rebuild(all);
        self.contains(&node.node_id)
    }

    /// Offers every node of `nodes` at once: the same leaf set as inserting them
    /// one by one, for one sort instead of one per node.
    pub fn insert_all(&mut self, nodes: impl IntoIterator<Item = NodeInfo>) {
        let mut all: Vec<NodeInfo> = self.members().copied().collect();
        for n in nodes {
            if n.node_id != self.own && !all.iter().any(|m| m.node_id == n.node_id) {
                all.push(n);
            }
        }
        self.rebuild(all);
    }

    /// Whether `insert` would make `id` a member, without changing anything.
    pub fn would_take(&self, id: &NodeId) -> bool {
        // The common case in a large network, decided first because it is cheap:
        // a full leaf set and a node beyond both ends, i.e. on the clockwise arc
        // from our farthest larger member to our farthest smaller one.
        if let (true, Some(hi), Some(lo)) =
            (self.is_full(), self.larger.last(), self.smaller.last())
        {
            if in_arc(&hi.node_id, &lo.node_id, id) {
                return false;
            }
        }
        *id != self.own && !self.contains(id)
    }

    /// Removes the node with id `id`. Returns true if it was a member.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        if !self.contains(id) {
            return false;
        }
        // Recompute both sides from the rest: in a small network (a leaf set
        // that is not full) a member may have to move to the other side.
        let rest: Vec<NodeInfo> = self
            .members()
            .filter(|n| n.node_id != *id)
            .copied()
            .collect();
        self.rebuild(rest);
        true
    }

    /// Recomputes both sides from `candidates` (no duplicates, not `own`).
    fn rebuild(&mut self, mut candidates: Vec<NodeInfo>) {
        let own = self.own;
        // Clockwise order: the nearest larger node first, the nearest smaller last.
        // Ids are distinct, so an unstable sort gives the one order there is; the
        // sides are refilled in place, keeping their buffers.
        candidates.sort_unstable_by_key(|n| own.cw_distance(&n.node_id));
        let n = candidates.len();
        let larger_len = n.min(self.half);
        let smaller_len = (n - larger_len).min(self.half);
        self.larger.clear();
        self.larger.extend_from_slice(&candidates[..larger_len]);
        self.smaller.clear();
        self.smaller
            .extend(candidates[n - smaller_len..].iter().rev().copied());
    }

    /// True when `key` lies within the range the leaf set covers: between its
    /// farthest smaller and farthest larger member. A leaf set that is not full
    /// covers the whole ring.
    pub fn covers(&self, key: &NodeId) -> bool {
        if !self.is_full() {
            return true;
        }
        let (Some(lo), Some(hi)) = (self.smaller.last(), self.larger.last()) else {
            return true;
        };
        in_arc(&lo.node_id, &hi.node_id, key)
    }

    /// The member of L ∪ {own} numerically closest to `key`; `None` means `own`.
    /// Nodes for which `skip` answers true are passed over.
    pub fn closest(&self, key: &NodeId, skip: impl Fn(&NodeId) -> bool) -> Option<NodeInfo> {
        let mut best: Option<NodeInfo> = None;
        let mut best_id = self.own;
        for n in self.members() {
            if skip(&n.node_id) {
                continue;
            }
            if closer_to(key, &n.node_id, &best_id).is_lt() {
                best = Some(*n);
                best_id = n.node_id;
            }
        }
        best
    }

    /// The farthest live member on the side of `failed`, the node the paper asks
    /// for its leaf set when `failed` disappears.
    pub fn farthest_on_side_of(&self, failed: &NodeId) -> Option<NodeInfo> {
        let side = if self.own.cw_distance(failed) <= failed.cw_distance(&self.own) {
            &self.larger
        } else {
            &self.smaller
        };
        side.iter().rev().find(|n| n.node_id != *failed).copied()
    }
}

/// The ideal leaf set of `own` in a network whose nodes are `all` (which may
/// include `own`): what a correct, fully converged node holds. For tests, the
/// demo and the simulator.
pub fn ideal(own: NodeId, size: usize, all: &[NodeInfo]) -> LeafSet {
    let mut ls = LeafSet::new(own, size);
    let others: Vec<NodeInfo> = all.iter().filter(|n| n.node_id != own).copied().collect();
    ls.rebuild(others);
    ls
}

impl PartialEq for LeafSet {
    fn eq(&self, other: &Self) -> bool {
        let ids = |v: &[NodeInfo]| v.iter().map(|n| n.node_id).collect::<Vec<_>>();
        self.own == other.own
            && ids(&self.smaller) == ids(&other.smaller)
            && ids(&self.larger) == ids(&other.larger)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::utils::ID_BYTES;

    fn node(v: u64) -> NodeInfo {
        let mut b = [0u8; ID_BYTES];
        b[12..].copy_from_slice(&v.to_be_bytes());
        NodeInfo {
            node_id: NodeId(b),
            addr: format!("127.0.0.1:{}", v % 60000 + 1).parse().unwrap(),
        }
    }

    fn top(v: u64) -> NodeInfo {
        // An id near the top of the ring: 2^160 - v.
        let mut n = node(v);
        n.node_id = NodeId::ZERO.wrapping_sub(&n.node_id);
        n
    }

    fn ids(v: &[NodeInfo]) -> Vec<NodeId> {
        v.iter().map(|n| n.node_id).collect()
    }

    #[test]
    fn keeps_nearest_on_each_side_in_order() {
        let own = node(100);
        let mut ls = LeafSet::new(own.node_id, 4);
        for v in [90, 110, 80, 120, 95, 105, 130, 70, 100] {
            ls.insert(node(v));
        }
        assert_eq!(ids(ls.smaller()), ids(&[node(95), node(90)]));
        assert_eq!(ids(ls.larger()), ids(&[node(105), node(110)]));
        assert!(!ls.contains(&own.node_id), "never ourselves");
    }

    #[test]
    fn wraps_around_zero() {
        let own = node(2);
        let mut ls = LeafSet::new(own.node_id, 4);
        for n in [top(1), top(5), node(3), node(9), top(9)] {
            ls.insert(n);
        }
        // Counter-clockwise from 2: 0 is not there, then 2^160-1, 2^160-5.
        assert_eq!(ids(ls.smaller()), ids(&[top(1), top(5)]));
        assert_eq!(ids(ls.larger()), ids(&[node(3), node(9)]));
        assert!(ls.covers(&node(0).node_id));
        assert!(!ls.covers(&node(50).node_id));
        assert!(!ls.covers(&top(50).node_id));
    }

    #[test]
    fn no_duplicates_and_small_networks_hold_everyone() {
        let own = node(10);
        let mut ls = LeafSet::new(own.node_id, 8);
        for _ in 0..3 {
            for v in [20, 30, 40, 50, 60] {
                ls.insert(node(v));
            }
        }
        assert_eq!(ls.len(), 5);
        let mut seen = ids(&ls.members().copied().collect::<Vec<_>>());
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 5);
        assert!(
            ls.covers(&node(5).node_id),
            "a leaf set that is not full covers all"
        );
    }

    #[test]
    fn incremental_equals_ideal() {
        let all: Vec<NodeInfo> = (0..200)
            .map(|i| {
                let id = NodeId::for_key(&format!("n{i}"));
                NodeInfo {
                    node_id: id,
                    addr: "127.0.0.1:1".parse().unwrap(),
                }
            })
            .collect();
        for size in [2, 8, 16, 24] {
            for own in all.iter().take(20) {
                let mut ls = LeafSet::new(own.node_id, size);
                for n in &all {
                    ls.insert(*n);
                }
                assert_eq!(ls, ideal(own.node_id, size, &all));
                assert_eq!(ls.len(), size);
            }
        }
    }

    #[test]
    fn closest_breaks_ties_toward_smaller() {
        let own = node(100);
        let mut ls = LeafSet::new(own.node_id, 4);
        ls.insert(node(90));
        ls.insert(node(110));
        assert_eq!(ls.closest(&node(95).node_id, |_| false), Some(node(90)));
        assert_eq!(ls.closest(&node(105).node_id, |_| false), None);
        assert_eq!(ls.closest(&node(108).node_id, |_| false), Some(node(110)));
        assert_eq!(
            ls.closest(&node(108).node_id, |id| *id == node(110).node_id),
            None
        );
    }

    #[test]
    fn remove_and_farthest() {
        let own = node(100);
        let mut ls = LeafSet::new(own.node_id, 4);
        for v in [90, 80, 110, 120] {
            ls.insert(node(v));
        }
        assert_eq!(ls.farthest_on_side_of(&node(90).node_id), Some(node(80)));
        assert_eq!(ls.farthest_on_side_of(&node(120).node_id), Some(node(110)));
        assert!(ls.remove(&node(90).node_id));
        assert!(!ls.remove(&node(90).node_id));
        assert_eq!(ids(ls.smaller()), ids(&[node(80)]));
    }
}
