//! `bench`: what a `put` and a `get` cost in a Pastry network on this machine, set
//! beside what one bare round trip on loopback costs.
//!
//! ```text
//! cargo run --release --bin bench -- --nodes 16 --clients 32 --seconds 10
//! cargo build --release && cargo run --release --bin bench -- --processes
//! cargo run --release --bin bench -- --memory-keys 1000000
//! cargo run --release --bin bench -- --join-test 64
//! ```
//!
//! The default run starts a network on loopback, waits until every leaf set is the
//! ideal one, loads keys, and then measures one phase after another, each for
//! `--seconds` (after a short warm-up that is not counted):
//! - `put` and `get` with `--clients` client threads, each holding one kept-open
//!   connection to a random node, each sending one request at a time;
//! - `get` with one client: the latency of an otherwise idle network;
//! - the baseline, with 1 and with `--clients` clients: a minimal server in this
//!   program (thread per connection, buffered line read, TCP_NODELAY) that answers
//!   every line with a copy of a real `get` reply. It routes, parses and stores
//!   nothing, so it is what one request/response round trip costs on this machine:
//!   the floor a hop cannot go under.
//!
//! Every phase runs the same client loop (send a prepared line, read the reply line,
//! parse its type and hop count), so the ratios compare the server sides only.
//!
//! CPU time per operation comes from `/proc`: in-process, the whole process less the
//! client threads (each reads its own `/proc/thread-self/stat`); with `--processes`,
//! the sum over the node processes. Memory is VmRSS from `/proc/<pid>/status`, which
//! only means something per node with `--processes` or `--memory-keys`.
//!
//! Two more modes answer the issue's other questions:
//! - `--memory-keys N` starts one `pastry-node`, stores N small keys in it
//!   (pipelined over a few connections) and reports its resident memory before and
//!   after, and the bytes each key costs;
//! - `--join-test N` starts N in-process nodes, each joining through a random node
//!   already in, and reports the seconds from the start until every leaf set is the
//!   ideal one.
//!
//! `--json` prints one JSON object on stdout instead of tables; progress always
//! goes to stderr. Linux only (`/proc`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Barrier, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pastry::client::Client;
use pastry::message_handler::Reply;
use pastry::pastry_node::leaf_set;
use pastry::pastry_node::{Config, RunningNode};
use pastry::utils::{NodeId, NodeInfo, LEAF_SET_SIZE};
use serde::Deserialize;
use serde_json::{json, Value};

const USAGE: &str = "usage: bench [--nodes N] [--clients C] [--seconds S] [--keys K] [--value-bytes B] [--processes] [--keep-awake] [--json] [--tick-ms MS] [--seed S] | --memory-keys N | --join-test N";

const HELP: &str = "\
bench: throughput, latency, hops, CPU and memory of a Pastry network on loopback,
beside a minimal server's round trip on the same machine.

USAGE:
    bench [options]               the network benchmark
    bench --memory-keys N         resident memory of one node holding N small keys
    bench --join-test N           seconds until N nodes have joined and hold ideal leaf sets

OPTIONS:
    --nodes N          nodes in the network (default 16)
    --clients C        client threads, each with a kept-open connection (default 32)
    --seconds S        measuring time of each phase (default 10)
    --keys K           keys loaded before measuring (default 10000)
    --value-bytes B    bytes of each value (default 100)
    --processes        run each node as a `pastry-node` process (the binary next to
                       this one: build it with `cargo build --release`)
    --tick-ms MS       the nodes' maintenance tick (default 1000, the node's default)
    --seed S           seed of the client and bootstrap choices (default 1)
    --keep-awake       run one spinning process per CPU at the idle scheduling class
                       (`chrt --idle`), so that no CPU sleeps between messages: in a
                       VM, waking a sleeping CPU can cost more than the round trip
                       itself. The spinners run only when nothing else wants the CPU.
    --json             print one JSON object instead of tables
    -h, --help         this help
";

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Debug)]
struct Options {
    nodes: usize,
    clients: usize,
    seconds: f64,
    keys: usize,
    value_bytes: usize,
    processes: bool,
    tick_ms: u64,
    seed: u64,
    json: bool,
    keep_awake: bool,
    /// Internal: be a spinner of `--keep-awake`.
    spin: bool,
    memory_keys: Option<usize>,
    join_test: Option<usize>,
}

enum Parsed {
    Run(Options),
    Help,
}

/// `v` as a number of at least `min`.
fn number<T>(name: &str, v: String, min: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display,
{
    match v.parse::<T>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!("{name} {v:?}: expected a number, at least {min}")),
    }
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut o = Options {
        nodes: 16,
        clients: 32,
        seconds: 10.0,
        keys: 10_000,
        value_bytes: 100,
        processes: false,
        tick_ms: 1000,
        seed: 1,
        json: false,
        keep_awake: false,
        spin: false,
        memory_keys: None,
        join_test: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "--nodes" => o.nodes = number("--nodes", value("--nodes")?, 1)?,
            "--clients" => o.clients = number("--clients", value("--clients")?, 1)?,
            "--seconds" => o.seconds = number("--seconds", value("--seconds")?, 0.1)?,
            "--keys" => o.keys = number("--keys", value("--keys")?, 1)?,
            "--value-bytes" => o.value_bytes = number("--value-bytes", value("--value-bytes")?, 1)?,
            "--tick-ms" => o.tick_ms = number("--tick-ms", value("--tick-ms")?, 10)?,
            "--seed" => o.seed = number("--seed", value("--seed")?, 0)?,
            "--memory-keys" => {
                o.memory_keys = Some(number("--memory-keys", value("--memory-keys")?, 1)?)
            }
            "--join-test" => o.join_test = Some(number("--join-test", value("--join-test")?, 2)?),
            "--processes" => o.processes = true,
            "--json" => o.json = true,
            "--keep-awake" => o.keep_awake = true,
            "--spin" => o.spin = true,
            s => return Err(format!("unknown argument {s}")),
        }
    }
    if o.memory_keys.is_some() && o.join_test.is_some() {
        return Err("--memory-keys and --join-test are separate runs: give one".into());
    }
    Ok(Parsed::Run(o))
}

/// What a mode hands back: the JSON object and the text for people.
struct Report {
    json: Value,
    text: String,
}

// ---------------------------------------------------------------------------
// /proc readings

