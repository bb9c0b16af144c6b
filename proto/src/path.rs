//! The one check every tunnelled path passes, at the relay (before anything
//! reaches an agent) and again at the agent (before anything reaches the
//! local service): a path that could mean something other than it says is
//! refused, not repaired.
//!
//! Refused: anything not starting with `/` (absolute URLs, `*`), empty
//! segments (`//`), `.` and `..` segments, a backslash, an encoded slash or
//! backslash (`%2f`, `%5c`), control characters (CR, LF, NUL, ...), raw or
//! percent-encoded, and all of these again after one more round of decoding
//! (`%252e%252e`). The query string is checked for control characters only.

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path must start with /")]
    NotAbsolutePath,
    #[error("the path has an empty segment (//)")]
    EmptySegment,
    #[error("the path has a . or .. segment")]
    DotSegment,
    #[error("the path has a backslash or an encoded slash")]
    Separator,
    #[error("the path or query has a control character (CR, LF, NUL, ...)")]
    ControlCharacter,
    #[error("the path has an invalid percent-encoding")]
    BadEncoding,
}

/// Checks a request target (`/path?query`).
pub fn check(target: &str) -> Result<(), PathError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if let Some(q) = query {
        let once = decode(q.as_bytes())?;
        if has_control(q.as_bytes()) || has_control(&once) || has_control(&decode(&once)?) {
            return Err(PathError::ControlCharacter);
        }
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolutePath);
    }
    check_level(path.as_bytes())?;
    let once = decode(path.as_bytes())?;
    check_level(&once)?;
    check_level(&decode(&once)?)
}

/// One decoding level: the checks that hold whatever the next decoder does.
fn check_level(path: &[u8]) -> Result<(), PathError> {
    if has_control(path) {
        return Err(PathError::ControlCharacter);
    }
    if path.contains(&b'\\') {
        return Err(PathError::Separator);
    }
    let lower = path.to_ascii_lowercase();
    if lower.windows(3).any(|w| w == b"%2f" || w == b"%5c") {
        return Err(PathError::Separator);
    }
    // The first segment is the empty one before the leading slash; the
    // last may be empty (a trailing slash).
    let segments: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
    let inner = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate().skip(1) {
        if seg.is_empty() && i < inner {
            return Err(PathError::EmptySegment);
        }
        let lower = seg.to_ascii_lowercase();
        let plain = replace(&lower, b"%2e", b".");
        if plain == b"." || plain == b".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

fn has_control(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b < 0x20 || b == 0x7f)
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

/// One round of percent-decoding; a `%` not followed by two hex digits is
/// an error (servers disagree on what it means).
fn decode(bytes: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEncoding)?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEncoding)?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_paths_pass() {
        for p in [
            "/",
            "/api/chat",
            "/api/tags/",
            "/v1/chat/completions",
            "/v1/models/llama3.2:latest",
            "/api/blobs/sha256:0123abcd",
            "/api/v1.2/x?a=../b&c=%20d",
            "/a%20b",
        ] {
            assert_eq!(check(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn traversal_in_every_spelling_is_refused() {
        for (p, want) in [
            ("/api/../etc", PathError::DotSegment),
            ("/./api/tags", PathError::DotSegment),
            ("/api/..", PathError::DotSegment),
            ("/api/%2e%2e/x", PathError::DotSegment),
            ("/api/%2E./x", PathError::DotSegment),
            ("/api/.%2e/x", PathError::DotSegment),
            ("/api/%252e%252e/x", PathError::DotSegment),
            ("/api//tags", PathError::EmptySegment),
            ("//evil.example/x", PathError::EmptySegment),
            ("/api/%2f/x", PathError::Separator),
            ("/api/a%2F..%2Fb", PathError::Separator),
            ("/api/%252f", PathError::Separator),
            ("/api\\..\\x", PathError::Separator),
            ("/api/%5c..", PathError::Separator),
            ("http://169.254.169.254/latest", PathError::NotAbsolutePath),
            ("*", PathError::NotAbsolutePath),
            ("", PathError::NotAbsolutePath),
            ("/api/x%00", PathError::ControlCharacter),
            ("/api/x%0d%0aHost:%20evil", PathError::ControlCharacter),
            ("/api/x%250a", PathError::ControlCharacter),
            ("/api/tags?q=%0d%0aX:%20y", PathError::ControlCharacter),
            ("/api/tags\r\n", PathError::ControlCharacter),
            ("/api/%zz", PathError::BadEncoding),
            ("/api/%2", PathError::BadEncoding),
        ] {
            assert_eq!(check(p), Err(want), "{p:?}");
        }
    }
}
