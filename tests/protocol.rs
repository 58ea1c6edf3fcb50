//! The wire protocol as a client (or a misbehaving peer) sees it: one JSON object
//! per line over TCP, exactly one reply line per request, JSON-RPC error codes,
//! `id` echo, framing (`\r\n`, blank lines, half-close, the line limit), aliases,
//! and forged node-to-node messages.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use pastry::message_handler::request_types;
use pastry::utils::{NodeId, NodeInfo, MAX_HOPS};
use serde_json::{json, Value};
use support::{error_code, id_field, parse, rpc, LocalCluster, Raw};

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const UNKNOWN_TYPE: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const HOP_CAP: i64 = -32002;
const LINE_TOO_LONG: i64 = -32003;
const BAD_NODE: i64 = -32004;

/// The default line limit: 1 MiB, terminator excluded.
const LIMIT: usize = 1 << 20;

/// Sends each line on one connection and checks the error code, then checks that
/// the connection still answers a ping.
fn assert_errors(c: &LocalCluster, cases: &[(&str, i64)]) {
    let mut conn = Raw::connect(c.addr(0));
    for (line, want) in cases {
        let r = conn.send(line);
        assert_eq!(error_code(&r), *want, "{line} -> {r}");
        let message = r["message"].as_str().unwrap_or_else(|| panic!("{r}"));
        assert!(!message.is_empty(), "{r}");
        conn.assert_usable();
    }
}

#[test]
fn malformed_json_is_a_parse_error() {
    let c = LocalCluster::new(1);
    assert_errors(
        &c,
        &[
            ("{", PARSE_ERROR),
            ("not json", PARSE_ERROR),
            ("{\"type\":\"ping\"", PARSE_ERROR),
            ("{\"type\":\"ping\"}}", PARSE_ERROR),
            ("{\"type\":\"ping\"} {\"type\":\"ping\"}", PARSE_ERROR),
            ("{'type':'ping'}", PARSE_ERROR),
            ("{\"type\":\"ping\",}", PARSE_ERROR),
        ],
    );
    // Bytes that are not UTF-8 at all.
    let mut conn = Raw::connect(c.addr(0));
    conn.write(b"{\"type\":\"\xff\xfe\"}\n");
    let r = conn.read();
    assert_eq!(error_code(&r), PARSE_ERROR, "{r}");
    assert!(
        r.get("id").is_none(),
        "nothing to echo in an unreadable line: {r}"
    );
    conn.assert_usable();
}

#[test]
fn non_objects_and_missing_type_are_invalid_requests() {
    let c = LocalCluster::new(1);
    assert_errors(
        &c,
        &[
            ("[1,2]", INVALID_REQUEST),
            ("[{\"type\":\"ping\"}]", INVALID_REQUEST),
            ("\"ping\"", INVALID_REQUEST),
            ("42", INVALID_REQUEST),
            ("null", INVALID_REQUEST),
            ("true", INVALID_REQUEST),
            ("{}", INVALID_REQUEST),
            ("{\"key\":\"a\",\"value\":1}", INVALID_REQUEST),
            ("{\"type\":5}", INVALID_REQUEST),
            ("{\"type\":null}", INVALID_REQUEST),
            ("{\"type\":[\"ping\"]}", INVALID_REQUEST),
        ],
    );
    // An object's id is echoed even when its type is missing.
    let r = rpc(c.addr(0), &json!({"id": 9}));
    assert_eq!(error_code(&r), INVALID_REQUEST, "{r}");
    assert_eq!(r["id"], 9, "{r}");
}

#[test]
fn unknown_type_lists_the_valid_types() {
    let c = LocalCluster::new(1);
    assert_errors(
        &c,
        &[
            ("{\"type\":\"fly\"}", UNKNOWN_TYPE),
            ("{\"type\":\"PING\"}", UNKNOWN_TYPE),
            ("{\"type\":\"\"}", UNKNOWN_TYPE),
            (
                "{\"type\":\"put \",\"key\":\"a\",\"value\":1}",
                UNKNOWN_TYPE,
            ),
        ],
    );
    let r = rpc(c.addr(0), &json!({"type": "fly", "id": "x1"}));
    assert_eq!(error_code(&r), UNKNOWN_TYPE, "{r}");
    assert_eq!(r["id"], "x1", "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("fly"),
        "the message names the bad type: {message}"
    );
    for t in [
        "ping", "help", "put", "store", "get", "lookup", "delete", "route", "status", "stats",
    ] {
        assert!(
            message.contains(t),
            "message does not list {t:?}: {message}"
        );
    }
    for t in request_types() {
        assert!(
            message.contains(t),
            "message does not list {t:?}: {message}"
        );
    }
}

