//! Property tests: messages survive a round trip, and the decoders never
//! panic whatever bytes arrive.

use bytes::Bytes;
use proptest::prelude::*;
use tunnel_proto::{Headers, Limits, Message, frame};

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

/// Distinct names: a repeated name travels as one array (PROTOCOL.md), so
/// `h, a, h` comes back as `h, h, a`, the same header map in another order.
fn headers() -> impl Strategy<Value = Headers> {
    prop::collection::btree_map("[a-z][a-z0-9-]{0,20}", "[ -~]{0,40}", 0..8)
        .prop_map(|m| Headers(m.into_iter().collect()))
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (id(), "[A-Z]{1,10}", "/[a-z0-9/?=&]{0,40}", headers(), prop::option::of(any::<String>()))
            .prop_map(|(id, method, path, headers, body)| {
                Message::HttpRequest(tunnel_proto::HttpRequestMsg {
                    id,
                    method,
                    path,
                    headers,
                    body_follows: body.is_none(),
                    body,
                })
            }),
        (id(), 200u16..600, headers(), any::<String>()).prop_map(|(id, status, headers, body)| {
            Message::HttpResponse(tunnel_proto::HttpResponseMsg {
                id,
                status,
                headers,
                body: Some(body),
            })
        }),
        (id(), 200u16..600, headers(), any::<bool>()).prop_map(
            |(id, status, headers, body_follows)| {
                Message::ResponseHead(tunnel_proto::ResponseHeadMsg {
                    id,
                    status,
                    headers,
                    body_follows,
                })
            }
        ),
        (id(), "[ -~]{0,30}")
            .prop_map(|(id, timestamp)| Message::Ping(tunnel_proto::Ping { id, timestamp })),
        (id(), "[ -~]{0,30}")
            .prop_map(|(id, timestamp)| Message::Pong(tunnel_proto::Ping { id, timestamp })),
        (id(), ".{0,100}", 100u16..600).prop_map(|(id, error, code)| Message::Error(
            tunnel_proto::ErrorMsg { id, error, code }
        )),
        (id(), ".{0,100}")
            .prop_map(|(id, reason)| Message::Cancel(tunnel_proto::Cancel { id, reason })),
        (id(), 1u32..=0x7fff_ffff).prop_map(|(id, credit)| Message::WindowUpdate(
            tunnel_proto::WindowUpdate { id, credit }
        )),
        (".{0,100}", prop::option::of(any::<u64>())).prop_map(|(reason, retry_after_ms)| {
            Message::Goaway(tunnel_proto::Goaway { reason, retry_after_ms })
        }),
        id().prop_map(|id| Message::Ack(tunnel_proto::Ack { id })),
    ]
}

proptest! {
    #[test]
    fn valid_messages_round_trip(msg in message()) {
        let text = msg.encode();
        let back = Message::decode(&text, &Limits::default());
        // A generated message may break a rule (a header value with a
        // control character); then decoding says so instead of panicking.
        if let Ok(back) = back {
            prop_assert_eq!(back, msg);
        }
    }

    #[test]
    fn where_type_is_written_changes_nothing(msg in message()) {
        // Encoders write `type` first, which the decoder reads straight
        // into the variant; written last, it takes serde's general path.
        let first = msg.encode();
        let kind = msg.kind();
        let prefix = format!("{{\"type\":\"{kind}\"");
        prop_assert!(first.starts_with(&prefix), "{}", first);
        let rest = &first[prefix.len()..first.len() - 1];
        let last = match rest.strip_prefix(',') {
            Some(fields) => format!("{{{fields},\"type\":\"{kind}\"}}"),
            None => format!("{{\"type\":\"{kind}\"}}"),
        };
        let limits = Limits::default();
        let (a, b) = (Message::decode(&first, &limits), Message::decode(&last, &limits));
        match (a, b) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(a), Err(b)) => prop_assert_eq!(a.kind, b.kind),
            (a, b) => prop_assert!(false, "{:?} vs {:?} for {}", a, b, last),
        }
    }

    #[test]
    fn text_decoder_never_panics(text in any::<String>()) {
        let _ = Message::decode(&text, &Limits::default());
    }

    #[test]
    fn json_shaped_input_never_panics(
        kind in prop::sample::select(tunnel_proto::message::KNOWN_TYPES),
        fields in prop::collection::vec(("[a-z_]{1,12}", any::<i64>()), 0..6),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), kind.into());
        for (k, v) in fields {
            obj.insert(k, v.into());
        }
        let _ = Message::decode(&serde_json::Value::Object(obj).to_string(), &Limits::default());
    }

    #[test]
    fn frame_round_trips(id in id(), end in any::<bool>(), payload in prop::collection::vec(any::<u8>(), 0..512)) {
        let f = frame::encode(&id, end, &payload);
        let d = frame::decode(&f, 512).expect("valid frame");
        prop_assert_eq!(d.id, id);
        prop_assert_eq!(d.end, end);
        prop_assert_eq!(d.payload.as_ref(), &payload[..]);
    }

    #[test]
    fn frame_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = frame::decode(&Bytes::from(bytes), 128);
    }
}
