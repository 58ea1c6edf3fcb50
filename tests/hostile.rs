//! Hostile and broken input: the limits (key, value, store, hop cap), the
//! timeouts, verified peers (nothing forged ever enters a node's state), seeded
//! fuzzing of the decoder and of live nodes, and load (many idle connections,
//! many clients mixing valid and invalid requests).
//!
//! The fuzzing here is deterministic: a seeded generator (`pastry::simulator::Rng`)
//! builds the lines, so a failure names a seed and a line that can be replayed.
//! The `cargo fuzz` target in `fuzz/` explores the decoder without a seed.

mod support;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pastry::message_handler::{decode, request_types};
use pastry::pastry_node::{Config, RunningNode};
use pastry::simulator::Rng;
use pastry::utils::{NodeId, NodeInfo};
use serde_json::{json, Map, Value};
use support::{error_code, rpc, start_node, test_config, wait_until, LocalCluster, Raw};

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const UNKNOWN_TYPE: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const PEER_UNAVAILABLE: i64 = -32001;
const HOP_CAP: i64 = -32002;
const BAD_NODE: i64 = -32004;
const STORE_FULL: i64 = -32006;
/// A write refused because a planted copy (a fuzzed `replicate` with a huge
/// version) outranks anything it could be.
const CONFLICT: i64 = -32008;

/// Every error code a node may answer a request line with (the line limit and
/// `busy` close the connection and are tested in tests/protocol.rs).
const CODES: [i64; 9] = [
    PARSE_ERROR,
    INVALID_REQUEST,
    UNKNOWN_TYPE,
    INVALID_PARAMS,
    PEER_UNAVAILABLE,
    HOP_CAP,
    BAD_NODE,
    STORE_FULL,
    CONFLICT,
];

/// An address on loopback where nothing listens (a port the OS gave us, then
/// released): a node dialled there is dead, and the dial fails at once.
fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}

fn message(r: &Value) -> &str {
    r["message"].as_str().unwrap_or_else(|| panic!("{r}"))
}

// ---------------------------------------------------------------------------
// Limits

/// Keys up to 1 KiB and values up to 64 KiB (as JSON) are taken; one byte more
/// is refused with -32602 and a message naming the limit, on every path a key or
/// value enters by: put, get, delete, route, fetch, a forged `forward`, a
/// `replicate`. Nothing refused is stored.
#[test]
fn oversize_keys_and_values_are_refused_on_every_path() {
    let node = start_node(test_config());
    let mut conn = Raw::connect(node.addr());
    let ok_key = "k".repeat(1024);
    let long_key = "k".repeat(1025);
    // Multi-byte characters count in bytes: 342 x 3 = 1026.
    let long_utf8 = "€".repeat(342);
    for key in [&long_key, &long_utf8] {
        for req in [
            json!({"type": "put", "key": key, "value": 1}),
            json!({"type": "get", "key": key}),
            json!({"type": "delete", "key": key}),
            json!({"type": "route", "key": key}),
            json!({"type": "fetch", "key": key}),
            json!({"type": "forward", "hops": 1, "op": {"type": "put", "key": key, "value": 1}}),
            json!({"type": "forward", "hops": 1, "op": {"type": "get", "key": key}}),
        ] {
            let r = conn.request(&req);
            assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
            assert!(message(&r).contains("key too long"), "{r}");
        }
    }
    let r = conn.request(&json!({"type": "put", "key": ok_key, "value": 1}));
    assert_eq!(r["type"], "put_ok", "a 1024-byte key is taken");

    // A string value of n characters is n + 2 bytes of JSON.
    let exact = "v".repeat(64 * 1024 - 2);
    let over = "v".repeat(64 * 1024 - 1);
    let r = conn.request(&json!({"type": "put", "key": "exact", "value": exact}));
    assert_eq!(r["type"], "put_ok", "a value of exactly 64 KiB is taken");
    for req in [
        json!({"type": "put", "key": "over", "value": over}),
        json!({"type": "forward", "hops": 0, "op": {"type": "put", "key": "over", "value": over}}),
    ] {
        let r = conn.request(&req);
        assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
        assert!(message(&r).contains("value too large"), "{r}");
        assert!(message(&r).contains("65536"), "{r}");
    }
    // Nesting: 64 levels are taken, 65 refused.
    let nest = |levels: usize| -> Value {
        let mut v = json!(0);
        for _ in 0..levels {
            v = json!([v]);
        }
        v
    };
    let r = conn.request(&json!({"type": "put", "key": "deep", "value": nest(64)}));
    assert_eq!(r["type"], "put_ok", "{r}");
    let r = conn.request(&json!({"type": "put", "key": "deeper", "value": nest(65)}));
    assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
    assert!(message(&r).contains("nested"), "{r}");

    // A replicate is no way around the limits: oversize copies are refused and
    // counted, the others taken.
    let r = conn.request(&json!({"type": "replicate", "entries": [
        {"key": long_key, "version": 1, "value": 1},
        {"key": "over-copy", "version": 1, "value": over},
        {"key": "deep-copy", "version": 1, "value": nest(65)},
        {"key": "fine-copy", "version": 1, "value": "fine"},
    ]}));
    assert_eq!(r["type"], "replicated", "{r}");
    assert_eq!(
        (r["applied"].as_u64(), r["refused"].as_u64()),
        (Some(1), Some(3)),
        "{r}"
    );
    conn.assert_usable();

    let n = node.node();
    for key in [
        long_key.as_str(),
        "over",
        "deeper",
        "over-copy",
        "deep-copy",
    ] {
        assert!(n.store_entry(key).is_none(), "{key:.20} was stored");
    }
    for key in [ok_key.as_str(), "exact", "deep", "fine-copy"] {
        assert!(n.store_get(key).is_some(), "{key:.20} was not stored");
    }
}

