//! A stand-in for Ollama on a local port, for the demo and manual tests.

use std::time::Duration;

use clap::Parser;

/// Serves enough of Ollama's API to try the tunnel without a model.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:11434")]
    listen: std::net::SocketAddr,
    /// Pause before each token, in milliseconds.
    #[arg(long, default_value_t = 80)]
    token_delay_ms: u64,
    /// The one model it has (`/api/tags`, `/v1/models`).
    #[arg(long, default_value = "stand-in:latest")]
    model: String,
    /// Answer chats only for that model (others get Ollama's 404).
    #[arg(long)]
    only_its_model: bool,
    /// Whether the model starts loaded in memory (`/api/ps` lists it).
    #[arg(long)]
    loaded: bool,
    /// A cold load: the first chat waits this long (milliseconds), and the
    /// model is loaded from then on.
    #[arg(long, default_value_t = 0)]
    load_delay_ms: u64,
    /// Another model it has (repeat for more).
    #[arg(long = "also")]
    also: Vec<String>,
    /// A name sent back in an `x-stand-in` header on every answer.
    #[arg(long, default_value = "")]
    name: String,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let config = tunnel_tests::StandInConfig {
        token_delay: Duration::from_millis(args.token_delay_ms),
        model: args.model,
        only_its_model: args.only_its_model,
        loaded: args.loaded,
        load_delay: Duration::from_millis(args.load_delay_ms),
        extra_models: args.also,
        name: args.name,
        ..Default::default()
    };
    let _standin = tunnel_tests::StandIn::serve(listener, config);
    eprintln!("stand-in-ollama: listening on http://{}", args.listen);
    tokio::signal::ctrl_c().await?;
    Ok(())
}
