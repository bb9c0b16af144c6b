//! tunnel.control.v1 stays decodable: bytes saved from v1 messages must
//! decode to the same values with every later version of the .proto files
//! (the evolution rules at the top of control/v1/common.proto).

use prost::Message as _;
use tunnel_proto::control::v1::{self as pb, trace_event::Kind};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn agent_status() -> pb::AgentStatus {
    pb::AgentStatus {
        state: pb::AgentState::Connected as i32,
        relay: "wss://relay.example.com/ws/tunnel".into(),
        session_id: "s_1".into(),
        since_unix_ms: 1_796_000_000_000,
        rtt_us: 12_345,
        in_flight: 2,
        sessions: 3,
        last_error_kind: pb::AgentErrorKind::PinMismatch as i32,
        last_error: "pin".into(),
        credential_expires_unix_ms: 1_796_000_600_000,
        pins: vec!["sha256/x".into()],
        service: Some(pb::ServiceHealth {
            url: "http://127.0.0.1:11434/".into(),
            reachable: true,
            version: "0.13.0".into(),
            ..pb::ServiceHealth::default()
        }),
        requests: 7,
        version: "0.1.0".into(),
        ..pb::AgentStatus::default()
    }
}

fn trace_end() -> pb::TraceEvent {
    pb::TraceEvent {
        request_id: "42".into(),
        user_hash: "u_abc".into(),
        at_unix_ms: 1_796_000_000_345,
        kind: Some(Kind::End(pb::RequestEnd {
            status: 200,
            bytes_in: 10,
            bytes_out: 3400,
            duration_us: 2_300_000,
            outcome: "ok".into(),
            model: "llama3.2".into(),
            tokens: 42,
            ..pb::RequestEnd::default()
        })),
    }
}

fn issue() -> pb::IssueTokenRequest {
    pb::IssueTokenRequest {
        user: "alice".into(),
        role: pb::TokenRole::Client as i32,
        ttl_seconds: 3600,
        paths: vec!["/api/chat".into()],
        models: vec!["llama3.2".into()],
        device: String::new(),
    }
}

/// Saved with version 1 (this crate's first control API).
const AGENT_STATUS_V1: &str = "080312217773733a2f2f72656c61792e6578616d706c652e636f6d2f77732f74756e6e656c1a03735f312080d0c4cfa23428b9603002380340044a0370696e58c09fe9cfa2346a087368613235362f7872230a17687474703a2f2f3132372e302e302e313a31313433342f10011a06302e31332e3078078a0105302e312e30";
const TRACE_END_V1: &str = "0a0234321205755f61626318d9d2c4cfa234621d08c801100a18c81a20e0b08c012a026f6b3a086c6c616d61332e32402a";
const ISSUE_V1: &str = "0a05616c696365100218901c22092f6170692f636861742a086c6c616d61332e32";

#[test]
fn saved_v1_bytes_decode_to_the_same_messages() {
    // What this version writes (for saving the bytes of a new message);
    // it may differ from the saved bytes as long as both decode alike.
    for (name, now) in [
        ("AgentStatus", agent_status().encode_to_vec()),
        ("TraceEvent", trace_end().encode_to_vec()),
        ("IssueTokenRequest", issue().encode_to_vec()),
    ] {
        println!("{name}: {}", hex(&now));
    }
    assert_eq!(pb::AgentStatus::decode(&*unhex(AGENT_STATUS_V1)).expect("decodes"), agent_status());
    assert_eq!(pb::TraceEvent::decode(&*unhex(TRACE_END_V1)).expect("decodes"), trace_end());
    assert_eq!(pb::IssueTokenRequest::decode(&*unhex(ISSUE_V1)).expect("decodes"), issue());
}

#[test]
fn unknown_fields_and_enum_values_from_a_newer_daemon_are_tolerated() {
    // Field 99 (varint 1) appended: a field v1 does not know.
    let mut bytes = agent_status().encode_to_vec();
    bytes.extend_from_slice(&[0x98, 0x06, 0x01]);
    let decoded = pb::AgentStatus::decode(&*bytes).expect("decodes");
    assert_eq!(decoded.session_id, "s_1");
    // A state value v1 does not know reads as unspecified.
    let newer = pb::AgentStatus { state: 42, ..pb::AgentStatus::default() };
    let decoded = pb::AgentStatus::decode(&*newer.encode_to_vec()).expect("decodes");
    assert_eq!(
        pb::AgentState::try_from(decoded.state).unwrap_or_default(),
        pb::AgentState::Unspecified
    );
}
