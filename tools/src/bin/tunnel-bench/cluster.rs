//! Scenario `cluster`: three relayd replicas over one PostgreSQL, HAProxy
//! in front with round-robin (the worst case for cross-replica traffic:
//! two requests in three land on a replica that does not hold the user),
//! a crowd of in-process agents connected through HAProxy, and the
//! stand-in Ollama. Measures: requests to random users, all through
//! HAProxy, how many succeed and how many were forwarded; then latency at
//! c=1 and the first token of a streamed chat, same-replica against
//! cross-replica, going to one replica directly.

use daemon::Resolve as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::process::Child;

use crate::*;
use tools::procs::{free_port, path, scrape, spawn, spawn_program};

const REPLICAS: usize = 3;

/// One relayd of the scenario.
pub(crate) struct ClusterReplica {
    pub(crate) child: Child,
    pub(crate) port: u16,
    pub(crate) metrics: u16,
}

#[allow(clippy::print_stdout)]
pub(crate) async fn cluster(bin: &Path, args: &Args) -> Result<Value> {
    let (agents, requests, latency_n) =
        if args.smoke { (60, 600, 30) } else { (1000, 10_000, 300) };
    let Some(pg) = tunnel_tests::postgres::Postgres::start() else {
        bail!("PostgreSQL is not installed (apt-get install postgresql)");
    };
    let haproxy = which("haproxy").context("HAProxy is not installed (apt-get install haproxy)")?;
    let dir = tunnel_tests::TempDir::new("bench-cluster");
    let ca = tunnel_tests::tls::TestCa::new()?;
    relayd::admin::generate_key(&dir.path("signing.pem"))?;
    let hash = dir.path("user-hash.key");
    std::fs::write(&hash, rand::random::<[u8; 32]>())?;
    std::fs::set_permissions(&hash, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let database = pg.database("bench");
    let standin_port = free_port()?;
    let _standin = spawn(
        bin,
        "stand-in-ollama",
        &[
            "--listen".into(),
            format!("127.0.0.1:{standin_port}"),
            "--token-delay-ms".into(),
            "0".into(),
        ],
        &dir.0,
        "stand-in",
    )?;
    wait_port(standin_port).await?;

    let mut replicas = Vec::new();
    for i in 0..REPLICAS {
        let (port, metrics, peer) = (free_port()?, free_port()?, free_port()?);
        let mut conf = format!(
            "listen = \"127.0.0.1:{port}\"\nmetrics_listen = \"127.0.0.1:{metrics}\"\nworker_threads = {}\n",
            args.relay_workers
        );
        for u in 0..agents {
            conf.push_str(&format!(
                "\n[[users]]\nid = \"u{u}\"\nagent_token = \"{}\"\npublic = true\n",
                token(u)
            ));
        }
        conf.push_str(&format!(
            "\n[limits]\nhandshakes_per_second = 2000\n\n[control]\nsocket = \"off\"\n\n[identity]\nsigning_key_file = \"{}\"\nuser_hash_key_file = \"{}\"\n\n[cluster]\ndatabase = \"{database}\"\nmigrate_at_start = true\npeer_listen = \"127.0.0.1:{peer}\"\npeer_cert_file = \"{}\"\npeer_key_file = \"{}\"\npeer_ca_file = \"{}\"\n",
            path(&dir.path("signing.pem")),
            path(&hash),
            path(&ca.cert_file),
            path(&ca.key_file),
            path(&ca.ca_file),
        ));
        let file = dir.path(&format!("relayd-{i}.toml"));
        std::fs::write(&file, conf)?;
        let child = spawn(
            bin,
            "relayd",
            &["--config".into(), path(&file)],
            &dir.0,
            &format!("relayd-{i}"),
        )?;
        if let Err(e) = wait_port(port).await {
            let log = std::fs::read_to_string(dir.path(&format!("relayd-{i}.log")));
            bail!("{e}; relayd-{i} said: {}", log.unwrap_or_default());
        }
        replicas.push(ClusterReplica { child, port, metrics });
    }

    // HAProxy in front, round-robin, as SCALE.md's acceptance sets it up.
    let front = free_port()?;
    let mut cfg = format!(
        "global\n  maxconn 8000\ndefaults\n  mode http\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout tunnel 1h\n  option redispatch\nfrontend relays\n  bind 127.0.0.1:{front}\n  default_backend relayd\nbackend relayd\n  balance roundrobin\n  option httpchk GET /readyz\n"
    );
    for (i, r) in replicas.iter().enumerate() {
        cfg.push_str(&format!("  server r{i} 127.0.0.1:{} check inter 500ms fall 2\n", r.port));
    }
    std::fs::write(dir.path("haproxy.cfg"), cfg)?;
    let _haproxy = spawn_program(
        &haproxy,
        &["-f".into(), path(&dir.path("haproxy.cfg")), "-db".into()],
        &dir.0,
        "haproxy",
    )?;
    if let Err(e) = wait_port(front).await {
        let log = std::fs::read_to_string(dir.path("haproxy.log")).unwrap_or_default();
        bail!("{e}; haproxy said: {log}");
    }

    // The agents, through HAProxy: round-robin spreads them.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut running = Vec::with_capacity(agents);
    for u in 0..agents {
        let config = agentd::ConfigFile {
            relay: Some(format!("ws://127.0.0.1:{front}")),
            token: Some(token(u)),
            upstream: Some(format!("http://127.0.0.1:{standin_port}")),
            ..agentd::ConfigFile::default()
        }
        .resolve()?;
        let mut config = config;
        // Healthy after 1 s, as in `storm`: the crowd reconnects from the
        // first backoff step when the drill kills a replica.
        config.healthy_after = Duration::from_secs(1);
        let agent = agentd::Agent::new(config);
        let stop = shutdown.clone();
        running.push(tokio::spawn(async move { agent.run(stop).await }));
    }
    let started = Instant::now();
    let mut per_replica = Vec::new();
    loop {
        per_replica.clear();
        for r in &replicas {
            per_replica.push(scrape(r.metrics, "relayd_agents_connected").await.unwrap_or(0));
        }
        if per_replica.iter().sum::<u64>() as usize >= agents {
            break;
        }
        if started.elapsed() > Duration::from_secs(180) {
            bail!("only {per_replica:?} of {agents} agents connected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "cluster: {REPLICAS} relayd over PostgreSQL, HAProxy round-robin in front; {agents} agents connected in {:?}, per replica {per_replica:?}",
        started.elapsed()
    );
    let http = client(64);
    // Every replica knows where every user is once a request for the last
    // agent's user succeeds through each of them.
    for r in &replicas {
        let url = format!("http://127.0.0.1:{}/api/tunnel/u{}/api/tags", r.port, agents - 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while get(&http, &url).await.is_err() {
            if Instant::now() > deadline {
                bail!("replica on {} never learned where u{} is", r.port, agents - 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // Requests to random users, all through HAProxy.
    let forwarded_before = forwarded(&replicas).await;
    let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let t0 = Instant::now();
    let workers = 32;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (http, ok, failures) = (http.clone(), ok.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..requests).step_by(workers) {
                let user = (i * 7919 + w * 104_729) % agents;
                let url = format!("http://127.0.0.1:{front}/api/tunnel/u{user}/api/tags");
                match get(&http, &url).await {
                    Ok(()) => {
                        ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().expect("failures").push(format!("u{user}: {e}")),
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let took = t0.elapsed();
    let ok = ok.load(std::sync::atomic::Ordering::Relaxed);
    let forwarded_n = forwarded(&replicas).await - forwarded_before;
    let failed = failures.lock().expect("failures").clone();
    println!(
        "  {requests} requests to random users through HAProxy at c={workers}: {ok} succeeded ({:.2} %), {} failed; forwarded {forwarded_n} ({:.1} %); {:.0} req/s",
        ok as f64 * 100.0 / requests as f64,
        failed.len(),
        forwarded_n as f64 * 100.0 / requests as f64,
        requests as f64 / took.as_secs_f64()
    );
    for f in failed.iter().take(5) {
        println!("    failed: {f}");
    }

    // Latency at c=1 through replica 0: users it holds against users
    // another replica holds.
    let one = client(1);
    let r0 = replicas[0].port;
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for u in 0..agents {
        let before = scrape(replicas[0].metrics, "relayd_peer_forwarded_total").await.unwrap_or(0);
        let url = format!("http://127.0.0.1:{r0}/api/tunnel/u{u}/api/tags");
        get(&one, &url).await?;
        let after = scrape(replicas[0].metrics, "relayd_peer_forwarded_total").await.unwrap_or(0);
        let list = if after > before { &mut cross } else { &mut same };
        if list.len() < 20 {
            list.push(u);
        }
        if same.len() >= 20 && cross.len() >= 20 {
            break;
        }
    }
    if same.is_empty() || cross.is_empty() {
        bail!("replica 0 holds {} of the users tried and forwards {}", same.len(), cross.len());
    }
    let mut results = serde_json::Map::new();
    let mut rows = Vec::new();
    for (name, users) in [("same replica", &same), ("cross replica", &cross)] {
        let mut ms = Vec::with_capacity(latency_n);
        let mut ttft = Vec::with_capacity(latency_n / 3);
        for i in 0..latency_n {
            let url =
                format!("http://127.0.0.1:{r0}/api/tunnel/u{}/api/tags", users[i % users.len()]);
            let t = Instant::now();
            get(&one, &url).await?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            if i % 3 == 0 {
                let url = format!(
                    "http://127.0.0.1:{r0}/api/tunnel/u{}/api/chat",
                    users[i % users.len()]
                );
                let seen = chat_stream(&one, &url, 4, 0).await?;
                ttft.push(seen.arrivals_ms[0]);
            }
        }
        let row = (percentile(&ms, 50.0), percentile(&ms, 99.0), percentile(&ttft, 50.0));
        println!(
            "  {name:<13} at c=1, GET /api/tags: p50 {:.3} ms, p99 {:.3} ms; first token of a streamed chat p50 {:.3} ms",
            row.0, row.1, row.2
        );
        results.insert(
            name.replace(' ', "_"),
            json!({ "p50_ms": row.0, "p99_ms": row.1, "ttft_p50_ms": row.2 }),
        );
        rows.push(row);
    }
    println!(
        "  cross minus same: p50 {:+.3} ms, p99 {:+.3} ms, first token {:+.3} ms",
        rows[1].0 - rows[0].0,
        rows[1].1 - rows[0].1,
        rows[1].2 - rows[0].2
    );
    let db =
        relayd::cluster::ClusterFile { database: Some(database.clone()), ..Default::default() }
            .resolve()?
            .context("a database")?;
    let drill = kill_one(&mut replicas, &db, front, agents).await?;
    shutdown.cancel();
    for r in running {
        let _ = tokio::time::timeout(Duration::from_secs(15), r).await;
    }
    Ok(json!({
        "kill_one": drill,
        "replicas": REPLICAS, "agents": agents, "per_replica": per_replica,
        "requests": requests, "succeeded": ok, "failed": failed.len(), "forwarded": forwarded_n,
        "requests_per_second": requests as f64 / took.as_secs_f64(),
        "latency": results,
    }))
}

async fn get(http: &Http, url: &str) -> Result<()> {
    let resp = http.request(Request::get(url).body(full(""))?).await?;
    let status = resp.status();
    resp.into_body().collect().await?;
    if !status.is_success() {
        bail!("status {status}");
    }
    Ok(())
}

async fn forwarded(replicas: &[ClusterReplica]) -> u64 {
    let mut n = 0;
    for r in replicas {
        n += scrape(r.metrics, "relayd_peer_forwarded_total").await.unwrap_or(0);
    }
    n
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
}
