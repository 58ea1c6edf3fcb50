//! The key-value store: the values a node holds as the root of their key or as
//! one of its replicas (PAST's replica set: the k nodes numerically closest to
//! the key id).
//!
//! Every write carries a version, so that copies converge to the latest write
//! whatever order they arrive in, and a delete leaves a tombstone (a versioned
//! "deleted"), so that re-replication cannot bring a deleted value back. The root
//! picks the version: the write's wall-clock time in milliseconds, or one more
//! than the version it holds if that is larger, so that versions grow even when a
//! new root's clock is behind.
//!
//! Copies of a key are ordered totally ([`rank`]): by version, then a tombstone
//! above a value, then the greater value text, byte by byte. The last step is
//! for two roots that wrote the key in the same millisecond (routing briefly
//! inconsistent): without it neither copy would replace the other and the
//! replicas would keep different values for good. Every path that decides
//! whether one copy replaces another (a copy taken in, a read's fetch, a
//! handed-over copy dropped) uses this one order.
//!
//! # Layout
//!
//! A node may hold millions of small keys, so the layout is chosen for memory
//! (measured by `bench --memory-keys`; see the README):
//!
//! - Entries are ordered by **key id** in a B-tree (`BTreeMap<NodeId, Slot>`).
//!   Its nodes are at least half full, where a hash table at a million entries
//!   may be more than half empty (it doubles). The order is also the ring's: the
//!   keys whose ids lie in an arc of the ring (what a replica set is responsible
//!   for) are one range of the tree, read without a scan ([`Store::in_arc`]).
//! - Each entry is **one heap allocation** holding the version, the key and the
//!   value as its compact JSON text, not a `serde_json::Value` tree with an
//!   allocation per string, array and object. A value is parsed again when it
//!   is read; [`Record::value_json`] hands out the text as it is.
//! - Keys are stored whole, never under a truncated hash alone: the id is the
//!   B-tree's key, and the full key string is kept in the record. Two distinct
//!   keys whose 160-bit ids collide (SHA-1 makes that astronomically rare, but
//!   not impossible) share a slot, one record each, and never overwrite each
//!   other.
//!
//! Pure: no sockets, locks, clocks or logging (the caller passes the time in).

use std::collections::BTreeMap;
use std::ops::Bound;

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
    /// Whether `self` should replace `other` in the order of [`rank`]. The
    /// values are encoded only when the versions and tombstone flags tie.
    pub fn supersedes(&self, other: &Versioned) -> bool {
        if (self.version, self.deleted) != (other.version, other.deleted) {
            return (self.version, self.deleted) > (other.version, other.deleted);
        }
        // A tie: the values decide, encoded only now.
        let (ours, theirs) = (self.text(), other.text());
        let ours = rank(self.version, ours.as_deref().map(str::as_bytes));
        ours > rank(other.version, theirs.as_deref().map(str::as_bytes))
    }

    /// The value as the store keeps it: compact JSON text, `None` for a
    /// tombstone (which keeps no value, whatever the copy carried).
    pub fn text(&self) -> Option<String> {
        (!self.deleted).then(|| self.value.to_string())
    }
}

/// Where a copy of a key at `version` whose value is stored as `text` (`None`:
/// a tombstone) stands among the key's copies: the greater rank replaces the
/// lesser, and equal ranks are the same copy.
///
/// A higher version wins (the later write). At the same version a tombstone
/// wins, so that a delete is never undone. Two values at the same version (two
/// roots wrote in one millisecond) are ordered by their JSON text, byte-wise:
/// every node holds the same text for the same value (it is what `serde_json`
/// writes, and what it reads back it writes again unchanged), so every node
/// picks the same winner. The text rather than a hash of it: distinct values
/// never tie, and the comparison needs nothing both sides do not have already
/// (the stored text, and the copy's text, made anyway to charge it against
/// the store's cap).
pub fn rank(version: u64, text: Option<&[u8]>) -> (u64, bool, &[u8]) {
    (version, text.is_none(), text.unwrap_or_default())
}

