//! Failure detection by leases: a leaf-set member that stops answering, without
//! closing its connections (a host cut off, a process stopped with SIGSTOP), is
//! declared dead within a few heartbeats, not after a call's long timeout.
//!
//! The silent member is a scripted peer: it answers `ping` and `announce` as a
//! node would until the test tells it to go silent; then it keeps reading and
//! never replies.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use pastry::message_handler::{Reply, Request};
use pastry::pastry_node::Config;
use pastry::utils::NodeInfo;
use support::{start_node, wait_until};

/// A peer whose answers the test switches off.
struct ScriptedPeer {
    info: NodeInfo,
    silent: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl ScriptedPeer {
    fn start() -> ScriptedPeer {
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
                let (s, st) = (s.clone(), st.clone());
                // Each connection ends when the node closes it (at the latest when
                // the node is shut down at the end of the test).
                std::thread::spawn(move || serve(conn, info, &s, &st));
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

fn serve(conn: TcpStream, me: NodeInfo, silent: &AtomicBool, stop: &AtomicBool) {
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
            Ok(Request::Ping) => Reply::Pong {
                node_id: me.node_id,
                addr: me.addr,
            },
            Ok(Request::Announce { .. }) => Reply::LeafSet {
                node: me,
                leaf_set: vec![],
                rows: vec![],
            },
            _ => Reply::error(-32601, "the scripted peer only answers ping and announce"),
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
