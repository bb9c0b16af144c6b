//! Every message of the protocol: the original five exactly as specified,
//! the version-1 extensions, and each validation rule.

use tunnel_proto::{Limits, Message, Violation};

fn limits() -> Limits {
    Limits::default()
}

fn decode(text: &str) -> Result<Message, tunnel_proto::ProtocolError> {
    Message::decode(text, &limits())
}

fn violation(text: &str) -> Violation {
    decode(text).expect_err(text).kind
}

const ORIGINAL: &[&str] = &[
    r#"{"type":"http_request","id":"req_abc123","method":"POST","path":"/api/chat","headers":{"content-type":"application/json"},"body":"{...}"}"#,
    r#"{"type":"http_response","id":"req_abc123","status":200,"headers":{"content-type":"application/json"},"body":"{...}"}"#,
    r#"{"type":"ping","id":"ping_123","timestamp":"2025-01-15T10:30:00Z"}"#,
    r#"{"type":"pong","id":"ping_123","timestamp":"2025-01-15T10:30:00Z"}"#,
    r#"{"type":"error","id":"req_abc123","error":"Connection timeout","code":504}"#,
];

#[test]
fn original_messages_decode_and_encode_byte_for_byte() {
    for text in ORIGINAL {
        let msg = decode(text).expect(text);
        assert_eq!(&msg.encode(), text);
    }
}

#[test]
fn original_request_extracts_to_an_http_request() {
    let Message::HttpRequest(m) = decode(ORIGINAL[0]).expect("valid") else {
        panic!("not a request")
    };
    let req = m.into_request(&limits()).expect("valid").into_http();
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.uri().path(), "/api/chat");
    assert_eq!(req.headers()["content-type"], "application/json");
    assert_eq!(req.body().as_ref(), b"{...}");
}

#[test]
fn original_response_extracts_to_an_http_response() {
    let Message::HttpResponse(m) = decode(ORIGINAL[1]).expect("valid") else {
        panic!("not a response")
    };
    let resp = m.into_http(&limits()).expect("valid");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.body().as_ref(), b"{...}");
}

#[test]
fn original_response_with_null_or_missing_body_is_an_empty_body() {
    for text in [
        r#"{"type":"http_response","id":"r1","status":204,"headers":{},"body":null}"#,
        r#"{"type":"http_response","id":"r1","status":204}"#,
    ] {
        let Message::HttpResponse(m) = decode(text).expect(text) else { panic!("not a response") };
        assert!(m.into_http(&limits()).expect("valid").body().is_empty());
    }
}

#[test]
fn request_built_from_parts_matches_the_original_shape() {
    let id = tunnel_proto::StreamId::new("req_1").expect("valid id");
    let headers = tunnel_proto::Headers(vec![("content-type".into(), "application/json".into())]);
    let msg = Message::HttpRequest(tunnel_proto::HttpRequestMsg::new(
        &id,
        &http::Method::POST,
        "/api/chat?x=1",
        headers,
        Some("{}".into()),
        false,
    ));
    assert_eq!(
        msg.encode(),
        r#"{"type":"http_request","id":"req_1","method":"POST","path":"/api/chat?x=1","headers":{"content-type":"application/json"},"body":"{}"}"#
    );
}

#[test]
fn error_and_ping_helpers_produce_valid_messages() {
    let e = Message::error("req_1", 502, "upstream unreachable");
    assert_eq!(
        e.encode(),
        r#"{"type":"error","id":"req_1","error":"upstream unreachable","code":502}"#
    );
    let ping = Message::ping("ping_1");
    let Message::Ping(p) = &ping else { panic!("not a ping") };
    assert!(p.timestamp.ends_with('Z'), "{}", p.timestamp);
    let pong = Message::pong(p);
    let Message::Pong(q) = decode(&pong.encode()).expect("valid pong") else {
        panic!("not a pong")
    };
    assert_eq!(q, *p);
}

