//! The messages nodes and clients exchange, and what a node does with each.
//!
//! Wire format: one JSON object per line, tagged by `"type"`. Clients and nodes use
//! the same port and framing. A line is decoded once, here, into a [`Request`]; the
//! node answers with exactly one [`Reply`]. Any request may carry an `"id"` (any
//! JSON value), which is echoed in the reply.
//!
//! How a routed request travels (recursive routing, as the paper describes it):
//! 1. A client sends `put`, `get`, `delete` or `route` to any node; a new node sends
//!    `join` to its bootstrap. That node handles it at hop 0.
//! 2. The node asks its routing state (`RoutingState::route`) where the key goes.
//!    If it is the root, it performs the operation (`deliver`).
//! 3. Otherwise it sends `{"type":"forward","hops":h+1,"op":...}` to the next hop,
//!    waits for that node's reply and relays it back, adding itself to a `route`'s
//!    path and its routing-table rows to a `join`'s reply on the way.
//! 4. If the next hop does not answer, it is reported to the maintenance thread and
//!    the message is routed around it at this hop.
//!
//! [`handle`] is the one entry point. It is the same whether the request came over
//! TCP or from the in-process simulator: only the [`Transport`] differs.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::pastry_node::router::Route;
use crate::pastry_node::store::json_len;
use crate::pastry_node::store::Versioned;
use crate::pastry_node::transport::Transport;
use crate::pastry_node::{Config, KeyEntry, Node, Offer, StoreFull};
use crate::utils::{NodeId, NodeInfo};

/// JSON-RPC 2.0 error codes, as the client protocol promises.
pub mod code {
    /// The line is not valid JSON.
    pub const PARSE_ERROR: i64 = -32700;
    /// Valid JSON, but not an object with a string `type`.
    pub const INVALID_REQUEST: i64 = -32600;
    /// `type` names no known request.
    pub const UNKNOWN_TYPE: i64 = -32601;
    /// A field is missing or of the wrong type.
    pub const INVALID_PARAMS: i64 = -32602;
    /// No node could be reached to route the request on.
    pub const PEER_UNAVAILABLE: i64 = -32001;
    /// The message was forwarded more than `MAX_HOPS` times.
    pub const HOP_CAP: i64 = -32002;
    /// The line is longer than the node accepts; the connection is then closed.
    pub const LINE_TOO_LONG: i64 = -32003;
    /// The node serves as many connections as it may.
    pub const BUSY: i64 = -32005;
    /// A node entry in a node-to-node message is not genuine: its id is not SHA-1
    /// of its address, it claims to be the receiving node, or nobody answers as
    /// that node at that address when dialled back.
    pub const BAD_NODE: i64 = -32004;
    /// The root's store holds as many entries or bytes as its caps allow.
    pub const STORE_FULL: i64 = -32006;
    /// The node is joining and its leaf set is not confirmed yet.
    pub const JOINING: i64 = -32007;
    /// The root could not make the write the newest copy of its key: members of
    /// the replica set hold a copy that outranks any version the root can give
    /// (one planted with the highest version). The write is not acknowledged.
    pub const CONFLICT: i64 = -32008;
}

/// Deepest nesting of arrays and objects accepted in a value. The parser stops at
/// 128 levels, and a value travels wrapped in up to three more (`forward`,
/// `replicate`): a cap well below keeps every stored value readable by every node.
pub const MAX_VALUE_DEPTH: usize = 64;

/// An operation routed to the root of a key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Op {
    Put {
        key: String,
        value: Value,
    },
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    Route {
        key: String,
    },
    /// A new node asks to be routed to its own id, collecting state on the way.
    Join {
        node: NodeInfo,
    },
}

impl Op {
    /// The id the operation is routed toward.
    pub fn key_id(&self) -> NodeId {
        match self {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } | Op::Route { key } => {
                NodeId::for_key(key)
            }
            Op::Join { node } => node.node_id,
        }
    }
}

/// Everything a node accepts on its port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    // Client requests.
    Ping,
    Help,
    #[serde(alias = "store")]
    Put {
        key: String,
        value: Value,
    },
    #[serde(alias = "lookup")]
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    Route {
        key: String,
    },
    Status,
    Stats,
    // Node-to-node requests.
    /// Sent by a new node to its bootstrap: route me to my own id.
    Join {
        node: NodeInfo,
    },
    /// A routed operation, `hops` node-to-node forwards from where it entered.
    Forward {
        hops: u32,
        op: Op,
    },
    /// "I exist, and you may want me in your state; what is your leaf set?" Sent by a
    /// new node to everyone in its state, and periodically to leaf-set members.
    /// As in the paper, the sender passes on its own state, narrowed to what the
    /// receiver can place: `rows` holds the sender's routing-table row at their
    /// shared prefix length, so that the receiver fills any empty slot there.
    Announce {
        node: NodeInfo,
        #[serde(default)]
        rows: Vec<NodeInfo>,
    },
    /// Copies of keys for a member of their replica set: from the root on every
    /// write, and from any holder when the replica set changes. The receiver keeps
    /// each copy that ranks above its own (newer, or the winner of a tie at the
    /// same version: `store::rank`).
    Replicate {
        entries: Vec<KeyEntry>,
    },
    /// A root that lacks a key asks the rest of the replica set for it.
    Fetch {
        key: String,
    },
    /// Anti-entropy: the sender's digest of the keys both it and the receiver
    /// should hold (see `pastry_node::anti_entropy`). The receiver answers with
    /// the buckets in which its own copies differ.
    Digest {
        node: NodeInfo,
        buckets: Vec<u64>,
    },
    /// "I am leaving" (the paper's graceful departure: tell the leaf set, hand
    /// off the data, stop). Sent by a node that leaves, after it has handed its
    /// keys over and closed its port, to every node in its state. Anyone can send
    /// this naming any node, so it is not taken on trust: the receiver probes the
    /// node and forgets it only if it no longer answers, as it would a suspect.
    Leave {
        node: NodeInfo,
    },
}

