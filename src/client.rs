//! A small blocking client for the node's line protocol, as `nc` speaks it: for the
//! demo, the tests and benchmarks. Nothing in the node depends on it.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// One kept-open connection to a node.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects to the node at `addr`, with a generous timeout on every read.
    pub fn connect(addr: SocketAddr) -> io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(stream),
        })
    }

    /// Sends one raw line (a `\n` is appended) and returns the reply line, without
    /// its terminator.
    pub fn send_line(&mut self, line: &str) -> io::Result<String> {
        let mut out = Vec::with_capacity(line.len() + 1);
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
        self.reader.get_mut().write_all(&out)?;
        self.read_line()
    }

    /// Reads one reply line.
    pub fn read_line(&mut self) -> io::Result<String> {
        let mut reply = String::new();
        if self.reader.read_line(&mut reply)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            ));
        }
        while reply.ends_with('\n') || reply.ends_with('\r') {
            reply.pop();
        }
        Ok(reply)
    }

    /// Sends a JSON request and parses the reply.
    pub fn request(&mut self, request: &Value) -> io::Result<Value> {
        let line = self.send_line(&request.to_string())?;
        serde_json::from_str(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The underlying stream (e.g. to shut down its sending side).
    pub fn stream(&self) -> &TcpStream {
        self.reader.get_ref()
    }
}

/// Opens a connection, sends one request and returns its reply.
pub fn request(addr: SocketAddr, request: &Value) -> io::Result<Value> {
    Client::connect(addr)?.request(request)
}
