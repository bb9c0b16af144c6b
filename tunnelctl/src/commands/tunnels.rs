//! `tunnelctl tunnels` (relayd).

use std::time::SystemTime;

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, relay_client::RelayClient};

use super::json_text;
use crate::client::CtlError;
use crate::render;

pub async fn run(ch: Channel, cluster: bool, json: bool) -> Result<String, CtlError> {
    let list = RelayClient::new(ch)
        .list_tunnels(pb::ListTunnelsRequest { cluster })
        .await
        .map_err(|e| CtlError::from_status("relayd", e))?
        .into_inner();
    Ok(if json {
        json_text(&render::tunnels_json(&list))
    } else {
        render::tunnels(&list, SystemTime::now())
    })
}