/// Every request kind by its canonical name (aliases map to these), as `stats`
/// counts them.
pub const KINDS: [&str; 15] = [
    "ping",
    "help",
    "put",
    "get",
    "delete",
    "route",
    "status",
    "stats",
    "join",
    "forward",
    "announce",
    "replicate",
    "fetch",
    "digest",
    "leave",
];

/// Other names a request type is accepted under (the original design's), with
/// the type they stand for; the `#[serde(alias)]`es on [`Request`] say the same.
pub const ALIASES: [(&str, &str); 2] = [("store", "put"), ("lookup", "get")];

/// Every request type a node accepts, aliases included, as the `unknown type`
/// error lists them.
pub fn request_types() -> Vec<&'static str> {
    KINDS
        .iter()
        .copied()
        .chain(ALIASES.iter().map(|(alias, _)| *alias))
        .collect()
}

impl Request {
    /// The name counted in `stats` (an alias counts as the type it stands for).
    pub fn kind(&self) -> &'static str {
        KINDS[self.kind_index()]
    }

    /// The request's place in [`KINDS`], for counting without a map.
    pub fn kind_index(&self) -> usize {
        match self {
            Request::Ping => 0,
            Request::Help => 1,
            Request::Put { .. } => 2,
            Request::Get { .. } => 3,
            Request::Delete { .. } => 4,
            Request::Route { .. } => 5,
            Request::Status => 6,
            Request::Stats => 7,
            Request::Join { .. } => 8,
            Request::Forward { .. } => 9,
            Request::Announce { .. } => 10,
            Request::Replicate { .. } => 11,
            Request::Fetch { .. } => 12,
            Request::Digest { .. } => 13,
            Request::Leave { .. } => 14,
        }
    }
}

/// A leaf set as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeafSetView {
    pub smaller: Vec<NodeInfo>,
    pub larger: Vec<NodeInfo>,
}

/// One routing-table entry as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableEntryView {
    pub row: usize,
    pub col: usize,
    pub node_id: NodeId,
    pub addr: std::net::SocketAddr,
    /// Measured proximity (round-trip microseconds), if measured.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proximity: Option<u64>,
}

/// One neighborhood-set member as `status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeighborView {
    pub node_id: NodeId,
    pub addr: std::net::SocketAddr,
    pub proximity: u64,
}

/// One command as `help` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandHelp {
    #[serde(rename = "type")]
    pub kind: String,
    pub fields: Vec<String>,
    pub description: String,
}

/// Every reply a node sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Pong {
        node_id: NodeId,
        addr: std::net::SocketAddr,
    },
    Help {
        commands: Vec<CommandHelp>,
    },
    PutOk {
        key: String,
        key_id: NodeId,
        owner: NodeId,
        hops: u32,
        /// Nodes that hold the value now, the root included.
        replicas: usize,
    },
    Value {
        key: String,
        value: Value,
        owner: NodeId,
        hops: u32,
    },
    NotFound {
        key: String,
        owner: NodeId,
        hops: u32,
    },
    Deleted {
        key: String,
        existed: bool,
        owner: NodeId,
        hops: u32,
        /// Nodes that hold the tombstone now, the root included.
        replicas: usize,
    },
    Route {
        key: String,
        key_id: NodeId,
        path: Vec<NodeInfo>,
        owner: NodeId,
        hops: u32,
    },
    Status {
        node_id: NodeId,
        addr: std::net::SocketAddr,
        leaf_set: LeafSetView,
        routing_table: Vec<TableEntryView>,
        neighborhood: Vec<NeighborView>,
        keys: usize,
    },
    Stats {
        node_id: NodeId,
        messages: std::collections::BTreeMap<String, u64>,
        forwards: u64,
        /// Forwards chosen by the paper's rare case.
        rare_case: u64,
        errors: u64,
        keys: usize,
        connections_open: u64,
        peers_failed: u64,
        /// Copies of keys other nodes took from our replication pushes.
        keys_replicated: u64,
        /// Tombstones held (deleted keys whose tombstone has not expired).
        tombstones: usize,
        /// Copies dropped because the nodes that should hold them do.
        copies_dropped: u64,
        /// Events waiting for the maintenance thread (probes, suspected peers):
        /// a queue that stays long means maintenance cannot keep up.
        maintenance_queue: usize,
        uptime_ms: u64,
    },
    /// The reply to `join`: what the nodes on the route contributed.
    Joined {
        /// The node numerically closest to the new node's id.
        root: NodeInfo,
        /// The nodes the join passed, bootstrap first.
        path: Vec<NodeInfo>,
        /// Routing-table entries contributed by the nodes on the path.
        rows: Vec<NodeInfo>,
        /// The root's leaf set.
        leaf_set: Vec<NodeInfo>,
        /// The bootstrap's neighborhood set.
        neighborhood: Vec<NodeInfo>,
        hops: u32,
    },
    /// The reply to `announce`: the answering node's leaf set, and its
    /// routing-table row at the prefix it shares with the announcing node.
    LeafSet {
        node: NodeInfo,
        leaf_set: Vec<NodeInfo>,
        #[serde(default)]
        rows: Vec<NodeInfo>,
    },
    /// The reply to `replicate`: how many of the copies ranked above ours and were
    /// kept, and how many were refused (too large, or the store is full).
    Replicated {
        applied: usize,
        #[serde(default)]
        refused: usize,
        /// Copies not taken because this node holds one that outranks them: it
        /// does not hold what was sent (absent from older nodes' replies).
        #[serde(default)]
        stale: usize,
    },
    /// The reply to `digest`: the buckets whose copies differ from the sender's.
    DigestDiff {
        differing: Vec<u32>,
    },
    /// The reply to `fetch`: our entry for the key, tombstone included.
    Entry {
        key: String,
        entry: Option<Versioned>,
    },
    Error {
        code: i64,
        message: String,
    },
}

