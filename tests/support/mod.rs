//! Shared helpers for the integration tests: a cluster of in-process nodes on
//! loopback, brute-force answers to compare the nodes with, polling, and a raw
//! line client that speaks to a node exactly as `nc` would.
//!
//! Every node listens on a port the OS picked (127.0.0.1:0) and is stopped when
//! the cluster is dropped, even if the test panics.

#![allow(dead_code)]

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use pastry::client::Client;
use pastry::pastry_node::leaf_set::{ideal, LeafSet};
use pastry::pastry_node::{Config, RunningNode};
use pastry::utils::{closer_to, NodeId, NodeInfo};
use serde_json::{json, Value};

/// Settings for test nodes: a short maintenance tick so that repairs and
/// convergence take well under a second, and short timeouts so that a dead peer
/// is found quickly. The line limit and set sizes are the defaults.
pub fn test_config() -> Config {
    Config {
        tick: Duration::from_millis(150),
        connect_timeout: Duration::from_millis(1000),
        call_timeout: Duration::from_millis(3000),
        ..Config::default()
    }
}

/// Starts one node on a fresh loopback port, as the first node of a network.
pub fn start_node(config: Config) -> RunningNode {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    RunningNode::start(listener, config).expect("start node")
}

/// Polls `cond` every 20 ms until it holds or `timeout` has passed. Returns
/// whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small deterministic pseudo-random sequence (xorshift), for choosing
/// bootstrap nodes and the like without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn below(&mut self, n: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x % n as u64) as usize
    }
}

/// How a new node picks the node it joins through.
#[derive(Clone, Copy, Debug)]
pub enum Bootstrap {
    /// Always the first node.
    First,
    /// A pseudo-random node already in the network.
    Random(u64),
}

/// N in-process nodes on loopback. Killed nodes stay in the vector as `None`, so
/// that indices keep naming the same node.
pub struct LocalCluster {
    pub config: Config,
    nodes: Vec<Option<RunningNode>>,
}

impl LocalCluster {
    /// Starts `n` nodes, each joining through a random node already in.
    pub fn new(n: usize) -> LocalCluster {
        LocalCluster::with(n, test_config(), Bootstrap::Random(0x9e37_79b9_7f4a_7c15))
    }

    /// Starts `n` nodes with `config`; the first starts the network and the others
    /// join one at a time, each through a node chosen by `bootstrap`.
    pub fn with(n: usize, config: Config, bootstrap: Bootstrap) -> LocalCluster {
        let mut c = LocalCluster {
            config,
            nodes: Vec::new(),
        };
        let mut rng = match bootstrap {
            Bootstrap::Random(seed) => Some(Rng::new(seed)),
            Bootstrap::First => None,
        };
        for _ in 0..n {
            let through = match (&mut rng, c.nodes.len()) {
                (_, 0) => None,
                (Some(rng), len) => Some(rng.below(len)),
                (None, _) => Some(0),
            };
            c.add(through);
        }
        c
    }

    /// Starts a new node and, if `through` is given, joins it through that node.
    /// Returns its index.
    pub fn add(&mut self, through: Option<usize>) -> usize {
        let node = start_node(self.config.clone());
        if let Some(b) = through {
            let boot = self.addr(b);
            node.join(boot)
                .unwrap_or_else(|e| panic!("{} could not join: {e}", node.addr()));
        }
        self.nodes.push(Some(node));
        self.nodes.len() - 1
    }