/// Clock ticks per second of the times in `/proc/*/stat` (USER_HZ), which Linux
/// fixes at 100 for user space whatever the kernel's own tick rate.
const CLK_TCK: f64 = 100.0;

/// User plus system CPU seconds from a `/proc/.../stat` file. For a process this
/// counts all its threads, including those that have ended.
fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let s = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces; the fields after it do not.
    let fields: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    // fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / CLK_TCK)
}

fn process_cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&format!("/proc/{pid}/stat")).unwrap_or(0.0)
}

/// CPU seconds of the calling thread only. From `schedstat` (nanoseconds): a
/// thread's `stat` times are whole clock ticks, and a client thread may use less
/// than one tick in a whole phase.
fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(|ns| ns as f64 / 1e9)
        .or_else(|| stat_cpu_seconds("/proc/thread-self/stat"))
        .unwrap_or(0.0)
}

/// Busy and stolen CPU seconds of the whole machine so far (all cores), from
/// `/proc/stat`. Busy time less the bench's own is what other programs took from
/// the cores the bench runs on; stolen time is what the hypervisor took.
fn machine_cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| ticks.get(i).copied().unwrap_or(0) as f64 / CLK_TCK;
    // user nice system idle iowait irq softirq steal ...
    let busy = field(0) + field(1) + field(2) + field(5) + field(6);
    (busy, field(7))
}

/// The machine's CPUs, which `/proc/stat` counts, whatever this process may use.
fn machine_cpus() -> usize {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    n.max(1)
}

/// The CPUs this process may run on (fewer than the machine's under `taskset`).
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Resident memory of a process, in KiB.
fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_field(pid, "VmRSS:")
}

/// Threads of a process: each connection a node serves has one, and each
/// thread's stack and buffers are part of the node's resident memory.
fn threads_of(pid: u32) -> Option<u64> {
    status_field(pid, "Threads:")
}

/// The first number of a `/proc/<pid>/status` line.
fn status_field(pid: u32, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(name))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// Small helpers

/// xorshift64*: reproducible choices without a dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        // Spread small seeds over the state; the state must never be zero.
        Rng((seed ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Polls `cond` every `every` until it holds or `timeout` has passed.
fn wait_until(timeout: Duration, every: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// The `p`-quantile of sorted nanoseconds, in microseconds (nearest rank).
fn quantile_us(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Rounds for printing and JSON: measurements are not worth more digits.
fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

// ---------------------------------------------------------------------------
// Node processes (`--processes`, `--memory-keys`)

/// Every child this program started. A static so that the Ctrl-C handler, a
/// panic and every return path all reach them: no node may outlive the bench.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

fn kill_children() {
    let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
    for child in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
    children.clear();
}

/// Kills the children when `main` returns or unwinds.
struct KillChildrenOnDrop;

impl Drop for KillChildrenOnDrop {
    fn drop(&mut self) {
        kill_children();
    }
}

/// The spinners of `--keep-awake`: their CPU time is the bench's, not another
/// program's.
static SPINNERS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Starts one spinner per CPU: this program with `--spin`, at the idle
/// scheduling class, so that it yields to any other thread at once.
fn keep_awake() -> Result<(), String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    for _ in 0..cpus() {
        let child = Command::new("chrt")
            .args(["--idle", "0"])
            .arg(&me)
            .arg("--spin")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start `chrt --idle 0 {} --spin`: {e}", me.display()))?;
        SPINNERS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child.id());
        CHILDREN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
    }
    Ok(())
}

fn spinners_cpu_seconds() -> f64 {
    let pids = SPINNERS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    pids.into_iter().map(process_cpu_seconds).sum()
}

/// A running `pastry-node` child.
#[derive(Clone, Copy, Debug)]
struct NodeProcess {
    pid: u32,
    addr: SocketAddr,
}

/// The `pastry-node` binary next to this one (both live in `target/<profile>`).
fn node_binary() -> Result<PathBuf, String> {
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let exe = me.with_file_name("pastry-node");
    if !exe.exists() {
        return Err(format!(
            "{} not found: build it first with `cargo build --release`",
            exe.display()
        ));
    }
    // `cargo run --bin bench` rebuilds the library and the bench but not
    // pastry-node: a node binary older than the library may run older code.
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let lib = me.with_file_name("libpastry.rlib");
    if let (Some(node), Some(lib)) = (modified(&exe), modified(&lib)) {
        if node < lib {
            eprintln!(
                "warning: {} is older than the library; run `cargo build --release` first",
                exe.display()
            );
        }
    }
    Ok(exe)
}

/// Starts a `pastry-node` on a port of its choosing, joining through `bootstrap`
/// if given, and returns once it listens (and, joining, once the join is done).
fn spawn_node(
    exe: &Path,
    bootstrap: Option<SocketAddr>,
    tick_ms: u64,
) -> Result<NodeProcess, String> {
    let mut cmd = Command::new(exe);
    cmd.args(["127.0.0.1", "0"]);
    if let Some(b) = bootstrap {
        cmd.args([b.ip().to_string(), b.port().to_string()]);
    }
    cmd.args(["--tick-ms", &tick_ms.to_string(), "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let pid = child.id();
    let stderr = child.stderr.take().expect("stderr is piped");
    // Registered before anything else can fail, so that it is killed on every path.
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);

    // The log is read for the child's whole life: a full pipe would block the
    // node's logging, and with it whichever thread logs. Lines go to `lines` for
    // as long as someone listens.
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut addr = None;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match lines.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "pastry-node (pid {pid}) did not start within 15 s; its log:\n{}",
                    seen.join("\n")
                ))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(format!(
                    "pastry-node (pid {pid}) exited while starting; its log:\n{}",
                    seen.join("\n")
                ))
            }
        };
        if let Some(rest) = line.split("listening on ").nth(1) {
            let text = rest.split_whitespace().next().unwrap_or("");
            addr = Some(
                text.parse::<SocketAddr>()
                    .map_err(|_| format!("cannot read the address in {line:?}"))?,
            );
        }
        if line.starts_with("error:") {
            return Err(format!("pastry-node (pid {pid}): {line}"));
        }
        let joined = bootstrap.is_none() || line.contains("joined through");
        seen.push(line);
        if let (Some(addr), true) = (addr, joined) {
            return Ok(NodeProcess { pid, addr });
        }
    }
}

// ---------------------------------------------------------------------------
// The network under test

