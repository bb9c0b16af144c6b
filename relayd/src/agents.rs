//! The agents' door, `GET /ws/tunnel`: who may knock, how often, and the
//! `hello`/`welcome` that opens a session.
//!
//! The source's budget of refused attempts is checked before the
//! credential; the agents' shared allowance and the user's own are spent
//! only after it proved valid (see [`crate::admission`]). A session opened
//! with an agent credential gets a short-lived access token in `welcome`
//! and must refresh it in-band; one opened with a JWT lasts until that
//! token expires unless the agent re-authenticates.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::{SinkExt, StreamExt};
use http::header::{
    CONNECTION, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_PROTOCOL,
    UPGRADE,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role as WsRole, WebSocketConfig};
use tracing::{info, warn};

use tunnel_proto::{Frame, Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, Welcome, capability};

use crate::admission::Verdict;
use crate::auth;
use crate::body::RelayBody;
use crate::identity::{Principal, Via};
use crate::response::{self, Shape, retry_after};
use crate::session::{AgentSocket, CloseReason, Session, SessionParams};
use crate::state::{Conn, Shared};

/// `GET /ws/tunnel`: authenticates the agent and upgrades to a WebSocket.
pub async fn accept(
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
    let principal = match auth::agent(&shared.identity, headers).await {
        Ok(p) => p,
        Err(denied) => {
            shared.admission.refused(source, now);
            return response::denied(Shape::Ollama, denied);
        }
    };
    if shared.is_draining() || shared.admission.admit_agent(now) == Verdict::Busy {
        return retry_after(
            err(StatusCode::SERVICE_UNAVAILABLE, "relay_busy", "relay busy; retry with backoff"),
            1,
        );
    }
    let device = principal.device();
    if let Verdict::SourceBlocked { retry_after: wait } =
        shared.admission.admit_user(&format!("{}/{device}", principal.user), now)
    {
        return retry_after(
            err(
                StatusCode::TOO_MANY_REQUESTS,
                "reconnecting_too_often",
                "this device's agent reconnects too often (two agents with one credential?); retry later",
            ),
            wait,
        );
    }
    let hub = shared.router.local();
    if let Err(e) = hub.admits(&principal.user, device, shared.config.max_devices_per_user) {
        return err(
            StatusCode::CONFLICT,
            "too_many_devices",
            &format!(
                "this user has {} devices connected, as many as the relay allows ([limits] max_devices_per_user); disconnect one or raise the limit",
                e.limit
            ),
        );
    }
    if hub.len() >= shared.config.max_tunnels && hub.device(&principal.user, device).is_none() {
        return retry_after(
            err(
                StatusCode::SERVICE_UNAVAILABLE,
                "relay_full",
                "the relay holds as many tunnels as it may; retry later",
            ),
            5,
        );
    }
    let v1 = headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return err(StatusCode::BAD_REQUEST, "not_an_upgrade", "unusable Sec-WebSocket-Key");
    };

    let upgrade = hyper::upgrade::on(&mut req);
    let task_shared = shared.clone();
    shared.sessions.spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                warn!(error = %e, "an agent's WebSocket upgrade failed: {e}");
                return;
            }
        };
        let config = ws_config(&task_shared.config.limits, v1);
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), WsRole::Server, Some(config))
                .await;
        run(task_shared, socket, principal, v1).await;
    });

    let mut resp = Response::new(RelayBody::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(SEC_WEBSOCKET_ACCEPT, accept);
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

/// How long a new session is authorized, and the access token minted for
/// a credential (when relayd has a signing key).
fn authorization(shared: &Shared, principal: &Principal) -> (Option<SystemTime>, Option<String>) {
    match principal.via {
        Via::Credential => {
            let credential = principal.id.as_deref().unwrap_or_default();
            match shared.identity.mint_access(&principal.user, Some(principal.device()), credential)
            {
                Ok(Some(m)) => (Some(m.expires), Some(m.token)),
                Ok(None) => (None, None),
                Err(e) => {
                    warn!(error = %e, "cannot mint an access token ({e}); the session is not limited in time");
                    (None, None)
                }
            }
        }
        Via::Token => (principal.expires, None),
        Via::Static => (None, None),
    }
}

async fn run(shared: Arc<Shared>, mut socket: AgentSocket, principal: Principal, v1: bool) {
    let local = shared.config.limits;
    let (version, agent, peer, capabilities) = if v1 {
        match handshake(&shared, &mut socket).await {
            Ok(hello) => {
                (PROTOCOL_VERSION.min(hello.version), hello.agent, hello.limits, hello.capabilities)
            }
            Err(why) => {
                warn!(reason = %why, "an agent's handshake failed: {why}");
                let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code:
                        tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Protocol,
                    reason: why.to_string().into(),
                };
                let _ = socket.close(Some(frame)).await;
                return;
            }
        }
    } else {
        (0, "original".to_owned(), Limits::default(), Vec::new())
    };
    let (expires, token) = authorization(&shared, &principal);
    let user_hash = shared.user_hash(&principal.user);
    let (session, rx) = Session::new(SessionParams {
        principal,
        user_hash: user_hash.clone(),
        expires,
        identity: shared.identity.clone(),
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
            expires_at: expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            token,
        });
        if socket.send(link::ws(Frame::message(&welcome))).await.is_err() {
            return;
        }
    }
    info!(session = %session.id, user = %user_hash, device = %session.device, version, "agent connected");
    let hub = shared.router.local();
    if hub.register(session.clone(), shared.config.max_devices_per_user).is_err() {
        // Another device of the user came in since the handshake's check.
        session.close(CloseReason::TooManyDevices);
    }
    // Out of the route as soon as the link ends (a peer that stopped
    // answering pings, a close), not once the close handshake is done: that
    // may wait up to 2 s for a peer that is not there any more.
    let run = session.clone().run(socket, rx);
    tokio::pin!(run);
    tokio::select! {
        () = &mut run => {}
        () = session.closed() => {
            hub.remove(&session);
            run.await;
        }
    }
    hub.remove(&session);
}

/// Why an agent's `hello` was not accepted (the session closes with 1002
/// and this reason).
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("no hello from the agent in time")]
    Timeout,
    #[error("first message must be hello")]
    NotHello,
    #[error("socket error before hello: {0}")]
    Socket(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("agent closed before hello")]
    Closed,
    #[error("hello lacks the required capability {0}")]
    MissingCapability(String),
    #[error("unsupported protocol version {0}")]
    Version(u32),
    #[error("{0}")]
    Invalid(#[from] tunnel_proto::ProtocolError),
}

/// Reads the agent's `hello` within the configured time.
async fn handshake(
    shared: &Shared,
    socket: &mut AgentSocket,
) -> Result<tunnel_proto::Hello, HandshakeError> {
    let first = tokio::time::timeout(shared.config.hello_timeout, socket.next())
        .await
        .map_err(|_| HandshakeError::Timeout)?;
    let text = match first {
        Some(Ok(Ws::Text(t))) => t,
        Some(Ok(_)) => return Err(HandshakeError::NotHello),
        Some(Err(e)) => return Err(e.into()),
        None => return Err(HandshakeError::Closed),
    };
    match Message::decode(&text, &shared.config.limits)? {
        Message::Hello(h) if h.version >= 1 => match capability::missing(&h.capabilities) {
            Some(c) => Err(HandshakeError::MissingCapability(c.to_string())),
            None => Ok(h),
        },
        Message::Hello(h) => Err(HandshakeError::Version(h.version)),
        _ => Err(HandshakeError::NotHello),
    }
}

fn header_has_token(value: Option<&HeaderValue>, token: &str) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}
