//! The fault-tolerance goals, measured with real `pastry-node` processes on
//! loopback and default settings (1 s heartbeat, k = 3):
//!
//! 1. two nodes killed at once with SIGKILL, the root of a key and its first
//!    replica among them: how long until every key is readable from every
//!    survivor, and until every key is back to k copies on the right nodes;
//! 2. new nodes join: how long until every key is readable with `owner` naming
//!    its new root;
//! 3. a node stopped with SIGTERM: its exit code and time, and whether every key
//!    is readable at once;
//! 4. churn: for a while a node is killed and a new one started every few
//!    seconds while clients keep writing and reading; the share of operations
//!    that failed during churn and after it, and acknowledged writes lost.
//!
//! ```text
//! cargo build --release
//! cargo run --release --example resilience -- [--nodes 24] [--keys 300]
//!     [--churn-seconds 60] [--churn-every-ms 3000] [--clients 4] [--heartbeat-ms 1000]
//! ```

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pastry::client::request;
use pastry::pastry_node::leaf_set;
use pastry::utils::{closer_to, NodeId, NodeInfo};
use serde_json::{json, Value};

/// A `pastry-node` process and its address.
struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Settings {
    nodes: usize,
    keys: usize,
    churn: Duration,
    churn_every: Duration,
    clients: usize,
    heartbeat_ms: u64,
}

fn binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("own path");
    // target/release/examples/resilience -> target/release/pastry-node
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("pastry-node"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    bin
}

/// Starts a node on a free port, joining through `bootstrap`; returns once it
/// has joined.
fn spawn(s: &Settings, bootstrap: Option<SocketAddr>) -> Proc {
    let mut cmd = Command::new(binary());
    cmd.args(["127.0.0.1", "0"]);
    if let Some(b) = bootstrap {
        cmd.args([b.ip().to_string(), b.port().to_string()]);
    }
    cmd.args(["--heartbeat-ms", &s.heartbeat_ms.to_string()])
        .args(["--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start pastry-node");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("read stderr");
        if let Some(rest) = line.split("listening on ").nth(1) {
            addr = rest.split_whitespace().next().and_then(|a| a.parse().ok());
        }
        if bootstrap.is_none() && addr.is_some() {
            break;
        }
        if line.contains("joined through") {
            break;
        }
    }
    // Keep draining stderr so the node never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Proc {
        child,
        addr: addr.expect("the node logged its address"),
    }
}

fn rpc(addr: SocketAddr, req: &Value) -> Option<Value> {
    request(addr, req).ok()
}

fn info(p: &Proc) -> NodeInfo {
    NodeInfo::new(p.addr)
}

