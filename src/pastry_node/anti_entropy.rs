//! Anti-entropy digests: how two replicas find out, cheaply, whether they hold
//! the same copies.
//!
//! Pushes after every write and every leaf-set change keep replicas in step; a
//! push can still be lost (a peer busy past its timeout, a node that died
//! mid-push). So now and then each node compares notes with each leaf-set
//! member: it splits the keys that both of them should hold into buckets by key
//! id and sends one 64-bit hash per bucket, a *digest*. The member computes the
//! same over its own copies and answers with the buckets that differ; only the
//! copies in those buckets are sent. When nothing differs, a whole exchange
//! costs one small message each way, whatever the number of keys. (Dynamo and
//! Cassandra use Merkle trees for the same purpose; one level of buckets is
//! enough at the sizes a leaf set shares.)
//!
//! Both sides must bucket and hash identically, so the hash is a fixed function
//! (SplitMix64's finalizer), never the standard library's randomly seeded one.
//! A bucket's hash is the wrapping sum of its entries' hashes: independent of
//! order, so it can be accumulated in one pass over the store, and kept up to
//! date by adding a copy's hash and subtracting the one it replaced.
//!
//! A copy's hash covers its value, not only its version: two roots that write a
//! key in the same millisecond (while routing is briefly inconsistent) make two
//! copies of one version with different values, and a digest blind to values
//! would call those replicas equal forever. Once the digests differ, the copies
//! are exchanged and the store's order (see `store`) picks the same winner on
//! both sides. The value's hash is taken from its stored JSON text when needed,
//! not kept with the record: the store's one-allocation layout stays as small
//! as it was, and hashing a small value costs little next to the walk.
//!
//! Pure: no sockets, locks, clocks or logging.

use crate::utils::{closer_to, NodeId, NodeInfo};

/// About this many shared keys per bucket: a differing bucket costs sending
/// this many copies, most of them already there.
pub const KEYS_PER_BUCKET: usize = 32;

/// Most buckets in one digest, so that a digest line stays well under the line
/// limit (each bucket is a number of up to 20 digits).
pub const MAX_BUCKETS: usize = 16_384;

/// How many buckets to use for `shared` keys.
pub fn bucket_count(shared: usize) -> usize {
    (shared / KEYS_PER_BUCKET).clamp(1, MAX_BUCKETS)
}

/// The bucket of `key_id` among `buckets`.
pub fn bucket_of(key_id: &NodeId, buckets: usize) -> usize {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&key_id.0[..8]);
    (u64::from_be_bytes(prefix) % buckets.max(1) as u64) as usize
}

/// SplitMix64's finalizer: a fixed, well-mixing 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a digest counts of one copy of a key: enough to tell apart any two
/// copies the store would not take as the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub version: u64,
    /// True for a tombstone.
    pub deleted: bool,
    /// [`value_hash`] of the value's JSON text (of no bytes in a tombstone).
    pub value: u64,
}

impl Summary {
    /// The summary of a copy whose value is stored as `text` (`None`: a
    /// tombstone, which keeps no value).
    pub fn new(version: u64, text: Option<&[u8]>) -> Summary {
        Summary {
            version,
            deleted: text.is_none(),
            value: value_hash(text.unwrap_or_default()),
        }
    }
}

/// A fixed hash of a value's JSON text, eight bytes a step. Not collision-proof
/// against a writer who crafts values for it; a collision would only hide a
/// difference from digests, and copies that meet by any other path (a write's
/// push, a read) still settle on one value.
pub fn value_hash(text: &[u8]) -> u64 {
    // The length first, so that texts that differ only by trailing zero padding
    // of the last word hash differently.
    let mut h = mix(text.len() as u64 ^ 0x9e37_79b9_7f4a_7c15);
    let mut words = text.chunks_exact(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        h = mix(h ^ u64::from_le_bytes(w));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        h = mix(h ^ u64::from_le_bytes(w));
    }
    h
}