impl Reply {
    pub fn error(code: i64, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

/// A decoded line: the request and the client's `id`, to echo.
#[derive(Debug)]
pub struct Envelope {
    pub id: Option<Value>,
    pub request: Request,
}

/// A line that is not a valid request: what to answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The client's `id`, when one could be read.
    pub id: Option<Value>,
    pub code: i64,
    pub message: String,
}

impl Rejection {
    pub fn reply(&self) -> Reply {
        Reply::error(self.code, self.message.clone())
    }
}

/// Decodes one line (without its terminator). On failure, says what to answer.
pub fn decode(line: &[u8]) -> Result<Envelope, Rejection> {
    let reject = |id: Option<Value>, code: i64, message: String| Rejection { id, code, message };
    let top: TopLevel = serde_json::from_slice(line).map_err(|e| match e.classify() {
        // Well-formed JSON that names a field twice (`TopLevel`'s own error).
        serde_json::error::Category::Data => reject(None, code::INVALID_REQUEST, e.to_string()),
        _ => reject(
            None,
            code::PARSE_ERROR,
            format!(
                "malformed JSON ({e}); send one JSON object per line, e.g. {{\"type\":\"ping\"}}"
            ),
        ),
    })?;
    let TopLevel(Some(mut obj)) = top else {
        return Err(reject(
            None,
            code::INVALID_REQUEST,
            "a request is a JSON object with a \"type\" field, e.g. {\"type\":\"ping\"}".into(),
        ));
    };
    let id = obj.remove("id");
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(reject(
                id,
                code::INVALID_REQUEST,
                "\"type\" must be a string".into(),
            ))
        }
        None => {
            return Err(reject(
                id,
                code::INVALID_REQUEST,
                "missing \"type\"; send {\"type\":\"help\"} for the list of requests".into(),
            ))
        }
    };
    let types = request_types();
    if !types.contains(&kind.as_str()) {
        return Err(reject(
            id,
            code::UNKNOWN_TYPE,
            format!("unknown type {kind:?}; valid types: {}", types.join(", ")),
        ));
    }
    match serde_json::from_value::<Request>(Value::Object(obj)) {
        Ok(request) => match validate(&request) {
            Ok(()) => Ok(Envelope { id, request }),
            Err((code, message)) => Err(reject(id, code, message)),
        },
        Err(e) => Err(reject(
            id,
            code::INVALID_PARAMS,
            format!("invalid {kind:?} request: {e}; send {{\"type\":\"help\"}} for every request's fields"),
        )),
    }
}

/// A request line's outer JSON value: its fields if it is an object (`None` for
/// any other JSON value), refused if a field appears twice. Which of two `key`s
/// a node would act on is not something a client should have to guess (a plain
/// `Value` keeps the last one silently). Values inside the fields are parsed as
/// usual.
struct TopLevel(Option<Map<String, Value>>);

impl<'de> Deserialize<'de> for TopLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TopLevel, D::Error> {
        use serde::de::{Error, IgnoredAny, MapAccess, SeqAccess, Visitor};
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = TopLevel;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLevel, A::Error> {
                let mut fields = Map::new();
                while let Some(name) = map.next_key::<String>()? {
                    if fields.contains_key(&name) {
                        return Err(A::Error::custom(format!(
                            "the field {name:?} appears twice; send each field once"
                        )));
                    }
                    let value: Value = map.next_value()?;
                    fields.insert(name, value);
                }
                Ok(TopLevel(Some(fields)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<TopLevel, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(TopLevel(None))
            }
            fn visit_bool<E: Error>(self, _: bool) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_i64<E: Error>(self, _: i64) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_u64<E: Error>(self, _: u64) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_f64<E: Error>(self, _: f64) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_str<E: Error>(self, _: &str) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
            fn visit_unit<E: Error>(self) -> Result<TopLevel, E> {
                Ok(TopLevel(None))
            }
        }
        d.deserialize_any(Fields)
    }
}