/// The limits are settings: a node configured with smaller ones refuses at them.
#[test]
fn limits_follow_the_config() {
    let config = Config {
        max_key_bytes: 8,
        max_value_bytes: 10,
        max_hops: 3,
        ..test_config()
    };
    let node = start_node(config);
    let mut conn = Raw::connect(node.addr());
    let put = |key: &str, value: &str| json!({"type": "put", "key": key, "value": value});
    assert_eq!(conn.request(&put("12345678", "12345678"))["type"], "put_ok");
    let r = conn.request(&put("123456789", "1"));
    assert!(message(&r).contains("at most 8"), "{r}");
    let r = conn.request(&put("k", "123456789"));
    assert!(message(&r).contains("at most 10"), "{r}");
    // Hop cap 3: a forward arriving after 3 hops is still delivered by its root
    // (this node, alone), one after 4 is refused.
    let fwd =
        |hops: u64| json!({"type": "forward", "hops": hops, "op": {"type": "get", "key": "k"}});
    let r = conn.request(&fwd(3));
    assert_eq!(r["type"], "not_found", "{r}");
    assert_eq!(r["hops"], 3, "{r}");
    let r = conn.request(&fwd(4));
    assert_eq!(error_code(&r), HOP_CAP, "{r}");
    assert!(message(&r).contains("at most 3"), "{r}");
}

/// A full store answers every write that would grow it with -32006, and keeps
/// serving: reads, overwrites that do not grow it, and deletes of keys it holds
/// (which free room) still work.
#[test]
fn a_full_store_refuses_writes_and_keeps_serving() {
    let config = Config {
        max_store_keys: 4,
        max_store_bytes: 200,
        ..test_config()
    };
    let node = start_node(config);
    let mut conn = Raw::connect(node.addr());
    let put = |key: &str, value: Value| json!({"type": "put", "key": key, "value": value});
    for i in 0..4 {
        let r = conn.request(&put(&format!("k{i}"), json!(i)));
        assert_eq!(r["type"], "put_ok", "{r}");
    }
    // A fifth key: the entry cap.
    let r = conn.request(&put("k4", json!(4)));
    assert_eq!(error_code(&r), STORE_FULL, "{r}");
    assert!(message(&r).contains("store full"), "{r}");
    // A delete of a key it does not hold would add a tombstone: refused too.
    let r = conn.request(&json!({"type": "delete", "key": "nowhere"}));
    assert_eq!(error_code(&r), STORE_FULL, "{r}");
    // A copy from a "replica" is refused and counted as such.
    let r = conn.request(
        &json!({"type": "replicate", "entries": [{"key": "k9", "version": 1, "value": 9}]}),
    );
    assert_eq!(
        (r["applied"].as_u64(), r["refused"].as_u64()),
        (Some(0), Some(1)),
        "{r}"
    );
    // Reads and non-growing writes go on.
    assert_eq!(
        conn.request(&json!({"type": "get", "key": "k0"}))["value"],
        0
    );
    assert_eq!(conn.request(&put("k0", json!(7)))["type"], "put_ok");
    // The byte cap: k1 may grow to what is left of 200 bytes, not beyond.
    let big = "x".repeat(150);
    let r = conn.request(&put("k1", json!(big)));
    assert_eq!(r["type"], "put_ok", "{r}");
    let r = conn.request(&put("k2", json!(big)));
    assert_eq!(error_code(&r), STORE_FULL, "{r}");
    // A delete of a held key always fits, and frees room for another key.
    let r = conn.request(&json!({"type": "delete", "key": "k1"}));
    assert_eq!(
        (r["type"].as_str(), r["existed"].as_bool()),
        (Some("deleted"), Some(true)),
        "{r}"
    );
    assert_eq!(conn.request(&put("k2", json!(big)))["type"], "put_ok");
    assert_eq!(node.node().key_count(), 3, "k0, k2, k3 (k1 is a tombstone)");
    conn.assert_usable();
}

