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
    /// The sum of [`charge`] over every entry: what the store's byte cap counts.
    bytes: usize,
}

/// What one entry counts against the store's byte cap: the key's bytes and the
/// value as JSON (nothing for a tombstone's value). The memory it takes is more
/// (the map's own overhead per entry); the cap on entries bounds that part.
pub fn charge(key: &str, entry: &Versioned) -> usize {
    let value = if entry.deleted {
        0
    } else {
        json_len(&entry.value)
    };
    key.len().saturating_add(value)
}

/// The length of `value` as compact JSON, counted without building the string.
pub fn json_len(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    // Writing a `Value` into a counter cannot fail; were it to, count it as
    // too large to take.
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.0,
        Err(_) => usize::MAX,
    }
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
        self.bytes = self.bytes.saturating_add(charge(key, &stored.entry));
        let old = self.map.insert(key.to_string(), stored);
        if let Some(old) = &old {
            self.bytes = self.bytes.saturating_sub(charge(key, &old.entry));
        }
        let was_live = old.is_some_and(|old| !old.entry.deleted);
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

    /// Whether an entry for `key` whose [`charge`] is `new` may replace what `key`
    /// holds without the store passing `max_keys` entries (tombstones included)
    /// or `max_bytes`. A replacement that does not grow the store always fits, so
    /// a full store still takes deletes and smaller values of the keys it holds.
    pub fn fits(&self, key: &str, new: usize, max_keys: usize, max_bytes: usize) -> bool {
        match self.map.get(key) {
            Some(old) => {
                let old = charge(key, &old.entry);
                new <= old || self.bytes.saturating_sub(old).saturating_add(new) <= max_bytes
            }
            None => self.map.len() < max_keys && self.bytes.saturating_add(new) <= max_bytes,
        }
    }

    /// Entries held, tombstones included: what the store's key cap counts.
    pub fn entries(&self) -> usize {
        self.map.len()
    }

    /// The sum of [`charge`] over every entry: what the store's byte cap counts.
    pub fn bytes(&self) -> usize {
        self.bytes
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

    #[test]
    fn caps_count_entries_and_bytes_and_let_a_full_store_shrink() {
        let v = |value: Value| Versioned {
            version: 1,
            deleted: false,
            value,
        };
        let mut s = Store::new();
        // "ab" + "\"xyz\"": 2 + 5 bytes.
        s.write("ab", Some(json!("xyz")), 1);
        assert_eq!(s.bytes(), 7);
        assert_eq!(s.entries(), 1);
        // Two entries at most, 20 bytes at most.
        let (keys, bytes) = (2, 20);
        assert!(
            s.fits("cd", charge("cd", &v(json!(123456))), keys, bytes),
            "8 more: 15"
        );
        assert!(
            !s.fits("cd", charge("cd", &v(json!("a long value"))), keys, bytes),
            "16 more: 23"
        );
        s.write("cd", Some(json!(123456)), 1);
        assert_eq!(s.bytes(), 15);
        assert!(
            !s.fits("ef", charge("ef", &v(json!(1))), keys, bytes),
            "a third entry"
        );
        // A key it holds may grow within the byte cap, and may always shrink or
        // be deleted.
        assert!(
            s.fits("ab", charge("ab", &v(json!("xyzxyz"))), keys, bytes),
            "18 bytes"
        );
        assert!(
            !s.fits("ab", charge("ab", &v(json!("xyzxyzxyz"))), keys, bytes),
            "21 bytes"
        );
        let tombstone = Versioned {
            version: 2,
            deleted: true,
            value: Value::Null,
        };
        assert!(s.fits("ab", charge("ab", &tombstone), 0, 0));
        s.apply("ab", tombstone);
        assert_eq!(s.bytes(), 2 + 8, "a tombstone counts its key only");
        assert_eq!(s.entries(), 2, "and still counts as an entry");
        s.write("cd", Some(json!(1)), 5);
        assert_eq!(s.bytes(), 2 + 3);
    }
}
