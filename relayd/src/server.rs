//! The HTTP front door: routing, the agent WebSocket handshake, and the
//! relay's own endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::info;

use crate::body::RelayBody;
use crate::edge::{self, Admitted};
use crate::forward::Attempt;
use crate::response::{self, Shape};
use crate::route::{AgentStatus, Route, Why};
use crate::state::{Conn, Shared};
use crate::{agents, cors, forward};

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
    let mut req = req;
    if !conn.hop && shared.peers.is_some() {
        // What replicas tell each other, never taken from a client (a relay
        // that forwards nothing trusts them nowhere: no work per request).
        req.headers_mut().remove(crate::hop::HOP);
        req.headers_mut().remove(crate::hop::CLIENT);
    }
    let path = req.uri().path();
    let resp = if path == "/ws/tunnel" {
        // A refused upgrade closes the connection: a client gets one
        // attempt per connection, not hundreds per write.
        let mut r = agents::accept(&shared, &conn, req).await;
        if r.status() != StatusCode::SWITCHING_PROTOCOLS {
            r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        }
        r
    } else if let Some(rest) = path.strip_prefix("/api/tunnel/") {
        let (user, target) = match rest.split_once('/') {
            Some((user, tail)) => (user.to_owned(), format!("/{tail}")),
            None => (rest.to_owned(), "/".to_owned()),
        };
        let origin = cors::allowed(&shared.config.cors_origins, req.headers());
        if cors::is_preflight(req.method(), req.headers()) && !shared.config.cors_origins.is_empty()
        {
            cors::preflight(origin, req.headers(), &allowed_methods(&shared), Shape::of(&target))
        } else if (conn.hop || shared.peers.is_some()) && !shared.router.holds(&user) {
            if conn.hop {
                // Forwarded once already: never twice.
                return Ok(crate::hop::misdirected(&shared, &user, &target));
            }
            // Held by another replica: one hop there.
            match crate::hop::forward(&shared, &conn, &user, &target, req).await {
                // The replica that served it marked it.
                Ok(r) if matches!(r.body(), RelayBody::Peer(_)) => r,
                Ok(mut r) => {
                    cors::mark(&mut r, origin);
                    r
                }
                Err(req) => {
                    let mut r = tunnel(&shared, &conn, req, user, target).await;
                    cors::mark(&mut r, origin);
                    r
                }
            }
        } else {
            let mut r = tunnel(&shared, &conn, req, user, target).await;
            cors::mark(&mut r, origin);
            r
        }
    } else if path == "/healthz" || path == "/readyz" {
        // Alive as long as it answers; ready (for a load balancer) unless
        // it drains or, run as a replica, has lost its database.
        let (status, text) = match shared.identity.fresh() {
            _ if path == "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
            _ if shared.is_draining() => (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
            Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        };
        let mut r = Response::new(RelayBody::full(text));
        *r.status_mut() = status;
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
    if let Ok(v) = HeaderValue::from_str(&allowed_methods(shared)) {
        r.headers_mut().insert(ALLOW, v);
    }
    r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
    Some(r)
}

/// The methods the tunnel carries, for `Allow` and CORS.
fn allowed_methods(shared: &Shared) -> String {
    let mut allow: Vec<&str> = STANDARD_METHODS.iter().map(Method::as_str).collect();
    allow.extend(shared.config.extra_methods.iter().map(String::as_str));
    allow.join(", ")
}

/// A request to a tunnel: the edge admits it, the router answers where it
/// goes, delivery takes it there.
async fn tunnel(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    user: String,
    path: String,
) -> Response<RelayBody> {
    let shape = Shape::of(&path);
    let req = match edge::admit(shared, conn, req, user, path).await {
        Ok(Admitted::Tunnel(req)) => req,
        Ok(Admitted::Health { user }) => return health(shared.router.status(&user), &user),
        Err(refusal) => return refusal,
    };
    // Counted before the sessions are copied: a user with one device (the
    // common case) pays no allocation for a model list.
    if let Some(listing) = crate::union::listing(&req.parts.method, req.path())
        && shared.router.devices(&req.user) > 1
    {
        let devices = shared.router.everyone(&req.user);
        return crate::union::answer(shared, conn, devices, req, listing).await;
    }
    match shared.router.route(req.ask()) {
        // With several devices, a request whose body can be sent again goes
        // to the next candidate, once, when its device is lost or refuses
        // before answering: nothing reached the client yet.
        Route::Choice(session, why) => {
            let Some(spare) = req.replay() else {
                return forward::deliver(shared, conn, session, req, Some(why)).await;
            };
            match forward::attempt(shared, conn, session.clone(), req, Some(why), true).await {
                Attempt::Answered(resp) => resp,
                Attempt::Lost(failure) => match shared.router.route_past(spare.ask(), &session) {
                    Route::Local(next) => {
                        info!(user = %next.user_hash, from = %session.device, to = %next.device, "a device failed before answering; the request goes to another");
                        forward::deliver(shared, conn, next, spare, Some(Why::Failover)).await
                    }
                    _ => failure.answer(shape),
                },
            }
        }
        Route::Local(session) => forward::deliver(shared, conn, session, req, None).await,
        Route::Offline => response::agent_offline(shape, &req.user),
        Route::ModelOffline { model, device } => response::retry_after(
            response::error(
                shape,
                StatusCode::SERVICE_UNAVAILABLE,
                "device_offline",
                &format!("model {model:?} is on {device:?}, which is not connected now"),
            ),
            30,
        ),
        Route::NoModel(model) => response::error(
            shape,
            StatusCode::NOT_FOUND,
            "model_not_found",
            &format!("model {model:?} not found on any of this user's connected devices"),
        ),
    }
}

/// `GET /api/tunnel/{user}/health`, answered by the relay itself from what
/// the router knows of the user's agent.
/// The health answer: the agent a request naming no model reaches, at the
/// top level as before devices, and every connected device under
/// `devices`.
fn health(agents: Vec<AgentStatus>, user: &str) -> Response<RelayBody> {
    let body = match agents.first() {
        Some(first) => {
            let mut top = agent_json(first);
            top["user"] = user.into();
            top["connected"] = true.into();
            top["devices"] = agents.iter().map(agent_json).collect();
            top
        }
        None => serde_json::json!({ "user": user, "connected": false, "devices": [] }),
    };
    let mut r = Response::new(RelayBody::full(body.to_string()));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// Each model a device has once, with its state: `loaded` (in memory),
/// `loading` (for a request not answered yet), `on_disk`; and its `size`
/// and `context_length` where the service told them.
fn model_states(service: &tunnel_proto::ServiceState, loading: &[String]) -> serde_json::Value {
    let state = |name: &str| {
        if service.models.iter().any(|m| m == name) {
            "loaded"
        } else if loading.iter().any(|m| m == name) {
            "loading"
        } else {
            "on_disk"
        }
    };
    let mut names: Vec<&String> =
        service.models.iter().chain(loading).chain(&service.available).collect();
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.as_str()));
    let detail = |name: &str| service.details.iter().find(|d| d.name == name);
    names
        .iter()
        .map(|n| {
            let mut v = serde_json::json!({ "name": n, "state": state(n) });
            if let Some(d) = detail(n) {
                if let Some(size) = d.size {
                    v["size"] = size.into();
                }
                if let Some(context) = d.context_length {
                    v["context_length"] = context.into();
                }
            }
            v
        })
        .collect()
}

fn agent_json(a: &AgentStatus) -> serde_json::Value {
    serde_json::json!({
        "device": a.device,
        "session_id": a.session_id,
        "since": humantime::format_rfc3339_seconds(a.since).to_string(),
        "protocol_version": a.protocol_version,
        "agent": a.agent,
        "in_flight": a.in_flight,
        "rtt_ms": a.rtt.map(|d| d.as_secs_f64() * 1e3),
        "priority": a.priority,
        "tokens_per_second": a.tokens_per_second,
        "service": a.service.as_ref().map(|v| serde_json::json!({
            "reachable": v.reachable,
            "version": v.version,
            "models_loaded": v.models,
            "models_available": v.available,
            "models_loading": a.loading,
            "models": model_states(v, &a.loading),
            "checked_at": v.checked_at,
        })),
    })
}
