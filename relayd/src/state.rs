//! Relay state that is not routing: whether the relay drains, who may
//! handshake, the tasks to wait for, the buffers and counters metrics read.
//! Routing (which session serves which user) is the [`Hub`]'s alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_util::task::TaskTracker;

use tunnel_proto::flow::BufferGauge;

use crate::admission::Admission;
use crate::config::Config;
use crate::hub::Hub;
use crate::stall::StallLimit;

/// State shared by every connection of one relay.
pub struct Shared {
    pub config: Config,
    pub hub: Hub,
    /// Response bytes buffered for web clients, across all streams.
    pub gauge: Arc<BufferGauge>,
    /// HTTP connections (web clients; agents until their upgrade).
    pub conns: TaskTracker,
    /// Agent sessions.
    pub sessions: TaskTracker,
    /// Set once shutdown began: new requests get 503.
    draining: AtomicBool,
    /// Agent handshakes: the agents' allowance (reconnect storms) and each
    /// source's budget of refused attempts.
    pub admission: Admission,
    /// TLS handshakes that failed or timed out (logged at debug only: on a
    /// public port most are scanners).
    pub tls_handshake_failures: AtomicU64,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        let admission = Admission::new(
            config.handshakes_per_second,
            config.refused_handshakes_per_minute,
            config.refused_handshakes_per_minute,
        );
        Self {
            config,
            hub: Hub::default(),
            gauge: Arc::new(BufferGauge::default()),
            conns: TaskTracker::new(),
            sessions: TaskTracker::new(),
            draining: AtomicBool::new(false),
            admission,
            tls_handshake_failures: AtomicU64::new(0),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
    }
}

/// What the relay knows of the connection a request arrived on.
#[derive(Debug)]
pub struct Conn {
    /// The TCP peer (a proxy, when one is in front).
    pub peer: SocketAddr,
    /// How long writes to this client may stall; set per request.
    pub stall: StallLimit,
}
