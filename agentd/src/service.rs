//! agentd as a daemon: the phases [`daemon::process::run`] drives (the
//! control socket and metrics, ready at once without waiting for the relay,
//! the agent until shutdown), and what a SIGHUP reloads.

use std::sync::Arc;

use daemon::{Context, Daemon};

/// The agent daemon.
#[derive(Debug)]
pub struct Agentd;

impl Daemon for Agentd {
    const NAME: &'static str = "agentd";
    const ABOUT: &'static str = "The desktop agent of the LLM tunnel.";
    type File = crate::ConfigFile;

    async fn run(config: crate::Config, ctx: Context) -> anyhow::Result<()> {
        let metrics_listen = config.metrics_listen;
        let control = config.control.clone();
        let agent = Arc::new(crate::Agent::new(config));
        // The socket serves through the drain (status shows it); it goes
        // when `_control` does, at the end of this function.
        let service = crate::control::Control::new(agent.clone(), control.owner_only);
        let _control = daemon::control::start(&control, "agentd", service.server())?;
        let render = agent.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        // SIGHUP: the file read again (the endpoint policy applies at once,
        // other changes are named as taking a restart), and a token file
        // changed by hand or by an identity provider's tooling installed
        // (in-band while connected).
        let (reloading, reread) = (agent.clone(), ctx.clone());
        ctx.on_reload(move || {
            let agent = reloading.clone();
            let fresh = reread.load_again::<Agentd>();
            async move { agent.reload(fresh).await }
        });
        // Ready without waiting for the relay: an offline laptop must boot.
        ctx.ready();
        let probing = agent.clone();
        ctx.supervise(move || {
            let agent = probing.clone();
            async move { agent.probe().await }
        });
        agent.run(ctx.shutdown).await;
        Ok(())
    }
}
