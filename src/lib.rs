//! A Pastry distributed hash table (Rowstron and Druschel, 2001).
pub mod message_handler;
pub mod pastry_node;
pub mod utils;