/// A replica whose store is full refuses the copy, and `put_ok` counts only the
/// nodes that hold the value: the root's write stands, the count does not lie.
#[test]
fn a_full_replica_is_not_counted_in_put_ok() {
    // Three nodes, so every replica set (k = 3) is all of them. Two have room
    // for next to nothing.
    let roomy = start_node(test_config());
    let tiny = Config {
        max_store_bytes: 10,
        ..test_config()
    };
    let cramped: Vec<RunningNode> = (0..2).map(|_| start_node(tiny.clone())).collect();
    for n in &cramped {
        n.join(roomy.addr()).expect("join");
    }
    let all = [roomy.id(), cramped[0].id(), cramped[1].id()];
    assert!(wait_until(Duration::from_secs(20), || {
        [&roomy, &cramped[0], &cramped[1]]
            .iter()
            .all(|n| n.node().leaf_set_members().len() == 2)
    }));
    // A key whose root is the roomy node, so that the root's write succeeds.
    let key = (0..)
        .map(|i| format!("key{i}"))
        .find(|k| {
            let id = NodeId::for_key(k);
            all.iter()
                .min_by(|a, b| pastry::utils::closer_to(&id, a, b))
                .is_some_and(|root| *root == roomy.id())
        })
        .expect("some key has the roomy node as root");
    let r = rpc(
        cramped[0].addr(),
        &json!({"type": "put", "key": key, "value": "more than ten bytes"}),
    );
    assert_eq!(r["type"], "put_ok", "{r}");
    assert_eq!(r["replicas"], 1, "only the root holds it: {r}");
    assert!(roomy.node().store_get(&key).is_some());
    for n in &cramped {
        assert!(n.node().store_entry(&key).is_none());
    }
    // A small value fits everywhere and is counted everywhere.
    let r = rpc(
        roomy.addr(),
        &json!({"type": "put", "key": key, "value": 1}),
    );
    assert_eq!(r["replicas"], 3, "{r}");
}

// ---------------------------------------------------------------------------
// Timeouts