enum Network {
    InProcess(Vec<RunningNode>),
    Processes(Vec<NodeProcess>),
}

impl Network {
    /// N nodes, joined one after another, each through a random node already in.
    fn start(opts: &Options, rng: &mut Rng) -> Result<Network, String> {
        if opts.processes {
            let exe = node_binary()?;
            let mut nodes: Vec<NodeProcess> = Vec::new();
            for _ in 0..opts.nodes {
                let boot = (!nodes.is_empty()).then(|| nodes[rng.below(nodes.len())].addr);
                nodes.push(spawn_node(&exe, boot, opts.tick_ms)?);
            }
            Ok(Network::Processes(nodes))
        } else {
            let config = node_config(opts.tick_ms);
            Ok(Network::InProcess(join_in_process(
                opts.nodes, &config, rng,
            )?))
        }
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Network::InProcess(nodes) => nodes.iter().map(|n| n.addr()).collect(),
            Network::Processes(nodes) => nodes.iter().map(|n| n.addr).collect(),
        }
    }

    /// The CPU seconds the nodes have used so far. In-process that is the whole
    /// bench, client threads included: the caller subtracts those.
    fn cpu_seconds(&self) -> f64 {
        match self {
            Network::InProcess(_) => process_cpu_seconds(std::process::id()),
            Network::Processes(nodes) => nodes.iter().map(|n| process_cpu_seconds(n.pid)).sum(),
        }
    }

    /// The CPU seconds of everything the bench runs: itself and its nodes.
    fn all_cpu_seconds(&self) -> f64 {
        let own = process_cpu_seconds(std::process::id()) + spinners_cpu_seconds();
        match self {
            Network::InProcess(_) => own,
            Network::Processes(_) => own + self.cpu_seconds(),
        }
    }

    /// Threads of each node process, or of the whole bench in-process.
    fn threads(&self) -> Vec<u64> {
        match self {
            Network::InProcess(_) => vec![threads_of(std::process::id()).unwrap_or(0)],
            Network::Processes(nodes) => nodes
                .iter()
                .map(|n| threads_of(n.pid).unwrap_or(0))
                .collect(),
        }
    }

    fn cpu_includes_clients(&self) -> bool {
        matches!(self, Network::InProcess(_))
    }

    /// Resident memory: of each node process, or of the whole bench in-process.
    fn rss_kib(&self) -> Vec<u64> {
        match self {
            Network::InProcess(_) => vec![vm_rss_kib(std::process::id()).unwrap_or(0)],
            Network::Processes(nodes) => nodes
                .iter()
                .map(|n| vm_rss_kib(n.pid).unwrap_or(0))
                .collect(),
        }
    }
}

fn node_config(tick_ms: u64) -> Config {
    Config {
        tick: Duration::from_millis(tick_ms),
        ..Config::default()
    }
}

fn start_in_process(config: &Config) -> Result<RunningNode, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
    RunningNode::start(listener, config.clone()).map_err(|e| format!("cannot start a node: {e}"))
}

/// `n` in-process nodes, joined one after another, each through a random node
/// already in.
fn join_in_process(n: usize, config: &Config, rng: &mut Rng) -> Result<Vec<RunningNode>, String> {
    let mut nodes: Vec<RunningNode> = Vec::with_capacity(n);
    for _ in 0..n {
        let node = start_in_process(config)?;
        if !nodes.is_empty() {
            let boot = nodes[rng.below(nodes.len())].addr();
            node.join(boot)
                .map_err(|e| format!("{} could not join: {e}", node.addr()))?;
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// Whether `leaf_set` (as `status` shows it) is the ideal leaf set of `own`.
fn is_ideal(own: NodeId, smaller: &[NodeInfo], larger: &[NodeInfo], all: &[NodeInfo]) -> bool {
    let want = leaf_set::ideal(own, LEAF_SET_SIZE, all);
    let ids = |v: &[NodeInfo]| v.iter().map(|n| n.node_id).collect::<Vec<_>>();
    ids(smaller) == ids(want.smaller()) && ids(larger) == ids(want.larger())
}

/// How convergence ended.
struct Converged {
    seconds: f64,
    ideal: bool,
}

/// Polls every node's `status` until every leaf set is the ideal one. Gives up
/// when nothing changed for 5 s (leaf sets are exchanged every tick, so a change
/// would have come) or after `deadline`: a bench must still run on a network that
/// does not converge, and say so.
fn wait_for_ideal_leaf_sets(addrs: &[SocketAddr], deadline: Duration) -> Converged {
    let all: Vec<NodeInfo> = addrs.iter().map(|a| NodeInfo::new(*a)).collect();
    let mut clients: Vec<Option<Client>> = addrs.iter().map(|_| None).collect();
    let start = Instant::now();
    let mut last: Vec<Vec<NodeId>> = Vec::new();
    let mut last_change = start;
    loop {
        let mut ideal = true;
        let mut now_sets = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.iter().enumerate() {
            if clients[i].is_none() {
                clients[i] = Client::connect(*addr).ok();
            }
            let status = clients[i]
                .as_mut()
                .and_then(|c| c.request(&json!({"type": "status"})).ok())
                .and_then(|v| serde_json::from_value::<Reply>(v).ok());
            match status {
                Some(Reply::Status {
                    node_id, leaf_set, ..
                }) => {
                    ideal &= is_ideal(node_id, &leaf_set.smaller, &leaf_set.larger, &all);
                    let members = leaf_set.smaller.iter().chain(&leaf_set.larger);
                    now_sets.push(members.map(|n| n.node_id).collect());
                }
                _ => {
                    clients[i] = None;
                    ideal = false;
                    now_sets.push(Vec::new());
                }
            }
        }
        if ideal {
            return Converged {
                seconds: start.elapsed().as_secs_f64(),
                ideal: true,
            };
        }
        if now_sets != last {
            last = now_sets;
            last_change = Instant::now();
        }
        if last_change.elapsed() > Duration::from_secs(5) || start.elapsed() > deadline {
            return Converged {
                seconds: start.elapsed().as_secs_f64(),
                ideal: false,
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------
// The minimal server: the baseline

/// Answers every line with `reply`, one thread per connection: the least a server
/// speaking this framing can do.
struct BaselineServer {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl BaselineServer {
    fn start(reply: Vec<u8>) -> Result<BaselineServer, String> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot bind 127.0.0.1:0: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let stopping = Arc::new(AtomicBool::new(false));
        let reply: Arc<[u8]> = reply.into();
        let stop = stopping.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                let reply = reply.clone();
                // Each connection thread ends when its client closes.
                std::thread::spawn(move || serve_baseline(stream, &reply));
            }
        });
        Ok(BaselineServer {
            addr,
            stopping,
            accept: Some(accept),
        })
    }
}

fn serve_baseline(stream: TcpStream, reply: &[u8]) {
    let _ = stream.set_nodelay(true);
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if writer.write_all(reply).is_err() {
            return;
        }
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Client threads and phases

/// The fields of a reply a client looks at; serde skips the rest (the value)
/// without building it.
#[derive(Deserialize)]
struct ReplyHead<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default)]
    hops: Option<u32>,
}

/// What one client thread measured.
#[derive(Default)]
struct ClientTally {
    latencies_ns: Vec<u64>,
    hops: u64,
    errors: u64,
    not_found: u64,
    cpu_seconds: f64,
}

/// A set of prepared request lines, and the reply type that means success.
struct Workload<'a> {
    name: &'static str,
    targets: &'a [SocketAddr],
    requests: &'a [String],
    success: &'static str,
    /// Whether replies' hop counts mean anything (not for the baseline, which
    /// echoes one recorded reply).
    counts_hops: bool,
}

/// What a phase measured.
#[derive(Clone, Debug)]
struct Phase {
    name: String,
    clients: usize,
    ops: u64,
    seconds: f64,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    mean_us: f64,
    max_us: f64,
    /// None for the baseline.
    mean_hops: Option<f64>,
    errors: u64,
    not_found: u64,
    /// Server-side CPU (nodes or baseline server) per completed operation.
    server_cpu_us_per_op: f64,
    /// Client-thread CPU per completed operation.
    client_cpu_us_per_op: f64,
    /// The share of the machine's CPU that other programs used meanwhile: above
    /// a few percent, they competed with the phase and its figures are low.
    others_cpu_pct: f64,
    /// The share the hypervisor stole.
    steal_pct: f64,
}

impl Phase {
    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "clients": self.clients,
            "ops": self.ops,
            "seconds": round(self.seconds, 3),
            "throughput_ops_s": round(self.throughput, 0),
            "p50_us": round(self.p50_us, 1),
            "p99_us": round(self.p99_us, 1),
            "p999_us": round(self.p999_us, 1),
            "mean_us": round(self.mean_us, 1),
            "max_us": round(self.max_us, 1),
            "mean_hops": self.mean_hops.map(|h| round(h, 3)),
            "errors": self.errors,
            "not_found": self.not_found,
            "server_cpu_us_per_op": round(self.server_cpu_us_per_op, 2),
            "client_cpu_us_per_op": round(self.client_cpu_us_per_op, 2),
            "others_cpu_pct": round(self.others_cpu_pct, 1),
            "steal_pct": round(self.steal_pct, 1),
        })
    }
}

