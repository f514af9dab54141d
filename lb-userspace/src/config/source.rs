//! Reading the config file without trusting it: only a regular file of at
//! most [`MAX_FILE_BYTES`] is read, opened so that a FIFO or device swapped in
//! at the last moment cannot block, and its YAML is measured (aliases
//! expanded, nesting) before serde builds anything, so a billion-laughs file
//! is refused in microseconds instead of costing gigabytes.

use std::{
    collections::HashMap,
    fs::File,
    io::{self, Read as _},
    os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _},
    path::Path,
};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Far above the largest valid config (64 VIPs x 4096 backends is about
/// 300 KB written out one backend per line).
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// YAML nodes after alias expansion. The largest valid config has about
/// 40,000; an alias bomb has billions.
pub const MAX_NODES: u64 = 200_000;
/// Nesting of mappings and sequences (a valid config nests 4 deep).
pub const MAX_DEPTH: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("larger than {MAX_FILE_BYTES} bytes")]
    TooLarge,
    #[error("not UTF-8")]
    NotUtf8,
    #[error("{0}")]
    Yaml(String),
}

/// The whole text of the config file at `path`.
pub fn read(path: &Path) -> Result<String, SourceError> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a
    // writer. The type is checked on the opened file, so a swap between a
    // check and the open cannot slip through.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    if !kind.is_file() {
        return Err(SourceError::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        }));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(SourceError::TooLarge);
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // Bounded even if the file grows while it is read.
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(SourceError::TooLarge);
    }
    String::from_utf8(bytes).map_err(|_| SourceError::NotUtf8)
}

/// Refuses YAML whose expanded size or nesting exceeds the limits.
pub fn check_bounds(text: &str) -> Result<(), SourceError> {
    let mut meter = Meter::default();
    let mut parser = Parser::new_from_str(text);
    // Parse errors are left to serde_yaml, which reports them with the
    // field; only the limits are this function's business.
    let _ = parser.load(&mut meter, true);
    match meter.exceeded {
        Some(e) => Err(SourceError::Yaml(e)),
        None => Ok(()),
    }
}

/// Counts nodes as they would be after alias expansion.
#[derive(Default)]
struct Meter {
    nodes: u64,
    depth: usize,
    /// Open collections: (anchor id, node count and depth when it opened,
    /// deepest depth reached inside).
    open: Vec<Open>,
    /// Per anchor: nodes and extra depth of the anchored node, expanded.
    anchors: HashMap<usize, (u64, usize)>,
    exceeded: Option<String>,
}

struct Open {
    anchor: usize,
    nodes_before: u64,
    depth_before: usize,
    deepest: usize,
}

impl Meter {
    fn add(&mut self, nodes: u64, depth: usize) {
        self.nodes = self.nodes.saturating_add(nodes);
        let reached = self.depth + depth;
        for o in &mut self.open {
            o.deepest = o.deepest.max(reached);
        }
        if self.exceeded.is_some() {
            return;
        }
        if self.nodes > MAX_NODES {
            self.exceeded = Some(format!(
                "more than {MAX_NODES} YAML nodes once aliases are expanded"
            ));
        } else if reached > MAX_DEPTH {
            self.exceeded = Some(format!("nested deeper than {MAX_DEPTH} levels"));
        }
    }
}

impl MarkedEventReceiver for Meter {
    fn on_event(&mut self, event: Event, _mark: Marker) {
        match event {
            Event::Scalar(_, _, anchor, _) => {
                self.add(1, 0);
                if anchor != 0 {
                    self.anchors.insert(anchor, (1, 0));
                }
            }
            Event::Alias(anchor) => {
                // An unknown anchor is a parse error serde_yaml reports.
                let (nodes, depth) = self.anchors.get(&anchor).copied().unwrap_or((1, 0));
                self.add(nodes, depth);
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                self.add(1, 0);
                self.open.push(Open {
                    anchor,
                    nodes_before: self.nodes - 1,
                    depth_before: self.depth,
                    deepest: self.depth + 1,
                });
                self.depth += 1;
                self.add(0, 0);
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.depth = self.depth.saturating_sub(1);
                if let Some(o) = self.open.pop()
                    && o.anchor != 0
                {
                    self.anchors.insert(
                        o.anchor,
                        (self.nodes - o.nodes_before, o.deepest - o.depth_before),
                    );
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-source-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// `levels` anchors, each a list of ten aliases of the one before: ten
    /// to the power `levels` strings once expanded.
    fn alias_bomb(levels: usize) -> String {
        let mut text = String::from("a0: &a0 [\"lol\"]\n");
        for i in 1..=levels {
            let refs = vec![format!("*a{}", i - 1); 10].join(", ");
            text += &format!("a{i}: &a{i} [{refs}]\n");
        }
        text
    }

    #[test]
    fn the_largest_valid_config_is_within_bounds() {
        let mut text = String::from("interface: eth0\nvips:\n");
        for v in 0..64 {
            text += &format!(
                "  - {{ name: v{v}, address: 10.1.0.{v}, port: 80, protocol: tcp, forwarding: l2, backends: [\n"
            );
            for b in 0..64 {
                text += &format!("      {{ address: 10.2.{v}.{b}, weight: 1 }},\n");
            }
            text += "    ]}\n";
        }
        check_bounds(&text).unwrap();
        // Anchors and aliases used sparingly are fine.
        check_bounds("hc: &hc { kind: tcp }\nx: *hc\ny: *hc\n").unwrap();
    }

    #[test]
    fn an_alias_bomb_is_refused_at_once() {
        let started = Instant::now();
        let e = check_bounds(&alias_bomb(9)).unwrap_err();
        assert!(e.to_string().contains("once aliases are expanded"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));
        // The same shape below the limit passes: the count is exact.
        check_bounds(&alias_bomb(4)).unwrap();
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        let e = check_bounds(&deep).unwrap_err();
        assert!(e.to_string().contains("nested deeper"), "{e}");
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        check_bounds(&ok).unwrap();
        // Depth hidden behind an alias counts where the alias is used.
        let half = MAX_DEPTH / 2 + 1;
        let hidden = format!(
            "a: &x {}{}\nb: {}*x{}\n",
            "[".repeat(half),
            "]".repeat(half),
            "[".repeat(half),
            "]".repeat(half)
        );
        assert!(check_bounds(&hidden).is_err());
    }

    #[test]
    fn only_regular_files_up_to_the_limit_are_read() {
        let dir = temp("files");
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let started = Instant::now();
        let e = read(&fifo).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(1));

        assert!(read(&dir).unwrap_err().to_string().contains("directory"));

        let big = dir.join("big.yaml");
        std::fs::write(&big, vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(read(&big), Err(SourceError::TooLarge)));

        let ok = dir.join("ok.yaml");
        std::fs::write(&ok, "interface: lo\n").unwrap();
        assert_eq!(read(&ok).unwrap(), "interface: lo\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
