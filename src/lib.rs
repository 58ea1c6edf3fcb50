//! A Pastry distributed hash table (Rowstron and Druschel, Middleware 2001).
//!
//! Every node and every key has a 160-bit id (SHA-1). A message for a key reaches
//! the live node whose id is numerically closest to the key, its *root*, in fewer
//! than ⌈log16 N⌉ hops; the root and its nearest neighbours store the key's value.
//!
//! # How a key is routed
//! 1. A client sends `{"type":"get","key":"apple"}` to any node (`pastry_node::server`
//!    reads the line; `message_handler::decode` turns it into a `Request`).
//! 2. `message_handler::handle` hashes the key to its id D and asks the node's
//!    routing state where D goes (`pastry_node::router::RoutingState::route`):
//!    - D within the leaf set's range: to the numerically closest of the leaf set
//!      and ourselves (`pastry_node::leaf_set`);
//!    - else to the routing-table entry sharing one more digit with D
//!      (`pastry_node::routing_table`);
//!    - else, rarely, to any known node as good in prefix and closer to D.
//! 3. If the answer is "forward", the node sends the request on through its
//!    `Transport` (TCP, pooled connections) and relays the reply back; if "deliver",
//!    it is the root and answers from its store (`pastry_node::store`). A `put` is
//!    also copied to the rest of the key's replica set, the k nodes closest to D.
//!
//! # Layout
//! - `utils`: ids, SHA-1, digits, `shl`, ring distance, constants.
//! - `pastry_node`: the node. Pure parts: `leaf_set`, `routing_table`,
//!   `neighborhood`, `router`, `store`, `leases` (failure detection),
//!   `anti_entropy` (replica digests). Network shell: `Node` (the shared state
//!   handle), `join`, `transport`, `server`, `maintenance`, `RunningNode`.
//! - `message_handler`: the wire messages and what a node does with each.
//! - `client`: a small blocking client, for the demo and the tests.
//! - `simulator`: whole networks in one process, the same handlers over an
//!   in-memory transport (`src/bin/simulate.rs` runs it; `src/bin/bench.rs`
//!   measures the real thing on loopback).
//! - `src/main.rs`: the `pastry-node` program; `demo/main.rs`: the demo.

// Nothing a peer sends may panic a node: library code returns errors instead
// of unwrapping (tests may unwrap).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod client;
pub mod message_handler;
pub mod pastry_node;
pub mod simulator;
pub mod utils;