/// How CPU time is read during a phase.
struct CpuMeter<'a> {
    /// The server side's CPU seconds so far.
    read: &'a dyn Fn() -> f64,
    /// The reading counts the client threads too (they run in this process), so
    /// their own CPU is taken off it.
    includes_clients: bool,
    /// Everything the bench runs (itself and any node processes): the machine's
    /// busy time less this is other programs'.
    ours: &'a dyn Fn() -> f64,
}

fn connect_retrying(addr: SocketAddr, until: Instant) -> Option<Client> {
    loop {
        if let Ok(c) = Client::connect(addr) {
            return Some(c);
        }
        if Instant::now() >= until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One client thread: a kept-open connection to one random target, one request
/// at a time, until `end`; only requests sent after `start` are counted.
fn client_loop(
    w: &Workload,
    seed: u64,
    barrier: &Barrier,
    times: &OnceLock<(Instant, Instant)>,
) -> ClientTally {
    let mut rng = Rng::new(seed);
    let addr = w.targets[rng.below(w.targets.len())];
    let mut client = connect_retrying(addr, Instant::now() + Duration::from_secs(5));
    let mut t = ClientTally {
        latencies_ns: Vec::with_capacity(1 << 16),
        ..ClientTally::default()
    };
    // Everyone is connected before the clock is set; the clock is set before
    // anyone sends.
    barrier.wait();
    barrier.wait();
    let (start, end) = *times.get().expect("the phase's times are set");
    let mut cpu_at_start = None;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let counted = t0 >= start;
        if counted && cpu_at_start.is_none() {
            cpu_at_start = Some(thread_cpu_seconds());
        }
        let line = &w.requests[rng.below(w.requests.len())];
        let reply = match client.as_mut() {
            Some(c) => c.send_line(line),
            None => Err(std::io::Error::other("not connected")),
        };
        let elapsed = t0.elapsed().as_nanos() as u64;
        match reply {
            Ok(reply) => match serde_json::from_str::<ReplyHead>(&reply) {
                Ok(head) if head.kind == w.success => {
                    if counted {
                        t.latencies_ns.push(elapsed);
                        if w.counts_hops {
                            t.hops += u64::from(head.hops.unwrap_or(0));
                        }
                    }
                }
                Ok(head) if head.kind == "not_found" => t.not_found += u64::from(counted),
                _ => t.errors += u64::from(counted),
            },
            Err(_) => {
                // A broken connection: count it, and dial again.
                t.errors += u64::from(counted);
                client = connect_retrying(addr, end);
            }
        }
    }
    if let Some(c0) = cpu_at_start {
        t.cpu_seconds = thread_cpu_seconds() - c0;
    }
    t
}

/// Runs `w` with `clients` threads: a short warm-up, not counted (connections
/// to the next hops are opened then), and then `seconds` counted.
fn run_phase(w: &Workload, clients: usize, seconds: f64, meter: &CpuMeter, seed: u64) -> Phase {
    eprintln!(
        "  {} with {clients} client{}, {seconds} s",
        w.name,
        if clients == 1 { "" } else { "s" }
    );
    let warmup = Duration::from_secs_f64((seconds / 10.0).clamp(0.05, 1.0));
    let barrier = Barrier::new(clients + 1);
    let times = &OnceLock::new();
    let (tallies, server_cpu, others, steal) = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let barrier = &barrier;
                let seed = seed.wrapping_mul(1000).wrapping_add(i as u64);
                s.spawn(move || client_loop(w, seed, barrier, times))
            })
            .collect();
        // The clock starts once every client is connected: connecting is not
        // part of the phase.
        barrier.wait();
        let start = Instant::now() + warmup;
        let end = start + Duration::from_secs_f64(seconds);
        let _ = times.set((start, end));
        barrier.wait();
        // Both readings are taken by this thread, which sleeps in between: the
        // window is exactly the counted one.
        sleep_until(start);
        let (cpu0, ours0, (busy0, steal0)) =
            ((meter.read)(), (meter.ours)(), machine_cpu_seconds());
        sleep_until(end);
        let (cpu1, ours1, (busy1, steal1)) =
            ((meter.read)(), (meter.ours)(), machine_cpu_seconds());
        let tallies: Vec<ClientTally> = handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        let others = (busy1 - busy0) - (ours1 - ours0);
        (tallies, cpu1 - cpu0, others, steal1 - steal0)
    });
    let capacity = machine_cpus() as f64 * seconds / 100.0;
    let mut phase = summarize(
        w.name,
        clients,
        seconds,
        tallies,
        server_cpu,
        meter.includes_clients,
        w.counts_hops,
    );
    phase.others_cpu_pct = (others / capacity).max(0.0);
    phase.steal_pct = steal / capacity;
    phase
}