/// Checks what serde cannot: non-empty keys, genuine node entries, the hop cap.
fn validate(request: &Request) -> Result<(), (i64, String)> {
    let check_key = |key: &str| {
        if key.is_empty() {
            Err((
                code::INVALID_PARAMS,
                "\"key\" must be a non-empty string".to_string(),
            ))
        } else {
            Ok(())
        }
    };
    let check_node = |node: &NodeInfo| {
        if node.is_genuine() {
            Ok(())
        } else {
            Err((
                code::BAD_NODE,
                format!(
                    "node {} at {} is not genuine: a node's id must be SHA-1 of its \"ip:port\"",
                    node.node_id, node.addr
                ),
            ))
        }
    };
    match request {
        Request::Put { key, .. }
        | Request::Get { key }
        | Request::Delete { key }
        | Request::Route { key }
        | Request::Fetch { key } => check_key(key),
        Request::Replicate { entries } => entries.iter().try_for_each(|e| check_key(&e.key)),
        Request::Join { node } | Request::Announce { node, .. } | Request::Leave { node } => {
            check_node(node)
        }
        Request::Digest { node, buckets } => {
            if buckets.is_empty() || buckets.len() > crate::pastry_node::anti_entropy::MAX_BUCKETS {
                return Err((
                    code::INVALID_PARAMS,
                    format!(
                        "\"buckets\" must hold 1 to {} hashes",
                        crate::pastry_node::anti_entropy::MAX_BUCKETS
                    ),
                ));
            }
            check_node(node)
        }
        // The hop cap is a setting of the node (`Config::max_hops`): `route_op`
        // checks it.
        Request::Forward { op, .. } => match op {
            Op::Put { key, .. } | Op::Get { key } | Op::Delete { key } | Op::Route { key } => {
                check_key(key)
            }
            Op::Join { node } => check_node(node),
        },
        Request::Ping | Request::Help | Request::Status | Request::Stats => Ok(()),
    }
}

fn hop_cap_message(max_hops: u32) -> String {
    format!("hop cap reached: a message may be forwarded at most {max_hops} times")
}

/// Encodes a reply as one line, `\n` included, echoing the client's `id`.
pub fn encode(reply: &Reply, id: Option<Value>) -> Vec<u8> {
    // A reply is a JSON object; the client's `id` goes in as its last field, so
    // that the fields keep their order (`type` first), as in replies without
    // one. (Going through a `Value` would sort them.)
    let mut out = serde_json::to_vec(reply)
        .and_then(|mut out| {
            if let Some(id) = id {
                if out.last() == Some(&b'}') {
                    out.pop();
                    out.extend_from_slice(b",\"id\":");
                    serde_json::to_writer(&mut out, &id)?;
                    out.push(b'}');
                }
            }
            Ok(out)
        })
        .unwrap_or_else(|e| {
            format!(
                "{{\"type\":\"error\",\"code\":-32000,\"message\":\"cannot encode reply: {e}\"}}"
            )
            .into_bytes()
        });
    out.push(b'\n');
    out
}

/// Handles one request at `node`, using `transport` to reach other nodes.
pub fn handle(node: &Node, request: Request, transport: &dyn Transport) -> Reply {
    node.count_message(request.kind_index());
    if let Some(refusal) = refuse(node, &request) {
        node.count_error();
        return refusal;
    }
    let reply = match request {
        Request::Ping => Reply::Pong {
            node_id: node.own().node_id,
            addr: node.own().addr,
        },
        Request::Help => Reply::Help { commands: help() },
        Request::Put { key, value } => route_op(node, Op::Put { key, value }, 0, transport),
        Request::Get { key } => route_op(node, Op::Get { key }, 0, transport),
        Request::Delete { key } => route_op(node, Op::Delete { key }, 0, transport),
        Request::Route { key } => route_op(node, Op::Route { key }, 0, transport),
        Request::Join { node: joiner } => route_op(node, Op::Join { node: joiner }, 0, transport),
        Request::Forward { hops, op } => route_op(node, op, hops, transport),
        Request::Status => node.status(),
        Request::Leave { node: from } => {
            // The probe runs on the maintenance thread: the leaving node does not
            // wait for it, and a forged notice costs one probe of a node we know.
            if node.knows(&from.node_id) {
                node.note_leaving(from);
            }
            Reply::Pong {
                node_id: node.own().node_id,
                addr: node.own().addr,
            }
        }
        Request::Digest {
            node: from,
            buckets,
        } => {
            // Computed over the copies we should hold with the sender, bucketed as
            // the sender did.
            let ours = node.digest_for(&from.node_id, buckets.len());
            Reply::DigestDiff {
                differing: ours.differing(&buckets),
            }
        }
        Request::Replicate { entries } => {
            let (mut applied, mut refused, mut stale) = (0, 0, 0);
            for e in entries {
                // Copies obey the limits a client's put does: a replicate is
                // no way around them.
                let value = (!e.entry.deleted).then_some(&e.entry.value);
                if size_error(node.config(), &e.key, value).is_some() {
                    refused += 1;
                    continue;
                }
                match node.store_offer(&e.key, &e.entry) {
                    Ok(Offer::Taken) => applied += 1,
                    Ok(Offer::AlreadyHeld) => {}
                    // We hold a copy that outranks it. The root must know, or it
                    // would count us as holding a write we will never serve.
                    Ok(Offer::NotKept) => stale += 1,
                    Err(StoreFull) => refused += 1,
                }
            }
            Reply::Replicated {
                applied,
                refused,
                stale,
            }
        }
        Request::Fetch { key } => Reply::Entry {
            entry: node.store_entry(&key),
            key,
        },
        Request::Stats => node.stats(),
        Request::Announce { node: from, rows } => {
            // Nothing here is taken on trust. Anyone can send an announcement
            // naming any genuine id (SHA-1 of an address they pick), so a node we
            // do not know yet is dialled back at the address it gives, and enters
            // our state only if it answers there with that id. The round trip
            // measures its proximity too, so it competes for routing-table slots
            // at once. A node we know already (every tick, our leaf set's
            // heartbeat) was checked when it came in.
            if node.knows(&from.node_id) {
                node.heard_from(&from.node_id);
                node.learn(from, None);
                node.consider(from);
            } else {
                match transport.proximity(&from) {
                    Ok(p) => {
                        node.heard_from(&from.node_id);
                        node.learn(from, Some(p));
                    }
                    Err(e) => {
                        node.count_error();
                        return Reply::error(
                            code::BAD_NODE,
                            format!(
                                "cannot verify node {} at {}: dialled back, it did not answer as that node ({e})",
                                from.node_id, from.addr
                            ),
                        );
                    }
                }
            }
            // What it tells us about others is hearsay, checked before it is used.
            for n in rows {
                node.hear_of(n);
            }
            Reply::LeafSet {
                node: node.own(),
                leaf_set: node.leaf_set_members(),
                rows: node.shared_row(&from.node_id),
            }
        }
    };
    if matches!(reply, Reply::Error { .. }) {
        node.count_error();
    }
    reply
}

