//! What tunnelctl prints: aligned tables for people, JSON for scripts.
//! Every function is pure (the current time is a parameter), so the
//! output is snapshot-tested.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tunnel_proto::control::v1::{self as pb, trace_event::Kind};

fn at(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

/// `2026-11-29 13:40:12`.
fn when(ms: u64) -> String {
    match at(ms) {
        Some(t) => {
            humantime::format_rfc3339_seconds(t).to_string().replace('T', " ").replace('Z', "")
        }
        None => "-".into(),
    }
}

/// A short human duration: `3s`, `5m 3s`, `2h 5m`, `3d 4h`.
pub fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
    }
}

/// `in 5m 3s` / `5m 3s ago`.
fn relative(ms: u64, now: SystemTime) -> String {
    let Some(t) = at(ms) else { return String::new() };
    match t.duration_since(now) {
        Ok(ahead) => format!("in {}", short(ahead)),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

fn millis(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

fn bytes(n: u64) -> String {
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// `key   value` lines, keys padded to one column.
fn pairs(title: &str, rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("{title}\n");
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<width$}  {v}");
    }
    out
}

/// A table: a header row and rows, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ", w = widths[i]);
            }
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn state_name(s: i32) -> &'static str {
    match pb::AgentState::try_from(s).unwrap_or(pb::AgentState::Unspecified) {
        pb::AgentState::Idle => "starting",
        pb::AgentState::NotEnrolled => "not enrolled",
        pb::AgentState::Connecting => "connecting",
        pb::AgentState::Connected => "connected",
        pb::AgentState::BackingOff => "reconnecting",
        pb::AgentState::Stopped => "stopped",
        pb::AgentState::Revoked => "credential revoked",
        pb::AgentState::Unspecified => "unknown",
    }
}

fn error_kind(k: i32) -> &'static str {
    use pb::AgentErrorKind as K;
    match K::try_from(k).unwrap_or(K::Unspecified) {
        K::Unauthorized => "unauthorized",
        K::Unreachable => "unreachable",
        K::Tls => "tls",
        K::PinMismatch => "pin_mismatch",
        K::RelayBusy => "relay_busy",
        K::TooManyDevices => "too_many_devices",
        K::Protocol => "protocol",
        K::Handshake => "handshake",
        K::Timeout => "timeout",
        K::SessionLost => "session_lost",
        K::Revoked => "revoked",
        K::Unspecified => "",
    }
}

/// `tunnelctl status` against agentd.
pub fn agent_status(s: &pb::AgentStatus, now: SystemTime) -> String {
    let state = state_name(s.state);
    let relay = if s.relay.is_empty() {
        "none yet: run tunnelctl enroll wss://RELAY (the credential on stdin)".to_owned()
    } else {
        s.relay.clone()
    };
    let mut rows: Vec<(&str, String)> = vec![("relay", relay)];
    if !s.session_id.is_empty() {
        rows.push((
            "session",
            format!(
                "{} since {} ({})",
                s.session_id,
                when(s.since_unix_ms),
                relative(s.since_unix_ms, now)
            ),
        ));
        rows.push(("rtt", if s.rtt_us > 0 { millis(s.rtt_us) } else { "-".into() }));
    }
    if s.backoff_until_unix_ms > 0 {
        rows.push(("next attempt", relative(s.backoff_until_unix_ms, now)));
    }
    rows.push(("in flight", s.in_flight.to_string()));
    rows.push((
        "sessions",
        format!("{} ({} reconnects)", s.sessions, s.sessions.saturating_sub(1)),
    ));
    rows.push((
        "credential",
        match s.credential_expires_unix_ms {
            0 if s.session_id.is_empty() => "-".into(),
            0 => "does not expire".into(),
            t => format!("expires {} ({}; renewed by itself)", when(t), relative(t, now)),
        },
    ));
    if !s.relay_pin.is_empty() {
        let pinned = if s.pins.is_empty() {
            "not pinned".to_owned()
        } else if s.pins.contains(&s.relay_pin) {
            "pinned".to_owned()
        } else {
            "NOT among the configured pins".to_owned()
        };
        rows.push(("relay key", format!("{} ({pinned})", s.relay_pin)));
    }
    if let Some(svc) = &s.service {
        let health = if svc.checked_unix_ms == 0 {
            "not checked yet".to_owned()
        } else if svc.reachable {
            let version = if svc.version.is_empty() {
                String::new()
            } else {
                format!(", version {}", svc.version)
            };
            format!("reachable{version} (checked {})", relative(svc.checked_unix_ms, now))
        } else {
            format!("UNREACHABLE: {} (checked {})", svc.error, relative(svc.checked_unix_ms, now))
        };
        rows.push(("local service", format!("{} {health}", svc.url)));
        if svc.reachable {
            let loaded = match svc.models_loaded.as_slice() {
                [] => "none loaded".to_owned(),
                names => format!("loaded: {}", names.join(", ")),
            };
            let loading = match svc.models_loading.as_slice() {
                [] => String::new(),
                names => format!(", loading: {}", names.join(", ")),
            };
            rows.push((
                "models",
                format!("{} on the service, {loaded}{loading}", svc.models_available.len()),
            ));
        }
    }
    rows.push((
        "requests",
        format!("{} taken, {} refused by the endpoint policy", s.requests, s.refused),
    ));
    if !s.last_error.is_empty() {
        rows.push(("last error", format!("{} ({})", s.last_error, error_kind(s.last_error_kind))));
    }
    pairs(&format!("agentd {}: {state}", s.version), &rows)
}

