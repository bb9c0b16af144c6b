//! relayd entry point: the shared daemon phases over [`relayd::Relay`].

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use daemon::{CommonArgs, ConfigError, Context, Daemon};
use tokio_util::sync::CancellationToken;

/// The cloud relay of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

struct Relayd;

impl Daemon for Relayd {
    const NAME: &'static str = "relayd";
    const DEFAULT_CONFIG: &'static str = "/etc/relayd/relayd.toml";
    const LOG_ENV: &'static str = "RELAYD_LOG";
    type Config = relayd::Config;

    fn load(path: &Path) -> Result<relayd::Config, ConfigError> {
        relayd::ConfigFile::load(path)?.resolve()
    }

    fn worker_threads(config: &relayd::Config) -> usize {
        config.worker_threads
    }

    async fn run(config: relayd::Config, ctx: Context) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
            None => None,
        };
        let relay = relayd::Relay::new(config);
        ctx.ready();
        // Metrics outlive the drain, so `relayd_draining` can be scraped.
        let metrics_stop = CancellationToken::new();
        if let Some(listener) = metrics {
            let relay = relay.clone();
            tokio::spawn(daemon::metrics::serve(
                listener,
                metrics_stop.clone(),
                Arc::new(move || relay.metrics()),
            ));
        }
        let served = relay.run(listener, ctx.shutdown).await;
        metrics_stop.cancel();
        Ok(served?)
    }
}

fn main() -> ExitCode {
    daemon::process::main::<Relayd>(Args::parse().common)
}
