//! `tunnelctl log-level [FILTER]`: reads or replaces a daemon's log filter
//! while it runs.

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient, relay_client::RelayClient};

use super::json_text;
use crate::cli::Which;
use crate::client::CtlError;

async fn call(ch: Channel, which: Which, filter: &str) -> Result<pb::LogLevelReply, CtlError> {
    let req = pb::LogLevelRequest { filter: filter.to_owned() };
    let answer = match which {
        Which::Agentd => AgentClient::new(ch).log_level(req).await,
        Which::Relayd => RelayClient::new(ch).log_level(req).await,
    };
    answer.map(tonic::Response::into_inner).map_err(|e| CtlError::from_status(which.name(), e))
}

pub async fn run(
    ch: Channel,
    which: Which,
    filter: Option<String>,
    json: bool,
) -> Result<String, CtlError> {
    let filter = filter.unwrap_or_default();
    // A --socket without --daemon: the other API when this one is absent.
    let r = match call(ch.clone(), which, &filter).await {
        Err(CtlError::Daemon { unimplemented: true, .. }) => {
            let other = if which == Which::Agentd { Which::Relayd } else { Which::Agentd };
            call(ch, other, &filter).await?
        }
        other => other?,
    };
    if json {
        return Ok(json_text(&serde_json::json!({
            "filter": r.filter, "previous": r.previous, "output": r.output,
        })));
    }
    Ok(if r.previous.is_empty() {
        format!("log filter: {} (lines go to {})\n", r.filter, r.output)
    } else {
        format!("log filter: {} (was {}; until the next restart)\n", r.filter, r.previous)
    })
}
