//! Scenario `cost`: instructions relayd and agentd spend per request and
//! per streamed token, counted by valgrind's callgrind. Counts do not
//! depend on how busy the machine is, so `.ci/cost` can hold every change
//! to a recorded baseline where a wall-clock ratio could not.
//!
//! Each operation is measured with two runs of the daemons under callgrind
//! that differ only in how many operations follow the same warm-up; the
//! difference over the extra operations is the cost of one, start-up and
//! shut-down cancelling out. Requests go one at a time. The profiles of the
//! last run of each operation are kept in the output directory
//! (`cost-<operation>-<daemon>.callgrind`, for `callgrind_annotate`).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::*;

/// What one run repeats.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `GET /api/tags`: the smallest request.
    Get,
    /// A non-streaming `POST /api/chat` with a small body and an 8-token
    /// answer.
    Chat,
    /// One streamed token, [`TOKEN_MS`] after the last (as a model makes
    /// them: each crosses the tunnel alone): runs differ in the length of
    /// their streams.
    Token,
    /// One token of an answer sent without pauses (a burst: the daemons
    /// join and batch what is ready together).
    Burst,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Get => "get_request",
            Op::Chat => "chat_request",
            Op::Token => "stream_token",
            Op::Burst => "burst_token",
        }
    }
}

/// Streams per `Token` or `Burst` run, and their lengths in the short and
/// the long run.
const STREAMS: usize = 4;
const SHORT: usize = 20;
/// The pause between paced tokens: long enough that under callgrind, which
/// slows the daemons some fifty times, each token still crosses alone.
const TOKEN_MS: u64 = 10;

#[allow(clippy::print_stdout)]
pub(crate) async fn cost(bin: &Path, args: &Args) -> Result<Value> {
    which_valgrind()?;
    // (warm-up and base count, extra operations)
    let (base, extra) = if args.smoke { (5, 10) } else { (20, 300) };
    let mut out = serde_json::Map::new();
    for op in [Op::Get, Op::Chat, Op::Token, Op::Burst] {
        let (short, long) = match op {
            Op::Token | Op::Burst => (SHORT, SHORT + extra),
            _ => (base, base + extra),
        };
        let a = run(bin, args, op, short).await.with_context(|| format!("{} short", op.name()))?;
        let b = run(bin, args, op, long).await.with_context(|| format!("{} long", op.name()))?;
        let units = match op {
            Op::Token | Op::Burst => (STREAMS * extra) as f64,
            _ => extra as f64,
        };
        let per = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / units;
        let (relayd, agentd) = (per(a.0, b.0), per(a.1, b.1));
        println!(
            "  {:<13} relayd {relayd:>9.0}  agentd {agentd:>9.0}  both {:>9.0} instructions",
            op.name(),
            relayd + agentd
        );
        out.insert(
            op.name().into(),
            json!({ "relayd": relayd.round(), "agentd": agentd.round(), "both": (relayd + agentd).round() }),
        );
    }
    Ok(
        json!({ "unit": "instructions (valgrind callgrind, user space)", "extra": extra, "cost": out }),
    )
}

fn which_valgrind() -> Result<()> {
    match std::process::Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!("valgrind is not installed (Debian: apt-get install valgrind)"),
    }
}

/// One rig with both daemons under callgrind: `n` operations of `op`, then
/// the daemons stop; their instruction totals.
async fn run(bin: &Path, args: &Args, op: Op, n: usize) -> Result<(u64, u64)> {
    let mut rig = Rig::start(bin, args, RigOpts { callgrind: true, ..ONE_AGENT }).await?;
    let http = client(1);
    let url = |target| rig.url(Route::Tunnel, 0, target);
    for _ in 0..n {
        match op {
            Op::Get => {
                let resp = http.get(url("/api/tags").parse()?).await?;
                drain(resp).await?;
            }
            Op::Chat => {
                let body = json!({ "model": "m", "stream": false, "messages": [{ "role": "user", "content": "hi" }], "options": { "num_predict": 8 } }).to_string();
                let req = Request::post(url("/api/chat"))
                    .header("content-type", "application/json")
                    .body(full(body))?;
                drain(http.request(req).await?).await?;
            }
            Op::Token | Op::Burst => break,
        }
    }
    if let Op::Token | Op::Burst = op {
        let pause = if let Op::Token = op { TOKEN_MS } else { 0 };
        for _ in 0..STREAMS {
            chat_stream(&http, &url("/api/chat"), n, pause).await?;
        }
    }
    drop(http);
    rig.stop_daemons(Duration::from_secs(60)).await?;
    let (relayd, agentd) = (rig.dir.join("relayd.callgrind"), rig.dir.join("agentd-0.callgrind"));
    // The profiles of the longer run stay with the results, for
    // `callgrind_annotate <out>/cost-get_request-relayd.callgrind`.
    for (file, daemon) in [(&relayd, "relayd"), (&agentd, "agentd")] {
        let kept = args.out.join(format!("cost-{}-{daemon}.callgrind", op.name()));
        std::fs::copy(file, kept).with_context(|| format!("keeping {}", file.display()))?;
    }
    Ok((totals(&relayd)?, totals(&agentd)?))
}

async fn drain(resp: http::Response<hyper::body::Incoming>) -> Result<()> {
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    resp.into_body().collect().await?;
    Ok(())
}

/// The instructions a callgrind output file counts (its `summary:` or
/// `totals:` line).
fn totals(file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("no callgrind output at {}", file.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no instruction total in {}", file.display()))
}
