//! The key-value store a node keeps for the keys it is root of.
//!
//! Keys are stored under their full string, never under a truncated hash, so two
//! keys can never overwrite each other. The key's 160-bit id is kept beside the value
//! so that a node can tell which of its keys belong to a newcomer.
//!
//! Pure: no sockets, locks, clocks or logging.

use std::collections::HashMap;

use serde_json::Value;

use crate::utils::NodeId;

#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub key_id: NodeId,
    pub value: Value,
}

#[derive(Default, Debug)]
pub struct Store {
    map: HashMap<String, Stored>,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// Stores `value` under `key`; returns the previous value, if any.
    pub fn put(&mut self, key: &str, value: Value) -> Option<Value> {
        let key_id = NodeId::for_key(key);
        self.map
            .insert(key.to_string(), Stored { key_id, value })
            .map(|s| s.value)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).map(|s| &s.value)
    }

    /// Removes `key`; returns true if it was there.
    pub fn delete(&mut self, key: &str) -> bool {
        self.map.remove(key).is_some()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every key with its id and value.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Stored)> {
        self.map.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_get_delete() {
        let mut s = Store::new();
        assert_eq!(s.put("apple", json!("red")), None);
        assert_eq!(s.put("apple", json!({"c": 1})), Some(json!("red")));
        assert_eq!(s.get("apple"), Some(&json!({"c": 1})));
        assert!(s.delete("apple"));
        assert!(!s.delete("apple"));
        assert!(s.is_empty());
    }
}
