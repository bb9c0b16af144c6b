//! The HTTP front door: routing, the agent WebSocket handshake, and the
//! relay's own endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use futures_util::{SinkExt, StreamExt};
use http::header::{
    ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_PROTOCOL, UPGRADE,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tracing::{info, warn};

use tunnel_proto::{Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, Welcome, capability};

use crate::admission::Verdict;
use crate::auth;
use crate::body::RelayBody;
use crate::config::valid_user_id;
use crate::forward::forward;
use crate::response::{self, Shape, Unauthorized, retry_after};
use crate::session::{AgentSocket, Session, SessionParams};
use crate::state::{Conn, Shared};

/// Methods the tunnel carries without being told.
const STANDARD_METHODS: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::OPTIONS,
];

/// Routes one request.
pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, Infallible> {
    if let Some(refusal) = check_request(&shared, &req) {
        return Ok(refusal);
    }
    let path = req.uri().path();
    let resp = if path == "/ws/tunnel" {
        // A refused upgrade closes the connection: a client gets one
        // attempt per connection, not hundreds per write.
        let mut r = accept_agent(&shared, &conn, req);
        if r.status() != StatusCode::SWITCHING_PROTOCOLS {
            r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    } else if let Some(rest) = path.strip_prefix("/api/tunnel/") {
        let (user, target) = match rest.split_once('/') {
            Some((user, tail)) => (user.to_owned(), format!("/{tail}")),
            None => (rest.to_owned(), "/".to_owned()),
        };
        tunnel(&shared, &conn, req, user, target).await
    } else if path == "/healthz" || path == "/readyz" {
        let mut r = Response::new(RelayBody::full("ok\n"));
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        r
    } else {
        response::error(
            Shape::Ollama,
            StatusCode::NOT_FOUND,
            "no_route",
            "no such route; tunnels live under /api/tunnel/{user}/",
        )
    };
    Ok(resp)
}

/// Refusals that hold for every route: a request without exactly one `Host`
/// (RFC 9112 3.2), and methods the tunnel cannot carry.
fn check_request(shared: &Shared, req: &Request<Incoming>) -> Option<Response<RelayBody>> {
    let shape = Shape::of(
        req.uri()
            .path()
            .strip_prefix("/api/tunnel/")
            .and_then(|r| r.find('/').map(|i| &r[i..]))
            .unwrap_or(""),
    );
    let hosts = req.headers().get_all(HOST).iter().count();
    let host_ok = match req.version() {
        http::Version::HTTP_10 | http::Version::HTTP_09 => hosts <= 1,
        _ => hosts == 1,
    };
    if !host_ok {
        let why = if hosts == 0 {
            "the request has no Host header"
        } else {
            "the request has more than one Host header"
        };
        let mut r = response::error(shape, StatusCode::BAD_REQUEST, "bad_host", why);
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return Some(r);
    }
    let method = req.method();
    if STANDARD_METHODS.contains(method)
        || shared.config.extra_methods.iter().any(|m| m == method.as_str())
    {
        return None;
    }
    let (status, code, why) = if method == Method::CONNECT || method == Method::TRACE {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} cannot cross the tunnel"),
        )
    } else {
        (
            StatusCode::NOT_IMPLEMENTED,
            "method_not_implemented",
            format!("this relay does not carry {method} requests"),
        )
    };
    let mut r = response::error(shape, status, code, &why);
    let mut allow: Vec<&str> = STANDARD_METHODS.iter().map(Method::as_str).collect();
    allow.extend(shared.config.extra_methods.iter().map(String::as_str));
    if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
        r.headers_mut().insert(ALLOW, v);
    }
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    Some(r)
}

