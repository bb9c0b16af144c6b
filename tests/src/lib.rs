//! Test harness for the tunnel: a test relay, a test agent, a stand-in
//! Ollama ([`ollama`]) and an agent that speaks only the original protocol
//! ([`legacy`]). Everything binds 127.0.0.1 on OS-picked ports and stops when
//! dropped; readiness is awaited on handles, never slept for.

pub mod footprint;
pub mod legacy;
pub mod notify;
pub mod ollama;
pub mod postgres;
pub mod proxy;
pub mod raw;
pub mod tls;

use daemon::Resolve as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use ollama::{StandIn, StandInConfig};

/// The agent token the harness gives `user`.
pub fn agent_token(user: &str) -> String {
    format!("agent-token-{user}-0123456789")
}

/// A directory under the system's temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tunnel-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a temp dir");
        Self(dir)
    }

    pub fn path(&self, name: &str) -> std::path::PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Longest any harness wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A relay serving in-process on 127.0.0.1.
pub struct TestRelay {
    pub relay: relayd::Relay,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestRelay {
    /// A relay that knows `users` (each with the harness agent token).
    pub async fn start(users: &[&str]) -> Self {
        Self::start_with(users, |_| {}).await
    }

    /// Like [`TestRelay::start`], with `tweak` applied to the config.
    pub async fn start_with(users: &[&str], tweak: impl FnOnce(&mut relayd::Config)) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("valid address"), users, tweak).await
    }

    /// A relay on `addr` (to restart one on the port it had).
    pub async fn start_on(
        addr: SocketAddr,
        users: &[&str],
        tweak: impl FnOnce(&mut relayd::Config),
    ) -> Self {
        let mut config = relayd::Config::default();
        config.users = users
            .iter()
            .map(|u| relayd::config::User {
                id: (*u).to_owned(),
                agent_token: Some(agent_token(u)),
                client_token: None,
                // The suites test the tunnel; identity has its own suite.
                public: true,
            })
            .collect();
        tweak(&mut config);
        let listener = TcpListener::bind(addr).await.expect("bind the relay listener");
        Self::serve(listener, relayd::Relay::new(config))
    }

    /// A relay over the state in `config`'s `state_dir` (its credential
    /// store, signing key and log key), as the daemon opens it.
    pub async fn with_state(config: relayd::Config) -> Self {
        let state = relayd::open_state(&config).await.expect("open the state directory");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the relay listener");
        Self::serve(listener, relayd::Relay::with_state(config, state))
    }

    /// Serves `relay` on `listener` until stopped.
    pub fn serve(listener: TcpListener, relay: relayd::Relay) -> Self {
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let serving = relay.clone();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { serving.run(listener, token).await });
        Self { relay, addr, shutdown, task: Some(task) }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// URL of `path` at `user`'s local service through the tunnel.
    pub fn tunnel_url(&self, user: &str, path: &str) -> String {
        self.url(&format!("/api/tunnel/{user}{path}"))
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws/tunnel", self.addr)
    }

    /// The WebSocket handshake an agent makes, with `token`: the status
    /// the relay answers (101 when it took the agent in).
    pub async fn agent_handshake(&self, token: &str) -> u16 {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
        let mut req = self.ws_url().into_client_request().expect("request");
        req.headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().expect("header value"));
        req.headers_mut()
            .insert("sec-websocket-protocol", tunnel_proto::SUBPROTOCOL.parse().expect("value"));
        match tokio_tungstenite::connect_async(req).await {
            Ok((_, resp)) => resp.status().as_u16(),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
            Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
        }
    }

    /// Waits until `user`'s agent is connected.
    pub async fn wait_for_agent(&self, user: &str) -> relayd::Tunnel {
        let mut found = None;
        tokio::time::timeout(
            WAIT,
            self.relay.wait_until(|r| {
                found = r.tunnel(user);
                found.is_some()
            }),
        )
        .await
        .expect("agent never connected");
        found.expect("wait_until returns once the tunnel is there")
    }

    /// Stops the relay now.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops the relay and waits until it released its port.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent running in-process.
