//! The pipeline over a fake deployer: what reaches the deploy room, and what the applier does
//! with its answers (the disk-retry backoff, guard hold wakeups, isolation), in paused time.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use super::*;
use crate::haproxy::deploy::Committed;
use crate::haproxy::deploy::fast::{After, FastPath, Proof, Seen};
use crate::haproxy::install::InstallError;
use crate::haproxy::runtime::{self, Cmd};
use crate::haproxy::validate::ValidateError;
use crate::model::Snapshot;

mod fast;

/// What the fake does at a commit, in turn; once the script is done, it commits.
enum Step {
    /// The disk is full.
    DiskFull,
    /// `haproxy -c` blames the first line that holds this text.
    Blame(&'static str),
}

/// Records the HAProxy file of every commit and answers from its script. Without `runtime` it
/// always reloads; with it, it drives the Runtime API path of a model HAProxy.
struct Fake {
    script: VecDeque<Step>,
    commits: Arc<Mutex<Vec<String>>>,
    installed: bool,
    runtime: Option<Haproxy>,
}

/// A server as HAProxy holds it: address, weight, maintenance.
type Server = (String, u16, bool);

/// The Runtime API side of the fake: the real fast-path decisions and plans over a model of the
/// running HAProxy (its servers by `backend/server`), the installed HAProxy file, and what
/// happened, in order.
struct Haproxy {
    fast: FastPath,
    disk: String,
    servers: BTreeMap<String, Server>,
    events: Vec<&'static str>,
    /// What the master's `show proc` says.
    seen: Seen,
}

/// The server lines of a rendered file (the test templates' shape).
fn servers_of(text: &str) -> BTreeMap<String, Server> {
    let mut out = BTreeMap::new();
    let mut backend = "";
    for line in text.lines() {
        if let Some(b) = line.strip_prefix("backend ") {
            backend = b.trim();
            continue;
        }
        let words: Vec<&str> = line
            .split_whitespace()
            .take_while(|w| !w.starts_with('#'))
            .collect();
        if let ["server", name, addr, rest @ ..] = &words[..] {
            let weight = rest
                .iter()
                .position(|w| *w == "weight")
                .and_then(|i| rest.get(i + 1))
                .map_or(1, |w| w.parse().expect("weight"));
            let server = (addr.to_string(), weight, rest.contains(&"disabled"));
            out.insert(format!("{backend}/{name}"), server);
        }
    }
    out
}

impl Haproxy {
    fn new(wait: crate::config::WaitConfig) -> Haproxy {
        Haproxy {
            fast: FastPath::new(wait),
            disk: String::new(),
            servers: BTreeMap::new(),
            events: Vec::new(),
            seen: Seen {
                master_pid: 1,
                reloads: 0,
                restarts: 0,
            },
        }
    }

    fn apply(&mut self, cmds: &[Cmd]) {
        for c in cmds {
            let (backend, server) = match c {
                Cmd::Addr {
                    backend, server, ..
                }
                | Cmd::Weight {
                    backend, server, ..
                }
                | Cmd::State {
                    backend, server, ..
                } => (backend, server),
                Cmd::Map { .. } => continue,
            };
            let s = self
                .servers
                .get_mut(&format!("{backend}/{server}"))
                .expect("HAProxy has the server");
            match c {
                Cmd::Addr { ip, port, .. } => s.0 = format!("{ip}:{port}"),
                Cmd::Weight { weight, .. } => s.1 = *weight,
                Cmd::State { ready, .. } => s.2 = !ready,
                Cmd::Map { .. } => {}
            }
        }
    }

    /// `show servers state` against the installed file, and what differs set.
    fn realign(&mut self) {
        self.events.push("realign");
        self.servers = servers_of(&self.disk);
    }

    /// Whether the running HAProxy and the installed file agree on every server.
    fn agree(&self) -> bool {
        self.servers == servers_of(&self.disk)
    }
}

/// The fake's plan: the plan from the files, and with HAProxy ahead what it needs after.
struct FakePlan {
    cmds: Vec<Cmd>,
    after: Option<After>,
}

const STAGED: &str = "/run/test/.haproxy.cfg.haconfd-1-0.tmp";

impl Deploy for Fake {
    type Plan = FakePlan;

