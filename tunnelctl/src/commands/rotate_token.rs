//! `tunnelctl rotate-token` (agentd): rotate in-band, or install a token
//! read from stdin or a file, never from the command line (where `ps` and
//! shell history would show it).

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient, rotate_token_request::How};

use super::json_text;
use crate::cli::RotateToken;
use crate::client::CtlError;

/// Reads the token to install: the whole input, trimmed.
fn read_token(args: &RotateToken) -> Result<Option<String>, CtlError> {
    if args.file.is_none() && !args.stdin {
        return Ok(None);
    }
    let token = super::read_secret(args.file.as_deref(), "paste the token")?;
    if token.is_empty() {
        return Err(CtlError::Input("no token in the input".into()));
    }
    Ok(Some(token))
}

pub async fn run(ch: Channel, args: RotateToken, json: bool) -> Result<String, CtlError> {
    let how = match read_token(&args)? {
        Some(token) => How::Install(token),
        None => How::Rotate(true),
    };
    let installing = matches!(how, How::Install(_));
    let r = AgentClient::new(ch)
        .rotate_token(pb::RotateTokenRequest { how: Some(how) })
        .await
        .map_err(|e| CtlError::from_status("agentd", e))?
        .into_inner();
    if json {
        return Ok(json_text(&serde_json::json!({
            "credential_id": r.credential_id, "stored": r.stored, "in_band": r.in_band,
        })));
    }
    let stored = if r.stored.is_empty() {
        "kept in memory only (agentd has no state_dir)".to_owned()
    } else {
        format!("stored in {}", r.stored)
    };
    Ok(if installing {
        let live =
            if r.in_band { "the live session runs on it" } else { "used from the next connection" };
        format!("token installed: {live}; {stored}\n")
    } else {
        format!("credential rotated: now {}, {stored}; the old one is revoked\n", r.credential_id)
    })
}
