//! Relays as replicas over one PostgreSQL database (`[cluster]`): the
//! schema's migrations, the credential store, and revocations that reach
//! every replica; a replica that lost the database fails closed. Each test
//! starts its own PostgreSQL on loopback (`tunnel_tests::postgres`).

use std::time::{Duration, Instant};

use relayd::cluster::{ClusterConfig, ClusterFile, schema};
use relayd::identity::Role;
use relayd::identity::store::{CredentialRecord, CredentialStore, Revocation, StoreEvent};
use tunnel_proto::Limits;
use tunnel_tests::postgres::Postgres;
use tunnel_tests::raw::RawAgent;
use tunnel_tests::{TempDir, TestRelay, WAIT, init_logging};

fn cluster(database: &str, extra: &str) -> ClusterConfig {
    let text = format!("database = \"{database}\"\n{extra}");
    toml::from_str::<ClusterFile>(&text)
        .expect("[cluster] parses")
        .resolve()
        .expect("[cluster] is valid")
        .expect("a database is set")
}

#[tokio::test]
async fn migrations_apply_from_empty_and_from_every_earlier_version_once() {
    let Some(pg) = Postgres::start() else { return };
    for start in 0..=schema::latest() {
        let db = cluster(&pg.database(&format!("from_{start}")), "");
        let mut client = db.connect().await.expect("connect");
        let first = schema::migrate(&db, &mut client, Some(start)).await.expect("migrate part");
        assert_eq!((first.from, first.to), (0, start));
        assert_eq!(schema::version(&db, &client).await.expect("version"), start);
        let rest = schema::migrate(&db, &mut client, None).await.expect("migrate the rest");
        assert_eq!((rest.from, rest.to), (start, schema::latest()));
        assert_eq!(rest.applied.len() as u32, schema::latest() - start);
        schema::check(&db, &client).await.expect("the schema is what this relayd needs");
        let again = schema::migrate(&db, &mut client, None).await.expect("migrate again");
        assert!(again.applied.is_empty(), "a second run applies nothing");
    }
}

#[tokio::test]
async fn a_relay_refuses_a_schema_older_or_newer_than_it_knows() {
    let Some(pg) = Postgres::start() else { return };
    let url = pg.database("ages");
    let db = cluster(&url, "");
    let mut client = db.connect().await.expect("connect");
    let older = schema::check(&db, &client).await.expect_err("an empty database is refused");
    assert!(older.to_string().contains("relayd migrate"), "{older}");
    let opening = relayd::identity::pg::PgStore::open(db.clone()).await;
    assert!(opening.is_err(), "the store does not open on an unmigrated database");
    let started = relayd::identity::pg::PgStore::open(cluster(&url, "migrate_at_start = true"))
        .await
        .expect("migrate_at_start migrates, then opens");
    drop(started);
    let next = schema::latest() + 1;
    pg.sql("ages", &format!("INSERT INTO relayd_schema (version, name) VALUES ({next}, 'later')"));
    let newer = schema::check(&db, &client).await.expect_err("a newer schema is refused");
    assert!(newer.to_string().contains("upgrade relayd"), "{newer}");
    let migrating = schema::migrate(&db, &mut client, None).await.expect_err("and not migrated");
    assert!(migrating.to_string().contains("newer"), "{migrating}");
}

fn record(id: &str, device: Option<&str>) -> CredentialRecord {
    CredentialRecord {
        id: id.into(),
        user: "alice".into(),
        device: device.map(Into::into),
        secret_sha256: "ab".repeat(32),
        created: 1_700_000_000,
        replaces: Some("c_0".into()),
    }
}