/// A stored entry as the store holds it, borrowed: what iteration yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub key_id: NodeId,
    pub key: &'a str,
    pub version: u64,
    /// True for a tombstone.
    pub deleted: bool,
    /// The value's compact JSON text; empty in a tombstone. Kept as bytes: it is
    /// checked to be UTF-8 only when it is read as text.
    value: &'a [u8],
}

impl<'a> Record<'a> {
    /// The value as JSON text, `null` in a tombstone: ready to be written into a
    /// reply as it is, without parsing it.
    pub fn value_json(&self) -> &'a str {
        if self.deleted {
            "null"
        } else {
            // The text came from a `String`, so it is UTF-8.
            std::str::from_utf8(self.value).unwrap_or("null")
        }
    }

    /// The value, parsed (`null` in a tombstone).
    pub fn value(&self) -> Value {
        // The text was written by `serde_json` from a `Value`, so it parses.
        if self.deleted {
            return Value::Null;
        }
        serde_json::from_slice(self.value).unwrap_or(Value::Null)
    }

    /// Where this copy stands among the key's copies (see [`rank`]).
    pub fn rank(&self) -> (u64, bool, &'a [u8]) {
        rank(self.version, (!self.deleted).then_some(self.value))
    }

    /// The value's JSON text as stored, `None` in a tombstone.
    pub fn text(&self) -> Option<&'a [u8]> {
        (!self.deleted).then_some(self.value)
    }

    /// The entry in the form replicas exchange.
    pub fn versioned(&self) -> Versioned {
        Versioned {
            version: self.version,
            deleted: self.deleted,
            value: self.value(),
        }
    }

    /// Key and value bytes, as [`Store::bytes`] counts them.
    fn bytes(&self) -> usize {
        self.key.len() + self.value.len()
    }
}

/// The records of one key id, in one allocation: normally one record; more only
/// when distinct keys have the same id.
///
/// A record is `version` (8 bytes, little-endian), the key's length and the
/// value's length (each a LEB128 varint: one byte below 128), then the key and
/// the value's JSON text. A value length of 0 marks a tombstone: JSON text is
/// never empty, and a tombstone needs no value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot(Box<[u8]>);

impl Slot {
    /// The records in the slot, each with the byte range it takes.
    fn records(
        &self,
        key_id: NodeId,
    ) -> impl Iterator<Item = (std::ops::Range<usize>, Record<'_>)> {
        let bytes = &self.0[..];
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= bytes.len() {
                return None;
            }
            let start = at;
            let (record, end) = decode(bytes, at, key_id);
            at = end;
            Some((start..end, record))
        })
    }

    fn find(&self, key_id: NodeId, key: &str) -> Option<(std::ops::Range<usize>, Record<'_>)> {
        let mut at = 0;
        while at < self.0.len() {
            let (raw, end) = decode_raw(&self.0, at);
            if raw.key == key.as_bytes() {
                return Some((at..end, raw.record(key_id)));
            }
            at = end;
        }
        None
    }
}

/// The bytes `encode` takes for a record.
fn encoded_len(key: &str, value: Option<&str>) -> usize {
    let varint_len = |n: usize| (usize::BITS - n.leading_zeros()).max(1).div_ceil(7) as usize;
    let value_len = value.map_or(0, str::len);
    8 + varint_len(key.len()) + varint_len(value_len) + key.len() + value_len
}

/// Appends one record to `out`.
fn encode(out: &mut Vec<u8>, key: &str, version: u64, value: Option<&str>) {
    let value = value.unwrap_or("");
    out.extend_from_slice(&version.to_le_bytes());
    push_varint(out, key.len());
    push_varint(out, value.len());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// A record's fields as they lie in its slot.
struct Raw<'a> {
    version: u64,
    key: &'a [u8],
    value: &'a [u8],
}

impl<'a> Raw<'a> {
    fn record(&self, key_id: NodeId) -> Record<'a> {
        Record {
            key_id,
            // The key came from a `&str`, so it is UTF-8.
            key: std::str::from_utf8(self.key).unwrap_or_default(),
            version: self.version,
            deleted: self.value.is_empty(),
            value: self.value,
        }
    }
}