/// Refuses what no node may do with this request whatever its state: a node
/// entry that claims to be us (our own id comes only from us), a message past
/// the hop cap, a key or value over the limits.
fn refuse(node: &Node, request: &Request) -> Option<Reply> {
    let config = node.config();
    let claimed = match request {
        Request::Join { node: n }
        | Request::Announce { node: n, .. }
        | Request::Forward {
            op: Op::Join { node: n },
            ..
        } => Some(n),
        _ => None,
    };
    if claimed.is_some_and(|n| n.node_id == node.own().node_id) {
        return Some(Reply::error(
            code::BAD_NODE,
            format!(
                "node {} is this node: no other node may speak for it",
                node.own().node_id
            ),
        ));
    }
    match request {
        Request::Put { key, value }
        | Request::Forward {
            op: Op::Put { key, value },
            ..
        } => size_error(config, key, Some(value)),
        Request::Get { key }
        | Request::Delete { key }
        | Request::Route { key }
        | Request::Fetch { key }
        | Request::Forward {
            op: Op::Get { key } | Op::Delete { key } | Op::Route { key },
            ..
        } => size_error(config, key, None),
        _ => None,
    }
}

/// Refuses a key or value over the limits (`Config::max_key_bytes`,
/// `Config::max_value_bytes`, [`MAX_VALUE_DEPTH`]), and a key and value that
/// would not fit the line limit once other nodes wrap them (a `forward`, a
/// reply with the owner): every node must be able to read what the root stores.
/// Sizes are those of the JSON nodes send each other, which can be longer than
/// the client's (`1e5` is re-encoded as `100000.0`).
fn size_error(config: &Config, key: &str, value: Option<&Value>) -> Option<Reply> {
    let invalid = |message: String| Some(Reply::error(code::INVALID_PARAMS, message));
    if key.len() > config.max_key_bytes {
        return invalid(format!(
            "key too long: {} bytes, at most {} (UTF-8)",
            key.len(),
            config.max_key_bytes
        ));
    }
    let value_len = value.map_or(0, json_len);
    if value_len > config.max_value_bytes {
        return invalid(format!(
            "value too large: {value_len} bytes as JSON, at most {}",
            config.max_value_bytes
        ));
    }
    if value.is_some_and(|v| depth(v) > MAX_VALUE_DEPTH) {
        return invalid(format!(
            "value nested too deeply: at most {MAX_VALUE_DEPTH} levels of arrays and objects"
        ));
    }
    let room = config
        .max_line
        .saturating_sub(crate::pastry_node::server::NODE_LINE_HEADROOM);
    let key_len = serde_json::to_string(key).map_or(usize::MAX, |k| k.len());
    if key_len.saturating_add(value_len) > room {
        return invalid(format!("key and value too large: together they may take at most {room} bytes as JSON (the line limit less room for routing)"));
    }
    None
}

/// Levels of arrays and objects in `value` (a scalar is 0). The parser bounds the
/// recursion at 128 levels.
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// How many next hops a message may find dead at one node before it gives up.
const MAX_RETRIES_PER_HOP: usize = 4;

/// Routes `op` from `node`, where it arrived after `hops` forwards.
fn route_op(node: &Node, op: Op, hops: u32, transport: &dyn Transport) -> Reply {
    let max_hops = node.config().max_hops;
    if hops > max_hops {
        return Reply::error(code::HOP_CAP, hop_cap_message(max_hops));
    }
    // A joining node routes, and answers as root, only once its leaf set is
    // confirmed: until then a node it has not heard of yet may be the true root
    // (MSPastry's consistent routing). Activation takes one round of
    // announcements, so the request waits for it.
    // Half a call's timeout, so that the node that forwarded the request here
    // hears "still joining" before its own wait runs out and it takes us for dead.
    if !node.wait_active(node.config().call_timeout / 2) {
        return Reply::error(
            code::JOINING,
            "this node is still joining the network and cannot route yet; try again shortly",
        );
    }
    let key_id = op.key_id();
    // A joining node may be in our state from an earlier life; never route its own
    // join to it.
    let joiner = match &op {
        Op::Join { node } => Some(node.node_id),
        _ => None,
    };
    let mut dead: Vec<NodeId> = Vec::new();
    loop {
        let decision = node.route(&key_id, |id| dead.contains(id) || Some(*id) == joiner);
        let next = match decision {
            Route::Deliver => return deliver(node, op, &key_id, hops, transport),
            Route::Forward { next, via } => {
                node.count_forward(via);
                next
            }
        };
        let forward = Request::Forward {
            hops: hops.saturating_add(1),
            op: op.clone(),
        };
        match transport.call(&next, &forward) {
            Ok(reply) => return relay(node, &op, hops, reply),
            Err(_) => {
                // Route around the silent node at this hop; maintenance decides
                // whether it is dead.
                node.suspect(next);
                dead.push(next.node_id);
                if dead.len() >= MAX_RETRIES_PER_HOP {
                    return Reply::error(
                        code::PEER_UNAVAILABLE,
                        format!(
                            "peer unavailable: {} next hops toward {} did not answer",
                            dead.len(),
                            key_id
                        ),
                    );
                }
            }
        }
    }
}

