//! The protocol's rules for each message: ids, reasons, tokens, times,
//! capabilities and the limits a peer announced. Nothing that fails them
//! goes further than [`Message::decode`].

use crate::limits::{MAX_ID_LEN, MAX_REASON_LEN, MAX_TOKEN_LEN};
use crate::{Limits, ProtocolError, Violation};

use super::{MAX_PRIORITY, MAX_SERVICE_AVAILABLE, MAX_SERVICE_MODELS, Message, truncate_utf8};

impl Message {
    /// Checks every field against the protocol rules and `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtocolError> {
        match self {
            Message::HttpRequest(m) => {
                m.check(limits)?;
                m.headers.to_map(limits).map(drop)
            }
            Message::HttpResponse(m) => {
                validate_id(&m.id)?;
                validate_status(m.status)?;
                m.headers.to_map(limits).map(drop)
            }
            Message::ResponseHead(m) => {
                validate_id(&m.id)?;
                validate_status(m.status)?;
                m.headers.to_map(limits).map(drop)
            }
            Message::Ping(p) | Message::Pong(p) => {
                validate_id(&p.id)?;
                validate_reason(&p.timestamp)
            }
            Message::Error(e) => {
                if !e.id.is_empty() {
                    validate_id(&e.id)?;
                }
                validate_reason(&e.error)
            }
            Message::Hello(h) => {
                validate_reason(&h.agent)?;
                validate_capabilities(&h.capabilities)?;
                h.limits.validate()
            }
            Message::Welcome(w) => {
                validate_id(&w.session_id)?;
                validate_capabilities(&w.capabilities)?;
                validate_opt_time(w.expires_at.as_deref())?;
                validate_token(w.token.as_deref().unwrap_or_default())?;
                w.limits.validate()
            }
            Message::Auth(a) => validate_token(&a.token),
            Message::Refresh(_) | Message::Rotate(_) => Ok(()),
            Message::Authorized(a) => {
                validate_opt_time(a.expires_at.as_deref())?;
                validate_token(a.token.as_deref().unwrap_or_default())
            }
            Message::Credential(c) => {
                validate_id(&c.id)?;
                validate_token(&c.secret)
            }
            Message::Rotated(r) => validate_id(&r.id),
            Message::Service(s) => {
                validate_opt_time(Some(&s.checked_at))?;
                let short = |t: &str| t.len() <= 256 && !t.chars().any(char::is_control);
                if s.models.len() > MAX_SERVICE_MODELS
                    || s.loading.len() > MAX_SERVICE_MODELS
                    || s.available.len() > MAX_SERVICE_AVAILABLE
                    || s.details.len() > MAX_SERVICE_AVAILABLE
                    || !s.models.iter().chain(&s.loading).chain(&s.available).all(|m| short(m))
                    || !s.details.iter().all(|d| short(&d.name))
                    || !s.version.as_deref().is_none_or(short)
                    || s.priority.abs() > MAX_PRIORITY
                {
                    return Err(ProtocolError::new(
                        Violation::MalformedMessage,
                        "service: at most 64 models loaded, 64 loading and 512 available (and details), names and version of at most 256 bytes without control characters, priority within -1000..=1000",
                    ));
                }
                Ok(())
            }
            Message::Cancel(c) => {
                validate_id(&c.id)?;
                validate_reason(&c.reason)
            }
            Message::WindowUpdate(w) => {
                validate_id(&w.id)?;
                if w.credit == 0 || w.credit > crate::limits::MAX_WINDOW {
                    return Err(ProtocolError::new(
                        Violation::InvalidCredit,
                        format!("credit {} outside 1..=2147483647", w.credit),
                    ));
                }
                Ok(())
            }
            Message::Goaway(g) => validate_reason(&g.reason),
            Message::Ack(a) => validate_id(&a.id),
        }
    }
}

/// A stream id: 1 to 64 characters from `[A-Za-z0-9._:-]`.
pub fn validate_id(id: &str) -> Result<(), ProtocolError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    if ok {
        Ok(())
    } else {
        let mut shown = id.to_owned();
        truncate_utf8(&mut shown, MAX_ID_LEN + 1);
        Err(ProtocolError::new(Violation::InvalidId, format!("invalid stream id {shown:?}")))
    }
}

pub(crate) fn validate_status(status: u16) -> Result<(), ProtocolError> {
    // Only final statuses: a 1xx would make the web side's HTTP stack
    // believe the connection switched protocols or expect more heads.
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(ProtocolError::new(
            Violation::InvalidStatus,
            format!("status {status} outside 200..=599"),
        ))
    }
}

fn validate_reason(text: &str) -> Result<(), ProtocolError> {
    if text.len() > MAX_REASON_LEN {
        return Err(ProtocolError::new(
            Violation::ReasonTooLong,
            format!("{} byte text, limit {MAX_REASON_LEN}", text.len()),
        ));
    }
    Ok(())
}

fn validate_token(token: &str) -> Result<(), ProtocolError> {
    if token.len() > MAX_TOKEN_LEN || token.bytes().any(|b| !(0x21..0x7f).contains(&b)) {
        return Err(ProtocolError::new(
            Violation::MalformedMessage,
            "a token must be printable ASCII, at most 8 KiB",
        ));
    }
    Ok(())
}

fn validate_opt_time(time: Option<&str>) -> Result<(), ProtocolError> {
    match time {
        Some(t) if humantime::parse_rfc3339(t).is_err() => Err(ProtocolError::new(
            Violation::MalformedMessage,
            format!("{t:?} is not an RFC 3339 time"),
        )),
        _ => Ok(()),
    }
}

fn validate_capabilities(caps: &[String]) -> Result<(), ProtocolError> {
    if caps.len() > 64 {
        return Err(ProtocolError::new(Violation::ReasonTooLong, "more than 64 capabilities"));
    }
    caps.iter().try_for_each(|c| validate_reason(c))
}