/// Every leaf set equals the brute-force ideal.
fn leaf_sets_ideal(procs: &[Proc]) -> bool {
    let all: Vec<NodeInfo> = procs.iter().map(info).collect();
    procs.iter().all(|p| {
        let Some(s) = rpc(p.addr, &json!({"type": "status"})) else {
            return false;
        };
        let ids = |side: &str| -> HashSet<String> {
            s["leaf_set"][side]
                .as_array()
                .map(|v| {
                    v.iter()
                        .filter_map(|n| n["node_id"].as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let have: HashSet<String> = ids("smaller").union(&ids("larger")).cloned().collect();
        let want: HashSet<String> = leaf_set::ideal(info(p).node_id, 16, &all)
            .members()
            .map(|n| n.node_id.to_string())
            .collect();
        have == want
    })
}

fn root_of(procs: &[Proc], key: &str) -> NodeId {
    let id = NodeId::for_key(key);
    procs
        .iter()
        .map(|p| info(p).node_id)
        .min_by(|a, b| closer_to(&id, a, b))
        .expect("some node")
}

/// Every key readable from every node with its value (and, if `owners`, with
/// `owner` naming its brute-force root). The nodes are asked in parallel, so
/// that a round is short next to the times measured.
fn all_readable(procs: &[Proc], keys: &[(String, i64)], owners: bool) -> bool {
    let roots: Vec<NodeId> = keys.iter().map(|(k, _)| root_of(procs, k)).collect();
    std::thread::scope(|s| {
        let asks: Vec<_> = procs
            .iter()
            .map(|p| {
                let roots = &roots;
                s.spawn(move || {
                    keys.iter().zip(roots).all(|((k, v), root)| {
                        rpc(p.addr, &json!({"type": "get", "key": k})).is_some_and(|r| {
                            r["type"] == "value"
                                && r["value"] == *v
                                && (!owners || r["owner"] == json!(root))
                        })
                    })
                })
            })
            .collect();
        asks.into_iter().all(|a| a.join().unwrap_or(false))
    })
}

/// Every key held, at its latest version, by exactly its k = 3 closest nodes;
/// returns how many keys are not.
fn keys_not_at_k(procs: &[Proc], keys: &[(String, i64)]) -> usize {
    keys.iter()
        .filter(|(k, v)| {
            let id = NodeId::for_key(k);
            let mut by_distance: Vec<&Proc> = procs.iter().collect();
            by_distance.sort_by(|a, b| closer_to(&id, &info(a).node_id, &info(b).node_id));
            let holds = |p: &Proc| {
                rpc(p.addr, &json!({"type": "fetch", "key": k}))
                    .is_some_and(|r| r["entry"]["value"] == *v && r["entry"]["deleted"] != true)
            };
            !by_distance.iter().take(3).all(|p| holds(p))
        })
        .count()
}

/// Polls `check` until it holds; returns the seconds from the start to the
/// beginning of the check that held (None after `limit`): what held then may
/// have held a little earlier, by at most the previous check's duration.
fn time_until(limit: Duration, mut check: impl FnMut() -> bool) -> Option<f64> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let began = start.elapsed().as_secs_f64();
        if check() {
            return Some(began);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

fn show(t: Option<f64>) -> String {
    t.map_or("not within the limit".into(), |t| format!("{t:.2} s"))
}

fn parse_args() -> Settings {
    let mut s = Settings {
        nodes: 24,
        keys: 300,
        churn: Duration::from_secs(60),
        churn_every: Duration::from_millis(3000),
        clients: 4,
        heartbeat_ms: 1000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        let v = v.unwrap_or_else(|| panic!("{} needs a number", args[i]));
        match args[i].as_str() {
            "--nodes" => s.nodes = v as usize,
            "--keys" => s.keys = v as usize,
            "--churn-seconds" => s.churn = Duration::from_secs(v),
            "--churn-every-ms" => s.churn_every = Duration::from_millis(v),
            "--clients" => s.clients = v as usize,
            "--heartbeat-ms" => s.heartbeat_ms = v,
            other => panic!("unknown option {other}"),
        }
        i += 2;
    }
    s
}

fn main() {
    let s = parse_args();
    let limit = Duration::from_secs(120);
    let mut procs = vec![spawn(&s, None)];
    let boot = procs[0].addr;
    for _ in 1..s.nodes {
        procs.push(spawn(&s, Some(boot)));
    }
    let t = time_until(limit, || leaf_sets_ideal(&procs));
    println!(
        "{} nodes started; leaf sets ideal {} after the last join",
        s.nodes,
        show(t)
    );

    let mut keys: Vec<(String, i64)> = Vec::new();
    for i in 0..s.keys {
        let k = format!("key-{i}");
        let r = rpc(
            procs[i % procs.len()].addr,
            &json!({"type": "put", "key": k, "value": i}),
        );
        let r = r.expect("put answered");
        assert_eq!(r["type"], "put_ok", "{r}");
        assert_eq!(r["replicas"], 3, "{r}");
        keys.push((k, i as i64));
    }
    println!("{} keys stored, each acknowledged by 3 nodes", s.keys);

    // 1. Kill the root of key-0 and its first replica.
    let id0 = NodeId::for_key(&keys[0].0);
    let mut order: Vec<usize> = (0..procs.len()).collect();
    order.sort_by(|&a, &b| closer_to(&id0, &info(&procs[a]).node_id, &info(&procs[b]).node_id));
    let mut victims = [order[0], order[1]];
    victims.sort_unstable();
    let killed_at = Instant::now();
    for &v in victims.iter().rev() {
        let mut p = procs.remove(v);
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
    }
    let readable = time_until(limit, || all_readable(&procs, &keys, false));
    let at_k = time_until(limit, || keys_not_at_k(&procs, &keys) == 0);
    let ideal = time_until(limit, || leaf_sets_ideal(&procs));
    let since = killed_at.elapsed().as_secs_f64();
    println!(
        "2 of {} killed with SIGKILL (the root of key-0 and its first replica): every key readable from every survivor after {}, every key back to 3 copies after {} more, leaf sets ideal {} later ({since:.2} s in all)",
        s.nodes,
        show(readable),
        show(at_k),
        show(ideal)
    );

    // 2. Two new nodes join.
    let joined_at = Instant::now();
    for _ in 0..2 {
        procs.push(spawn(&s, Some(procs[0].addr)));
    }
    let joins = joined_at.elapsed().as_secs_f64();
    let owners = time_until(limit, || all_readable(&procs, &keys, true));
    let at_k = time_until(limit, || keys_not_at_k(&procs, &keys) == 0);
    println!(
        "2 nodes joined in {joins:.2} s: then every key readable with owner = its new root after {}, and held by its 3 closest nodes after {} more",
        show(owners),
        show(at_k)
    );

    // 3. SIGTERM the root of key-1.
    let root1 = root_of(&procs, &keys[1].0);
    let leaving = procs
        .iter()
        .position(|p| info(p).node_id == root1)
        .expect("root");
    let mut p = procs.remove(leaving);
    let term_at = Instant::now();
    let _ = Command::new("kill")
        .args(["-TERM", &p.child.id().to_string()])
        .status();
    let status = p.child.wait().expect("wait");
    let exit_s = term_at.elapsed().as_secs_f64();
    let at_once = all_readable(&procs, &keys, false);
    println!(
        "the root of key-1 stopped with SIGTERM: exit code {:?} after {exit_s:.2} s; every key readable at once: {at_once}",
        status.code()
    );

    // 4. Churn.
    churn(&s, &mut procs, limit);
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    failed: AtomicU64,
}

fn churn(s: &Settings, procs: &mut Vec<Proc>, limit: Duration) {
    let addrs = Arc::new(Mutex::new(procs.iter().map(|p| p.addr).collect::<Vec<_>>()));
    let stop = Arc::new(AtomicBool::new(false));
    let during = Arc::new(Tally::default());
    // Each client writes its own keys, each write a higher value, and reads back
    // keys it wrote: a read must return the last acknowledged value (or a later
    // one, whose put was not answered in time).
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let clients: Vec<_> = (0..s.clients)
        .map(|c| {
            let (addrs, stop, during, acked) =
                (addrs.clone(), stop.clone(), during.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ c as u64;
                let mut next = || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut mine: Vec<(String, i64, i64)> = Vec::new(); // key, acked, sent
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let list = addrs.lock().expect("addrs").clone();
                    let at = list[next() as usize % list.len()];
                    let write = mine.is_empty() || next() % 2 == 0;
                    let ok = if write {
                        let i = next() as usize % 50;
                        if i >= mine.len() {
                            mine.push((format!("churn-{c}-{n}"), -1, -1));
                            n += 1;
                        }
                        let i = i.min(mine.len() - 1);
                        let v = mine[i].2 + 1;
                        mine[i].2 = v;
                        let r = rpc(at, &json!({"type":"put","key":mine[i].0,"value":v}));
                        let ok = r.is_some_and(|r| r["type"] == "put_ok");
                        if ok {
                            mine[i].1 = v;
                        }
                        ok
                    } else {
                        let i = next() as usize % mine.len();
                        let (k, a, sent) = &mine[i];
                        let r = rpc(at, &json!({"type":"get","key":k}));
                        r.is_some_and(|r| match r["value"].as_i64() {
                            Some(v) => v >= *a && v <= *sent,
                            None => *a < 0,
                        })
                    };
                    during.ops.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        during.failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let mut a = acked.lock().expect("acked");
                a.extend(
                    mine.into_iter()
                        .filter(|(_, acked, _)| *acked >= 0)
                        .map(|(k, acked, _)| (k, acked)),
                );
            })
        })
        .collect();
    let start = Instant::now();
    let mut rng = 12345u64;
    let mut changes = 0;
    while start.elapsed() < s.churn {
        std::thread::sleep(s.churn_every);
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let victim = (rng >> 33) as usize % procs.len();
        let mut p = procs.remove(victim);
        // Clients stop picking it first, as a client would that knew the node
        // was going; what is measured is the network's loss, not the client's.
        *addrs.lock().expect("addrs") = procs.iter().map(|p| p.addr).collect();
        p.child.kill().expect("SIGKILL");
        let _ = p.child.wait();
        let fresh = spawn(s, Some(procs[0].addr));
        procs.push(fresh);
        *addrs.lock().expect("addrs") = procs.iter().map(|p| p.addr).collect();
        changes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let _ = c.join();
    }
    let (ops, failed) = (
        during.ops.load(Ordering::Relaxed),
        during.failed.load(Ordering::Relaxed),
    );
    println!(
        "churn for {:.0} s, one node killed (SIGKILL) and one started every {:.1} s ({changes} of each): {ops} operations, {failed} failed ({:.3}%)",
        s.churn.as_secs_f64(),
        s.churn_every.as_secs_f64(),
        100.0 * failed as f64 / ops.max(1) as f64
    );
    let settled = time_until(limit, || leaf_sets_ideal(procs));
    let acked = acked.lock().expect("acked").clone();
    let mut lost = 0;
    let mut reads = 0;
    for (k, v) in &acked {
        for p in procs.iter() {
            reads += 1;
            let r = rpc(p.addr, &json!({"type":"get","key":k}));
            let current = r.and_then(|r| r["value"].as_i64()).is_some_and(|x| x >= *v);
            if !current {
                lost += 1;
            }
        }
    }
    println!(
        "after churn: leaf sets ideal after {}; {} acknowledged keys read from all {} nodes: {lost} of {reads} reads failed or found an older value",
        show(settled),
        acked.len(),
        procs.len()
    );
}