/// Merges the client threads' tallies into the phase's figures.
fn summarize(
    name: &str,
    clients: usize,
    seconds: f64,
    tallies: Vec<ClientTally>,
    server_cpu: f64,
    server_cpu_includes_clients: bool,
    counts_hops: bool,
) -> Phase {
    let client_cpu: f64 = tallies.iter().map(|t| t.cpu_seconds).sum();
    let hops: u64 = tallies.iter().map(|t| t.hops).sum();
    let errors = tallies.iter().map(|t| t.errors).sum();
    let not_found = tallies.iter().map(|t| t.not_found).sum();
    let mut lat: Vec<u64> = tallies.into_iter().flat_map(|t| t.latencies_ns).collect();
    lat.sort_unstable();
    let ops = lat.len() as u64;
    let per_op = |cpu: f64| {
        if ops == 0 {
            0.0
        } else {
            cpu.max(0.0) * 1e6 / ops as f64
        }
    };
    let server_cpu = if server_cpu_includes_clients {
        server_cpu - client_cpu
    } else {
        server_cpu
    };
    Phase {
        name: name.to_string(),
        clients,
        ops,
        seconds,
        throughput: ops as f64 / seconds,
        p50_us: quantile_us(&lat, 0.50),
        p99_us: quantile_us(&lat, 0.99),
        p999_us: quantile_us(&lat, 0.999),
        mean_us: if ops == 0 {
            0.0
        } else {
            lat.iter().sum::<u64>() as f64 / ops as f64 / 1000.0
        },
        max_us: lat.last().map_or(0.0, |&n| n as f64 / 1000.0),
        mean_hops: counts_hops.then(|| hops as f64 / ops.max(1) as f64),
        errors,
        not_found,
        server_cpu_us_per_op: per_op(server_cpu),
        client_cpu_us_per_op: per_op(client_cpu),
        others_cpu_pct: 0.0,
        steal_pct: 0.0,
    }
}

/// Stores every key once, from `clients` threads, each through a random node.
/// Returns the seconds it took and the puts that failed.
fn load_keys(addrs: &[SocketAddr], puts: &[String], clients: usize, seed: u64) -> (f64, u64) {
    let threads = clients.min(puts.len()).max(1);
    let start = Instant::now();
    let errors = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = Rng::new(seed.wrapping_add(t as u64));
                    let addr = addrs[rng.below(addrs.len())];
                    let mut errors = 0u64;
                    let mut client = Client::connect(addr).ok();
                    for line in puts.iter().skip(t).step_by(threads) {
                        let ok = client
                            .as_mut()
                            .and_then(|c| c.send_line(line).ok())
                            .is_some_and(|r| r.contains("\"put_ok\""));
                        if !ok {
                            errors += 1;
                            client = Client::connect(addr).ok();
                        }
                    }
                    errors
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("load thread"))
            .sum()
    });
    (start.elapsed().as_secs_f64(), errors)
}