/// The hash of one copy: its key id, version, whether it is a tombstone, and
/// its value.
pub fn entry_hash(key_id: &NodeId, copy: &Summary) -> u64 {
    let mut h = mix(copy.version ^ u64::from(copy.deleted) << 63);
    h = mix(h ^ copy.value);
    for chunk in key_id.0.chunks(8) {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(word));
    }
    h
}

/// A digest being accumulated: one hash per bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    pub buckets: Vec<u64>,
}

impl Digest {
    pub fn new(buckets: usize) -> Digest {
        Digest {
            buckets: vec![0; buckets.max(1)],
        }
    }

    pub fn add(&mut self, key_id: &NodeId, copy: &Summary) {
        let b = bucket_of(key_id, self.buckets.len());
        self.buckets[b] = self.buckets[b].wrapping_add(entry_hash(key_id, copy));
    }

    /// Takes a copy out again (it was replaced or dropped): sums are reversible.
    /// `copy` must be the summary it was added with, value hash included.
    pub fn remove(&mut self, key_id: &NodeId, copy: &Summary) {
        let b = bucket_of(key_id, self.buckets.len());
        self.buckets[b] = self.buckets[b].wrapping_sub(entry_hash(key_id, copy));
    }

    /// The buckets in which `other` differs from us (both must have as many).
    pub fn differing(&self, other: &[u64]) -> Vec<u32> {
        self.buckets
            .iter()
            .zip(other)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, _)| i as u32)
            .collect()
    }
}

/// The members of L ∪ {us} in ring order, so that the replica set of any key
/// (its k closest members) is found in O(log |L| + k) steps instead of sorting
/// all members for each key: a round walks every key a node holds.
#[derive(Clone, Debug)]
pub struct ReplicaRing {
    nodes: Vec<NodeInfo>,
}

