//! A Pastry node: its routing state (pure) and its network shell.
pub mod leaf_set;
pub mod neighborhood;
pub mod router;
pub mod routing_table;