/// Sums a few counters of every node's `stats`.
fn network_stats(addrs: &[SocketAddr]) -> BTreeMap<String, u64> {
    let mut sums = BTreeMap::new();
    for addr in addrs {
        let Ok(Value::Object(stats)) = pastry::client::request(*addr, &json!({"type": "stats"}))
        else {
            continue;
        };
        for field in [
            "forwards",
            "rare_case",
            "errors",
            "connections_open",
            "peers_failed",
        ] {
            *sums.entry(field.to_string()).or_default() +=
                stats.get(field).and_then(Value::as_u64).unwrap_or(0);
        }
        if let Some(Value::Object(messages)) = stats.get("messages") {
            for (kind, n) in messages {
                *sums.entry(format!("messages.{kind}")).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    sums
}

/// A value of exactly `bytes` ASCII bytes, different for each key.
fn value_of(i: usize, bytes: usize) -> String {
    let mut v = format!("v{i}-");
    let mut c = b'a';
    while v.len() < bytes {
        v.push(c as char);
        c = if c == b'z' { b'a' } else { c + 1 };
    }
    v.truncate(bytes);
    v
}

/// min / mean / max of RSS readings, in MiB.
fn rss_summary(kib: &[u64]) -> Value {
    if kib.is_empty() {
        return Value::Null;
    }
    let mean = kib.iter().sum::<u64>() as f64 / kib.len() as f64;
    json!({
        "min_mib": round(mib(kib.iter().copied().min().unwrap_or(0)), 2),
        "mean_mib": round(mean / 1024.0, 2),
        "max_mib": round(mib(kib.iter().copied().max().unwrap_or(0)), 2),
    })
}

fn rss_text(kib: &[u64]) -> String {
    if kib.len() == 1 {
        return format!("{:.1} MiB", mib(kib[0]));
    }
    let mean = kib.iter().sum::<u64>() as f64 / kib.len().max(1) as f64;
    format!(
        "min {:.1} / mean {:.1} / max {:.1} MiB",
        mib(kib.iter().copied().min().unwrap_or(0)),
        mean / 1024.0,
        mib(kib.iter().copied().max().unwrap_or(0))
    )
}

// ---------------------------------------------------------------------------
// The network benchmark

fn bench(opts: &Options) -> Result<Report, String> {
    let mut rng = Rng::new(opts.seed);
    let how = if opts.processes {
        "pastry-node processes"
    } else {
        "in-process nodes"
    };
    eprintln!("starting {} {how} on 127.0.0.1", opts.nodes);
    let t = Instant::now();
    let network = Network::start(opts, &mut rng)?;
    let start_s = t.elapsed().as_secs_f64();
    let addrs = network.addrs();

    eprintln!("waiting for ideal leaf sets");
    let converged = wait_for_ideal_leaf_sets(&addrs, Duration::from_secs(60));
    if !converged.ideal {
        eprintln!(
            "warning: leaf sets not ideal after {:.1} s; measuring anyway",
            converged.seconds
        );
    }
    let rss_idle = network.rss_kib();

    // Every request line is prepared before measuring, so that clients spend
    // their time on the round trip, not on formatting.
    let keys: Vec<String> = (0..opts.keys).map(|i| format!("bench-{i:07}")).collect();
    let puts: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            json!({"type": "put", "key": k, "value": value_of(i, opts.value_bytes)}).to_string()
        })
        .collect();
    let gets: Vec<String> = keys
        .iter()
        .map(|k| json!({"type": "get", "key": k}).to_string())
        .collect();

    eprintln!("loading {} keys of {} bytes", opts.keys, opts.value_bytes);
    let (load_s, load_errors) = load_keys(&addrs, &puts, opts.clients, opts.seed);
    let rss_loaded = network.rss_kib();

    // The baseline answers with a real get reply, so that both sides of the
    // comparison move the same bytes and the clients parse the same line.
    let sample = Client::connect(addrs[0])
        .and_then(|mut c| c.send_line(&gets[0]))
        .map_err(|e| format!("cannot get a sample reply: {e}"))?;
    let mut reply_line = sample.into_bytes();
    reply_line.push(b'\n');
    let reply_bytes = reply_line.len();
    let baseline = BaselineServer::start(reply_line)?;
    let baseline_addrs = [baseline.addr];

    let net_cpu = || network.cpu_seconds();
    let own_cpu = || process_cpu_seconds(std::process::id());
    let all_cpu = || network.all_cpu_seconds();
    let net_meter = CpuMeter {
        read: &net_cpu,
        includes_clients: network.cpu_includes_clients(),
        ours: &all_cpu,
    };
    let baseline_meter = CpuMeter {
        read: &own_cpu,
        includes_clients: true,
        ours: &all_cpu,
    };
    let put = Workload {
        name: "put",
        targets: &addrs,
        requests: &puts,
        success: "put_ok",
        counts_hops: true,
    };
    let get = Workload {
        name: "get",
        targets: &addrs,
        requests: &gets,
        success: "value",
        counts_hops: true,
    };
    let base = Workload {
        name: "baseline",
        targets: &baseline_addrs,
        requests: &gets,
        success: "value",
        counts_hops: false,
    };

    eprintln!("measuring");
    let (c, secs, seed) = (opts.clients, opts.seconds, opts.seed);
    let put_c = run_phase(&put, c, secs, &net_meter, seed);
    let get_c = run_phase(&get, c, secs, &net_meter, seed + 1);
    let get_1 = if c == 1 {
        get_c.clone()
    } else {
        run_phase(&get, 1, secs, &net_meter, seed + 2)
    };
    let base_1 = run_phase(&base, 1, secs, &baseline_meter, seed + 3);
    let base_c = if c == 1 {
        base_1.clone()
    } else {
        run_phase(&base, c, secs, &baseline_meter, seed + 4)
    };
    drop(baseline);
    let rss_after = network.rss_kib();
    let threads_after = network.threads();
    let stats = network_stats(&addrs);
    drop(network);
    kill_children();

    // The issue's ratios. A get passes mean_hops node-to-node hops plus the
    // client's own round trip: hops + 1 round trips in all.
    let (hops_1, hops_c) = (
        get_1.mean_hops.unwrap_or(0.0),
        get_c.mean_hops.unwrap_or(0.0),
    );
    let per_hop_us = get_1.p50_us / (hops_1 + 1.0);
    let per_hop_ratio = per_hop_us / base_1.p50_us;
    let throughput_ratio = get_c.throughput * (hops_c + 1.0) / base_c.throughput;
    let idle_max_mib = rss_idle.iter().copied().max().map_or(0.0, mib);

    let phases = [&put_c, &get_c, &get_1, &base_1, &base_c];
    let mut json_phases: Vec<Value> = Vec::new();
    for p in phases {
        if !json_phases
            .iter()
            .any(|j| j["name"] == p.name && j["clients"] == p.clients)
        {
            json_phases.push(p.json());
        }
    }
    let mut memory = json!({
        "what": if opts.processes { "VmRSS of each node process" } else { "VmRSS of the whole bench process (all nodes and clients)" },
        "idle": rss_summary(&rss_idle),
        "loaded": rss_summary(&rss_loaded),
        "after_measuring": rss_summary(&rss_after),
        "threads_after_measuring": threads_after,
    });
    let mut goals = json!({
        "per_hop_at_most_2x_baseline": per_hop_ratio <= 2.0,
        "get_throughput_at_least_half": throughput_ratio >= 0.5,
        "get_p99_1_client_under_1ms": get_1.p99_us < 1000.0,
    });
    if opts.processes {
        memory["idle_node_under_10_mib"] = json!(idle_max_mib < 10.0);
        goals["idle_node_under_10_mib"] = json!(idle_max_mib < 10.0);
    }
    let json = json!({
        "mode": if opts.processes { "processes" } else { "in-process" },
        "nodes": opts.nodes,
        "clients": opts.clients,
        "seconds": opts.seconds,
        "keys": opts.keys,
        "value_bytes": opts.value_bytes,
        "tick_ms": opts.tick_ms,
        "keep_awake": opts.keep_awake,
        "cpus": cpus(),
        "start_seconds": round(start_s, 3),
        "converged": {"seconds": round(converged.seconds, 3), "ideal": converged.ideal},
        "load": {"keys": opts.keys, "seconds": round(load_s, 3), "errors": load_errors},
        "get_reply_bytes": reply_bytes,
        "phases": json_phases,
        "ratios": {
            "per_hop_us": round(per_hop_us, 2),
            "per_hop_over_baseline_rtt": round(per_hop_ratio, 3),
            "get_throughput_times_hops_plus_1_over_baseline": round(throughput_ratio, 3),
            "get_p99_us_1_client": round(get_1.p99_us, 1),
        },
        "goals": goals,
        "memory": memory,
        "node_stats": stats,
    });

    // The text for people.
    let mut text = String::new();
    text += &format!(
        "{} {how}, {} clients, {} s per phase, {} keys of {} bytes, {} CPUs\n",
        opts.nodes,
        opts.clients,
        opts.seconds,
        opts.keys,
        opts.value_bytes,
        cpus()
    );
    if opts.keep_awake {
        text += "--keep-awake: idle-class spinners keep every CPU from sleeping\n";
    }
    text += &format!(
        "started in {start_s:.2} s; leaf sets {} {:.2} s later; loaded in {load_s:.2} s ({load_errors} errors)\n",
        if converged.ideal { "ideal" } else { "NOT ideal" },
        converged.seconds
    );
    text +=
        &format!("a get reply is {reply_bytes} bytes; the baseline answers with the same line\n\n");
    text += &format!(
        "{:<10} {:>7} {:>9} {:>8} {:>8} {:>9} {:>8} {:>5} {:>10} {:>10} {:>6} {:>7}\n",
        "phase",
        "clients",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "mean µs",
        "hops",
        "server CPU",
        "client CPU",
        "errors",
        "others"
    );
    let mut shown: Vec<(String, usize)> = Vec::new();
    for p in phases {
        if shown.contains(&(p.name.clone(), p.clients)) {
            continue;
        }
        shown.push((p.name.clone(), p.clients));
        text += &format!(
            "{:<10} {:>7} {:>9.0} {:>8.1} {:>8.1} {:>9.1} {:>8.1} {:>5} {:>7.1} µs {:>7.1} µs {:>6} {:>6.0}%\n",
            p.name,
            p.clients,
            p.throughput,
            p.p50_us,
            p.p99_us,
            p.p999_us,
            p.mean_us,
            p.mean_hops.map_or("-".to_string(), |h| format!("{h:.2}")),
            p.server_cpu_us_per_op,
            p.client_cpu_us_per_op,
            p.errors + p.not_found,
            p.others_cpu_pct
        );
    }
    text += "(CPU columns: per operation, server = the nodes or the baseline server; others: the\n\
              machine's CPU that other programs used during the phase, which the figures lose)\n\n";
    let mark = |ok: bool| if ok { "met" } else { "NOT met" };
    text += &format!(
        "per-hop cost, 1 client: {:.1} µs / ({:.2} hops + 1) = {per_hop_us:.1} µs = {per_hop_ratio:.2} × baseline round trip {:.1} µs   (goal ≤ 2: {})\n",
        get_1.p50_us,
        hops_1,
        base_1.p50_us,
        mark(per_hop_ratio <= 2.0)
    );
    text += &format!(
        "get throughput, {} clients: {:.0}/s × ({:.2} hops + 1) / baseline {:.0}/s = {throughput_ratio:.2}   (goal ≥ 0.5: {})\n",
        c,
        get_c.throughput,
        hops_c,
        base_c.throughput,
        mark(throughput_ratio >= 0.5)
    );
    text += &format!(
        "get p99, 1 client: {:.1} µs   (goal < 1000 µs: {})\n",
        get_1.p99_us,
        mark(get_1.p99_us < 1000.0)
    );
    if opts.processes {
        text += &format!(
            "memory per node process: idle {}; loaded {}; after measuring {}   (idle goal < 10 MiB: {})\n",
            rss_text(&rss_idle),
            rss_text(&rss_loaded),
            rss_text(&rss_after),
            mark(idle_max_mib < 10.0)
        );
        text += &format!(
            "threads per node process after measuring: min {} / max {}\n",
            threads_after.iter().min().unwrap_or(&0),
            threads_after.iter().max().unwrap_or(&0)
        );
    } else {
        text += &format!(
            "memory of the whole bench process: idle {}; loaded {}; after measuring {} (per node: use --processes)\n",
            rss_text(&rss_idle),
            rss_text(&rss_loaded),
            rss_text(&rss_after)
        );
    }
    text += &format!(
        "node counters: {} forwards, {} rare-case, {} errors, {} peers failed, {} connections open at the end\n",
        stats.get("forwards").unwrap_or(&0),
        stats.get("rare_case").unwrap_or(&0),
        stats.get("errors").unwrap_or(&0),
        stats.get("peers_failed").unwrap_or(&0),
        stats.get("connections_open").unwrap_or(&0)
    );
    Ok(Report { json, text })
}

// ---------------------------------------------------------------------------
// --memory-keys N

/// Sends `n` puts of key `k{i}` and a 10-byte value over `conns` connections,
/// each pipelined: one thread writes every line while another reads the replies,
/// so the node is never idle waiting for the next request. Returns the replies
/// that were `put_ok` and the others.
fn pipelined_puts(addr: SocketAddr, n: usize, conns: usize) -> Result<(u64, u64), String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..conns)
            .map(|c| {
                s.spawn(move || -> Result<(u64, u64), String> {
                    let stream =
                        TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
                    let reader = stream.try_clone().map_err(|e| e.to_string())?;
                    let writer = std::thread::spawn(move || -> std::io::Result<()> {
                        let mut w = BufWriter::with_capacity(1 << 16, stream);
                        for i in (c..n).step_by(conns) {
                            writeln!(w, r#"{{"type":"put","key":"k{i}","value":"0123456789"}}"#)?;
                        }
                        w.flush()?;
                        // The node answers what it has read and then closes:
                        // the reader below ends at that end of file.
                        w.get_ref().shutdown(Shutdown::Write)
                    });
                    let (mut ok, mut other) = (0, 0);
                    for line in BufReader::new(reader).lines() {
                        let line = line.map_err(|e| e.to_string())?;
                        if line.contains(r#""type":"put_ok""#) {
                            ok += 1;
                        } else {
                            other += 1;
                        }
                    }
                    writer
                        .join()
                        .map_err(|_| "writer panicked".to_string())?
                        .map_err(|e| format!("writing puts: {e}"))?;
                    Ok((ok, other))
                })
            })
            .collect();
        let mut sum = (0, 0);
        for h in handles {
            let (ok, other) = h.join().map_err(|_| "put thread panicked".to_string())??;
            sum.0 += ok;
            sum.1 += other;
        }
        Ok(sum)
    })
}

