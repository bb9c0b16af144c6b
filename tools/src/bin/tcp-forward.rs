//! A plain TCP forwarder: every connection accepted on `--listen` is copied
//! both ways to a new connection to `--to`, nothing else.
//!
//! `tunnel-bench` chains two of these (client -> forwarder -> forwarder ->
//! stand-in) as the raw-TCP baseline: the same two extra processes and
//! loopback hops as relayd and agentd, with none of the HTTP, routing,
//! framing or flow-control work. Single-threaded and `TCP_NODELAY`, like the
//! daemons.

use std::net::SocketAddr;

use anyhow::Result;
use clap::Parser;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    to: SocketAddr,
}

/// Copy buffer per direction: the daemons' largest frame.
const BUF: usize = 64 * 1024;

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(args.listen).await?;
        let serving = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((inbound, _)) => drop(tokio::spawn(forward(inbound, args.to))),
                    // Out of file descriptors: let connections end first.
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                }
            }
        });
        serving.await?;
        Ok(())
    })
}

async fn forward(mut inbound: TcpStream, to: SocketAddr) {
    let Ok(mut outbound) = TcpStream::connect(to).await else { return };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut inbound, &mut outbound, BUF, BUF).await;
}