    /// Starts `k` nodes and joins them all at the same time, from one thread
    /// each, through the nodes at indices `through[i % through.len()]`.
    pub fn add_concurrently(&mut self, k: usize, through: &[usize]) -> Vec<usize> {
        let fresh: Vec<RunningNode> = (0..k).map(|_| start_node(self.config.clone())).collect();
        let boots: Vec<SocketAddr> = (0..k)
            .map(|i| self.addr(through[i % through.len()]))
            .collect();
        let barrier = std::sync::Barrier::new(k);
        std::thread::scope(|s| {
            let handles: Vec<_> = fresh
                .iter()
                .zip(&boots)
                .map(|(node, boot)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        node.join(*boot)
                            .unwrap_or_else(|e| panic!("{} could not join: {e}", node.addr()))
                    })
                })
                .collect();
            for h in handles {
                h.join().expect("join thread panicked");
            }
        });
        let first = self.nodes.len();
        self.nodes.extend(fresh.into_iter().map(Some));
        (first..self.nodes.len()).collect()
    }

    /// Number of nodes ever started (live or killed).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node at index `i`; panics if it was killed.
    pub fn node(&self, i: usize) -> &RunningNode {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("node {i} was killed"))
    }

    pub fn is_live(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    /// Indices of the live nodes.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.is_live(i)).collect()
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.node(i).addr()
    }

    pub fn id(&self, i: usize) -> NodeId {
        self.node(i).id()
    }

    /// Addresses of the live nodes, in index order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.live().into_iter().map(|i| self.addr(i)).collect()
    }

    /// Ids of the live nodes, in index order.
    pub fn ids(&self) -> Vec<NodeId> {
        self.live().into_iter().map(|i| self.id(i)).collect()
    }

    /// The live nodes as other nodes know them.
    pub fn infos(&self) -> Vec<NodeInfo> {
        self.live()
            .into_iter()
            .map(|i| self.node(i).node().own())
            .collect()
    }

    /// Index of the live node with id `id`.
    pub fn index_of(&self, id: &NodeId) -> Option<usize> {
        self.live().into_iter().find(|&i| self.id(i) == *id)
    }

    /// The root of `key_id` computed by brute force: the live node numerically
    /// closest to it on the ring, ties toward the smaller id.
    pub fn brute_force_root(&self, key_id: &NodeId) -> NodeId {
        self.ids()
            .into_iter()
            .min_by(|a, b| closer_to(key_id, a, b))
            .expect("no live node")
    }

    /// The leaf set node `i` should have, given the live nodes.
    pub fn ideal_leaf_set(&self, i: usize) -> LeafSet {
        ideal(self.id(i), self.config.leaf_set_size, &self.infos())
    }

    /// Live nodes whose leaf set differs from the ideal one.
    pub fn leaf_set_mismatches(&self) -> Vec<usize> {
        self.live()
            .into_iter()
            .filter(|&i| self.node(i).node().leaf_set() != self.ideal_leaf_set(i))
            .collect()
    }

    /// A readable account of every live node's leaf set next to the ideal one.
    pub fn describe_leaf_sets(&self) -> String {
        let short = |ls: &LeafSet| {
            let side = |v: &[NodeInfo]| {
                v.iter()
                    .map(|n| n.node_id.short())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            format!(
                "smaller [{}] larger [{}]",
                side(ls.smaller()),
                side(ls.larger())
            )
        };
        let mut out = String::new();
        for i in self.live() {
            let have = self.node(i).node().leaf_set();
            let want = self.ideal_leaf_set(i);
            let mark = if have == want { "ok " } else { "BAD" };
            out.push_str(&format!(
                "{mark} node {i} {}:\n    have {}\n    want {}\n",
                self.id(i).short(),
                short(&have),
                short(&want)
            ));
        }
        out
    }

    /// Polls until every live node's leaf set is the ideal one; panics with the
    /// differences after `timeout`.
    pub fn wait_for_ideal_leaf_sets(&self, timeout: Duration) {
        if !wait_until(timeout, || self.leaf_set_mismatches().is_empty()) {
            panic!(
                "leaf sets did not converge within {timeout:?}:\n{}",
                self.describe_leaf_sets()
            );
        }
    }

    /// Node `i` leaves gracefully: hands its keys over, then stops. Returns how
    /// many copies the others took.
    pub fn leave(&mut self, i: usize) -> usize {
        let mut node = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("node {i} was already stopped"));
        node.leave()
    }

    /// Stops node `i` (its server, connections and maintenance thread).
    pub fn kill(&mut self, i: usize) {
        let mut node = self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("node {i} was already killed"));
        node.shutdown();
    }
}

impl Drop for LocalCluster {
    /// Stops every live node, all at the same time: stopping them one by one
    /// leaves the survivors busy noticing each failure in turn.
    fn drop(&mut self) {
        let nodes: Vec<RunningNode> = self.nodes.iter_mut().filter_map(Option::take).collect();
        std::thread::scope(|s| {
            for mut node in nodes {
                s.spawn(move || node.shutdown());
            }
        });
    }
}

/// Sends one line to `addr` on a fresh connection, exactly as
/// `printf '%s\n' LINE | nc -N ADDR` would, and returns the reply line.
pub fn raw_line(addr: SocketAddr, line: &str) -> String {
    let mut c = Client::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let reply = c
        .send_line(line)
        .unwrap_or_else(|e| panic!("{addr}: no reply to {line}: {e}"));
    let _ = c.stream().shutdown(Shutdown::Write);
    reply
}

/// Sends a JSON request as one raw line and parses the reply.
pub fn rpc(addr: SocketAddr, request: &Value) -> Value {
    parse(&raw_line(addr, &request.to_string()))
}

/// Parses a reply line, with the line in the panic message if it is not JSON.
pub fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line}"))
}

/// A kept-open connection that writes raw bytes and reads reply lines.
pub struct Raw {
    pub client: Client,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw {
            client: Client::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}")),
        }
    }

    /// Writes `bytes` as they are: no terminator is added.
    pub fn write(&mut self, bytes: &[u8]) {
        let mut stream: &TcpStream = self.client.stream();
        stream.write_all(bytes).expect("write to node");
    }

    /// Reads one reply line and parses it.
    pub fn read(&mut self) -> Value {
        let line = self.client.read_line().expect("read reply line");
        parse(&line)
    }

    /// Sends one line (a `\n` is appended) and parses the reply.
    pub fn send(&mut self, line: &str) -> Value {
        parse(&self.client.send_line(line).expect("send line"))
    }

    pub fn request(&mut self, request: &Value) -> Value {
        self.send(&request.to_string())
    }

    /// Sends a ping and checks the pong: the connection still works.
    pub fn assert_usable(&mut self) {
        let r = self.request(&json!({"type": "ping", "id": "still-there"}));
        assert_eq!(r["type"], "pong", "{r}");
        assert_eq!(r["id"], "still-there", "{r}");
    }
}

/// The error code of a reply, panicking if it is not an error.
pub fn error_code(reply: &Value) -> i64 {
    assert_eq!(
        reply["type"], "error",
        "expected an error reply, got {reply}"
    );
    reply["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("error without an integer code: {reply}"))
}

/// An id field of a reply, parsed.
pub fn id_field(reply: &Value, field: &str) -> NodeId {
    reply[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string {field:?} in {reply}"))
        .parse()
        .unwrap_or_else(|e| panic!("{field:?} of {reply} is not an id: {e}"))
}

/// ⌈log16 n⌉, the paper's bound on route length.
pub fn ceil_log16(n: usize) -> u32 {
    let mut hops = 0;
    let mut reach = 1usize;
    while reach < n {
        reach *= 16;
        hops += 1;
    }
    hops
}
