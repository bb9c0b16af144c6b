//! Relay state that is not routing: whether the relay drains, who may
//! handshake, the tasks to wait for, the buffers and counters metrics read.
//! Routing (which session serves which user) is the [`Router`]'s alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio_util::task::TaskTracker;

use tunnel_proto::flow::BufferGauge;

use crate::admission::{Admission, Buckets, RequestBudget};
use crate::config::Config;
use crate::identity::Identity;
use crate::route::Router;
use crate::stall::StallLimit;

/// State shared by every connection of one relay.
pub struct Shared {
    pub config: Config,
    /// Where requests go; this relay's sessions register with it.
    pub router: Router,
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
    /// Who tokens speak for.
    pub identity: Arc<Identity>,
    /// Each user's requests per minute (when limited).
    requests: Option<Box<dyn RequestBudget>>,
    /// The key user ids are hashed with in logs.
    log_key: ring::hmac::Key,
    /// Trace subscribers and request metrics.
    pub observer: Arc<daemon::observe::Observer>,
    /// Requests refused by a user's rate limit (429).
    pub rate_limited: AtomicU64,
    /// Replicas: what the presence task counts.
    pub cluster: crate::cluster::Stats,
    /// Replicas: where every device of the cluster is.
    pub directory: crate::cluster::Directory,
    /// Replicas: connections to the others, to forward requests on.
    pub peers: Option<crate::cluster::peer_client::PeerClient>,
    /// When the relay started.
    pub started: std::time::SystemTime,
    /// Health probes answered by the accept loop (the watchdog's proof that
    /// it turns), and the loop's end of them until it runs.
    pub probes: tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<()>>,
    pub probe_inbox:
        std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<tokio::sync::oneshot::Sender<()>>>>,
}

fn peers_of(config: &Config) -> Option<crate::cluster::peer_client::PeerClient> {
    let peering = config.cluster.as_ref()?.peering.as_ref()?;
    Some(crate::cluster::peer_client::PeerClient::new(peering.client.clone()))
}

impl Shared {
    pub fn new(config: Config, identity: Arc<Identity>, log_key: ring::hmac::Key) -> Self {
        let requests = config
            .requests_per_minute
            .map(|n| Box::new(Buckets::<String>::per_minute(n, n)) as Box<dyn RequestBudget>);
        let config_trace_bodies = config.control.trace_bodies;
        let admission = Admission::new(
            config.handshakes_per_second,
            config.refused_handshakes_per_minute,
            config.agent_handshakes_per_minute,
        );
        let (probes, probe_inbox) = tokio::sync::mpsc::channel(1);
        let peers = peers_of(&config);
        Self {
            config,
            router: Router::default(),
            gauge: Arc::new(BufferGauge::default()),
            conns: TaskTracker::new(),
            sessions: TaskTracker::new(),
            draining: AtomicBool::new(false),
            admission,
            tls_handshake_failures: AtomicU64::new(0),
            identity,
            requests,
            log_key,
            observer: daemon::observe::Observer::new(config_trace_bodies),
            rate_limited: AtomicU64::new(0),
            cluster: crate::cluster::Stats::default(),
            directory: crate::cluster::Directory::default(),
            peers,
            started: std::time::SystemTime::now(),
            probes,
            probe_inbox: std::sync::Mutex::new(Some(probe_inbox)),
        }
    }

    /// Spends one of `user`'s requests; `Some(seconds to wait)` when the
    /// user has none left this minute.
    pub fn request_allowance(&self, user: &str) -> Option<u64> {
        let wait = self.requests.as_ref()?.take(user, std::time::Instant::now());
        if wait.is_some() {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        wait
    }

    /// `user` as logs name it: a keyed hash (HMAC-SHA256 with the
    /// deployment's log key), never the id itself nor a prefix of it.
    pub fn user_hash(&self, user: &str) -> String {
        let tag = ring::hmac::sign(&self.log_key, user.as_bytes());
        let hex: String = tag.as_ref()[..6].iter().map(|b| format!("{b:02x}")).collect();
        format!("u_{hex}")
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
    /// Forwarded by another replica (its peer listener): served here or
    /// refused (421), never forwarded again.
    pub hop: bool,
}
