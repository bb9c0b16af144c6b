//! Dialling the relay: TCP (no Nagle), the WebSocket upgrade with the agent
//! token, and the `hello`/`welcome` exchange.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{AUTHORIZATION, HeaderValue, SEC_WEBSOCKET_PROTOCOL};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use rustls::pki_types::ServerName;

use tunnel_proto::{Frame, Hello, Limits, Message, PROTOCOL_VERSION, SUBPROTOCOL, capability};

use crate::Config;
use crate::config::Target;

/// Time allowed for TCP connect, upgrade and handshake together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

pub type RelaySocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A session the relay accepted.
pub struct Connected {
    pub socket: RelaySocket,
    pub session_id: String,
    pub relay_limits: Limits,
    /// The relay listed `ack`: acknowledge each request as it is accepted.
    pub relay_acks: bool,
    /// The relay listed `auth`: the session can be renewed in-band.
    pub relay_auth: bool,
    /// The relay listed `service`: it takes reports of the local service.
    pub relay_service: bool,
    /// When the session's authorization ends unless renewed.
    pub expires: Option<std::time::SystemTime>,
    /// An access token the relay minted for the credential: the session
    /// was opened with a credential and renews with `refresh`.
    pub access_token: Option<String>,
    /// The pin of the relay's key (TLS only).
    pub relay_pin: Option<String>,
}

/// Why a connection attempt failed. Callers branch on `Unauthorized` (retry
/// slowly) versus everything else (retry with backoff).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("the relay refused the agent token ({0})")]
    Unauthorized(u16),
    /// The relay says the credential was revoked: only a new one helps.
    #[error("the agent's credential was revoked")]
    Revoked,
    #[error("the relay is busy or draining (503); retrying")]
    Busy,
    /// The user has as many other devices connected as the relay allows.
    #[error(
        "the relay holds as many devices of this user as it allows (409 too_many_devices): disconnect one, or ask its operator to raise [limits] max_devices_per_user; retrying"
    )]
    TooManyDevices,
    #[error("cannot reach the relay: {0}")]
    Unreachable(String),
    #[error("WebSocket handshake failed: {0}")]
    Handshake(String),
    #[error("the relay does not speak tunnel protocol v1: {0}")]
    Protocol(String),
    #[error("timed out connecting to the relay")]
    Timeout,
    #[error("TLS with the relay failed: {0}")]
    Tls(String),
    /// The relay's key is none of the pinned ones.
    #[error("{0}")]
    PinMismatch(crate::tls::PinMismatch),
}

/// Dials the relay with `token` and negotiates a session.
pub async fn connect(
    config: &Config,
    target: &Target,
    token: &str,
) -> Result<Connected, ConnectError> {
    tokio::time::timeout(CONNECT_TIMEOUT, try_connect(config, target, token))
        .await
        .map_err(|_| ConnectError::Timeout)?
}

