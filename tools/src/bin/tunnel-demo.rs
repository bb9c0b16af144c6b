//! The quick-start demo: starts relayd, agentd and (when no Ollama answers
//! on 127.0.0.1:11434) the stand-in Ollama as real processes with generated
//! configuration, streams a chat through the tunnel printing tokens as they
//! arrive, then prints a curl line and keeps the tunnel up until Ctrl-C
//! (`--once`: stops after the chat, and prints no line for the stopped
//! tunnel).

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Runs the whole tunnel on this machine and streams a chat through it.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Port for relayd on 127.0.0.1 (a free one is picked if it is taken).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Exit after the chat instead of keeping the tunnel up.
    #[arg(long)]
    once: bool,
    /// The prompt to send.
    #[arg(long, default_value = "Why is the sky blue? Answer in one sentence.")]
    prompt: String,
}

type Http = Client<HttpConnector, Full<Bytes>>;

const USER: &str = "demo";

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::print_stdout)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let bin_dir =
        std::env::current_exe()?.parent().context("no directory for this executable")?.to_owned();
    for name in ["relayd", "agentd", "stand-in-ollama"] {
        if !bin_dir.join(name).exists() {
            bail!(
                "{} is missing; build everything first: cargo build --release --bins (or run ./demo.sh)",
                bin_dir.join(name).display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("tunnel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let http: Http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    // The local model server: a real Ollama if one answers, else the stand-in.
    let mut children: Vec<Child> = Vec::new();
    let (upstream, model, real) = match real_ollama(&http).await {
        Some(model) => ("http://127.0.0.1:11434".to_owned(), model, true),
        None => {
            let port = free_port(0)?;
            children.push(spawn(
                &bin_dir,
                "stand-in-ollama",
                &["--listen", &format!("127.0.0.1:{port}")],
                &dir,
            )?);
            (
                "http://127.0.0.1:".to_owned() + &port.to_string(),
                "stand-in:latest".to_owned(),
                false,
            )
        }
    };
    println!(
        "local model server: {upstream} ({})",
        if real {
            "Ollama"
        } else {
            "stand-in Ollama; start a real one on :11434 to use it instead"
        }
    );

    let port = free_port(args.port)?;
    let relay = SocketAddr::from(([127, 0, 0, 1], port));
    let token = format!("demo-agent-token-{:032x}", rand_u128());
    let token_file = dir.join("agent.token");
    daemon::config::write_secret(&token_file, &token)?;
    let relay_conf = dir.join("relayd.toml");
    std::fs::write(
        &relay_conf,
        format!(
            "listen = \"{relay}\"\n\n[[users]]\nid = \"{USER}\"\nagent_token_file = \"{}\"\n# The demo tunnel is open: no client token needed.\npublic = true\n\n[control]\nsocket = \"{}\"\n",
            token_file.display(),
            dir.join("relayd.sock").display()
        ),
    )?;
    let agent_conf = dir.join("agentd.toml");
    std::fs::write(
        &agent_conf,
        format!(
            "relay = \"ws://{relay}\"\ntoken_file = \"{}\"\nupstream = \"{upstream}\"\n\n[control]\nsocket = \"{}\"\n",
            token_file.display(),
            dir.join("agentd.sock").display()
        ),
    )?;
    children.push(spawn(&bin_dir, "relayd", &["--config", &path(&relay_conf)], &dir)?);
    wait_until(&http, &format!("http://{relay}/healthz"), |_| true, "relayd").await?;
    children.push(spawn(&bin_dir, "agentd", &["--config", &path(&agent_conf)], &dir)?);
    let health = format!("http://{relay}/api/tunnel/{USER}/health");
    wait_until(&http, &health, |v| v["connected"] == true, "agentd's session").await?;
    println!(
        "relayd on http://{relay}, agentd connected (logs and configs in {})\n",
        dir.display()
    );

    let url = format!("http://{relay}/api/tunnel/{USER}/api/chat");
    let body = json!({ "model": model, "messages": [{ "role": "user", "content": args.prompt }] });
    println!(">>> {}\n", args.prompt);
    stream_chat(&http, &url, &body).await?;
    if args.once {
        // The processes stop with this one (kill_on_drop): no curl or
        // tunnelctl line for a tunnel that is about to be gone.
        println!(
            "\n--once: relayd and agentd stop now. Run ./demo.sh without --once to keep \
             the tunnel up and call it yourself."
        );
        return Ok(());
    }
    println!("\nTry it yourself:\n\n  curl -N {url} -d '{}'\n", body);
    let ctl = bin_dir.join("tunnelctl");
    println!(
        "Look inside:\n\n  {} --socket {} status\n  {} --socket {} trace\n",
        ctl.display(),
        dir.join("agentd.sock").display(),
        ctl.display(),
        dir.join("relayd.sock").display()
    );
    println!("The tunnel stays up; press Ctrl-C to stop it.");
    tokio::signal::ctrl_c().await?;
    for mut c in children {
        let _ = c.kill().await;
    }
    Ok(())
}

/// Streams one chat, printing each token the moment its line arrives.
#[allow(clippy::print_stdout)]
async fn stream_chat(http: &Http, url: &str, body: &Value) -> Result<()> {
    use std::io::Write;
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let started = Instant::now();
    let resp = http.request(req).await.context("chat request failed")?;
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.into_body().collect().await?.to_bytes();
        bail!("chat failed with {status}: {}", String::from_utf8_lossy(&text));
    }
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut first = None;
    let mut tokens = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
            if let Some(e) = v.get("error") {
                bail!("the model server reported: {e}");
            }
            if let Some(t) =
                v.pointer("/message/content").and_then(Value::as_str).filter(|t| !t.is_empty())
            {
                first.get_or_insert_with(|| started.elapsed());
                tokens += 1;
                print!("{t}");
                std::io::stdout().flush()?;
            }
        }
    }
    let total = started.elapsed();
    println!(
        "\n\n[{tokens} tokens streamed; first after {:.0} ms, last after {:.0} ms]",
        first.unwrap_or_default().as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3
    );
    Ok(())
}

/// The first model of an Ollama answering on 127.0.0.1:11434, if any.
async fn real_ollama(http: &Http) -> Option<String> {
    let req =
        http::Request::get("http://127.0.0.1:11434/api/tags").body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), http.request(req)).await.ok()?.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(Duration::from_secs(2), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    let v: Value = serde_json::from_slice(&body).ok()?;
    v.pointer("/models/0/name").and_then(Value::as_str).map(str::to_owned)
}

/// Polls `url` until `ready(json)` holds, for at most 20 s.
async fn wait_until(
    http: &Http,
    url: &str,
    ready: impl Fn(&Value) -> bool,
    what: &str,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(req) = http::Request::get(url).body(Full::new(Bytes::new()))
            && let Ok(resp) = http.request(req).await
            && resp.status().is_success()
            && let Ok(body) = resp.into_body().collect().await
        {
            let bytes = body.to_bytes();
            let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            if ready(&v) {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("{what} did not come up within 20 s; see the logs in {}", std::env::temp_dir().display())
}

fn spawn(bin_dir: &Path, name: &str, args: &[&str], dir: &Path) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    Command::new(bin_dir.join(name))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {name}"))
}

/// `preferred` when it can be bound on 127.0.0.1, else one the OS picks.
fn free_port(preferred: u16) -> Result<u16> {
    if preferred != 0 && StdListener::bind(("127.0.0.1", preferred)).is_ok() {
        return Ok(preferred);
    }
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn path(p: &Path) -> String {
    PathBuf::from(p).display().to_string()
}

fn rand_u128() -> u128 {
    rand::random()
}
