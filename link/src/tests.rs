//! The engine against a peer on the other end of an in-memory pipe.

use std::sync::Mutex;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;

/// Records what the link handed it; stream "live" is live.
#[derive(Default)]
struct Recorder {
    messages: Mutex<Vec<Message>>,
    ended_streams: Mutex<Vec<String>>,
    ends: Mutex<Vec<End>>,
}

impl Handler for Recorder {
    fn read_limits(&self) -> Limits {
        Limits::default()
    }

    fn on_message(&self, msg: Message) -> Result<(), Rejected> {
        lock(&self.messages).push(msg);
        Ok(())
    }

    fn on_data(&self, frame: DataFrame) -> Result<(), Rejected> {
        Err(Rejected::on(
            &frame.id,
            ProtocolError::new(tunnel_proto::Violation::StreamState, "no body expected"),
        ))
    }

    fn end_stream(&self, id: &str, _err: &ProtocolError) {
        lock(&self.ended_streams).push(id.to_owned());
    }

    fn on_end(&self, end: &End) {
        lock(&self.ends).push(end.clone());
    }

    fn is_live(&self, id: &StreamId) -> bool {
        id.as_str() == "live"
    }
}

type Peer = WebSocketStream<tokio::io::DuplexStream>;

/// A running link and the peer's end of its socket.
async fn linked(
    ping_interval: Duration,
) -> (Arc<Link>, Arc<Recorder>, Peer, tokio::task::JoinHandle<Outcome<()>>) {
    let (near, far) = tokio::io::duplex(1 << 20);
    let ours = WebSocketStream::from_raw_socket(near, Role::Server, None).await;
    let peer = WebSocketStream::from_raw_socket(far, Role::Client, None).await;
    let (link, rx) = Link::new(LinkConfig {
        label: "s_test".into(),
        peer: "agent",
        liveness: settings::Liveness { ping_interval, max_missed_pings: 2 },
        max_streams: 8,
    });
    let handler = Arc::new(Recorder::default());
    let task = {
        let (link, handler) = (link.clone(), handler.clone());
        tokio::spawn(async move { link.run(ours, rx, handler, std::future::pending()).await })
    };
    (link, handler, peer, task)
}

/// The next text message from the link, skipping WebSocket control frames.
async fn next_message(peer: &mut Peer) -> Option<Message> {
    loop {
        match peer.next().await? {
            Ok(Ws::Text(t)) => {
                return Some(Message::decode(&t, &Limits::default()).expect("valid"));
            }
            Ok(Ws::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn close_code(peer: &mut Peer) -> Option<u16> {
    loop {
        match peer.next().await? {
            Ok(Ws::Close(f)) => return f.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

const LONG: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn pings_are_answered_and_other_messages_go_to_the_handler() {
    let (_link, handler, mut peer, _task) = linked(LONG).await;
    peer.send(Ws::text(Message::ping("p1").encode())).await.expect("send");
    assert!(matches!(next_message(&mut peer).await, Some(Message::Pong(p)) if p.id == "p1"));
    peer.send(Ws::text(Message::cancel("req_1", "gone").encode())).await.expect("send");
    peer.send(Ws::text(Message::ping("p2").encode())).await.expect("send");
    assert!(matches!(next_message(&mut peer).await, Some(Message::Pong(_))));
    assert_eq!(*lock(&handler.messages), [Message::cancel("req_1", "gone")]);
}

#[tokio::test]
async fn a_refused_frame_is_answered_and_ends_the_stream_it_names() {
    let (_link, handler, mut peer, _task) = linked(LONG).await;
    peer.send(Ws::Binary(tunnel_proto::frame::encode("req_9", false, b"x"))).await.expect("send");
    peer.send(Ws::text(r#"{"type":"window_update","id":"req_8","credit":0}"#)).await.expect("send");
    for _ in 0..2 {
        let Some(Message::Error(e)) = next_message(&mut peer).await else { panic!("an error") };
        assert!(e.id.is_empty());
    }
    assert_eq!(*lock(&handler.ended_streams), ["req_9", "req_8"]);
}

#[tokio::test]
async fn an_unknown_type_is_refused_without_ending_its_stream() {
    let (_link, handler, mut peer, _task) = linked(LONG).await;
    peer.send(Ws::text(r#"{"type":"teleport","id":"req_1"}"#)).await.expect("send");
    let Some(Message::Error(e)) = next_message(&mut peer).await else { panic!("an error") };
    assert!(e.error.starts_with("unknown_type"), "{e:?}");
    assert!(lock(&handler.ended_streams).is_empty());
}

#[tokio::test]
async fn a_peer_that_spends_its_ping_budget_is_closed_with_1008() {
    let (_link, handler, mut peer, task) = linked(LONG).await;
    for i in 0..200 {
        if peer.send(Ws::text(Message::ping(format!("p{i}")).encode())).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut peer).await, Some(1008));
    let Outcome::Ended(end) = task.await.expect("task") else { panic!("the link ended") };
    assert_eq!(end, End::Flooded(Flood::Pings));
    assert_eq!(*lock(&handler.ends), [End::Flooded(Flood::Pings)]);
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_is_closed_with_4001_after_its_missed_pings() {
    let (_link, _handler, mut peer, task) = linked(Duration::from_secs(15)).await;
    // The peer reads (pings arrive) but never answers.
    let mut pings = 0;
    let code = loop {
        match peer.next().await {
            Some(Ok(Ws::Text(_))) => pings += 1,
            Some(Ok(Ws::Close(f))) => break f.map(|f| u16::from(f.code)),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(4001));
    assert_eq!(pings, 2);
    assert!(matches!(task.await.expect("task"), Outcome::Ended(End::Unresponsive(_))));
}

#[tokio::test]
async fn queued_frames_of_ended_streams_are_dropped_and_close_says_why() {
    let (link, _handler, mut peer, task) = linked(LONG).await;
    let id = |s: &str| StreamId::new(s).expect("id");
    link.send(Outbound::message(&id("dead"), &Message::cancel("dead", "x"))).await.expect("queued");
    link.send(Outbound::message(&id("live"), &Message::cancel("live", "y"))).await.expect("queued");
    let Some(Message::Cancel(c)) = next_message(&mut peer).await else { panic!("a frame") };
    assert_eq!(c.id, "live");
    link.close(CloseCode::Away, "shutting down");
    assert_eq!(close_code(&mut peer).await, Some(1001));
    assert!(matches!(task.await.expect("task"), Outcome::Ended(End::Closed)));
    assert!(
        link.send(Outbound::message(&id("live"), &Message::cancel("live", "z"))).await.is_err()
    );
}

#[tokio::test]
async fn a_peer_close_ends_the_link_with_its_code() {
    let (_link, _handler, mut peer, task) = linked(LONG).await;
    let frame = CloseFrame { code: CloseCode::Library(4000), reason: "replaced".into() };
    peer.send(Ws::Close(Some(frame))).await.expect("send");
    let Outcome::Ended(end) = task.await.expect("task") else { panic!("ended") };
    assert_eq!(end, End::PeerClosed(Some((4000, "replaced".into()))));
}