pub fn agent_status_json(s: &pb::AgentStatus) -> Value {
    let svc = s.service.clone().unwrap_or_default();
    json!({
        "daemon": "agentd",
        "version": s.version,
        "state": state_name(s.state),
        "relay": s.relay,
        "session_id": s.session_id,
        "since_unix_ms": s.since_unix_ms,
        "rtt_us": s.rtt_us,
        "in_flight": s.in_flight,
        "sessions": s.sessions,
        "last_error_kind": error_kind(s.last_error_kind),
        "last_error": s.last_error,
        "backoff_until_unix_ms": s.backoff_until_unix_ms,
        "credential_expires_unix_ms": s.credential_expires_unix_ms,
        "relay_pin": s.relay_pin,
        "pins": s.pins,
        "service": {
            "url": svc.url, "reachable": svc.reachable, "version": svc.version,
            "error": svc.error, "checked_unix_ms": svc.checked_unix_ms,
            "models_loaded": svc.models_loaded, "models_available": svc.models_available,
            "models_loading": svc.models_loading,
        },
        "requests": s.requests,
        "refused": s.refused,
    })
}

/// `tunnelctl status` against relayd.
pub fn relay_status(s: &pb::RelayStatus, now: SystemTime) -> String {
    let state = if s.draining { "draining" } else { "serving" };
    let mut rows: Vec<(&str, String)> = vec![
        ("listen", s.listen.clone()),
        ("since", format!("{} ({})", when(s.since_unix_ms), relative(s.since_unix_ms, now))),
        ("tunnels", s.tunnels.to_string()),
        ("in flight", s.in_flight.to_string()),
        ("buffered", bytes(s.buffered_bytes)),
    ];
    if !s.tls_cert_file.is_empty() {
        rows.push(("tls", format!("{} (key {})", s.tls_cert_file, s.tls_pin)));
    }
    if !s.replica_id.is_empty() {
        rows.push(("replica", s.replica_id.clone()));
    }
    if !s.cluster_error.is_empty() {
        rows.push(("cluster", format!("unknown: {}", s.cluster_error)));
    }
    let mut out = pairs(&format!("relayd {}: {state}", s.version), &rows);
    if !s.replicas.is_empty() {
        let _ = writeln!(out, "  cluster  {} replica(s)", s.replicas.len());
        for r in &s.replicas {
            // A replica silent for 15 s is dead; the others reap it.
            let health = if r.heartbeat_age_ms > 15_000 { "silent" } else { "alive" };
            let me = if r.id == s.replica_id { " (this one)" } else { "" };
            let _ = writeln!(
                out,
                "    {}{me}  {health}, heartbeat {}s ago  {} {}  devices {}",
                r.id,
                r.heartbeat_age_ms / 1000,
                r.host,
                r.listen,
                r.devices
            );
        }
    }
    out
}

pub fn relay_status_json(s: &pb::RelayStatus) -> Value {
    json!({
        "daemon": "relayd", "version": s.version, "listen": s.listen,
        "since_unix_ms": s.since_unix_ms, "tunnels": s.tunnels, "in_flight": s.in_flight,
        "draining": s.draining, "buffered_bytes": s.buffered_bytes,
        "tls_cert_file": s.tls_cert_file, "tls_pin": s.tls_pin,
        "replica_id": s.replica_id, "cluster_error": s.cluster_error,
        "replicas": s.replicas.iter().map(|r| json!({
            "id": r.id, "host": r.host, "listen": r.listen, "up_ms": r.up_ms,
            "heartbeat_age_ms": r.heartbeat_age_ms, "devices": r.devices,
        })).collect::<Vec<_>>(),
    })
}

