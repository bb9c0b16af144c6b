//! agentd entry point: the shared daemon phases over [`agentd::Agent`].

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use daemon::{CommonArgs, ConfigError, Context, Daemon};

/// The desktop agent of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

struct Agentd;

impl Daemon for Agentd {
    const NAME: &'static str = "agentd";
    const DEFAULT_CONFIG: &'static str = "/etc/agentd/agentd.toml";
    const LOG_ENV: &'static str = "AGENTD_LOG";
    type Config = agentd::Config;

    fn load(path: &Path) -> Result<agentd::Config, ConfigError> {
        agentd::ConfigFile::load(path)?.resolve()
    }

    // One thread: the agent's work is a few sockets, and with every task on
    // the thread that polls the sockets no wake-up crosses threads.
    fn worker_threads(_: &agentd::Config) -> usize {
        1
    }

    async fn run(config: agentd::Config, ctx: Context) -> anyhow::Result<()> {
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
            None => None,
        };
        let agent = Arc::new(agentd::Agent::new(config));
        // Ready without waiting for the relay: an offline laptop must boot.
        ctx.ready();
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        if let Some(listener) = metrics {
            let agent = agent.clone();
            tokio::spawn(daemon::metrics::serve(
                listener,
                metrics_stop.clone(),
                Arc::new(move || agent.metrics()),
            ));
        }
        agent.run(ctx.shutdown).await;
        metrics_stop.cancel();
        Ok(())
    }
}

fn main() -> ExitCode {
    daemon::process::main::<Agentd>(Args::parse().common)
}
