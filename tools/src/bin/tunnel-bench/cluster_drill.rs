//! The `cluster` scenario's drill: one replica killed (`kill -9`) under
//! load, as SCALE.md's acceptance list sets it: how soon its agents are
//! claimed by the other replicas (through HAProxy, which takes the dead
//! one out after two failed checks 500 ms apart), what requests saw from
//! two seconds after the kill on, and when the database stops naming the
//! dead replica.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::*;
use tools::procs::scrape;

/// What one request of the load saw: when it started (seconds after the
/// kill), its status (0: no answer within 5 s, or the connection failed),
/// how long it took.
type Seen = (f64, u16, f64);

#[allow(clippy::print_stdout)]
pub(crate) async fn kill_one(
    replicas: &mut [ClusterReplica],
    db: &relayd::cluster::ClusterConfig,
    front: u16,
    agents: usize,
) -> Result<Value> {
    use relayd::cluster::registry;
    let victim = replicas.len() - 1;
    let listen = format!("127.0.0.1:{}", replicas[victim].port);
    let c = db.connect().await?;
    let Some(victim_id) =
        registry::replicas(db, &c).await?.into_iter().find(|r| r.listen == listen).map(|r| r.id)
    else {
        bail!("replica on {listen} is not in the registry");
    };
    let lost = scrape(replicas[victim].metrics, "relayd_agents_connected").await.unwrap_or(0);

    // Load through HAProxy, before, during and after.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let t0 = Arc::new(Mutex::new(None::<Instant>));
    let mut load = Vec::new();
    for w in 0..8usize {
        let (seen, stop, t0) = (seen.clone(), stop.clone(), t0.clone());
        let http = client(4);
        load.push(tokio::spawn(async move {
            let mut i = w;
            while !stop.is_cancelled() {
                i = i
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let user = (i >> 33) % agents;
                let url = format!("http://127.0.0.1:{front}/api/tunnel/u{user}/api/tags");
                let started = Instant::now();
                let status = tokio::time::timeout(Duration::from_secs(5), status_of(&http, &url))
                    .await
                    .unwrap_or(0);
                let at = t0
                    .lock()
                    .expect("t0")
                    .map_or(-1.0, |t| started.duration_since(t).as_secs_f64());
                seen.lock().expect("seen").push((at, status, started.elapsed().as_secs_f64()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[victim].child.start_kill()?;
    let killed = Instant::now();
    *t0.lock().expect("t0") = Some(killed);

    // Re-claimed: the live replicas hold every agent again.
    let (mut half, mut all) = (None, None);
    while all.is_none() && killed.elapsed() < Duration::from_secs(35) {
        let mut held = 0;
        for r in &replicas[..victim] {
            held += scrape(r.metrics, "relayd_agents_connected").await.unwrap_or(0);
        }
        let back = (held as usize).saturating_sub(agents - lost as usize);
        if half.is_none() && back * 2 >= lost as usize {
            half = Some(killed.elapsed());
        }
        if held as usize >= agents {
            all = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The dead replica out of the registry (reaped after 15 s of silence).
    let mut reaped = None;
    while reaped.is_none() && killed.elapsed() < Duration::from_secs(40) {
        let ids: Vec<String> =
            registry::replicas(db, &c).await?.into_iter().map(|r| r.id).collect();
        if !ids.contains(&victim_id) {
            reaped = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows = registry::devices(db, &c).await?.iter().filter(|d| d.2 == victim_id).count();
    stop.cancel();
    for l in load {
        let _ = l.await;
    }
    let seen = seen.lock().expect("seen").clone();
    let early: Vec<&Seen> = seen.iter().filter(|s| (0.0..2.0).contains(&s.0)).collect();
    let late: Vec<&Seen> = seen.iter().filter(|s| s.0 >= 2.0).collect();
    let failed = |v: &[&Seen]| v.iter().filter(|s| s.1 != 200).count();
    let of = |v: &[&Seen], codes: &[u16]| v.iter().filter(|s| codes.contains(&s.1)).count();
    let slow = late.iter().filter(|s| s.2 > 1.0).count();
    let secs = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    println!(
        "  kill -9 of one replica ({lost} agents): half re-claimed elsewhere after {:.2} s, all after {:.2} s",
        secs(half),
        secs(all),
    );
    println!(
        "    requests in the first 2 s: {} of {} failed (503 {}, 502/504 {}, no answer {}); from 2 s on: {} of {} failed (503 {}, 502/504 {}, no answer {}), {slow} slower than 1 s",
        failed(&early),
        early.len(),
        of(&early, &[503]),
        of(&early, &[502, 504]),
        of(&early, &[0]),
        failed(&late),
        late.len(),
        of(&late, &[503]),
        of(&late, &[502, 504]),
        of(&late, &[0]),
    );
    println!(
        "    the dead replica left the registry after {:.1} s; presence rows still naming it then: {rows}",
        secs(reaped)
    );
    Ok(json!({
        "agents_lost": lost, "half_back_s": secs(half), "all_back_s": secs(all),
        "first_2s": { "requests": early.len(), "failed": failed(&early), "503": of(&early, &[503]), "502_504": of(&early, &[502, 504]), "no_answer": of(&early, &[0]) },
        "after_2s": { "requests": late.len(), "failed": failed(&late), "503": of(&late, &[503]), "502_504": of(&late, &[502, 504]), "no_answer": of(&late, &[0]), "slower_than_1s": slow },
        "reaped_after_s": secs(reaped), "rows_naming_it": rows,
    }))
}

async fn status_of(http: &Http, url: &str) -> u16 {
    let Ok(req) = http::Request::get(url).body(full("")) else { return 0 };
    match http.request(req).await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match http_body_util::BodyExt::collect(resp.into_body()).await {
                Ok(_) => status,
                Err(_) => 0,
            }
        }
        Err(_) => 0,
    }
}