async fn try_connect(
    config: &Config,
    target: &Target,
    token: &str,
) -> Result<Connected, ConnectError> {
    let uri = &target.relay;
    let host = uri.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']');
    let port = daemon::url::port(uri);
    let unreachable = |e: std::io::Error| ConnectError::Unreachable(e.to_string());
    let tcp = TcpStream::connect((host, port)).await.map_err(unreachable)?;
    tcp.set_nodelay(true).map_err(unreachable)?;
    let mut relay_pin = None;
    let stream = match (uri.scheme_str(), &target.tls) {
        (Some("ws"), _) => MaybeTlsStream::Plain(tcp),
        (_, None) => {
            // Never fall back to plain text (and the token in clear).
            return Err(ConnectError::Tls(format!("no TLS settings for {uri}")));
        }
        (_, Some(tls)) => {
            let name = ServerName::try_from(host.to_owned()).map_err(|e| {
                ConnectError::Tls(format!("{host:?} is not a valid server name: {e}"))
            })?;
            let stream = TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(|e| {
                match crate::tls::PinMismatch::find(&e) {
                    Some(m) => ConnectError::PinMismatch(m),
                    None => ConnectError::Tls(crate::tls::explain(&e, host)),
                }
            })?;
            relay_pin = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| crate::tls::Pin::of(c).ok())
                .map(|p| p.to_string());
            MaybeTlsStream::Rustls(stream)
        }
    };

    let mut request = uri
        .to_string()
        .into_client_request()
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Handshake("token is not a valid header value".into()))?;
    request.headers_mut().insert(AUTHORIZATION, bearer);
    request.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));

    let limits = &config.limits;
    let ws_config = link::ws_config(limits.max_message_bytes());
    let (mut socket, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Http(resp)
                    if resp.status() == 401
                        && resp
                            .headers()
                            .get(tunnel_proto::ERROR_CODE_HEADER)
                            .is_some_and(|c| c == tunnel_proto::REVOKED_TOKEN) =>
                {
                    ConnectError::Revoked
                }
                tokio_tungstenite::tungstenite::Error::Http(resp)
                    if resp.status() == 401 || resp.status() == 403 =>
                {
                    ConnectError::Unauthorized(resp.status().as_u16())
                }
                tokio_tungstenite::tungstenite::Error::Http(resp)
                    if resp.status() == 503 || resp.status() == 429 =>
                {
                    ConnectError::Busy
                }
                tokio_tungstenite::tungstenite::Error::Http(resp) if resp.status() == 409 => {
                    ConnectError::TooManyDevices
                }
                other => ConnectError::Handshake(other.to_string()),
            })?;
    if response.headers().get(SEC_WEBSOCKET_PROTOCOL).is_none_or(|p| p != SUBPROTOCOL) {
        return Err(ConnectError::Protocol("no subprotocol in the upgrade response".into()));
    }

    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: format!("agentd/{}", env!("CARGO_PKG_VERSION")),
        capabilities: capability::ALL.iter().map(|c| (*c).to_owned()).collect(),
        limits: *limits,
    });
    socket
        .send(link::ws(Frame::message(&hello)))
        .await
        .map_err(|e| ConnectError::Handshake(e.to_string()))?;
    let reply = match socket.next().await {
        Some(Ok(Ws::Text(t))) => t,
        Some(Ok(Ws::Close(f))) => {
            return Err(ConnectError::Protocol(
                f.map(|f| f.reason.to_string()).unwrap_or_else(|| "closed".into()),
            ));
        }
        Some(Ok(_)) => return Err(ConnectError::Protocol("expected welcome".into())),
        Some(Err(e)) => return Err(ConnectError::Handshake(e.to_string())),
        None => return Err(ConnectError::Protocol("relay closed before welcome".into())),
    };
    match Message::decode(&reply, limits) {
        Ok(Message::Welcome(w))
            if w.version == PROTOCOL_VERSION && capability::missing(&w.capabilities).is_some() =>
        {
            let c = capability::missing(&w.capabilities).unwrap_or_default();
            Err(ConnectError::Protocol(format!("welcome lacks the required capability {c}")))
        }
        Ok(Message::Welcome(w)) if w.version == PROTOCOL_VERSION => {
            let listed = |cap: &str| w.capabilities.iter().any(|c| c == cap);
            Ok(Connected {
                relay_acks: listed(capability::ACK),
                relay_auth: listed(capability::AUTH),
                relay_service: listed(capability::SERVICE),
                expires: w.expires_at.as_deref().and_then(|t| humantime::parse_rfc3339(t).ok()),
                access_token: w.token,
                relay_pin,
                socket,
                session_id: w.session_id,
                relay_limits: w.limits,
            })
        }
        Ok(Message::Welcome(w)) => {
            Err(ConnectError::Protocol(format!("relay chose version {}", w.version)))
        }
        Ok(other) => {
            Err(ConnectError::Protocol(format!("expected welcome, got {}", other.encode())))
        }
        Err(e) => Err(ConnectError::Protocol(e.to_string())),
    }
}
