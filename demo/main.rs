//! The demo: a whole Pastry network in one process, shown step by step.
//!
//! 1. Start N nodes on free loopback ports and join them one at a time through the
//!    protocol (each newcomer routes a `join` message to its own id).
//! 2. Wait until every leaf set equals the ideal one, computed by brute force from
//!    all node ids: leaf sets converge through the periodic maintenance ticks.
//! 3. Show one node's leaf set and routing table.
//! 4. Store fruit colours through some nodes and look them up from others, over the
//!    line protocol that `nc` speaks, showing each route.
//! 5. Stop a few nodes, wait for the survivors to repair their leaf sets, and check
//!    that every key is still routed to its (new) root.
//!
//! Every check compares what the network answers with a brute-force answer.

use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pastry::client;
use pastry::message_handler::Reply;
use pastry::pastry_node::leaf_set::{self, LeafSet};
use pastry::pastry_node::server::open_file_limits;
use pastry::pastry_node::transport::MAX_IDLE;
use pastry::pastry_node::{Config, RunningNode};
use pastry::utils::{closer_to, NodeId, NodeInfo, BASE, DIGITS};
use serde_json::{json, Value};

const USAGE: &str = "usage: demo [--nodes N] [--stay] [--log-level LEVEL]";

const HELP: &str = "\
demo: a Pastry network of N nodes in one process, on 127.0.0.1.

Joins the nodes one by one, checks every leaf set against the ideal one, shows one
node's routing table, stores and looks up a few keys showing their routes, then stops
a few nodes and checks that routing still reaches the right root.
Exit status: 0 if every check passed, 1 if one failed (or the open-file limit is
too low for N nodes: it says what to run), 2 for a usage error.

USAGE:
    demo [--nodes N] [--stay] [--log-level LEVEL]

OPTIONS:
    --nodes N          how many nodes to start (2..=200; default 20)
    --stay             keep the network up afterwards, with commands to try, until Ctrl-C
    --log-level LEVEL  off, error, warn, info, debug or trace, to stderr (default off;
                       or set the PASTRY_LOG environment variable)
    -h, --help         this help
";

/// The keys the demo stores: fruit and its colour.
const FRUIT: &[(&str, &str)] = &[
    ("apple", "red"),
    ("banana", "yellow"),
    ("cherry", "dark red"),
    ("lime", "green"),
    ("plum", "purple"),
    ("blueberry", "blue"),
    ("apricot", "orange"),
    ("kiwi", "brown"),
];

/// The maintenance tick: much shorter than the default 1 s, so that leaf sets
/// converge in a blink; but longer for more nodes, since every node's heartbeat
/// calls its whole leaf set each tick and all of them share this process (at 200
/// nodes and 200 ms they saturated two cores and each join took seconds).
fn tick_for(nodes: usize) -> Duration {
    Duration::from_millis((5 * nodes as u64).max(200))
}
/// How long leaf sets may take to converge before the demo calls it a failure.
const DEADLINE: Duration = Duration::from_secs(10);
/// How many nodes step 5 stops.
const FAILURES: usize = 3;
/// How long the demo waits for its nodes to stop before it exits anyway.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// Open files the demo needs for `n` nodes. Each node keeps idle connections
/// to at most [`MAX_IDLE`] of its `n - 1` peers, and in one process a connection
/// costs two descriptors, one for each end; a node also has its listener and
/// calls in flight. Measured at the peak (while nodes join): 40 per node at 20
/// nodes, 66 at 60, 67 at 200, against 40, 66 and 66 here; the margin covers
/// bursts, and the process's own (standard streams, the demo's requests).
fn open_files_needed(n: usize) -> u64 {
    let per_node = 2 * (n - 1).min(MAX_IDLE) + 2;
    (n * per_node + n * per_node / 8 + 64) as u64
}

/// Refuses to start `n` nodes that would run out of open files halfway, with
/// what to do instead. Skipped where the limit cannot be read (not Linux).
fn check_open_files(n: usize) -> Result<(), String> {
    let Some((soft, hard)) = open_file_limits() else {
        return Ok(());
    };
    let need = open_files_needed(n);
    if need <= soft {
        return Ok(());
    }
    let fewer = (2..n).rev().find(|&k| open_files_needed(k) <= soft);
    let mut e = format!(
        "{n} nodes in one process need about {need} open files, and the limit here is {soft}; \
         raise it with `ulimit -n {need}` in this shell and run the demo again"
    );
    if let Some(k) = fewer {
        e += &format!(", or run fewer nodes (at most --nodes {k} fit)");
    }
    if hard < need {
        e += &format!(
            ". The hard limit is {hard}, which only root can raise \
             (e.g. in /etc/security/limits.conf)"
        );
    }
    Err(e)
}

