//! `tunnelctl reload` (relayd): the certificate and key read again, as
//! SIGHUP does, with the answer coming back to the caller.

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, relay_client::RelayClient};

use super::json_text;
use crate::client::CtlError;

pub async fn run(ch: Channel, json: bool) -> Result<String, CtlError> {
    let r = RelayClient::new(ch)
        .reload(pb::ReloadRequest {})
        .await
        .map_err(|e| CtlError::from_status("relayd", e))?
        .into_inner();
    if json {
        return Ok(json_text(&serde_json::json!({ "reloaded": r.reloaded })));
    }
    Ok(if r.reloaded.is_empty() {
        "nothing to reload (relayd has no [tls])\n".to_owned()
    } else {
        format!("reloaded: {}\n", r.reloaded.join(", "))
    })
}
