//! The peers added by hand with `--to`, remembered in a file for the next start: one
//! `HOST:PORT` a line.

use std::io;
use std::path::{Path, PathBuf};

/// Where the remembered peers live by default: `$XDG_STATE_HOME/corokit/chat-peers`, or
/// `~/.local/state/corokit/chat-peers`.
pub fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("corokit/chat-peers"))
}

pub fn load(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Adds the `peers` that are not in the file yet, with one write.
pub fn remember(path: &Path, peers: &[String]) -> io::Result<()> {
    let mut known = load(path);
    let before = known.len();
    for peer in peers {
        if !known.contains(peer) {
            known.push(peer.clone());
        }
    }
    if known.len() == before {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, known.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_peers_survive_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/peers");
        remember(&path, &["10.1.2.3:7890".into()]).unwrap();
        remember(&path, &["[::1]:7890".into(), "10.1.2.3:7890".into()]).unwrap();
        assert_eq!(load(&path), ["10.1.2.3:7890", "[::1]:7890"]);
    }
}
