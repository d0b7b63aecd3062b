//! Reading the config file and the templates again (SIGHUP, or a watched file changed).
//!
//! In: the config file's path (none for the embedded default) and the running config. Out: a
//! new config with its templates; or "unchanged" when every byte on disk is what the last
//! reading saw, so that a burst of SIGHUPs or file events costs one reload; or why the files
//! were rejected, in one line that keeps the line and column the parser gave.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::render::Templates;

/// The outcome of one [`Reloader::reload`].
pub enum Reloaded {
    /// The files hold what the last reading saw.
    Unchanged,
    /// The files do not make a valid config and templates: one line saying why.
    Rejected(String),
    /// A valid config and its parsed templates.
    New(Box<(Config, Templates)>),
}

/// Reads the config file and the templates it names, and remembers what it read.
pub struct Reloader {
    path: Option<PathBuf>,
    /// The bytes of the config file and of each template the last reading saw. `None` before
    /// the first reading: the first SIGHUP always reloads.
    last: Option<Vec<(PathBuf, Vec<u8>)>>,
}

impl Reloader {
    /// A reloader for the config file at `path` (`None`: the embedded default, whose templates
    /// are still read from disk).
    pub fn new(path: Option<PathBuf>) -> Reloader {
        Reloader { path, last: None }
    }

    /// Forgets the last reading: the next one loads even the same files (after files that
    /// loaded were rejected on their first apply).
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// Reads the files again. `running` is the config in use: with the embedded default it is
    /// the config, and when the config file is rejected its templates are the ones compared.
    pub fn reload(&mut self, running: &Config) -> Reloaded {
        let mut seen = Vec::new();
        let parsed = match &self.path {
            Some(p) => match std::fs::read(p) {
                Ok(bytes) => {
                    let parsed = parse_config(p, &bytes);
                    seen.push((p.clone(), bytes));
                    parsed
                }
                Err(e) => Err(format!("cannot read config file {}: {e}", p.display())),
            },
            None => Ok(running.clone()),
        };
        let templates_of = parsed.as_ref().unwrap_or(running);
        let mut texts = Vec::with_capacity(templates_of.templates.len());
        for t in &templates_of.templates {
            match std::fs::read(&t.src) {
                Ok(bytes) => {
                    texts.push(String::from_utf8(bytes.clone()).map_err(|_| {
                        format!(
                            "template {:?} ({}) is not UTF-8 text",
                            t.name,
                            t.src.display()
                        )
                    }));
                    seen.push((t.src.clone(), bytes));
                }
                Err(e) => texts.push(Err(format!(
                    "cannot read template {:?} from {}: {e}",
                    t.name,
                    t.src.display()
                ))),
            }
        }
        if self.last.as_ref() == Some(&seen) {
            return Reloaded::Unchanged;
        }
        self.last = Some(seen);
        let config = match parsed {
            Ok(c) => c,
            Err(why) => return Reloaded::Rejected(why),
        };
        let mut sources = Vec::with_capacity(texts.len());
        for (t, text) in config.templates.iter().zip(texts) {
            match text {
                Ok(text) => sources.push((t, text)),
                Err(why) => return Reloaded::Rejected(why),
            }
        }
        match Templates::from_sources(&config, sources.iter().map(|(t, s)| (*t, s.as_str()))) {
            Ok(templates) => Reloaded::New(Box::new((config, templates))),
            Err(e) => Reloaded::Rejected(one_line(&e.to_string())),
        }
    }
}

fn parse_config(path: &Path, bytes: &[u8]) -> Result<Config, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| format!("config file {} is not UTF-8 text", path.display()))?;
    let config =
        Config::parse(text, &path.display().to_string()).map_err(|e| one_line(&e.to_string()))?;
    config.check_files().map_err(|e| e.to_string())?;
    Ok(config)
}

/// A parser's report in one line for the log and `/readyz`: the quoted source and its caret
/// lines are left out, and tera's `--> file:LINE:COLUMN` becomes `at line LINE, column COLUMN`
/// (TOML's reports already say it so).
pub fn one_line(report: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in report.lines().map(str::trim) {
        let snippet = line
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start()
            .starts_with('|');
        if line.is_empty() || snippet {
            continue;
        }
        let part = match line.strip_prefix("-->").map(str::trim) {
            Some(at) => {
                let mut fields = at.rsplitn(3, ':');
                match (fields.next(), fields.next(), fields.next()) {
                    (Some(col), Some(row), Some(_file))
                        if col.parse::<u32>().is_ok() && row.parse::<u32>().is_ok() =>
                    {
                        format!("at line {row}, column {col}")
                    }
                    _ => line.to_owned(),
                }
            }
            None => line.to_owned(),
        };
        parts.push(part.trim_end_matches(':').to_owned());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tera_report_keeps_its_place() {
        let report = "template \"haproxy\" (templates/haproxy.cfg.tera) does not parse:\nFound `}}` but expected identifier.\n --> templates/haproxy.cfg.tera:7:9\n  |\n7 | {{ foo( }}\n  |         ^^\n";
        assert_eq!(
            one_line(report),
            "template \"haproxy\" (templates/haproxy.cfg.tera) does not parse; Found `}}` but expected identifier.; at line 7, column 9"
        );
    }

    #[test]
    fn a_toml_report_keeps_its_place() {
        let report = "config file bad.toml is not valid TOML for haconfd: TOML parse error at line 3, column 26\n  |\n3 | prefixes = [\"/services/\"\n  |                          ^\ninvalid array\nexpected `]`";
        assert_eq!(
            one_line(report),
            "config file bad.toml is not valid TOML for haconfd: TOML parse error at line 3, column 26; invalid array; expected `]`"
        );
    }

    #[test]
    fn same_bytes_are_unchanged_and_an_edit_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let template = dir.path().join("t.tera");
        std::fs::write(&template, "a\n").expect("write");
        let config_path = dir.path().join("haconfd.toml");
        let config = format!(
            "[source]\nkind = \"file\"\nprefixes = [\"/services/\"]\n[file]\npath = \"r.yaml\"\n[[template]]\nname = \"t\"\nsrc = {:?}\ndest = {:?}\ncheck = false\n[haproxy]\nmode = \"none\"\n",
            template.display().to_string(),
            dir.path().join("out").display().to_string()
        );
        std::fs::write(&config_path, &config).expect("write");
        let running = Config::parse(&config, "test").expect("config");
        let mut r = Reloader::new(Some(config_path.clone()));
        assert!(
            matches!(r.reload(&running), Reloaded::New(_)),
            "the first reading loads"
        );
        assert!(matches!(r.reload(&running), Reloaded::Unchanged));
        std::fs::write(&template, "{{ foo( }}\n").expect("write");
        match r.reload(&running) {
            Reloaded::Rejected(why) => assert!(why.contains("at line 1, column"), "{why}"),
            _ => panic!("a broken template is rejected"),
        }
        assert!(
            matches!(r.reload(&running), Reloaded::Unchanged),
            "rejected once"
        );
        std::fs::write(&template, "b\n").expect("write");
        assert!(matches!(r.reload(&running), Reloaded::New(_)));
        std::fs::write(&config_path, "[source\n").expect("write");
        match r.reload(&running) {
            Reloaded::Rejected(why) => assert!(why.contains("line 1, column"), "{why}"),
            _ => panic!("a broken config is rejected"),
        }
    }
}
