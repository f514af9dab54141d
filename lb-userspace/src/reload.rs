//! Config reloads: when a changed file is taken up, reading and parsing it
//! away from the event loop, and what `/status` says about the config.
//!
//! A file is taken up after it read the same at two polls in a row (a writer
//! that truncates and rewrites in place is never caught half-way at one
//! poll), or at once on SIGHUP. Reading is bounded ([`config::source`]) and,
//! with parsing, runs on a blocking thread under a deadline, so a huge or
//! hostile file cannot stall probes, swaps or the admin listener.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{Config, ConfigError, source};

/// Longest a read plus parse may take before the reload is given up.
const PARSE_DEADLINE: Duration = Duration::from_secs(5);

/// The SHA-256 of a config text, as `sha256sum` prints it.
pub fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Reads the config file on a blocking thread.
pub async fn read(path: &Path) -> Result<String, String> {
    let owned = path.to_owned();
    let read = tokio::task::spawn_blocking(move || source::read(&owned));
    match tokio::time::timeout(PARSE_DEADLINE, read).await {
        Ok(Ok(result)) => result.map_err(|e| format!("{}: cannot read: {e}", path.display())),
        Ok(Err(e)) => Err(format!("{}: reading failed: {e}", path.display())),
        Err(_) => Err(format!(
            "{}: not read within {PARSE_DEADLINE:?}",
            path.display()
        )),
    }
}

/// Parses and validates `text` on a blocking thread.
pub async fn parse(text: String, path: &Path) -> Result<Config, String> {
    let owned = path.to_owned();
    let parse = tokio::task::spawn_blocking(move || Config::parse(&text, &owned));
    match tokio::time::timeout(PARSE_DEADLINE, parse).await {
        Ok(Ok(result)) => result.map_err(|e: ConfigError| e.to_string()),
        Ok(Err(e)) => Err(format!("{}: parsing failed: {e}", path.display())),
        Err(_) => Err(format!(
            "{}: not parsed within {PARSE_DEADLINE:?}",
            path.display()
        )),
    }
}

/// Watches the config file's content.
pub struct Watch {
    path: PathBuf,
    /// The text last taken up (or the one `lb` started with).
    taken: Option<String>,
    /// A new text seen at the previous poll, waiting to read the same once
    /// more.
    candidate: Option<String>,
}

impl Watch {
    pub fn new(path: PathBuf, started_with: Option<String>) -> Self {
        Self {
            path,
            taken: started_with,
            candidate: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One poll: the new text once it has read the same twice in a row.
    pub async fn poll(&mut self) -> Option<String> {
        // An unreadable file is left alone: the running config stays, and
        // the file is looked at again at the next poll.
        let text = read(&self.path).await.ok()?;
        self.observe(text)
    }

    fn observe(&mut self, text: String) -> Option<String> {
        if self.taken.as_ref() == Some(&text) {
            self.candidate = None;
            return None;
        }
        if self.candidate.as_ref() == Some(&text) {
            self.candidate = None;
            self.taken = Some(text.clone());
            return Some(text);
        }
        self.candidate = Some(text);
        None
    }

    /// SIGHUP: the text as it is now, at once.
    pub async fn read_now(&mut self) -> Result<String, String> {
        let text = read(&self.path).await?;
        self.candidate = None;
        self.taken = Some(text.clone());
        Ok(text)
    }
}

/// The config part of `/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConfigStatus {
    /// SHA-256 of the text the maps express.
    pub applied_sha256: String,
    /// A valid config that could not be applied yet and is being retried.
    pub pending_sha256: Option<String>,
    /// Why the last reload or apply failed; `None` once one succeeds.
    pub last_error: Option<String>,
    /// Reloads rejected or failed since start.
    pub reload_failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_is_taken_up_only_after_it_read_the_same_twice() {
        let mut w = Watch::new("c.yaml".into(), Some("a".into()));
        assert_eq!(w.observe("a".into()), None, "unchanged");
        // A writer half-way: each poll sees another prefix.
        assert_eq!(w.observe("b".into()), None);
        assert_eq!(w.observe("bc".into()), None);
        assert_eq!(w.observe("bcd".into()), None);
        assert_eq!(w.observe("bcd".into()), Some("bcd".into()), "stable");
        assert_eq!(w.observe("bcd".into()), None, "taken once");
        // Back to a text already taken: nothing to do.
        assert_eq!(w.observe("x".into()), None);
        assert_eq!(w.observe("bcd".into()), None);
    }

    #[test]
    fn the_digest_is_sha256_as_sha256sum_prints_it() {
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