impl ReplicaRing {
    pub fn new(mut nodes: Vec<NodeInfo>) -> ReplicaRing {
        nodes.sort_by_key(|n| n.node_id);
        nodes.dedup_by_key(|n| n.node_id);
        ReplicaRing { nodes }
    }

    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The indices (into [`ReplicaRing::nodes`]) of the `k` members closest to
    /// `key`, closest first: the same order as sorting by `closer_to`. Two
    /// fingers start on either side of the key and move outwards, each step
    /// taking the nearer of the two; a node past the antipode on one side is
    /// nearer from the other side, where the other finger reaches it first.
    pub fn replica_set(&self, key: &NodeId, k: usize, out: &mut Vec<usize>) {
        out.clear();
        let n = self.nodes.len();
        if n == 0 {
            return;
        }
        let mut right = self.nodes.partition_point(|m| m.node_id < *key) % n;
        let mut left = (right + n - 1) % n;
        for _ in 0..k.min(n) {
            let pick = if out.len() + 1 == n || right == left {
                right
            } else {
                match closer_to(key, &self.nodes[right].node_id, &self.nodes[left].node_id) {
                    std::cmp::Ordering::Greater => left,
                    _ => right,
                }
            };
            out.push(pick);
            if pick == right {
                right = (right + 1) % n;
            } else {
                left = (left + n - 1) % n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies as (key, version, value text); `None` is a tombstone.
    type Copies<'a> = &'a [(&'a str, u64, Option<&'a str>)];

    fn digest(entries: Copies<'_>, buckets: usize) -> Digest {
        let mut d = Digest::new(buckets);
        for (k, v, text) in entries {
            d.add(
                &NodeId::for_key(k),
                &Summary::new(*v, text.map(str::as_bytes)),
            );
        }
        d
    }

    #[test]
    fn equal_copies_give_equal_digests_in_any_order() {
        let a = digest(
            &[("a", 1, Some("1")), ("b", 2, Some("2")), ("c", 3, None)],
            4,
        );
        let b = digest(
            &[("c", 3, None), ("a", 1, Some("1")), ("b", 2, Some("2"))],
            4,
        );
        assert!(a.differing(&b.buckets).is_empty());
    }

    #[test]
    fn a_missing_newer_deleted_or_other_valued_copy_shows_in_its_bucket_only() {
        let base = [
            ("a", 1, Some("1")),
            ("b", 2, Some("2")),
            ("c", 3, Some("3")),
        ];
        let full = digest(&base, 64);
        let bucket = |k: &str| bucket_of(&NodeId::for_key(k), 64) as u32;
        let cases: [(Copies<'_>, &str); 4] = [
            (&[("a", 1, Some("1")), ("b", 2, Some("2"))], "c"),
            (
                &[
                    ("a", 1, Some("1")),
                    ("b", 9, Some("2")),
                    ("c", 3, Some("3")),
                ],
                "b",
            ),
            (
                &[("a", 1, None), ("b", 2, Some("2")), ("c", 3, Some("3"))],
                "a",
            ),
            // Same versions, one value differs: two roots wrote "c" in one
            // millisecond.
            (
                &[
                    ("a", 1, Some("1")),
                    ("b", 2, Some("2")),
                    ("c", 3, Some("4")),
                ],
                "c",
            ),
        ];
        for (other, key) in cases {
            assert_eq!(
                full.differing(&digest(other, 64).buckets),
                vec![bucket(key)],
                "{key}"
            );
        }
    }

    /// Regression: digests hashed (key, version, tombstone) only, so replicas
    /// holding different values at one version looked equal and never
    /// exchanged them.
    #[test]
    fn copies_of_one_version_with_different_values_give_different_digests() {
        for (x, y) in [
            (r#""red""#, r#""blue""#),
            ("1", "2"),
            ("{}", "[]"),
            ("null", "0"),
        ] {
            for buckets in [1, 7] {
                let a = digest(&[("k", 5, Some(x)), ("other", 5, Some("1"))], buckets);
                let b = digest(&[("k", 5, Some(y)), ("other", 5, Some("1"))], buckets);
                assert_eq!(
                    a.differing(&b.buckets),
                    vec![bucket_of(&NodeId::for_key("k"), buckets) as u32],
                    "{x} vs {y}"
                );
            }
        }
        // Texts that differ only past the first eight bytes, or by a trailing
        // byte the last word's padding would hide.
        let long = |c: char| format!("\"{}{c}\"", "x".repeat(20));
        assert_ne!(
            value_hash(long('a').as_bytes()),
            value_hash(long('b').as_bytes())
        );
        assert_ne!(value_hash(b"12345678"), value_hash(b"12345678\0"));
    }

    #[test]
    fn the_ring_finds_the_same_replica_sets_as_sorting() {
        let mut seed = 7u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = Vec::new();
        for n in [1usize, 2, 3, 5, 17, 33] {
            let nodes: Vec<NodeInfo> = (0..n)
                .map(|_| {
                    let port = (next() % 60_000) as u16 + 1;
                    NodeInfo::new(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                })
                .collect();
            let ring = ReplicaRing::new(nodes.clone());
            for _ in 0..500 {
                let key = NodeId::for_key(&next().to_string());
                for k in [1, 3, 9, 40] {
                    let mut sorted = ring.nodes().to_vec();
                    sorted.sort_by(|a, b| closer_to(&key, &a.node_id, &b.node_id));
                    sorted.truncate(k);
                    ring.replica_set(&key, k, &mut out);
                    let got: Vec<NodeInfo> = out.iter().map(|&i| ring.nodes()[i]).collect();
                    assert_eq!(got, sorted, "n {n} k {k}");
                }
            }
        }
    }

    #[test]
    fn removing_a_copy_undoes_adding_it() {
        let mut d = digest(&[("a", 1, Some("1")), ("b", 2, Some("2"))], 8);
        let before = d.clone();
        let copy = Summary::new(3, Some(b"\"c\""));
        d.add(&NodeId::for_key("c"), &copy);
        d.remove(&NodeId::for_key("c"), &copy);
        assert_eq!(d, before);
    }

    #[test]
    fn bucket_count_grows_with_the_keys_within_bounds() {
        assert_eq!(bucket_count(0), 1);
        assert_eq!(bucket_count(10 * KEYS_PER_BUCKET), 10);
        assert_eq!(bucket_count(usize::MAX), MAX_BUCKETS);
    }
}
