//! The `pastry-node` program as a user runs it: help and version, usage errors
//! (exit 2), run-time errors (exit 1), and a real two-process network on loopback
//! stopped with SIGTERM (exit 0).
//!
//! Every child process is owned by a guard that kills and reaps it on drop, so a
//! failing assertion never leaves a process behind.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pastry::utils::NodeId;
use serde_json::json;
use support::{id_field, rpc, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_pastry-node");

/// Longest wait for a process to do what it was asked (start, exit). A deadline,
/// not a sleep: the tests move on as soon as it happens.
const DEADLINE: Duration = Duration::from_secs(20);

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("PASTRY_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A running `pastry-node`: its stderr is read line by line by a thread. Killed
/// and reaped on drop.
struct Proc {
    child: Child,
    stderr: Receiver<String>,
    reader: Option<JoinHandle<()>>,
    /// Every stderr line seen so far.
    seen: Vec<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        Proc::spawn_command(command(args))
    }

    fn spawn_command(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("start pastry-node");
        let err = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Proc {
            child,
            stderr: rx,
            reader: Some(reader),
            seen: Vec::new(),
        }
    }

    /// Waits for a stderr line containing `needle` and returns it.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no stderr line with {needle:?} within {DEADLINE:?}; seen: {:#?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "pastry-node closed stderr without a line with {needle:?}; seen: {:#?}",
                    self.seen
                ),
            }
        }
    }

    /// The address from the "listening on ADDR" log line.
    fn listening_addr(&mut self) -> SocketAddr {
        let line = self.wait_for_line("listening on ");
        let rest = &line[line.find("listening on ").unwrap() + "listening on ".len()..];
        let addr = rest.split_whitespace().next().unwrap();
        addr.parse()
            .unwrap_or_else(|e| panic!("{addr:?} in {line:?} is not an address: {e}"))
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pastry-node did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    /// The rest of stderr, once the process has exited.
    fn remaining_stderr(&mut self) -> Vec<String> {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.seen.extend(self.stderr.try_iter());
        self.seen.clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Runs `pastry-node args` to completion (killing it after the deadline) and
/// returns its status, stdout and stderr.
fn run(args: &[&str]) -> (ExitStatus, String, String) {
    run_command(command(args))
}

fn run_command(cmd: Command) -> (ExitStatus, String, String) {
    let mut p = Proc::spawn_command(cmd);
    let mut out = p.child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = p.wait_exit();
    let stdout = out_reader.join().unwrap();
    let stderr = p.remaining_stderr().join("\n");
    (status, stdout, stderr)
}

#[test]
fn help_and_version_exit_zero() {
    for flag in ["--help", "-h"] {
        let (status, out, err) = run(&[flag]);
        assert_eq!(status.code(), Some(0), "{flag}: {err}");
        assert!(out.contains("USAGE"), "{flag}: {out}");
        assert!(out.contains("pastry-node <ip> <port>"), "{flag}: {out}");
        assert!(out.contains("--leaf-set"), "{flag}: {out}");
        assert!(err.is_empty(), "{flag} wrote to stderr: {err}");
    }
    // Help wins over anything else on the line, even arguments that are wrong.
    let (status, out, _) = run(&["127.0.0.1", "--help", "bogus"]);
    assert_eq!(status.code(), Some(0));
    assert!(out.contains("USAGE"), "{out}");

    for flag in ["--version", "-V"] {
        let (status, out, err) = run(&[flag]);
        assert_eq!(status.code(), Some(0), "{flag}: {err}");
        assert_eq!(
            out.trim_end(),
            format!("pastry-node {}", env!("CARGO_PKG_VERSION")),
            "{flag}"
        );
        assert!(err.is_empty(), "{flag} wrote to stderr: {err}");
    }
}

#[test]
fn usage_errors_exit_two_with_a_short_message() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "missing"),
        (&["127.0.0.1"], "positional"),
        (&["localhost", "4000"], "not an IP address"),
        (&["127.0.0.256", "4000"], "not an IP address"),
        (&["127.0.0.1", "65536"], "not a port"),
        (&["127.0.0.1", "-1"], "-1 is not a port number"),
        (&["127.0.0.1", "port"], "not a port"),
        (&["127.0.0.1", "4000", "127.0.0.1"], "got 3"),
        (&["127.0.0.1", "4000", "127.0.0.1", "4001", "x"], "got 5"),
        (&["127.0.0.1", "4000", "--bogus"], "unknown option --bogus"),
        (&["0.0.0.0", "4000"], "0.0.0.0"),
        (&["::", "4000"], "::"),
        (
            &["127.0.0.1", "4000", "0.0.0.0", "4001"],
            "cannot join through",
        ),
        (
            &["127.0.0.1", "4000", "127.0.0.1", "0"],
            "cannot join through",
        ),
        (&["127.0.0.1", "4000", "127.0.0.1", "x"], "bootstrap port"),
        (&["127.0.0.1", "4000", "--leaf-set", "3"], "--leaf-set"),
        (&["127.0.0.1", "4000", "--leaf-set", "66"], "--leaf-set"),
        (&["127.0.0.1", "4000", "--leaf-set"], "needs a value"),
        (&["127.0.0.1", "4000", "--tick-ms", "5"], "--tick-ms"),
        (
            &["127.0.0.1", "4000", "--heartbeat-ms", "5"],
            "--heartbeat-ms",
        ),
        (
            &["127.0.0.1", "4000", "--leaf-set", "8", "--replicas", "5"],
            "at most |L|/2 = 4",
        ),
        (&["127.0.0.1", "4000", "--timeout-ms", "0"], "--timeout-ms"),
        (
            &[
                "127.0.0.1",
                "4000",
                "--heartbeat-ms",
                "18446744073709551615",
            ],
            "a day",
        ),
        (
            &["127.0.0.1", "4000", "--idle-timeout-ms", "86400001"],
            "a day",
        ),
        (
            &["127.0.0.1", "4000", "--timeout-ms", "soon"],
            "--timeout-ms",
        ),
        (&["127.0.0.1", "4000", "--log-level", "loud"], "log level"),
        (&["127.0.0.1", "4000", "--max-key", "0"], "--max-key"),
        (&["127.0.0.1", "4000", "--max-value", "big"], "--max-value"),
        (&["127.0.0.1", "4000", "--max-keys", "-1"], "--max-keys"),
        (&["127.0.0.1", "4000", "--max-line", "10"], "--max-line"),
        (
            &["127.0.0.1", "4000", "--max-hops", "99999999999"],
            "--max-hops",
        ),
        (&["127.0.0.1", "4000", "--line-timeout-ms"], "needs a value"),
    ];
    for (args, needle) in cases {
        let (status, out, err) = run(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {status}; stderr: {err}");
        assert!(out.is_empty(), "{args:?} wrote to stdout: {out}");
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            (1..=2).contains(&lines.len()),
            "{args:?}: expected an error line and the usage line, got {err:?}"
        );
        assert!(lines[0].starts_with("error: "), "{args:?}: {err:?}");
        assert!(
            lines[0].contains(needle),
            "{args:?}: {err:?} lacks {needle:?}"
        );
        assert!(
            lines.last().unwrap().starts_with("usage: pastry-node"),
            "{args:?}: {err:?}"
        );
    }
    // A bad PASTRY_LOG is a usage error too.
    let mut cmd = command(&["127.0.0.1", "4000"]);
    cmd.env("PASTRY_LOG", "shouting");
    let (status, _, err) = run_command(cmd);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.starts_with("error: PASTRY_LOG"), "{err}");
}

