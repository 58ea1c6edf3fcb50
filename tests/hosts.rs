//! Across hosts: `pastry-node` processes on four network hosts of their own, joined
//! by a bridge, with one host cut off and reconnected, and with packet loss.
//!
//! Loopback hides what a real network does: other addresses, links that go down,
//! packets that get lost. This test builds a small network inside the machine out
//! of Linux network namespaces (`ip netns`, from iproute2):
//!
//! ```text
//!   ns "<run>-h0" 10.213.7.10      ns "<run>-h1" 10.213.7.11     ...  "<run>-h3" 10.213.7.13
//!     eth0 ───────────┐              eth0 ───────────┐                 eth0 ──┐
//!                     │ veth                         │ veth                   │
//!   ns "<run>-sw":  port0 ─────────── br0 ────────── port1 ─── ... ──── port3 ┘
//! ```
//!
//! Each host runs `NODES_PER_HOST` nodes on its one address (ports 4000, 4001, ...:
//! fixed ports are safe, since nothing else lives in a namespace this test made).
//! The bridge sits in a namespace of its own, so the test adds nothing at all to
//! the machine's own network namespace: no interface, no route, no firewall rule,
//! and deleting the namespaces removes everything it made.
//!
//! Clients run inside the host namespaces too, never outside: from the machine's
//! own namespace, 10.213.7.x would leave through its real default route. A client
//! here is a thread that has moved itself into a host's namespace with `setns(2)`
//! (see [`netns`]): it then speaks to the nodes with the library's ordinary
//! blocking client. That costs no process per request and no helper binary.
//!
//! The scenarios, one after another on the same network:
//! 1. puts from every host, then every key read from every host;
//! 2. one host's link down (its bridge port, as if its cable were pulled): the
//!    others must declare its nodes dead and keep serving every key;
//! 3. the link back up: the two halves must find each other again (partition
//!    healing, see `maintenance.rs`), leaf sets must converge to the ideal, and
//!    no key may be lost;
//! 4. 10% packet loss on one host's link (iptables' `statistic` match; `tc
//!    netem` is not available on this kernel): operations must still succeed,
//!    and their failure rate is reported.
//!
//! Timings are printed (run with `--nocapture` to see them). Nodes use a 100 ms
//! tick so that heartbeats, and with them failure detection and convergence,
//! happen in a few seconds rather than the default's tens.
//!
//! Where namespaces cannot be made (not root, no iproute2, a container without
//! the capability), the test says so and passes without running; set
//! `PASTRY_HOSTS_REQUIRED=1` to make that a failure instead. Every exit path
//! cleans up: the nodes are killed by pid and the namespaces deleted by a guard's
//! `Drop`, so a failing assertion cleans up too; namespaces left by an earlier run
//! that was killed outright are deleted at the next start.

#![cfg(target_os = "linux")]

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pastry::client::Client;
use pastry::message_handler::LeafSetView;
use pastry::pastry_node::leaf_set::ideal;
use pastry::utils::{NodeId, NodeInfo};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_pastry-node");

const HOSTS: usize = 4;
/// Nodes per host. Replica sets are chosen by node id, not by machine, so one
/// host's nodes can be a key's whole replica set unless k exceeds them: hence
/// `REPLICAS` = `NODES_PER_HOST` + 1, so that a cut-off host never takes the
/// last copy of a key with it.
const NODES_PER_HOST: usize = 3;
const REPLICAS: usize = NODES_PER_HOST + 1;
/// |L| = 8 for 12 nodes, so that leaf sets are not simply "everyone" and their
/// convergence to the ideal means something.
const LEAF_SET: usize = 8;
const TICK_MS: u64 = 100;
/// Longest wait for a peer's reply (`--timeout-ms`; the default is 5 s). A
/// silent peer is found dead only once a call to it has waited this long, so the
/// time to detect a partition grows with it.
const TIMEOUT_MS: u64 = 1000;
const PORT_BASE: u16 = 4000;
/// Keys stored before the partition, and during it.
const KEYS: usize = 96;
const PARTITION_KEYS: usize = 32;
/// The host whose link goes down in scenarios 2 and 3, and the one that loses
/// packets in scenario 4.
const CUT: usize = 3;
const LOSSY: usize = 2;
const LOSS: f64 = 0.1;
/// Operations each host's client runs under packet loss.
const LOSS_OPS_PER_HOST: usize = 75;
/// Deadlines only: the conditions are polled and usually hold much sooner.
const CONVERGE: Duration = Duration::from_secs(60);
/// Every namespace this test makes is named `pastry-hosts-<pid>-<run>-<role>`.
const PREFIX: &str = "pastry-hosts-";

fn host_ip(host: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 213, 7, 10 + host as u8))
}

/// Entering a network namespace from a thread, with the one system call it takes.
mod netns {
    use std::os::fd::AsRawFd;
    use std::os::raw::c_int;

