//! `tunnelctl enroll wss://relay.example.com` (agentd, first run): the
//! credential comes from stdin or a file, never from the command line.

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient};

use super::json_text;
use crate::cli::Enroll;
use crate::client::CtlError;

/// The credential: the file's or stdin's whole content, trimmed; `None`
/// with --keep-token.
fn read_token(args: &Enroll) -> Result<Option<String>, CtlError> {
    if args.keep_token {
        return Ok(None);
    }
    let token = super::read_secret(args.token_file.as_deref(), "paste the agent credential")?;
    if token.is_empty() {
        return Err(CtlError::Input(
            "no credential in the input (pipe it in, use --token-file, or --keep-token)".into(),
        ));
    }
    Ok(Some(token))
}

pub async fn run(ch: Channel, args: Enroll, json: bool) -> Result<String, CtlError> {
    let token = read_token(&args)?.unwrap_or_default();
    let r = AgentClient::new(ch)
        .enroll(pb::EnrollRequest { relay: args.relay, token, pins: args.pins })
        .await
        .map_err(|e| CtlError::from_status("agentd", e))?
        .into_inner();
    let state = pb::AgentState::try_from(r.state).unwrap_or(pb::AgentState::Unspecified);
    if json {
        return Ok(json_text(&serde_json::json!({
            "relay": r.relay, "stored": r.stored,
            "state": state.as_str_name().trim_start_matches("AGENT_STATE_").to_ascii_lowercase(),
            "last_error": r.last_error,
        })));
    }
    let outcome = match state {
        pb::AgentState::Connected => "connected".to_owned(),
        _ if !r.last_error.is_empty() => {
            format!(
                "not connected yet: {} (agentd keeps trying; see tunnelctl status)",
                r.last_error
            )
        }
        _ => "connecting (see tunnelctl status)".to_owned(),
    };
    Ok(format!("enrolled with {} (stored in {}); {outcome}\n", r.relay, r.stored))
}