/// The limit flags reach the node: a node started with small limits refuses at
/// them, with the errors the protocol promises.
#[test]
fn limit_flags_reach_the_node() {
    let mut node = Proc::spawn(&[
        "127.0.0.1",
        "0",
        "--max-key",
        "8",
        "--max-value",
        "10",
        "--max-keys",
        "2",
        "--max-store-bytes",
        "1000",
        "--max-hops",
        "5",
        "--max-connections",
        "50",
        "--line-timeout-ms",
        "5000",
        "--idle-timeout-ms",
        "20000",
        "--max-line",
        "100000",
    ]);
    let addr = node.listening_addr();
    let put =
        |key: &str, value: &str| rpc(addr, &json!({"type": "put", "key": key, "value": value}));
    let r = put("123456789", "v");
    assert_eq!(r["code"], -32602, "{r}");
    assert!(r["message"].as_str().unwrap().contains("at most 8"), "{r}");
    let r = put("k", "123456789");
    assert!(r["message"].as_str().unwrap().contains("at most 10"), "{r}");
    assert_eq!(put("a", "1")["type"], "put_ok");
    assert_eq!(put("b", "2")["type"], "put_ok");
    let r = put("c", "3");
    assert_eq!(r["code"], -32006, "{r}");
    let r = rpc(
        addr,
        &json!({"type": "forward", "hops": 6, "op": {"type": "get", "key": "a"}}),
    );
    assert_eq!(r["code"], -32002, "{r}");
    node.sigterm();
    assert!(node.wait_exit().success());
}

