//! How long a network of N nodes takes to reach ideal leaf sets after the last
//! join, with joins one after another and all at once.
//!
//! ```text
//! cargo run --release --example converge -- 32
//! ```

use std::net::TcpListener;
use std::time::{Duration, Instant};

use pastry::pastry_node::leaf_set;
use pastry::pastry_node::{Config, RunningNode};

fn start(config: &Config) -> RunningNode {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    RunningNode::start(listener, config.clone()).expect("start a node")
}

/// Seconds until every leaf set is the ideal one (None after 30 s).
fn time_to_ideal(nodes: &[RunningNode], config: &Config) -> Option<f64> {
    let all: Vec<_> = nodes.iter().map(|n| n.node().own()).collect();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let ideal = nodes
            .iter()
            .all(|n| n.node().leaf_set() == leaf_set::ideal(n.id(), config.leaf_set_size, &all));
        if ideal {
            return Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let config = Config::default();
    println!("{n} nodes, tick {:?}", config.tick);

    let mut nodes = vec![start(&config)];
    for _ in 1..n {
        let node = start(&config);
        node.join(nodes[0].addr()).expect("join");
        nodes.push(node);
    }
    match time_to_ideal(&nodes, &config) {
        Some(s) => {
            println!("joined one after another: ideal leaf sets {s:.3} s after the last join")
        }
        None => println!("joined one after another: not ideal within 30 s"),
    }
    drop(nodes);

    let first = start(&config);
    let boot = first.addr();
    let joined: Vec<RunningNode> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..n)
            .map(|_| {
                s.spawn(|| {
                    let node = start(&config);
                    node.join(boot).expect("join");
                    node
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("joiner"))
            .collect()
    });
    let mut nodes = vec![first];
    nodes.extend(joined);
    match time_to_ideal(&nodes, &config) {
        Some(s) => {
            println!("joined all at once:        ideal leaf sets {s:.3} s after the last join")
        }
        None => println!("joined all at once:        not ideal within 30 s"),
    }
}