/// Reads the record at `at` of a slot; returns it and where the next begins.
/// The slot was written by `encode` alone, so the bytes are well formed.
fn decode_raw(bytes: &[u8], at: usize) -> (Raw<'_>, usize) {
    let mut version = [0u8; 8];
    version.copy_from_slice(&bytes[at..at + 8]);
    let (key_len, at) = read_varint(bytes, at + 8);
    let (value_len, at) = read_varint(bytes, at);
    let raw = Raw {
        version: u64::from_le_bytes(version),
        key: &bytes[at..at + key_len],
        value: &bytes[at + key_len..at + key_len + value_len],
    };
    (raw, at + key_len + value_len)
}

fn decode(bytes: &[u8], at: usize, key_id: NodeId) -> (Record<'_>, usize) {
    let (raw, end) = decode_raw(bytes, at);
    (raw.record(key_id), end)
}

fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn read_varint(bytes: &[u8], mut at: usize) -> (usize, usize) {
    let (mut n, mut shift) = (0usize, 0);
    loop {
        let b = bytes[at];
        at += 1;
        n |= ((b & 0x7f) as usize) << shift;
        if b < 0x80 {
            return (n, at);
        }
        shift += 7;
    }
}

#[derive(Default, Debug)]
pub struct Store {
    slots: BTreeMap<NodeId, Slot>,
    /// Records, tombstones included (more than `slots.len()` only after an id
    /// collision).
    records: usize,
    /// Records that are not tombstones, kept up to date so that `stats` does not
    /// walk a million keys under the lock.
    live: usize,
    /// The sum of [`charge`] over every entry: what the store's byte cap counts.
    bytes: usize,
}

