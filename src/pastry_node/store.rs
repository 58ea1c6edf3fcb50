//! The key-value store: the values a node holds as the root of their key or as
//! one of its replicas (PAST's replica set: the k nodes numerically closest to
//! the key id).
//!
//! Keys are stored under their full string, never under a truncated hash, so two
//! keys can never overwrite each other. The key's 160-bit id is kept beside the
//! value so that a node can tell which replica set each key belongs to.
//!
//! Every write carries a version, so that copies converge to the latest write
//! whatever order they arrive in, and a delete leaves a tombstone (a versioned
//! "deleted"), so that re-replication cannot bring a deleted value back. The root
//! picks the version: the write's wall-clock time in milliseconds, or one more
//! than the version it holds if that is larger, so that versions grow even when a
//! new root's clock is behind.
//!
//! Pure: no sockets, locks, clocks or logging (the caller passes the time in).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::utils::NodeId;

/// One version of a key's value, as replicas exchange it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    /// True for a tombstone: the key was deleted at this version.
    #[serde(default)]
    pub deleted: bool,
    /// The value (`null` in a tombstone).
    #[serde(default)]
    pub value: Value,
}

impl Versioned {
    /// Whether `self` should replace `other`: a higher version wins; at the same
    /// version a tombstone wins, so that a delete is never undone.
    pub fn supersedes(&self, other: &Versioned) -> bool {
        (self.version, self.deleted) > (other.version, other.deleted)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub key_id: NodeId,
    pub entry: Versioned,
}

#[derive(Default, Debug)]
pub struct Store {
    map: HashMap<String, Stored>,
    /// Entries that are not tombstones, kept up to date so that `stats` does not
    /// walk a million keys under the lock.
    live: usize,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// The root's write (a put, or a delete when `value` is `None`) at time
    /// `now_ms`; returns the new version.
    pub fn write(&mut self, key: &str, value: Option<Value>, now_ms: u64) -> Versioned {
        let previous = self.map.get(key).map_or(0, |s| s.entry.version);
        let entry = Versioned {
            version: now_ms.max(previous.saturating_add(1)),
            deleted: value.is_none(),
            value: value.unwrap_or(Value::Null),
        };
        self.set(key, entry.clone());
        entry
    }

    /// Puts `entry` in place of whatever `key` held, keeping the live count.
    fn set(&mut self, key: &str, entry: Versioned) {
        let now_live = !entry.deleted;
        let stored = Stored {
            key_id: NodeId::for_key(key),
            entry,
        };
        let was_live = self
            .map
            .insert(key.to_string(), stored)
            .is_some_and(|old| !old.entry.deleted);
        match (was_live, now_live) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// Takes in a copy from another node if it is newer than ours. Returns true
    /// if it was taken.
    pub fn apply(&mut self, key: &str, entry: Versioned) -> bool {
        if self
            .map
            .get(key)
            .is_some_and(|s| !entry.supersedes(&s.entry))
        {
            return false;
        }
        self.set(key, entry);
        true
    }

    /// The entry for `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<&Versioned> {
        self.map.get(key).map(|s| &s.entry)
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entry(key).filter(|e| !e.deleted).map(|e| &e.value)
    }

    /// Live keys (tombstones not counted).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every key with its id and entry, tombstones included.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Stored)> {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_get_growing_versions_and_deletes_leave_tombstones() {
        let mut s = Store::new();
        let a = s.write("apple", Some(json!("red")), 100);
        assert_eq!(a.version, 100);
        // A root whose clock is behind still moves the version forward.
        let b = s.write("apple", Some(json!({"c": 1})), 50);
        assert_eq!(b.version, 101);
        assert_eq!(s.get("apple"), Some(&json!({"c": 1})));
        let d = s.write("apple", None, 200);
        assert!(d.deleted && d.version == 200);
        assert_eq!(s.get("apple"), None);
        assert!(s.entry("apple").is_some(), "the tombstone stays");
        assert!(s.is_empty());
    }

    #[test]
    fn copies_converge_to_the_newest_whatever_the_order() {
        let v = |version, deleted| Versioned {
            version,
            deleted,
            value: json!(version),
        };
        let orders = [[1, 2, 3], [3, 2, 1], [2, 3, 1]];
        for order in orders {
            let mut s = Store::new();
            for i in order {
                s.apply("k", v(i, false));
            }
            assert_eq!(s.get("k"), Some(&json!(3)));
        }
        // An old copy does not bring a deleted value back; a tie goes to the
        // tombstone.
        let mut s = Store::new();
        s.apply("k", v(5, true));
        assert!(!s.apply("k", v(4, false)));
        assert!(!s.apply("k", v(5, false)));
        assert_eq!(s.get("k"), None);
        assert_eq!(s.len(), 0, "a tombstone is not a live key");
        s.apply("k", v(6, false));
        s.apply("other", v(1, false));
        assert_eq!(s.len(), 2);
        s.write("other", None, 0);
        assert_eq!(s.len(), 1);
    }
}