    fn configure(&mut self, config: &Config) {
        if let Some(h) = self.runtime.as_mut() {
            h.fast.configure(config.wait);
        }
    }

    fn installed(&self) -> bool {
        self.installed
    }

    fn runtime_ready(&self) -> bool {
        self.runtime.is_some() && self.installed
    }

    async fn send_first(&mut self, installed: &Registry, wanted: &Registry) -> bool {
        let Some(h) = self.runtime.as_mut() else {
            return false;
        };
        let restarts = h.seen.restarts;
        let Some(cmds) = h.fast.commands(installed, wanted, true, restarts) else {
            return false;
        };
        h.events.push("send");
        h.apply(&cmds);
        h.fast.sent(installed, wanted.clone(), true, Instant::now());
        true
    }

    fn served(&self) -> Option<&Registry> {
        self.runtime.as_ref()?.fast.served()
    }

    fn files_due(&self) -> Option<Instant> {
        self.runtime.as_ref()?.fast.due()
    }

    fn plan(&mut self, rendered: &[Rendered], registry: &Registry) -> Result<FakePlan, String> {
        let h = self.runtime.as_mut().ok_or("the fake always reloads")?;
        let new = String::from_utf8_lossy(&rendered[0].bytes).into_owned();
        h.fast.prove(registry, &new);
        let files = runtime::plan(&h.disk, &new).map_err(|e| e.0);
        let after = h
            .fast
            .closing(registry, files.as_deref().map_err(String::as_str));
        files.map(|cmds| FakePlan { cmds, after })
    }

    async fn commit(
        &mut self,
        rendered: &[Rendered],
        plan: Option<FakePlan>,
    ) -> Result<Committed, DeployError> {
        let r = &rendered[0];
        let text = String::from_utf8_lossy(&r.bytes).into_owned();
        self.commits.lock().expect("lock").push(text.clone());
        let fail = |source| DeployError::Install {
            template: r.template.name.clone(),
            dest: r.template.dest.clone(),
            source,
        };
        let error = match self.script.pop_front() {
            None => None,
            Some(Step::DiskFull) => Some(fail(InstallError::Io {
                action: "cannot write a staged copy of",
                path: r.template.dest.clone(),
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            })),
            Some(Step::Blame(needle)) => {
                let line = text
                    .lines()
                    .position(|l| l.contains(needle))
                    .expect("the blamed text is rendered")
                    + 1;
                Some(fail(InstallError::Invalid(ValidateError::Rejected {
                    file: STAGED.into(),
                    code: 1,
                    output: format!("[ALERT] (1) : config : [{STAGED}:{line}] : bad line"),
                })))
            }
        };
        if let Some(e) = error {
            // As the deployer: the previous file stays, and HAProxy is put back to it.
            if let Some(h) = self.runtime.as_mut()
                && h.fast.failed(e.disk().is_some())
            {
                h.realign();
            }
            return Err(e);
        }
        self.installed = true;
        let Some(h) = self.runtime.as_mut() else {
            return Ok(Committed {
                kind: ApplyKind::Reload,
                changed: vec![r.template.name.clone()],
                install_time: Duration::ZERO,
            });
        };
        let ahead = h.fast.served().is_some();
        let unchanged = h.disk == text;
        h.events.push("install");
        h.disk = text;
        let kind = match plan {
            Some(FakePlan { cmds, .. }) if unchanged && !ahead && cmds.is_empty() => {
                ApplyKind::None
            }
            Some(FakePlan { cmds, after }) => {
                match after.map(|a| h.fast.after_install(a, Some(h.seen))) {
                    Some(After::Send(c)) => h.apply(&c),
                    Some(After::Realign) => h.realign(),
                    None => h.apply(&cmds),
                }
                ApplyKind::Runtime
            }
            None => {
                h.events.push("reload");
                h.servers = servers_of(&h.disk);
                ApplyKind::Reload
            }
        };
        h.fast.committed(Some(h.seen));
        Ok(Committed {
            kind,
            changed: vec![r.template.name.clone()],
            install_time: Duration::ZERO,
        })
    }
}

const TEMPLATE: &str = "\
global
    maxconn 100
{% for s in services %}
backend {{ s.backend }}
{%- for i in s.slots %}
{%- if i is string %}
    server {{ i }} 127.0.0.1:1 disabled
{%- else %}
    server {{ i.name }} {{ i.addr }}  # {{ i.id }}
{%- endif %}
{%- endfor %}
{% endfor %}";

/// An applier over a fake that follows `script`, its config in a fresh directory (the guard
/// writes its file there), and the log of its commits.
fn applier(script: Vec<Step>) -> (Applier<Fake>, Arc<Mutex<Vec<String>>>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path().display();
    let text = format!(
        "[source]\nkind = \"file\"\n[file]\npath = \"{d}/registry.yaml\"\n\
         [[template]]\nname = \"haproxy\"\nsrc = \"{d}/haproxy.cfg.tera\"\ndest = \"{d}/haproxy.cfg\"\ncheck = true\n\
         [haproxy]\nmode = \"none\"\nspare_slots = 0\n\
         [guard]\nmax_drop_percent = 50\nconfirm_after = \"10m\"\n"
    );
    let config = Config::parse(&text, "test").expect("config");
    let templates =
        Templates::from_sources(&config, [(&config.templates[0], TEMPLATE)]).expect("templates");
    let commits = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        script: script.into(),
        commits: Arc::clone(&commits),
        installed: false,
        runtime: None,
    };
    let applier = Applier::with_deploy(config, templates, Arc::default(), fake);
    (applier, commits, dir)
}

