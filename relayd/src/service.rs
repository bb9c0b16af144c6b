//! relayd as a daemon: the phases [`daemon::process::run`] drives (bind,
//! open the state, serve the control socket and metrics, ready, serve until
//! shutdown), and what a SIGHUP reloads.

use std::sync::Arc;

use anyhow::Context as _;
use daemon::{Context, Daemon};

/// The relay daemon.
#[derive(Debug)]
pub struct Relayd;

impl Daemon for Relayd {
    const NAME: &'static str = "relayd";
    const ABOUT: &'static str = "The cloud relay of the LLM tunnel.";
    type File = crate::ConfigFile;

    fn worker_threads(config: &crate::Config) -> usize {
        config.worker_threads
    }

    async fn run(config: crate::Config, ctx: Context) -> anyhow::Result<()> {
        // A socket systemd passed (relayd.socket: port 443 without any
        // capability) wins over `listen`.
        let listener = match ctx.activated_listener() {
            Some(l) => tokio::net::TcpListener::from_std(l)
                .context("cannot use the socket systemd passed")?,
            None => tokio::net::TcpListener::bind(config.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?,
        };
        let listen = listener.local_addr()?;
        let control = config.control.clone();
        let state = crate::open_state(&config).await?;
        let metrics_listen = config.metrics_listen;
        let running = serde_json::to_value(&config).unwrap_or_default();
        let relay = crate::Relay::with_state(config, state);
        // SIGHUP: the file read again (what changed in it is named as taking
        // a restart) and the certificate reloaded, as the Reload call does.
        let (reloading, reread) = (relay.clone(), ctx.clone());
        ctx.on_reload(move || {
            let relay = reloading.clone();
            let changed = reread
                .load_again::<Relayd>()
                .map(|new| daemon::config::changed_settings(&running, &new));
            async move { relay.reload_after_signal(changed).await }
        });
        // The socket serves through the drain (status shows "draining"); it
        // goes when `_control` does, at the end of this function.
        let service = crate::control::Control::new(relay.clone(), listen, control.owner_only);
        let _control = daemon::control::start(&control, "relayd", service.server())?;
        // Metrics outlive the drain, so `relayd_draining` can be scraped.
        let render = relay.clone();
        let _metrics =
            daemon::metrics::Server::start(metrics_listen, Arc::new(move || render.metrics()))
                .await?;
        ctx.ready();
        let probing = relay.clone();
        ctx.supervise(move || {
            let relay = probing.clone();
            async move { relay.probe().await }
        });
        Ok(relay.run(listener, ctx.shutdown).await?)
    }
}
