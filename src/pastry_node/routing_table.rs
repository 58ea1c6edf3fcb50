//! The routing table R: prefix routing, one row per digit.
//!
//! The paper: "a routing table R with ⌈log_{2^b} N⌉ rows and 2^b − 1 entries each.
//! The 2^b − 1 entries at row n each refer to a node whose nodeId shares the present
//! node's nodeId in the first n digits, but whose n + 1th digit has one of the
//! 2^b − 1 possible values other than the n + 1th digit in the present node's id."
//! Among the nodes that fit an entry, the one nearest by the proximity metric is kept.
//!
//! Here: 40 rows of 16 columns (160-bit ids, b = 4). Rows are allocated only when a
//! node first lands in them, because a network of N nodes fills about log16 N rows;
//! this keeps a node small enough that the simulator can hold 100,000 of them. The
//! column of our own digit stays empty (the paper's entry "is the present node").
//!
//! Proximity is a number, smaller = nearer: round-trip microseconds in the real node,
//! Euclidean distance in the simulator. An entry whose proximity is not yet measured
//! is kept until a measured candidate arrives.
//!
//! Pure: no sockets, locks, clocks or logging.

use crate::utils::{shl, NodeId, NodeInfo, BASE, DIGITS};

/// A routing table entry: the node and how near it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub node: NodeInfo,
    /// `None` until measured.
    pub proximity: Option<u64>,
}

/// What an insertion did, so that the caller can act on it (e.g. measure a newcomer).
#[must_use]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InsertResult {
    /// The node took an empty slot.
    Added,
    /// The node replaced a farther entry (returned, in case it is still useful elsewhere).
    Replaced(NodeInfo),
    /// The node's proximity was updated in place.
    Updated,
    /// The slot holds a nearer node, or the node is ourselves.
    Ignored,
}

#[derive(Clone, Debug)]
pub struct RoutingTable {
    own: NodeId,
    rows: Vec<[Option<Entry>; BASE]>,
}

impl RoutingTable {
    pub fn new(own: NodeId) -> RoutingTable {
        RoutingTable {
            own,
            rows: Vec::new(),
        }
    }

    /// The slot `(row, col)` a node belongs to, or `None` for ourselves.
    pub fn slot_of(&self, id: &NodeId) -> Option<(usize, usize)> {
        let row = shl(&self.own, id);
        (row < DIGITS).then(|| (row, id.digit(row)))
    }

    /// True when `id` belongs in a slot that is still empty.
    pub fn is_vacant_for(&self, id: &NodeId) -> bool {
        self.slot_of(id)
            .is_some_and(|(row, col)| self.get(row, col).is_none())
    }

    /// `R[row][col]`, if filled.
    pub fn get(&self, row: usize, col: usize) -> Option<&Entry> {
        self.rows.get(row).and_then(|r| r[col].as_ref())
    }

    /// Number of rows allocated (rows beyond it are empty).
    pub fn rows_used(&self) -> usize {
        self.rows.len()
    }

    /// The filled entries of row `row`.
    pub fn row(&self, row: usize) -> impl Iterator<Item = &Entry> {
        self.rows.get(row).into_iter().flatten().flatten()
    }

    /// Every filled entry with its (row, col).
    pub fn entries(&self) -> impl Iterator<Item = (usize, usize, &Entry)> {
        self.rows.iter().enumerate().flat_map(|(r, row)| {
            row.iter()
                .enumerate()
                .filter_map(move |(c, e)| e.as_ref().map(|e| (r, c, e)))
        })
    }

    pub fn len(&self) -> usize {
        self.entries().count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, id: &NodeId) -> bool {
        self.slot_of(id)
            .and_then(|(r, c)| self.get(r, c))
            .is_some_and(|e| e.node.node_id == *id)
    }

    /// Offers `node` at proximity `proximity` (`None`: not measured).
    pub fn insert(&mut self, node: NodeInfo, proximity: Option<u64>) -> InsertResult {
        let Some((row, col)) = self.slot_of(&node.node_id) else {
            return InsertResult::Ignored;
        };
        if self.rows.len() <= row {
            self.rows.resize(row + 1, [None; BASE]);
        }
        let slot = &mut self.rows[row][col];
        let new = Entry { node, proximity };
        match slot {
            None => {
                *slot = Some(new);
                InsertResult::Added
            }
            Some(old) if old.node.node_id == node.node_id => {
                if proximity.is_some() && old.proximity != proximity {
                    old.proximity = proximity;
                    old.node = node;
                    InsertResult::Updated
                } else {
                    InsertResult::Ignored
                }
            }
            Some(old) => {
                // A measured node beats an unmeasured one; otherwise the nearer wins.
                let better = match (proximity, old.proximity) {
                    (Some(p), Some(q)) => p < q,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if better {
                    let replaced = old.node;
                    *slot = Some(new);
                    InsertResult::Replaced(replaced)
                } else {
                    InsertResult::Ignored
                }
            }
        }
    }

    /// Removes the node with id `id`. Returns true if it was there.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let Some((r, c)) = self.slot_of(id) else {
            return false;
        };
        match self.rows.get_mut(r) {
            Some(row) if row[c].is_some_and(|e| e.node.node_id == *id) => {
                row[c] = None;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(hex: &str) -> NodeInfo {
        NodeInfo {
            node_id: format!("{hex:0<40}").parse().unwrap(),
            addr: "127.0.0.1:1".parse().unwrap(),
        }
    }

    #[test]
    fn places_by_prefix_and_next_digit() {
        let own = n("a5f").node_id;
        let mut rt = RoutingTable::new(own);
        let cases = [("3", 0, 3), ("a1", 1, 1), ("a5e", 2, 14), ("a5f1", 3, 1)];
        for (hex, row, col) in cases {
            assert_eq!(rt.insert(n(hex), None), InsertResult::Added, "{hex}");
            assert_eq!(rt.get(row, col).unwrap().node, n(hex), "{hex}");
        }
        assert_eq!(
            rt.insert(n("a5f"), None),
            InsertResult::Ignored,
            "ourselves"
        );
        assert!(
            rt.get(0, 10).is_none(),
            "our own digit's column stays empty"
        );
        assert_eq!(rt.len(), 4);
        assert_eq!(rt.rows_used(), 4);
    }

    #[test]
    fn nearer_node_wins_the_slot() {
        let mut rt = RoutingTable::new(n("a").node_id);
        assert_eq!(rt.insert(n("31"), None), InsertResult::Added);
        assert_eq!(
            rt.insert(n("32"), Some(50)),
            InsertResult::Replaced(n("31")),
            "measured beats unmeasured"
        );
        assert_eq!(rt.insert(n("33"), Some(80)), InsertResult::Ignored);
        assert_eq!(rt.insert(n("34"), None), InsertResult::Ignored);
        assert_eq!(
            rt.insert(n("35"), Some(20)),
            InsertResult::Replaced(n("32"))
        );
        assert_eq!(rt.insert(n("35"), Some(10)), InsertResult::Updated);
        assert_eq!(rt.get(0, 3).unwrap().proximity, Some(10));
        assert!(rt.contains(&n("35").node_id));
        assert!(rt.remove(&n("35").node_id));
        assert!(!rt.remove(&n("35").node_id));
        assert!(rt.is_empty());
    }
}
