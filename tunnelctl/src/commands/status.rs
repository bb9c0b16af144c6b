//! `tunnelctl status`.

use std::time::SystemTime;

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient, relay_client::RelayClient};

use super::json_text;
use crate::cli::Which;
use crate::client::CtlError;
use crate::render;

/// The status of the daemon on the socket: `which` first, the other one
/// when that service is not there (a `--socket` without `--daemon`).
pub async fn run(ch: Channel, which: Which, json: bool) -> Result<String, CtlError> {
    let first = match which {
        Which::Agentd => agent(ch.clone(), json).await,
        Which::Relayd => relay(ch.clone(), json).await,
    };
    match first {
        Err(CtlError::Daemon { unimplemented: true, .. }) => match which {
            Which::Agentd => relay(ch, json).await,
            Which::Relayd => agent(ch, json).await,
        },
        other => other,
    }
}

pub async fn agent(ch: Channel, json: bool) -> Result<String, CtlError> {
    let s = AgentClient::new(ch)
        .status(pb::AgentStatusRequest {})
        .await
        .map_err(|e| CtlError::from_status("agentd", e))?
        .into_inner();
    Ok(if json {
        json_text(&render::agent_status_json(&s))
    } else {
        render::agent_status(&s, SystemTime::now())
    })
}

pub async fn relay(ch: Channel, json: bool) -> Result<String, CtlError> {
    let s = RelayClient::new(ch)
        .status(pb::RelayStatusRequest {})
        .await
        .map_err(|e| CtlError::from_status("relayd", e))?
        .into_inner();
    Ok(if json {
        json_text(&render::relay_status_json(&s))
    } else {
        render::relay_status(&s, SystemTime::now())
    })
}
