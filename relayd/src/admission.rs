//! Who is asking, and whether an agent handshake may proceed.
//!
//! Agents that present a valid credential share one allowance
//! (`handshakes_per_second`), so a relay restart does not bring every agent
//! back in the same instant. Refused attempts never touch that allowance:
//! they spend a budget of their own per source address, and a source that
//! spent it is answered 429 without its credential being looked at, until
//! the budget refills. A flood of bad credentials therefore costs its source
//! its own access and nothing else.
//!
//! The source is the peer's address, or, when the peer is a proxy the
//! operator trusts (`[proxy] trusted`), the client address it reports in
//! `X-Forwarded-For`: agents arriving through one proxy are not limited as
//! one.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use http::HeaderMap;
use tunnel_proto::budget::TokenBucket;

/// Sources whose refused attempts are remembered at once. A source's entry
/// is forgotten once its budget refilled; with more sources than this in
/// debt, new ones are not tracked (they still never reach the agents'
/// allowance).
const MAX_SOURCES: usize = 16 * 1024;

/// A network in CIDR form (`10.0.0.0/8`, `::1/128`, or a bare address):
/// `ipnet`'s, with a bare address read as one host and IPv4-mapped IPv6
/// peers (a dual-stack listener) matched as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(into = "String")]
pub struct Cidr(ipnet::IpNet);

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.0.to_string()
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Cidr(addr.into()));
        }
        text.parse::<ipnet::IpNet>().map(Cidr).map_err(|_| match text.split_once('/') {
            Some((a, _)) if a.trim().parse::<IpAddr>().is_ok() => {
                let max = if a.contains(':') { 128 } else { 32 };
                format!("{s:?}: prefix length must be 0..={max}")
            }
            _ => format!("{s:?} is not an address"),
        })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&canonical(ip))
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack listener) as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The key a source's budget is kept under: the address, or for IPv6 its
/// /64 (one host commonly holds a whole /64).
fn source_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl TrustedProxies {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client a request came from: `peer`, or when `peer` is trusted,
    /// the right-most address in `X-Forwarded-For` that is not itself a
    /// trusted proxy (each proxy appends the address it saw, so entries to
    /// the left of the last untrusted one may be forged).
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let mut hops = Vec::new();
        for value in headers.get_all("x-forwarded-for") {
            let Ok(text) = value.to_str() else { return peer };
            for hop in text.split(',') {
                match hop.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip),
                    Err(_) => return peer,
                }
            }
        }
        hops.iter()
            .rev()
            .copied()
            .find(|ip| !self.trusts(*ip))
            .or(hops.first().copied())
            .unwrap_or(peer)
    }
}

/// The decision on one agent handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Admit,
    /// The source spent its budget of refused attempts: 429, retry after
    /// this many seconds.
    SourceBlocked { retry_after: u64 },
    /// Valid, but the agents' allowance is spent this second: 503.
    Busy,
}

/// Token buckets by key (a source address, a user), bounded: a key's
/// bucket is forgotten once it refilled, and with [`MAX_SOURCES`] keys in
/// debt new keys are not tracked.
#[derive(Debug)]
pub struct Buckets<K> {
    map: Mutex<HashMap<K, TokenBucket>>,
    rate: f64,
    burst: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    /// `burst` at once, then `per_minute`.
    pub fn per_minute(burst: u32, per_minute: u32) -> Self {
        Self { map: Mutex::new(HashMap::new()), rate: f64::from(per_minute) / 60.0, burst }
    }