/// Adds what this node contributes to a reply coming back along the route.
fn relay(node: &Node, op: &Op, hops: u32, reply: Reply) -> Reply {
    match (op, reply) {
        (
            Op::Route { .. },
            Reply::Route {
                key,
                key_id,
                mut path,
                owner,
                hops: h,
            },
        ) => {
            path.insert(0, node.own());
            Reply::Route {
                key,
                key_id,
                path,
                owner,
                hops: h,
            }
        }
        (
            Op::Join { node: joiner },
            Reply::Joined {
                root,
                mut path,
                mut rows,
                leaf_set,
                mut neighborhood,
                hops: h,
            },
        ) => {
            path.insert(0, node.own());
            rows.extend(node.rows_for(&joiner.node_id, hops as usize, false));
            if hops == 0 {
                neighborhood = node.neighborhood_members();
            }
            Reply::Joined {
                root,
                path,
                rows,
                leaf_set,
                neighborhood,
                hops: h,
            }
        }
        (_, reply) => reply,
    }
}

/// Performs `op` at its root, this node. `key_id` is the id of `op`'s key,
/// passed on so that it is not hashed again.
fn deliver(node: &Node, op: Op, key_id: &NodeId, hops: u32, transport: &dyn Transport) -> Reply {
    let owner = node.own().node_id;
    match op {
        Op::Put { key, value } => {
            let replicas = match write_and_replicate(node, &key, Some(value), transport) {
                Ok(n) => n,
                Err(refused) => return refused.reply(node, &key),
            };
            Reply::PutOk {
                key_id: NodeId::for_key(&key),
                key,
                owner,
                hops,
                replicas,
            }
        }
        Op::Get { key } => match newest_entry(node, &key, key_id, transport) {
            Some(e) if !e.deleted => Reply::Value {
                key,
                value: e.value,
                owner,
                hops,
            },
            _ => Reply::NotFound { key, owner, hops },
        },
        Op::Delete { key } => {
            let existed = newest_entry(node, &key, key_id, transport).is_some_and(|e| !e.deleted);
            let replicas = match write_and_replicate(node, &key, None, transport) {
                Ok(n) => n,
                Err(refused) => return refused.reply(node, &key),
            };
            Reply::Deleted {
                existed,
                key,
                owner,
                hops,
                replicas,
            }
        }
        Op::Route { key } => Reply::Route {
            key_id: NodeId::for_key(&key),
            key,
            path: vec![node.own()],
            owner,
            hops,
        },
        Op::Join { node: joiner } => Reply::Joined {
            root: node.own(),
            path: vec![node.own()],
            rows: node.rows_for(&joiner.node_id, hops as usize, true),
            leaf_set: node.leaf_set_members(),
            neighborhood: if hops == 0 {
                node.neighborhood_members()
            } else {
                Vec::new()
            },
            hops,
        },
    }
}

/// The reply to a write the root's store has no room for.
fn store_full(node: &Node) -> Reply {
    let c = node.config();
    Reply::error(
        code::STORE_FULL,
        format!(
            "store full: the key's root holds as many entries ({}) or bytes ({}) as it may; delete keys or try again later",
            c.max_store_keys, c.max_store_bytes
        ),
    )
}

/// How many times the root writes again above a newer copy a replica showed it.
const REWRITES: usize = 3;

/// The root's write of `key` (`None`: a delete), made the newest copy of the key
/// and sent to the rest of its replica set. Returns how many nodes hold it, the
/// root included: the honest count behind `replicas`.
///
/// A replica may hold a copy that outranks the root's: the root lacked the key
/// (it took over the key a moment ago) or its clock is behind the clock of the
/// root that wrote before. Acknowledging anyway would lose the write as soon as
/// anti-entropy spread that copy, so the root takes the newer copy in and writes
/// again, with a version above it: the write a client is acknowledged is then
/// the newest. If no version can be above it (a copy planted at the highest
/// version), the write is refused with `CONFLICT` rather than acknowledged.
fn write_and_replicate(
    node: &Node,
    key: &str,
    value: Option<Value>,
    transport: &dyn Transport,
) -> Result<usize, WriteRefused> {
    let mut value = value;
    for _ in 0..REWRITES {
        let entry = node
            .store_write(key, value.take())
            .map_err(|StoreFull| WriteRefused::Full)?;
        let (held, newer) = replicate(node, key, &entry, transport);
        let Some(newer) = newer else {
            return Ok(1 + held);
        };
        if entry.version == u64::MAX {
            break;
        }
        // Taken in, so that the next write's version is above it.
        node.store_apply(key, &newer)
            .map_err(|StoreFull| WriteRefused::Full)?;
        // The value to write again is the one the write just stored.
        value = (!entry.deleted).then_some(entry.value);
    }
    Err(WriteRefused::Conflict)
}

/// Why the root did not acknowledge a write.
enum WriteRefused {
    Full,
    Conflict,
}

impl WriteRefused {
    fn reply(&self, node: &Node, key: &str) -> Reply {
        match self {
            WriteRefused::Full => store_full(node),
            WriteRefused::Conflict => Reply::error(
                code::CONFLICT,
                format!(
                    "conflict: members of {key:?}'s replica set hold a copy this write cannot outrank; the write is not acknowledged"
                ),
            ),
        }
    }
}

