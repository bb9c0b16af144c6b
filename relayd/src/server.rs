//! The HTTP front door: routing, the agent WebSocket handshake, and the
//! relay's own endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, UPGRADE, WWW_AUTHENTICATE,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{info, warn};

use proto::{Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, Welcome, capability};

use crate::body::RelayBody;
use crate::config::valid_user_id;
use crate::forward::{error, forward, unavailable};
use crate::session::{AgentSocket, Session, SessionParams};
use crate::{Shared, auth};

/// Routes one request.
pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    let path = req.uri().path();
    let resp = if path == "/ws/tunnel" {
        accept_agent(&shared, req)
    } else if let Some(rest) = path.strip_prefix("/api/tunnel/") {
        let (user, target) = match rest.split_once('/') {
            Some((user, tail)) => (user.to_owned(), format!("/{tail}")),
            None => (rest.to_owned(), "/".to_owned()),
        };
        tunnel(&shared, req, user, target).await
    } else if path == "/healthz" || path == "/readyz" {
        let mut r = Response::new(RelayBody::full("ok\n"));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    } else {
        error(StatusCode::NOT_FOUND, "no such route; tunnels live under /api/tunnel/{user}/")
    };
    Ok(resp)
}

async fn tunnel(
    shared: &Shared,
    req: Request<Incoming>,
    user: String,
    mut target: String,
) -> Response<RelayBody> {
    if !valid_user_id(&user) {
        return error(StatusCode::BAD_REQUEST, "invalid user id in the path");
    }
    if has_dot_segment(&target) {
        return error(StatusCode::BAD_REQUEST, "path must not contain . or .. segments");
    }
    let Some(account) = shared.config.users.iter().find(|u| u.id == user) else {
        return error(StatusCode::NOT_FOUND, &format!("no tunnel for user {user:?}"));
    };
    if !auth::client_allowed(account, req.headers()) {
        return unauthorized("this tunnel needs the user's client token");
    }
    if target == "/health" && req.method() == Method::GET {
        return health(shared, &user);
    }
    if shared.is_draining() {
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "the relay is shutting down");
        r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let Some(session) = shared.hub.get(&user) else { return unavailable(&user) };
    if let Some(q) = req.uri().query() {
        target.push('?');
        target.push_str(q);
    }
    forward(shared, session, req, target).await
}

/// `GET /api/tunnel/{user}/health`, answered by the relay itself.
fn health(shared: &Shared, user: &str) -> Response<RelayBody> {
    let body = match shared.hub.get(user) {
        Some(s) => serde_json::json!({
            "user": user,
            "connected": true,
            "session_id": s.id,
            "since": humantime::format_rfc3339_seconds(s.connected_at).to_string(),
            "protocol_version": s.version,
            "agent": s.agent,
            "in_flight": s.in_flight(),
            "rtt_ms": s.rtt().map(|d| d.as_secs_f64() * 1e3),
        }),
        None => serde_json::json!({ "user": user, "connected": false }),
    };
    let mut r = Response::new(RelayBody::full(body.to_string()));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn has_dot_segment(path: &str) -> bool {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/').any(|seg| {
        let lower = seg.to_ascii_lowercase().replace("%2e", ".");
        lower == "." || lower == ".."
    })
}

