//! What a network of nodes holds open. Each connection a node keeps to a peer
//! costs a descriptor at each end (and a thread at the peer), so what nodes keep
//! must stay bounded however much they have called each other: the demo of 20
//! nodes once ran out of the common limit of 1024 open files halfway through.
//!
//! A file of its own, so that this test runs alone in its process: it counts
//! every descriptor the process holds. Linux only: it counts them in /proc.

#![cfg(target_os = "linux")]

mod support;

use std::time::Duration;

use pastry::pastry_node::transport::{IDLE_PER_PEER, MAX_IDLE};
use serde_json::{json, Value};
use support::{wait_until, LocalCluster, Raw};

/// How many nodes the network has: fewer than |L| + 1, so that every node
/// heartbeats every other and has a connection to each worth keeping.
const NODES: usize = 12;

/// Longest wait for anything here to happen; only a deadline.
const DEADLINE: Duration = Duration::from_secs(30);

/// The descriptors this process holds now.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Heartbeats (`announce` messages) node `i` has received.
fn heartbeats(c: &LocalCluster, i: usize) -> u64 {
    let mut raw = Raw::connect(c.addr(i));
    let stats: Value = raw.request(&json!({"type": "stats"}));
    stats["messages"]["announce"].as_u64().unwrap_or(0)
}

#[test]
fn idle_connections_do_not_pile_up_until_the_process_runs_out_of_open_files() {
    let before = open_descriptors();
    let c = LocalCluster::new(NODES);
    c.wait_for_ideal_leaf_sets(DEADLINE);

    // Many clients at once, each writing through one node: the nodes forward
    // and replicate to each other from many threads at a time, so that calls
    // to the same peer overlap and open connections beyond the one kept.
    std::thread::scope(|s| {
        for t in 0..3 * NODES {
            let addr = c.addr(t % NODES);
            s.spawn(move || {
                let mut raw = Raw::connect(addr);
                for k in 0..20 {
                    let put = json!({"type": "put", "key": format!("k{t}-{k}"), "value": k});
                    let reply = raw.request(&put);
                    assert_eq!(reply["type"], "put_ok", "{reply}");
                }
            });
        }
    });

    // A few heartbeats after the load: each node keeps what it needs for them.
    let start = heartbeats(&c, 0);
    let more = 3 * (NODES as u64 - 1);
    assert!(
        wait_until(DEADLINE, || heartbeats(&c, 0) >= start + more),
        "node 0 had fewer than {more} heartbeats in {DEADLINE:?}"
    );

    // Each node keeps at most IDLE_PER_PEER connections to each of its peers,
    // MAX_IDLE in all, and each costs two descriptors here, one at each end; a
    // node also has its listener. The slack is for calls in flight.
    let kept = (IDLE_PER_PEER * (NODES - 1)).min(MAX_IDLE);
    let bound = before + NODES * (1 + 2 * kept) + 4 * NODES;
    let mut now = 0;
    assert!(
        wait_until(DEADLINE, || {
            now = open_descriptors();
            now <= bound
        }),
        "{NODES} nodes hold {} descriptors, more than the {} their pools allow",
        now - before,
        bound - before
    );
    drop(c);
}