    extern "C" {
        // From the C library, which std links already: declaring the two calls
        // here spares a dependency on the `libc` crate.
        fn setns(fd: c_int, nstype: c_int) -> c_int;
        fn kill(pid: c_int, sig: c_int) -> c_int;
    }

    const CLONE_NEWNET: c_int = 0x4000_0000;
    const SIGKILL: c_int = 9;

    /// Moves the calling thread, and only it, into the namespace that
    /// `ip netns add NAME` made. Sockets it opens from then on live there.
    pub fn enter(name: &str) -> std::io::Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{name}"))?;
        // SAFETY: setns only reads the descriptor, which `f` keeps open.
        if unsafe { setns(f.as_raw_fd(), CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends SIGKILL to one process, by pid.
    pub fn kill_pid(pid: u32) {
        // SAFETY: kill(2) has no memory effects; a pid that has gone just fails.
        unsafe {
            kill(pid as c_int, SIGKILL);
        }
    }

    /// Runs `f` on a new thread inside namespace `name` and returns its result.
    /// The thread ends with `f`, so no thread of the test outlives its stay there.
    pub fn run<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(name).unwrap_or_else(|e| panic!("cannot enter namespace {name}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Runs `ip ARGS`; the error carries its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    run_tool("ip", args)
}

fn run_tool(tool: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {tool}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{tool} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Output of a command, if it ran and succeeded.
fn output_of(tool: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes the namespaces of earlier runs whose test process is gone (killed
/// before its guard could clean up), killing whatever still runs in them.
/// Namespaces of a run still in progress, say in another worktree, are left
/// alone: their process is alive.
fn sweep_leftovers() {
    let Some(list) = output_of("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        for p in output_of("ip", &["netns", "pids", name])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            netns::kill_pid(p);
        }
        match ip(&["netns", "del", name]) {
            Ok(()) => eprintln!("hosts: deleted namespace {name}, left by an earlier run"),
            Err(e) => eprintln!("hosts: cannot delete {name}, left by an earlier run: {e}"),
        }
    }
}

/// One `pastry-node` process on one host.
struct NodeProc {
    host: usize,
    info: NodeInfo,
    child: Child,
    log: PathBuf,
}

/// The four hosts, the switch, and the nodes. Dropping it kills the nodes and
/// deletes the namespaces, whatever state the test got to.
struct Testbed {
    switch: String,
    hosts: Vec<String>,
    nodes: Vec<NodeProc>,
    logs: PathBuf,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Kill by pid. `ip netns exec` execs the node in place, so the child's pid
        // is the node's.
        for n in &mut self.nodes {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
        // Deleting a namespace deletes its interfaces, and a veth goes with its
        // peer: this removes the links and the bridge as well.
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            let _ = ip(&["netns", "del", ns]);
        }
        if std::thread::panicking() || std::env::var_os("PASTRY_HOSTS_KEEP_LOGS").is_some() {
            eprintln!("hosts: node logs kept in {}", self.logs.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.logs);
        }
    }
}

impl Testbed {
    /// Makes the namespaces, the bridge and the links. `Err` means this machine
    /// cannot (not root, no iproute2, no bridge or veth support): skip.
    fn new() -> Result<Testbed, String> {
        static RUN: AtomicUsize = AtomicUsize::new(0);
        let run = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            RUN.fetch_add(1, Ordering::Relaxed)
        );
        let logs = std::env::temp_dir().join(&run);
        std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
        // The guard exists before the first namespace, so that a failure half-way
        // deletes what was made (deleting a namespace that was not made fails
        // harmlessly).
        let tb = Testbed {
            switch: format!("{run}-sw"),
            hosts: (0..HOSTS).map(|h| format!("{run}-h{h}")).collect(),
            nodes: Vec::new(),
            logs,
        };
        let sw = tb.switch.as_str();
        ip(&["netns", "add", sw])?;
        // `ip netns exec` also needs to make a mount namespace, which some
        // containers forbid even where `ip netns add` works.
        ip(&["netns", "exec", sw, BIN, "--version"])?;
        ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", sw, "link", "set", "br0", "up"])?;
        for (h, ns) in tb.hosts.iter().enumerate() {
            let port = format!("port{h}");
            let addr = format!("{}/24", host_ip(h));
            ip(&["netns", "add", ns])?;
            // The veth pair is born in the host's namespace, its peer moved
            // straight into the switch's: neither end ever appears in ours.
            ip(&[
                "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns", sw,
            ])?;
            ip(&["-n", sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", sw, "link", "set", &port, "up"])?;
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            // A partition shorter than TCP's retransmission limit (about 15
            // minutes by default) heals by itself: a request sent just before
            // the cut is still being retransmitted, and when the link returns it
            // arrives, and its receiver takes the sender back. To see the nodes'
            // own healing, which longer partitions need, the hosts' TCP gives up
            // after a few retransmissions (a few seconds). These settings belong
            // to the namespace.
            netns::run(ns, || {
                for (knob, value) in [("tcp_retries2", "3"), ("tcp_orphan_retries", "1")] {
                    let path = format!("/proc/sys/net/ipv4/{knob}");
                    std::fs::write(&path, value).map_err(|e| format!("{path}: {e}"))?;
                }
                Ok::<(), String>(())
            })?;
        }
        Ok(tb)
    }

    /// Starts node `i`: host `i % HOSTS`, port `PORT_BASE + i / HOSTS`, joining
    /// through `bootstrap`. Waits until it answers and, if it joined, until its
    /// leaf set is not empty.
    fn start_node(&mut self, i: usize, bootstrap: Option<SocketAddr>) {
        let host = i % HOSTS;
        let addr = SocketAddr::new(host_ip(host), PORT_BASE + (i / HOSTS) as u16);
        let log = self.logs.join(format!("node-{i}-{addr}.log"));
        let ip_s = addr.ip().to_string();
        let port_s = addr.port().to_string();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[host], BIN, &ip_s, &port_s]);
        if let Some(b) = bootstrap {
            cmd.args([b.ip().to_string(), b.port().to_string()]);
        }
        cmd.args([
            "--leaf-set",
            &LEAF_SET.to_string(),
            "--replicas",
            &REPLICAS.to_string(),
            "--tick-ms",
            &TICK_MS.to_string(),
            "--timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--log-level",
            "info",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log).expect("create node log"));
        let child = cmd.spawn().expect("spawn ip netns exec pastry-node");
        let pid = child.id();
        self.nodes.push(NodeProc {
            host,
            info: NodeInfo::new(addr),
            child,
            log,
        });
        let ns = self.hosts[host].clone();
        let ready = poll(Duration::from_secs(20), || {
            self.assert_running(i);
            let status = netns::run(&ns, || status_of(addr));
            matches!(status, Ok(s) if bootstrap.is_none() || !leaf_ids(&s).is_empty())
        });
        assert!(ready.is_some(), "node {i} at {addr} did not come up");
        // `ip netns exec` replaced itself with the node, so killing the child's
        // pid kills the node (the guard relies on it).
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the node's executable");
        let bin = std::fs::canonicalize(BIN).expect("the pastry-node binary");
        assert_eq!(exe, bin, "pid {pid} is not the node");
    }

    /// Panics, with the end of its log, if node `i` has exited.
    fn assert_running(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        if let Ok(Some(status)) = n.child.try_wait() {
            let log = std::fs::read_to_string(&n.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            panic!(
                "node {i} at {} exited ({status}); its log ends:\n{}",
                n.info.addr,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    fn ns(&self, host: usize) -> &str {
        &self.hosts[host]
    }

    /// Indices of the nodes on `hosts`.
    fn nodes_on(&self, hosts: &[usize]) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| hosts.contains(&self.nodes[i].host))
            .collect()
    }

    /// Runs `f(host)` for each of `hosts` at once, each on a thread inside that
    /// host's namespace, and returns the results in the order of `hosts`.
    fn on_hosts<T: Send>(&self, hosts: &[usize], f: impl Fn(usize) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|&h| {
                    let f = &f;
                    let ns = self.ns(h).to_string();
                    s.spawn(move || netns::run(&ns, || f(h)))
                })
                .collect();
            handles
                .into_iter()
                .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        })
    }

    /// The `status` of each of `nodes`, each asked from inside its own host (the
    /// only place it can be reached from while its host is cut off).
    fn statuses(&self, nodes: &[usize]) -> BTreeMap<usize, Result<Value, String>> {
        self.ask_each(nodes, status_of)
    }

    /// The `stats` of each of `nodes`, asked from inside its own host.
    fn stats(&self, nodes: &[usize]) -> BTreeMap<usize, Result<Value, String>> {
        self.ask_each(nodes, |addr| request(addr, &json!({"type": "stats"})))
    }

    /// `ask` of each of `nodes`' addresses, from inside the node's own host.
    fn ask_each(
        &self,
        nodes: &[usize],
        ask: impl Fn(SocketAddr) -> Result<Value, String> + Sync,
    ) -> BTreeMap<usize, Result<Value, String>> {
        let hosts: Vec<usize> = (0..HOSTS)
            .filter(|h| nodes.iter().any(|&i| self.nodes[i].host == *h))
            .collect();
        self.on_hosts(&hosts, |h| {
            nodes
                .iter()
                .filter(|&&i| self.nodes[i].host == h)
                .map(|&i| (i, ask(self.nodes[i].info.addr)))
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Nodes among `nodes` whose leaf set is not the ideal one for a network
    /// made of `nodes` alone (a node that does not answer counts as wrong).
    fn leaf_set_mismatches(&self, nodes: &[usize]) -> Vec<usize> {
        let infos: Vec<NodeInfo> = nodes.iter().map(|&i| self.nodes[i].info).collect();
        self.statuses(nodes)
            .into_iter()
            .filter(|(i, s)| match s {
                Ok(s) => {
                    let want = ideal(self.nodes[*i].info.node_id, LEAF_SET, &infos);
                    let want_ids: Vec<NodeId> = want
                        .smaller()
                        .iter()
                        .chain(want.larger())
                        .map(|n| n.node_id)
                        .collect();
                    leaf_ids(s) != want_ids
                }
                Err(_) => true,
            })
            .map(|(i, _)| i)
            .collect()
    }

    fn ids_of(&self, nodes: &[usize]) -> HashSet<NodeId> {
        nodes.iter().map(|&i| self.nodes[i].info.node_id).collect()
    }

    /// Each node's leaf set, and the nodes of other hosts its routing table and
    /// neighborhood set hold, for failure messages.
    fn describe(&self, nodes: &[usize]) -> String {
        let mut out = String::new();
        let short = |ids: &mut dyn Iterator<Item = NodeId>| {
            ids.map(|id| id.short()).collect::<Vec<_>>().join(" ")
        };
        for (i, s) in self.statuses(nodes) {
            let n = &self.nodes[i];
            out += &format!("node {i} {} host {}: ", n.info.node_id.short(), n.host);
            match s {
                Ok(s) => {
                    let table = |field: &str| -> Vec<NodeId> {
                        s[field]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|e| e["node_id"].as_str()?.parse().ok())
                            .collect()
                    };
                    out += &format!(
                        "leaf set [{}] routing table [{}] neighborhood [{}]\n",
                        short(&mut leaf_ids(&s).into_iter()),
                        short(&mut table("routing_table").into_iter()),
                        short(&mut table("neighborhood").into_iter())
                    );
                }
                Err(e) => out += &format!("no status: {e}\n"),
            }
        }
        out
    }

    /// Puts `keys` (index, key) from every host, each through one of the host's
    /// own nodes; returns (index, reply or error) per key.
    fn put_all(&self, keys: &[(usize, String)]) -> Vec<(usize, Result<Value, String>)> {
        let all: Vec<usize> = (0..HOSTS).collect();
        self.on_hosts(&all, |h| {
            let local = self.nodes_on(&[h]);
            keys.iter()
                .filter(|(i, _)| i % HOSTS == h)
                .map(|(i, key)| {
                    let node = self.nodes[local[i / HOSTS % local.len()]].info.addr;
                    let req = json!({"type": "put", "key": key, "value": value_of(key)});
                    (*i, request(node, &req))
                })
                .collect::<Vec<_>>()
        })
        .into_iter()
        .flatten()
        .collect()
    }

    /// Reads every one of `keys` from each of `hosts`, through the host's own
    /// nodes in turn. Returns, per host, the keys not read back with their value,
    /// with what came instead.
    fn missing_from(&self, hosts: &[usize], keys: &[String]) -> Vec<(usize, Vec<String>)> {
        self.on_hosts(hosts, |h| {
            let local = self.nodes_on(&[h]);
            let bad: Vec<String> = keys
                .iter()
                .enumerate()
                .filter_map(|(j, key)| {
                    let node = self.nodes[local[j % local.len()]].info.addr;
                    match request(node, &json!({"type": "get", "key": key})) {
                        Ok(r) if r["type"] == "value" && r["value"] == value_of(key) => None,
                        Ok(r) => Some(format!("{key}: {r}")),
                        Err(e) => Some(format!("{key}: {e}")),
                    }
                })
                .collect();
            (h, bad)
        })
    }
}

fn value_of(key: &str) -> Value {
    json!({"value of": key})
}

/// One request on a fresh connection, from whatever namespace the calling
/// thread is in.
fn request(addr: SocketAddr, req: &Value) -> Result<Value, String> {
    let mut c = Client::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    c.request(req).map_err(|e| format!("{addr}: {e}"))
}

fn status_of(addr: SocketAddr) -> Result<Value, String> {
    let s = request(addr, &json!({"type": "status"}))?;
    if s["type"] == "status" {
        Ok(s)
    } else {
        Err(format!("{addr}: {s}"))
    }
}

/// The ids in a `status` reply's leaf set, smaller side then larger, each
/// nearest first.
fn leaf_ids(status: &Value) -> Vec<NodeId> {
    let ls: LeafSetView = serde_json::from_value(status["leaf_set"].clone())
        .unwrap_or_else(|e| panic!("leaf set of {status}: {e}"));
    ls.smaller
        .iter()
        .chain(&ls.larger)
        .map(|n| n.node_id)
        .collect()
}

/// Every node id a `status` reply names: leaf set, routing table, neighborhood.
fn known_ids(status: &Value) -> HashSet<NodeId> {
    let mut out: HashSet<NodeId> = leaf_ids(status).into_iter().collect();
    for field in ["routing_table", "neighborhood"] {
        for e in status[field].as_array().into_iter().flatten() {
            if let Some(id) = e["node_id"].as_str().and_then(|s| s.parse().ok()) {
                out.insert(id);
            }
        }
    }
    out
}

/// Polls `cond` every 50 ms until it holds (returning how long that took) or
/// `timeout` passes (returning None).
fn poll(timeout: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// The first of `iptables`, `iptables-legacy`, `iptables-nft` that can add a
/// rule in namespace `ns`. Both backends work in a namespace on this machine's
/// kernel; which one `iptables` names depends on the distribution.
fn working_iptables(ns: &str) -> Option<&'static str> {
    ["iptables", "iptables-legacy", "iptables-nft"]
        .into_iter()
        .find(|t| run_tool("ip", &["netns", "exec", ns, t, "-w", "-L", "-n"]).is_ok())
}

/// The packet counter of each rule of `chain` in `ns`, in order.
fn counters(ns: &str, iptables: &str, chain: &str) -> Vec<u64> {
    let args = [
        "netns", "exec", ns, iptables, "-w", "-L", chain, "-n", "-v", "-x",
    ];
    let out = output_of("ip", &args).unwrap_or_default();
    // Two header lines, then one line per rule starting with its packet count.
    out.lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .collect()
}

#[test]
fn across_hosts() {
    sweep_leftovers();
    let mut tb = match Testbed::new() {
        Ok(tb) => tb,
        Err(e) => {
            let msg = format!(
                "hosts: SKIPPED: cannot build network namespaces here ({e}); this test needs root and iproute2"
            );
            if std::env::var_os("PASTRY_HOSTS_REQUIRED").is_some_and(|v| v == "1") {
                panic!("{msg}");
            }
            eprintln!("{msg}");
            return;
        }
    };
    let all_hosts: Vec<usize> = (0..HOSTS).collect();
    let survivors: Vec<usize> = (0..HOSTS).filter(|&h| h != CUT).collect();

    // The network: node i on host i % 4, each joining through the node started
    // just before it, which is on another host, so every join crosses the bridge.
    let started = Instant::now();
    for i in 0..HOSTS * NODES_PER_HOST {
        let bootstrap = (i > 0).then(|| tb.nodes[i - 1].info.addr);
        tb.start_node(i, bootstrap);
    }
    let all_nodes: Vec<usize> = (0..tb.nodes.len()).collect();
    let t = poll(CONVERGE, || tb.leaf_set_mismatches(&all_nodes).is_empty());
    assert!(
        t.is_some(),
        "leaf sets did not converge:\n{}",
        tb.describe(&all_nodes)
    );
    eprintln!(
        "hosts: {} nodes on {HOSTS} hosts up, leaf sets ideal, {} after the first start",
        all_nodes.len(),
        secs(started.elapsed())
    );

    // 1. Puts from every host; every key found from every host.
    let keys: Vec<(usize, String)> = (0..KEYS).map(|i| (i, format!("key-{i}"))).collect();
    let names: Vec<String> = keys.iter().map(|(_, k)| k.clone()).collect();
    let mut min_replicas = usize::MAX;
    for (i, r) in tb.put_all(&keys) {
        let r = r.unwrap_or_else(|e| panic!("put key-{i}: {e}"));
        assert_eq!(r["type"], "put_ok", "put key-{i}: {r}");
        min_replicas = min_replicas.min(r["replicas"].as_u64().unwrap_or(0) as usize);
    }
    assert_eq!(min_replicas, REPLICAS, "every put must reach k nodes");
    for (h, bad) in tb.missing_from(&all_hosts, &names) {
        assert!(bad.is_empty(), "host {h} cannot read {bad:?}");
    }
    eprintln!(
        "hosts: 1. {KEYS} keys put from {HOSTS} hosts ({REPLICAS} copies each), all read back from every host"
    );

    // 2. Host CUT's bridge port goes down.
    let cut_nodes = tb.nodes_on(&[CUT]);
    let live_nodes = tb.nodes_on(&survivors);
    let cut_ids = tb.ids_of(&cut_nodes);
    let live_ids = tb.ids_of(&live_nodes);
    ip(&[
        "-n",
        &tb.switch,
        "link",
        "set",
        &format!("port{CUT}"),
        "down",
    ])
    .expect("link down");
    let cut_at = Instant::now();
    // Detection, on each side: the other side's nodes out of every leaf set;
    // out of every node's state (leaf set, routing table, neighborhood set); and
    // the leaf sets ideal for this side alone. The partition lasts until both
    // sides have forgotten each other entirely, so that when it ends, nothing
    // left over from before brings them back together: only the node's way of
    // healing a partition can.
    let mut t: [[Option<Duration>; 3]; 2] = [[None; 3]; 2];
    let sides = [(&live_nodes, &cut_ids), (&cut_nodes, &live_ids)];
    let done = poll(CONVERGE, || {
        let now = cut_at.elapsed();
        for (side, (nodes, other)) in sides.iter().enumerate() {
            let st = tb.statuses(nodes);
            let all = |f: &dyn Fn(&Value) -> bool| st.values().all(|s| s.as_ref().is_ok_and(f));
            let t = &mut t[side];
            if t[0].is_none() && all(&|s| leaf_ids(s).iter().all(|id| !other.contains(id))) {
                t[0] = Some(now);
            }
            if t[1].is_none() && all(&|s| known_ids(s).is_disjoint(other)) {
                t[1] = Some(now);
            }
            if t[2].is_none() && tb.leaf_set_mismatches(nodes).is_empty() {
                t[2] = Some(now);
            }
        }
        t.iter().flatten().all(Option::is_some)
    });
    assert!(
        done.is_some(),
        "the partition was not detected within {CONVERGE:?} ([leaf sets clear, all state clear, leaf sets ideal] for the survivors {:?}, for host {CUT} {:?}):\n{}",
        t[0],
        t[1],
        tb.describe(&all_nodes)
    );
    let [[t_leaf, t_forgot, t_repaired], [c_leaf, c_forgot, c_repaired]] =
        t.map(|side| side.map(|t| secs(t.expect("measured"))));
    eprintln!(
        "hosts: 2. host {CUT} cut off. The other hosts: its nodes out of every leaf set after {t_leaf}, out of all state after {t_forgot}, leaf sets ideal for them alone after {t_repaired}. Host {CUT}: the others out of its leaf sets after {c_leaf}, out of all state after {c_forgot}, leaf sets ideal for host {CUT} alone after {c_repaired}"
    );
    // Nor may a pending event bring the sides together: a probe of a node of
    // the other side, queued before it was forgotten, would find it alive once
    // the link is back. The partition lasts until every maintenance queue has
    // been empty, and no node has known anyone across, for two call timeouts
    // running (the event taken off the queue last has then failed too).
    let quiet = Duration::from_millis(2 * TIMEOUT_MS);
    let mut quiet_since: Option<Instant> = None;
    let settled = poll(CONVERGE, || {
        let queues_empty = tb
            .stats(&all_nodes)
            .values()
            .all(|s| s.as_ref().is_ok_and(|s| s["maintenance_queue"] == 0));
        let apart = sides.iter().all(|(nodes, other)| {
            tb.statuses(nodes)
                .values()
                .all(|s| s.as_ref().is_ok_and(|s| known_ids(s).is_disjoint(other)))
        });
        if !(queues_empty && apart) {
            quiet_since = None;
            return false;
        }
        quiet_since.get_or_insert_with(Instant::now).elapsed() >= quiet
    });
    assert!(
        settled.is_some(),
        "maintenance queues did not drain while host {CUT} was cut off: {:?}",
        tb.stats(&all_nodes)
            .values()
            .map(|s| s.as_ref().map(|s| s["maintenance_queue"].clone()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "hosts: 2. the partition settled (no memory of the other side, maintenance queues empty for {}) {} after the cut",
        secs(quiet),
        secs(cut_at.elapsed())
    );
    for (h, bad) in tb.missing_from(&survivors, &names) {
        assert!(
            bad.is_empty(),
            "host {h} cannot read {} keys with host {CUT} cut off: {bad:?}",
            bad.len()
        );
    }
    // Writes while the partition lasts, on the majority side.
    let more: Vec<(usize, String)> = (0..PARTITION_KEYS)
        .map(|i| {
            (
                i * HOSTS + survivors[i % survivors.len()],
                format!("during-{i}"),
            )
        })
        .collect();
    let more_names: Vec<String> = more.iter().map(|(_, k)| k.clone()).collect();
    for (i, r) in tb.put_all(&more) {
        let r = r.unwrap_or_else(|e| panic!("put {i} during the partition: {e}"));
        assert_eq!(r["type"], "put_ok", "put during the partition: {r}");
    }
    // The cut-off side takes writes too: a key of its own, and one that the
    // majority then writes as well. The versions are the roots' clocks in
    // milliseconds; the pause makes the majority's write the later one.
    let island = ("island-0".to_string(), "both-sides".to_string());
    netns::run(tb.ns(CUT), || {
        let node = tb.nodes[cut_nodes[0]].info.addr;
        for (key, value) in [
            (&island.0, value_of(&island.0)),
            (&island.1, json!("cut off")),
        ] {
            let r = request(node, &json!({"type": "put", "key": key, "value": value}));
            assert!(
                r.as_ref().is_ok_and(|r| r["type"] == "put_ok"),
                "put {key} on host {CUT}, cut off: {r:?}"
            );
        }
    });
    std::thread::sleep(Duration::from_millis(10));
    netns::run(tb.ns(survivors[0]), || {
        let node = tb.nodes[tb.nodes_on(&[survivors[0]])[0]].info.addr;
        let r = request(
            node,
            &json!({"type": "put", "key": island.1, "value": "majority"}),
        );
        assert!(
            r.as_ref().is_ok_and(|r| r["type"] == "put_ok"),
            "put {} on the majority: {r:?}",
            island.1
        );
    });
    // The cut-off side is a network of its own now: report how much it serves.
    let cut_side: usize = tb.missing_from(&[CUT], &names)[0].1.len();
    eprintln!(
        "hosts: 2. every key still read from every other host; {PARTITION_KEYS} more stored there; host {CUT}, alone, reads {} of {KEYS}",
        KEYS - cut_side
    );

    // 3. The link comes back: the halves must merge.
    ip(&["-n", &tb.switch, "link", "set", &format!("port{CUT}"), "up"]).expect("link up");
    let up_at = Instant::now();
    let mut t_contact = None;
    let healed = poll(CONVERGE, || {
        if t_contact.is_none() {
            let st = tb.statuses(&all_nodes);
            let met = st.iter().any(|(i, s)| {
                let other = if cut_nodes.contains(i) {
                    &live_ids
                } else {
                    &cut_ids
                };
                s.as_ref().is_ok_and(|s| !known_ids(s).is_disjoint(other))
            });
            if met {
                t_contact = Some(up_at.elapsed());
            }
        }
        tb.leaf_set_mismatches(&all_nodes).is_empty()
    });
    let Some(t_heal) = healed else {
        panic!(
            "leaf sets did not converge within {CONVERGE:?} of the link coming back (first contact {t_contact:?}):\n{}",
            tb.describe(&all_nodes)
        );
    };
    eprintln!(
        "hosts: 3. link up: first contact between the halves after {}, every leaf set ideal after {}",
        t_contact.map_or("-".into(), secs),
        secs(t_heal)
    );
    let every: Vec<String> = names.iter().chain(&more_names).cloned().collect();
    for (h, bad) in tb.missing_from(&all_hosts, &every) {
        assert!(
            bad.is_empty(),
            "after the partition healed, host {h} cannot read {} keys: {bad:?}",
            bad.len()
        );
    }
    // The cut-off side's own key is everywhere now, and of the key written on
    // both sides, the later write won everywhere.
    for (h, bad) in tb.missing_from(&all_hosts, std::slice::from_ref(&island.0)) {
        assert!(
            bad.is_empty(),
            "host {h} lost the key written on host {CUT} while cut off: {bad:?}"
        );
    }
    // The majority's copies may sit outside the merged replica set for a moment
    // (they were the stand-ins while the island was gone), until the leaf-set
    // change moves them in: poll.
    let read_both = || -> Vec<Value> {
        tb.on_hosts(&all_hosts, |h| {
            let node = tb.nodes[tb.nodes_on(&[h])[0]].info.addr;
            request(node, &json!({"type": "get", "key": island.1}))
                .map_or_else(Value::String, |r| r["value"].clone())
        })
    };
    let mut both = read_both();
    let deadline = Instant::now() + CONVERGE;
    while !both.iter().all(|v| v == "majority") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        both = read_both();
    }
    assert!(
        both.iter().all(|v| v == "majority"),
        "{} after the partition, read from each host: {both:?}",
        island.1
    );
    eprintln!(
        "hosts: 3. all {} keys read back from every host, host {CUT} included, and the key host {CUT} wrote alone; of the key written on both sides, the later write everywhere",
        every.len()
    );

    // 4. Packet loss on host LOSSY's link, both directions, on eth0 only (the
    // host's own nodes talk to each other over loopback).
    let ns = tb.ns(LOSSY).to_string();
    let Some(iptables) = working_iptables(&ns) else {
        eprintln!(
            "hosts: 4. SKIPPED: no working iptables (apt-get install iptables); the packet-loss scenario did not run"
        );
        return;
    };
    let p = LOSS.to_string();
    for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
        // The first rule only counts the link's packets; the second drops 10%.
        let count: &[&str] = &["-A", chain, dir, "eth0"];
        let drop: &[&str] = &[
            "-A",
            chain,
            dir,
            "eth0",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            &p,
            "-j",
            "DROP",
        ];
        for rule in [count, drop] {
            let mut args = vec!["netns", "exec", &ns, iptables, "-w"];
            args.extend_from_slice(rule);
            run_tool("ip", &args).expect("add a packet-loss rule");
        }
    }
    let failed_before = peers_failed(&tb, &all_nodes);
    let loss_at = Instant::now();
    // Each host's client puts fresh keys and reads old ones, alternately,
    // through its own nodes, and counts what fails.
    let results = tb.on_hosts(&all_hosts, |h| {
        let local = tb.nodes_on(&[h]);
        let mut failed = Vec::new();
        let mut acked = Vec::new();
        let mut latencies = Vec::new();
        for j in 0..LOSS_OPS_PER_HOST {
            let node = tb.nodes[local[j % local.len()]].info.addr;
            let (req, key) = if j % 2 == 0 {
                let key = format!("lossy-{h}-{j}");
                let req = json!({"type": "put", "key": key, "value": value_of(&key)});
                (req, key)
            } else {
                let key = names[(h * 31 + j * 7) % names.len()].clone();
                (json!({"type": "get", "key": key}), key)
            };
            let start = Instant::now();
            match request(node, &req) {
                Ok(r) if r["type"] == "put_ok" => acked.push(key),
                Ok(r) if r["type"] == "value" && r["value"] == value_of(&key) => {}
                Ok(r) => failed.push(format!("{key}: {r}")),
                Err(e) => failed.push(format!("{key}: {e}")),
            }
            latencies.push(start.elapsed());
        }
        latencies.sort();
        (h, failed, latencies, acked)
    });
    let loss_secs = loss_at.elapsed();
    let spurious = peers_failed(&tb, &all_nodes) - failed_before;
    let [seen, drops] = [0, 1].map(|rule| {
        ["INPUT", "OUTPUT"]
            .iter()
            .map(|chain| {
                counters(&ns, iptables, chain)
                    .get(rule)
                    .copied()
                    .unwrap_or(0)
            })
            .sum::<u64>()
    });
    let total = HOSTS * LOSS_OPS_PER_HOST;
    let failures: usize = results.iter().map(|(_, f, _, _)| f.len()).sum();
    for (h, failed, lat, _) in &results {
        let at = |q: f64| {
            format!(
                "{} ms",
                lat[((lat.len() - 1) as f64 * q) as usize].as_millis()
            )
        };
        eprintln!(
            "hosts: 4. host {h}{}: {} of {LOSS_OPS_PER_HOST} operations failed; latency p50 {}, p90 {}, max {}{}",
            if *h == LOSSY { " (lossy)" } else { "" },
            failed.len(),
            at(0.5),
            at(0.9),
            at(1.0),
            if failed.is_empty() {
                String::new()
            } else {
                format!(": {failed:?}")
            }
        );
    }
    eprintln!(
        "hosts: 4. {}% loss on host {LOSSY}'s link ({iptables}: {drops} of {seen} packets dropped, {:.1}%): {failures} of {total} operations failed ({:.1}%), {spurious} peers wrongly declared dead, {} in all",
        LOSS * 100.0,
        100.0 * drops as f64 / seen.max(1) as f64,
        100.0 * failures as f64 / total as f64,
        secs(loss_secs)
    );
    assert!(
        drops > 0,
        "the loss rules dropped nothing: the scenario did not test loss"
    );
    // TCP retransmits what is lost, so loss mostly costs time; an operation
    // fails only when a retransmission comes after a call timeout. The bound,
    // 5%, is half the loss rate: a node that gave up on a lossy peer at its
    // first lost packet would fail far more.
    assert!(
        failures * 20 <= total,
        "more than 5% of operations failed under {}% loss: {failures} of {total}",
        LOSS * 100.0
    );

    // The loss ends: the network returns to the ideal, and every key is there.
    for chain in ["INPUT", "OUTPUT"] {
        run_tool("ip", &["netns", "exec", &ns, iptables, "-w", "-F", chain])
            .expect("remove the packet-loss rules");
    }
    let t = poll(CONVERGE, || tb.leaf_set_mismatches(&all_nodes).is_empty());
    assert!(
        t.is_some(),
        "leaf sets did not return to the ideal after the loss ended:\n{}",
        tb.describe(&all_nodes)
    );
    // Every key, and every put acknowledged under loss.
    let every: Vec<String> = every
        .into_iter()
        .chain(results.into_iter().flat_map(|(_, _, _, acked)| acked))
        .collect();
    for (h, bad) in tb.missing_from(&all_hosts, &every) {
        assert!(
            bad.is_empty(),
            "after the loss, host {h} cannot read {bad:?}"
        );
    }
    eprintln!(
        "hosts: 4. loss over: leaf sets ideal after {}, all {} keys (those put under loss included) read from every host; whole test {}",
        secs(t.expect("measured")),
        every.len(),
        secs(started.elapsed())
    );
}

/// The sum of the nodes' `peers_failed` counters.
fn peers_failed(tb: &Testbed, nodes: &[usize]) -> u64 {
    tb.stats(nodes)
        .values()
        .map(|s| {
            s.as_ref()
                .map_or(0, |s| s["peers_failed"].as_u64().unwrap_or(0))
        })
        .sum()
}