fn memory_keys(opts: &Options, n: usize) -> Result<Report, String> {
    const CONNECTIONS: usize = 4;
    const VALUE_BYTES: usize = 10;
    let exe = node_binary()?;
    eprintln!("starting one pastry-node");
    let node = spawn_node(&exe, None, opts.tick_ms)?;
    // Let it settle: its threads started and a first tick passed.
    std::thread::sleep(Duration::from_millis(1500));
    let idle = vm_rss_kib(node.pid).ok_or("cannot read the node's VmRSS")?;

    eprintln!("storing {n} keys over {CONNECTIONS} pipelined connections");
    let t = Instant::now();
    let (ok, failed) = pipelined_puts(node.addr, n, CONNECTIONS)?;
    let store_s = t.elapsed().as_secs_f64();
    let keys_held = pastry::client::request(node.addr, &json!({"type": "stats"}))
        .ok()
        .and_then(|v| v["keys"].as_u64())
        .unwrap_or(0);
    let loaded = vm_rss_kib(node.pid).ok_or("cannot read the node's VmRSS")?;
    kill_children();

    let key_bytes: usize = (0..n).map(|i| format!("k{i}").len()).sum();
    let mean_key = key_bytes as f64 / n as f64;
    let per_key = (loaded as f64 - idle as f64) * 1024.0 / n as f64;
    // The issue's allowance: twice the key and value bytes, plus 100 bytes.
    let allowed = 2.0 * (mean_key + VALUE_BYTES as f64) + 100.0;
    let json = json!({
        "mode": "memory-keys",
        "keys": n,
        "key_bytes_mean": round(mean_key, 2),
        "value_bytes": VALUE_BYTES,
        "stored_ok": ok,
        "failed": failed,
        "keys_held": keys_held,
        "store_seconds": round(store_s, 3),
        "puts_per_second": round(n as f64 / store_s, 0),
        "idle_rss_mib": round(mib(idle), 2),
        "loaded_rss_mib": round(mib(loaded), 2),
        "bytes_per_key": round(per_key, 1),
        "allowed_bytes_per_key": round(allowed, 1),
        "goals": {
            "idle_node_under_10_mib": mib(idle) < 10.0,
            "bytes_per_key_within_allowance": per_key <= allowed,
        },
    });
    let text = format!(
        "one pastry-node process, {n} keys \"k<i>\" (mean {mean_key:.1} bytes) with {VALUE_BYTES}-byte values\n\
         stored {ok} ({failed} failed; the node holds {keys_held}) in {store_s:.2} s, {:.0} puts/s pipelined over {CONNECTIONS} connections\n\
         VmRSS idle {:.2} MiB (goal < 10 MiB: {}); with the keys {:.2} MiB\n\
         {per_key:.1} bytes per key (goal ≤ 2 × ({mean_key:.1} + {VALUE_BYTES}) + 100 = {allowed:.1}: {})\n",
        n as f64 / store_s,
        mib(idle),
        if mib(idle) < 10.0 { "met" } else { "NOT met" },
        mib(loaded),
        if per_key <= allowed { "met" } else { "NOT met" },
    );
    Ok(Report { json, text })
}