async fn told(events: &mut tokio::sync::broadcast::Receiver<StoreEvent>) -> Revocation {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(StoreEvent::Revoked(r))) => return r,
            Ok(Ok(StoreEvent::Resync)) => continue,
            other => panic!("no revocation told: {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_database_keeps_credentials_and_tells_every_replica_of_a_revocation() {
    let Some(pg) = Postgres::start() else { return };
    let db = cluster(&pg.database("store"), "migrate_at_start = true");
    let a = relayd::identity::pg::PgStore::open(db.clone()).await.expect("replica a");
    let b = relayd::identity::pg::PgStore::open(db).await.expect("replica b");
    let mut events = b.subscribe();
    a.insert(&record("c_1", Some("gpu-box"))).await.expect("insert");
    a.insert(&record("c_2", None)).await.expect("insert");
    assert_eq!(b.get("c_1").await.expect("get"), Some(record("c_1", Some("gpu-box"))));
    assert_eq!(b.get("c_9").await.expect("get"), None);
    assert_eq!(b.list().await.expect("list").len(), 2);

    let revocation = Revocation { id: "c_1".into(), until: None };
    assert!(a.revoke(&revocation).await.expect("revoke"), "new");
    assert_eq!(told(&mut events).await, revocation, "b is told of what a revoked");
    assert!(!a.revoke(&revocation).await.expect("again"), "not new the second time");
    assert_eq!(told(&mut events).await, revocation, "and told again");
    let jti = Revocation { id: "t_1".into(), until: Some(4_000_000_000) };
    assert!(b.revoke(&jti).await.expect("revoke a token"));
    assert_eq!(told(&mut events).await, jti);
    let mut all = a.revocations().await.expect("list");
    all.sort_by(|x, y| x.id.cmp(&y.id));
    assert_eq!(all, [revocation, jti]);
    b.fresh().expect("a replica that hears the database is fresh");
}