#[test]
fn long_error_text_is_truncated_on_a_character_boundary() {
    let Message::Error(e) = Message::error("r", 500, "é".repeat(2000)) else { panic!() };
    assert!(e.error.len() <= 1024);
    assert!(decode(&Message::Error(e).encode()).is_ok());
}

#[test]
fn extension_messages_round_trip() {
    let texts = [
        r#"{"type":"hello","version":1,"agent":"agentd/0.1.0","capabilities":["stream_response"],"limits":{"max_control_bytes":1048576,"max_chunk_bytes":65536,"initial_window":262144,"max_streams":256,"max_headers":128,"max_header_bytes":65536}}"#,
        r#"{"type":"welcome","version":1,"session_id":"s_1","capabilities":["stream_response"],"limits":{"max_control_bytes":1048576,"max_chunk_bytes":65536,"initial_window":262144,"max_streams":256,"max_headers":128,"max_header_bytes":65536}}"#,
        r#"{"type":"http_request","id":"req_2","method":"PUT","path":"/api/blobs/sha256:00","headers":{},"body_follows":true}"#,
        r#"{"type":"response_head","id":"req_2","status":200,"headers":{"content-type":"application/x-ndjson"},"body_follows":true}"#,
        r#"{"type":"cancel","id":"req_2","reason":"client disconnected"}"#,
        r#"{"type":"window_update","id":"req_2","credit":131072}"#,
        r#"{"type":"goaway","reason":"relay draining","retry_after_ms":1000}"#,
        r#"{"type":"ack","id":"req_2"}"#,
    ];
    for text in texts {
        assert_eq!(decode(text).expect(text).encode(), text);
    }
}

