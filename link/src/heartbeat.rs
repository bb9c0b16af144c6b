//! The heartbeat: a `ping` every interval through the urgent queue; a peer
//! that sent nothing at all for too many intervals is dead, whatever TCP
//! believes (a half-open connection, a blackholed network).

use std::time::Instant;

use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tracing::warn;

use tunnel_proto::liveness::Beat;

use crate::{End, Link, close_frame, lock};

/// Close code for a peer that stopped answering pings.
pub const UNRESPONSIVE: u16 = 4001;

pub(crate) async fn run(link: &Link) {
    let mut tick = tokio::time::interval(link.ping_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let beat = lock(&link.heartbeat).tick(Instant::now());
        match beat {
            Beat::Ping(ping) => link.push_urgent(ping),
            Beat::Dead { silent_for } => {
                warn!(session = %link.label, ?silent_for, "{} stopped answering pings (silent for {silent_for:.1?}); closing the session", link.peer);
                let text = format!("{} stopped answering pings", link.peer);
                link.end(
                    End::Unresponsive(silent_for),
                    Some(close_frame(CloseCode::Library(UNRESPONSIVE), text)),
                );
                return;
            }
        }
    }
}