/// Sends the root's `entry` for `key` to the other members of its replica set.
/// Returns how many of them hold it now, and, if some hold a copy that outranks
/// it, the highest such copy.
fn replicate(
    node: &Node,
    key: &str,
    entry: &Versioned,
    transport: &dyn Transport,
) -> (usize, Option<Versioned>) {
    let own = node.own().node_id;
    let request = Request::Replicate {
        entries: vec![KeyEntry {
            key: key.to_string(),
            entry: entry.clone(),
        }],
    };
    let fetch = Request::Fetch {
        key: key.to_string(),
    };
    let (mut held, mut newer): (usize, Option<Versioned>) = (0, None);
    for peer in node.replica_set(&NodeId::for_key(key)) {
        if peer.node_id == own {
            continue;
        }
        match transport.call(&peer, &request) {
            // A replica that refused the copy (its store is full) does not hold
            // it, and is not counted.
            Ok(Reply::Replicated {
                refused: 0,
                stale: 0,
                ..
            }) => held += 1,
            Ok(Reply::Replicated { stale, .. }) if stale > 0 => {
                if let Ok(Reply::Entry {
                    entry: Some(theirs),
                    ..
                }) = transport.call(&peer, &fetch)
                {
                    if theirs.supersedes(entry)
                        && newer.as_ref().is_none_or(|n| theirs.supersedes(n))
                    {
                        newer = Some(theirs);
                    }
                }
            }
            Ok(_) => {}
            Err(_) => node.suspect(peer),
        }
    }
    (held, newer)
}

/// Our entry for `key`, or, if we have none (we may have just become its root),
/// the newest one held by the rest of its replica set, which we then keep. If none
/// of them has it either, the rest of the leaf set is asked: after several nodes
/// joined near the key, its old holders may all be outside the replica set until
/// the next replication round moves the key.
fn newest_entry(
    node: &Node,
    key: &str,
    key_id: &NodeId,
    transport: &dyn Transport,
) -> Option<Versioned> {
    if let Some(e) = node.store_entry_at(key_id, key) {
        return Some(e);
    }
    let own = node.own().node_id;
    let key_id = *key_id;
    let request = Request::Fetch {
        key: key.to_string(),
    };
    let replicas = node.replica_set(&key_id);
    let mut rest: Vec<NodeInfo> = node
        .leaf_set_members()
        .into_iter()
        .filter(|n| !replicas.iter().any(|r| r.node_id == n.node_id))
        .collect();
    rest.sort_by(|a, b| crate::utils::closer_to(&key_id, &a.node_id, &b.node_id));
    let mut newest: Option<Versioned> = None;
    for round in [replicas, rest] {
        for peer in round {
            if peer.node_id == own {
                continue;
            }
            match transport.call(&peer, &request) {
                Ok(Reply::Entry { entry: Some(e), .. }) => {
                    if newest.as_ref().is_none_or(|n| e.supersedes(n)) {
                        newest = Some(e);
                    }
                }
                Ok(_) => {}
                Err(_) => node.suspect(peer),
            }
        }
        if newest.is_some() {
            break;
        }
    }
    if let Some(e) = &newest {
        // A full store answers with the value without keeping it.
        let _ = node.store_apply(key, e);
    }
    newest
}

