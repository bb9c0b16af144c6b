//! An agent that speaks only the five original messages: whole bodies as
//! strings in `http_request`/`http_response`, `ping`/`pong`, `error`. It
//! proves relayd still serves agents built for the original protocol.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use tunnel_proto::{Headers, HttpResponseMsg, Limits, Message};

/// A running original-protocol agent; disconnects when dropped.
pub struct LegacyAgent {
    shutdown: CancellationToken,
}

impl LegacyAgent {
    /// Connects to `ws_url` with `token` (no subprotocol, no hello) and
    /// forwards requests to `upstream`.
    pub async fn connect(ws_url: &str, token: &str, upstream: &str) -> anyhow::Result<Self> {
        let mut request = ws_url.into_client_request()?;
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
        let (socket, _) = tokio_tungstenite::connect_async(request).await?;
        let (mut sink, mut stream) = socket.split();
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = mpsc::channel::<String>(16);
        let upstream: Arc<str> = upstream.trim_end_matches('/').into();
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    out = rx.recv() => match out {
                        Some(text) => if sink.send(Ws::text(text)).await.is_err() { break },
                        None => break,
                    },
                    frame = stream.next() => {
                        let Some(Ok(Ws::Text(text))) = frame else { break };
                        let limits = Limits { max_control_bytes: 64 << 20, ..Limits::default() };
                        match Message::decode(&text, &limits) {
                            Ok(Message::Ping(p)) => { let _ = tx.send(Message::pong(&p).encode()).await; }
                            Ok(Message::HttpRequest(req)) => {
                                let tx = tx.clone();
                                let client = client.clone();
                                let upstream = upstream.clone();
                                tokio::spawn(async move {
                                    let reply = forward(&client, &upstream, req).await;
                                    let _ = tx.send(reply.encode()).await;
                                });
                            }
                            _ => {}
                        }
                    }
                }
            }
            let _ = sink.close().await;
        });
        Ok(Self { shutdown })
    }
}

impl Drop for LegacyAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn forward(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    upstream: &str,
    req: tunnel_proto::HttpRequestMsg,
) -> Message {
    let id = req.id.clone();
    let mut builder =
        http::Request::builder().method(req.method.as_str()).uri(format!("{upstream}{}", req.path));
    for (name, value) in &req.headers.0 {
        if !name.eq_ignore_ascii_case("host") {
            builder = builder.header(name, value);
        }
    }
    let Ok(out) = builder.body(Full::new(Bytes::from(req.body.unwrap_or_default()))) else {
        return Message::error(id, 400, "bad request");
    };
    let resp = match client.request(out).await {
        Ok(r) => r,
        Err(e) => return Message::error(id, 502, e.to_string()),
    };
    let (parts, body) = resp.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Message::error(id, 502, e.to_string()),
    };
    let headers = Headers::from_map(&parts.headers, &[]).unwrap_or_default();
    Message::HttpResponse(HttpResponseMsg {
        id,
        status: parts.status.as_u16(),
        headers,
        body: Some(String::from_utf8_lossy(&body).into_owned()),
    })
}