/// An update of `(service, instance, port)` instances.
fn update(revision: i64, instances: &[(&str, &str, u16)]) -> Update {
    let pairs: Vec<(String, String)> = instances
        .iter()
        .map(|(s, i, port)| (format!("/services/{s}/{i}"), format!("127.0.0.1:{port}")))
        .collect();
    let (snapshot, rejected) = Snapshot::screen(revision, &["/services/".to_owned()], pairs);
    assert!(rejected.is_empty(), "{rejected:?}");
    Update {
        snapshot: Arc::new(snapshot),
        rejected,
    }
}

fn last(commits: &Mutex<Vec<String>>) -> String {
    commits
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default()
}

fn servers(text: &str, backend: &str) -> usize {
    text.split(&format!("backend {backend}\n"))
        .nth(1)
        .map_or(0, |rest| {
            rest.lines()
                .take_while(|l| l.starts_with("    server "))
                .count()
        })
}

#[tokio::test(start_paused = true)]
async fn an_install_that_failed_on_the_disk_is_retried_with_backoff_until_it_lands() {
    let (mut a, commits, _dir) = applier(vec![Step::DiskFull, Step::DiskFull]);
    let u = update(1, &[("web", "w1", 8001)]);
    assert!(a.wakeup().is_none());

    let e = a.apply(&u).await.expect_err("the disk is full");
    assert!(e.to_string().contains("disk full"), "{e}");
    let first = a.wakeup().expect("a retry") - Instant::now();
    assert!(
        (800..=1200).contains(&first.as_millis()),
        "the first retry comes after 1 s ± 20 %: {first:?}"
    );
    let detail = a.metrics().install_detail().expect("/readyz says why");
    assert!(detail.contains("disk full"), "{detail}");

    tokio::time::sleep(first).await;
    a.apply(&u).await.expect_err("still full");
    let second = a.wakeup().expect("another retry") - Instant::now();
    assert!(
        (1600..=2400).contains(&second.as_millis()),
        "the backoff doubles: {second:?}"
    );

    tokio::time::sleep(second).await;
    let report = a.apply(&u).await.expect("the disk has room again");
    assert_eq!(report.kind, ApplyKind::Reload);
    assert_eq!(report.changed, ["haproxy"]);
    assert!(a.wakeup().is_none(), "no retry once the state landed");
    assert!(a.metrics().install_detail().is_none());
    assert_eq!(commits.lock().expect("lock").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_failure_a_retry_would_only_repeat_ends_the_retries() {
    // The second failure is `haproxy -c` on a line of no service: retrying the same state
    // cannot help, and the next change applies again.
    let (mut a, _commits, _dir) = applier(vec![Step::DiskFull, Step::Blame("maxconn")]);
    let u = update(1, &[("web", "w1", 8001)]);
    a.apply(&u).await.expect_err("the disk is full");
    assert!(a.wakeup().is_some());
    let e = a.apply(&u).await.expect_err("haproxy -c fails");
    assert!(e.to_string().contains("bad line"), "{e}");
    assert!(
        a.wakeup().is_none(),
        "no retry of a state haproxy -c rejects"
    );
}

#[tokio::test(start_paused = true)]
async fn a_collapsing_service_is_held_until_confirm_after_and_the_wakeup_releases_it() {
    let (mut a, commits, _dir) = applier(Vec::new());
    let four: Vec<(&str, &str, u16)> = ["w1", "w2", "w3", "w4"]
        .iter()
        .zip(8001..)
        .map(|(i, p)| ("web", *i, p))
        .collect();
    let report = a.apply(&update(1, &four)).await.expect("applied");
    assert!(report.held.is_empty());
    assert_eq!(servers(&last(&commits), "be_web"), 4);

    let one = update(2, &four[..1]);
    let t0 = Instant::now();
    let report = a.apply(&one).await.expect("applied, held");
    assert_eq!(report.held, ["web"]);
    assert_eq!(
        servers(&last(&commits), "be_web"),
        4,
        "the held service keeps its last applied instances"
    );
    assert_eq!(
        a.wakeup(),
        Some(t0 + Duration::from_secs(600)),
        "the applier wakes when the hold expires"
    );

    tokio::time::advance(Duration::from_secs(600)).await;
    let report = a.apply(&one).await.expect("applied");
    assert!(report.held.is_empty(), "{:?}", report.held);
    assert_eq!(servers(&last(&commits), "be_web"), 1);
    assert!(a.wakeup().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_service_whose_lines_haproxy_c_blames_is_held_back_and_the_rest_applies() {
    let (mut a, commits, _dir) = applier(Vec::new());
    let before = update(1, &[("api", "a1", 9001), ("web", "w1", 8001)]);
    a.apply(&before).await.expect("applied");

    // The new web line is blamed: web stays as it was, api changes.
    a.deploy.script.push_back(Step::Blame("127.0.0.1:8002"));
    let after = update(2, &[("api", "a1", 9002), ("web", "w1", 8002)]);
    let report = a.apply(&after).await.expect("applied without web's change");
    assert_eq!(report.held_back, ["/services/web/w1"]);
    let text = last(&commits);
    assert!(text.contains("127.0.0.1:9002"), "{text}");
    assert!(text.contains("127.0.0.1:8001"), "{text}");
    assert!(!text.contains("127.0.0.1:8002"), "{text}");
    assert_eq!(
        a.metrics().held(),
        (Vec::new(), vec!["/services/web/w1".to_owned()])
    );

    // A blamed line that belongs to no service cannot be isolated: the apply fails whole.
    a.deploy.script.push_back(Step::Blame("maxconn"));
    let again = update(3, &[("api", "a1", 9003), ("web", "w1", 8001)]);
    a.apply(&again).await.expect_err("nothing to isolate");
    assert!(last(&commits).contains("127.0.0.1:9003"));
}

#[tokio::test(start_paused = true)]
async fn an_empty_registry_before_the_first_apply_commits_nothing_over_an_installed_file() {
    let (mut a, commits, _dir) = applier(Vec::new());
    a.deploy.installed = true;
    let report = a.apply(&update(1, &[])).await.expect("held");
    assert_eq!(report.kind, ApplyKind::None);
    assert!(
        commits.lock().expect("lock").is_empty(),
        "nothing reached the deployer"
    );
    assert!(a.wakeup().is_some(), "the hold expires by itself");
    a.confirm();
    assert!(a.wakeup().is_none());
    a.apply(&update(1, &[])).await.expect("confirmed");
    assert_eq!(commits.lock().expect("lock").len(), 1);
}
