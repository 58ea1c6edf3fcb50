//! Membership against scripted peers, whose every answer the test controls:
//! - failure detection by leases: a leaf-set member that stops answering, without
//!   closing its connections (a host cut off, a process stopped with SIGSTOP), is
//!   declared dead within a few heartbeats, not after a call's long timeout;
//! - consistent routing: a joining node does not act as root before its leaf set
//!   is confirmed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use pastry::message_handler::{Op, Reply, Request};
use pastry::pastry_node::Config;
use pastry::utils::{closer_to, NodeId, NodeInfo};
use serde_json::json;
use support::{start_node, wait_until};

/// What a node alone in its network answers to `ping` and `announce`.
fn alone(me: &NodeInfo, request: &Request) -> Option<Reply> {
    match request {
        Request::Ping => Some(Reply::Pong {
            node_id: me.node_id,
            addr: me.addr,
        }),
        Request::Announce { .. } => Some(Reply::LeafSet {
            node: *me,
            leaf_set: vec![],
            rows: vec![],
        }),
        _ => None,
    }
}

/// How a scripted peer answers a request; `None`: it does not answer.
type Script = Arc<dyn Fn(&NodeInfo, Request) -> Option<Reply> + Send + Sync>;

/// A peer whose answers the test scripts, and can switch off.
struct ScriptedPeer {
    info: NodeInfo,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ScriptedPeer {
    /// A peer that answers `ping` and `announce` as a node with an empty leaf set.
    fn start() -> ScriptedPeer {
        ScriptedPeer::with_script(Arc::new(|me: &NodeInfo, request| match request {
            Request::Ping | Request::Announce { .. } => alone(me, &request),
            _ => Some(Reply::error(
                -32601,
                "the scripted peer only answers ping and announce",
            )),
        }))
    }

    fn with_script(script: Script) -> ScriptedPeer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let info = NodeInfo::new(listener.local_addr().expect("addr"));
        let silent = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (silent.clone(), stop.clone());
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (s, st, script) = (s.clone(), st.clone(), script.clone());
                // Each connection ends when the node closes it (at the latest when
                // the node is shut down at the end of the test).
                std::thread::spawn(move || serve(conn, info, &s, &st, &*script));
            }
        });
        ScriptedPeer {
            info,
            silent,
            stop,
            acceptor: Some(acceptor),
        }
    }
}

impl Drop for ScriptedPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept().
        let _ = TcpStream::connect(self.info.addr);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

fn serve(
    conn: TcpStream,
    me: NodeInfo,
    silent: &AtomicBool,
    stop: &AtomicBool,
    script: &(dyn Fn(&NodeInfo, Request) -> Option<Reply> + Send + Sync),
) {
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
            Err(_) => return,
        }
        if silent.load(Ordering::SeqCst) {
            continue;
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Ok(request) => match script(&me, request) {
                Some(reply) => reply,
                None => continue,
            },
            Err(e) => Reply::error(-32700, format!("{e}")),
        };
        let mut out = serde_json::to_vec(&reply).expect("encode");
        out.push(b'\n');
        if writer.write_all(&out).is_err() {
            return;
        }
    }
}

/// A member that goes silent is declared dead within a few leases, although every
/// call to it would wait a minute for its reply: heartbeats and probes wait no
/// longer than a lease (3 heartbeats of 100 ms here).
#[test]
fn a_member_that_stops_answering_is_declared_dead_within_its_lease() {
    let config = Config {
        tick: Duration::from_millis(100),
        lease_ticks: 3,
        call_timeout: Duration::from_secs(60),
        ..Config::default()
    };
    let node = start_node(config);
    let peer = ScriptedPeer::start();
    let in_leaf_set = || node.node().in_leaf_set(&peer.info.node_id);

    // The peer announces itself, as a joining node does, and answers heartbeats.
    let announce = serde_json::to_value(Request::Announce {
        node: peer.info,
        rows: vec![],
    })
    .expect("encode");
    let reply = pastry::client::request(node.addr(), &announce).expect("announce");
    assert_eq!(reply["type"], "leaf_set", "{reply}");
    assert!(in_leaf_set(), "the announcing peer entered the leaf set");
    // Many leases pass with the peer answering heartbeats: it stays.
    let start = node.node().ticks();
    assert!(
        wait_until(Duration::from_secs(10), || node.node().ticks()
            >= start + 10),
        "the maintenance thread ticks"
    );
    assert!(in_leaf_set(), "a peer that answers keeps its lease");

    peer.silent.store(true, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(20), || !in_leaf_set()),
        "the silent peer was not declared dead within 20 s (a call waits 60 s)"
    );
    drop(node);
}

