//! How a node reaches another: the [`Transport`] trait, and its TCP implementation.
//!
//! The message handlers only ever talk to other nodes through a `Transport`, so the
//! same handlers run over TCP here and over memory in the simulator.
//!
//! The TCP transport keeps a few open connections per peer and reuses them: a call
//! on a kept-open loopback connection costs one round trip, a fresh connect costs
//! about twice that. Every connect, read and write has a timeout, so no thread waits
//! on a silent peer forever; the caller reports such a peer to maintenance.

use std::collections::HashMap;
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
}

/// At most this many idle connections are kept per peer.
const IDLE_PER_PEER: usize = 4;

struct Conn {
    reader: BufReader<TcpStream>,
}

/// The TCP transport: newline-delimited JSON over pooled connections.
pub struct TcpTransport {
    pool: Mutex<HashMap<SocketAddr, Vec<Conn>>>,
    connect_timeout: Duration,
    call_timeout: Duration,
    max_line: usize,
}

impl TcpTransport {
    pub fn new(config: &Config) -> TcpTransport {
        TcpTransport {
            pool: Mutex::new(HashMap::new()),
            connect_timeout: config.connect_timeout,
            call_timeout: config.call_timeout,
            max_line: config.max_line,
        }
    }

    fn take_idle(&self, addr: &SocketAddr) -> Option<Conn> {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.get_mut(addr).and_then(|v| v.pop())
    }

    fn put_idle(&self, addr: SocketAddr, conn: Conn) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let v = pool.entry(addr).or_default();
        if v.len() < IDLE_PER_PEER {
            v.push(conn);
        }
    }

    /// Closes every pooled connection (at shutdown).
    pub fn close_all(&self) {
        self.pool.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn connect(&self, addr: &SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(addr, self.connect_timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(self.call_timeout))?;
        stream.set_write_timeout(Some(self.call_timeout))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    fn exchange(&self, conn: &mut Conn, line: &[u8]) -> Result<Reply, TransportError> {
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
}

impl Transport for TcpTransport {
    fn call(&self, to: &NodeInfo, request: &Request) -> Result<Reply, TransportError> {
        self.call_measured(to, request).map(|(reply, _)| reply)
    }

    fn call_measured(
        &self,
        to: &NodeInfo,
        request: &Request,
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
            match self.exchange(&mut conn, &line) {
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
                    return Err(TransportError::Io(e));
                }
                Err(_) => {}
            }
        }
        let mut conn = self.connect(&to.addr)?;
        let start = Instant::now();
        let reply = self.exchange(&mut conn, &line)?;
        let rtt = micros(start);
        self.put_idle(to.addr, conn);
        Ok((reply, rtt))
    }

    fn proximity(&self, to: &NodeInfo) -> Result<u64, TransportError> {
        match self.call_measured(to, &Request::Ping)? {
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
}