/// What `help` says: every client command with its fields.
fn help() -> Vec<CommandHelp> {
    let c = |kind: &str, fields: &[&str], description: &str| CommandHelp {
        kind: kind.to_string(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
        description: description.to_string(),
    };
    vec![
        c(
            "ping",
            &[],
            "Is this node alive? Answers with its id and address.",
        ),
        c("help", &[], "This list."),
        c(
            "put",
            &[
                "key: non-empty string, at most 1 KiB by default",
                "value: any JSON value, at most 64 KiB as JSON by default",
            ],
            "Store value under key on the key's root node (alias: store).",
        ),
        c(
            "get",
            &["key: non-empty string"],
            "Look key up on its root node (alias: lookup).",
        ),
        c(
            "delete",
            &["key: non-empty string"],
            "Delete key on its root node; says whether it existed.",
        ),
        c(
            "route",
            &["key: non-empty string"],
            "The nodes a message for key passes, in order, and its owner.",
        ),
        c(
            "status",
            &[],
            "This node's leaf set, routing table, neighborhood set and key count.",
        ),
        c(
            "stats",
            &[],
            "Counters: messages by type, forwards, errors, keys, connections, uptime.",
        ),
    ]
}

/// Parses the `"id"` echo out of an arbitrary reply line; for clients and tests.
pub fn reply_id(line: &str) -> Option<Value> {
    serde_json::from_str::<Map<String, Value>>(line)
        .ok()
        .and_then(|mut m| m.remove("id"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_kind_is_counted_under_its_wire_name() {
        let node = NodeInfo::new("127.0.0.1:4000".parse().unwrap());
        let requests = [
            Request::Ping,
            Request::Help,
            Request::Put {
                key: "k".into(),
                value: Value::Null,
            },
            Request::Get { key: "k".into() },
            Request::Delete { key: "k".into() },
            Request::Route { key: "k".into() },
            Request::Status,
            Request::Stats,
            Request::Join { node },
            Request::Forward {
                hops: 1,
                op: Op::Get { key: "k".into() },
            },
            Request::Announce { node, rows: vec![] },
            Request::Replicate { entries: vec![] },
            Request::Fetch { key: "k".into() },
            Request::Digest {
                node,
                buckets: vec![0],
            },
            Request::Leave { node },
        ];
        assert_eq!(requests.len(), KINDS.len());
        for (i, r) in requests.iter().enumerate() {
            let wire = serde_json::to_value(r).unwrap();
            assert_eq!(wire["type"], r.kind(), "{r:?}");
            assert_eq!(r.kind_index(), i);
        }
    }

    use super::*;

    fn err_code(line: &str) -> i64 {
        match decode(line.as_bytes()) {
            Err(r) => r.code,
            other => panic!("{line}: expected an error, got {other:?}"),
        }
    }

    /// A field named twice at the top is refused, saying which; inside a value,
    /// an object is JSON like any other (the last of a repeated name stands).
    #[test]
    fn a_field_named_twice_is_refused_but_values_are_left_alone() {
        match decode(br#"{"type":"put","key":"a","value":1,"key":"b"}"#) {
            Err(r) => assert!(r.message.contains("\"key\" appears twice"), "{}", r.message),
            other => panic!("expected a rejection, got {other:?}"),
        }
        let ok = decode(br#"{"type":"put","key":"a","value":{"x":1,"x":2},"id":7}"#);
        assert!(
            matches!(
                ok,
                Ok(Envelope {
                    request: Request::Put { .. },
                    ..
                })
            ),
            "{ok:?}"
        );
    }

    #[test]
    fn an_echoed_id_keeps_the_type_first() {
        let reply = Reply::Pong {
            node_id: NodeId::for_key("n"),
            addr: "127.0.0.1:4000".parse().unwrap(),
        };
        let line =
            String::from_utf8(encode(&reply, Some(serde_json::json!({"k": [1, "x"]})))).unwrap();
        assert!(
            line.starts_with("{\"type\":\"pong\",\"node_id\":"),
            "{line}"
        );
        assert!(line.ends_with(",\"id\":{\"k\":[1,\"x\"]}}\n"), "{line}");
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], serde_json::json!({"k": [1, "x"]}));
        assert_eq!(v["addr"], "127.0.0.1:4000");
    }

    #[test]
    fn error_codes_for_bad_lines() {
        let cases = [
            ("{", code::PARSE_ERROR),
            ("not json", code::PARSE_ERROR),
            ("[1,2]", code::INVALID_REQUEST),
            ("\"ping\"", code::INVALID_REQUEST),
            ("{}", code::INVALID_REQUEST),
            ("{\"type\":5}", code::INVALID_REQUEST),
            ("null", code::INVALID_REQUEST),
            ("[[1],{\"a\":2}]", code::INVALID_REQUEST),
            ("{\"type\":\"get\",\"key\":\"a\",\"key\":\"b\"}", code::INVALID_REQUEST),
            ("{\"type\":\"get\",\"type\":\"get\",\"key\":\"a\"}", code::INVALID_REQUEST),
            ("{\"type\":\"fly\"}", code::UNKNOWN_TYPE),
            ("{\"type\":\"put\",\"key\":\"a\"}", code::INVALID_PARAMS),
            ("{\"type\":\"put\",\"key\":5,\"value\":1}", code::INVALID_PARAMS),
            ("{\"type\":\"get\",\"key\":\"\"}", code::INVALID_PARAMS),
            ("{\"type\":\"get\"}", code::INVALID_PARAMS),
            (
                "{\"type\":\"forward\",\"hops\":-1,\"op\":{\"type\":\"get\",\"key\":\"a\"}}",
                code::INVALID_PARAMS,
            ),
            (
                "{\"type\":\"announce\",\"node\":{\"node_id\":\"0000000000000000000000000000000000000000\",\"addr\":\"127.0.0.1:9\"}}",
                code::BAD_NODE,
            ),
            (
                "{\"type\":\"announce\",\"node\":{\"node_id\":\"ABC\",\"addr\":\"127.0.0.1:9\"}}",
                code::INVALID_PARAMS,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(err_code(line), want, "{line}");
        }
    }

    #[test]
    fn aliases_and_id_echo() {
        let e = decode(br#"{"type":"store","key":"k","value":[1],"id":7}"#).unwrap();
        assert_eq!(
            e.request,
            Request::Put {
                key: "k".into(),
                value: serde_json::json!([1])
            }
        );
        assert_eq!(e.id, Some(serde_json::json!(7)));
        let e = decode(br#"{"type":"lookup","key":"k"}"#).unwrap();
        assert_eq!(e.request, Request::Get { key: "k".into() });
        let line = encode(&Reply::error(1, "x"), Some(serde_json::json!("abc")));
        let text = String::from_utf8(line).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(reply_id(&text), Some(serde_json::json!("abc")));
    }

    /// Found by `cargo fuzz`: without serde_json's `float_roundtrip`, a long
    /// decimal was parsed one unit in the last place off, so a value changed
    /// each time a node re-encoded it (at every hop, in every copy).
    #[test]
    fn numbers_survive_re_encoding() {
        let line = br#"{"type":"put","key":"k","value":[3333333333333333333333333333333333333333333333333,3333333333333333333333333333333333333.3333333333,0.1,1e-300,2.2250738585072011e-308]}"#;
        let first = decode(line).unwrap().request;
        let again = serde_json::to_vec(&first).unwrap();
        assert_eq!(decode(&again).unwrap().request, first);
    }

    #[test]
    fn requests_round_trip() {
        let addr = "127.0.0.1:4000".parse().unwrap();
        let reqs = [
            Request::Ping,
            Request::Join {
                node: NodeInfo::new(addr),
            },
            Request::Forward {
                hops: 3,
                op: Op::Put {
                    key: "k".into(),
                    value: serde_json::json!({"a": null}),
                },
            },
        ];
        for r in reqs {
            let line = serde_json::to_vec(&r).unwrap();
            assert_eq!(decode(&line).unwrap().request, r);
        }
    }
}