/// `tunnelctl tunnels`.
pub fn tunnels(list: &pb::ListTunnelsReply, now: SystemTime) -> String {
    if list.tunnels.is_empty() {
        return "no agent is connected\n".into();
    }
    // With --cluster every row names its replica.
    let cluster = list.tunnels.iter().any(|t| !t.replica.is_empty());
    let rows: Vec<Vec<String>> = list
        .tunnels
        .iter()
        .map(|t| {
            let mut row = vec![
                t.user.clone(),
                if t.device.is_empty() { "-".into() } else { t.device.clone() },
            ];
            if cluster {
                row.push(t.replica.clone());
            }
            if t.session_id.is_empty() {
                // Held by another replica: only where it is is known here.
                row.extend(std::iter::repeat_n("-".to_owned(), 8));
                return row;
            }
            row.extend([
                t.session_id.clone(),
                relative(t.since_unix_ms, now).trim_end_matches(" ago").to_owned(),
                t.agent.clone(),
                if t.protocol_version == 0 {
                    "original".into()
                } else {
                    format!("v{}", t.protocol_version)
                },
                t.in_flight.to_string(),
                if t.rtt_us > 0 { millis(t.rtt_us) } else { "-".into() },
                if t.auth_id.is_empty() { "-".into() } else { t.auth_id.clone() },
                match t.auth_expires_unix_ms {
                    0 => "-".into(),
                    e => relative(e, now),
                },
            ]);
            row
        })
        .collect();
    let mut header = vec!["USER", "DEVICE"];
    if cluster {
        header.push("REPLICA");
    }
    header.extend(["SESSION", "UP", "AGENT", "PROTOCOL", "IN FLIGHT", "RTT", "AUTH", "EXPIRES"]);
    table(&header, &rows)
}

pub fn tunnels_json(list: &pb::ListTunnelsReply) -> Value {
    Value::Array(
        list.tunnels
            .iter()
            .map(|t| {
                json!({
                    "user": t.user, "device": t.device, "user_hash": t.user_hash,
                    "session_id": t.session_id,
                    "since_unix_ms": t.since_unix_ms, "agent": t.agent,
                    "protocol_version": t.protocol_version, "in_flight": t.in_flight,
                    "rtt_us": t.rtt_us, "auth_id": t.auth_id,
                    "auth_expires_unix_ms": t.auth_expires_unix_ms, "replica": t.replica,
                })
            })
            .collect(),
    )
}

/// One trace event as a line: time, request, user, what happened.
pub fn trace_line(e: &pb::TraceEvent) -> String {
    let time = at(e.at_unix_ms)
        .map(|t| {
            let s = humantime::format_rfc3339_millis(t).to_string();
            s.get(11..23).unwrap_or(&s).to_owned()
        })
        .unwrap_or_else(|| "-".into());
    let who = if e.user_hash.is_empty() { String::new() } else { format!(" {}", e.user_hash) };
    let what = match &e.kind {
        Some(Kind::Start(s)) => format!("{} {}", s.method, s.path),
        Some(Kind::Head(h)) => format!("-> {} after {}", h.status, millis(h.first_byte_us)),
        Some(Kind::End(end)) => {
            let mut w = format!(
                "end {} {} in {}, {} in, {} out",
                if end.status == 0 { "-".to_owned() } else { end.status.to_string() },
                end.outcome,
                millis(end.duration_us),
                bytes(end.bytes_in),
                bytes(end.bytes_out)
            );
            match (end.model.is_empty(), end.tokens) {
                (true, _) => {}
                (false, 0) => {
                    let _ = write!(w, ", {}", end.model);
                }
                (false, n) => {
                    let _ = write!(w, ", {} {n} tokens", end.model);
                }
            }
            if !end.route.is_empty() {
                let _ = write!(w, ", via {}", end.route);
            }
            if !end.reason.is_empty() {
                let _ = write!(w, " ({})", end.reason);
            }
            w
        }
        Some(Kind::Dropped(d)) => format!("... {} events dropped (reading too slowly)", d.count),
        None => "?".into(),
    };
    format!("{time} {}{who} {what}", if e.request_id.is_empty() { "-" } else { &e.request_id })
}

