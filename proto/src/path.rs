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

/// Checks a request target (`/path?query`). Every request passes here at
/// both ends, so the common case costs no allocation: a path or query
/// without `%` decodes to itself and is checked once.
pub fn check(target: &str) -> Result<(), PathError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.as_bytes(), Some(q.as_bytes())),
        None => (target.as_bytes(), None),
    };
    if let Some(q) = query {
        if has_control(q) {
            return Err(PathError::ControlCharacter);
        }
        if q.contains(&b'%') {
            let once = decode(q)?;
            if has_control(&once) || has_control(&decode(&once)?) {
                return Err(PathError::ControlCharacter);
            }
        }
    }
    if !path.starts_with(b"/") {
        return Err(PathError::NotAbsolutePath);
    }
    check_level(path)?;
    if !path.contains(&b'%') {
        return Ok(());
    }
    let once = decode(path)?;
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
    if path.windows(3).any(|w| w.eq_ignore_ascii_case(b"%2f") || w.eq_ignore_ascii_case(b"%5c")) {
        return Err(PathError::Separator);
    }
    // The first segment is the empty one before the leading slash; the
    // last may be empty (a trailing slash).
    let mut segments = path.split(|&b| b == b'/').skip(1).peekable();
    while let Some(seg) = segments.next() {
        if seg.is_empty() && segments.peek().is_some() {
            return Err(PathError::EmptySegment);
        }
        if is_dot_segment(seg) {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

/// `.` or `..`, each dot possibly spelled `%2e` (any case).
fn is_dot_segment(mut seg: &[u8]) -> bool {
    let mut dots = 0;
    while !seg.is_empty() {
        if seg[0] == b'.' {
            seg = &seg[1..];
        } else if seg.len() >= 3 && seg[..3].eq_ignore_ascii_case(b"%2e") {
            seg = &seg[3..];
        } else {
            return false;
        }
        dots += 1;
        if dots > 2 {
            return false;
        }
    }
    dots > 0
}

fn has_control(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| b < 0x20 || b == 0x7f)
}

/// One round of percent-decoding; a `%` not followed by two hex digits is
/// an error (servers disagree on what it means).
fn decode(bytes: &[u8]) -> Result<Vec<u8>, PathError> {
    let hex = |b: u8| match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err(PathError::BadEncoding),
    };
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let pair = bytes.get(i + 1..i + 3).ok_or(PathError::BadEncoding)?;
            out.push(hex(pair[0])? << 4 | hex(pair[1])?);
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
            "/api/.../x",
            "/api/.hidden/%2e%2e%2e",
            "/api/a..b",
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
            // from_str_radix would take a sign: "%+f" is not an encoding
            // (before, it decoded to 0x0f and was refused as a control
            // character).
            ("/api/%+f", PathError::BadEncoding),
            ("/api/%-1/x", PathError::BadEncoding),
        ] {
            assert_eq!(check(p), Err(want), "{p:?}");
        }
    }
}
