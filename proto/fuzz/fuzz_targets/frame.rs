//! Fuzzes the binary frame decoder: it must never panic, and whatever it
//! accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok(f) = tunnel_proto::frame::decode(&bytes, 64 * 1024) {
        assert_eq!(tunnel_proto::frame::encode(&f.id, f.end, &f.payload), bytes);
    }
});