/// The command line: node count, `--stay`, log level; `None` for `--help`.
fn parse(args: &[String]) -> Result<Option<(usize, bool, log::LevelFilter)>, String> {
    let level = |s: &str| {
        s.parse::<log::LevelFilter>()
            .map_err(|_| format!("log level {s:?} is not off, error, warn, info, debug or trace"))
    };
    let (mut nodes, mut stay, mut log_level) = (20, false, None);
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--stay" => stay = true,
            "--log-level" => log_level = Some(level(value("--log-level")?)?),
            "--nodes" => {
                let v = value("--nodes")?;
                let n = v.parse().ok().filter(|n| (2..=200).contains(n));
                nodes = n.ok_or_else(|| format!("--nodes {v:?}: expected a number, 2 to 200"))?;
            }
            other => return Err(format!("unexpected argument {other:?}")),
        }
    }
    // Quiet unless asked: nodes log peer failures at warn, and step 5 causes some on
    // purpose and reports them itself.
    let log_level = match (log_level, std::env::var("PASTRY_LOG")) {
        (Some(l), _) => l,
        (None, Ok(v)) if !v.is_empty() => level(&v).map_err(|e| format!("PASTRY_LOG: {e}"))?,
        _ => log::LevelFilter::Off,
    };
    Ok(Some((nodes, stay, log_level)))
}

fn init_logging(level: log::LevelFilter) {
    use std::io::IsTerminal;
    let color = match std::io::stderr().is_terminal() {
        true => simplelog::ColorChoice::Auto,
        false => simplelog::ColorChoice::Never,
    };
    let mut config = simplelog::ConfigBuilder::new();
    config.set_target_level(log::LevelFilter::Off);
    config.set_thread_level(log::LevelFilter::Off);
    let mode = simplelog::TerminalMode::Stderr;
    // Fails only if a logger is already set, which cannot happen here.
    let _ = simplelog::TermLogger::init(level, config.build(), mode, color);
}

/// What the summary reports.
#[derive(Default)]
struct Tally {
    join_hops: Vec<u32>,
    lookup_hops: Vec<u32>,
    converged_after_joins: Duration,
    /// `None` if step 5 was skipped or its leaf sets did not converge.
    converged_after_failures: Option<Duration>,
    stopped: usize,
    /// Checks of step 5 that failed; the demo goes on, to show what still works.
    problems: Vec<String>,
}

fn average(v: &[u32]) -> f64 {
    v.iter().map(|&h| h as f64).sum::<f64>() / v.len().max(1) as f64
}

/// The root of `key` among `nodes`, by brute force: the numerically closest id,
/// with the tie-break every node uses.
fn root_of(key: &str, nodes: &[NodeInfo]) -> NodeId {
    let key = NodeId::for_key(key);
    let closest = nodes
        .iter()
        .min_by(|a, b| closer_to(&key, &a.node_id, &b.node_id));
    closest.expect("a network has a node").node_id
}

fn infos(nodes: &[RunningNode]) -> Vec<NodeInfo> {
    nodes.iter().map(|n| n.node().own()).collect()
}

/// Sends one request through the line protocol, as `nc` would, and decodes the reply.
fn call(addr: SocketAddr, request: Value) -> Result<Reply, String> {
    let reply = client::request(addr, &request).map_err(|e| format!("{addr}: {e}"))?;
    match serde_json::from_value::<Reply>(reply) {
        Ok(Reply::Error { code, message }) => Err(format!("{addr}: error {code}: {message}")),
        Ok(reply) => Ok(reply),
        Err(e) => Err(format!("{addr}: unreadable reply to {request}: {e}")),
    }
}

/// The route of `key` from the node at `from`: the nodes passed, `from` first and
/// the root last, and the hop count.
fn route(from: SocketAddr, key: &str) -> Result<(Vec<NodeInfo>, u32), String> {
    match call(from, json!({"type": "route", "key": key}))? {
        Reply::Route { path, hops, .. } if !path.is_empty() => Ok((path, hops)),
        other => Err(unexpected(from, &other)),
    }
}