/// What one entry counts against the store's byte cap: the key's bytes and the
/// value's JSON `text` (`None` for a tombstone, which keeps no value). The
/// memory it takes is more (the map's own overhead per entry); the cap on
/// entries bounds that part.
pub fn charge(key: &str, text: Option<&str>) -> usize {
    key.len().saturating_add(text.map_or(0, str::len))
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
        self.write_at(NodeId::for_key(key), key, value, now_ms)
    }

    /// [`Store::write`] for a key whose id the caller gives (it must be
    /// `NodeId::for_key(key)`; tests give others to make ids collide).
    pub fn write_at(
        &mut self,
        key_id: NodeId,
        key: &str,
        value: Option<Value>,
        now_ms: u64,
    ) -> Versioned {
        let text = value.as_ref().map(Value::to_string);
        let version = self.write_text(key_id, key, text, now_ms);
        Versioned {
            version,
            deleted: value.is_none(),
            value: value.unwrap_or(Value::Null),
        }
    }

    /// [`Store::write_at`] with the value already encoded as compact JSON text
    /// (`None`: a delete), so that a caller can encode it before taking a lock;
    /// returns the new version.
    pub fn write_text(
        &mut self,
        key_id: NodeId,
        key: &str,
        text: Option<String>,
        now_ms: u64,
    ) -> u64 {
        let mut version = now_ms;
        self.update(key_id, key, |old| {
            let previous = old.map_or(0, |r| r.version);
            version = now_ms.max(previous.saturating_add(1));
            Some((version, text))
        });
        version
    }

    /// Takes in a copy from another node if it ranks above ours (see [`rank`]).
    /// Returns true if it was taken.
    pub fn apply(&mut self, key: &str, entry: Versioned) -> bool {
        self.apply_at(NodeId::for_key(key), key, entry)
    }

    /// [`Store::apply`] for a key whose id the caller gives.
    pub fn apply_at(&mut self, key_id: NodeId, key: &str, entry: Versioned) -> bool {
        let text = entry.text();
        self.apply_text(key_id, key, entry.version, text)
    }

    /// [`Store::apply_at`] with the copy's value already encoded (`None`: a
    /// tombstone; [`Versioned::text`] makes it).
    pub fn apply_text(
        &mut self,
        key_id: NodeId,
        key: &str,
        version: u64,
        text: Option<String>,
    ) -> bool {
        self.update(key_id, key, |old| {
            let new = rank(version, text.as_deref().map(str::as_bytes));
            old.is_none_or(|r| new > r.rank())
                .then_some((version, text))
        })
    }

    /// Replaces `key`'s record with the version and value (`None`: a tombstone)
    /// that `new` picks given the record it holds now, if it picks one; keeps the
    /// counts. One walk down the tree. Returns whether it replaced the record.
    fn update(
        &mut self,
        key_id: NodeId,
        key: &str,
        new: impl FnOnce(Option<Record<'_>>) -> Option<(u64, Option<String>)>,
    ) -> bool {
        use std::collections::btree_map::Entry;
        let slot = self.slots.entry(key_id);
        let old = match &slot {
            Entry::Vacant(_) => None,
            Entry::Occupied(o) => o.get().find(key_id, key),
        };
        let replaced = old.as_ref().map(|(_, r)| (!r.deleted, r.bytes()));
        let Some((version, value)) = new(old.as_ref().map(|(_, r)| *r)) else {
            return false;
        };
        let value = value.as_deref();
        let new_len = encoded_len(key, value);
        // Allocated at its final size: no growth and no shrinking.
        let mut bytes;
        match (&slot, old) {
            (Entry::Occupied(o), Some((range, _))) => {
                // Keep the slot's other records (keys with the same id).
                let all = &o.get().0;
                bytes = Vec::with_capacity(all.len() - range.len() + new_len);
                bytes.extend_from_slice(&all[..range.start]);
                bytes.extend_from_slice(&all[range.end..]);
            }
            (Entry::Occupied(o), None) => {
                bytes = Vec::with_capacity(o.get().0.len() + new_len);
                bytes.extend_from_slice(&o.get().0);
            }
            (Entry::Vacant(_), _) => bytes = Vec::with_capacity(new_len),
        }
        encode(&mut bytes, key, version, value);
        debug_assert_eq!(bytes.len(), bytes.capacity());
        let bytes = Slot(bytes.into_boxed_slice());
        match slot {
            Entry::Occupied(mut o) => *o.get_mut() = bytes,
            Entry::Vacant(v) => {
                v.insert(bytes);
            }
        }

        let (was_live, old_bytes) = replaced.unwrap_or((false, 0));
        if replaced.is_none() {
            self.records += 1;
        }
        self.bytes = self.bytes - old_bytes + key.len() + value.map_or(0, str::len);
        match (was_live, value.is_some()) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
        true
    }

    /// The record for `key`, tombstones included, borrowed.
    pub fn record(&self, key: &str) -> Option<Record<'_>> {
        self.record_at(NodeId::for_key(key), key)
    }

    /// [`Store::record`] for a key whose id the caller gives.
    pub fn record_at(&self, key_id: NodeId, key: &str) -> Option<Record<'_>> {
        let slot = self.slots.get(&key_id)?;
        slot.find(key_id, key).map(|(_, r)| r)
    }

    /// Whether an entry for `key` whose [`charge`] is `new` may replace what `key`
    /// holds without the store passing `max_keys` entries (tombstones included)
    /// or `max_bytes`. A replacement that does not grow the store always fits, so
    /// a full store still takes deletes and smaller values of the keys it holds.
    pub fn fits(&self, key: &str, new: usize, max_keys: usize, max_bytes: usize) -> bool {
        match self.record(key) {
            Some(old) => {
                let old = old.bytes();
                new <= old || self.bytes.saturating_sub(old).saturating_add(new) <= max_bytes
            }
            None => self.records < max_keys && self.bytes.saturating_add(new) <= max_bytes,
        }
    }

    /// Entries held, tombstones included: what the store's key cap counts.
    pub fn entries(&self) -> usize {
        self.records
    }

    /// The entry for `key`, tombstones included.
    pub fn entry(&self, key: &str) -> Option<Versioned> {
        self.record(key).map(|r| r.versioned())
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.record(key).filter(|r| !r.deleted).map(|r| r.value())
    }

    /// Live keys (tombstones not counted).
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tombstones held.
    pub fn tombstones(&self) -> usize {
        self.records - self.live
    }

    /// Key and value bytes held, tombstones included: the key strings plus the
    /// values' compact JSON text (the sizes a cap on the store would count; the
    /// store's own overhead is on top, about 100 bytes a key).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Every record in key-id order, tombstones included.
    pub fn iter(&self) -> impl Iterator<Item = Record<'_>> {
        self.slots
            .iter()
            .flat_map(|(id, slot)| slot.records(*id).map(|(_, r)| r))
    }

    /// The records whose key id lies in the arc of the ring from `from`
    /// (excluded) clockwise to `to` (included), tombstones included, without a
    /// scan of the rest. The arc may wrap past zero; `from == to` is the whole
    /// ring.
    pub fn in_arc(&self, from: &NodeId, to: &NodeId) -> impl Iterator<Item = Record<'_>> {
        let (first, second) = if from < to {
            (
                self.slots
                    .range((Bound::Excluded(*from), Bound::Included(*to))),
                None,
            )
        } else {
            // Wrapping: (from, max] and then [0, to].
            (
                self.slots.range((Bound::Excluded(*from), Bound::Unbounded)),
                Some(self.slots.range(..=*to)),
            )
        };
        first
            .chain(second.into_iter().flatten())
            .flat_map(|(id, slot)| slot.records(*id).map(|(_, r)| r))
    }

    /// Drops our copy of `key` if it is still the copy at `version` with value
    /// `text` (`None`: a tombstone): a copy this node no longer needs, now held
    /// by the nodes that should. Any other copy that arrived meanwhile is kept,
    /// a value that won a same-version tie included: the nodes it was handed to
    /// may not have that one. Returns whether it was dropped.
    pub fn remove_copy(&mut self, key: &str, version: u64, text: Option<&str>) -> bool {
        let key_id = NodeId::for_key(key);
        let Some(slot) = self.slots.get_mut(&key_id) else {
            return false;
        };
        let Some((range, r)) = slot.find(key_id, key) else {
            return false;
        };
        if r.rank() != rank(version, text.map(str::as_bytes)) {
            return false;
        }
        let (live, bytes) = (!r.deleted, r.bytes());
        let mut kept = Vec::with_capacity(slot.0.len() - range.len());
        kept.extend_from_slice(&slot.0[..range.start]);
        kept.extend_from_slice(&slot.0[range.end..]);
        if kept.is_empty() {
            self.slots.remove(&key_id);
        } else {
            *slot = Slot(kept.into_boxed_slice());
        }
        self.records -= 1;
        self.live -= usize::from(live);
        self.bytes -= bytes;
        true
    }

    /// Drops the tombstones whose version is below `version` (for a tombstone
    /// the root wrote, the time of the delete in milliseconds); returns how many.
    /// Once every replica has had the tombstone for longer than a copy can be
    /// in flight, it has done its work. One pass over the records, skipped when
    /// there are no tombstones.
    pub fn remove_tombstones_before(&mut self, version: u64) -> usize {
        if self.tombstones() == 0 {
            return 0;
        }
        let (mut removed, mut bytes) = (0, 0);
        self.slots.retain(|id, slot| {
            if !slot
                .records(*id)
                .any(|(_, r)| r.deleted && r.version < version)
            {
                return true;
            }
            let mut kept = Vec::new();
            for (range, r) in slot.records(*id) {
                if r.deleted && r.version < version {
                    removed += 1;
                    bytes += r.bytes();
                } else {
                    kept.extend_from_slice(&slot.0[range]);
                }
            }
            *slot = Slot(kept.into_boxed_slice());
            !slot.0.is_empty()
        });
        self.records -= removed;
        self.bytes -= bytes;
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    impl Store {
        fn delete_for_test(&mut self, key: &str, now_ms: u64) {
            self.write(key, None, now_ms);
        }
    }

    #[test]
    fn a_copy_is_dropped_only_if_it_is_the_one_handed_over() {
        let mut s = Store::new();
        s.write("a", Some(json!(1)), 10);
        s.write("b", Some(json!(2)), 10);
        assert!(!s.remove_copy("a", 9, Some("1")), "a newer copy is kept");
        assert!(
            !s.remove_copy("a", 10, Some("0")),
            "a copy that won a tie at the same version is kept"
        );
        assert!(!s.remove_copy("a", 10, None), "a tombstone is another copy");
        assert!(!s.remove_copy("zz", 10, Some("1")), "no such key");
        assert!(s.remove_copy("a", 10, Some("1")));
        assert_eq!((s.get("a"), s.len(), s.bytes()), (None, 1, 2));
        s.delete_for_test("b", 11);
        assert!(s.remove_copy("b", 11, None));
        assert_eq!((s.len(), s.tombstones(), s.bytes()), (0, 0, 0));
    }

    /// Regression: copies were ordered by (version, tombstone) only, so two
    /// values written at one version (two roots in one millisecond) never
    /// replaced each other and replicas kept different values for good.
    #[test]
    fn copies_of_one_version_with_different_values_converge_to_one() {
        let v = |value: Value| Versioned {
            version: 7,
            deleted: false,
            value,
        };
        let pairs = [
            (json!("red"), json!("blue")),
            (json!(1), json!(2)),
            (json!({"a": 1}), json!([1])),
            (json!(null), json!(false)),
            (json!("same prefix, longer"), json!("same prefix")),
        ];
        for (x, y) in pairs {
            let (mut a, mut b) = (Store::new(), Store::new());
            a.apply("k", v(x.clone()));
            a.apply("k", v(y.clone()));
            b.apply("k", v(y.clone()));
            b.apply("k", v(x.clone()));
            assert_eq!(a.get("k"), b.get("k"), "{x} vs {y}");
            // The greater JSON text wins, and read repair, which orders the
            // copies it fetches with `supersedes`, picks the same one.
            let (text_x, text_y) = (x.to_string(), y.to_string());
            let (winner, loser) = if text_x > text_y { (x, y) } else { (y, x) };
            assert_eq!(a.get("k").as_ref(), Some(&winner));
            assert!(v(winner.clone()).supersedes(&v(loser.clone())));
            assert!(!v(loser.clone()).supersedes(&v(winner.clone())));
            // The winner again is not news, and the loser is refused.
            assert!(!a.apply("k", v(winner)));
            assert!(!a.apply("k", v(loser)));
        }
        // A tombstone still beats any value at its version.
        let mut s = Store::new();
        s.apply("k", v(json!("zzz")));
        let tombstone = Versioned {
            version: 7,
            deleted: true,
            value: Value::Null,
        };
        assert!(tombstone.supersedes(&v(json!("zzz"))));
        assert!(s.apply("k", tombstone));
        assert!(!s.apply("k", v(json!("zzzz"))));
        assert_eq!(s.get("k"), None);
    }

    #[test]
    fn writes_get_growing_versions_and_deletes_leave_tombstones() {
        let mut s = Store::new();
        let a = s.write("apple", Some(json!("red")), 100);
        assert_eq!(a.version, 100);
        // A root whose clock is behind still moves the version forward.
        let b = s.write("apple", Some(json!({"c": 1})), 50);
        assert_eq!(b.version, 101);
        assert_eq!(s.get("apple"), Some(json!({"c": 1})));
        assert_eq!(s.record("apple").unwrap().value_json(), r#"{"c":1}"#);
        let d = s.write("apple", None, 200);
        assert!(d.deleted && d.version == 200);
        assert_eq!(s.get("apple"), None);
        assert_eq!(
            s.entry("apple"),
            Some(Versioned {
                version: 200,
                deleted: true,
                value: Value::Null
            }),
            "the tombstone stays"
        );
        assert!(s.is_empty());
        assert_eq!(s.tombstones(), 1);
    }

    #[test]
    fn values_come_back_as_they_went_in() {
        let mut s = Store::new();
        let values = [
            json!(null),
            json!(false),
            json!(-0.0),
            json!(1e300),
            json!(u64::MAX),
            json!(i64::MIN),
            json!(""),
            json!("line\nbreak \"quoted\" ünïcødé \u{0}"),
            json!([1, [2, {"a": null}], "x"]),
            json!({"z": 1, "a": {"nested": [true]}}),
        ];
        for (i, v) in values.iter().enumerate() {
            s.write(&format!("k{i}"), Some(v.clone()), 1);
        }
        // A long key needs a varint of more than one byte.
        let long_key = "k".repeat(70_000);
        s.write(&long_key, Some(json!("v".repeat(300))), 1);
        for (i, v) in values.iter().enumerate() {
            assert_eq!(s.get(&format!("k{i}")).as_ref(), Some(v));
        }
        assert_eq!(s.get(&long_key), Some(json!("v".repeat(300))));
        assert_eq!(s.len(), values.len() + 1);
        // A stored `null` is a live value, not a tombstone.
        assert!(!s.record("k0").unwrap().deleted);
    }

    #[test]
    fn copies_converge_to_the_newest_whatever_the_order() {
        let v = |version, deleted| Versioned {
            version,
            deleted,
            value: if deleted { Value::Null } else { json!(version) },
        };
        let orders = [[1, 2, 3], [3, 2, 1], [2, 3, 1]];
        for order in orders {
            let mut s = Store::new();
            for i in order {
                s.apply("k", v(i, false));
            }
            assert_eq!(s.get("k"), Some(json!(3)));
            assert_eq!(s.entry("k"), Some(v(3, false)));
        }
        // An old copy does not bring a deleted value back; a tie goes to the
        // tombstone.
        let mut s = Store::new();
        s.apply("k", v(5, true));
        assert!(!s.apply("k", v(4, false)));
        assert!(!s.apply("k", v(5, false)));
        assert!(!s.apply("k", v(5, true)), "the same copy again is not news");
        assert_eq!(s.get("k"), None);
        assert_eq!(s.len(), 0, "a tombstone is not a live key");
        s.apply("k", v(6, false));
        s.apply("other", v(1, false));
        assert_eq!(s.len(), 2);
        s.write("other", None, 0);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn keys_with_the_same_id_do_not_overwrite_each_other() {
        // SHA-1 collisions cannot be found on demand: give both keys one id.
        let id = NodeId([7; 20]);
        let mut s = Store::new();
        s.write_at(id, "first", Some(json!(1)), 10);
        s.write_at(id, "second", Some(json!(2)), 10);
        assert_eq!(s.record_at(id, "first").map(|r| r.value()), Some(json!(1)));
        assert_eq!(s.record_at(id, "second").map(|r| r.value()), Some(json!(2)));
        assert_eq!(s.record_at(id, "third"), None);
        assert_eq!((s.len(), s.iter().count()), (2, 2));

        // Each keeps its own version, and a write or delete touches only its key.
        assert_eq!(s.write_at(id, "first", Some(json!(3)), 5).version, 11);
        assert!(s.write_at(id, "second", None, 20).deleted);
        assert_eq!(s.record_at(id, "first").map(|r| r.value()), Some(json!(3)));
        assert!(s.record_at(id, "second").unwrap().deleted);
        assert!(!s.apply_at(
            id,
            "second",
            Versioned {
                version: 19,
                deleted: false,
                value: json!("stale")
            }
        ));
        assert!(s.apply_at(
            id,
            "third",
            Versioned {
                version: 1,
                deleted: false,
                value: json!(4)
            }
        ));
        assert_eq!((s.len(), s.tombstones()), (2, 1));
        let keys: Vec<&str> = s.in_arc(&NodeId([6; 20]), &id).map(|r| r.key).collect();
        assert_eq!(keys.len(), 3);
        for k in ["first", "second", "third"] {
            assert!(keys.contains(&k));
        }

        // Dropping the tombstone leaves the other keys of the slot.
        assert_eq!(s.remove_tombstones_before(21), 1);
        assert_eq!(s.record_at(id, "second"), None);
        assert_eq!(s.record_at(id, "first").map(|r| r.value()), Some(json!(3)));
        assert_eq!(s.record_at(id, "third").map(|r| r.value()), Some(json!(4)));
        assert_eq!(s.bytes(), "first".len() + 1 + "third".len() + 1);
    }

    #[test]
    fn an_arc_of_the_ring_is_a_range_and_may_wrap() {
        let id = |b: u8| NodeId([b; 20]);
        let mut s = Store::new();
        for b in [0u8, 10, 20, 30, 255] {
            s.write_at(id(b), &format!("key{b}"), Some(json!(b)), 1);
        }
        let arc = |s: &Store, from, to| -> Vec<u8> {
            s.in_arc(&id(from), &id(to))
                .map(|r| r.value().as_u64().unwrap() as u8)
                .collect()
        };
        // (from, to]: the start is not in the arc, the end is.
        assert_eq!(arc(&s, 10, 30), vec![20, 30]);
        assert_eq!(arc(&s, 11, 19), Vec::<u8>::new());
        // Past the top of the ring and on from zero.
        assert_eq!(arc(&s, 20, 10), vec![30, 255, 0, 10]);
        assert_eq!(arc(&s, 30, 30), vec![255, 0, 10, 20, 30]);
        // Iteration is in id order.
        let all: Vec<NodeId> = s.iter().map(|r| r.key_id).collect();
        assert_eq!(all, vec![id(0), id(10), id(20), id(30), id(255)]);
    }

    #[test]
    fn byte_count_and_tombstone_expiry() {
        let mut s = Store::new();
        s.write("ab", Some(json!("xyz")), 100); // 2 + 5
        s.write("cd", Some(json!(12)), 100); // 2 + 2
        assert_eq!(s.bytes(), 11);
        s.write("ab", Some(json!(1)), 100); // 2 + 1
        assert_eq!(s.bytes(), 7);
        s.write("ab", None, 150); // 2 + 0
        s.write("cd", None, 250);
        assert_eq!((s.bytes(), s.tombstones(), s.len()), (4, 2, 0));
        // Only tombstones older than the bound go, live keys never.
        s.write("ef", Some(json!(true)), 1);
        assert_eq!(s.remove_tombstones_before(200), 1);
        assert_eq!(s.entry("ab"), None);
        assert!(s.entry("cd").is_some_and(|e| e.deleted));
        assert_eq!(s.get("ef"), Some(json!(true)));
        assert_eq!((s.bytes(), s.tombstones(), s.len()), (8, 1, 1));
        // A key whose tombstone is gone can be written afresh.
        assert_eq!(s.write("ab", Some(json!(2)), 10).version, 10);
        assert_eq!(s.remove_tombstones_before(u64::MAX), 1);
        assert_eq!((s.tombstones(), s.len(), s.iter().count()), (0, 2, 2));
    }

    #[test]
    fn caps_count_entries_and_bytes_and_let_a_full_store_shrink() {
        let mut s = Store::new();
        // "ab" + "\"xyz\"": 2 + 5 bytes.
        s.write("ab", Some(json!("xyz")), 1);
        assert_eq!(s.bytes(), 7);
        assert_eq!(s.entries(), 1);
        // Two entries at most, 20 bytes at most.
        let (keys, bytes) = (2, 20);
        assert!(
            s.fits(
                "cd",
                charge("cd", Some(&json!(123456).to_string())),
                keys,
                bytes
            ),
            "8 more: 15"
        );
        assert!(
            !s.fits(
                "cd",
                charge("cd", Some(&json!("a long value").to_string())),
                keys,
                bytes
            ),
            "16 more: 23"
        );
        s.write("cd", Some(json!(123456)), 1);
        assert_eq!(s.bytes(), 15);
        assert!(
            !s.fits("ef", charge("ef", Some(&json!(1).to_string())), keys, bytes),
            "a third entry"
        );
        // A key it holds may grow within the byte cap, and may always shrink or
        // be deleted.
        assert!(
            s.fits(
                "ab",
                charge("ab", Some(&json!("xyzxyz").to_string())),
                keys,
                bytes
            ),
            "18 bytes"
        );
        assert!(
            !s.fits(
                "ab",
                charge("ab", Some(&json!("xyzxyzxyz").to_string())),
                keys,
                bytes
            ),
            "21 bytes"
        );
        let tombstone = Versioned {
            version: 2,
            deleted: true,
            value: Value::Null,
        };
        assert!(s.fits("ab", charge("ab", None), 0, 0));
        s.apply("ab", tombstone);
        assert_eq!(s.bytes(), 2 + 8, "a tombstone counts its key only");
        assert_eq!(s.entries(), 2, "and still counts as an entry");
        s.write("cd", Some(json!(1)), 5);
        assert_eq!(s.bytes(), 2 + 3);
    }
}
