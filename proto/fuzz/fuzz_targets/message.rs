//! Fuzzes the text message decoder: it must never panic, and whatever it
//! accepts must re-encode to a form that decodes to the same encoding
//! (header order may be normalised once: repeated names are grouped).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = tunnel_proto::Limits::default();
    if let Ok(msg) = tunnel_proto::Message::decode(text, &limits) {
        let text = msg.encode();
        let again = tunnel_proto::Message::decode(&text, &limits).expect("re-encoded message decodes");
        assert_eq!(again.encode(), text);
    }
});