fn unexpected(addr: SocketAddr, reply: &Reply) -> String {
    format!("{addr} answered something unexpected: {reply:?}")
}

fn owner(path: &[NodeInfo]) -> NodeId {
    path.last().expect("a route ends at its root").node_id
}

/// A route as people read it: `1a2b3c4d -> 5e6f7a8b (1 hop)`.
fn show_route(path: &[NodeInfo], hops: u32) -> String {
    let ids: Vec<String> = path.iter().map(|n| n.node_id.short()).collect();
    let s = if hops == 1 { "" } else { "s" };
    format!("{} ({hops} hop{s})", ids.join(" -> "))
}

/// Step 1: starts `n` nodes and joins them one at a time, printing each join.
fn start_network(n: usize, tally: &mut Tally) -> Result<Vec<RunningNode>, String> {
    println!("1. Joining {n} nodes one at a time (each routes a join message to its own id)");
    println!("      node  id        address                through   hops  leaf set");
    let config = Config {
        tick: tick_for(n),
        ..Config::default()
    };
    let mut nodes: Vec<RunningNode> = Vec::with_capacity(n);
    for i in 0..n {
        let listener = TcpListener::bind("127.0.0.1:0")
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let node = RunningNode::start(listener, config.clone())
            .map_err(|e| format!("cannot start a node: {e}"))?;
        let (label, id, addr) = (format!("{}/{n}", i + 1), node.id().short(), node.addr());
        if i == 0 {
            println!("   {label:>7}  {id}  {addr:<21}  (the first node: a new network)");
        } else {
            // The bootstrap is picked by the newcomer's id, so that joins enter the
            // network at different places without a random number generator.
            let boot = &nodes[node.id().0[0] as usize % i];
            let report = node.join(boot.addr());
            let report = report.map_err(|e| format!("node {label} did not join: {e}"))?;
            tally.join_hops.push(report.hops);
            let (through, hops) = (boot.id().short(), report.hops);
            let leaves = node.node().leaf_set().len();
            println!("   {label:>7}  {id}  {addr:<21}  {through}  {hops:>4}  {leaves:>8}");
        }
        nodes.push(node);
    }
    Ok(nodes)
}

/// How `actual` differs from `ideal`, marking the nodes known to be stopped.
fn leaf_set_diff(actual: &LeafSet, ideal: &LeafSet, stopped: &[NodeId]) -> String {
    let list = |from: &LeafSet, not_in: &LeafSet| {
        let mut out = Vec::new();
        for n in from.members().filter(|n| !not_in.contains(&n.node_id)) {
            let dead = stopped.contains(&n.node_id);
            let mark = if dead { " (stopped)" } else { "" };
            out.push(format!("{}{mark}", n.node_id.short()));
        }
        out.join(", ")
    };
    let (missing, extra) = (list(ideal, actual), list(actual, ideal));
    format!("missing [{missing}], extra [{extra}]")
}

