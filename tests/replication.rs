//! Replication with real nodes on loopback: every acknowledged write survives
//! nodes stopping and joining, and copies return to k.

mod support;

use std::time::Duration;

use pastry::utils::{closer_to, NodeId};
use serde_json::{json, Value};
use support::{id_field, rpc, test_config, wait_until, Bootstrap, LocalCluster};

const K: usize = 3;
const DEADLINE: Duration = Duration::from_secs(10);

fn key(i: usize) -> String {
    format!("fruit-{i}")
}

/// Puts `count` keys through rotating nodes; every put must be acknowledged by
/// the full replica set.
fn put_keys(c: &LocalCluster, count: usize) {
    let live = c.live();
    for i in 0..count {
        let through = live[i % live.len()];
        let r = rpc(
            c.addr(through),
            &json!({"type": "put", "key": key(i), "value": {"n": i}}),
        );
        assert_eq!(r["type"], "put_ok", "{r}");
        assert_eq!(r["replicas"], K, "{r}");
    }
}

/// The live nodes that should hold `key`: the k numerically closest to its id.
fn replica_set(c: &LocalCluster, key: &str) -> Vec<NodeId> {
    let key_id = NodeId::for_key(key);
    let mut ids = c.ids();
    ids.sort_by(|a, b| closer_to(&key_id, a, b));
    ids.truncate(K);
    ids
}

/// Every key, from every live node, with its value and its brute-force root.
fn all_readable_everywhere(c: &LocalCluster, count: usize) -> Result<(), String> {
    for i in 0..count {
        let root = c.brute_force_root(&NodeId::for_key(&key(i)));
        for asked in c.live() {
            let r: Value = rpc(c.addr(asked), &json!({"type": "get", "key": key(i)}));
            if r["type"] != "value" || r["value"]["n"] != i || id_field(&r, "owner") != root {
                return Err(format!("get {} from node {asked}: {r}", key(i)));
            }
        }
    }
    Ok(())
}

/// Every key is held by its replica set: by every member (and, if `exactly`,
/// by no other node: copies of nodes no longer in the set have been dropped).
fn held_by_replica_sets(c: &LocalCluster, count: usize, exactly: bool) -> Result<(), String> {
    for i in 0..count {
        let mut holders: Vec<NodeId> = c
            .live()
            .into_iter()
            .filter(|&n| c.node(n).node().store_get(&key(i)).is_some())
            .map(|n| c.id(n))
            .collect();
        let mut want = replica_set(c, &key(i));
        holders.sort();
        want.sort();
        let ok = if exactly {
            holders == want
        } else {
            want.iter().all(|w| holders.contains(w))
        };
        if !ok {
            return Err(format!("{}: held by {holders:?}, want {want:?}", key(i)));
        }
    }
    Ok(())
}

/// Every key is held by exactly its replica set.
fn back_to_k_copies(c: &LocalCluster, count: usize) -> Result<(), String> {
    held_by_replica_sets(c, count, true)
}

fn wait_for(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let mut last = String::new();
    let ok = wait_until(DEADLINE, || match check() {
        Ok(()) => true,
        Err(e) => {
            last = e;
            false
        }
    });
    assert!(ok, "{what} within {DEADLINE:?}: {last}");
}

#[test]
fn two_nodes_stopped_at_once_lose_no_acknowledged_key() {
    let mut c = LocalCluster::new(24);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let count = 60;
    put_keys(&c, count);
    // The worst case for key 0: its root and the next member of its replica set
    // stop together, leaving one copy.
    let set = replica_set(&c, &key(0));
    let victims = [c.index_of(&set[0]).unwrap(), c.index_of(&set[1]).unwrap()];
    for v in victims {
        c.kill(v);
    }
    wait_for("every key readable from every survivor", || {
        all_readable_everywhere(&c, count)
    });
    wait_for("every key back to k copies", || back_to_k_copies(&c, count));
}

