//! The file source: a YAML, JSON or TOML file of nested maps, flattened to `/a/b/c` keys the way
//! confd's file backend does, and a watcher that reports when the file (or any other watched
//! file) changes.
//!
//! Files are watched through their parent directory and filtered by name: a watch on the file
//! itself goes silent after the first rename over it, and editors and deploy tools write by
//! renaming a temporary file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::SourceError;

/// Reads and flattens the registry file. The file may hold bytes that are not UTF-8: they become
/// U+FFFD, which the snapshot screen rejects by key, so one bad value never loses the others.
pub fn read(path: &Path) -> Result<Vec<(String, String)>, SourceError> {
    let bytes = std::fs::read(path).map_err(|e| SourceError::File {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let err = |message: String| SourceError::File {
        path: path.to_owned(),
        message,
    };
    let tree: serde_json::Value = match path.extension().and_then(|e| e.to_str()) {
        Some("json") => serde_json::from_str(&text).map_err(|e| err(e.to_string()))?,
        Some("toml") => toml::from_str(&text).map_err(|e| err(e.to_string()))?,
        _ => {
            let y: serde_yaml::Value =
                serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
            yaml_to_json(y).map_err(err)?
        }
    };
    let mut out = Vec::new();
    match tree {
        serde_json::Value::Object(_) => flatten("", &tree, &mut out),
        serde_json::Value::Null => {} // an empty file
        _ => return Err(err("the top level is not a map of keys".into())),
    }
    Ok(out)
}

fn yaml_to_json(y: serde_yaml::Value) -> Result<serde_json::Value, String> {
    use serde_yaml::Value as Y;
    Ok(match y {
        Y::Null => serde_json::Value::Null,
        Y::Bool(b) => b.into(),
        Y::Number(n) => serde_json::Value::String(n.to_string()),
        Y::String(s) => s.into(),
        Y::Sequence(seq) => seq
            .into_iter()
            .map(yaml_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into(),
        Y::Mapping(m) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in m {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    _ => return Err("a map key is not a string, number or bool".into()),
                };
                obj.insert(key, yaml_to_json(v)?);
            }
            obj.into()
        }
        Y::Tagged(t) => yaml_to_json(t.value)?,
    })
}

/// Flattens nested maps to `/a/b/c` keys; list items get their index as a segment; scalars
/// become their text; null becomes the empty string (which the registry then rejects by key).
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    use serde_json::Value as J;
    match v {
        J::Object(m) => {
            for (k, child) in m {
                let seg = k.trim_matches('/');
                flatten(&format!("{prefix}/{seg}"), child, out);
            }
        }
        J::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                flatten(&format!("{prefix}/{i}"), child, out);
            }
        }
        J::String(s) => out.push((prefix.to_owned(), s.clone())),
        J::Null => out.push((prefix.to_owned(), String::new())),
        J::Bool(b) => out.push((prefix.to_owned(), b.to_string())),
        J::Number(n) => out.push((prefix.to_owned(), n.to_string())),
    }
}

/// Watches files through their parent directories. Dropping it stops the watch.
pub struct FileWatcher {
    _watcher: notify::RecommendedWatcher,
}

impl FileWatcher {
    /// Starts watching `files`; the path of every changed file is sent on the returned channel.
    /// Several events for one write arrive as several messages: the receiver coalesces.
    pub fn start(files: &[PathBuf]) -> Result<(FileWatcher, mpsc::Receiver<PathBuf>), SourceError> {
        let (tx, rx) = mpsc::channel(256);
        let mut dirs: HashSet<PathBuf> = HashSet::new();
        let mut wanted: Vec<(PathBuf, OsString, PathBuf)> = Vec::new();
        for f in files {
            let abs = std::path::absolute(f).map_err(|e| SourceError::File {
                path: f.clone(),
                message: e.to_string(),
            })?;
            let dir = abs
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| "/".into());
            let name = abs.file_name().map(OsString::from).unwrap_or_default();
            dirs.insert(dir.clone());
            wanted.push((dir, name, f.clone()));
        }
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            if event.kind.is_access() {
                return;
            }
            for p in &event.paths {
                let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                    continue;
                };
                for (wdir, wname, original) in &wanted {
                    if wname == name && wdir == dir {
                        // A full channel already holds a pending change: dropping this is fine.
                        let _ = tx.try_send(original.clone());
                    }
                }
            }
        })
        .map_err(|e| SourceError::Watch(e.to_string()))?;
        for d in &dirs {
            watcher
                .watch(d, RecursiveMode::NonRecursive)
                .map_err(|e| SourceError::Watch(format!("{}: {e}", d.display())))?;
        }
        Ok((FileWatcher { _watcher: watcher }, rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_str(name: &str, text: &[u8]) -> Result<Vec<(String, String)>, SourceError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join(name);
        std::fs::write(&p, text).expect("write");
        read(&p)
    }

    #[test]
    fn yaml_json_and_toml_flatten_alike() {
        let yaml = b"services:\n  web:\n    w1: 127.0.0.1:8080\n    w2: 8081\nlist: [a, b]\n";
        let json = br#"{"services":{"web":{"w1":"127.0.0.1:8080","w2":8081}},"list":["a","b"]}"#;
        let toml = b"list = [\"a\", \"b\"]\n[services.web]\nw1 = \"127.0.0.1:8080\"\nw2 = 8081\n";
        let want = vec![
            ("/list/0".to_owned(), "a".to_owned()),
            ("/list/1".to_owned(), "b".to_owned()),
            ("/services/web/w1".to_owned(), "127.0.0.1:8080".to_owned()),
            ("/services/web/w2".to_owned(), "8081".to_owned()),
        ];
        for (name, text) in [
            ("r.yaml", &yaml[..]),
            ("r.json", &json[..]),
            ("r.toml", &toml[..]),
        ] {
            let mut got = read_str(name, text).expect(name);
            got.sort();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn syntax_error_names_the_file() {
        let e = read_str("r.yaml", b"a: [unclosed\n").expect_err("bad yaml");
        assert!(e.to_string().contains("r.yaml"), "{e}");
    }

    #[test]
    fn non_utf8_value_survives_as_replacement_char() {
        let got = read_str("r.yaml", b"a: \"ok\"\nb: \"\xff\xfe\"\n").expect("lossy read");
        assert!(got.iter().any(|(k, v)| k == "/b" && v.contains('\u{fffd}')));
        assert!(got.iter().any(|(k, v)| k == "/a" && v == "ok"));
    }
}