/// A connection that sends half a line and stalls is closed after the line
/// timeout, while a connection that is merely idle stays open until the longer
/// client timeout; a line trickled in a byte at a time must still be whole
/// within the line timeout.
#[test]
fn half_lines_time_out_before_idle_connections() {
    let config = Config {
        line_timeout: Duration::from_millis(400),
        client_timeout: Duration::from_secs(30),
        ..test_config()
    };
    let node = start_node(config);
    let addr = node.addr();
    let mut idle = Raw::connect(addr);
    let mut stalled = TcpStream::connect(addr).expect("connect");
    stalled.write_all(br#"{"type":"pi"#).expect("write");
    stalled
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let n = stalled.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the stalled connection is closed without a reply");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    // The idle one, opened before, is still served.
    idle.assert_usable();

    // A byte every 50 ms: each read finds data well within 400 ms, but the line
    // as a whole does not arrive in time.
    let mut drip = TcpStream::connect(addr).expect("connect");
    drip.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let started = Instant::now();
    let line = br#"{"type":"ping","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let mut closed = false;
    for b in line.iter() {
        if drip.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        match drip.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("a reply to a line that was never finished"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        closed,
        "a line trickled over {:?} was not cut off",
        started.elapsed()
    );
    idle.assert_usable();
}

// ---------------------------------------------------------------------------
// Verified peers

/// Every node id a `status` reply names: leaf set, routing table, neighborhood.
fn state_ids(addr: SocketAddr) -> Vec<NodeId> {
    let s = rpc(addr, &json!({"type": "status"}));
    assert_eq!(s["type"], "status", "{s}");
    let mut ids = Vec::new();
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let entries = list(&s["leaf_set"]["smaller"])
        .into_iter()
        .chain(list(&s["leaf_set"]["larger"]))
        .chain(list(&s["routing_table"]))
        .chain(list(&s["neighborhood"]));
    for e in entries {
        let id: NodeId = e["node_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad entry in status: {e}"));
        ids.push(id);
    }
    ids
}

/// How a [`FakePeer`] answers a ping.
#[derive(Clone, Copy)]
enum Pong {
    /// With its genuine id: it passes the dial-back.
    AsItself,
    /// As another node.
    As(NodeId),
    /// With an error.
    Never,
}

/// A fake peer on loopback: answers `ping` as `pong` says and `announce` with
/// `leaf_set` as its leaf set, everything else with an error. What a hostile
/// node (or a non-Pastry server) at a real address might say.
struct FakePeer {
    addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakePeer {
    fn start(pong: Pong, leaf_set: Vec<Value>) -> FakePeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pong_as = match pong {
            Pong::AsItself => Some(NodeId::for_addr(&addr)),
            Pong::As(id) => Some(id),
            Pong::Never => None,
        };
        let me = json!({"node_id": NodeId::for_addr(&addr).to_string(), "addr": addr.to_string()});
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (me, leaf_set) = (me.clone(), leaf_set.clone());
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut w = conn.try_clone().expect("clone");
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        let req: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                        let reply = match (req["type"].as_str(), pong_as) {
                            (Some("ping"), Some(id)) => {
                                json!({"type": "pong", "node_id": id.to_string(), "addr": me["addr"]})
                            }
                            (Some("announce"), _) => {
                                json!({"type": "leaf_set", "node": me, "leaf_set": leaf_set, "rows": leaf_set})
                            }
                            _ => json!({"type": "error", "code": -32601, "message": "no"}),
                        };
                        if writeln!(w, "{reply}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakePeer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    fn info(&self) -> NodeInfo {
        NodeInfo::new(self.addr)
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn entry(id: &str, addr: &str) -> Value {
    json!({"node_id": id, "addr": addr})
}

/// No forged node entry enters any node's state, whichever message carries it:
/// an id that is not SHA-1 of its address, a genuine id at an address where
/// nothing listens, a genuine id at an address where something else answers, the
/// receiving node's own id, ids of the wrong case or length. Checked through
/// `status`, on every node, after several maintenance ticks.
#[test]
fn forged_peers_never_enter_any_state() {
    let c = LocalCluster::new(3);
    c.wait_for_ideal_leaf_sets(Duration::from_secs(30));
    let target = c.addr(0);
    let own = c.node(0).node().own();
    let dead = NodeInfo::new(dead_addr());
    // Something listens there, but answers pings as another node.
    let impostor = FakePeer::start(Pong::As(NodeId::for_key("someone else")), vec![]);
    // Something listens there and answers nothing but errors.
    let mute = FakePeer::start(Pong::Never, vec![]);
    let genuine_id = own.node_id.to_string();
    let upper = genuine_id.to_uppercase();
    let forged_entries = [
        entry(
            &NodeId::for_key("made up").to_string(),
            &c.addr(1).to_string(),
        ),
        serde_json::to_value(dead).expect("json"),
        serde_json::to_value(impostor.info()).expect("json"),
        serde_json::to_value(mute.info()).expect("json"),
        serde_json::to_value(own).expect("json"),
    ];
    let mut conn = Raw::connect(target);

    // The sender of an announcement, and a joiner: each forged kind is refused.
    let cases: Vec<(Value, i64, &str)> = vec![
        (forged_entries[0].clone(), BAD_NODE, "genuine"),
        (forged_entries[1].clone(), BAD_NODE, "cannot verify"),
        (forged_entries[2].clone(), BAD_NODE, "cannot verify"),
        (forged_entries[3].clone(), BAD_NODE, "cannot verify"),
        (forged_entries[4].clone(), BAD_NODE, "this node"),
        (
            entry(&upper, &own.addr.to_string()),
            INVALID_PARAMS,
            "lowercase",
        ),
        (
            entry(&genuine_id[..39], &own.addr.to_string()),
            INVALID_PARAMS,
            "40",
        ),
        (
            entry(&format!("{genuine_id}0"), &own.addr.to_string()),
            INVALID_PARAMS,
            "40",
        ),
        (
            json!({"node_id": 5, "addr": own.addr.to_string()}),
            INVALID_PARAMS,
            "invalid",
        ),
        (
            json!({"node_id": genuine_id, "addr": "127.0.0.1"}),
            INVALID_PARAMS,
            "invalid",
        ),
    ];
    for (n, code, says) in &cases {
        let r = conn.request(&json!({"type": "announce", "node": n, "rows": []}));
        assert_eq!(error_code(&r), *code, "announce {n}: {r}");
        assert!(message(&r).contains(says), "announce {n}: {r}");
    }
    // A join or forwarded join claiming to be the node itself.
    for req in [
        json!({"type": "join", "node": own}),
        json!({"type": "forward", "hops": 2, "op": {"type": "join", "node": own}}),
    ] {
        let r = conn.request(&req);
        assert_eq!(error_code(&r), BAD_NODE, "{req}: {r}");
    }
    // A join for a genuine node that is not there is routed (the nodes on the
    // path cannot know yet), but none of them takes the joiner in.
    let r = conn.request(&json!({"type": "join", "node": dead}));
    assert_eq!(r["type"], "joined", "{r}");

    // A genuine sender (node 1, really there) passing forged entries as hearsay,
    // in its rows: the announcement is answered, the entries are not taken in.
    let real = c.node(1).node().own();
    let r = conn.request(&json!({"type": "announce", "node": real, "rows": forged_entries}));
    assert_eq!(r["type"], "leaf_set", "{r}");
    // A hostile peer at a real address, that passes every check for itself (it
    // answers there with its id), hands out the forged entries as its leaf set
    // when a node announces itself to it. It is taken in (it is what it claims
    // to be: out of scope), what it hands out is not.
    let liar = FakePeer::start(Pong::AsItself, forged_entries.to_vec());
    let r = conn.request(&json!({"type": "announce", "node": real, "rows": [liar.info()]}));
    assert_eq!(r["type"], "leaf_set", "{r}");
    conn.assert_usable();
    assert!(
        wait_until(Duration::from_secs(10), || c
            .node(0)
            .node()
            .knows(&liar.info().node_id)),
        "the liar, heard of from a real node, was probed and taken in"
    );

    // Several ticks for probes and heartbeats to act on anything taken in.
    std::thread::sleep(c.config.tick * 6);
    let mut allowed: HashSet<NodeId> = c.ids().into_iter().collect();
    allowed.insert(liar.info().node_id);
    for i in 0..3 {
        for id in state_ids(c.addr(i)) {
            assert!(
                allowed.contains(&id),
                "node {i} holds {id}, which is neither one of the cluster's nodes nor the liar"
            );
        }
    }
    // Routing still works after all that, for a key whose root is a real node.
    // (A key whose root is the liar gets the liar's answer: an attacker at a
    // real address is out of scope. The liar may also be in the key's replica
    // set; it refuses copies, so `replicas` may count fewer than 3.)
    let liar_id = liar.info().node_id;
    let key = (0..)
        .map(|i| format!("after{i}"))
        .find(|k| {
            let id = NodeId::for_key(k);
            allowed
                .iter()
                .min_by(|a, b| pastry::utils::closer_to(&id, a, b))
                .is_some_and(|root| *root != liar_id)
        })
        .expect("some key has a real root");
    let p = rpc(target, &json!({"type": "put", "key": key, "value": 1}));
    assert_eq!(p["type"], "put_ok", "{p}");
}

/// A genuine node that is really there and answers as itself is taken in when it
/// announces itself: the dial-back refuses only what it should.
#[test]
fn a_real_newcomer_is_verified_and_taken_in() {
    let a = start_node(test_config());
    let b = start_node(test_config());
    let r = rpc(
        a.addr(),
        &json!({"type": "announce", "node": b.node().own()}),
    );
    assert_eq!(r["type"], "leaf_set", "{r}");
    assert!(a.node().knows(&b.id()));
    assert!(state_ids(a.addr()).contains(&b.id()));
    // A forged announcement on behalf of a node that is running, but at a port
    // whose id is not its id, is still refused.
    let wrong = entry(&b.id().to_string(), &a.addr().to_string());
    let r = rpc(a.addr(), &json!({"type": "announce", "node": wrong}));
    assert_eq!(error_code(&r), BAD_NODE, "{r}");
}

// ---------------------------------------------------------------------------
// Fuzzing

/// Builds request lines, valid and broken, from a seed.
struct Gen {
    rng: Rng,
    /// Addresses that genuine node entries may name: the cluster's nodes and a
    /// dead port on loopback. Nodes dial entries back, so no generated entry
    /// with a genuine id may point anywhere else.
    addrs: Vec<SocketAddr>,
}

const KINDS: [&str; 17] = [
    "ping",
    "help",
    "put",
    "store",
    "get",
    "lookup",
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

impl Gen {
    fn new(seed: u64, addrs: Vec<SocketAddr>) -> Gen {
        Gen {
            rng: Rng::new(seed),
            addrs,
        }
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn string(&mut self) -> String {
        match self.below(8) {
            0 => String::new(),
            1 => "k".repeat(1023 + self.below(3)),
            2 => "ключ-€-🔑".to_string(),
            3 => "\u{0}\u{1f}\"\\\n\r\t".to_string(),
            4 => (0..self.below(40))
                .map(|_| char::from_u32(self.below(0x3000) as u32).unwrap_or('?'))
                .collect(),
            _ => format!("key{}", self.below(50)),
        }
    }

    fn number(&mut self) -> Value {
        match self.below(8) {
            0 => json!(-1),
            1 => json!(u64::MAX),
            2 => json!(i64::MIN),
            3 => json!(1.5),
            4 => json!(f64::MAX),
            5 => json!(u32::MAX as u64 + 1),
            _ => json!(self.below(80)),
        }
    }

    /// A JSON value of a random type, nested up to `depth`.
    fn value(&mut self, depth: usize) -> Value {
        match self.below(if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => json!(self.chance(50)),
            2 => self.number(),
            3 | 4 => json!(self.string()),
            5 => Value::Array((0..self.below(4)).map(|_| self.value(depth - 1)).collect()),
            _ => {
                let mut m = Map::new();
                for _ in 0..self.below(4) {
                    let k = self.string();
                    m.insert(k, self.value(depth - 1));
                }
                Value::Object(m)
            }
        }
    }

    fn addr(&mut self) -> SocketAddr {
        let i = self.below(self.addrs.len());
        self.addrs[i]
    }

    fn id_string(&mut self) -> String {
        let addr = self.addr();
        let genuine = NodeId::for_addr(&addr).to_string();
        match self.below(6) {
            0 => genuine.to_uppercase(),
            1 => genuine[..39].to_string(),
            2 => format!("{genuine}a"),
            3 => NodeId::for_key(&self.string()).to_string(),
            _ => genuine,
        }
    }

    /// A node entry: mostly genuine for one of `addrs`, else forged or broken.
    fn node(&mut self) -> Value {
        let addr = self.addr();
        match self.below(10) {
            0 => self.value(2),
            1 => json!({"node_id": self.id_string()}),
            2 => json!({"node_id": self.id_string(), "addr": "127.0.0.1"}),
            3 => json!({"node_id": self.id_string(), "addr": "[::1]:9"}),
            4 | 5 => json!({"node_id": self.id_string(), "addr": addr.to_string()}),
            _ => serde_json::to_value(NodeInfo::new(addr)).unwrap_or(Value::Null),
        }
    }

    fn key(&mut self) -> Value {
        if self.chance(85) {
            json!(self.string())
        } else {
            self.value(1)
        }
    }

    fn op(&mut self) -> Value {
        let kind = ["put", "get", "delete", "route", "join"][self.below(5)];
        let mut r = self.request_of(kind);
        if self.chance(10) {
            r = self.mutate(r);
        }
        r
    }

    fn request_of(&mut self, kind: &str) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), json!(kind));
        match kind {
            "put" | "store" => {
                m.insert("key".into(), self.key());
                m.insert("value".into(), self.value(3));
            }
            "get" | "lookup" | "delete" | "route" | "fetch" => {
                m.insert("key".into(), self.key());
            }
            "join" => {
                m.insert("node".into(), self.node());
            }
            "announce" => {
                m.insert("node".into(), self.node());
                let rows: Vec<Value> = (0..self.below(4)).map(|_| self.node()).collect();
                m.insert("rows".into(), json!(rows));
            }
            "forward" => {
                let hops = if self.chance(80) {
                    json!(self.below(70))
                } else {
                    self.number()
                };
                m.insert("hops".into(), hops);
                m.insert("op".into(), self.op());
            }
            "leave" => {
                m.insert("node".into(), self.node());
            }
            "digest" => {
                m.insert("node".into(), self.node());
                let buckets: Vec<Value> = (0..self.below(5)).map(|_| self.number()).collect();
                m.insert("buckets".into(), json!(buckets));
            }
            "replicate" => {
                let entries: Vec<Value> = (0..self.below(4))
                    .map(|_| {
                        json!({"key": self.key(), "version": self.number(),
                               "deleted": self.chance(20), "value": self.value(2)})
                    })
                    .collect();
                m.insert("entries".into(), json!(entries));
            }
            _ => {}
        }
        if self.chance(20) {
            m.insert("id".into(), self.value(1));
        }
        Value::Object(m)
    }

    /// Removes a field, gives one the wrong type, renames the type or adds junk.
    fn mutate(&mut self, v: Value) -> Value {
        let Value::Object(mut m) = v else { return v };
        let keys: Vec<String> = m.keys().cloned().collect();
        let field = keys[self.below(keys.len())].clone();
        match self.below(4) {
            0 => {
                m.remove(&field);
            }
            1 => {
                let junk = self.value(2);
                m.insert(field, junk);
            }
            2 => {
                let kind = KINDS[self.below(KINDS.len())];
                let t = if self.chance(30) {
                    json!(format!("{kind}x"))
                } else {
                    json!(kind)
                };
                m.insert("type".into(), t);
            }
            _ => {
                let k = self.string();
                let junk = self.value(2);
                m.insert(k, junk);
            }
        }
        Value::Object(m)
    }

    /// One line, without its terminator, never empty or all whitespace (which
    /// get no reply) and never containing `\n`.
    fn line(&mut self) -> Vec<u8> {
        let kind = KINDS[self.below(KINDS.len())];
        let mut line = match self.below(10) {
            0 | 1 => self.request_of(kind).to_string().into_bytes(),
            2..=4 => {
                let r = self.request_of(kind);
                self.mutate(r).to_string().into_bytes()
            }
            5 => {
                // Truncated.
                let s = self.request_of(kind).to_string().into_bytes();
                let cut = 1 + self.below(s.len().max(1));
                s[..cut.min(s.len())].to_vec()
            }
            6 => (0..1 + self.below(60))
                .map(|_| self.below(256) as u8)
                .collect(),
            7 => {
                // Deeply nested, alone or as a put's value.
                let depth = 1 + self.below(300);
                let (open, close) = if self.chance(50) {
                    ("[".repeat(depth), "]".repeat(depth))
                } else {
                    ("{\"a\":".repeat(depth), "}".repeat(depth))
                };
                if self.chance(50) {
                    format!("{open}1{close}").into_bytes()
                } else {
                    format!(r#"{{"type":"put","key":"deep","value":{open}1{close}}}"#).into_bytes()
                }
            }
            8 => {
                // Huge and odd numbers where small ones go.
                let n = [
                    "1e400",
                    "-1e400",
                    "18446744073709551616",
                    "-0",
                    "1.0",
                    "0x10",
                    "NaN",
                    "01",
                ][self.below(8)];
                match self.below(3) {
                    0 => format!(r#"{{"type":"forward","hops":{n},"op":{{"type":"get","key":"a"}}}}"#),
                    1 => format!(r#"{{"type":"replicate","entries":[{{"key":"a","version":{n},"value":1}}]}}"#),
                    _ => format!(r#"{{"type":"ping","id":{n}}}"#),
                }
                .into_bytes()
            }
            _ => self.value(3).to_string().into_bytes(),
        };
        line.retain(|b| *b != b'\n');
        if line.iter().all(u8::is_ascii_whitespace) {
            line.insert(0, b'x');
        }
        line
    }
}

/// Thousands of generated lines straight into the decoder: it never panics, an
/// error always carries a known code and a message, and whatever it accepts
/// encodes back to a line that decodes to the same request.
#[test]
fn fuzz_the_decoder() {
    let addrs = vec![dead_addr(), "127.0.0.1:4000".parse().expect("addr")];
    let mut gen = Gen::new(0x5eed_0001, addrs);
    let (mut accepted, mut rejected) = (0, 0);
    for i in 0..30_000 {
        let mut line = gen.line();
        // Now and then flip a few bytes of it, too.
        if gen.chance(15) && !line.is_empty() {
            for _ in 0..1 + gen.below(3) {
                let at = gen.below(line.len());
                line[at] = gen.below(256) as u8;
            }
        }
        match decode(&line) {
            Ok(envelope) => {
                accepted += 1;
                let again = serde_json::to_vec(&envelope.request).expect("encode");
                let back = decode(&again).unwrap_or_else(|e| {
                    panic!(
                        "line {i}: {} re-encoded does not decode: {e:?}",
                        String::from_utf8_lossy(&line)
                    )
                });
                assert_eq!(back.request, envelope.request, "line {i}");
            }
            Err(rejection) => {
                rejected += 1;
                assert!(CODES.contains(&rejection.code), "line {i}: {rejection:?}");
                assert!(!rejection.message.is_empty());
            }
        }
    }
    eprintln!("decoder: {accepted} lines accepted, {rejected} rejected");
    assert!(
        accepted > 3_000 && rejected > 3_000,
        "{accepted} / {rejected}: the generator lost its mix"
    );
}

/// Sends `lines` on one connection, pipelined in small batches, and checks that
/// each gets exactly one reply line: after every batch a tagged ping must come
/// back as the very next line. Returns the replies' error codes (0 for success).
fn fuzz_connection(addr: SocketAddr, gen: &mut Gen, lines: usize, tag: &str) -> Vec<i64> {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut reader = BufReader::new(stream);
    let mut codes = Vec::with_capacity(lines);
    let mut sent = 0;
    let mut batch_no = 0;
    while sent < lines {
        let batch: Vec<Vec<u8>> = (0..(1 + gen.below(8)).min(lines - sent))
            .map(|_| gen.line())
            .collect();
        let mut out = Vec::new();
        for l in &batch {
            out.extend_from_slice(l);
            out.extend_from_slice(if gen.chance(10) { b"\r\n" } else { b"\n" });
        }
        let ping_id = format!("{tag}-{batch_no}");
        out.extend_from_slice(
            json!({"type": "ping", "id": ping_id})
                .to_string()
                .as_bytes(),
        );
        out.push(b'\n');
        writer.write_all(&out).expect("write");
        for l in &batch {
            let mut reply = String::new();
            reader
                .read_line(&mut reply)
                .unwrap_or_else(|e| panic!("no reply to {}: {e}", String::from_utf8_lossy(l)));
            let r: Value = serde_json::from_str(&reply).unwrap_or_else(|e| {
                panic!("reply {reply:?} to {}: {e}", String::from_utf8_lossy(l))
            });
            let kind = r["type"].as_str().unwrap_or_else(|| panic!("{r}"));
            codes.push(if kind == "error" {
                let code = r["code"].as_i64().unwrap_or(0);
                assert!(
                    CODES.contains(&code),
                    "{} -> {r}",
                    String::from_utf8_lossy(l)
                );
                code
            } else {
                0
            });
        }
        let mut reply = String::new();
        reader.read_line(&mut reply).expect("ping reply");
        let r: Value = serde_json::from_str(&reply).expect("pong is JSON");
        assert_eq!(
            (r["type"].as_str(), r["id"].as_str()),
            (Some("pong"), Some(ping_id.as_str())),
            "one reply per line: after {batch:?} came {r}"
        );
        sent += batch.len();
        batch_no += 1;
    }
    codes
}

/// Thousands of generated lines against a live 3-node network, on one
/// connection and on several at once: each line gets exactly one reply, every
/// error has a known code, the nodes keep answering, and nothing the lines
/// carried poisons a routing state.
#[test]
fn fuzz_live_nodes() {
    let c = LocalCluster::new(3);
    c.wait_for_ideal_leaf_sets(Duration::from_secs(30));
    let mut addrs = c.addrs();
    addrs.push(dead_addr());
    let started = Instant::now();
    let mut gen = Gen::new(0x5eed_0002, addrs.clone());
    let mut codes = fuzz_connection(c.addr(0), &mut gen, 4_000, "single");
    let cluster_addrs = c.addrs();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let addrs = addrs.clone();
                let to = cluster_addrs[t % cluster_addrs.len()];
                s.spawn(move || {
                    let mut gen = Gen::new(0x5eed_1000 + t as u64, addrs);
                    fuzz_connection(to, &mut gen, 500, &format!("conn{t}"))
                })
            })
            .collect();
        for h in handles {
            codes.extend(h.join().expect("fuzz thread"));
        }
    });
    let mut by_code: std::collections::BTreeMap<i64, usize> = Default::default();
    for c in &codes {
        *by_code.entry(*c).or_default() += 1;
    }
    eprintln!(
        "live nodes: {} lines in {:?}; replies by code (0 = success): {by_code:?}",
        codes.len(),
        started.elapsed()
    );
    assert_eq!(codes.len(), 4_000 + 8 * 500);
    assert!(by_code.get(&0).copied().unwrap_or(0) > 1_000, "{by_code:?}");
    assert!(by_code.len() >= 6, "too few kinds of reply: {by_code:?}");

    // Still serving, and routing correctly.
    for i in 0..3 {
        let p = rpc(
            c.addr(i),
            &json!({"type": "put", "key": format!("after{i}"), "value": i}),
        );
        assert_eq!(p["type"], "put_ok", "{p}");
        let g = rpc(
            c.addr((i + 1) % 3),
            &json!({"type": "get", "key": format!("after{i}")}),
        );
        assert_eq!(g["value"], i, "{g}");
    }
    let cluster: HashSet<NodeId> = c.ids().into_iter().collect();
    std::thread::sleep(c.config.tick * 3);
    for i in 0..3 {
        for id in state_ids(c.addr(i)) {
            assert!(
                cluster.contains(&id),
                "node {i} holds {id}: fuzzing poisoned its state"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Load

/// The soft limit on open files of this process, from /proc (Linux).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Hundreds of idle connections do not keep a real client from being served,
/// and stay usable themselves. The count fits the default `ulimit -n` of 1024:
/// the node runs in this process, so each connection costs two descriptors.
#[test]
fn hundreds_of_idle_connections_do_not_starve_a_client() {
    let limit = open_file_limit().unwrap_or(1024);
    let idle_count = 300.min(limit.saturating_sub(300) / 2);
    assert!(
        idle_count >= 100,
        "open file limit {limit} is too low for this test"
    );
    let node = start_node(test_config());
    let addr = node.addr();
    let mut idle: Vec<TcpStream> = (0..idle_count)
        .map(|i| TcpStream::connect(addr).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    // Every one of them holds a thread of the node now.
    let stats = || rpc(addr, &json!({"type": "stats"}));
    assert!(
        wait_until(Duration::from_secs(30), || {
            stats()["connections_open"].as_u64() >= Some(idle_count as u64)
        }),
        "{}",
        stats()
    );
    // A real client: its reads time out after 10 s, a deadline no healthy node
    // comes near; it is here to say "served", not "fast".
    let mut client = Raw::connect(addr);
    client
        .client
        .stream()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for i in 0..20 {
        let key = format!("busy{i}");
        assert_eq!(
            client.request(&json!({"type": "put", "key": key, "value": i}))["type"],
            "put_ok"
        );
        assert_eq!(
            client.request(&json!({"type": "get", "key": key}))["value"],
            i
        );
    }
    // The idle ones were kept, and answer too.
    for s in idle.iter_mut().step_by(50) {
        s.write_all(b"{\"type\":\"ping\"}\n").expect("write");
        let mut line = String::new();
        BufReader::new(&*s).read_line(&mut line).expect("pong");
        assert!(line.contains("pong"), "{line}");
    }
    for s in &idle {
        let _ = s.shutdown(Shutdown::Both);
    }
}

/// Dozens of clients at once, each mixing valid requests with broken ones on the
/// same connection: every valid request is answered correctly, every broken one
/// with its error, and none is confused with another's.
#[test]
fn many_clients_mixing_valid_and_invalid_requests() {
    let c = LocalCluster::new(3);
    c.wait_for_ideal_leaf_sets(Duration::from_secs(30));
    let addrs = c.addrs();
    let bad: Vec<(String, i64)> = vec![
        ("{".into(), PARSE_ERROR),
        ("\u{1}\u{2}garbage".into(), PARSE_ERROR),
        ("[1,2,3]".into(), INVALID_REQUEST),
        (r#"{"type":"teleport"}"#.into(), UNKNOWN_TYPE),
        (r#"{"type":"put","key":7,"value":1}"#.into(), INVALID_PARAMS),
        (json!({"type": "get", "key": "k".repeat(2000)}).to_string(), INVALID_PARAMS),
        (r#"{"type":"forward","hops":1e400,"op":{"type":"get","key":"a"}}"#.into(), PARSE_ERROR),
        (json!({"type": "announce", "node": {"node_id": NodeId::for_key("x").to_string(), "addr": "127.0.0.1:9"}}).to_string(), BAD_NODE),
        (json!({"type": "forward", "hops": 1000, "op": {"type": "get", "key": "a"}}).to_string(), HOP_CAP),
    ];
    let clients = 24;
    let rounds = 15;
    std::thread::scope(|s| {
        for t in 0..clients {
            let addr = addrs[t % addrs.len()];
            // A join claiming to be the very node it is sent to.
            let mut bad = bad.clone();
            bad.push((
                json!({"type": "join", "node": NodeInfo::new(addr)}).to_string(),
                BAD_NODE,
            ));
            s.spawn(move || {
                let mut conn = Raw::connect(addr);
                for i in 0..rounds {
                    let key = format!("client{t}-key{i}");
                    let value = json!({"t": t, "i": i});
                    let id = format!("{t}-{i}");
                    let r =
                        conn.request(&json!({"type": "put", "key": key, "value": value, "id": id}));
                    assert_eq!(
                        (r["type"].as_str(), r["id"].as_str()),
                        (Some("put_ok"), Some(id.as_str())),
                        "{r}"
                    );
                    let (line, code) = &bad[(t + i) % bad.len()];
                    let r = conn.send(line);
                    assert_eq!(error_code(&r), *code, "{line:.80} -> {r}");
                    let r = conn.request(&json!({"type": "get", "key": key, "id": i}));
                    assert_eq!(r["value"], value, "{r}");
                    assert_eq!(r["id"], i, "{r}");
                    let (line, code) = &bad[(t * 7 + i) % bad.len()];
                    let r = conn.send(line);
                    assert_eq!(error_code(&r), *code, "{line:.80} -> {r}");
                }
            });
        }
    });
    // Every acknowledged write is there, read from another node.
    for t in 0..clients {
        let key = format!("client{t}-key{}", rounds - 1);
        let g = rpc(
            addrs[(t + 1) % addrs.len()],
            &json!({"type": "get", "key": key}),
        );
        assert_eq!(g["value"], json!({"t": t, "i": rounds - 1}), "{g}");
    }
}

/// `request_types` (what `unknown type` lists) and this file's list agree, so the
/// generator covers every request type.
#[test]
fn the_generator_covers_every_request_type() {
    let mut ours: Vec<&str> = KINDS.to_vec();
    let mut theirs = request_types();
    ours.sort_unstable();
    theirs.sort_unstable();
    assert_eq!(ours, theirs);
}