// ---------------------------------------------------------------------------
// --join-test N

fn join_test(opts: &Options, n: usize) -> Result<Report, String> {
    let config = node_config(opts.tick_ms);
    let mut rng = Rng::new(opts.seed);
    eprintln!("starting {n} in-process nodes, each joining through a random node already in");
    let start = Instant::now();
    let nodes = join_in_process(n, &config, &mut rng)?;
    let joined_s = start.elapsed().as_secs_f64();
    let all: Vec<NodeInfo> = nodes.iter().map(|n| n.node().own()).collect();
    let not_ideal = || {
        nodes
            .iter()
            .filter(|nd| {
                nd.node().leaf_set() != leaf_set::ideal(nd.id(), config.leaf_set_size, &all)
            })
            .count()
    };
    let ideal = wait_until(Duration::from_secs(60), Duration::from_millis(2), || {
        not_ideal() == 0
    });
    let ideal_s = start.elapsed().as_secs_f64();
    let left = not_ideal();
    drop(nodes);
    let json = json!({
        "mode": "join-test",
        "nodes": n,
        "tick_ms": opts.tick_ms,
        "all_joined_seconds": round(joined_s, 3),
        "ideal": ideal,
        "ideal_seconds": if ideal { json!(round(ideal_s, 3)) } else { Value::Null },
        "nodes_not_ideal": left,
        "goals": {"ideal_within_2_s": ideal && ideal_s <= 2.0},
    });
    let text = if ideal {
        format!(
            "{n} nodes (tick {} ms): all joined {joined_s:.3} s after the start, all leaf sets ideal {ideal_s:.3} s after the start   (goal ≤ 2 s: {})\n",
            opts.tick_ms,
            if ideal_s <= 2.0 { "met" } else { "NOT met" }
        )
    } else {
        format!(
            "{n} nodes (tick {} ms): all joined {joined_s:.3} s after the start; {left} leaf sets still not ideal {ideal_s:.1} s after the start   (goal ≤ 2 s: NOT met)\n",
            opts.tick_ms
        )
    };
    Ok(Report { json, text })
}

// ---------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(Parsed::Run(o)) => o,
        Ok(Parsed::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Node processes die with the bench: on return, on a panic (the guard), and
    // on Ctrl-C or SIGTERM (the handler).
    let _guard = KillChildrenOnDrop;
    if let Err(e) = ctrlc::set_handler(|| {
        kill_children();
        std::process::exit(130);
    }) {
        eprintln!("warning: cannot install the signal handler: {e}");
    }
    if opts.spin {
        loop {
            std::hint::spin_loop();
        }
    }
    if opts.keep_awake {
        if let Err(e) = keep_awake() {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    }
    let result = match (opts.memory_keys, opts.join_test) {
        (Some(n), _) => memory_keys(&opts, n),
        (_, Some(n)) => join_test(&opts, n),
        _ => bench(&opts),
    };
    match result {
        Ok(report) if opts.json => {
            println!("{}", report.json);
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", report.text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
