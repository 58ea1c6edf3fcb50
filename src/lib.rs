//! A Pastry distributed hash table (Rowstron and Druschel, 2001).
pub mod pastry_node;
pub mod utils;
