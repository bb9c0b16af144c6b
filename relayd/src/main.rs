//! relayd entry point: parse, bind, serve until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The cloud relay of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(short, long, default_value = "/etc/relayd/relayd.toml")]
    config: PathBuf,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    check_config: bool,
}

/// sysexits: configuration error.
const EX_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RELAYD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match relayd::ConfigFile::load(&args.config).and_then(relayd::ConfigFile::resolve)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relayd: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if args.check_config {
        match serde_json::to_string_pretty(&config) {
            Ok(text) => print_config(&text),
            Err(e) => eprintln!("relayd: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    // Every agent holds a socket: take the whole open-file allowance (the
    // soft limit is often 1024, the hard one far higher), as servers do.
    raise_fd_limit();
    // One worker: a current-thread runtime, every task on the thread that
    // polls the sockets. More: a work-stealing pool, with the serve loop in
    // a task so the main thread only waits.
    let mut rt = if config.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if config.worker_threads > 1 {
            b.worker_threads(config.worker_threads);
        }
        b
    };
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relayd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let served = rt.block_on(async {
        tokio::spawn(serve(config))
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("relay task failed: {e}")))
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relayd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: relayd::Config) -> anyhow::Result<()> {
    use anyhow::Context;
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
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signal.cancel();
    });
    let relay = relayd::Relay::new(config);
    // Metrics outlive the drain, so `relayd_draining` can be scraped.
    let metrics_stop = CancellationToken::new();
    if let Some(listener) = metrics {
        let relay = relay.clone();
        let stop = metrics_stop.clone();
        tokio::spawn(async move { relay.serve_metrics(listener, stop).await });
    }
    let served = relay.serve(listener, shutdown).await;
    metrics_stop.cancel();
    served?;
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, soft, "cannot raise the open-file limit"),
        },
        Ok((soft, _)) => tracing::debug!(limit = soft, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-file limit"),
    }
}

#[allow(clippy::print_stdout)]
fn print_config(text: &str) {
    println!("{text}");
}
