//! The rig: relayd, agentd and the stand-in as real processes, the HTTP
//! client, and the routes a scenario measures (direct, tunnel, raw TCP).

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::process::Child;

use crate::*;
use tools::procs::{cpu_time, free_port, path, scrape, spawn, spawn_program};
use tunnel_tests::tls::TestCert;

pub(crate) type Body = BoxBody<Bytes, Infallible>;
pub(crate) type Http = Client<HttpConnector, Body>;

pub(crate) fn client(pool: usize) -> Http {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(pool).build(conn)
}

pub(crate) fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

/// Which way a request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Client -> stand-in.
    Direct,
    /// Client -> relayd -> agentd -> stand-in.
    Tunnel,
    /// Client -> tcp-forward -> tcp-forward -> stand-in: the raw-TCP
    /// baseline, two hops that only copy bytes.
    Raw,
    /// Client -> rathole server -> rathole client -> stand-in: the L4
    /// tunnel we hold ourselves to, when a `rathole` binary is at hand
    /// (`--rathole`, or on `PATH`).
    Rathole,
}

/// How many paths a scenario can measure; index arrays with `route as usize`.
pub(crate) const PATHS: usize = 4;

/// One `T` per path.
pub(crate) fn per_path<T: Default>() -> [T; PATHS] {
    std::array::from_fn(|_| T::default())
}

/// The `rathole` binary of this run, when there is one.
pub(crate) static RATHOLE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

fn rathole() -> Option<&'static Path> {
    RATHOLE.get().and_then(Option::as_deref)
}

impl Route {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Tunnel => "tunnel",
            Route::Raw => "raw TCP",
            Route::Rathole => "rathole",
        }
    }

    /// The path's key in result files.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Tunnel => "tunnel",
            Route::Raw => "raw_tcp",
            Route::Rathole => "rathole",
        }
    }
}

/// The paths this run measures: rathole only when its binary is at hand.
pub(crate) fn routes() -> Vec<Route> {
    let mut all = vec![Route::Direct, Route::Tunnel, Route::Raw];
    if rathole().is_some() {
        all.push(Route::Rathole);
    }
    all
}

/// The order of the paths in round `r`: rotating, so none always runs on a
/// warmer machine.
pub(crate) fn order(r: usize) -> Vec<Route> {
    let mut all = routes();
    let n = all.len();
    all.rotate_left(r % n);
    all
}

pub(crate) struct RigOpts {
    /// Users the relay knows (u0, u1, ...).
    pub(crate) users: usize,
    /// agentd processes (for u0.., each its own).
    pub(crate) agents: usize,
    pub(crate) handshakes_per_second: u32,
    /// relayd terminates TLS (a throwaway self-signed certificate); agents
    /// dial `wss://`.
    pub(crate) tls: bool,
    /// relayd and agentd run under valgrind's callgrind, which writes
    /// `<dir>/<log>.callgrind` when they exit (scenario `cost`).
    pub(crate) callgrind: bool,
}

/// One user with one agentd: most scenarios.
pub(crate) const ONE_AGENT: RigOpts =
    RigOpts { users: 1, agents: 1, handshakes_per_second: 1000, tls: false, callgrind: false };

/// The stand-in, relayd and agentd processes of one scenario.
pub(crate) struct Rig {
    pub(crate) bin: PathBuf,
    pub(crate) dir: PathBuf,
    pub(crate) _standin: Child,
    pub(crate) relay: Child,
    pub(crate) agents: Vec<Child>,
    pub(crate) standin_port: u16,
    pub(crate) relay_port: u16,
    pub(crate) relay_metrics: u16,
    pub(crate) agent_metrics: Vec<u16>,
    /// The relay's certificate when it serves TLS.
    pub(crate) cert: Option<TestCert>,
    /// The two chained forwarders of the raw-TCP baseline, and the port of
    /// the first.
    pub(crate) forwarders: Vec<Child>,
    pub(crate) raw_port: u16,
    /// rathole's server and client, and the server's service port.
    pub(crate) ratholes: Vec<Child>,
    pub(crate) rathole_port: u16,
}

pub(crate) static RIGS: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn token(i: usize) -> String {
    format!("bench-agent-token-{i:06}-0123456789")
}

