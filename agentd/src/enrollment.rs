//! `enrollment.toml` in agentd's state directory: the relay `tunnelctl
//! enroll` stored (and its pins), read at start by the configuration and
//! written by [`crate::enroll`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use daemon::ConfigError;

/// The file an enrollment is kept in, under `state_dir`.
pub const FILE: &str = "enrollment.toml";

/// What `enrollment.toml` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Enrollment {
    pub relay: String,
    #[serde(default)]
    pub pins: Vec<String>,
}

/// The enrollment stored in `dir`, if any.
pub fn read(dir: &Path) -> Result<Option<Enrollment>, ConfigError> {
    let path = dir.join(FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError::Invalid(format!("{}: {e}", path.display()))),
    };
    toml::from_str(&text)
        .map(Some)
        .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))
}

/// Writes `e` to `dir` atomically, readable by agentd's user only (it
/// names the relay and its pins).
pub fn write(dir: &Path, e: &Enrollment) -> std::io::Result<PathBuf> {
    let path = dir.join(FILE);
    let text = toml::to_string(e).map_err(std::io::Error::other)?;
    daemon::config::write_secret(
        &path,
        format!("# Written by `tunnelctl enroll`; a relay set in agentd.toml wins.\n{text}")
            .trim_end(),
    )?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged enrollment file is an error that names it, not a silent
    /// "not enrolled" (which would hide a lost relay).
    #[test]
    fn a_damaged_enrollment_file_is_an_error_naming_it() {
        let dir = std::env::temp_dir().join(format!("enroll-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(read(&dir).expect("no file"), None);
        let e = Enrollment { relay: "wss://r.example/ws/tunnel".into(), pins: vec![] };
        write(&dir, &e).expect("write");
        assert_eq!(read(&dir).expect("read"), Some(e));
        std::fs::write(dir.join(FILE), "relay = [\n").expect("damage");
        let err = read(&dir).expect_err("damaged").to_string();
        assert!(err.contains("enrollment.toml"), "{err}");
        std::fs::write(dir.join(FILE), "relay = \"x\"\nextra = 1\n").expect("unknown key");
        assert!(read(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
