//! CORS for browsers that call tunnels from the origins the operator allows
//! (`[http] cors_origins`): the relay answers their preflights itself,
//! without a token, and marks its answers for them. A desktop's own CORS
//! headers never reach a browser (see [`crate::response::secure_tunnelled`]).

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN, VARY,
};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};

use crate::body::RelayBody;
use crate::response::{self, Shape};

/// The request's `Origin`, when the operator allows it.
pub fn allowed(origins: &[String], headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(ORIGIN)?;
    let text = origin.to_str().ok()?;
    origins.iter().any(|o| o == "*" || o == text).then(|| origin.clone())
}

/// A CORS preflight: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method`.
pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
    method == Method::OPTIONS
        && headers.contains_key(ORIGIN)
        && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD)
}

/// The relay's answer to a preflight: 204 for an allowed origin (the
/// methods the tunnel carries, the headers asked for, cached 10 minutes),
/// 403 for any other.
pub fn preflight(
    origin: Option<HeaderValue>,
    headers: &HeaderMap,
    methods: &str,
    shape: Shape,
) -> Response<RelayBody> {
    let Some(origin) = origin else {
        return response::error(
            shape,
            StatusCode::FORBIDDEN,
            "cors_origin",
            "this origin may not call tunnels on this relay",
        );
    };
    let mut r = Response::new(RelayBody::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(VARY, HeaderValue::from_static("Origin"));
    if let Ok(m) = HeaderValue::from_str(methods) {
        h.insert(ACCESS_CONTROL_ALLOW_METHODS, m);
    }
    let asked = headers
        .get(ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or(HeaderValue::from_static("authorization, content-type"));
    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, asked);
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    r
}

/// Marks an answer for an allowed origin. Credentials travel in
/// `Authorization`, never in cookies, so `Allow-Credentials` stays off.
pub fn mark(resp: &mut Response<RelayBody>, origin: Option<HeaderValue>) {
    let Some(origin) = origin else { return };
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(VARY, HeaderValue::from_static("Origin"));
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after, www-authenticate, x-should-retry"),
    );
    h.remove(ACCESS_CONTROL_ALLOW_CREDENTIALS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_listed_origins_are_allowed() {
        let mut h = HeaderMap::new();
        h.insert(ORIGIN, HeaderValue::from_static("https://app.example"));
        assert!(allowed(&["https://app.example".into()], &h).is_some());
        assert!(allowed(&["https://other.example".into()], &h).is_none());
        assert!(allowed(&["*".into()], &h).is_some());
        assert!(allowed(&["*".into()], &HeaderMap::new()).is_none());
    }
}
