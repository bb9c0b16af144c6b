//! The edge: what the relay allows of a request to a tunnel, and what the
//! request asks for, decided before any agent is picked.
//!
//! In order: the user id and the path, the client's token (whether a user
//! exists is nobody's business before they proved who they are), the share
//! token's paths, the user's budget, draining, a share token's models (the
//! body is read and checked), and the header fields that stay at the relay
//! with the limits on the rest. What comes out is an admitted [`Request`]
//! whose [`Request::ask`] the router answers ([`crate::route`]).

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_LENGTH, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;

use tunnel_proto::Headers;

use crate::auth;
use crate::body::RelayBody;
use crate::config::valid_user_id;
use crate::identity::Scope;
use crate::response::{self, Failure, Shape, retry_after};
use crate::route::Ask;
use crate::state::{Conn, Shared};
use crate::upload::{self, ClientBody};

/// What the edge made of a request to a tunnel.
#[expect(
    clippy::large_enum_variant,
    reason = "made and matched once per request; boxing would cost an allocation each"
)]
pub enum Admitted {
    /// `GET /api/tunnel/{user}/health`, which the relay answers itself.
    Health { user: String },
    /// A request for the user's agent.
    Tunnel(Request),
}

/// A request the edge admitted, with only the header fields that cross.
pub struct Request {
    pub user: String,
    /// Path and query at the local service.
    pub target: String,
    pub parts: Parts,
    /// The fields the agent gets.
    pub headers: Headers,
    pub body: ClientBody,
    /// The body's declared `Content-Length`.
    pub declared: Option<u64>,
    /// The model the body names, when the edge read the body.
    pub model: Option<String>,
    /// The conversation it belongs to ([`crate::affinity`]), when the user
    /// has several devices.
    pub affinity: Option<u64>,
}

impl Request {
    /// What the router is asked.
    pub fn ask(&self) -> Ask<'_> {
        Ask { user: &self.user, model: self.model.as_deref(), affinity: self.affinity }
    }

    /// A second copy of the request, when its body can be sent again: read
    /// whole already, or empty. A streamed body cannot: such a request is
    /// never sent to a second device.
    pub fn replay(&self) -> Option<Self> {
        let body = match &self.body {
            http_body_util::Either::Right(full) => http_body_util::Either::Right(full.clone()),
            http_body_util::Either::Left(b) if http_body::Body::is_end_stream(b) => {
                http_body_util::Either::Right(http_body_util::Full::new(Bytes::new()))
            }
            http_body_util::Either::Left(_) => return None,
        };
        let mut parts = http::Request::new(());
        *parts.method_mut() = self.parts.method.clone();
        *parts.uri_mut() = self.parts.uri.clone();
        *parts.version_mut() = self.parts.version;
        *parts.headers_mut() = self.parts.headers.clone();
        Some(Request {
            user: self.user.clone(),
            target: self.target.clone(),
            parts: parts.into_parts().0,
            headers: self.headers.clone(),
            body,
            declared: self.declared,
            model: self.model.clone(),
            affinity: self.affinity,
        })
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }
}

/// Admits the request `req` for `user`'s tunnel at `path` (after
/// `/api/tunnel/{user}`), or answers it.
pub async fn admit(
    shared: &Shared,
    conn: &Conn,
    req: hyper::Request<Incoming>,
    user: String,
    path: String,
) -> Result<Admitted, Response<RelayBody>> {
    let shape = Shape::of(&path);
    if !valid_user_id(&user) {
        let why = "invalid user id in the path";
        return Err(response::error(shape, StatusCode::BAD_REQUEST, "bad_user", why));
    }
    // Checked with the query, which is only appended here.
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    if let Err(e) = tunnel_proto::path::check(&target) {
        return Err(response::error(shape, StatusCode::BAD_REQUEST, "bad_path", &e.to_string()));
    }
    let principal = match auth::client(&shared.identity, req.headers(), &user).await {
        Ok(p) => p,
        Err(denied) => return Err(response::denied(shape, denied)),
    };
    if path == "/health" && req.method() == Method::GET {
        return Ok(Admitted::Health { user });
    }
    let scope = principal.and_then(|p| p.scope);
    if let Some(scope) = &scope
        && !scope.allows_path(&path)
    {
        let why = format!("this share token does not cover {path}");
        return Err(response::error(shape, StatusCode::FORBIDDEN, "out_of_scope", &why));
    }
    if let Some(wait) = shared.request_allowance(&user) {
        let why = "this tunnel takes no more requests per minute; retry later";
        let r = response::error(shape, StatusCode::TOO_MANY_REQUESTS, "rate_limited", why);
        return Err(retry_after(r, wait));
    }
    if shared.is_draining() {
        let why = "the relay is shutting down";
        let r = response::error(shape, StatusCode::SERVICE_UNAVAILABLE, "relay_draining", why);
        let mut r = retry_after(r, 1);
        r.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return Err(r);
    }
    let request = crossing(shared, conn, req, user, target, scope).await;
    request.map(Admitted::Tunnel).map_err(|f| f.answer(shape))
}

