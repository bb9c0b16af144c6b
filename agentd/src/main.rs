//! agentd entry point: the shared daemon phases over [`agentd::Agent`].

use std::process::ExitCode;
use std::sync::Arc;

use daemon::{Context, Daemon};

struct Agentd;

impl Daemon for Agentd {
    const NAME: &'static str = "agentd";
    const ABOUT: &'static str = "The desktop agent of the LLM tunnel.";
    type File = agentd::ConfigFile;

    async fn run(config: agentd::Config, ctx: Context) -> anyhow::Result<()> {
        let metrics_listen = config.metrics_listen;
        let agent = Arc::new(agentd::Agent::new(config));
        let render = agent.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        // Ready without waiting for the relay: an offline laptop must boot.
        ctx.ready();
        agent.run(ctx.shutdown).await;
        Ok(())
    }
}

fn main() -> ExitCode {
    daemon::process::main::<Agentd>()
}