/// Two relays over one database, with the same signing and user-hash keys.
async fn replicas(pg: &Postgres, dir: &TempDir, dbname: &str, extra: &str) -> Vec<TestRelay> {
    use daemon::Resolve as _;
    let key = dir.path("signing.pem");
    if !key.exists() {
        relayd::admin::generate_key(&key).expect("a signing key");
        let hash = dir.path("user-hash.key");
        std::fs::write(&hash, [7u8; 32]).expect("user-hash key");
        std::fs::set_permissions(&hash, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("0600");
    }
    let text = format!(
        "listen = \"127.0.0.1:0\"\n[identity]\nsigning_key_file = \"{}\"\nuser_hash_key_file = \"{}\"\n[cluster]\ndatabase = \"{}\"\nmigrate_at_start = true\n{extra}\n",
        key.display(),
        dir.path("user-hash.key").display(),
        pg.database(dbname),
    );
    let config = toml::from_str::<relayd::ConfigFile>(&text)
        .expect("parses")
        .resolve()
        .expect("a valid replica configuration");
    let mut relays = Vec::new();
    for _ in 0..2 {
        relays.push(TestRelay::with_state(config.clone()).await);
    }
    relays
}

#[tokio::test]
async fn a_revocation_on_one_replica_ends_the_session_and_the_tokens_on_the_other() {
    init_logging();
    let Some(pg) = Postgres::start() else { return };
    let dir = TempDir::new("cluster-revoke");
    let relays = replicas(&pg, &dir, "revoke", "").await;
    let (a, b) = (&relays[0], &relays[1]);
    let credential = a.relay.issue_credential("alice", None).await.expect("credential");
    let mut agent = RawAgent::connect(&b.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("replica b admits a credential replica a issued");
    let client = a.relay.mint("alice", Role::Client, Duration::from_secs(600), None).expect("mint");
    let http = reqwest::Client::new();
    let health = b.tunnel_url("alice", "/health");
    let ok = http.get(&health).bearer_auth(&client.token).send().await.expect("GET");
    assert_eq!(ok.status(), 200, "replica b takes a client token replica a minted");

    let revoked = Instant::now();
    assert_eq!(a.relay.revoke(&client.id).await.expect("revoke").sessions_ended, 0);
    assert_eq!(a.relay.revoke(&credential.id).await.expect("revoke").sessions_ended, 0);
    assert_eq!(agent.closed(WAIT).await, Some(tunnel_proto::CLOSE_REVOKED));
    eprintln!("the session on replica b closed {:?} after the revocation on a", revoked.elapsed());
    let refused = http.get(&health).bearer_auth(&client.token).send().await.expect("GET");
    assert_eq!(refused.status(), 401, "replica b refuses the token replica a revoked");
    assert_eq!(b.agent_handshake(&credential.secret).await, 401);
}

#[tokio::test]
async fn a_revocation_nobody_told_of_is_found_by_the_periodic_check() {
    init_logging();
    let Some(pg) = Postgres::start() else { return };
    let dir = TempDir::new("cluster-backstop");
    let relays = replicas(&pg, &dir, "backstop", "check_interval = \"300ms\"").await;
    let b = &relays[1];
    let credential = relays[0].relay.issue_credential("alice", None).await.expect("credential");
    let mut agent = RawAgent::connect(&b.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("connect");
    // Recorded without a notification, as a write whose NOTIFY was lost.
    pg.sql("backstop", &format!("INSERT INTO revocations (id) VALUES ('{}')", credential.id));
    assert_eq!(agent.closed(WAIT).await, Some(tunnel_proto::CLOSE_REVOKED));

    // Listening connections cut: each replica connects again and reads
    // every revocation, the ones made meanwhile too.
    let second = relays[0].relay.issue_credential("alice", None).await.expect("credential");
    let mut agent =
        RawAgent::connect(&b.ws_url(), &second.secret, Limits::default()).await.expect("connect");
    pg.sql(
        "backstop",
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{}'",
            relayd::identity::pg::LISTENER_NAME
        ),
    );
    relays[0].relay.revoke(&second.id).await.expect("revoke");
    assert_eq!(agent.closed(WAIT).await, Some(tunnel_proto::CLOSE_REVOKED));
}

/// Polls `/readyz` until it answers `status`.
async fn ready_until(relay: &TestRelay, status: u16) -> String {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = http.get(relay.url("/readyz")).send().await.expect("GET /readyz");
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        if got == status {
            return text;
        }
        assert!(Instant::now() < deadline, "/readyz still {got} ({text}), not {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_replica_that_lost_the_database_fails_closed_and_recovers_with_it() {
    init_logging();
    let Some(pg) = Postgres::start() else { return };
    let dir = TempDir::new("cluster-stale");
    let relays =
        replicas(&pg, &dir, "stale", "check_interval = \"200ms\"\nmax_staleness = \"1s\"").await;
    let b = &relays[1];
    let credential = relays[0].relay.issue_credential("alice", None).await.expect("credential");
    let agent = RawAgent::connect(&b.ws_url(), &credential.secret, Limits::default())
        .await
        .expect("connect");
    let access = agent.welcome.token.clone().expect("an access token");
    ready_until(b, 200).await;

    pg.kill();
    let why = ready_until(b, 503).await;
    assert!(why.contains("has not answered"), "{why}");
    assert_eq!(b.agent_handshake(&access).await, 503, "a token is not admitted on a stale view");
    assert_eq!(b.agent_handshake(&credential.secret).await, 503, "nor a credential");

    pg.start_again();
    ready_until(b, 200).await;
    assert_eq!(b.agent_handshake(&access).await, 101, "admitted again once the view is fresh");
}

/// The registry as the database holds it: replicas by listen address, and
/// each connected device's replica.
async fn registry(
    db: &ClusterConfig,
) -> (Vec<relayd::cluster::registry::Replica>, Vec<(String, String, String, i64)>) {
    let c = db.connect().await.expect("connect");
    let replicas = relayd::cluster::registry::replicas(db, &c).await.expect("replicas");
    let devices = relayd::cluster::registry::devices(db, &c).await.expect("devices");
    (replicas, devices)
}

/// Polls the registry until `pred` holds.
async fn registry_until(
    db: &ClusterConfig,
    what: &str,
    mut pred: impl FnMut(
        &[relayd::cluster::registry::Replica],
        &[(String, String, String, i64)],
    ) -> bool,
) -> (Vec<relayd::cluster::registry::Replica>, Vec<(String, String, String, i64)>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (r, d) = registry(db).await;
        if pred(&r, &d) {
            return (r, d);
        }
        assert!(Instant::now() < deadline, "{what}: never; replicas {r:?}, devices {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn replica_of(replicas: &[relayd::cluster::registry::Replica], relay: &TestRelay) -> String {
    let listen = relay.addr.to_string();
    replicas.iter().find(|r| r.listen == listen).map(|r| r.id.clone()).unwrap_or_default()
}

#[tokio::test]
async fn a_device_that_connects_to_another_replica_replaces_its_session_there() {
    init_logging();
    let Some(pg) = Postgres::start() else { return };
    let dir = TempDir::new("cluster-presence");
    let mut relays = replicas(&pg, &dir, "presence", "").await;
    let db = cluster(&format!("host=127.0.0.1 port={} user=postgres dbname=presence", pg.port), "");
    let (replicas, _) = registry_until(&db, "both replicas registered", |r, _| r.len() == 2).await;
    let (a_id, b_id) = (replica_of(&replicas, &relays[0]), replica_of(&replicas, &relays[1]));
    assert!(!a_id.is_empty() && !b_id.is_empty() && a_id != b_id, "{replicas:?}");

    let credential =
        relays[0].relay.issue_credential("alice", Some("gpu-box")).await.expect("credential");
    let mut first = RawAgent::connect(&relays[0].ws_url(), &credential.secret, Limits::default())
        .await
        .expect("connect to a");
    let (_, devices) = registry_until(&db, "the device claimed on a", |_, d| {
        d.iter().any(|(u, dev, r, _)| u == "alice" && dev == "gpu-box" && *r == a_id)
    })
    .await;
    let epoch_a = devices[0].3;

    // A row lost (a database failover that lost the last writes): the
    // replica writes its claims again when its connection comes back.
    pg.sql("presence", "DELETE FROM presence");
    pg.sql(
        "presence",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'relayd presence'",
    );
    registry_until(&db, "the lost claim written again", |_, d| {
        d.iter().any(|(_, _, r, e)| *r == a_id && *e == epoch_a)
    })
    .await;

    // The same device, now through replica b: a's session is replaced, as
    // one relay replaces a device that connects again.
    let second = RawAgent::connect(&relays[1].ws_url(), &credential.secret, Limits::default())
        .await
        .expect("connect to b");
    assert_eq!(first.closed(WAIT).await, Some(4000), "replaced across replicas");
    let (_, devices) = registry_until(&db, "the device claimed on b", |_, d| {
        d.iter().any(|(_, _, r, e)| *r == b_id && *e > epoch_a)
    })
    .await;
    assert_eq!(devices.len(), 1, "one row per device: {devices:?}");
    let wait = Instant::now() + WAIT;
    while relays[0].relay.tunnels().iter().any(|t| t.user() == "alice") {
        assert!(Instant::now() < wait, "replica a still holds alice's session");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(relays[1].relay.tunnels().len(), 1, "replica b holds it");
    // What tunnelctl shows on any replica: the cluster, from the database.
    let view = relays[0].relay.cluster_view().await.expect("a cluster").expect("readable");
    assert_eq!(view.me, a_id);
    assert_eq!(view.replicas.len(), 2);
    assert!(view.devices.iter().any(|(u, d, r, _)| u == "alice" && d == "gpu-box" && *r == b_id));
    let metrics = relays[0].relay.metrics();
    assert!(metrics.contains("relayd_cluster_replaced_total 1"), "{metrics}");
    assert!(relays[1].relay.metrics().contains("relayd_cluster_claims_total 1"));

    // The device leaves: released. Replica b stops: it leaves the registry.
    drop(second);
    registry_until(&db, "the device released", |_, d| d.is_empty()).await;
    let b = relays.pop().expect("b");
    b.shutdown().await;
    let (replicas, _) = registry_until(&db, "b gone from the registry", |r, _| r.len() == 1).await;
    assert_eq!(replicas[0].id, a_id);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Two replicas that forward to each other (mutual TLS with `ca`), over
/// one database.
async fn peered(
    pg: &Postgres,
    dir: &TempDir,
    dbname: &str,
    ca: &tunnel_tests::tls::TestCa,
) -> Vec<TestRelay> {
    use daemon::Resolve as _;
    let key = dir.path("signing.pem");
    relayd::admin::generate_key(&key).expect("a signing key");
    let hash = dir.path("user-hash.key");
    std::fs::write(&hash, [7u8; 32]).expect("user-hash key");
    std::fs::set_permissions(&hash, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("0600");
    let database = pg.database(dbname);
    let mut relays = Vec::new();
    for _ in 0..2 {
        let text = format!(
            "listen = \"127.0.0.1:0\"\n[identity]\nsigning_key_file = \"{}\"\nuser_hash_key_file = \"{}\"\n[cluster]\ndatabase = \"{database}\"\nmigrate_at_start = true\npeer_listen = \"127.0.0.1:{}\"\npeer_cert_file = \"{}\"\npeer_key_file = \"{}\"\npeer_ca_file = \"{}\"\n",
            key.display(),
            hash.display(),
            free_port(),
            ca.cert_file.display(),
            ca.key_file.display(),
            ca.ca_file.display(),
        );
        let config = toml::from_str::<relayd::ConfigFile>(&text)
            .expect("parses")
            .resolve()
            .expect("a valid replica configuration");
        relays.push(TestRelay::with_state(config).await);
    }
    relays
}

#[tokio::test]
async fn a_request_to_any_replica_reaches_the_agent_on_another_one_hop_away() {
    use futures_util::StreamExt as _;
    init_logging();
    let Some(pg) = Postgres::start() else { return };
    let dir = TempDir::new("cluster-forward");
    let ca = tunnel_tests::tls::TestCa::new().expect("a CA");
    let relays = peered(&pg, &dir, "forward", &ca).await;
    let (a, b) = (&relays[0], &relays[1]);
    let upstream = tunnel_tests::StandIn::start(tunnel_tests::StandInConfig {
        token_delay: Duration::from_millis(20),
        tokens: 10_000,
        ..tunnel_tests::StandInConfig::default()
    })
    .await
    .expect("stand-in");
    let secret = a.relay.issue_credential("alice", None).await.expect("credential").secret;
    let _agent = tunnel_tests::TestAgent::start_with(b, "alice", &upstream.url(), move |c| {
        c.credential.token = Some(secret);
    })
    .await;
    let client = a.relay.mint("alice", Role::Client, Duration::from_secs(600), None).expect("mint");
    let http = reqwest::Client::new();

    // Replica a holds no agent of alice: once it has heard where she is,
    // it forwards.
    let tags = a.tunnel_url("alice", "/api/tags");
    let deadline = Instant::now() + WAIT;
    let answered = loop {
        let resp = http.get(&tags).bearer_auth(&client.token).send().await.expect("GET");
        if resp.status() == 200 {
            break resp.text().await.expect("body");
        }
        assert_eq!(resp.status(), 503, "offline until a knows where alice is");
        assert!(Instant::now() < deadline, "replica a never forwarded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(answered.contains("\"models\""), "{answered}");
    let direct = http.get(format!("{}/api/tags", upstream.url())).send().await.expect("direct");
    assert_eq!(answered, direct.text().await.expect("body"), "the same answer, one hop away");
    let refused = http.get(&tags).send().await.expect("GET without a token");
    assert_eq!(refused.status(), 401, "the replica holding alice checks the token");

    // A stream crosses the hop token by token, and a client that leaves
    // cancels it at the model server.
    let resp = http
        .post(a.tunnel_url("alice", "/api/chat"))
        .bearer_auth(&client.token)
        .json(&serde_json::json!({ "model": "m", "messages": [] }))
        .send()
        .await
        .expect("chat");
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut lines = 0;
    while lines < 3 {
        let chunk = stream.next().await.expect("a token").expect("chunk");
        lines += chunk.iter().filter(|b| **b == b'\n').count();
    }
    let dropped = Instant::now();
    drop(stream);
    let gone =
        upstream.events.wait_disconnects(1, WAIT).await.expect("the stand-in lost its client");
    eprintln!(
        "a client leaving replica a reached the model server behind b after {:?}",
        gone[0].at.duration_since(dropped)
    );
    let metrics = a.relay.metrics();
    assert!(metrics.contains("relayd_peer_forwarded_total "), "{metrics}");
    assert!(!metrics.contains("relayd_peer_forwarded_total 0"), "{metrics}");

    // Forwarded to a replica that does not hold the user: 421, not a
    // second hop.
    let peer_port =
        b.relay.config().cluster.as_ref().and_then(|c| c.peering.as_ref()).expect("peering").listen;
    let (_, tls_client) =
        relayd::tls::mutual(&ca.cert_file, &ca.key_file, &ca.ca_file).expect("peer tls");
    let tls = tunnel_tests::tls::connect(&tls_client, peer_port).await.expect("a peer connection");
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let req = http::Request::get(format!("https://{peer_port}/api/tunnel/bob/api/tags"))
        .header("host", "relay.example")
        .header("x-relay-hop", "1")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("an answer");
    assert_eq!(resp.status(), 421, "misdirected");

    // A caller whose certificate another CA signed is no replica: its
    // handshake is refused, and replica b still forwards for a.
    let stranger = tunnel_tests::tls::TestCa::new().expect("another CA");
    let (_, foreign) =
        relayd::tls::mutual(&stranger.cert_file, &stranger.key_file, &ca.ca_file).expect("tls");
    let refused = async {
        let tls = tunnel_tests::tls::connect(&foreign, peer_port).await?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        )
        .await?;
        tokio::spawn(conn);
        let req = http::Request::get(format!("https://{peer_port}/api/tunnel/alice/api/tags"))
            .header("host", "relay.example")
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        Ok::<_, anyhow::Error>(send.send_request(req).await?.status())
    };
    let got = tokio::time::timeout(WAIT, refused).await.expect("an answer or a refusal");
    assert!(got.is_err(), "a certificate of another CA got through: {got:?}");
    let ok = http.get(&tags).bearer_auth(&client.token).send().await.expect("GET");
    assert_eq!(ok.status(), 200, "forwarding still works");
}
