//! The listener: one thread per accepted connection, newline-delimited JSON.
//!
//! Framing, as the client protocol promises: one JSON object per line, `\n` or
//! `\r\n`, blank lines ignored; every request gets exactly one reply line, in order;
//! when the client closes its sending side the node answers what it has and closes.
//! A line longer than the limit gets an error and the connection is closed: the node
//! never buffers more than the limit for one line.
//!
//! Shutdown sets a flag, wakes the thread blocked in `accept` by connecting to our
//! own address, and shuts down every open connection so that its thread returns
//! from its read; then every thread is joined.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::transport::{Transport, MAX_IDLE};
use super::Node;
use crate::message_handler::{code, decode, encode, handle, Reply};

/// How reading one line ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A line is in the buffer, terminator removed.
    Line,
    /// The peer closed its sending side before a new line began.
    Eof,
    /// The line exceeded the limit; the rest of it was not read.
    TooLong,
}

/// Reads one line of at most `limit` bytes (terminator excluded) into `buf`,
/// stripping `\n` or `\r\n`. A last line without a terminator counts as a line.
pub fn read_line_limited<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
) -> io::Result<LineRead> {
    read_line_with(reader, buf, limit, |_| Ok(()))
}

/// [`read_line_limited`], calling `mid_line` each time it is about to wait for
/// more of a line it has begun (the part received is in `buf`, nothing is
/// buffered): the server shortens the read timeout there. An error from
/// `mid_line` ends the read with that error.
pub fn read_line_with<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    limit: usize,
    mut mid_line: impl FnMut(&mut R) -> io::Result<()>,
) -> io::Result<LineRead> {
    buf.clear();
    loop {
        if !buf.is_empty() {
            mid_line(reader)?;
        }
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (&available[..i], i + 1),
            None => (available, available.len()),
        };
        // The limit includes a possible `\r` that is stripped below.
        if buf.len() + chunk.len() > limit + 1 {
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(chunk);
        let found = done > chunk.len();
        reader.consume(done);
        if found {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            if buf.len() > limit {
                return Ok(LineRead::TooLong);
            }
            return Ok(LineRead::Line);
        }
    }
}

/// The running listener and its connection threads.
pub struct Server {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Connections>,
}