impl Rig {
    pub(crate) async fn start(bin: &Path, args: &Args, o: RigOpts) -> Result<Rig> {
        let dir = std::env::temp_dir().join(format!(
            "tunnel-bench-{}-{}",
            std::process::id(),
            RIGS.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        let standin_port = free_port()?;
        let standin = spawn(
            bin,
            "stand-in-ollama",
            &[
                "--listen".into(),
                format!("127.0.0.1:{standin_port}"),
                // Each chat request sets its own pace.
                "--token-delay-ms".into(),
                "0".into(),
            ],
            &dir,
            "stand-in",
        )?;
        wait_port(standin_port).await?;
        let (raw_port, second) = (free_port()?, free_port()?);
        let mut forwarders = Vec::new();
        for (name, listen, to) in [("fwd-2", second, standin_port), ("fwd-1", raw_port, second)] {
            forwarders.push(spawn(
                bin,
                "tcp-forward",
                &[
                    "--listen".into(),
                    format!("127.0.0.1:{listen}"),
                    "--to".into(),
                    format!("127.0.0.1:{to}"),
                ],
                &dir,
                name,
            )?);
            wait_port(listen).await?;
        }
        let (ratholes, rathole_port) = match rathole() {
            Some(program) => start_rathole(program, &dir, standin_port).await?,
            None => (Vec::new(), 0),
        };
        let relay_port = free_port()?;
        let relay_metrics = free_port()?;
        let mut conf = format!(
            "listen = \"127.0.0.1:{relay_port}\"\nworker_threads = {}\nmetrics_listen = \"127.0.0.1:{relay_metrics}\"\n",
            args.relay_workers
        );
        for i in 0..o.users {
            conf.push_str(&format!(
                "\n[[users]]\nid = \"u{i}\"\nagent_token = \"{}\"\npublic = true\n",
                token(i)
            ));
        }
        conf.push_str(&format!(
            "\n[limits]\nhandshakes_per_second = {}\n{}",
            o.handshakes_per_second,
            LIMITS.get().map(String::as_str).unwrap_or_default()
        ));
        let cert = if o.tls { Some(TestCert::new()?) } else { None };
        if let Some(c) = &cert {
            conf.push_str(&format!(
                "\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
                path(&c.cert_file),
                path(&c.key_file)
            ));
        }
        // The relay's control socket: the trace scenario subscribes on it.
        conf.push_str(&format!("\n[control]\nsocket = \"{}\"\n", path(&dir.join("relayd.sock"))));
        std::fs::write(dir.join("relayd.toml"), conf)?;
        let mut rig = Rig {
            bin: bin.to_owned(),
            relay: daemon(
                bin,
                "relayd",
                &["--config".into(), path(&dir.join("relayd.toml"))],
                &dir,
                "relayd",
                o.callgrind,
            )?,
            dir,
            _standin: standin,
            agents: Vec::new(),
            standin_port,
            relay_port,
            relay_metrics,
            agent_metrics: Vec::new(),
            cert,
            forwarders,
            raw_port,
            ratholes,
            rathole_port,
        };
        wait_port(relay_metrics).await?;
        for i in 0..o.agents {
            let port = free_port()?;
            rig.agent_metrics.push(port);
            let file = rig.dir.join(format!("agentd-{i}.toml"));
            std::fs::write(
                &file,
                format!(
                    "relay = \"{}://127.0.0.1:{relay_port}\"\ntoken = \"{}\"\nupstream = \"http://127.0.0.1:{standin_port}\"\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[policy]\n# The bulk scenarios' stand-in endpoints.\nallow = [\"GET /zeros\", \"POST /sink\"]\n\n[control]\nsocket = \"off\"\n\n[limits]\n{}{}",
                    if rig.cert.is_some() { "wss" } else { "ws" },
                    token(i),
                    LIMITS.get().map(String::as_str).unwrap_or_default(),
                    rig.cert.as_ref().map_or(String::new(), |c| format!(
                        "\n[tls]\nca_file = \"{}\"\n",
                        path(&c.cert_file)
                    )),
                ),
            )?;
            rig.agents.push(daemon(
                bin,
                "agentd",
                &["--config".into(), path(&file)],
                &rig.dir,
                &format!("agentd-{i}"),
                o.callgrind,
            )?);
        }
        if o.callgrind {
            // Each scrape of the relay's metrics costs it about 100,000
            // instructions, and how many a wait takes depends on how fast
            // the daemons start under valgrind: enough to move its count
            // per request by 5 % between runs. Its log costs it nothing.
            rig.wait_relay_logged(o.agents, "agent connected", Duration::from_secs(120)).await?;
        } else {
            rig.wait_agents(o.agents, Duration::from_secs(120)).await?;
        }
        Ok(rig)
    }

    /// Waits until the relay's log holds `line` `n` times. relayd logs an
    /// agent as connected just before it puts it in the route, with no
    /// wait in between.
    async fn wait_relay_logged(&self, n: usize, line: &str, limit: Duration) -> Result<()> {
        let started = Instant::now();
        let log = self.dir.join("relayd.log");
        while std::fs::read_to_string(&log).unwrap_or_default().matches(line).count() < n {
            if started.elapsed() > limit {
                bail!("relayd has not logged {line:?} {n} times after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    pub(crate) fn spawn_relay(bin: &Path, dir: &Path) -> Result<Child> {
        spawn(bin, "relayd", &["--config".into(), path(&dir.join("relayd.toml"))], dir, "relayd")
    }

    /// Stops relayd and every agentd as their service manager would
    /// (SIGTERM) and waits at most `limit` for each to exit.
    pub(crate) async fn stop_daemons(&mut self, limit: Duration) -> Result<()> {
        for child in self.agents.iter_mut().chain([&mut self.relay]) {
            if let Some(pid) = child.id() {
                let pid = nix::unistd::Pid::from_raw(pid as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            }
            match tokio::time::timeout(limit, child.wait()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("waiting for a daemon to exit: {e}"),
                Err(_) => bail!("a daemon did not exit within {limit:?} of SIGTERM"),
            }
        }
        Ok(())
    }

    /// Waits until the relay counts `n` agents.
    pub(crate) async fn wait_agents(&self, n: usize, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let have = scrape(self.relay_metrics, "relayd_agents_connected").await.unwrap_or(0);
            if have as usize >= n {
                return Ok(started.elapsed());
            }
            if started.elapsed() > limit {
                bail!("only {have} of {n} agents connected after {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) fn url(&self, p: Route, user: usize, target: &str) -> String {
        match p {
            Route::Direct => format!("http://127.0.0.1:{}{target}", self.standin_port),
            Route::Tunnel => {
                format!("http://127.0.0.1:{}/api/tunnel/u{user}{target}", self.relay_port)
            }
            Route::Raw => format!("http://127.0.0.1:{}{target}", self.raw_port),
            Route::Rathole => format!("http://127.0.0.1:{}{target}", self.rathole_port),
        }
    }

    /// CPU time of the two raw-TCP forwarders so far.
    pub(crate) fn forwarders_cpu(&self) -> Duration {
        self.forwarders.iter().filter_map(Child::id).map(cpu_time).sum()
    }

    /// CPU time of what carries `p` besides the client and the stand-in.
    pub(crate) fn path_cpu(&self, p: Route) -> Duration {
        match p {
            Route::Direct => Duration::ZERO,
            Route::Tunnel => self.daemons_cpu(),
            Route::Raw => self.forwarders_cpu(),
            Route::Rathole => self.ratholes.iter().filter_map(Child::id).map(cpu_time).sum(),
        }
    }

    pub(crate) fn relay_pid(&self) -> u32 {
        self.relay.id().unwrap_or(0)
    }

    pub(crate) fn agent_pid(&self, i: usize) -> u32 {
        self.agents.get(i).and_then(Child::id).unwrap_or(0)
    }

    /// CPU time of relayd and every agentd so far.
    pub(crate) fn daemons_cpu(&self) -> Duration {
        cpu_time(self.relay_pid())
            + self.agents.iter().filter_map(Child::id).map(cpu_time).sum::<Duration>()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// rathole's server and client on loopback, one TCP service to the
/// stand-in, as its README sets them up (TCP transport, `nodelay` on); ready
/// once the server listens on the service port, which it binds only when
/// the client's control channel is up.
async fn start_rathole(program: &Path, dir: &Path, standin: u16) -> Result<(Vec<Child>, u16)> {
    let (control, service) = (free_port()?, free_port()?);
    let token = "bench-rathole-token";
    std::fs::write(
        dir.join("rathole-server.toml"),
        format!(
            "[server]\nbind_addr = \"127.0.0.1:{control}\"\n[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n[server.services.s]\ntoken = \"{token}\"\nbind_addr = \"127.0.0.1:{service}\"\nnodelay = true\n"
        ),
    )?;
    std::fs::write(
        dir.join("rathole-client.toml"),
        format!(
            "[client]\nremote_addr = \"127.0.0.1:{control}\"\n[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n[client.services.s]\ntoken = \"{token}\"\nlocal_addr = \"127.0.0.1:{standin}\"\nnodelay = true\n"
        ),
    )?;
    let server =
        spawn_program(program, &[path(&dir.join("rathole-server.toml"))], dir, "rathole-server")?;
    wait_port(control).await?;
    let client =
        spawn_program(program, &[path(&dir.join("rathole-client.toml"))], dir, "rathole-client")?;
    wait_port(service).await?;
    Ok((vec![server, client], service))
}

/// Starts daemon `name`, under callgrind when asked.
fn daemon(
    bin: &Path,
    name: &str,
    args: &[String],
    dir: &Path,
    log: &str,
    callgrind: bool,
) -> Result<Child> {
    if !callgrind {
        return spawn(bin, name, args, dir, log);
    }
    let mut all = vec![
        "--tool=callgrind".to_owned(),
        format!("--callgrind-out-file={}", path(&dir.join(format!("{log}.callgrind")))),
        "--dump-instr=no".to_owned(),
        "--dump-line=no".to_owned(),
        path(&bin.join(name)),
    ];
    all.extend_from_slice(args);
    spawn_program(Path::new("valgrind"), &all, dir, log)
}

pub(crate) async fn wait_port(port: u16) -> Result<()> {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if started.elapsed() > Duration::from_secs(20) {
            bail!("nothing listens on port {port} after 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

// ---------------------------------------------------------------- statistics