#[test]
fn missing_or_wrong_fields_are_invalid_params() {
    let c = LocalCluster::new(1);
    assert_errors(
        &c,
        &[
            ("{\"type\":\"put\",\"key\":\"a\"}", INVALID_PARAMS),
            ("{\"type\":\"put\",\"value\":1}", INVALID_PARAMS),
            ("{\"type\":\"store\",\"key\":\"a\"}", INVALID_PARAMS),
            ("{\"type\":\"put\",\"key\":5,\"value\":1}", INVALID_PARAMS),
            ("{\"type\":\"put\",\"key\":null,\"value\":1}", INVALID_PARAMS),
            ("{\"type\":\"put\",\"key\":[\"a\"],\"value\":1}", INVALID_PARAMS),
            ("{\"type\":\"put\",\"key\":\"\",\"value\":1}", INVALID_PARAMS),
            ("{\"type\":\"get\"}", INVALID_PARAMS),
            ("{\"type\":\"get\",\"key\":\"\"}", INVALID_PARAMS),
            ("{\"type\":\"get\",\"key\":{\"a\":1}}", INVALID_PARAMS),
            ("{\"type\":\"lookup\",\"key\":7}", INVALID_PARAMS),
            ("{\"type\":\"delete\"}", INVALID_PARAMS),
            ("{\"type\":\"delete\",\"key\":\"\"}", INVALID_PARAMS),
            ("{\"type\":\"route\",\"key\":\"\"}", INVALID_PARAMS),
            ("{\"type\":\"route\",\"key\":false}", INVALID_PARAMS),
            ("{\"type\":\"forward\",\"hops\":1}", INVALID_PARAMS),
            (
                "{\"type\":\"forward\",\"hops\":-1,\"op\":{\"type\":\"get\",\"key\":\"a\"}}",
                INVALID_PARAMS,
            ),
            (
                "{\"type\":\"forward\",\"hops\":\"1\",\"op\":{\"type\":\"get\",\"key\":\"a\"}}",
                INVALID_PARAMS,
            ),
            (
                "{\"type\":\"forward\",\"hops\":1,\"op\":{\"type\":\"get\",\"key\":\"\"}}",
                INVALID_PARAMS,
            ),
            ("{\"type\":\"announce\"}", INVALID_PARAMS),
            (
                "{\"type\":\"announce\",\"node\":{\"node_id\":\"ABC\",\"addr\":\"127.0.0.1:9\"}}",
                INVALID_PARAMS,
            ),
            (
                "{\"type\":\"join\",\"node\":{\"node_id\":\"a9993e364706816aba3e25717850c26c9cd0d89d\",\"addr\":\"nowhere\"}}",
                INVALID_PARAMS,
            ),
        ],
    );
    // The id is echoed on these errors too, and the message names the field.
    let r = rpc(c.addr(0), &json!({"type": "put", "key": "a", "id": [1, 2]}));
    assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
    assert_eq!(r["id"], json!([1, 2]), "{r}");
    assert!(r["message"].as_str().unwrap().contains("value"), "{r}");
    // Nothing was stored by any of them.
    assert_eq!(c.node(0).node().key_count(), 0);
}

/// Any JSON value given as `id` comes back unchanged, on successes and errors; a
/// request without `id` gets a reply without one.
#[test]
fn id_is_echoed_whatever_its_type() {
    let c = LocalCluster::new(3);
    let ids = [
        json!(7),
        json!(-1.5),
        json!("abc"),
        json!(""),
        json!(null),
        json!(true),
        json!([1, "two", null]),
        json!({"nested": {"id": 1}}),
        json!(u64::MAX),
    ];
    let mut conn = Raw::connect(c.addr(1));
    for id in &ids {
        let requests = [
            json!({"type": "ping", "id": id}),
            json!({"type": "put", "key": "echo", "value": id, "id": id}),
            json!({"type": "get", "key": "echo", "id": id}),
            json!({"type": "route", "key": "echo", "id": id}),
            json!({"type": "nope", "id": id}),
            json!({"type": "get", "id": id}),
            json!({"id": id}),
        ];
        for req in &requests {
            let r = conn.request(req);
            assert!(r.get("id").is_some(), "no id in the reply to {req}: {r}");
            assert_eq!(&r["id"], id, "{req} -> {r}");
        }
        let g = conn.request(&json!({"type": "get", "key": "echo", "id": id}));
        assert_eq!(&g["value"], id, "{g}");
    }
    for req in [
        json!({"type": "ping"}),
        json!({"type": "get", "key": "echo"}),
    ] {
        let r = conn.request(&req);
        assert!(r.get("id").is_none(), "{req} had no id, the reply has: {r}");
    }
}