#[derive(Default)]
struct Connections {
    next: AtomicU64,
    /// Each open stream, shared with the thread that serves it, to shut it down
    /// when the node stops. Shared rather than cloned: a clone is one more
    /// descriptor per connection, and a node serves hundreds.
    open: Mutex<HashMap<u64, Arc<TcpStream>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Server {
    /// Serves `node` on `listener` until [`Server::shutdown`].
    pub fn start(
        listener: TcpListener,
        node: Node,
        transport: Arc<dyn Transport>,
    ) -> io::Result<Server> {
        let addr = listener.local_addr()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Connections::default());
        let accept = {
            let stopping = stopping.clone();
            let conns = conns.clone();
            std::thread::Builder::new()
                .name(format!("accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, node, transport, stopping, conns))?
        };
        Ok(Server {
            addr,
            stopping,
            accept: Some(accept),
            conns,
        })
    }

    /// Stops accepting, closes every connection and joins every thread.
    pub fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop. If the connect fails the listener is already gone.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(500));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .conns
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let threads =
            std::mem::take(&mut *self.conns.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    node: Node,
    transport: Arc<dyn Transport>,
    stopping: Arc<AtomicBool>,
    conns: Arc<Connections>,
) {
    for stream in listener.incoming() {
        if stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                log::warn!("accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // One thread per connection: a bound on connections is a bound on threads.
        let open = conns.open.lock().unwrap_or_else(|e| e.into_inner()).len();
        if open >= node.config().max_connections {
            node.count_error();
            let reply = Reply::error(
                code::BUSY,
                format!("busy: this node already serves {open} connections; try again later or another node"),
            );
            let mut s = &stream;
            let _ = s.write_all(&encode(&reply, None));
            continue;
        }
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        let stream = Arc::new(stream);
        conns
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, stream.clone());
        let (node, transport, conns2) = (node.clone(), transport.clone(), conns.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .stack_size(super::transport::THREAD_STACK)
            .spawn(move || {
                node.connection_opened();
                serve_connection(&stream, &node, transport.as_ref());
                node.connection_closed();
                conns2
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        let mut threads = conns.threads.lock().unwrap_or_else(|e| e.into_inner());
        // Forget threads that have finished, so the list does not grow forever.
        threads.retain(|t| !t.is_finished());
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                log::warn!("cannot start a connection thread: {e}");
                // Nobody serves it: close it now, or its entry would keep it open.
                drop(threads);
                conns
                    .open
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            }
        }
    }
}

/// Descriptors a node holds besides one for each connection it serves: its
/// listener, the idle connections its transport keeps, the calls it has in
/// flight (a heartbeat makes up to 16 at once) and the process's own
/// (standard streams, the log).
pub const NODE_DESCRIPTORS: u64 = 1 + MAX_IDLE as u64 + 16 + 32;

/// The process's limits on open files, soft and hard (`ulimit -n` shows the
/// soft one, and may raise it up to the hard one), read from
/// `/proc/self/limits`: `None` where that cannot be read (not Linux). Each
/// connection a node serves or keeps costs a descriptor, so a program can
/// check before it starts nodes that it will not run out halfway.
pub fn open_file_limits() -> Option<(u64, u64)> {
    parse_open_file_limits(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The "Max open files" line of a `/proc/<pid>/limits` text; "unlimited" is
/// `u64::MAX`.
fn parse_open_file_limits(limits: &str) -> Option<(u64, u64)> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let value = |v: &str| match v {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    };
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((value(fields.next()?)?, value(fields.next()?)?))
}

/// Room kept free in every line limit for what nodes add to a client's request
/// as it travels: a `forward` wraps it, a reply adds the owner and hop count.
pub const NODE_LINE_HEADROOM: usize = 64 * 1024;

/// Answers every line on one connection until the client closes it.
fn serve_connection(stream: &TcpStream, node: &Node, transport: &dyn Transport) {
    let _ = stream.set_nodelay(true);
    // A client that says nothing is let go after the client timeout, so that
    // it cannot hold a thread forever; one that has begun a line must finish
    // it within the (shorter) line timeout, however slowly it trickles in.
    //
    // Other nodes are held to the same timeout, and need no shorter one: a node
    // keeps at most `transport::MAX_IDLE` idle connections and closes the ones
    // it evicts, which ends their threads here at once. So what idle peers hold
    // here is bounded by their pools, and the timeout only reclaims connections
    // whose node vanished without closing them. Closing a connection a peer
    // still keeps costs it no error: its next call finds it closed and is sent
    // again on a fresh one.
    let idle = node.config().client_timeout;
    let line_timeout = node.config().line_timeout;
    let _ = stream.set_read_timeout(Some(idle));
    let _ = stream.set_write_timeout(Some(idle));
    // Reads and writes share the one descriptor (`&TcpStream` is both `Read`
    // and `Write`) instead of a clone each.
    let mut writer = stream;
    let limit = node.config().max_line;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        // Set when a line arrives in pieces: the time by which it must be whole.
        // A line that arrives in one piece (nearly all) costs no system call here.
        let mut deadline: Option<Instant> = None;
        let read = read_line_with(&mut reader, &mut line, limit, |r| {
            let by = *deadline.get_or_insert_with(|| Instant::now() + line_timeout);
            let left = by.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "line not finished within the line timeout",
                ));
            }
            r.get_ref().set_read_timeout(Some(left.min(idle)))
        });
        if deadline.is_some() {
            let _ = reader.get_ref().set_read_timeout(Some(idle));
        }
        let reply = match read {
            Ok(LineRead::Line) if line.iter().all(u8::is_ascii_whitespace) => continue,
            Ok(LineRead::Line) => match decode(&line) {
                Ok(envelope) => encode(&handle(node, envelope.request, transport), envelope.id),
                Err(rejection) => {
                    node.count_error();
                    encode(&rejection.reply(), rejection.id)
                }
            },
            Ok(LineRead::TooLong) => {
                node.count_error();
                let reply = Reply::error(
                    code::LINE_TOO_LONG,
                    format!("line longer than {limit} bytes; closing the connection"),
                );
                let _ = writer.write_all(&encode(&reply, None));
                return;
            }
            Ok(LineRead::Eof) | Err(_) => return,
        };
        if writer.write_all(&reply).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], limit: usize) -> Vec<(LineRead, String)> {
        let mut r = BufReader::with_capacity(4, input);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let res = read_line_limited(&mut r, &mut buf, limit).unwrap();
            let stop = res != LineRead::Line;
            out.push((res, String::from_utf8_lossy(&buf).into_owned()));
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn open_file_limits_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63445                63445                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_file_limits(limits), Some((1024, 524288)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(
            parse_open_file_limits(unlimited),
            Some((u64::MAX, u64::MAX))
        );
        assert_eq!(
            parse_open_file_limits("Max processes 10 10 processes\n"),
            None
        );
        assert_eq!(
            parse_open_file_limits("Max open files  many  files\n"),
            None
        );
        if cfg!(target_os = "linux") {
            assert!(open_file_limits().is_some());
        }
    }

    #[test]
    fn framing() {
        use LineRead::*;
        assert_eq!(
            lines(b"ab\r\ncd\n\nlast", 10),
            [
                (Line, "ab".into()),
                (Line, "cd".into()),
                (Line, "".into()),
                (Line, "last".into()),
                (Eof, "".into())
            ]
        );
        assert_eq!(lines(b"abcdefgh\n", 5).last().unwrap().0, TooLong);
        assert_eq!(lines(b"abcde\r\n", 5)[0], (Line, "abcde".into()));
        assert_eq!(lines(b"abcdef\r\n", 5)[0].0, TooLong);
    }
}
