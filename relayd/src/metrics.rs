//! The relay's Prometheus metrics (served on `metrics_listen` by the shared
//! listener in `daemon::metrics`): for operators, soak runs and benchmarks.

use std::sync::atomic::Ordering;

use daemon::metrics::{Exposition, tasks_alive};

use crate::state::Shared;

/// The metrics text of `shared` at this moment.
pub fn render(shared: &Shared) -> String {
    let sessions = shared.router.local().sessions();
    let streams: usize = sessions.iter().map(|s| s.in_flight()).sum();
    let mut out = Exposition::new();
    out.gauge("relayd_agents_connected", "Agent sessions connected.", sessions.len() as u64)
        .gauge("relayd_streams_in_flight", "Requests in flight through all tunnels.", streams as u64)
        .gauge(
            "relayd_buffered_bytes",
            "Response body bytes buffered for web clients.",
            shared.gauge.current() as u64,
        )
        .gauge(
            "relayd_buffered_bytes_peak",
            "Most response body bytes buffered at once since start.",
            shared.gauge.peak() as u64,
        )
        .gauge("relayd_tasks", "Tokio tasks alive in the relay process.", tasks_alive())
        .gauge("relayd_draining", "1 while the relay drains for shutdown.", shared.is_draining() as u64)
        .counter(
            "relayd_tls_handshake_failures_total",
            "TLS handshakes that failed or timed out (clients speaking plain HTTP, untrusted or wrong certificates, scanners).",
            shared.tls_handshake_failures.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_rate_limited_total",
            "Requests refused by a user's requests_per_minute (429).",
            shared.rate_limited.load(Ordering::Relaxed),
        );
    out.family(
        "relayd_routed_total",
        "counter",
        "Requests routed among several devices of a user, by why the device was picked.",
    );
    for (why, n) in shared.router.routed() {
        out.labelled("relayd_routed_total", &[("why", why.as_str())], n);
    }
    out.family(
        "relayd_routed_device_total",
        "counter",
        "Requests routed among several devices of a user, by device name across users (no user label; the first 64 names, then other).",
    );
    for (device, n) in shared.router.routed_by_device() {
        out.labelled("relayd_routed_device_total", &[("device", &device)], n);
    }
    if shared.config.cluster.is_some() {
        let c = &shared.cluster;
        out.counter(
            "relayd_cluster_claims_total",
            "Devices this replica claimed in the cluster's database.",
            c.claims.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_cluster_replaced_total",
            "Sessions here closed because their device connected to another replica (claim conflicts).",
            c.replaced.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_cluster_db_errors_total",
            "Times this replica's presence connections to the database failed.",
            c.db_errors.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_peer_forwarded_total",
            "Requests forwarded to the replica that holds their user's agent.",
            c.forwarded.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_peer_forward_failures_total",
            "Requests that could not be forwarded to the replica holding their user (503).",
            c.forward_failed.load(Ordering::Relaxed),
        )
        .counter(
            "relayd_peer_misdirected_total",
            "Forwarded requests refused here because this replica no longer holds the user (421).",
            c.misdirected.load(Ordering::Relaxed),
        )
        .gauge(
            "relayd_cluster_heartbeat_microseconds",
            "Round trip of this replica's last heartbeat to the database.",
            c.heartbeat_us.load(Ordering::Relaxed),
        );
    }
    shared.observer.render("relayd", &mut out);
    out.finish()
}