#[test]
fn port_in_use_exits_one() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let (status, out, err) = run(&["127.0.0.1", &addr.port().to_string()]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.starts_with(&format!("error: cannot listen on {addr}")),
        "{line}"
    );
}

#[test]
fn unreachable_bootstrap_exits_one() {
    // A port that was free a moment ago: nothing listens there.
    let free = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (status, _, err) = run(&["127.0.0.1", "0", "127.0.0.1", &free.port().to_string()]);
    assert_eq!(status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.starts_with(&format!("error: cannot join through {free}")),
        "{line}"
    );

    // Something takes the connection but never answers: the error says so,
    // rather than the OS's "Resource temporarily unavailable".
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port().to_string();
    let (status, _, err) = run(&[
        "127.0.0.1",
        "0",
        "127.0.0.1",
        &silent_port,
        "--timeout-ms",
        "300",
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.lines()
            .any(|l| l.starts_with("error: cannot join through") && l.contains("no answer in time")),
        "{err}"
    );
    drop(silent);

    // Something listens, but it is not a Pastry node. A joining node first asks
    // its bootstrap for its state (nearest-neighbour discovery, see
    // `join::discover`), or, with discovery off, sends its join at once; either
    // way the answer is not a Pastry reply.
    for (extra, first) in [(None, "\"status\""), (Some("0"), "\"join\"")] {
        let impostor = TcpListener::bind("127.0.0.1:0").unwrap();
        let impostor_addr = impostor.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = impostor.accept().unwrap();
            let mut line = String::new();
            let _ = BufReader::new(&s).read_line(&mut line);
            let _ = s.write_all(b"220 hello, I speak SMTP\n");
            line
        });
        let port = impostor_addr.port().to_string();
        let mut args = vec!["127.0.0.1", "0", "127.0.0.1", &port];
        if let Some(width) = extra {
            args.extend(["--discovery-width", width]);
        }
        let (status, _, err) = run(&args);
        assert_eq!(status.code(), Some(1), "{err}");
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("error: cannot join through {impostor_addr}"))),
            "{err}"
        );
        let request = server.join().unwrap();
        assert!(
            request.contains(first),
            "{args:?}: the node sent {request:?}"
        );
    }
}