    /// Seconds until `key` has a token again (0: it has one now).
    pub fn wait<Q>(&self, key: &Q, now: Instant) -> u64
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get_mut(key).map_or(0, |b| b.wait_secs(now).ceil() as u64)
    }

    /// Spends one of `key`'s tokens; `Some(seconds to wait)` when it had
    /// none. A key already tracked is looked up without being copied.
    pub fn take<Q>(&self, key: &Q, now: Instant) -> Option<u64>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = match map.get_mut(key) {
            Some(b) => b,
            None => {
                if map.len() >= MAX_SOURCES {
                    map.retain(|_, b| !b.is_full(now));
                    if map.len() >= MAX_SOURCES {
                        return None;
                    }
                }
                let fresh = TokenBucket::new(self.rate, self.burst, now);
                map.entry(key.to_owned()).or_insert(fresh)
            }
        };
        if bucket.take(now) { None } else { Some(bucket.wait_secs(now).ceil().max(1.0) as u64) }
    }

    /// Keys remembered.
    pub fn tracked(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// Each user's budget of tunnel requests (`requests_per_minute`). Behind a
/// trait so that relays sharing users can split or share it; a lookup
/// happens on every request, so it answers without waiting.
pub trait RequestBudget: Send + Sync {
    /// Spends one of `user`'s requests; `Some(seconds to wait)` when the
    /// user has none left.
    fn take(&self, user: &str, now: Instant) -> Option<u64>;
}

/// The embedded budget: a token bucket per user in this relay's memory.
impl RequestBudget for Buckets<String> {
    fn take(&self, user: &str, now: Instant) -> Option<u64> {
        Buckets::take(self, user, now)
    }
}

/// Handshake admission state of one relay.
#[derive(Debug)]
pub struct Admission {
    agents: Mutex<TokenBucket>,
    refused: Buckets<IpAddr>,
    users: Buckets<String>,
}

impl Admission {
    /// `agents_per_second` handshakes with valid credentials; per source,
    /// `refused_per_minute` refused attempts at once, then as many per
    /// minute; per user, `user_per_minute` valid handshakes likewise.
    pub fn new(agents_per_second: u32, refused_per_minute: u32, user_per_minute: u32) -> Self {
        let now = Instant::now();
        Self {
            agents: Mutex::new(TokenBucket::new(
                f64::from(agents_per_second),
                agents_per_second,
                now,
            )),
            refused: Buckets::per_minute(refused_per_minute, refused_per_minute),
            users: Buckets::per_minute(user_per_minute, user_per_minute),
        }
    }

    /// Before the credential is looked at: has `source` spent its budget?
    pub fn check_source(&self, source: IpAddr, now: Instant) -> Verdict {
        match self.refused.wait(&source_key(source), now) {
            0 => Verdict::Admit,
            w => Verdict::SourceBlocked { retry_after: w },
        }
    }

    /// The credential was refused: charge `source`.
    pub fn refused(&self, source: IpAddr, now: Instant) {
        let _ = self.refused.take(&source_key(source), now);
    }

    /// The credential is valid: take one of the agents' allowance.
    pub fn admit_agent(&self, now: Instant) -> Verdict {
        let mut bucket = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if bucket.take(now) { Verdict::Admit } else { Verdict::Busy }
    }

    /// One more valid handshake of `user` (an agent in a reconnect loop, or
    /// two fighting over one credential, are held back).
    pub fn admit_user(&self, user: &str, now: Instant) -> Verdict {
        match self.users.take(user, now) {
            None => Verdict::Admit,
            Some(w) => Verdict::SourceBlocked { retry_after: w },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.1.0.0/16".parse().expect("valid");
        assert!(net.contains(ip("10.1.200.3")));
        assert!(!net.contains(ip("10.2.0.1")));
        assert!(net.contains(ip("::ffff:10.1.0.9")));
        let one: Cidr = "127.0.0.1".parse().expect("valid");
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        let v6: Cidr = "fd00::/8".parse().expect("valid");
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().expect("valid").contains(ip("8.8.8.8")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("example.com".parse::<Cidr>().is_err());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies = TrustedProxies(vec!["10.0.0.0/8".parse().expect("valid")]);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 198.51.100.7, 10.0.0.2".parse().expect("v"));
        // From the proxy: the right-most untrusted hop.
        assert_eq!(proxies.client(ip("10.0.0.1"), &h), ip("198.51.100.7"));
        // From anyone else: the peer, whatever the header says.
        assert_eq!(proxies.client(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        h.insert("x-forwarded-for", "garbage".parse().expect("v"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &h), ip("10.0.0.1"));
        assert_eq!(proxies.client(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
    }

    #[test]
    fn refused_attempts_block_only_their_source_and_never_the_agents_allowance() {
        let t0 = Instant::now();
        let a = Admission::new(2, 5, 60);
        let bad = ip("192.0.2.1");
        for _ in 0..5 {
            assert_eq!(a.check_source(bad, t0), Verdict::Admit);
            a.refused(bad, t0);
        }
        assert_eq!(a.check_source(bad, t0), Verdict::SourceBlocked { retry_after: 12 });
        assert_eq!(a.check_source(ip("192.0.2.2"), t0), Verdict::Admit);
        assert_eq!(a.admit_agent(t0), Verdict::Admit);
        assert_eq!(a.admit_agent(t0), Verdict::Admit);
        assert_eq!(a.admit_agent(t0), Verdict::Busy);
        assert_eq!(a.check_source(bad, t0 + Duration::from_secs(12)), Verdict::Admit);
    }

    #[test]
    fn one_users_reconnect_loop_is_held_back_without_touching_others() {
        let t0 = Instant::now();
        let a = Admission::new(1000, 5, 2);
        assert_eq!(a.admit_user("alice", t0), Verdict::Admit);
        assert_eq!(a.admit_user("alice", t0), Verdict::Admit);
        assert_eq!(a.admit_user("alice", t0), Verdict::SourceBlocked { retry_after: 30 });
        assert_eq!(a.admit_user("bob", t0), Verdict::Admit);
        assert_eq!(a.admit_user("alice", t0 + Duration::from_secs(30)), Verdict::Admit);
    }

    #[test]
    fn ipv6_sources_are_budgeted_per_64() {
        let t0 = Instant::now();
        let a = Admission::new(1, 1, 1);
        a.refused(ip("2001:db8::1"), t0);
        assert!(matches!(a.check_source(ip("2001:db8::ffff"), t0), Verdict::SourceBlocked { .. }));
        assert_eq!(a.check_source(ip("2001:db8:0:1::1"), t0), Verdict::Admit);
    }
}
