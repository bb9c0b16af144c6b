//! `tunnelctl reconnect` (agentd).

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient};

use super::json_text;
use crate::client::CtlError;

pub async fn run(ch: Channel, json: bool) -> Result<String, CtlError> {
    let r = AgentClient::new(ch)
        .reconnect(pb::ReconnectRequest {})
        .await
        .map_err(|e| CtlError::from_status("agentd", e))?
        .into_inner();
    Ok(if json {
        json_text(&serde_json::json!({ "was_connected": r.was_connected }))
    } else if r.was_connected {
        "reconnecting: the session ends once its requests finished, then agentd connects again\n"
            .into()
    } else {
        "agentd was not connected; it connects now\n".into()
    })
}