/// Two real processes on loopback: the first starts a network on port 0, the
/// second joins it; a value put through one is read through the other; SIGTERM
/// stops each cleanly (exit 0).
#[test]
fn two_processes_form_a_network_and_stop_on_sigterm() {
    let mut a = Proc::spawn(&["127.0.0.1", "0", "--tick-ms", "100"]);
    let a_addr = a.listening_addr();
    assert_ne!(a_addr.port(), 0);
    let pong = rpc(a_addr, &json!({"type": "ping"}));
    assert_eq!(pong["type"], "pong", "{pong}");
    assert_eq!(
        id_field(&pong, "node_id"),
        NodeId::for_addr(&a_addr),
        "{pong}"
    );
    assert_eq!(pong["addr"], a_addr.to_string());

    let a_port = a_addr.port().to_string();
    let mut b = Proc::spawn(&["127.0.0.1", "0", "127.0.0.1", &a_port, "--tick-ms", "100"]);
    let b_addr = b.listening_addr();
    b.wait_for_line(&format!("joined through {a_addr}"));

    // Each knows the other.
    for (at, other) in [(a_addr, b_addr), (b_addr, a_addr)] {
        let want = NodeId::for_addr(&other);
        assert!(
            wait_until(DEADLINE, || {
                let s = rpc(at, &json!({"type": "status"}));
                ["smaller", "larger"].iter().any(|side| {
                    s["leaf_set"][side]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|n| id_field(n, "node_id") == want))
                })
            }),
            "{at} never had {other} in its leaf set"
        );
    }

    for (k, (put_at, get_at)) in [(a_addr, b_addr), (b_addr, a_addr)].into_iter().enumerate() {
        for i in 0..8 {
            let key = format!("proc-{k}-{i}");
            let p = rpc(put_at, &json!({"type": "put", "key": key, "value": [k, i]}));
            assert_eq!(p["type"], "put_ok", "{p}");
            let g = rpc(get_at, &json!({"type": "get", "key": key}));
            assert_eq!(g["type"], "value", "{g}");
            assert_eq!(g["value"], json!([k, i]), "{g}");
            assert_eq!(g["owner"], p["owner"], "{g} vs {p}");
            let key_id = NodeId::for_key(&key);
            let (ia, ib) = (NodeId::for_addr(&a_addr), NodeId::for_addr(&b_addr));
            let root = if pastry::utils::closer_to(&key_id, &ia, &ib).is_lt() {
                ia
            } else {
                ib
            };
            assert_eq!(id_field(&g, "owner"), root, "{g}");
        }
    }

    for p in [&mut b, &mut a] {
        p.sigterm();
        let status = p.wait_exit();
        assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
        let err = p.remaining_stderr();
        assert!(err.iter().any(|l| l.contains("stopping")), "{err:#?}");
    }
    // Both are gone: nothing answers at their addresses any more.
    for addr in [a_addr, b_addr] {
        assert!(
            std::net::TcpStream::connect(addr).is_err(),
            "{addr} still accepts"
        );
    }
}

/// A network of `n` processes: the first starts it, the others join through it.
fn process_network(n: usize, extra: &[&str]) -> (Vec<Proc>, Vec<SocketAddr>) {
    let mut args = vec!["127.0.0.1", "0", "--tick-ms", "100", "--log-level", "info"];
    args.extend_from_slice(extra);
    let mut first = Proc::spawn(&args);
    let first_addr = first.listening_addr();
    let port = first_addr.port().to_string();
    let mut procs = vec![first];
    let mut addrs = vec![first_addr];
    for _ in 1..n {
        let mut a = vec!["127.0.0.1", "0", "127.0.0.1", port.as_str()];
        a.extend_from_slice(&args[2..]);
        let mut p = Proc::spawn(&a);
        addrs.push(p.listening_addr());
        p.wait_for_line("joined through");
        procs.push(p);
    }
    (procs, addrs)
}

/// Whether every key is found, with its value, from every address in `from`.
fn all_found(from: &[SocketAddr], keys: usize) -> bool {
    from.iter().all(|&a| {
        (0..keys).all(|i| {
            let r = rpc(a, &json!({"type": "get", "key": format!("k{i}")}));
            r["type"] == "value" && r["value"] == i
        })
    })
}