async fn tunnel(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    user: String,
    mut target: String,
) -> Response<RelayBody> {
    let shape = Shape::of(&target);
    if !valid_user_id(&user) {
        return response::error(
            shape,
            StatusCode::BAD_REQUEST,
            "bad_user",
            "invalid user id in the path",
        );
    }
    if has_dot_segment(&target) {
        return response::error(
            shape,
            StatusCode::BAD_REQUEST,
            "bad_path",
            "path must not contain . or .. segments",
        );
    }
    let Some(account) = shared.config.users.iter().find(|u| u.id == user) else {
        return response::error(
            shape,
            StatusCode::NOT_FOUND,
            "no_tunnel",
            &format!("no tunnel for user {user:?}"),
        );
    };
    match auth::client_allowed(account, req.headers()) {
        Ok(()) => {}
        Err(Unauthorized::Missing) => {
            return response::unauthorized(
                shape,
                Unauthorized::Missing,
                "this tunnel needs a token: send Authorization: Bearer <client token>",
            );
        }
        Err(Unauthorized::Invalid) => {
            return response::unauthorized(
                shape,
                Unauthorized::Invalid,
                "the bearer token is not valid for this tunnel",
            );
        }
    }
    if target == "/health" && req.method() == Method::GET {
        return health(shared, &user);
    }
    if shared.is_draining() {
        let mut r = retry_after(
            response::error(
                shape,
                StatusCode::SERVICE_UNAVAILABLE,
                "relay_draining",
                "the relay is shutting down",
            ),
            1,
        );
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let Some(session) = shared.hub.get(&user) else {
        return response::agent_offline(shape, &user);
    };
    if let Some(q) = req.uri().query() {
        target.push('?');
        target.push_str(q);
    }
    forward(shared, conn, session, req, target).await
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

/// `GET /ws/tunnel`: authenticates the agent and upgrades to a WebSocket.
///
/// The source's budget of refused attempts is checked before the
/// credential, and the agents' shared allowance is spent only after it
/// proved valid (see [`crate::admission`]).
fn accept_agent(
    shared: &Arc<Shared>,
    conn: &Conn,
    mut req: Request<Incoming>,
) -> Response<RelayBody> {
    let err = |status, code, message: &str| response::error(Shape::Ollama, status, code, message);
    let headers = req.headers();
    let is_upgrade = req.method() == Method::GET
        && header_has_token(headers.get(CONNECTION), "upgrade")
        && header_has_token(headers.get(UPGRADE), "websocket");
    let Some(key) = headers.get(SEC_WEBSOCKET_KEY).filter(|_| is_upgrade) else {
        return err(
            StatusCode::BAD_REQUEST,
            "not_an_upgrade",
            "this endpoint takes a WebSocket upgrade from agentd",
        );
    };
    if headers.get("sec-websocket-version").is_none_or(|v| v != "13") {
        let mut r =
            err(StatusCode::UPGRADE_REQUIRED, "websocket_version", "WebSocket version 13 required");
        r.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
        return r;
    }
    let now = Instant::now();
    let source = shared.config.trusted_proxies.client(conn.peer.ip(), headers);
    if let Verdict::SourceBlocked { retry_after: wait } = shared.admission.check_source(source, now)
    {
        return retry_after(
            err(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_refused_handshakes",
                "too many refused agent handshakes from this address; retry later",
            ),
            wait,
        );
    }
    let user = match auth::bearer(headers) {
        None => Err(Unauthorized::Missing),
        Some(token) => auth::agent_user(&shared.config, token).ok_or(Unauthorized::Invalid),
    };
    let user = match user {
        Ok(u) => u.id.clone(),
        Err(why) => {
            shared.admission.refused(source, now);
            let message = match why {
                Unauthorized::Missing => "no agent token: send Authorization: Bearer <agent token>",
                Unauthorized::Invalid => "the agent token is not valid",
            };
            return response::unauthorized(Shape::Ollama, why, message);
        }
    };
    if shared.is_draining() || shared.admission.admit_agent(now) == Verdict::Busy {
        return retry_after(
            err(StatusCode::SERVICE_UNAVAILABLE, "relay_busy", "relay busy; retry with backoff"),
            1,
        );
    }
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
    link::ws_config(if v1 {
        limits.max_message_bytes()
    } else {
        tunnel_proto::limits::LEGACY_MAX_MESSAGE_BYTES
    })
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
        liveness: shared.config.liveness,
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
async fn handshake(
    shared: &Shared,
    socket: &mut AgentSocket,
) -> Result<tunnel_proto::Hello, String> {
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