pub fn trace_json(e: &pb::TraceEvent) -> Value {
    let mut v =
        json!({ "request_id": e.request_id, "user_hash": e.user_hash, "at_unix_ms": e.at_unix_ms });
    let body = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match &e.kind {
        Some(Kind::Start(s)) => {
            v["event"] = "start".into();
            v["method"] = s.method.clone().into();
            v["path"] = s.path.clone().into();
            if !s.body.is_empty() {
                v["body"] = body(&s.body).into();
            }
        }
        Some(Kind::Head(h)) => {
            v["event"] = "head".into();
            v["status"] = h.status.into();
            v["first_byte_us"] = h.first_byte_us.into();
        }
        Some(Kind::End(end)) => {
            v["event"] = "end".into();
            v["status"] = end.status.into();
            v["outcome"] = end.outcome.clone().into();
            v["reason"] = end.reason.clone().into();
            v["bytes_in"] = end.bytes_in.into();
            v["bytes_out"] = end.bytes_out.into();
            v["duration_us"] = end.duration_us.into();
            v["model"] = end.model.clone().into();
            v["tokens"] = end.tokens.into();
            if !end.body.is_empty() {
                v["body"] = body(&end.body).into();
            }
        }
        Some(Kind::Dropped(d)) => {
            v["event"] = "dropped".into();
            v["count"] = d.count.into();
        }
        None => {}
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(NOW)
    }

    #[test]
    fn agent_status_connected() {
        let s = pb::AgentStatus {
            state: pb::AgentState::Connected as i32,
            relay: "wss://relay.example.com/ws/tunnel".into(),
            session_id: "s_0c1f2e3d4c5b6a79".into(),
            since_unix_ms: NOW - 303_000,
            rtt_us: 12_345,
            in_flight: 2,
            sessions: 3,
            credential_expires_unix_ms: NOW + 2_700_000,
            relay_pin: "sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
            pins: vec!["sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into()],
            service: Some(pb::ServiceHealth {
                url: "http://127.0.0.1:11434/".into(),
                reachable: true,
                version: "0.13.0".into(),
                error: String::new(),
                checked_unix_ms: NOW - 12_000,
                models_loaded: vec!["llama3.2:latest".into()],
                models_available: vec!["llama3.2:latest".into(), "qwen2.5:7b".into()],
                models_loading: vec!["qwen2.5:7b".into()],
            }),
            requests: 120,
            refused: 3,
            version: "0.1.0".into(),
            ..pb::AgentStatus::default()
        };
        assert_eq!(
            agent_status(&s, now()),
            "\
agentd 0.1.0: connected
  relay          wss://relay.example.com/ws/tunnel
  session        s_0c1f2e3d4c5b6a79 since 2026-11-30 00:48:17 (5m 3s ago)
  rtt            12.3 ms
  in flight      2
  sessions       3 (2 reconnects)
  credential     expires 2026-11-30 01:38:20 (in 45m 0s; renewed by itself)
  relay key      sha256/47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU= (pinned)
  local service  http://127.0.0.1:11434/ reachable, version 0.13.0 (checked 12s ago)
  models         2 on the service, loaded: llama3.2:latest, loading: qwen2.5:7b
  requests       120 taken, 3 refused by the endpoint policy
"
        );
    }

    #[test]
    fn agent_status_backing_off_after_a_refusal() {
        let s = pb::AgentStatus {
            state: pb::AgentState::BackingOff as i32,
            relay: "wss://relay.example.com/ws/tunnel".into(),
            backoff_until_unix_ms: NOW + 8_000,
            sessions: 0,
            last_error_kind: pb::AgentErrorKind::Unauthorized as i32,
            last_error: "the relay refused the agent token (401)".into(),
            service: Some(pb::ServiceHealth {
                url: "http://127.0.0.1:11434/".into(),
                reachable: false,
                error: "connection refused".into(),
                checked_unix_ms: NOW - 1_000,
                ..pb::ServiceHealth::default()
            }),
            version: "0.1.0".into(),
            ..pb::AgentStatus::default()
        };
        assert_eq!(
            agent_status(&s, now()),
            "\
agentd 0.1.0: reconnecting
  relay          wss://relay.example.com/ws/tunnel
  next attempt   in 8s
  in flight      0
  sessions       0 (0 reconnects)
  credential     -
  local service  http://127.0.0.1:11434/ UNREACHABLE: connection refused (checked 1s ago)
  requests       0 taken, 0 refused by the endpoint policy
  last error     the relay refused the agent token (401) (unauthorized)
"
        );
    }

    #[test]
    fn the_cluster_view_names_each_devices_replica() {
        let list = pb::ListTunnelsReply {
            tunnels: vec![
                pb::Tunnel {
                    user: "alice".into(),
                    device: "gpu-box".into(),
                    replica: "r_1".into(),
                    session_id: "s_1".into(),
                    since_unix_ms: NOW - 60_000,
                    agent: "agentd/0.1.0".into(),
                    protocol_version: 1,
                    ..pb::Tunnel::default()
                },
                pb::Tunnel {
                    user: "bob".into(),
                    device: "laptop".into(),
                    replica: "r_2".into(),
                    ..pb::Tunnel::default()
                },
            ],
        };
        let text = tunnels(&list, now());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("USER   DEVICE   REPLICA  SESSION"), "{text}");
        assert!(lines[1].starts_with("alice  gpu-box  r_1      s_1"), "{text}");
        assert!(lines[2].starts_with("bob    laptop   r_2      -"), "{text}");
        let status = pb::RelayStatus {
            version: "0.1.0".into(),
            replica_id: "r_1".into(),
            replicas: vec![
                pb::Replica {
                    id: "r_1".into(),
                    heartbeat_age_ms: 2_000,
                    devices: 1,
                    ..Default::default()
                },
                pb::Replica {
                    id: "r_2".into(),
                    heartbeat_age_ms: 20_000,
                    devices: 1,
                    ..Default::default()
                },
            ],
            ..pb::RelayStatus::default()
        };
        let text = relay_status(&status, now());
        assert!(text.contains("  cluster  2 replica(s)\n"), "{text}");
        assert!(text.contains("    r_1 (this one)  alive, heartbeat 2s ago"), "{text}");
        assert!(text.contains("    r_2  silent, heartbeat 20s ago"), "{text}");
    }

    #[test]
    fn tunnels_table_is_aligned() {
        let list = pb::ListTunnelsReply {
            tunnels: vec![
                pb::Tunnel {
                    user: "alice".into(),
                    device: "gpu-box".into(),
                    session_id: "s_1".into(),
                    since_unix_ms: NOW - 3_720_000,
                    agent: "agentd/0.1.0".into(),
                    protocol_version: 1,
                    in_flight: 2,
                    rtt_us: 8_100,
                    auth_id: "c_00000000000000a1".into(),
                    auth_expires_unix_ms: NOW + 600_000,
                    ..pb::Tunnel::default()
                },
                pb::Tunnel {
                    user: "bob-the-builder".into(),
                    session_id: "s_22".into(),
                    since_unix_ms: NOW - 5_000,
                    agent: "desktop-client/1.0".into(),
                    protocol_version: 0,
                    ..pb::Tunnel::default()
                },
            ],
        };
        assert_eq!(
            tunnels(&list, now()),
            "\
USER             DEVICE   SESSION  UP     AGENT               PROTOCOL  IN FLIGHT  RTT     AUTH                EXPIRES
alice            gpu-box  s_1      1h 2m  agentd/0.1.0        v1        2          8.1 ms  c_00000000000000a1  in 10m 0s
bob-the-builder  -        s_22     5s     desktop-client/1.0  original  0          -       -                   -
"
        );
        assert_eq!(tunnels(&pb::ListTunnelsReply::default(), now()), "no agent is connected\n");
    }

    #[test]
    fn trace_lines_say_what_happened() {
        let ev = |kind| pb::TraceEvent {
            request_id: "7".into(),
            user_hash: "u_5d41402abc4b".into(),
            at_unix_ms: NOW + 345,
            kind: Some(kind),
        };
        assert_eq!(
            trace_line(&ev(Kind::Start(pb::RequestStart {
                method: "POST".into(),
                path: "/api/chat".into(),
                body: vec![]
            }))),
            "00:53:20.345 7 u_5d41402abc4b POST /api/chat"
        );
        assert_eq!(
            trace_line(&ev(Kind::Head(pb::ResponseHead { status: 200, first_byte_us: 412_300 }))),
            "00:53:20.345 7 u_5d41402abc4b -> 200 after 412.3 ms"
        );
        assert_eq!(
            trace_line(&ev(Kind::End(pb::RequestEnd {
                status: 200,
                bytes_in: 180,
                bytes_out: 3_400,
                duration_us: 2_300_000,
                outcome: "ok".into(),
                model: "llama3.2".into(),
                tokens: 42,
                ..pb::RequestEnd::default()
            }))),
            "00:53:20.345 7 u_5d41402abc4b end 200 ok in 2300.0 ms, 180 B in, 3.3 KiB out, llama3.2 42 tokens"
        );
        assert_eq!(
            trace_line(&ev(Kind::Dropped(pb::Dropped { count: 12 }))),
            "00:53:20.345 7 u_5d41402abc4b ... 12 events dropped (reading too slowly)"
        );
        let j = trace_json(&ev(Kind::Head(pb::ResponseHead { status: 404, first_byte_us: 9 })));
        assert_eq!(j["event"], "head");
        assert_eq!(j["status"], 404);
    }
}