pub struct TestAgent {
    pub agent: Arc<agentd::Agent>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestAgent {
    /// Starts an agent for `user` against `relay`, forwarding to `upstream`,
    /// and waits until its session is up.
    pub async fn start(relay: &TestRelay, user: &str, upstream: &str) -> Self {
        Self::start_with(relay, user, upstream, |_| {}).await
    }

    pub async fn start_with(
        relay: &TestRelay,
        user: &str,
        upstream: &str,
        tweak: impl FnOnce(&mut agentd::Config),
    ) -> Self {
        let mut config = agentd::ConfigFile {
            relay: Some(relay.ws_url()),
            token: Some(agent_token(user)),
            upstream: Some(upstream.to_owned()),
            ..agentd::ConfigFile::default()
        }
        .resolve()
        .expect("valid agent config");
        // The suites exercise the tunnel with the stand-in's own endpoints
        // (/echo, /bytes, ...); the identity suite tests the default policy.
        config.policy = agentd::policy::Policy::everything();
        tweak(&mut config);
        let agent = Arc::new(agentd::Agent::new(config));
        let shutdown = CancellationToken::new();
        let running = agent.clone();
        let token = shutdown.clone();
        let task = tokio::spawn(async move { running.run(token).await });
        let mut state = agent.state();
        tokio::time::timeout(WAIT, state.wait_for(|s| s.is_connected()))
            .await
            .expect("agent never connected")
            .expect("agent state");
        relay.wait_for_agent(user).await;
        Self { agent, shutdown, task: Some(task) }
    }

    /// Kills the agent as a crash would: no drain, no close frame.
    pub async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Stops the agent (it drains its streams first) and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Opens a plain TCP connection to `addr` and writes `bytes` as they are:
/// for requests a well-behaved HTTP client would not send.
pub async fn send_raw(addr: SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(bytes).await.expect("write the raw request");
    conn
}

/// Like [`send_raw`], from the loopback address `from` (e.g. 127.0.0.2):
/// another source address without leaving loopback.
pub async fn send_raw_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    bytes: &[u8],
) -> std::io::Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    let mut conn = socket.connect(addr).await?;
    conn.write_all(bytes).await?;
    Ok(conn)
}

/// Everything the peer sends on `conn` until it closes (or [`WAIT`]
/// passes, or a reset), lossily as text.
pub async fn read_until_closed(conn: &mut tokio::net::TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(conn, &mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The first bytes of the answer on `conn` (up to 4 KiB), failing the test
/// if none come within [`WAIT`].
pub async fn read_answer(conn: &mut tokio::net::TcpStream) -> String {
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(conn, &mut answer))
        .await
        .expect("no answer in time")
        .expect("read the answer");
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

/// Resident set size of this process in KiB, from /proc.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Installs a test log subscriber once (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Raises this process's open-file limit to its hard limit, for tests and
/// benchmarks that hold thousands of sockets; returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
}

/// An agent for `relay` with `token`, running until the token is
/// cancelled, without waiting for it to connect (it may never).
pub fn spawn_agent(
    relay: &TestRelay,
    token: &str,
    upstream: &str,
) -> (std::sync::Arc<agentd::Agent>, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<()>)
{
    let config = agentd::ConfigFile {
        relay: Some(relay.ws_url()),
        token: Some(token.to_owned()),
        upstream: Some(upstream.to_owned()),
        ..agentd::ConfigFile::default()
    }
    .resolve()
    .expect("valid agent config");
    let agent = std::sync::Arc::new(agentd::Agent::new(config));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (running, stop) = (agent.clone(), shutdown.clone());
    let task = tokio::spawn(async move { running.run(stop).await });
    (agent, shutdown, task)
}

/// The state of `agent` once it backs off after a failed attempt
/// (bounded: [`WAIT`]).
pub async fn backed_off(agent: &agentd::Agent) -> agentd::AgentState {
    let mut state = agent.state();
    let backing_off = |s: &agentd::AgentState| {
        matches!(s.phase, agentd::Phase::BackingOff { .. }) && s.last_error.is_some()
    };
    tokio::time::timeout(WAIT, state.wait_for(backing_off))
        .await
        .expect("it failed and backed off in time")
        .expect("the agent's state")
        .clone()
}
