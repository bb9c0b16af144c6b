//! Configuration helpers both daemons use: strict TOML loading, one
//! duration format, secrets given inline or in a file, and the check that an
//! example configuration only documents keys that exist.
//!
//! Each daemon keeps its own `ConfigFile` (the strict on-disk shape, unknown
//! keys refused) and resolves it into a `Config` with defaults; what the two
//! share lives here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// A configuration that cannot be used, with what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}{}", path.display(), access_hint(path, source))]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("{0}")]
    Invalid(String),
}

impl ConfigError {
    pub fn invalid(what: impl Into<String>) -> Self {
        ConfigError::Invalid(what.into())
    }
}

/// What to do about a file this process may not read: who it runs as,
/// who owns the file, and the commands that fix it (empty for other
/// errors).
pub fn access_hint(path: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt as _;
    if e.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    let uid = nix::unistd::geteuid();
    let me =
        nix::unistd::User::from_uid(uid).ok().flatten().map_or_else(|| uid.to_string(), |u| u.name);
    let owner = match std::fs::metadata(path) {
        Ok(m) => {
            let name = nix::unistd::User::from_uid(m.uid().into())
                .ok()
                .flatten()
                .map_or_else(|| m.uid().to_string(), |u| u.name);
            format!(", and it is owned by {name} with mode {:04o}", m.mode() & 0o7777)
        }
        Err(_) => " (or a directory on its path does not let it through)".to_owned(),
    };
    format!(
        "; this process runs as {me}{owner}: make it {me}'s with `chown {me} {0}` and `chmod 600 {0}`",
        path.display()
    )
}

/// A configuration file's strict shape, resolved into what the daemon runs
/// with (defaults applied, every value checked, secrets read).
pub trait Resolve: DeserializeOwned {
    type Config;
    fn resolve(self) -> Result<Self::Config, ConfigError>;
}

/// Reads and parses a TOML file into `T` (whose unknown keys should be
/// refused with `#[serde(deny_unknown_fields)]`).
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    toml::from_str(&text)
        .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })
}

/// A secret given inline or in a file (whose content is trimmed), never
/// both; `None` when neither. `what` names the key in errors.
pub fn secret(
    what: &str,
    inline: Option<String>,
    file: Option<PathBuf>,
) -> Result<Option<String>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            Err(ConfigError::Invalid(format!("set {what} or {what}_file, not both")))
        }
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => read_secret(&path).map(Some),
        (None, None) => Ok(None),
    }
}

/// Reads a secret file (trimmed) that only its owner may read.
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    private_file(path)?;
    Ok(std::fs::read_to_string(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?
        .trim()
        .to_owned())
}

/// Refuses a secret file its group or others may read or write: a token
/// that leaked to another local account is a token to rotate, not to use.
pub fn private_file(path: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::Invalid(format!(
            "{} is readable by others (mode {mode:03o}): chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

/// Writes a secret file only its owner may read, atomically: a temporary
/// file in the same directory (mode 0600), synced, renamed over `path`, and
/// the directory synced. A crash leaves the old file or the new one, never
/// half of either.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    write_secret_bytes(path, format!("{secret}\n").as_bytes())
}

/// [`write_secret`] for bytes that are not text (a random key), written
/// as they are.
pub fn write_secret_bytes(path: &Path, secret: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("secret");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(secret)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `value`, which must not be zero, or `default`.
pub fn positive(
    value: Option<Duration>,
    default: Duration,
    what: &str,
) -> Result<Duration, ConfigError> {
    match value {
        Some(d) if d.is_zero() => Err(ConfigError::Invalid(format!("{what} must be positive"))),
        Some(d) => Ok(d),
        None => Ok(default),
    }
}

/// `value`, which must not be zero, or `default`.
pub fn at_least_one(value: Option<u32>, default: u32, what: &str) -> Result<u32, ConfigError> {
    match value {
        Some(0) => Err(ConfigError::Invalid(format!("{what} must be at least 1"))),
        Some(n) => Ok(n),
        None => Ok(default),
    }
}

/// A duration as an operator writes it: humantime text (`"90s"`, `"5m"`,
/// `"1h 30m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl Human {
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> serde::Deserialize<'de> for Human {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Human).map_err(serde::de::Error::custom)
    }
}

/// A limit that can be switched off: a duration (not zero) or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Duration>);

impl Limit {
    pub fn get(self) -> Option<Duration> {
        self.0
    }
}

impl<'de> serde::Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "off" {
            return Ok(Limit(None));
        }
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => Err(serde::de::Error::custom("use \"off\" instead of 0")),
            Ok(d) => Ok(Limit(Some(d))),
            Err(e) => {
                Err(serde::de::Error::custom(format!("{e} (a duration like \"5m\", or \"off\")")))
            }
        }
    }
}

