//! The agent's Prometheus metrics (served on `metrics_listen` by the shared
//! listener in `daemon::metrics`): for operators, soak runs and benchmarks.

use daemon::metrics::{Exposition, tasks_alive};

use crate::Agent;

/// The metrics text of `agent` at this moment.
pub fn render(agent: &Agent) -> String {
    let state = agent.state().borrow().clone();
    let gauge = agent.buffered();
    let mut out = Exposition::new();
    out.gauge("agentd_connected", "1 while a relay session is up.", state.is_connected() as u64)
        .counter("agentd_sessions_total", "Relay sessions established.", state.sessions)
        .counter(
            "agentd_requests_total",
            "Requests taken from the relay.",
            agent.requests().received,
        )
        .counter(
            "agentd_requests_refused_total",
            "Requests the endpoint policy refused (400 or 403, nothing sent to the local service).",
            agent.requests().refused,
        )
        .gauge(
            "agentd_streams_in_flight",
            "Requests in flight to the local service.",
            agent.in_flight() as u64,
        )
        .gauge(
            "agentd_buffered_bytes",
            "Request body bytes buffered for the local service.",
            gauge.current() as u64,
        )
        .gauge(
            "agentd_buffered_bytes_peak",
            "Most request body bytes buffered at once since start.",
            gauge.peak() as u64,
        )
        .gauge("agentd_tasks", "Tokio tasks alive in the agent process.", tasks_alive());
    agent.observer().render("agentd", &mut out);
    out.finish()
}
