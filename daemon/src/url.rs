//! URLs as the daemons read them, one rule everywhere a URL comes in (a
//! relay, a local service, a JWKS): a scheme and a host, a port that is a
//! port (1-65535; `host:99999` is refused, not read as "no port"), and no
//! user name or password (a secret in a URL ends up in logs and files).

use http::Uri;

/// Why a URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {text:?}: {why}")]
pub struct UrlError {
    what: String,
    text: String,
    why: String,
}

/// `text` as a URL with a scheme and a host; `what` names it in errors.
pub fn parse(text: &str, what: &str) -> Result<Uri, UrlError> {
    let bad =
        |why: &str| UrlError { what: what.to_owned(), text: text.to_owned(), why: why.into() };
    let uri: Uri = text.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme().is_none() {
        return Err(bad("no scheme (such as https://)"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "a user name or password does not belong in a URL; give credentials apart",
        ));
    }
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    // What follows the host: `:port`, or nothing. `http` reads a port it
    // cannot parse as no port at all.
    let after_host = match authority.as_str().rfind(']') {
        Some(i) => &authority.as_str()[i + 1..],
        None => authority.as_str().rfind(':').map_or("", |i| &authority.as_str()[i..]),
    };
    if let Some(port) = after_host.strip_prefix(':') {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(bad(&format!("{port:?} is not a port (1-65535)"))),
        }
    }
    Ok(uri)
}

/// The port `uri` names, or the scheme's own (443 for `https`/`wss`, 80
/// otherwise).
pub fn port(uri: &Uri) -> u16 {
    uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https" | "wss") => 443,
        _ => 80,
    })
}

/// Whether `uri`'s host is this machine (`localhost` or a loopback
/// address): the only place plain text may go.
pub fn is_loopback(uri: &Uri) -> bool {
    uri.host().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_outside_1_to_65535_are_refused_not_dropped() {
        for bad in
            ["ws://relay:99999", "ws://relay:0", "ws://relay:", "ws://relay:8x", "ws://[::1]:70000"]
        {
            let err = parse(bad, "relay").expect_err(bad).to_string();
            assert!(err.contains("not a port"), "{bad}: {err}");
        }
        assert_eq!(port(&parse("ws://relay:65535", "relay").expect("ok")), 65535);
        assert_eq!(port(&parse("wss://[::1]", "relay").expect("ok")), 443);
        assert_eq!(port(&parse("ws://relay", "relay").expect("ok")), 80);
    }

    #[test]
    fn credentials_in_a_url_are_refused() {
        for bad in ["wss://alice:secret@relay", "wss://token@relay/ws/tunnel"] {
            assert!(parse(bad, "relay").is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_hosts_are_told_apart() {
        for (url, lo) in [
            ("ws://localhost:1", true),
            ("ws://127.0.0.2", true),
            ("ws://[::1]:8080", true),
            ("ws://relay.example", false),
            ("ws://10.0.0.1", false),
        ] {
            assert_eq!(is_loopback(&parse(url, "relay").expect(url)), lo, "{url}");
        }
    }
}
