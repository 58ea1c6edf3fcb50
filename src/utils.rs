//! Identifiers and their arithmetic: the circular 160-bit id space of Pastry.
//!
//! The paper gives every node and every key a 128-bit id; like FreePastry we use
//! the whole 160-bit SHA-1 digest. A node's id is SHA-1 of `"ip:port"`, a key's
//! id is SHA-1 of the key's UTF-8 bytes. Ids are read as `DIGITS` digits of `B`
//! bits each (b = 4: hex digits), most significant first.
//!
//! Everything here is pure: no sockets, locks, clocks or logging.

use std::cmp::Ordering;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bits per digit (the paper's `b`).
pub const B: usize = 4;
/// Number of distinct digit values, 2^b: the routing table has this many columns.
pub const BASE: usize = 1 << B;
/// Bytes in an id (SHA-1 digest length).
pub const ID_BYTES: usize = 20;
/// Digits in an id: 160 / b. The routing table has (at most) this many rows.
pub const DIGITS: usize = ID_BYTES * 8 / B;
/// Default leaf set size |L|: |L|/2 smaller and |L|/2 larger neighbours.
pub const LEAF_SET_SIZE: usize = 16;
/// Neighborhood set size |M|.
pub const NEIGHBORHOOD_SIZE: usize = 32;
/// Hard cap on the number of node-to-node forwards of one message. Correct routing
/// needs fewer than log16 N hops; the cap only stops bugs and forged messages.
pub const MAX_HOPS: u32 = 64;

/// A 160-bit identifier on the ring, stored big-endian so that byte order is
/// numeric order.
#[derive(Clone, Copy, Eq, Default)]
pub struct NodeId(pub [u8; ID_BYTES]);

impl Ord for NodeId {
    /// Numeric order, which is byte order (big-endian), as derived; but compared
    /// as a 32-bit and a 128-bit number rather than by a `memcmp` call, because
    /// leaf sets sort and range-check ids all the time (7% of a simulated build
    /// went to `memcmp` here).
    fn cmp(&self, other: &NodeId) -> Ordering {
        self.limbs().cmp(&other.limbs())
    }
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &NodeId) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for NodeId {
    /// Byte for byte, as derived, but as two 64-bit words and a 32-bit one:
    /// membership tests compare ids all the time, and the derived comparison
    /// called `memcmp` for each (6% of a simulated build in a profile).
    fn eq(&self, other: &NodeId) -> bool {
        fn words(id: &NodeId) -> (u64, u64, u32) {
            let (mut a, mut b, mut c) = ([0u8; 8], [0u8; 8], [0u8; 4]);
            a.copy_from_slice(&id.0[..8]);
            b.copy_from_slice(&id.0[8..16]);
            c.copy_from_slice(&id.0[16..]);
            (
                u64::from_ne_bytes(a),
                u64::from_ne_bytes(b),
                u32::from_ne_bytes(c),
            )
        }
        words(self) == words(other)
    }
}

impl std::hash::Hash for NodeId {
    /// As derived: equal ids hash equally.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl NodeId {
    pub const ZERO: NodeId = NodeId([0; ID_BYTES]);

    /// SHA-1 of arbitrary bytes: a key's id.
    pub fn hash(bytes: &[u8]) -> NodeId {
        NodeId(sha1_smol::Sha1::from(bytes).digest().bytes())
    }

    /// The id of the node listening at `addr`: SHA-1 of `"ip:port"`.
    ///
    /// Every node entry a node takes in is checked against this, so an IPv4
    /// address is written out by hand into a stack buffer: the same text as
    /// `addr.to_string()` (a unit test holds them equal), without the formatting
    /// machinery and the allocation, which were most of the cost of a check.
    pub fn for_addr(addr: &SocketAddr) -> NodeId {
        let SocketAddr::V4(v4) = addr else {
            return NodeId::hash(addr.to_string().as_bytes());
        };
        // "255.255.255.255:65535" is 21 bytes.
        fn push_decimal(text: &mut [u8; 21], len: &mut usize, mut v: u32) {
            let mut digits = [0u8; 5];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (v % 10) as u8;
                n += 1;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            for d in digits[..n].iter().rev() {
                text[*len] = *d;
                *len += 1;
            }
        }
        let mut text = [0u8; 21];
        let mut len = 0;
        for (i, octet) in v4.ip().octets().into_iter().enumerate() {
            push_decimal(&mut text, &mut len, u32::from(octet));
            text[len] = if i < 3 { b'.' } else { b':' };
            len += 1;
        }
        push_decimal(&mut text, &mut len, u32::from(v4.port()));
        NodeId::hash(&text[..len])
    }

    /// The id of a key.
    pub fn for_key(key: &str) -> NodeId {
        NodeId::hash(key.as_bytes())
    }

    /// Digit `i` (0 = most significant) in base 2^b.
    pub fn digit(&self, i: usize) -> usize {
        let byte = self.0[i / 2];
        if i.is_multiple_of(2) {
            (byte >> 4) as usize
        } else {
            (byte & 0x0f) as usize
        }
    }

    /// The id as a 32-bit high part and a 128-bit low part, for fast arithmetic.
    fn limbs(&self) -> (u32, u128) {
        let mut hi = [0u8; 4];
        let mut lo = [0u8; 16];
        hi.copy_from_slice(&self.0[..4]);
        lo.copy_from_slice(&self.0[4..]);
        (u32::from_be_bytes(hi), u128::from_be_bytes(lo))
    }

    fn from_limbs(hi: u32, lo: u128) -> NodeId {
        let mut out = [0u8; ID_BYTES];
        out[..4].copy_from_slice(&hi.to_be_bytes());
        out[4..].copy_from_slice(&lo.to_be_bytes());
        NodeId(out)
    }

    /// `self - other` modulo 2^160: the clockwise distance from `other` to `self`.
    pub fn wrapping_sub(&self, other: &NodeId) -> NodeId {
        let ((ah, al), (bh, bl)) = (self.limbs(), other.limbs());
        let (lo, borrow) = al.overflowing_sub(bl);
        NodeId::from_limbs(ah.wrapping_sub(bh).wrapping_sub(borrow as u32), lo)
    }

    /// `self + other` modulo 2^160.
    pub fn wrapping_add(&self, other: &NodeId) -> NodeId {
        let ((ah, al), (bh, bl)) = (self.limbs(), other.limbs());
        let (lo, carry) = al.overflowing_add(bl);
        NodeId::from_limbs(ah.wrapping_add(bh).wrapping_add(carry as u32), lo)
    }

    /// Clockwise distance from `self` to `to` (how far `to` lies "above" us).
    pub fn cw_distance(&self, to: &NodeId) -> NodeId {
        to.wrapping_sub(self)
    }

    /// Circular distance: `min(a - b, b - a)` mod 2^160.
    pub fn distance(&self, other: &NodeId) -> NodeId {
        let up = other.wrapping_sub(self);
        let down = self.wrapping_sub(other);
        up.min(down)
    }

    /// The first 8 hex digits, for logs and the demo.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

/// Length of the shared prefix of `a` and `b`, in digits (the paper's `shl`).
pub fn shl(a: &NodeId, b: &NodeId) -> usize {
    for (i, (x, y)) in a.0.iter().zip(b.0.iter()).enumerate() {
        if x != y {
            return if x >> 4 != y >> 4 { 2 * i } else { 2 * i + 1 };
        }
    }
    DIGITS
}

/// Orders `a` and `b` by closeness to `key`: nearer on the ring first, ties toward
/// the smaller id. Every node uses this one rule, so every node names the same root.
pub fn closer_to(key: &NodeId, a: &NodeId, b: &NodeId) -> Ordering {
    key.distance(a).cmp(&key.distance(b)).then(a.cmp(b))
}

/// True when `x` lies on the clockwise arc from `from` to `to`, both ends included.
pub fn in_arc(from: &NodeId, to: &NodeId, x: &NodeId) -> bool {
    from.cw_distance(x) <= from.cw_distance(to)
}

impl NodeId {
    /// The 40 lowercase hex digits, without going through `core::fmt` per byte:
    /// every message carries several ids, so this is on the hot path.
    fn hex(&self) -> [u8; 2 * ID_BYTES] {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 2 * ID_BYTES];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[(b >> 4) as usize];
            out[2 * i + 1] = DIGITS[(b & 0x0f) as usize];
        }
        out
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.hex();
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&hex).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

/// Why a string is not an id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError(pub String);

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseIdError {}

impl FromStr for NodeId {
    type Err = ParseIdError;

    /// Accepts exactly 40 lowercase hex digits, the only form ids take on the wire.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != DIGITS {
            return Err(ParseIdError(format!(
                "an id is {DIGITS} lowercase hex digits, got {} characters",
                s.len()
            )));
        }
        let mut out = [0u8; ID_BYTES];
        for (i, c) in s.bytes().enumerate() {
            let v = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => {
                    return Err(ParseIdError(format!(
                        "an id is {DIGITS} lowercase hex digits, found {:?}",
                        c as char
                    )))
                }
            };
            out[i / 2] |= if i.is_multiple_of(2) { v << 4 } else { v };
        }
        Ok(NodeId(out))
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let hex = self.hex();
        s.serialize_str(std::str::from_utf8(&hex).map_err(serde::ser::Error::custom)?)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A node as other nodes know it: its id and the address to dial.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: NodeId,
    pub addr: SocketAddr,
}