fn unauthorized(message: &str) -> Response<RelayBody> {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// `GET /ws/tunnel`: authenticates the agent and upgrades to a WebSocket.
fn accept_agent(shared: &Arc<Shared>, mut req: Request<Incoming>) -> Response<RelayBody> {
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(headers.get(CONNECTION), "upgrade")
        && header_has_token(headers.get(UPGRADE), "websocket");
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return error(
            StatusCode::BAD_REQUEST,
            "this endpoint takes a WebSocket upgrade from agentd",
        );
    };
    if headers.get("sec-websocket-version").is_none_or(|v| v != "13") {
        let mut r = error(StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 required");
        r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
        return r;
    }
    if shared.is_draining() || !shared.admit_handshake() {
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "relay busy; retry with backoff");
        r.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let Some(user) = auth::bearer(headers).and_then(|t| auth::agent_user(&shared.config, t)) else {
        return unauthorized("agent token missing or not valid");
    };
    let user = user.id.clone();
    let v1 = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    let accept = derive_accept_key(key.as_bytes());

    let upgrade = hyper::upgrade::on(&mut req);
    let task_shared = shared.clone();
    shared.sessions.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "agent WebSocket upgrade failed");
                return;
            }
        };
        let config = ws_config(&task_shared.config.limits, v1);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        run_agent(task_shared, socket, user, v1).await;
    });

    let mut resp = Response::new(RelayBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    if v1 {
        h.insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    resp
}

/// WebSocket limits for one agent: version-1 frames are small control
/// messages or one body chunk; an original agent sends whole bodies.
pub fn ws_config(limits: &Limits, v1: bool) -> WebSocketConfig {
    let max = if v1 {
        (limits.max_control_bytes as usize)
            .max(limits.max_chunk_bytes as usize + 2 + proto::limits::MAX_ID_LEN)
    } else {
        proto::limits::LEGACY_MAX_MESSAGE_BYTES
    };
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

async fn run_agent(shared: Arc<Shared>, mut socket: AgentSocket, user: String, v1: bool) {
    let local = shared.config.limits;
    let (version, agent, peer, capabilities) = if v1 {
        match handshake(&shared, &mut socket).await {
            Ok(hello) => {
                (PROTOCOL_VERSION.min(hello.version), hello.agent, hello.limits, hello.capabilities)
            }
            Err(why) => {
                warn!(reason = %why, "agent handshake failed");
                let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code:
                        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Protocol,
                    reason: why.into(),
                };
                let _ = socket.close(Some(frame)).await;
                return;
            }
        }
    } else {
        (0, "original".to_owned(), Limits::default(), Vec::new())
    };
    let (session, rx) = Session::new(SessionParams {
        user,
        version,
        agent,
        peer,
        local,
        gauge: shared.gauge.clone(),
        ping_interval: shared.config.ping_interval,
        max_missed: shared.config.max_missed_pings,
        goaway: capabilities.iter().any(|c| c == capability::GOAWAY),
        acks: capabilities.iter().any(|c| c == capability::ACK),
    });
    if v1 {
        let welcome = Message::Welcome(Welcome {
            version,
            session_id: session.id.clone(),
            capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
            limits: local,
        });
        if socket.send(Ws::text(welcome.encode())).await.is_err() {
            return;
        }
    }
    info!(session = %session.id, version, "agent connected");
    shared.hub.register(session.clone());
    session.clone().run(socket, rx).await;
    shared.hub.remove(&session);
}

/// Reads the agent's `hello` within the configured time.
async fn handshake(shared: &Shared, socket: &mut AgentSocket) -> Result<proto::Hello, String> {
    let first = tokio::time::timeout(shared.config.hello_timeout, socket.next())
        .await
        .map_err(|_| "no hello from the agent in time".to_owned())?;
    let text = match first {
        Some(Ok(Ws::Text(t))) => t,
        Some(Ok(_)) => return Err("first message must be hello".into()),
        Some(Err(e)) => return Err(format!("socket error before hello: {e}")),
        None => return Err("agent closed before hello".into()),
    };
    match Message::decode(&text, &shared.config.limits) {
        Ok(Message::Hello(h)) if h.version >= 1 => match capability::missing(&h.capabilities) {
            Some(c) => Err(format!("hello lacks the required capability {c}")),
            None => Ok(h),
        },
        Ok(Message::Hello(h)) => Err(format!("unsupported protocol version {}", h.version)),
        Ok(_) => Err("first message must be hello".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn header_has_token(value: Option<&HeaderValue>, token: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_found_even_when_encoded() {
        assert!(has_dot_segment("/api/../etc"));
        assert!(has_dot_segment("/api/%2E%2e/x"));
        assert!(has_dot_segment("/./x"));
        assert!(!has_dot_segment("/api/chat"));
        assert!(!has_dot_segment("/api/v1.2/x?a=../b"));
    }
}
