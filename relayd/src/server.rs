//! The HTTP front door: routing, the agent WebSocket handshake, and the
//! relay's own endpoints.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{ALLOW, CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::RelayBody;
use crate::config::valid_user_id;
use crate::forward::forward;
use crate::response::{self, Shape, retry_after};
use crate::state::{Conn, Shared};
use crate::{agents, auth, cors};

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
        } else {
            let mut r = tunnel(&shared, &conn, req, user, target).await;
            cors::mark(&mut r, origin);
            r
        }
    } else if path == "/healthz" || path == "/readyz" {
        // Alive as long as it answers; ready (for a load balancer) unless
        // it drains.
        let (status, text) = if path == "/readyz" && shared.is_draining() {
            (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else {
            (StatusCode::OK, "ok\n")
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

async fn tunnel(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    user: String,
    target: String,
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
    // Checked with the query, which is only appended below.
    let full = match req.uri().query() {
        Some(q) => format!("{target}?{q}"),
        None => target.clone(),
    };
    if let Err(e) = tunnel_proto::path::check(&full) {
        return response::error(shape, StatusCode::BAD_REQUEST, "bad_path", &e.to_string());
    }
    // Whether the user exists is nobody's business before they proved who
    // they are: every user without a public tunnel needs a token.
    let principal = match auth::client(&shared.identity, req.headers(), &user).await {
        Ok(p) => p,
        Err(denied) => return response::denied(shape, denied),
    };
    if target == "/health" && req.method() == Method::GET {
        return health(shared, &user);
    }
    let scope = principal.as_ref().and_then(|p| p.scope.clone());
    if let Some(scope) = &scope
        && !scope.allows_path(&target)
    {
        return response::error(
            shape,
            StatusCode::FORBIDDEN,
            "out_of_scope",
            &format!("this share token does not cover {target}"),
        );
    }
    if let Some(wait) = shared.request_allowance(&user) {
        return retry_after(
            response::error(
                shape,
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this tunnel takes no more requests per minute; retry later",
            ),
            wait,
        );
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
    forward(shared, conn, session, req, full, scope).await
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
            // The agent's own view of its local service (agents that list
            // the `service` capability report it every 30 s).
            "service": s.service().map(|v| serde_json::json!({
                "reachable": v.reachable,
                "version": v.version,
                "models_loaded": v.models,
                "checked_at": v.checked_at,
            })),
        }),
        None => serde_json::json!({ "user": user, "connected": false }),
    };
    let mut r = Response::new(RelayBody::full(body.to_string()));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
