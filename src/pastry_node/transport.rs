//! How a node reaches another: the [`Transport`] trait, and its TCP implementation.
//!
//! The message handlers only ever talk to other nodes through a `Transport`, so the
//! same handlers run over TCP here and over memory in the simulator.
//!
//! The TCP transport keeps an open connection or two per peer and reuses them: a
//! call on a kept-open loopback connection costs one round trip, a fresh connect
//! costs about twice that. What it keeps is bounded in total, least recently used
//! closed first: each kept connection holds a descriptor here and a descriptor and
//! a thread at the peer, so a node that has called thousands of peers must not
//! keep them all. Every connect, read and write has a timeout, so no thread waits
//! on a silent peer forever; the caller reports such a peer to maintenance.

use std::collections::VecDeque;
use std::fmt;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::server::{read_line_limited, LineRead};
use super::Config;
use crate::message_handler::{Reply, Request};
use crate::utils::NodeInfo;

/// Why a call to a peer failed.
#[derive(Debug)]
pub enum TransportError {
    /// The peer could not be reached, or the connection broke or timed out.
    Io(std::io::Error),
    /// The peer answered something that is not a reply line.
    Protocol(String),
    /// The peer at that address is not the node we expected.
    WrongNode(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // A read that times out surfaces as WouldBlock ("Resource temporarily
            // unavailable") on Linux: say what it means.
            TransportError::Io(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                write!(f, "no answer in time ({e})")
            }
            TransportError::Io(e) => write!(f, "{e}"),
            TransportError::Protocol(m) => write!(f, "protocol error: {m}"),
            TransportError::WrongNode(m) => write!(f, "wrong node: {m}"),
        }
    }
}

impl std::error::Error for TransportError {}

impl From<std::io::Error> for TransportError {
    fn from(e: std::io::Error) -> Self {
        TransportError::Io(e)
    }
}

/// A way to send a request to another node and wait for its one reply.
pub trait Transport: Send + Sync {
    /// Sends `request` to `to` and returns its reply.
    fn call(&self, to: &NodeInfo, request: &Request) -> Result<Reply, TransportError>;

    /// Like [`Transport::call`], and also returns the proximity of `to` that the
    /// exchange measured (over TCP its round trip, in microseconds, connecting
    /// excluded). A node measures a peer with a message it sends anyway instead of
    /// a separate probe.
    fn call_measured(
        &self,
        to: &NodeInfo,
        request: &Request,
    ) -> Result<(Reply, u64), TransportError>;

    /// Measures the proximity of `to` (smaller = nearer) and checks that it is the
    /// node it claims to be. Over TCP: the round-trip time of a `ping`, in
    /// microseconds. In the simulator: a distance in the simulated plane.
    fn proximity(&self, to: &NodeInfo) -> Result<u64, TransportError>;

    /// [`Transport::proximity`], waiting at most `timeout` for the answer: how the
    /// maintenance thread probes, so that a peer that takes connections but never
    /// answers costs it no more than a lease. The default ignores `timeout`, as
    /// the simulator may: its dead nodes fail at once.
    fn proximity_within(&self, to: &NodeInfo, timeout: Duration) -> Result<u64, TransportError> {
        let _ = timeout;
        self.proximity(to)
    }

    /// [`Transport::proximity_within`] for each of `peers`, all at once where the
    /// transport can (over TCP, pings in parallel), in order.
    fn proximity_all(
        &self,
        peers: &[NodeInfo],
        timeout: Duration,
    ) -> Vec<Result<u64, TransportError>> {
        peers
            .iter()
            .map(|p| self.proximity_within(p, timeout))
            .collect()
    }

    /// Makes each call of `calls` as [`Transport::call_measured`] does, waiting at
    /// most `timeout` for each reply, and returns their results in order. A node
    /// uses it to reach many peers at once (its heartbeat to the leaf set, a
    /// joiner's announcements), so that one silent peer delays the others by no
    /// more than `timeout`. This default makes the calls one after another with
    /// the transport's own timeout, as the simulator wants: deterministic, and its
    /// dead nodes fail at once.
    fn call_all(
        &self,
        calls: &[(NodeInfo, Request)],
        timeout: Duration,
    ) -> Vec<Result<(Reply, u64), TransportError>> {
        let _ = timeout;
        calls
            .iter()
            .map(|(to, request)| self.call_measured(to, request))
            .collect()
    }
}

/// At most this many idle connections are kept per peer. One carries the steady
/// traffic (a heartbeat per tick, forwards one at a time); the second spares a
/// reconnect when two calls to the same peer overlap, as a forward and a
/// heartbeat often do. Calls beyond that open connections of their own, which
/// are closed when they come back.
pub const IDLE_PER_PEER: usize = 2;