#[test]
fn hello_with_partial_limits_takes_defaults_for_the_rest() {
    let Message::Hello(h) =
        decode(r#"{"type":"hello","version":1,"limits":{"initial_window":1024}}"#).expect("valid")
    else {
        panic!("not hello")
    };
    assert_eq!(h.limits.initial_window, 1024);
    assert_eq!(h.limits.max_chunk_bytes, Limits::default().max_chunk_bytes);
}

#[test]
fn unknown_types_are_told_apart_from_garbage() {
    assert_eq!(violation(r#"{"type":"teleport","id":"r1"}"#), Violation::UnknownType);
    assert_eq!(violation("not json"), Violation::MalformedMessage);
    assert_eq!(violation(r#"{"type":"ping"}"#), Violation::MalformedMessage);
    assert_eq!(violation(r#"{"id":"x"}"#), Violation::MalformedMessage);
}

#[test]
fn ids_are_checked() {
    assert_eq!(violation(r#"{"type":"ping","id":"","timestamp":""}"#), Violation::InvalidId);
    assert_eq!(violation(r#"{"type":"ping","id":"a b","timestamp":""}"#), Violation::InvalidId);
    let long = format!(r#"{{"type":"cancel","id":"{}","reason":""}}"#, "a".repeat(65));
    assert_eq!(violation(&long), Violation::InvalidId);
    let max = format!(r#"{{"type":"cancel","id":"{}","reason":""}}"#, "a".repeat(64));
    assert!(decode(&max).is_ok());
}

#[test]
fn methods_and_paths_are_checked() {
    let req = |method: &str, path: &str| {
        format!(
            r#"{{"type":"http_request","id":"r","method":"{method}","path":"{path}","headers":{{}}}}"#
        )
    };
    assert_eq!(violation(&req("GE T", "/")), Violation::InvalidMethod);
    assert_eq!(violation(&req("", "/")), Violation::InvalidMethod);
    assert_eq!(violation(&req("GET", "api")), Violation::InvalidPath);
    assert_eq!(violation(&req("GET", "/a b")), Violation::InvalidPath);
    assert!(decode(&req("PROPFIND", "/a?b=c")).is_ok());
}

#[test]
fn a_request_cannot_carry_both_an_inline_and_a_streamed_body() {
    let text = r#"{"type":"http_request","id":"r","method":"POST","path":"/","body":"x","body_follows":true}"#;
    assert_eq!(violation(text), Violation::StreamState);
}

#[test]
fn statuses_are_checked() {
    assert_eq!(
        violation(r#"{"type":"http_response","id":"r","status":99}"#),
        Violation::InvalidStatus
    );
    assert_eq!(
        violation(r#"{"type":"response_head","id":"r","status":600,"body_follows":true}"#),
        Violation::InvalidStatus
    );
}

#[test]
fn header_limits_are_checked_on_requests_and_responses() {
    let many: String = (0..129).map(|i| format!(r#""x-{i}":"v""#)).collect::<Vec<_>>().join(",");
    let text = format!(r#"{{"type":"response_head","id":"r","status":200,"headers":{{{many}}}}}"#);
    assert_eq!(violation(&text), Violation::TooManyHeaders);
    let big = format!(
        r#"{{"type":"http_request","id":"r","method":"GET","path":"/","headers":{{"x":"{}"}}}}"#,
        "v".repeat(70_000)
    );
    assert_eq!(violation(&big), Violation::HeadersTooLarge);
}

#[test]
fn credit_must_be_positive_and_within_the_window_range() {
    assert_eq!(
        violation(r#"{"type":"window_update","id":"r","credit":0}"#),
        Violation::InvalidCredit
    );
    assert_eq!(
        violation(r#"{"type":"window_update","id":"r","credit":2147483648}"#),
        Violation::InvalidCredit
    );
}

#[test]
fn oversized_control_messages_are_refused_before_parsing() {
    let small = Limits { max_control_bytes: 4096, ..Limits::default() };
    let text = format!(r#"{{"type":"cancel","id":"r","reason":"{}"}}"#, "x".repeat(5000));
    assert_eq!(Message::decode(&text, &small).unwrap_err().kind, Violation::FrameTooLarge);
}

#[test]
fn long_reasons_are_refused() {
    let text = format!(r#"{{"type":"goaway","reason":"{}"}}"#, "x".repeat(1025));
    assert_eq!(violation(&text), Violation::ReasonTooLong);
}

#[test]
fn unusable_limits_are_refused() {
    for limits in
        [r#"{"max_chunk_bytes":0}"#, r#"{"initial_window":0}"#, r#"{"max_control_bytes":10}"#]
    {
        let text = format!(r#"{{"type":"hello","version":1,"limits":{limits}}}"#);
        assert_eq!(violation(&text), Violation::InvalidLimits, "{limits}");
    }
}

#[test]
fn every_violation_has_a_code_and_a_name() {
    let e = decode("{").unwrap_err();
    assert_eq!(e.code(), 400);
    assert!(e.to_string().starts_with("malformed_message: "));
    let msg = Message::violation(Some("req_1"), &e);
    assert!(matches!(msg, Message::Error(ref m) if m.id == "req_1" && m.code == 400));
}

#[test]
fn a_service_report_lists_bounded_models_loaded_and_available() {
    let report = |loaded: usize, available: usize| {
        let names = |n: usize, p: &str| (0..n).map(|i| format!("\"{p}{i}\"")).collect::<Vec<_>>();
        format!(
            r#"{{"type":"service","reachable":true,"models":[{}],"available":[{}],"checked_at":"2026-12-07T12:00:00Z"}}"#,
            names(loaded, "l").join(","),
            names(available, "a").join(",")
        )
    };
    match decode(&report(2, 512)).expect("within the bounds") {
        Message::Service(s) => assert_eq!((s.models.len(), s.available.len()), (2, 512)),
        other => panic!("not a service report: {other:?}"),
    }
    assert_eq!(violation(&report(2, 513)), Violation::MalformedMessage);
    assert_eq!(violation(&report(65, 0)), Violation::MalformedMessage);
    // An agent that predates `available` sends none: an empty list.
    let old =
        r#"{"type":"service","reachable":true,"models":["m"],"checked_at":"2026-12-07T12:00:00Z"}"#;
    match decode(old).expect("an older report") {
        Message::Service(s) => assert!(s.available.is_empty()),
        other => panic!("not a service report: {other:?}"),
    }
}
