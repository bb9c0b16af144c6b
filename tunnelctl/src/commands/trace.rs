//! `tunnelctl trace`: request events as they happen, one line each (or one
//! JSON object per line), until interrupted or `--limit`.

use std::io::Write;

use tonic::transport::Channel;
use tunnel_proto::control::v1::{self as pb, agent_client::AgentClient, relay_client::RelayClient};

use super::write_error;
use crate::cli::{Trace, Which};
use crate::client::CtlError;
use crate::render;

pub async fn run(
    ch: Channel,
    which: Which,
    args: Trace,
    json: bool,
    out: &mut (dyn Write + Send),
) -> Result<(), CtlError> {
    let req = pb::TraceRequest {
        user: args.user.unwrap_or_default(),
        path_prefix: args.path.unwrap_or_default(),
        status: args.status.map_or(0, u32::from),
        limit: args.limit.unwrap_or(0),
        bodies: args.bodies,
    };
    let open = |which: Which, ch: Channel, req: pb::TraceRequest| async move {
        match which {
            Which::Agentd => AgentClient::new(ch).trace(req).await,
            Which::Relayd => RelayClient::new(ch).trace(req).await,
        }
    };
    // The other daemon's API when this socket does not serve the one
    // guessed (a --socket without --daemon).
    let other = match which {
        Which::Agentd => Which::Relayd,
        Which::Relayd => Which::Agentd,
    };
    let (which, opened) = match open(which, ch.clone(), req.clone()).await {
        Err(s) if s.code() == tonic::Code::Unimplemented => (other, open(other, ch, req).await),
        r => (which, r),
    };
    let name = which.name();
    let status = |e| CtlError::from_status(name, e);
    let mut stream = opened.map_err(status)?.into_inner();
    while let Some(event) = stream.message().await.map_err(status)? {
        let line =
            if json { render::trace_json(&event).to_string() } else { render::trace_line(&event) };
        writeln!(out, "{line}").map_err(write_error)?;
        out.flush().map_err(write_error)?;
    }
    Ok(())
}