/// Polls until every node's leaf set equals the ideal one for `nodes`: leaf sets
/// converge through periodic ticks, so one look right away would be unfair.
fn await_ideal_leaf_sets(nodes: &[RunningNode], stopped: &[NodeId]) -> Result<Duration, String> {
    let all = infos(nodes);
    let start = Instant::now();
    loop {
        let mut wrong = nodes.iter().filter_map(|n| {
            let actual = n.node().leaf_set();
            let ideal = leaf_set::ideal(n.id(), actual.capacity(), &all);
            (actual != ideal).then(|| (n.id().short(), leaf_set_diff(&actual, &ideal, stopped)))
        });
        let Some((id, diff)) = wrong.next() else {
            return Ok(start.elapsed());
        };
        if start.elapsed() > DEADLINE {
            let (count, total) = (wrong.count() + 1, nodes.len());
            return Err(format!(
                "{count} of {total} leaf sets still differ from the ideal after {DEADLINE:?}; \
                 e.g. node {id}'s: {diff}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Step 3: one node's leaf set, and its routing table drawn as in the paper.
fn show_node_state(node: &RunningNode) {
    let (own, addr, ls) = (node.id(), node.addr(), node.node().leaf_set());
    let state = node.node().snapshot();
    let rt = &state.routing_table;
    let ids = |v: &[NodeInfo]| v.iter().map(|n| n.node_id.short()).collect::<Vec<_>>();
    let (len, size, entries, me) = (ls.len(), ls.capacity(), rt.len(), own.short());
    println!("3. The state of node {me} ({addr})");
    println!("   leaf set, {len} of |L| = {size}, nearest first:");
    println!("     smaller  {}", ids(ls.smaller()).join(" "));
    println!("     larger   {}", ids(ls.larger()).join(" "));
    println!("   routing table, {entries} entries: row = digits shared with {me},");
    println!("   column = the next digit; a cell shows a node's first 4 digits, '.' none, '*' us");
    let header: Vec<String> = (0..BASE).map(|c| format!("{c:<4x}")).collect();
    println!("     row  {}", header.join(" ").trim_end());
    for row in 0..rt.rows_used() {
        let cell = |col: usize| match rt.get(row, col) {
            _ if col == own.digit(row) => "*   ".to_string(),
            Some(e) => e.node.node_id.short()[..4].to_string(),
            None => ".   ".to_string(),
        };
        let cells: Vec<String> = (0..BASE).map(cell).collect();
        println!("     {row:>3}  {}", cells.join(" ").trim_end());
    }
    let (used, last) = (rt.rows_used(), DIGITS - 1);
    println!("     rows {used}..{last} are empty: too few nodes share more digits");
}

/// Step 4: stores every fruit through one node and looks it up from another.
fn store_and_look_up(nodes: &[RunningNode], tally: &mut Tally) -> Result<(), String> {
    let (all, n) = (infos(nodes), nodes.len());
    println!("4. Storing fruit colours, each through a different node");
    println!("   key        key id    value       through   root      hops");
    for (i, &(key, colour)) in FRUIT.iter().enumerate() {
        let through = &nodes[(i * 3) % n];
        let (addr, via) = (through.addr(), through.id().short());
        let put = json!({"type": "put", "key": key, "value": colour});
        let (owner, hops) = match call(addr, put)? {
            Reply::PutOk { owner, hops, .. } => (owner, hops),
            other => return Err(unexpected(addr, &other)),
        };
        let (id, value) = (NodeId::for_key(key).short(), format!("{colour:?}"));
        let root = owner.short();
        if owner != root_of(key, &all) {
            return Err(format!("{key:?} was stored on {root}, not on its root"));
        }
        println!("   {key:<10} {id}  {value:<10}  {via}  {root}  {hops:>4}");
    }

    println!();
    println!("   Looking each one up from another node: its route, then the value at the root");
    for (i, &(key, colour)) in FRUIT.iter().enumerate() {
        let from = nodes[(i * 3 + n / 2) % n].addr();
        let (path, hops) = route(from, key)?;
        let (shown, root) = (show_route(&path, hops), owner(&path));
        let value = match call(from, json!({"type": "get", "key": key}))? {
            Reply::Value { value, owner, .. } if owner == root => value,
            other => return Err(unexpected(from, &other)),
        };
        if root != root_of(key, &all) || value != json!(colour) {
            return Err(format!(
                "{key:?}: {value} via {shown}, not {colour:?} at its root"
            ));
        }
        let (value, root) = (value.to_string(), root.short());
        println!("   {key:<10} {shown:<42} found {value:<10} at {root}, the root");
    }

    let (routes, hops) = check_every_route(nodes)?;
    let avg = average(&hops);
    tally.lookup_hops = hops;
    println!("   every node routes every key to its root: {routes}/{routes}, {avg:.2} hops each");
    Ok(())
}

/// Asks every node for the route of every key and checks that each ends at the
/// brute-force root. Returns the number of routes and their hop counts.
fn check_every_route(nodes: &[RunningNode]) -> Result<(usize, Vec<u32>), String> {
    let all = infos(nodes);
    let mut hops = Vec::new();
    for node in nodes {
        for &(key, _) in FRUIT {
            let (path, h) = route(node.addr(), key)?;
            let root = root_of(key, &all);
            if owner(&path) != root {
                let (shown, root) = (show_route(&path, h), root.short());
                return Err(format!(
                    "{key:?} was routed {shown}, but its root is {root}"
                ));
            }
            hops.push(h);
        }
    }
    Ok((hops.len(), hops))
}

/// Step 5: stops a few nodes (never node 0, which we query from), waits for the
/// survivors to repair their leaf sets and checks routing again. Failed checks are
/// recorded in `tally.problems`, and the step goes on to show what still works.
fn survive_failures(nodes: &mut Vec<RunningNode>, tally: &mut Tally) {
    let count = FAILURES.min(nodes.len().saturating_sub(2));
    if count == 0 {
        println!("5. Surviving failures: skipped, too few nodes");
        return;
    }
    // Stop the roots of the first keys, so that routing visibly has to find new roots.
    let before = infos(nodes);
    let roots = FRUIT.iter().map(|(k, _)| root_of(k, &before));
    let mut victims: Vec<NodeId> = Vec::new();
    for id in roots.chain(before.iter().rev().map(|n| n.node_id)) {
        if id != before[0].node_id && !victims.contains(&id) && victims.len() < count {
            victims.push(id);
        }
    }
    let total = nodes.len();
    println!("5. Surviving failures: stopping {count} of the {total} nodes, without warning");
    // Stopped nodes' ports refuse connections, so their neighbours find out at
    // their next heartbeat; a host that vanishes (a pulled cable) answers
    // nothing, and is found out when its lease lapses: 3 heartbeats, at least
    // 1.5 s. Say so, rather than let the figure below pass for that case.
    println!(
        "   (their ports close, so neighbours notice at their next heartbeat, every {} ms here;",
        tick_for(total).as_millis()
    );
    println!("   a host that vanishes silently is noticed when its lease lapses: 3 heartbeats, at least 1.5 s)");
    for id in &victims {
        // Every victim was picked from `nodes`, and each is removed once.
        let Some(at) = nodes.iter().position(|n| n.id() == *id) else {
            continue;
        };
        let mut node = nodes.remove(at);
        node.shutdown();
        println!("   stopped {}  {}", id.short(), node.addr());
    }
    tally.stopped = victims.len();
    let survivors = nodes.len();

    match await_ideal_leaf_sets(nodes, &victims) {
        Ok(took) => {
            let secs = took.as_secs_f64();
            println!("   all {survivors} survivors' leaf sets are ideal again after {secs:.2} s");
            tally.converged_after_failures = Some(took);
        }
        Err(e) => problem(tally, e),
    }

    let after = infos(nodes);
    let (from, me) = (nodes[0].addr(), nodes[0].id().short());
    println!("   routes from {me} now:");
    let mut lost = 0;
    for &(key, _) in FRUIT {
        let (old, new) = (root_of(key, &before), root_of(key, &after));
        lost += victims.contains(&old) as usize;
        let (was, root) = (old.short(), new.short());
        match route(from, key) {
            Ok((path, _)) if owner(&path) != new => {
                let reached = owner(&path).short();
                let e = format!("{key:?} reached {reached}, not its root {root}");
                problem(tally, e)
            }
            Ok((path, hops)) => {
                let shown = show_route(&path, hops);
                let note = if old == new {
                    "same root".into()
                } else {
                    format!("new root (was {was})")
                };
                println!("   {key:<10} {shown:<42} {note}");
            }
            Err(e) => problem(tally, e),
        }
    }
    match check_every_route(nodes) {
        Ok((n, _)) => println!("   every survivor routes every key to its new root: {n}/{n}"),
        Err(e) => problem(tally, e),
    }
    // The data survives too: each key lives on the k nodes closest to it, so a
    // stopped root's keys are still held by the rest of its replica set.
    let mut found = 0;
    let mut asked = 0;
    for node in nodes.iter() {
        for &(key, value) in FRUIT {
            asked += 1;
            match call(node.addr(), json!({"type": "get", "key": key})) {
                Ok(Reply::Value { value: v, .. }) if v == json!(value) => found += 1,
                Ok(other) => problem(tally, unexpected(node.addr(), &other)),
                Err(e) => problem(tally, e),
            }
        }
    }
    println!(
        "   every value is still found from every survivor: {found}/{asked}, though {lost} of the keys lost their root (each key lives on {} nodes)",
        nodes[0].node().replicas()
    );
}

/// Shows and records a failed check of step 5.
fn problem(tally: &mut Tally, e: String) {
    println!("   FAILED: {e}");
    tally.problems.push(e);
}

fn print_summary(started: usize, alive: usize, tally: &Tally, total: Duration) {
    let log16 = (started as f64).ln() / 16f64.ln();
    let (join, lookup) = (average(&tally.join_hops), average(&tally.lookup_hops));
    let ideal = match (tally.stopped, tally.converged_after_failures) {
        (0, _) => "yes".to_string(),
        (_, Some(d)) => format!("yes, and again {:.2} s after the failures", d.as_secs_f64()),
        (_, None) => "no: not again after the failures".to_string(),
    };
    let (joins, stopped) = (tally.converged_after_joins.as_secs_f64(), tally.stopped);
    println!("Summary");
    println!("   nodes             {started} started, {stopped} stopped, {alive} alive");
    println!("   join hops         {join:.2} on average");
    println!("   lookup hops       {lookup:.2} on average (log16 {started} = {log16:.2})");
    println!("   leaf sets ideal   {ideal}");
    println!("   time to converge  {joins:.2} s after the last join");
    println!("   total time        {:.1} s", total.as_secs_f64());
}

/// `--stay`: keeps the network up, with commands to try, until Ctrl-C.
fn stay(nodes: &[RunningNode]) -> Result<(), String> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    let handler = ctrlc::set_handler(move || tx.try_send(()).unwrap_or(()));
    handler.map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    let nc = |i: usize| {
        let a = nodes[i % nodes.len()].addr();
        format!("| nc -N {} {}", a.ip(), a.port())
    };
    println!();
    // Suggest a key whose value survived step 5.
    let get = |k: &str| call(nodes[0].addr(), json!({"type": "get", "key": k}));
    let survived = |k: &&str| matches!(get(k), Ok(Reply::Value { .. }));
    let key = FRUIT.iter().map(|f| f.0).find(survived).unwrap_or("apple");
    let count = nodes.len();
    println!("The network of {count} nodes stays up. Try, from another terminal:");
    println!(r#"   printf '{{"type":"get","key":"{key}"}}\n' {}"#, nc(1));
    println!(r#"   printf '{{"type":"route","key":"lime"}}\n' {}"#, nc(2));
    println!(
        r#"   printf '{{"type":"put","key":"fig","value":"violet"}}\n' {}"#,
        nc(3)
    );
    println!(r#"   printf '{{"type":"status"}}\n' {}"#, nc(0));
    println!(r#"   printf '{{"type":"help"}}\n' {}"#, nc(0));
    println!("Ctrl-C stops it.");
    let _ = rx.recv();
    println!("stopping {count} nodes");
    Ok(())
}

/// Stops every node, all at once, and waits at most `STOP_WAIT`: a node whose
/// maintenance thread is busy must not keep the demo from exiting.
fn stop_all(nodes: Vec<RunningNode>) {
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    std::thread::spawn(move || {
        let stop = |n: RunningNode| std::thread::spawn(move || drop(n));
        let stoppers: Vec<_> = nodes.into_iter().map(stop).collect();
        stoppers.into_iter().for_each(|t| drop(t.join()));
        let _ = tx.send(());
    });
    if rx.recv_timeout(STOP_WAIT).is_err() {
        eprintln!("note: some nodes did not stop within {STOP_WAIT:?}; exiting anyway");
    }
}

/// Steps 2 to 5 and the summary, on a started network.
fn run(nodes: &mut Vec<RunningNode>, tally: &mut Tally, started: Instant) -> Result<(), String> {
    let n = nodes.len();
    println!();
    println!("2. Every leaf set against the ideal one, computed by brute force from all {n} ids");
    tally.converged_after_joins = await_ideal_leaf_sets(nodes, &[])?;
    let secs = tally.converged_after_joins.as_secs_f64();
    println!("   all {n} leaf sets are ideal, {secs:.2} s after the last join");
    println!();
    show_node_state(&nodes[0]);
    println!();
    store_and_look_up(nodes, tally)?;
    println!();
    survive_failures(nodes, tally);
    println!();
    print_summary(n, nodes.len(), tally, started.elapsed());
    match tally.problems.len() {
        0 => Ok(()),
        k => Err(format!(
            "{k} check(s) failed; the first: {}",
            tally.problems[0]
        )),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (n, stay_up, log_level) = match parse(&args) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = check_open_files(n) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    init_logging(log_level);
    let started = Instant::now();
    println!("Pastry demo: {n} nodes on 127.0.0.1; ids have 40 hex digits, shown by the first 8");
    println!();
    let mut tally = Tally::default();
    let mut nodes = match start_network(n, &mut tally) {
        Ok(nodes) => nodes,
        Err(e) => {
            eprintln!("FAILED: {e}");
            return ExitCode::from(1);
        }
    };
    let code = match run(&mut nodes, &mut tally, started) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("FAILED: {e}");
            ExitCode::from(1)
        }
    };
    if stay_up {
        if let Err(e) = stay(&nodes) {
            eprintln!("error: {e}");
        }
    }
    stop_all(nodes);
    code
}
