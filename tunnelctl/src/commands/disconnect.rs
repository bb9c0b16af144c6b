//! `tunnelctl disconnect USER` (relayd).

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, relay_client::RelayClient};

use super::json_text;
use crate::client::CtlError;

pub async fn run(ch: Channel, user: String, json: bool) -> Result<String, CtlError> {
    let r = RelayClient::new(ch)
        .disconnect(pb::DisconnectRequest { user: user.clone() })
        .await
        .map_err(|e| CtlError::from_status("relayd", e))?
        .into_inner();
    Ok(if json {
        json_text(&serde_json::json!({ "user": user, "disconnected": r.disconnected }))
    } else if r.disconnected {
        format!("{user}'s tunnel closed; its agent reconnects unless its credential was revoked\n")
    } else {
        format!("{user} has no tunnel\n")
    })
}
