//! relayd entry point: the shared daemon phases over [`relayd::Relay`].

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use daemon::{Context, Daemon};

struct Relayd;

impl Daemon for Relayd {
    const NAME: &'static str = "relayd";
    const ABOUT: &'static str = "The cloud relay of the LLM tunnel.";
    type File = relayd::ConfigFile;

    fn worker_threads(config: &relayd::Config) -> usize {
        config.worker_threads
    }

    async fn run(config: relayd::Config, ctx: Context) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let metrics_listen = config.metrics_listen;
        let relay = relayd::Relay::new(config);
        // Metrics outlive the drain, so `relayd_draining` can be scraped.
        let render = relay.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        ctx.ready();
        Ok(relay.run(listener, ctx.shutdown).await?)
    }
}

fn main() -> ExitCode {
    daemon::process::main::<Relayd>()
}
