//! `tunnelctl token issue|revoke` (relayd). An issued token goes alone to
//! stdout (for `> file` or a pipe); what it is goes to stderr.

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, relay_client::RelayClient};

use super::json_text;
use crate::cli::{Role, Token};
use crate::client::CtlError;

pub async fn run(ch: Channel, cmd: Token, json: bool) -> Result<String, CtlError> {
    let mut client = RelayClient::new(ch);
    let status = |e| CtlError::from_status("relayd", e);
    match cmd {
        Token::Issue { user, role, device, ttl, paths, models } => {
            let r = client
                .issue_token(pb::IssueTokenRequest {
                    user: user.clone(),
                    role: match role {
                        Role::Agent => pb::TokenRole::Agent,
                        Role::Client => pb::TokenRole::Client,
                    } as i32,
                    ttl_seconds: ttl.map_or(0, |d| d.as_secs().max(1)),
                    paths,
                    models,
                    device: device.clone().unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            if json {
                return Ok(json_text(&serde_json::json!({
                    "id": r.id, "token": r.token, "expires_unix_ms": r.expires_unix_ms,
                })));
            }
            match role {
                Role::Agent => match &device {
                    Some(d) => {
                        eprintln!("tunnelctl: agent credential {} for {user}, device {d}", r.id)
                    }
                    None => eprintln!("tunnelctl: agent credential {} for {user}", r.id),
                },
                Role::Client => eprintln!(
                    "tunnelctl: client token {} for {user}, valid until {}",
                    r.id,
                    humantime::format_rfc3339_seconds(
                        std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.expires_unix_ms)
                    )
                ),
            }
            Ok(format!("{}\n", r.token))
        }
        Token::Revoke { id } => {
            let r = client
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(status)?
                .into_inner();
            Ok(if json {
                json_text(&serde_json::json!({
                    "id": id, "revoked": r.revoked, "sessions_ended": r.sessions_ended,
                }))
            } else if r.revoked {
                format!("{id} revoked; {} live session(s) ended\n", r.sessions_ended)
            } else {
                format!("{id} was revoked already\n")
            })
        }
    }
}
