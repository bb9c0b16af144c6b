//! `tunnelctl disconnect USER [--device NAME]` (relayd).

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, relay_client::RelayClient};

use super::json_text;
use crate::client::CtlError;

pub async fn run(
    ch: Channel,
    user: String,
    device: Option<String>,
    json: bool,
) -> Result<String, CtlError> {
    let r = RelayClient::new(ch)
        .disconnect(pb::DisconnectRequest {
            user: user.clone(),
            device: device.clone().unwrap_or_default(),
        })
        .await
        .map_err(|e| CtlError::from_status("relayd", e))?
        .into_inner();
    let whose = match &device {
        Some(d) => format!("{user}'s device {d}"),
        None => user.clone(),
    };
    Ok(if json {
        json_text(&serde_json::json!({
            "user": user, "device": device, "disconnected": r.disconnected, "sessions": r.sessions,
        }))
    } else if r.disconnected {
        format!(
            "{whose}: {} tunnel{} closed; agents reconnect unless their credential was revoked\n",
            r.sessions,
            if r.sessions == 1 { "" } else { "s" }
        )
    } else {
        format!("{whose} has no tunnel\n")
    })
}
