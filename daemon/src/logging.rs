//! Log set-up, and the level changed at runtime.
//!
//! Where the lines go: to the journal, natively, when systemd connected
//! stderr to it (`JOURNAL_STREAM` names stderr's device and inode), so each
//! event's fields become journal fields (`journalctl -u agentd
//! REQUEST_ID=...`); else text lines on stderr (colours only on a terminal),
//! or JSON lines with `NAME_LOG_FORMAT=json`. The filter comes from the
//! daemon's own variable (`RELAYD_LOG`, `AGENTD_LOG`: `tracing` filter
//! syntax, `info` by default) and can be replaced while the daemon runs
//! ([`set_filter`], `tunnelctl log-level`).

use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Where log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Native journal entries with structured fields.
    Journal,
    /// Human text lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

impl Output {
    pub fn as_str(self) -> &'static str {
        match self {
            Output::Journal => "journal",
            Output::Text => "text",
            Output::Json => "json",
        }
    }
}

/// The live filter: its handle and its text.
struct Live {
    handle: reload::Handle<EnvFilter, Registry>,
    text: Mutex<String>,
    output: Output,
    /// Text lines are coloured (stderr is a terminal).
    ansi: bool,
}

static LIVE: OnceLock<Live> = OnceLock::new();

/// Whether stderr is the journal: `JOURNAL_STREAM` is `DEV:INODE` of the
/// stream systemd connected (a child that inherited the variable but not
/// the stream must not write binary journal entries to a terminal).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    // The casts matter where dev_t and ino_t are not u64 (macOS).
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Installs the process's log subscriber for daemon `name` (its variables
/// are `NAME_LOG` and `NAME_LOG_FORMAT`). A filter that does not parse is
/// reported on stderr and `info` used.
pub fn init(name: &str) -> Output {
    let upper = name.to_ascii_uppercase();
    let text = std::env::var(format!("{upper}_LOG")).unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|e| {
        eprintln!("{name}: {upper}_LOG={text:?} is not a log filter ({e}); using info");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let json = std::env::var(format!("{upper}_LOG_FORMAT")).is_ok_and(|f| f == "json");
    let journal = if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(layer) => {
                Some(layer.with_field_prefix(None).with_syslog_identifier(name.to_owned()))
            }
            Err(e) => {
                eprintln!("{name}: cannot write to the journal ({e}); logging to stderr");
                None
            }
        }
    } else {
        None
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = match (journal, json) {
        (Some(journal), _) => {
            registry.with(journal).init();
            Output::Journal
        }
        (None, true) => {
            registry
                .with(tracing_subscriber::fmt::layer().json().with_writer(std::io::stderr))
                .init();
            Output::Json
        }
        (None, false) => {
            registry
                .with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(|| {
                    // Access lines held back go first, in order.
                    crate::held::flush();
                    std::io::stderr()
                }))
                .init();
            Output::Text
        }
    };
    let _ = LIVE.set(Live { handle, text: Mutex::new(text), output, ansi });
    output
}

/// Where lines go; `None` before [`init`].
pub fn output() -> Option<Output> {
    LIVE.get().map(|live| live.output)
}

/// Lines go to stderr as plain text: no journal, no JSON, no colours (a
/// file, a pipe, launchd's log file).
pub fn plain_text() -> bool {
    LIVE.get().is_some_and(|live| live.output == Output::Text && !live.ansi)
}

/// The filter in force and where lines go; `None` before [`init`].
pub fn filter() -> Option<(String, Output)> {
    let live = LIVE.get()?;
    Some((live.text.lock().unwrap_or_else(PoisonError::into_inner).clone(), live.output))
}

/// Why a filter was not applied.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("{0:?} is not a log filter: {1}")]
    Invalid(String, String),
    #[error("logging is not set up in this process")]
    NotInitialized,
}

/// Replaces the filter while the daemon runs (until the next restart,
/// which reads `NAME_LOG` again); returns the one it replaced.
pub fn set_filter(text: &str) -> Result<String, FilterError> {
    let filter = EnvFilter::try_new(text)
        .map_err(|e| FilterError::Invalid(text.to_owned(), e.to_string()))?;
    let live = LIVE.get().ok_or(FilterError::NotInitialized)?;
    live.handle.reload(filter).map_err(|_| FilterError::NotInitialized)?;
    let mut current = live.text.lock().unwrap_or_else(PoisonError::into_inner);
    let previous = std::mem::replace(&mut *current, text.to_owned());
    tracing::info!(filter = text, previous = %previous, "log filter changed");
    Ok(previous)
}