/// Requests written all at once on one connection are answered one line each, in
/// order, including the errors among them.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let c = LocalCluster::new(5);
    let n = 300;
    let mut batch = String::new();
    for i in 0..n {
        let line = match i % 5 {
            0 => json!({"type": "put", "key": format!("p{i}"), "value": i, "id": i}).to_string(),
            1 => json!({"type": "get", "key": format!("p{}", i - 1), "id": i}).to_string(),
            2 => json!({"type": "ping", "id": i}).to_string(),
            3 => format!("{{\"type\":\"fly\",\"id\":{i}}}"),
            _ => json!({"type": "route", "key": format!("p{i}"), "id": i}).to_string(),
        };
        batch.push_str(&line);
        batch.push('\n');
    }
    let mut conn = Raw::connect(c.addr(2));
    let stream = conn.client.stream().try_clone().unwrap();
    // Write from another thread, so that neither side can block the other.
    let writer = std::thread::spawn(move || (&stream).write_all(batch.as_bytes()));
    for i in 0..n {
        let r = conn.read();
        assert_eq!(r["id"], i, "reply {i} out of order: {r}");
        let want = ["put_ok", "value", "pong", "error", "route"][i % 5];
        assert_eq!(r["type"], want, "{r}");
        if i % 5 == 1 {
            assert_eq!(r["value"], i - 1, "{r}");
        }
    }
    writer.join().unwrap().unwrap();
    conn.assert_usable();
}

/// `\r\n` ends a line like `\n`; blank and whitespace-only lines get no reply.
#[test]
fn crlf_is_accepted_and_blank_lines_are_ignored() {
    let c = LocalCluster::new(1);
    let mut conn = Raw::connect(c.addr(0));
    conn.write(b"{\"type\":\"ping\",\"id\":1}\r\n");
    let r = conn.read();
    assert_eq!(
        (r["type"].as_str(), r["id"].as_i64()),
        (Some("pong"), Some(1)),
        "{r}"
    );
    conn.write(
        b"\n\r\n   \n\t\r\n{\"type\":\"put\",\"key\":\"crlf\",\"value\":\"v\",\"id\":2}\r\n\n",
    );
    conn.write(b"{\"type\":\"get\",\"key\":\"crlf\",\"id\":3}\r\n");
    let r = conn.read();
    assert_eq!(r["id"], 2, "a blank line was answered: {r}");
    assert_eq!(r["type"], "put_ok", "{r}");
    let r = conn.read();
    assert_eq!(r["id"], 3, "{r}");
    assert_eq!(r["value"], "v", "the \\r is not part of the value: {r}");
    // The key is "crlf", not "crlf\r": the terminator is stripped before parsing.
    assert_eq!(c.node(0).node().store_get("crlf"), Some(json!("v")));
}

#[test]
fn store_and_lookup_are_aliases_of_put_and_get() {
    let c = LocalCluster::new(3);
    let r = rpc(
        c.addr(0),
        &json!({"type": "store", "key": "alias", "value": {"x": 1}}),
    );
    assert_eq!(r["type"], "put_ok", "{r}");
    let g = rpc(c.addr(1), &json!({"type": "lookup", "key": "alias"}));
    assert_eq!(g["type"], "value", "{g}");
    assert_eq!(g["value"], json!({"x": 1}), "{g}");
    let g = rpc(c.addr(2), &json!({"type": "get", "key": "alias"}));
    assert_eq!(g["value"], json!({"x": 1}), "{g}");
    let r = rpc(
        c.addr(2),
        &json!({"type": "put", "key": "alias", "value": 2}),
    );
    assert_eq!(r["type"], "put_ok", "{r}");
    let g = rpc(c.addr(0), &json!({"type": "lookup", "key": "alias"}));
    assert_eq!(g["value"], 2, "{g}");
    let g = rpc(c.addr(0), &json!({"type": "lookup", "key": "never-stored"}));
    assert_eq!(g["type"], "not_found", "{g}");
}

