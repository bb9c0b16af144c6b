//! The validated domain types of one HTTP exchange on the tunnel: the
//! [`StreamId`], the request the agent replays ([`TunnelRequest`]) and the
//! head it answers with ([`ResponseHead`]), and the checked conversions from
//! the wire messages that carry them. The rest of the code handles these,
//! never unvalidated wire structs.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, StatusCode};

use crate::limits::{MAX_METHOD_LEN, MAX_PATH_LEN};
use crate::message::{
    HttpRequestMsg, HttpResponseMsg, ResponseHeadMsg, validate_id, validate_status,
};
use crate::{Headers, Limits, ProtocolError, Violation};

/// A validated stream id.
///
/// Shared, so the per-chunk clones on the data path cost a reference count,
/// not an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(std::sync::Arc<str>);

impl StreamId {
    pub fn new(id: impl Into<String>) -> Result<Self, ProtocolError> {
        let id = id.into();
        validate_id(&id)?;
        Ok(Self(id.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for StreamId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Where a request's body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// The whole body, from an original-form `http_request`.
    Inline(Bytes),
    /// Binary frames follow, ending with the end flag.
    Streamed,
}

/// A validated `http_request`.
#[derive(Debug, Clone)]
pub struct TunnelRequest {
    pub id: StreamId,
    pub method: Method,
    pub path: PathAndQuery,
    /// Headers without hop-by-hop fields.
    pub headers: HeaderMap,
    pub body: RequestBody,
}

impl HttpRequestMsg {
    /// Builds the message for a request whose body streams after it
    /// (`body_follows`), or travels inline when `body` is given.
    pub fn new(
        id: &StreamId,
        method: &Method,
        path: &str,
        headers: Headers,
        body: Option<String>,
        body_follows: bool,
    ) -> Self {
        Self {
            id: id.as_str().to_owned(),
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            headers,
            body,
            body_follows,
        }
    }

    /// Checks id, method, path, header counts and sizes, and the body form,
    /// without converting anything: what a relay checks before sending.
    pub fn check(&self, limits: &Limits) -> Result<(), ProtocolError> {
        validate_id(&self.id)?;
        if self.method.is_empty()
            || self.method.len() > MAX_METHOD_LEN
            || !self.method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_')
        {
            return Err(ProtocolError::new(
                Violation::InvalidMethod,
                format!("invalid method {:?}", self.method),
            ));
        }
        if !self.path.starts_with('/') || self.path.len() > MAX_PATH_LEN {
            return Err(ProtocolError::new(
                Violation::InvalidPath,
                "path must start with / and be at most 16 KiB",
            ));
        }
        PathAndQuery::try_from(self.path.as_str()).map_err(|e| {
            ProtocolError::new(Violation::InvalidPath, format!("invalid path: {e}"))
        })?;
        self.headers.check_size(limits)?;
        if self.body.is_some() && self.body_follows {
            return Err(ProtocolError::new(
                Violation::StreamState,
                "http_request has both body and body_follows",
            ));
        }
        Ok(())
    }

    /// Validates and converts into the domain type.
    pub fn into_request(self, limits: &Limits) -> Result<TunnelRequest, ProtocolError> {
        self.check(limits)?;
        let id = StreamId::new(self.id)?;
        let method = Method::from_bytes(self.method.as_bytes())
            .map_err(|_| ProtocolError::new(Violation::InvalidMethod, "invalid method"))?;
        let path = PathAndQuery::try_from(self.path.as_str()).map_err(|e| {
            ProtocolError::new(Violation::InvalidPath, format!("invalid path: {e}"))
        })?;
        let headers = self.headers.to_map(limits)?;
        let body = match (self.body, self.body_follows) {
            (Some(b), _) => RequestBody::Inline(Bytes::from(b)),
            (None, false) => RequestBody::Inline(Bytes::new()),
            (None, true) => RequestBody::Streamed,
        };
        Ok(TunnelRequest { id, method, path, headers, body })
    }
}

impl TunnelRequest {
    /// The request as an `http::Request` aimed at `path` on whatever
    /// authority the caller sets; the body is the inline body (empty when it
    /// streams).
    pub fn into_http(self) -> http::Request<Bytes> {
        let body = match self.body {
            RequestBody::Inline(b) => b,
            RequestBody::Streamed => Bytes::new(),
        };
        let mut req = http::Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = http::Uri::from(self.path);
        *req.headers_mut() = self.headers;
        req
    }
}

/// A validated response head, from `response_head` or `http_response`.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub id: StreamId,
    pub status: StatusCode,
    /// Headers without hop-by-hop fields.
    pub headers: HeaderMap,
}

impl ResponseHeadMsg {
    pub fn new(id: &StreamId, status: StatusCode, headers: Headers, body_follows: bool) -> Self {
        Self { id: id.as_str().to_owned(), status: status.as_u16(), headers, body_follows }
    }

    pub fn into_head(self, limits: &Limits) -> Result<ResponseHead, ProtocolError> {
        into_head(self.id, self.status, &self.headers, limits)
    }
}

impl HttpResponseMsg {
    /// An original-form response carrying `body` whole.
    pub fn new(id: &StreamId, status: StatusCode, headers: Headers, body: String) -> Self {
        Self { id: id.as_str().to_owned(), status: status.as_u16(), headers, body: Some(body) }
    }

    /// Validates and splits into the head and the whole body.
    pub fn into_parts(self, limits: &Limits) -> Result<(ResponseHead, Bytes), ProtocolError> {
        let head = into_head(self.id, self.status, &self.headers, limits)?;
        Ok((head, Bytes::from(self.body.unwrap_or_default())))
    }

    /// The response as an `http::Response` with its whole body.
    pub fn into_http(self, limits: &Limits) -> Result<http::Response<Bytes>, ProtocolError> {
        let (head, body) = self.into_parts(limits)?;
        let mut resp = http::Response::new(body);
        *resp.status_mut() = head.status;
        *resp.headers_mut() = head.headers;
        Ok(resp)
    }
}

fn into_head(
    id: String,
    status: u16,
    headers: &Headers,
    limits: &Limits,
) -> Result<ResponseHead, ProtocolError> {
    let id = StreamId::new(id)?;
    validate_status(status)?;
    let status = StatusCode::from_u16(status)
        .map_err(|_| ProtocolError::new(Violation::InvalidStatus, format!("status {status}")))?;
    let headers = headers.to_map(limits)?;
    Ok(ResponseHead { id, status, headers })
}
