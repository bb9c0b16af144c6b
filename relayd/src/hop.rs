//! Forwarding between replicas: a request for a user whose agent is
//! connected to another replica goes one hop to that replica (its peer
//! listener, [`crate::peer`]) over HTTP/2 with mutual TLS, and its answer
//! streams back. A client that leaves resets the stream, which cancels the
//! request at the agent as on one relay. A forwarded request is marked
//! (`x-relay-hop`) and is never forwarded again.

use std::sync::atomic::Ordering;

use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::warn;

use crate::body::RelayBody;
use crate::response::{self, Shape};
use crate::state::{Conn, Shared};

/// Marks a forwarded request (on the peer listener only, where every
/// caller proved it is a replica).
pub const HOP: HeaderName = HeaderName::from_static("x-relay-hop");
/// The address the client came from, as the first replica saw it.
pub const CLIENT: HeaderName = HeaderName::from_static("x-relay-client");

/// Headers that belong to one connection, not to the request.
const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
];

/// 421 for a forwarded request this replica does not hold the user of.
pub fn misdirected(shared: &Shared, user: &str, target: &str) -> Response<RelayBody> {
    shared.cluster.misdirected.fetch_add(1, Ordering::Relaxed);
    response::error(
        Shape::of(target),
        StatusCode::MISDIRECTED_REQUEST,
        "misdirected",
        &format!("this replica holds no agent of {user} any more; ask again"),
    )
}

/// Sends `req` to the replica holding `user`, if another one does and
/// this one forwards; else gives the request back.
pub async fn forward(
    shared: &Shared,
    conn: &Conn,
    user: &str,
    target: &str,
    req: Request<Incoming>,
) -> Result<Response<RelayBody>, Request<Incoming>> {
    let Some(client) = &shared.peers else { return Err(req) };
    let Some((replica, addr)) = shared.directory.locate(user) else { return Err(req) };
    let (mut parts, body) = req.into_parts();
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = match format!("https://{addr}{pq}").parse() {
        Ok(uri) => uri,
        Err(_) => return Err(Request::from_parts(parts, body)),
    };
    parts.version = http::Version::HTTP_2;
    for name in HOP_BY_HOP {
        parts.headers.remove(name);
    }
    parts.headers.insert(HOP, HeaderValue::from_static("1"));
    if let Ok(v) = HeaderValue::from_str(&conn.peer.to_string()) {
        parts.headers.insert(CLIENT, v);
    }
    // The other replica answers within its first-byte timeout (with a 504
    // at worst); a little more covers the hop.
    let head_within = shared.config.first_byte_timeout + std::time::Duration::from_secs(5);
    match client.send(&addr, Request::from_parts(parts, body), head_within).await {
        Ok(resp) => {
            shared.cluster.forwarded.fetch_add(1, Ordering::Relaxed);
            Ok(resp.map(RelayBody::Peer))
        }
        Err(e) => {
            shared.cluster.forward_failed.fetch_add(1, Ordering::Relaxed);
            warn!(replica = %replica, error = %e, "could not forward to replica {replica}: {e}");
            let mut r = response::error(
                Shape::of(target),
                StatusCode::SERVICE_UNAVAILABLE,
                "replica_unavailable",
                &format!("the relay that holds this tunnel did not answer: {e}"),
            );
            r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            Ok(r)
        }
    }
}
