//! The daemons' control API, `tunnel.control.v1` (`proto/control/v1/*.proto`,
//! compiled at build time): the messages and the tonic client and server
//! stubs that agentd, relayd and tunnelctl share.

/// Version 1. The evolution rules are at the top of `common.proto`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("tunnel.control.v1");
}