/// At most this many idle connections are kept in all, per node; the least
/// recently used is closed to make room. Each costs a descriptor here and a
/// descriptor and a thread at the peer. Twice |L| = 16: the leaf set, called
/// at every heartbeat, and as many others, the routing-table entries used
/// most lately; a peer called less often than that is connected to afresh,
/// one more round trip. A node that has called hundreds of peers (a busy
/// router, a joiner) holds no more than this. 64 held 60 demo nodes in one
/// process at 6,800 descriptors and 3,500 threads, 32 at 3,700 and 2,000, and
/// only 32 lets the 200-node demo fit within a limit of 20,000 open files.
pub const MAX_IDLE: usize = 32;

/// The stack of each thread a node starts per connection or per parallel call.
/// Rust's default is 2 MiB; glibc keeps about 40 MiB of freed stacks for reuse,
/// so at 2 MiB only some 20 are reused and every further thread costs an `mmap`
/// and a `munmap`, which take the process's memory-map lock and interrupt the
/// other cores (TLB shootdowns). With 100 nodes in one process (the demo) that,
/// not Pastry, took most of the CPU. These threads parse at most a line (64
/// levels of nesting) and route it: 256 KiB is ample.
pub(crate) const THREAD_STACK: usize = 256 * 1024;

/// At most this many calls of one [`Transport::call_all`] are in flight at once
/// over TCP (each has a thread of its own).
const PARALLEL_CALLS: usize = 16;

struct Conn {
    reader: BufReader<TcpStream>,
    /// The socket's read timeout now, so that it is set only when a call wants
    /// another one.
    read_timeout: Duration,
}

/// The TCP transport: newline-delimited JSON over pooled connections.
pub struct TcpTransport {
    /// The idle connections and their peers, least recently used first. A list
    /// of at most [`MAX_IDLE`] is scanned faster than a map is kept in order.
    pool: Mutex<VecDeque<(SocketAddr, Conn)>>,
    connect_timeout: Duration,
    call_timeout: Duration,
    max_line: usize,
}

impl TcpTransport {
    pub fn new(config: &Config) -> TcpTransport {
        TcpTransport {
            pool: Mutex::new(VecDeque::new()),
            connect_timeout: config.connect_timeout,
            call_timeout: config.call_timeout,
            max_line: config.max_line,
        }
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, VecDeque<(SocketAddr, Conn)>> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection to `addr`, if any.
    fn take_idle(&self, addr: &SocketAddr) -> Option<Conn> {
        let mut pool = self.pool();
        let at = pool.iter().rposition(|(a, _)| a == addr)?;
        pool.remove(at).map(|(_, conn)| conn)
    }

    /// Keeps `conn` for the next call to `addr`, or closes it if `addr` has
    /// [`IDLE_PER_PEER`] already; closes the least recently used connection if
    /// the pool is full. Connections are closed after the lock is released.
    fn put_idle(&self, addr: SocketAddr, conn: Conn) {
        let closed = {
            let mut pool = self.pool();
            if pool.iter().filter(|(a, _)| *a == addr).count() >= IDLE_PER_PEER {
                Some(conn)
            } else {
                let evicted = match pool.len() >= MAX_IDLE {
                    true => pool.pop_front().map(|(_, c)| c),
                    false => None,
                };
                pool.push_back((addr, conn));
                evicted
            }
        };
        drop(closed);
    }

    /// Closes every idle connection to `addr`: once one has timed out, the others
    /// most likely lead to the same silent peer, and each would cost a timeout.
    fn drop_idle(&self, addr: &SocketAddr) {
        let closed = {
            let mut pool = self.pool();
            let (gone, kept): (VecDeque<_>, _) = std::mem::take(&mut *pool)
                .into_iter()
                .partition(|(a, _)| a == addr);
            *pool = kept;
            gone
        };
        drop(closed);
    }

    /// Closes every pooled connection (at shutdown).
    pub fn close_all(&self) {
        let closed = std::mem::take(&mut *self.pool());
        drop(closed);
    }

    fn connect(&self, addr: &SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(addr, self.connect_timeout.min(timeout))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(self.call_timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream),
            read_timeout: timeout,
        })
    }

    fn exchange(
        &self,
        conn: &mut Conn,
        line: &[u8],
        timeout: Duration,
    ) -> Result<Reply, TransportError> {
        if conn.read_timeout != timeout {
            conn.reader.get_ref().set_read_timeout(Some(timeout))?;
            conn.read_timeout = timeout;
        }
        conn.reader.get_mut().write_all(line)?;
        let mut buf = Vec::new();
        let limit = self.max_line + super::server::NODE_LINE_HEADROOM;
        match read_line_limited(&mut conn.reader, &mut buf, limit)? {
            LineRead::Line => serde_json::from_slice(&buf)
                .map_err(|e| TransportError::Protocol(format!("unreadable reply: {e}"))),
            LineRead::Eof => Err(TransportError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by peer",
            ))),
            LineRead::TooLong => Err(TransportError::Protocol("reply line too long".into())),
        }
    }

    /// One call, waiting at most `timeout` for the reply; returns the reply and
    /// the round trip in microseconds, connecting excluded.
    fn call_within(
        &self,
        to: &NodeInfo,
        request: &Request,
        timeout: Duration,
    ) -> Result<(Reply, u64), TransportError> {
        let micros = |start: Instant| (start.elapsed().as_micros() as u64).max(1);
        let mut line = serde_json::to_vec(request)
            .map_err(|e| TransportError::Protocol(format!("cannot encode request: {e}")))?;
        line.push(b'\n');
        // A pooled connection may have been closed by the peer since its last use;
        // then the request is sent once more on a fresh connection. Requests are
        // safe to repeat: a put stores the same value, a get reads it again.
        if let Some(mut conn) = self.take_idle(&to.addr) {
            let start = Instant::now();
            match self.exchange(&mut conn, &line, timeout) {
                Ok(reply) => {
                    let rtt = micros(start);
                    self.put_idle(to.addr, conn);
                    return Ok((reply, rtt));
                }
                // A peer that let the whole timeout pass is not asked twice.
                Err(TransportError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    self.drop_idle(&to.addr);
                    return Err(TransportError::Io(e));
                }
                Err(_) => {}
            }
        }
        let mut conn = self.connect(&to.addr, timeout)?;
        let start = Instant::now();
        let reply = self.exchange(&mut conn, &line, timeout)?;
        let rtt = micros(start);
        self.put_idle(to.addr, conn);
        Ok((reply, rtt))
    }
}