/// Finds a key whose id is nearer to `a` than to `b`.
fn key_nearer_to(a: &NodeId, b: &NodeId) -> String {
    (0..)
        .map(|i| format!("key-{i}"))
        .find(|k| closer_to(&NodeId::for_key(k), a, b) == std::cmp::Ordering::Less)
        .expect("some key is nearer to a")
}

/// A client's put arrives at a node that is joining, for a key the joining node
/// alone would be root of. It must not be stored there: the node's leaf set is
/// not confirmed, and once it is, the true root turns out to be the bootstrap.
/// The bootstrap is scripted to hold its reply to the join until the put has
/// arrived.
#[test]
fn a_joining_node_does_not_act_as_root_before_its_leaf_set_is_confirmed() {
    let release = Arc::new((Mutex::new(false), Condvar::new()));
    let gate = release.clone();
    let bootstrap = ScriptedPeer::with_script(Arc::new(move |me: &NodeInfo, request| {
        match request {
            Request::Join { node: joiner } => {
                // Hold the join until the test lets it go.
                let (lock, cv) = &*gate;
                let held = cv
                    .wait_timeout_while(lock.lock().expect("lock"), Duration::from_secs(30), |go| {
                        !*go
                    })
                    .expect("wait");
                drop(held);
                let _ = joiner;
                Some(Reply::Joined {
                    root: *me,
                    path: vec![],
                    rows: vec![],
                    leaf_set: vec![],
                    neighborhood: vec![],
                    hops: 0,
                })
            }
            Request::Ping | Request::Announce { .. } => alone(me, &request),
            Request::Forward {
                hops,
                op: Op::Put { key, .. },
            } => Some(Reply::PutOk {
                key_id: NodeId::for_key(&key),
                key,
                owner: me.node_id,
                hops,
                replicas: 1,
            }),
            _ => Some(Reply::error(-32601, "not scripted")),
        }
    }));
    let joiner = std::sync::Arc::new(start_node(support::test_config()));
    let key = key_nearer_to(&bootstrap.info.node_id, &joiner.id());

    let joining = {
        let (j, addr) = (joiner.clone(), bootstrap.info.addr);
        std::thread::spawn(move || j.join(addr).map(|_| ()).map_err(|e| e.to_string()))
    };
    // Wait until the join is under way: the node has marked itself inactive.
    assert!(
        wait_until(Duration::from_secs(10), || !joiner.node().is_active()),
        "the joining node never became inactive"
    );
    let putting = {
        let (addr, key) = (joiner.addr(), key.clone());
        std::thread::spawn(move || {
            pastry::client::request(addr, &json!({"type": "put", "key": key, "value": 1}))
                .expect("put")
        })
    };
    // Give the put every chance to be (wrongly) answered before the join goes on.
    std::thread::sleep(Duration::from_millis(300));
    {
        let (lock, cv) = &*release;
        *lock.lock().expect("lock") = true;
        cv.notify_all();
    }
    joining.join().expect("join thread").expect("join");
    let reply = putting.join().expect("put thread");
    assert_eq!(reply["type"], "put_ok", "{reply}");
    assert_eq!(
        reply["owner"],
        json!(bootstrap.info.node_id),
        "the put was answered by the joining node as root: {reply}"
    );
    assert!(
        joiner.node().store_entry(&key).is_none(),
        "stored at the joiner"
    );
}