#[test]
fn joining_nodes_take_over_their_keys() {
    let mut c = LocalCluster::new(10);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let count = 40;
    put_keys(&c, count);
    for j in 0..8 {
        let live = c.live();
        c.add(Some(live[(j * 7) % live.len()]));
    }
    c.wait_for_ideal_leaf_sets(DEADLINE);
    // Readable at once (a new root that lacks a key asks its replica set)...
    all_readable_everywhere(&c, count).unwrap();
    // ...and soon held by the new replica sets themselves, and by nobody else:
    // the nodes pushed out of a set hand their copy over and drop it.
    wait_for("new replica sets holding their keys", || {
        held_by_replica_sets(&c, count, false)
    });
    wait_for("copies dropped by nodes no longer in the set", || {
        back_to_k_copies(&c, count)
    });
    let dropped: u64 = c
        .live()
        .into_iter()
        .map(|i| {
            rpc(c.addr(i), &json!({"type": "stats"}))["copies_dropped"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert!(dropped > 0, "no node reports a dropped copy");
}

/// A copy lost without any change of membership (a push that never arrived) is
/// restored by anti-entropy: the replicas compare digests and send what differs.
#[test]
fn anti_entropy_restores_a_lost_copy() {
    let c = LocalCluster::new(12);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let count = 20;
    put_keys(&c, count);
    wait_for("every key at k copies", || back_to_k_copies(&c, count));
    // Past every node's first replication round (which, with no earlier leaf
    // set to compare with, pushes everything).
    let ticked = |n: u64| c.live().into_iter().all(|i| c.node(i).node().ticks() >= n);
    let now = c
        .live()
        .into_iter()
        .map(|i| c.node(i).node().ticks())
        .max()
        .unwrap();
    assert!(wait_until(DEADLINE, || ticked(now.max(3))));
    // Two replicas lose their copy of key 0, one of key 1 only: no leaf set
    // changes, so only anti-entropy can bring them back.
    let lose = |i: usize, member: usize| {
        let holder = c.index_of(&replica_set(&c, &key(i))[member]).unwrap();
        let e = c.node(holder).node().store_entry(&key(i)).unwrap();
        assert!(c.node(holder).node().drop_copy(&key(i), &e));
    };
    lose(0, 1);
    lose(0, 2);
    lose(1, 0);
    assert!(back_to_k_copies(&c, count).is_err());
    wait_for("lost copies restored", || back_to_k_copies(&c, count));
}

/// Regression: two roots that wrote one key in the same millisecond (routing
/// briefly inconsistent) left two replicas with different values at one
/// version, for good: neither copy replaced the other, and digests did not
/// tell them apart. Now the digests differ, the copies are exchanged, and
/// every replica keeps the value whose JSON text is greater.
#[test]
fn replicas_with_different_values_at_one_version_converge() {
    let config = pastry::pastry_node::Config {
        replication_period_ticks: 2,
        ..test_config()
    };
    let c = LocalCluster::with(8, config, Bootstrap::Random(11));
    c.wait_for_ideal_leaf_sets(DEADLINE);
    // Past the pushes for the last leaf-set change (they would carry each copy
    // to the other replicas at once): from here only anti-entropy can, and it
    // must first see the copies differ.
    let ticks = || c.live().into_iter().map(|i| c.node(i).node().ticks());
    let settled = ticks().max().unwrap() + 2;
    assert!(wait_until(DEADLINE, || ticks().all(|t| t >= settled)));
    let k = "same-millisecond";
    let set = replica_set(&c, k);
    let member = |m: usize| c.index_of(&set[m]).unwrap();
    // What two roots' pushes would have left: one value on one replica, the
    // other on the next, at the same version.
    let version = 1_700_000_000_000u64;
    for (m, value) in [(0, "blue"), (1, "red")] {
        let r = rpc(
            c.addr(member(m)),
            &json!({"type": "replicate", "entries": [
                {"key": k, "version": version, "value": value}
            ]}),
        );
        assert_eq!(r["applied"], 1, "{r}");
    }
    let value_of = |m: usize| c.node(member(m)).node().store_entry(k);
    // "\"red\"" is greater than "\"blue\"" byte-wise.
    wait_for("every replica holding the same value", || {
        let held: Vec<_> = (0..K).map(value_of).collect();
        if held.iter().all(|e| {
            e.as_ref()
                .is_some_and(|e| e.version == version && e.value == "red")
        }) {
            Ok(())
        } else {
            Err(format!("replicas hold {held:?}"))
        }
    });
    for i in c.live() {
        let r = rpc(c.addr(i), &json!({"type": "get", "key": k}));
        assert_eq!(r["value"], "red", "from node {i}: {r}");
    }
}

/// A write is acknowledged only once it is the newest copy of its key. A
/// replica may hold a copy with a higher version than the root would give (the
/// root lacked the key, or its clock is behind); the root then takes that copy
/// in, writes again above it, and every replica ends with the acknowledged
/// value. Before, `put_ok` counted that replica as holding the write, and the
/// newer copy soon replaced it everywhere. A copy at the highest version, which
/// no write can outrank, gets the write refused rather than acknowledged.
#[test]
fn a_write_is_acknowledged_only_as_the_newest_copy() {
    let c = LocalCluster::with(8, test_config(), Bootstrap::Random(13));
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let k = "apple";
    let set = replica_set(&c, k);
    let member = |m: usize| c.index_of(&set[m]).unwrap();
    let r = rpc(
        c.addr(member(0)),
        &json!({"type": "put", "key": k, "value": "red"}),
    );
    assert_eq!(r["replicas"], K, "{r}");
    // A replica's copy from ten minutes ahead.
    let ahead = c.node(member(1)).node().store_entry(k).unwrap().version + 600_000;
    let r = rpc(
        c.addr(member(1)),
        &json!({"type": "replicate", "entries": [{"key": k, "version": ahead, "value": "ahead"}]}),
    );
    assert_eq!(r["applied"], 1, "{r}");
    let live = c.live();
    let r = rpc(
        c.addr(live[0]),
        &json!({"type": "put", "key": k, "value": "blue"}),
    );
    assert_eq!(r["type"], "put_ok", "{r}");
    assert_eq!(r["replicas"], K, "{r}");
    for m in 0..K {
        let e = c.node(member(m)).node().store_entry(k).unwrap();
        assert!(
            e.value == "blue" && e.version > ahead,
            "replica {m} holds {e:?} right after the put was acknowledged"
        );
    }
    // The same for a delete.
    let r = rpc(
        c.addr(member(2)),
        &json!({"type": "replicate", "entries": [{"key": k, "version": ahead + 600_000, "value": "ahead"}]}),
    );
    assert_eq!(r["applied"], 1, "{r}");
    let r = rpc(c.addr(live[1]), &json!({"type": "delete", "key": k}));
    assert_eq!(r["type"], "deleted", "{r}");
    assert_eq!(r["replicas"], K, "{r}");
    for m in 0..K {
        let e = c.node(member(m)).node().store_entry(k).unwrap();
        assert!(e.deleted, "replica {m} holds {e:?} after the delete");
    }
    // Pinned: no version is above u64::MAX, and "\"pinned\"" outranks
    // "\"green\"" at one version.
    let r = rpc(
        c.addr(member(1)),
        &json!({"type": "replicate", "entries": [{"key": k, "version": u64::MAX, "value": "pinned"}]}),
    );
    assert_eq!(r["applied"], 1, "{r}");
    let r = rpc(
        c.addr(live[2]),
        &json!({"type": "put", "key": k, "value": "green"}),
    );
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], -32008, "{r}");
    for i in c.live() {
        let r = rpc(c.addr(i), &json!({"type": "stats"}));
        assert_eq!(r["type"], "stats", "node {i} still serves: {r}");
    }
}

/// A tombstone expires once its lifetime has passed, on every replica, and the
/// deleted value does not come back.
#[test]
fn tombstones_expire_and_the_value_stays_deleted() {
    let config = pastry::pastry_node::Config {
        tombstone_ttl: Duration::from_millis(300),
        ..test_config()
    };
    let c = LocalCluster::with(8, config, Bootstrap::Random(3));
    c.wait_for_ideal_leaf_sets(DEADLINE);
    put_keys(&c, 2);
    let r = rpc(c.addr(0), &json!({"type": "delete", "key": key(0)}));
    assert_eq!(r["type"], "deleted", "{r}");
    let tombstones = || -> usize {
        c.live()
            .into_iter()
            .map(|i| c.node(i).node().tombstone_count())
            .sum()
    };
    assert_eq!(tombstones(), K, "one tombstone per replica");
    wait_for("tombstones expired", || match tombstones() {
        0 => Ok(()),
        n => Err(format!("{n} tombstones left")),
    });
    // Several anti-entropy rounds later the value is still gone everywhere, and
    // the other key is untouched.
    std::thread::sleep(c.config.tick * (2 * c.config.replication_period_ticks as u32));
    for i in c.live() {
        let r = rpc(c.addr(i), &json!({"type": "get", "key": key(0)}));
        assert_eq!(r["type"], "not_found", "from node {i}: {r}");
        let r = rpc(c.addr(i), &json!({"type": "get", "key": key(1)}));
        assert_eq!(r["type"], "value", "from node {i}: {r}");
    }
}

#[test]
fn a_deleted_key_stays_deleted_through_repair() {
    let mut c = LocalCluster::new(12);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    put_keys(&c, 1);
    let r = rpc(c.addr(0), &json!({"type": "delete", "key": key(0)}));
    assert_eq!(r["type"], "deleted", "{r}");
    assert_eq!(r["existed"], true, "{r}");
    assert_eq!(r["replicas"], K, "{r}");
    // The root stops; the survivors repair, and nothing brings the value back.
    let root = c.index_of(&replica_set(&c, &key(0))[0]).unwrap();
    c.kill(root);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    std::thread::sleep(c.config.tick * 4);
    for asked in c.live() {
        let r = rpc(c.addr(asked), &json!({"type": "get", "key": key(0)}));
        assert_eq!(r["type"], "not_found", "from node {asked}: {r}");
    }
}

/// With a single copy per key (k = 1), a key lives on its root alone: a node that
/// leaves gracefully must hand its keys to the nodes that take over, and every key
/// is readable at once.
#[test]
fn a_leaving_node_hands_its_keys_over() {
    let config = pastry::pastry_node::Config {
        replicas: 1,
        ..test_config()
    };
    let mut c = LocalCluster::with(12, config, Bootstrap::Random(5));
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let count = 40;
    let live = c.live();
    for i in 0..count {
        let r = rpc(
            c.addr(live[i % live.len()]),
            &json!({"type": "put", "key": key(i), "value": {"n": i}}),
        );
        assert_eq!(r["replicas"], 1, "{r}");
    }
    // The root of key 0 leaves, with whatever else it is root of.
    let root = c
        .index_of(&c.brute_force_root(&NodeId::for_key(&key(0))))
        .unwrap();
    let held = c.node(root).node().key_count();
    assert!(held >= 1);
    let taken = c.leave(root);
    assert_eq!(taken, held, "every key it held was taken over");
    // No waiting: the keys are where lookups now go.
    all_readable_everywhere(&c, count).unwrap();
}

/// Without the periodic safety net, the push that follows a leaf-set change
/// alone brings each key to the nodes that newly joined its replica set.
#[test]
fn a_leaf_set_change_alone_moves_keys_to_new_replicas() {
    let config = pastry::pastry_node::Config {
        replication_period_ticks: u64::MAX,
        ..test_config()
    };
    let mut c = LocalCluster::with(10, config, Bootstrap::Random(9));
    c.wait_for_ideal_leaf_sets(DEADLINE);
    // Let every node take its first replication round (a node's first round
    // pushes everything, as it has no earlier leaf set to compare with) before
    // there are keys: a fixed wait, since there is nothing to poll for.
    std::thread::sleep(c.config.tick * 3);
    let count = 40;
    put_keys(&c, count);
    let before: Vec<Vec<NodeId>> = (0..count).map(|i| replica_set(&c, &key(i))).collect();
    for j in 0..6 {
        let live = c.live();
        c.add(Some(live[(j * 5) % live.len()]));
    }
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let changed = (0..count)
        .filter(|&i| replica_set(&c, &key(i)) != before[i])
        .count();
    assert!(changed > 0, "the joins changed some replica sets");
    wait_for("new replica sets holding their keys", || {
        held_by_replica_sets(&c, count, false)
    });
}

/// Churn with real nodes: for a few seconds a node is stopped and a new one joins
/// every few heartbeats, while clients keep writing and reading. No acknowledged
/// write may be lost: once the churn stops and the leaf sets have settled, every
/// acknowledged write is read back, at its latest acknowledged value or a later
/// one, from every node. The share of operations that failed during the churn is
/// printed (it depends on the machine's load, so it is not asserted).
#[test]
fn churn_loses_no_acknowledged_write() {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    let mut c = LocalCluster::new(12);
    c.wait_for_ideal_leaf_sets(DEADLINE);
    let addrs: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(c.addrs()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ops, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let clients: Vec<_> = (0..3u64)
        .map(|client| {
            let (addrs, stop, ops, failed) =
                (addrs.clone(), stop.clone(), ops.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut rng = support::Rng::new(client + 1);
                // Per key: the last acknowledged value and the last one sent.
                let mut mine: HashMap<String, (i64, i64)> = HashMap::new();
                while !stop.load(Ordering::Relaxed) {
                    let list = addrs.lock().unwrap().clone();
                    let at = list[rng.below(list.len())];
                    let key = format!("churn-{client}-{}", rng.below(40));
                    let (acked, sent) = *mine.get(&key).unwrap_or(&(-1, -1));
                    let ok = if rng.below(2) == 0 {
                        let v = sent + 1;
                        mine.insert(key.clone(), (acked, v));
                        let r = pastry::client::request(
                            at,
                            &json!({"type": "put", "key": key, "value": v}),
                        );
                        let ok = r.is_ok_and(|r| r["type"] == "put_ok");
                        if ok {
                            mine.insert(key, (v, v));
                        }
                        ok
                    } else {
                        let r = pastry::client::request(at, &json!({"type": "get", "key": key}));
                        r.is_ok_and(|r| match r["value"].as_i64() {
                            Some(v) => acked <= v && v <= sent,
                            None => r["type"] == "not_found" && acked < 0,
                        })
                    };
                    ops.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                mine.into_iter()
                    .filter(|(_, (acked, _))| *acked >= 0)
                    .map(|(k, (acked, sent))| (k, acked, sent))
                    .collect::<Vec<_>>()
            })
        })
        .collect();

    let mut rng = support::Rng::new(7);
    for _ in 0..6 {
        std::thread::sleep(c.config.tick * 5);
        let live = c.live();
        let victim = live[rng.below(live.len())];
        // Clients stop sending to it first, as clients of a node that is going.
        let rest: Vec<SocketAddr> = live
            .iter()
            .filter(|&&i| i != victim)
            .map(|&i| c.addr(i))
            .collect();
        *addrs.lock().unwrap() = rest;
        c.kill(victim);
        let through = c.live()[rng.below(c.live().len())];
        let fresh = c.add(Some(through));
        addrs.lock().unwrap().push(c.addr(fresh));
    }
    stop.store(true, Ordering::Relaxed);
    let written: Vec<(String, i64, i64)> = clients
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let (ops, failed) = (ops.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "churn: {ops} operations, {failed} failed ({:.2}%), {} keys acknowledged",
        100.0 * failed as f64 / ops.max(1) as f64,
        written.len()
    );
    assert!(ops > 100, "the clients hardly ran: {ops} operations");
    assert!(!written.is_empty());
    c.wait_for_ideal_leaf_sets(DEADLINE);
    wait_for("every acknowledged write readable from every node", || {
        for (key, acked, sent) in &written {
            for i in c.live() {
                let r = rpc(c.addr(i), &json!({"type": "get", "key": key}));
                let v = r["value"].as_i64();
                if !v.is_some_and(|v| *acked <= v && v <= *sent) {
                    return Err(format!("{key} (acknowledged {acked}) from node {i}: {r}"));
                }
            }
        }
        Ok(())
    });
}