impl Transport for TcpTransport {
    fn call(&self, to: &NodeInfo, request: &Request) -> Result<Reply, TransportError> {
        self.call_within(to, request, self.call_timeout)
            .map(|(reply, _)| reply)
    }

    fn call_measured(
        &self,
        to: &NodeInfo,
        request: &Request,
    ) -> Result<(Reply, u64), TransportError> {
        self.call_within(to, request, self.call_timeout)
    }

    fn call_all(
        &self,
        calls: &[(NodeInfo, Request)],
        timeout: Duration,
    ) -> Vec<Result<(Reply, u64), TransportError>> {
        let timeout = timeout.min(self.call_timeout);
        if calls.len() <= 1 {
            return calls
                .iter()
                .map(|(to, request)| self.call_within(to, request, timeout))
                .collect();
        }
        let mut results = Vec::with_capacity(calls.len());
        for group in calls.chunks(PARALLEL_CALLS) {
            std::thread::scope(|s| {
                // A thread that cannot be had (the process is at its limit) is not
                // a reason to fail: that call is made here, after the others.
                let calls: Vec<_> = group
                    .iter()
                    .map(|(to, request)| {
                        std::thread::Builder::new()
                            .stack_size(THREAD_STACK)
                            .spawn_scoped(s, move || self.call_within(to, request, timeout))
                            .map_err(|_| (to, request))
                    })
                    .collect();
                for call in calls {
                    results.push(match call {
                        Ok(thread) => thread.join().unwrap_or_else(|_| {
                            Err(TransportError::Protocol(
                                "the calling thread panicked".into(),
                            ))
                        }),
                        Err((to, request)) => self.call_within(to, request, timeout),
                    });
                }
            });
        }
        results
    }

    fn proximity(&self, to: &NodeInfo) -> Result<u64, TransportError> {
        self.proximity_within(to, self.call_timeout)
    }

    fn proximity_all(
        &self,
        peers: &[NodeInfo],
        timeout: Duration,
    ) -> Vec<Result<u64, TransportError>> {
        let calls: Vec<(NodeInfo, Request)> = peers.iter().map(|p| (*p, Request::Ping)).collect();
        self.call_all(&calls, timeout)
            .into_iter()
            .zip(peers)
            .map(|(answer, to)| pong_from(to, answer?))
            .collect()
    }

    fn proximity_within(&self, to: &NodeInfo, timeout: Duration) -> Result<u64, TransportError> {
        pong_from(
            to,
            self.call_within(to, &Request::Ping, timeout.min(self.call_timeout))?,
        )
    }
}

/// The round trip of a `ping` answered by `to`, if it answered as that node.
fn pong_from(to: &NodeInfo, answer: (Reply, u64)) -> Result<u64, TransportError> {
    match answer {
        (Reply::Pong { node_id, .. }, rtt) if node_id == to.node_id => Ok(rtt),
        (Reply::Pong { node_id, .. }, _) => Err(TransportError::WrongNode(format!(
            "{} answers as {node_id}, expected {}",
            to.addr, to.node_id
        ))),
        (other, _) => Err(TransportError::Protocol(format!(
            "expected pong, got {other:?}"
        ))),
    }
}