impl NodeInfo {
    /// A node whose id is derived from its address, as every real node's is.
    pub fn new(addr: SocketAddr) -> NodeInfo {
        NodeInfo {
            node_id: NodeId::for_addr(&addr),
            addr,
        }
    }

    /// True when the id is SHA-1 of the address: the only ids a node accepts.
    pub fn is_genuine(&self) -> bool {
        self.node_id == NodeId::for_addr(&self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn for_addr_hashes_the_text_to_string_gives() {
        let mut addrs: Vec<SocketAddr> = vec![
            "0.0.0.0:0".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "127.0.0.1:5000".parse().unwrap(),
            "10.0.9.100:10".parse().unwrap(),
            "[::1]:4000".parse().unwrap(),
        ];
        // Every octet and port width, from a fixed pseudo-random walk.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_be_bytes();
            let ip = std::net::Ipv4Addr::new(b[0] >> (b[4] % 8), b[1], b[2] % 10, b[3]);
            let port = (x >> 40) as u16 >> (b[5] % 16);
            addrs.push(SocketAddr::from((ip, port)));
        }
        for a in addrs {
            assert_eq!(
                NodeId::for_addr(&a),
                NodeId::hash(a.to_string().as_bytes()),
                "{a}"
            );
        }
    }

    fn id(hex: &str) -> NodeId {
        let padded = format!("{hex:0<40}");
        padded.parse().unwrap()
    }

    fn from_u64(v: u64) -> NodeId {
        let mut b = [0u8; ID_BYTES];
        b[12..].copy_from_slice(&v.to_be_bytes());
        NodeId(b)
    }

    #[test]
    fn sha1_of_known_strings() {
        assert_eq!(
            NodeId::for_key("abc").to_string(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(NodeId::for_addr(&addr), NodeId::hash(b"127.0.0.1:4000"));
    }

    #[test]
    fn digits_most_significant_first() {
        let x = id("a5f");
        assert_eq!(
            (x.digit(0), x.digit(1), x.digit(2), x.digit(3)),
            (10, 5, 15, 0)
        );
    }

    #[test]
    fn shared_prefix_length() {
        let cases = [
            ("a5f", "a5f", DIGITS),
            ("a5f", "a50", 2),
            ("a5f", "a4f", 1),
            ("a5f", "b5f", 0),
            ("a5f0001", "a5f0002", 6),
        ];
        for (a, b, want) in cases {
            assert_eq!(shl(&id(a), &id(b)), want, "shl({a}, {b})");
        }
    }

    #[test]
    fn distance_wraps_around() {
        let max = NodeId([0xff; ID_BYTES]);
        let one = from_u64(1);
        // max and 1 are 2 apart across zero, not 2^160 - 2.
        assert_eq!(max.distance(&one), from_u64(2));
        assert_eq!(one.distance(&max), from_u64(2));
        assert_eq!(from_u64(10).distance(&from_u64(3)), from_u64(7));
        assert_eq!(max.wrapping_add(&from_u64(3)), from_u64(2));
        assert_eq!(from_u64(2).wrapping_sub(&from_u64(3)), max);
    }

    #[test]
    fn ties_go_to_the_smaller_id() {
        let key = from_u64(10);
        let (a, b) = (from_u64(8), from_u64(12));
        assert_eq!(closer_to(&key, &a, &b), Ordering::Less);
        assert_eq!(closer_to(&key, &b, &a), Ordering::Greater);
    }

    #[test]
    fn arcs_across_zero() {
        let max = NodeId([0xff; ID_BYTES]);
        assert!(in_arc(&max, &from_u64(5), &from_u64(0)));
        assert!(!in_arc(&from_u64(5), &max, &from_u64(0)));
        assert!(in_arc(&from_u64(5), &from_u64(5), &from_u64(5)));
    }

    #[test]
    fn parse_rejects_wrong_length_and_case() {
        assert!("A9993e364706816aba3e25717850c26c9cd0d89d"
            .parse::<NodeId>()
            .is_err());
        assert!("a9993e".parse::<NodeId>().is_err());
        assert!("g9993e364706816aba3e25717850c26c9cd0d89d"
            .parse::<NodeId>()
            .is_err());
        let s = "a9993e364706816aba3e25717850c26c9cd0d89d";
        assert_eq!(s.parse::<NodeId>().unwrap().to_string(), s);
    }

    /// Property: distance is symmetric and a - b + b == a, over many pseudo-random ids.
    #[test]
    fn arithmetic_properties() {
        let mut x = NodeId::for_key("seed");
        for i in 0..2000 {
            let y = NodeId::for_key(&format!("k{i}"));
            assert_eq!(x.distance(&y), y.distance(&x));
            assert_eq!(x.wrapping_sub(&y).wrapping_add(&y), x);
            let d = x.distance(&y);
            // The circular distance is never more than half the ring.
            assert!(
                d.0[0] < 0x80
                    || d == NodeId({
                        let mut h = [0u8; ID_BYTES];
                        h[0] = 0x80;
                        h
                    })
            );
            assert!(shl(&x, &y) < DIGITS);
            x = y;
        }
    }
}