/// How resolved configurations print durations for `--check-config`: the
/// same humantime text, and `"off"` for a limit switched off.
pub mod duration {
    use std::time::Duration;

    use serde::Serializer;

    /// Writes a duration as humantime text.
    pub fn show<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    /// Writes a limit as humantime text, or `"off"`.
    pub fn show_limit<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => show(d, s),
            None => s.serialize_str("off"),
        }
    }
}

/// An example configuration with every documented knob switched on: lines
/// `# key = value` (a lower-case key) and `# [[table]]` lose their `# `, and
/// lines whose key is in `skip` (values that must not be set together, such
/// as a secret inline and in a file) are dropped. Parsing the result proves
/// every knob the example documents is a real key with a valid value.
pub fn uncomment_example(text: &str, skip: &[&str]) -> String {
    text.lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|r| {
                    r.starts_with("[[")
                        || r.split_once(" = ").is_some_and(|(k, _)| {
                            k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        })
                })
                .unwrap_or(l)
        })
        .filter(|l| !skip.iter().any(|k| l.starts_with(&format!("{k} = "))))
        .collect::<Vec<_>>()
        .join("\n")
}

/// systemd's `$STATE_DIRECTORY` (the first one when `StateDirectory=`
/// names several): where a daemon keeps state when its file names none.
pub fn state_directory() -> Option<std::path::PathBuf> {
    std::env::var_os("STATE_DIRECTORY")
        .and_then(|v| v.to_str().and_then(|v| v.split(':').next()).map(std::path::PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
}

/// The top-level settings (and `[table]` names) whose resolved values
/// differ between `old` and `new`, as `--check-config` shows them: what a
/// reload could not apply and a restart would.
pub fn changed_settings(old: &impl serde::Serialize, new: &impl serde::Serialize) -> Vec<String> {
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> =
        old.keys().chain(new.keys()).filter(|k| old.get(*k) != new.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        wait: Option<Human>,
        limit: Option<Limit>,
    }

    #[test]
    fn durations_are_human_and_limits_can_be_off() {
        let s: Sample = toml::from_str("wait = \"2m 30s\"\nlimit = \"off\"").expect("valid");
        assert_eq!(s.wait, Some(Human(Duration::from_secs(150))));
        assert_eq!(s.limit, Some(Limit(None)));
        let s: Sample = toml::from_str("limit = \"5s\"").expect("valid");
        assert_eq!(s.limit.and_then(Limit::get), Some(Duration::from_secs(5)));
        assert!(toml::from_str::<Sample>("limit = \"0s\"").is_err());
        assert!(toml::from_str::<Sample>("wait = \"soon\"").is_err());
        assert!(toml::from_str::<Sample>("other = 1").is_err());
    }

    #[test]
    fn secrets_come_inline_or_from_a_file_never_both() {
        let dir = std::env::temp_dir().join(format!("daemon-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("token");
        std::fs::write(&file, "  from-file\n").expect("write");
        let err = secret("token", None, Some(file.clone())).expect_err("world-readable");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        write_secret(&file, "  from-file").expect("write");
        assert_eq!(
            secret("token", None, Some(file.clone())).expect("ok"),
            Some("from-file".into())
        );
        assert_eq!(secret("token", Some("x".into()), None).expect("ok"), Some("x".into()));
        assert_eq!(secret("token", None, None).expect("ok"), None);
        let err = secret("token", Some("x".into()), Some(file)).expect_err("both");
        assert!(err.to_string().contains("token or token_file"), "{err}");
        let err = secret("token", None, Some(dir.join("missing"))).expect_err("missing");
        assert!(err.to_string().contains("missing"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn examples_are_uncommented_knob_by_knob() {
        let text = "# comment\n# key = 1\n# [[users]]\n# token = \"a\"\n# Not a key = 2\n";
        assert_eq!(
            uncomment_example(text, &["token"]),
            "# comment\nkey = 1\n[[users]]\n# Not a key = 2"
        );
    }

    #[test]
    fn changed_settings_names_what_differs() {
        #[derive(serde::Serialize)]
        struct C {
            a: u32,
            b: &'static str,
            t: std::collections::BTreeMap<&'static str, u32>,
        }
        let old = C { a: 1, b: "x", t: [("k", 1)].into() };
        let new = C { a: 1, b: "y", t: [("k", 2)].into() };
        assert_eq!(changed_settings(&old, &new), ["b", "t"]);
        assert!(changed_settings(&old, &old).is_empty());
    }
}
