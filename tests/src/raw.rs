//! A version-1 agent driven frame by frame, for protocol tests: it speaks
//! exactly what a test tells it to, including frames a real agent never
//! would.

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use tunnel_proto::{Hello, Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, Welcome, capability};

pub struct RawAgent {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Welcome,
}

/// What the relay sent.
#[derive(Debug)]
pub enum Received {
    Msg(Message),
    Data(tunnel_proto::frame::DataFrame),
    Closed(Option<u16>),
}

impl RawAgent {
    /// Connects with the v1 subprotocol, sends `hello` with `limits` and
    /// reads `welcome`.
    pub async fn connect(ws_url: &str, token: &str, limits: Limits) -> anyhow::Result<Self> {
        let mut request = ws_url.into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        request.headers_mut().insert("sec-websocket-protocol", SUBPROTOCOL.parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let hello = Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent: "raw-test-agent".into(),
            capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
            limits,
        });
        socket.send(Ws::text(hello.encode())).await?;
        let Some(Ok(Ws::Text(text))) = socket.next().await else { anyhow::bail!("no welcome") };
        let Message::Welcome(welcome) = Message::decode(&text, &Limits::default())? else {
            anyhow::bail!("expected welcome, got {text}")
        };
        Ok(Self { socket, welcome })
    }

    /// The WebSocket itself, for a test that reads and writes at once.
    pub fn into_socket(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.socket
    }

    /// Sends a frame as it is, for frames a WebSocket library would not
    /// build (a text frame that is not UTF-8).
    pub async fn send_frame(
        &mut self,
        frame: tokio_tungstenite::tungstenite::protocol::frame::Frame,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.socket.send(Ws::Frame(frame)).await
    }

    /// Sends a text frame, reporting failure (a relay that closed) instead
    /// of failing the test.
    pub async fn try_send_text(
        &mut self,
        text: &str,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.socket.send(Ws::text(text)).await
    }

    /// Reads until the relay closes, skipping everything else; the close
    /// code, if the relay sent one.
    pub async fn closed(&mut self, limit: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .expect("relay did not close the session in time");
            match next {
                Some(Ok(Ws::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Ws::text(text)).await.expect("send text frame");
    }

    pub async fn send(&mut self, msg: &Message) {
        self.send_text(&msg.encode()).await;
    }

    pub async fn send_binary(&mut self, bytes: Bytes) {
        self.socket.send(Ws::Binary(bytes)).await.expect("send binary frame");
    }

    pub async fn send_data(&mut self, id: &str, end: bool, payload: &[u8]) {
        self.send_binary(tunnel_proto::frame::encode(id, end, payload)).await;
    }

    /// The next message or body frame from the relay (WebSocket pings are
    /// skipped), waiting at most `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Received {
        loop {
            let frame = tokio::time::timeout(limit, self.socket.next())
                .await
                .expect("relay sent nothing in time");
            match frame {
                Some(Ok(Ws::Text(t))) => {
                    let limits = Limits { max_control_bytes: 64 << 20, ..Limits::default() };
                    return Received::Msg(
                        Message::decode(&t, &limits).expect("relay sent a valid message"),
                    );
                }
                Some(Ok(Ws::Binary(b))) => {
                    return Received::Data(
                        tunnel_proto::frame::decode(&b, 1 << 20).expect("relay sent a valid frame"),
                    );
                }
                Some(Ok(Ws::Close(f))) => return Received::Closed(f.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Closed(None),
            }
        }
    }

    /// The next control message, skipping body frames.
    pub async fn recv_msg(&mut self, limit: Duration) -> Message {
        loop {
            match self.recv(limit).await {
                Received::Msg(m) => return m,
                Received::Data(_) => continue,
                Received::Closed(code) => panic!("relay closed the session ({code:?})"),
            }
        }
    }
}