/// A line of exactly 1 MiB is read (with `\n` or `\r\n`); one more byte is not.
/// A single-node network stores such a put; in a larger one it would be refused
/// with -32602 because it could not travel between nodes (see tests/network.rs).
#[test]
fn a_line_of_exactly_the_limit_is_accepted() {
    let c = LocalCluster::new(1);
    let head = "{\"type\":\"ping\",\"padding\":\"";
    let tail = "\"}";
    let line = |len: usize| {
        let pad = "x".repeat(len - head.len() - tail.len());
        format!("{head}{pad}{tail}")
    };
    let mut conn = Raw::connect(c.addr(0));
    let exact = line(LIMIT);
    assert_eq!(exact.len(), LIMIT);
    conn.write(format!("{exact}\n").as_bytes());
    assert_eq!(conn.read()["type"], "pong");
    conn.write(format!("{exact}\r\n").as_bytes());
    assert_eq!(conn.read()["type"], "pong");

    conn.write(format!("{}\n", line(LIMIT + 1)).as_bytes());
    assert_eq!(error_code(&conn.read()), LINE_TOO_LONG);
}

/// A line over 1 MiB gets error -32003 and the connection is closed, while the
/// node goes on serving other clients. Here the client sends one byte more than
/// the limit allows and no terminator, so the node has read everything sent.
#[test]
fn an_overlong_line_is_refused_and_the_connection_closed() {
    let c = LocalCluster::new(1);
    let addr = c.addr(0);
    let mut other = Raw::connect(addr);
    let mut conn = Raw::connect(addr);
    conn.write(&vec![b'a'; LIMIT + 2]);
    let r = conn.read();
    assert_eq!(error_code(&r), LINE_TOO_LONG, "{r}");
    assert!(r["message"].as_str().unwrap().contains("closing"), "{r}");
    assert!(
        conn.client.read_line().is_err(),
        "the connection must be closed"
    );
    // Other clients, old and new, are served as before.
    other.assert_usable();
    Raw::connect(addr).assert_usable();
    assert_eq!(rpc(addr, &json!({"type": "ping"}))["type"], "pong");
}

/// The same with a 4 MiB line sent in full, as `nc` would send it: the error
/// reply reaches the client even though the node stops reading mid-line, and the
/// connection then ends (the node closes with unread data, so the end may come as
/// a reset rather than a clean end of stream), and the node goes on serving.
#[test]
fn an_overlong_line_sent_in_full_still_gets_its_error() {
    let c = LocalCluster::new(1);
    let addr = c.addr(0);
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut line = vec![b'a'; 4 << 20];
    line.push(b'\n');
    let w = stream.try_clone().unwrap();
    // The node stops reading, so the write fails or blocks until it closes.
    let writer = std::thread::spawn(move || (&w).write_all(&line));
    let mut reader = std::io::BufReader::new(&stream);
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).expect("the error reply");
    assert_eq!(
        error_code(&parse(first.trim_end())),
        LINE_TOO_LONG,
        "{first}"
    );
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(rest.is_empty(), "nothing follows the error: {rest:?}"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    let _ = writer.join();
    assert_eq!(rpc(addr, &json!({"type": "ping"}))["type"], "pong");
}