/// What of `req` crosses the tunnel: its body checked against a share
/// token's models, its header fields without those that stay here, within
/// the relay's limits.
async fn crossing(
    shared: &Shared,
    conn: &Conn,
    req: hyper::Request<Incoming>,
    user: String,
    target: String,
    scope: Option<Scope>,
) -> Result<Request, Failure> {
    let config = &shared.config;
    let (mut parts, body) = req.into_parts();
    let path = target.split('?').next().unwrap_or(&target);
    let idle = config.timeouts_for(path).idle;
    let mut affinity = None;
    let (body, model) = match scope.filter(Scope::limits_models) {
        Some(scope) => {
            let (bytes, model) = models_checked(body, &scope, config.legacy_max_body, idle).await?;
            parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            parts.headers.remove(TRANSFER_ENCODING);
            (ClientBody::Right(http_body_util::Full::new(bytes)), Some(model))
        }
        // Several devices, or devices that left with models: the model the
        // body names picks one. Read whole
        // (with the length declared, up to the share-token bound), then
        // forwarded as read; a body the relay cannot read as JSON goes to
        // the newest device, which answers it.
        None if names_a_model(&parts, path, config.legacy_max_body)
            && shared.router.routes_by_model(&user) =>
        {
            let too_large = "a body whose model picks the device is read whole";
            let read =
                upload::read_whole(ClientBody::Left(body), config.legacy_max_body, idle, too_large);
            let bytes = read.await?;
            let model = daemon::model::named_models(&bytes).ok().and_then(|m| m.into_iter().next());
            affinity = crate::affinity::key(&parts.headers, Some(&bytes));
            (ClientBody::Right(http_body_util::Full::new(bytes)), model)
        }
        None => (ClientBody::Left(body), None),
    };
    let trusted_peer = config.trusted_proxies.trusts(conn.peer.ip());
    let headers = Headers::from_map_without(&parts.headers, |n| {
        not_forwarded(n, config.forward_cookies, trusted_peer)
    })
    .map_err(|e| Failure::refused(StatusCode::BAD_REQUEST, e.detail))?;
    if let Err(e) = headers.check_size(&config.limits) {
        return Err(Failure::refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, e.detail));
    }
    let declared = parts
        .headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > config.max_request_body) {
        return Err(Failure::refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request body is larger than this relay accepts",
        ));
    }
    Ok(Request { user, target, parts, headers, body, declared, model, affinity })
}

/// Whether a request is one whose body names the model it runs on, with
/// the length declared and at most `max` bytes: inference and model
/// details on Ollama's API and OpenAI's. Pulls, pushes, copies and deletes
/// name a model too, but no device need have it: they go to the newest.
fn names_a_model(parts: &Parts, path: &str, max: usize) -> bool {
    let declared =
        parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    parts.method == Method::POST
        && daemon::model::runs_a_model(path)
        && declared.is_some_and(|n| n <= max)
}

/// Whether a web client's header field stays at the relay: the relay's own
/// credential and cookies (unless `forward_cookies`), the client's view of
/// the relay's host (the agent sets `Host` for the local service), `Expect`
/// (the relay already answered it), and forwarding fields a client could
/// forge (unless they come from a trusted proxy).
fn not_forwarded(name: &HeaderName, forward_cookies: bool, trusted_peer: bool) -> bool {
    use http::header::{AUTHORIZATION, COOKIE, EXPECT, FORWARDED, HOST};
    name == AUTHORIZATION
        || name == HOST
        || name == EXPECT
        || (name == COOKIE && !forward_cookies)
        || (!trusted_peer
            && (name == FORWARDED
                || name.as_str().starts_with("x-forwarded-")
                || name.as_str() == "x-real-ip"))
}

/// Reads the whole body of a request made with a share token limited to
/// some models, and checks the models it names; returns the body and the
/// model it names.
async fn models_checked(
    body: Incoming,
    scope: &Scope,
    max: usize,
    idle: Option<std::time::Duration>,
) -> Result<(Bytes, String), Failure> {
    let bytes = upload::read_whole(
        ClientBody::Left(body),
        max,
        idle,
        "a share token limited to models takes request bodies of at most 16 MiB",
    )
    .await?;
    // What is checked is what is forwarded: these very bytes, read the way
    // the desktop's server will read them.
    let models = daemon::model::named_models(&bytes)
        .map_err(|e| Failure::refused(StatusCode::BAD_REQUEST, e.to_string()))?;
    if let Some(m) = models.iter().find(|m| !scope.allows_model(m)) {
        return Err(Failure::Forbidden(format!("this share token does not cover the model {m:?}")));
    }
    match models.into_iter().next() {
        Some(model) => Ok((bytes, model)),
        None => Err(Failure::Forbidden(
            "this share token only allows requests that name one of its models".into(),
        )),
    }
}
