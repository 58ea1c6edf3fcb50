//! The neighborhood set M: the |M| nodes nearest to us by the proximity metric,
//! whatever their ids.
//!
//! The paper does not route with M; it uses it when a node joins (the bootstrap,
//! assumed near the newcomer, hands over its M) and to keep locality in the routing
//! table. Here M is also one of the sets the rare routing case may pick from.
//!
//! Pure: no sockets, locks, clocks or logging. Proximity: smaller = nearer.

use crate::utils::{NodeId, NodeInfo};

#[derive(Clone, Debug)]
pub struct NeighborhoodSet {
    own: NodeId,
    capacity: usize,
    /// Nearest first.
    members: Vec<(NodeInfo, u64)>,
}

impl NeighborhoodSet {
    pub fn new(own: NodeId, capacity: usize) -> NeighborhoodSet {
        NeighborhoodSet {
            own,
            capacity,
            members: Vec::with_capacity(capacity),
        }
    }

    /// Members with their proximity, nearest first.
    pub fn members(&self) -> &[(NodeInfo, u64)] {
        &self.members
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The proximity of member `id`.
    pub fn proximity_of(&self, id: &NodeId) -> Option<u64> {
        self.members
            .iter()
            .find(|(n, _)| n.node_id == *id)
            .map(|(_, p)| *p)
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.members.iter().any(|(n, _)| n.node_id == *id)
    }

    /// Offers `node` measured at `proximity`. Returns true if it is now a member.
    /// A node already present gets its proximity updated.
    pub fn insert(&mut self, node: NodeInfo, proximity: u64) -> bool {
        if node.node_id == self.own || self.capacity == 0 {
            return false;
        }
        self.members.retain(|(n, _)| n.node_id != node.node_id);
        // Ties keep the earlier member first, so an order of arrival is stable.
        let at = self.members.partition_point(|(_, p)| *p <= proximity);
        if at >= self.capacity {
            return false;
        }
        self.members.insert(at, (node, proximity));
        self.members.truncate(self.capacity);
        true
    }

    pub fn remove(&mut self, id: &NodeId) -> bool {
        let before = self.members.len();
        self.members.retain(|(n, _)| n.node_id != *id);
        before != self.members.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(i: u16) -> NodeInfo {
        NodeInfo::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
    }

    #[test]
    fn keeps_the_nearest() {
        let own = n(0);
        let mut m = NeighborhoodSet::new(own.node_id, 3);
        assert!(!m.insert(own, 1), "never ourselves");
        for (i, p) in [(1, 40), (2, 10), (3, 30), (4, 20)] {
            m.insert(n(i), p);
        }
        let order: Vec<_> = m
            .members()
            .iter()
            .map(|(n, p)| (n.addr.port(), *p))
            .collect();
        assert_eq!(order, [(1002, 10), (1004, 20), (1003, 30)]);
        assert!(
            !m.insert(n(5), 99),
            "farther than every member of a full set"
        );
        assert!(m.insert(n(3), 5), "re-measured nearer");
        assert_eq!(m.members()[0].0, n(3));
        assert_eq!(m.len(), 3);
        assert!(m.remove(&n(3).node_id));
        assert!(!m.contains(&n(3).node_id));
    }
}
