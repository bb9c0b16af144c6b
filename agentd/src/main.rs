//! agentd entry point: parse, then serve until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// The desktop agent of the LLM tunnel.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(short, long, default_value = "/etc/agentd/agentd.toml")]
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
            tracing_subscriber::EnvFilter::try_from_env("AGENTD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match agentd::ConfigFile::load(&args.config).and_then(agentd::ConfigFile::resolve)
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("agentd: {e}");
            return ExitCode::from(EX_CONFIG);
        }
    };
    if args.check_config {
        match serde_json::to_string_pretty(&config) {
            Ok(text) => print_config(&text),
            Err(e) => eprintln!("agentd: {e}"),
        }
        return ExitCode::SUCCESS;
    }
    // One thread: the agent's work is a few sockets, and with every task on
    // the thread that polls the sockets no wake-up crosses threads.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("agentd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        let metrics = match config.metrics_listen {
            Some(addr) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) => {
                    eprintln!("agentd: cannot listen for metrics on {addr}: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let agent = std::sync::Arc::new(agentd::Agent::new(config));
        if let Some(listener) = metrics {
            let agent = agent.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(agentd::metrics::serve(agent, listener, shutdown));
        }
        agent.run(shutdown).await;
        ExitCode::SUCCESS
    })
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

#[allow(clippy::print_stdout)]
fn print_config(text: &str) {
    println!("{text}");
}
