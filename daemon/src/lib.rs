//! Process plumbing shared by relayd and agentd, written once.
//!
//! A daemon's `main` is [`process::main`] over a [`Daemon`] implementation:
//! parse the arguments, load and resolve the configuration (exit 78 when it
//! is unusable; `--check-config` prints it), set up logging, raise the
//! open-file limit, build the runtime, then [`Daemon::run`] binds its
//! listeners, tells the service manager it is ready ([`notify`]), serves
//! until the terminate signal cancels [`Context::shutdown`], and drains.
//!
//! - [`control`]: the control socket (unix, 0660, stale ones replaced) and
//!   who may call what on it (peer credentials).
//! - [`config`]: strict TOML loading, durations, secrets inline or from a
//!   file, the check that an example configuration documents real keys.
//! - [`metrics`]: the Prometheus `GET /metrics` listener both daemons serve.
//! - [`notify`]: the one place that talks to systemd (`READY=1`,
//!   `STOPPING=1`, `RELOADING=1`, socket activation); a no-op without
//!   `NOTIFY_SOCKET`.
//! - [`supervise`]: `STATUS=` and `WATCHDOG=1`, fed only by a probe that
//!   went through the daemon's core loop.
//! - [`signals`]: terminate and hang-up as typed events.
//! - [`trace`]: the registry of live trace subscribers (`tunnelctl trace`).
//! - [`url`]: URLs read one way everywhere (ports checked, no secrets).
//! - [`access`], [`held`]: the access line of each request; plain text
//!   lines held while the daemon is busy and written together.
//! - [`observe`]: a span per request: trace events and request metrics
//!   (status classes, outcomes, cancels, per-model time to first token and
//!   tokens per second, read by [`usage`] from the stream's final line).

pub mod access;
pub mod config;
pub mod control;
pub mod held;
pub mod logging;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod observe;
pub mod process;
pub mod signals;
pub mod supervise;
pub mod trace;
pub mod url;
pub mod usage;

pub use config::ConfigError;
pub use config::Resolve;
pub use process::{CommonArgs, Context, Daemon, ExitStatus};
