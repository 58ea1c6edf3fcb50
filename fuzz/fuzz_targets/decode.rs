//! Fuzzes the decoder of request lines: whatever the bytes, `decode` returns a
//! request or a rejection with a JSON-RPC code, never panics, and what it
//! accepts encodes back to a line that decodes to the same request.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pastry::message_handler::decode;

fuzz_target!(|line: &[u8]| {
    match decode(line) {
        Ok(envelope) => {
            let again = serde_json::to_vec(&envelope.request).expect("a request encodes");
            let back = decode(&again).expect("an encoded request decodes");
            assert_eq!(back.request, envelope.request);
        }
        Err(rejection) => {
            assert!((-32768..=-32000).contains(&rejection.code));
            assert!(!rejection.message.is_empty());
        }
    }
});