/// Closing the sending side, as `nc -N` does, makes the node answer every line it
/// received, then close. A last line without a terminator is answered too.
#[test]
fn half_close_gets_every_reply_then_eof() {
    let c = LocalCluster::new(3);
    let mut stream = TcpStream::connect(c.addr(0)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
        .write_all(
            b"{\"type\":\"put\",\"key\":\"hc\",\"value\":1,\"id\":1}\n\
              {\"type\":\"get\",\"key\":\"hc\",\"id\":2}\n\
              garbage\n\
              {\"type\":\"ping\",\"id\":4}",
        )
        .unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut all = String::new();
    stream
        .read_to_string(&mut all)
        .expect("the node closes after answering");
    let replies: Vec<Value> = all.lines().map(parse).collect();
    assert_eq!(replies.len(), 4, "{all}");
    assert_eq!(replies[0]["type"], "put_ok", "{all}");
    assert_eq!(replies[1]["value"], 1, "{all}");
    assert_eq!(error_code(&replies[2]), PARSE_ERROR, "{all}");
    assert_eq!(replies[3]["type"], "pong", "{all}");
    assert_eq!(replies[3]["id"], 4, "{all}");
    assert!(all.ends_with('\n'), "every reply is a full line: {all:?}");

    // A connection closed without sending anything is simply closed.
    let mut s = TcpStream::connect(c.addr(1)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut nothing = String::new();
    s.read_to_string(&mut nothing).unwrap();
    assert_eq!(nothing, "");
}

/// A forged `forward` past the hop cap is refused, at the cap it is still
/// delivered, and the hop count it arrived with is the one reported.
#[test]
fn forged_forward_past_the_hop_cap_is_refused() {
    let c = LocalCluster::new(3);
    let mut conn = Raw::connect(c.addr(0));
    let fwd = |hops: u64, op: Value| json!({"type": "forward", "hops": hops, "op": op});
    for hops in [MAX_HOPS as u64 + 1, 1000, u32::MAX as u64] {
        let r = conn.request(&fwd(hops, json!({"type": "put", "key": "cap", "value": 1})));
        assert_eq!(error_code(&r), HOP_CAP, "hops {hops}: {r}");
        assert!(r["message"].as_str().unwrap().contains("hop"), "{r}");
        conn.assert_usable();
    }
    let r = conn.request(&fwd(
        u32::MAX as u64 + 1,
        json!({"type": "get", "key": "cap"}),
    ));
    assert_eq!(error_code(&r), INVALID_PARAMS, "{r}");
    assert!(
        (0..3).all(|i| c.node(i).node().store_get("cap").is_none()),
        "a refused put stored nothing"
    );

    // At the cap a message is still delivered by its root, but not forwarded on.
    let root = c.brute_force_root(&NodeId::for_key("cap"));
    let root_at = c.index_of(&root).unwrap();
    let other = (root_at + 1) % 3;
    let at_cap = fwd(MAX_HOPS as u64, json!({"type": "get", "key": "cap"}));
    let r = Raw::connect(c.addr(root_at)).request(&at_cap);
    assert_eq!(r["type"], "not_found", "{r}");
    assert_eq!(r["hops"], MAX_HOPS, "{r}");
    assert_eq!(id_field(&r, "owner"), root, "{r}");
    let r = Raw::connect(c.addr(other)).request(&at_cap);
    assert_eq!(error_code(&r), HOP_CAP, "{r}");
    // Below the cap a forwarded message counts on from the hops it arrived with.
    let r = Raw::connect(c.addr(other)).request(&fwd(5, json!({"type": "route", "key": "cap"})));
    assert_eq!(r["type"], "route", "{r}");
    assert_eq!(r["hops"], 6, "{r}");
    assert_eq!(id_field(&r, "owner"), root, "{r}");
}

/// Forged node entries (an id that is not SHA-1 of the address) in `announce`,
/// `join` or a forwarded join are refused with -32004, and the node's state does
/// not change.
#[test]
fn forged_node_entries_are_refused_and_change_nothing() {
    let c = LocalCluster::new(3);
    c.wait_for_ideal_leaf_sets(Duration::from_secs(30));
    let addr = c.addr(0);
    let node = c.node(0).node();
    let known_before = node.known_nodes();
    let leaf_before = node.leaf_set();

    // A real, reachable address (another node's) with a made-up id, and a made-up
    // id next to our own id so that it would enter every leaf set.
    let victim = c.addr(1);
    let mut near = c.id(0);
    near.0[19] ^= 1;
    let forged = [
        json!({"node_id": NodeId::for_key("not an address").to_string(), "addr": victim.to_string()}),
        json!({"node_id": near.to_string(), "addr": "127.0.0.1:9"}),
        json!({"node_id": NodeId::for_addr(&victim).to_string(), "addr": "127.0.0.1:9"}),
    ];
    let mut conn = Raw::connect(addr);
    for n in &forged {
        for req in [
            json!({"type": "announce", "node": n}),
            json!({"type": "announce", "node": n, "rows": []}),
            json!({"type": "join", "node": n}),
            json!({"type": "forward", "hops": 1, "op": {"type": "join", "node": n}}),
        ] {
            let r = conn.request(&req);
            assert_eq!(error_code(&r), BAD_NODE, "{req} -> {r}");
            assert!(r["message"].as_str().unwrap().contains("genuine"), "{r}");
        }
        conn.assert_usable();
    }
    // Give the node a few maintenance ticks to act on anything it took in.
    std::thread::sleep(c.config.tick * 3);
    assert_eq!(
        node.known_nodes(),
        known_before,
        "forged nodes changed the state"
    );
    assert_eq!(node.leaf_set(), leaf_before);
    assert!(!node.knows(&near));
    assert!(!node.knows(&NodeId::for_key("not an address")));

    // A genuine sender is accepted, so the refusals above are about genuineness;
    // forged entries it passes along (as routing-table rows) are still not taken
    // in, whether the node refuses the message or drops them.
    let genuine = NodeInfo::new(victim);
    let r = conn.request(&json!({"type": "announce", "node": genuine, "rows": forged}));
    if r["type"] == "error" {
        assert_eq!(error_code(&r), BAD_NODE, "{r}");
    } else {
        assert_eq!(r["type"], "leaf_set", "{r}");
        assert_eq!(id_field(&r["node"], "node_id"), c.id(0), "{r}");
    }
    let r = conn.request(&json!({"type": "announce", "node": genuine}));
    assert_eq!(r["type"], "leaf_set", "{r}");
    std::thread::sleep(c.config.tick * 3);
    assert!(!node.knows(&near));
    assert!(!node.knows(&NodeId::for_key("not an address")));
    for n in node.known_nodes() {
        assert!(n.is_genuine(), "{n:?} is known but not genuine");
        assert_ne!(n.addr.port(), 9, "{n:?} came from a forged entry");
    }
}

/// Many clients at once, each with its own connection, all get their answers.
#[test]
fn concurrent_clients_are_served_independently() {
    let c = LocalCluster::new(4);
    let addrs = c.addrs();
    std::thread::scope(|s| {
        for t in 0..16 {
            let addr = addrs[t % addrs.len()];
            s.spawn(move || {
                let mut conn = Raw::connect(addr);
                for i in 0..20 {
                    let key = format!("client{t}-{i}");
                    let r = conn.request(&json!({"type": "put", "key": key, "value": i, "id": i}));
                    assert_eq!(r["type"], "put_ok", "{r}");
                    assert_eq!(r["id"], i, "{r}");
                }
            });
        }
    });
    for t in 0..16 {
        for i in [0, 19] {
            let key = format!("client{t}-{i}");
            let g = rpc(
                addrs[(t + 1) % addrs.len()],
                &json!({"type": "get", "key": key}),
            );
            assert_eq!(g["value"], i, "{g}");
        }
    }
}

/// One connection more than the limit is answered with a `busy` error and
/// closed; the connections already open are served as before, and once one
/// closes there is room again.
#[test]
fn connections_beyond_the_limit_are_told_busy() {
    let config = pastry::pastry_node::Config {
        max_connections: 4,
        ..support::test_config()
    };
    let node = support::start_node(config);
    let addr = node.addr();
    let mut open: Vec<Raw> = (0..4).map(|_| Raw::connect(addr)).collect();
    for c in &mut open {
        c.assert_usable();
    }
    let mut extra = Raw::connect(addr);
    let r = extra.read();
    assert_eq!(error_code(&r), -32005, "{r}");
    assert!(r["message"].as_str().unwrap().contains("busy"), "{r}");
    assert!(extra.client.read_line().is_err(), "then closed");
    open[0].assert_usable();
    drop(open.pop());
    // The server notices the closed connection when its thread ends.
    let served = support::wait_until(Duration::from_secs(5), || {
        let mut c = Raw::connect(addr);
        c.send(r#"{"type":"ping"}"#)["type"] == "pong"
    });
    assert!(served, "room again after a connection closed");
}

/// A client that stops in the middle of a line, or says nothing at all, is let
/// go after the client timeout instead of holding a thread forever.
#[test]
fn silent_and_stalled_clients_are_let_go() {
    let config = pastry::pastry_node::Config {
        client_timeout: Duration::from_millis(300),
        ..support::test_config()
    };
    let node = support::start_node(config);
    let addr = node.addr();
    let mut stalled = TcpStream::connect(addr).unwrap();
    stalled.write_all(br#"{"type":"pi"#).unwrap();
    let idle = TcpStream::connect(addr).unwrap();
    for mut s in [stalled, idle] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 64];
        // End of stream (or a reset): the node closed the connection.
        let n = s.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "nothing is answered to a stalled or silent client");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(rpc(addr, &json!({"type": "ping"}))["type"], "pong");
}