/// The goal of the fault-tolerance work, with real processes: two nodes killed
/// at once with SIGKILL (the root of a key and its next replica among them) lose
/// no acknowledged write; every survivor finds every key within 10 s.
#[test]
fn two_processes_killed_at_once_lose_no_acknowledged_key() {
    let (mut procs, addrs) = process_network(8, &[]);
    let keys = 30;
    for i in 0..keys {
        let r = rpc(
            addrs[i % addrs.len()],
            &json!({"type": "put", "key": format!("k{i}"), "value": i}),
        );
        assert_eq!(r["type"], "put_ok", "{r}");
        assert_eq!(r["replicas"], 3, "{r}");
    }
    let key_id = NodeId::for_key("k0");
    let mut by_closeness: Vec<usize> = (0..addrs.len()).collect();
    by_closeness.sort_by(|&a, &b| {
        pastry::utils::closer_to(
            &key_id,
            &NodeId::for_addr(&addrs[a]),
            &NodeId::for_addr(&addrs[b]),
        )
    });
    let victims = [by_closeness[0], by_closeness[1]];
    for &v in &victims {
        procs[v].child.kill().expect("SIGKILL");
    }
    let survivors: Vec<SocketAddr> = (0..addrs.len())
        .filter(|i| !victims.contains(i))
        .map(|i| addrs[i])
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || all_found(&survivors, keys)),
        "some key was not found from every survivor within 10 s"
    );
}

/// With one copy per key, a node stopped with SIGTERM hands its keys over before
/// it exits (code 0): every key is found at once.
#[test]
fn a_process_stopped_with_sigterm_hands_its_keys_over() {
    let (mut procs, addrs) = process_network(5, &["--replicas", "1"]);
    let keys = 20;
    for i in 0..keys {
        let r = rpc(
            addrs[0],
            &json!({"type": "put", "key": format!("k{i}"), "value": i}),
        );
        assert_eq!(r["replicas"], 1, "{r}");
    }
    // The root of k0 leaves.
    let root = id_field(
        &rpc(addrs[0], &json!({"type": "get", "key": "k0"})),
        "owner",
    );
    let leaving = (0..addrs.len())
        .find(|&i| NodeId::for_addr(&addrs[i]) == root)
        .unwrap();
    procs[leaving].sigterm();
    assert_eq!(procs[leaving].wait_exit().code(), Some(0));
    let survivors: Vec<SocketAddr> = (0..addrs.len())
        .filter(|&i| i != leaving)
        .map(|i| addrs[i])
        .collect();
    assert!(all_found(&survivors, keys), "a key was lost on leave");
}

/// `simulate`: a small run end to end through the binary, and arguments it must
/// refuse with one clear error rather than a panic or an out-of-memory abort.
#[test]
fn simulate_runs_small_networks_and_refuses_bad_arguments() {
    const SIM: &str = env!("CARGO_BIN_EXE_simulate");
    let out = Command::new(SIM)
        .args(["--nodes", "60", "--lookups", "500", "--reference", "--json"])
        .output()
        .expect("simulate runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("--json prints one JSON object");
    assert_eq!(report["nodes"], 60);
    assert_eq!(report["fresh"]["lookups"], 500);
    assert_eq!(report["fresh"]["misdelivered"], 0);
    assert_eq!(report["reference"]["lookups"]["misdelivered"], 0);
    for args in [
        &["--nodes", "18446744073709551615"][..],
        &["--nodes", "1000000000"],
        &["--nodes", "1"],
        &["--lookups", "0"],
        &["--rounds", "99999999"],
        &["--fail", "1.5"],
        &["--leaf-set", "7"],
        &["--bogus"],
    ] {
        let out = Command::new(SIM)
            .args(args)
            .output()
            .expect("simulate runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
