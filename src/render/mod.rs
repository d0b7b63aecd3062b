//! Rendering: `(Snapshot, Registry, settings) → bytes` for every configured template.
//!
//! Pure apart from loading the template sources in [`Templates::load`]: rendering reads no file,
//! no clock and no environment (the environment for `getenv` is captured at load time, and
//! refreshed with the templates on SIGHUP).

pub mod fields;
pub mod functions;
pub mod structure;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use tera::{Context, Tera, Value};

use crate::config::{Config, FrontendConfig, TemplateConfig};
use crate::model::{Instance, Registry, Service, Snapshot};
use fields::Fields;

/// A template that cannot be loaded or rendered. The message carries tera's report, which names
/// the template file, line and column.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("cannot read template {name:?} from {path}: {source}")]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("template {name:?} ({path}) does not parse:\n{report}")]
    Parse {
        name: String,
        path: PathBuf,
        report: String,
    },
    #[error(
        "template {name:?} ({path}): line {line} of the output is `{directive}`, which only the template's own text may write (the template has it {in_template} time(s)); refusing the render"
    )]
    Structure {
        name: String,
        path: PathBuf,
        directive: &'static str,
        line: usize,
        in_template: usize,
    },
    #[error("template {name:?} ({path}) failed to render:\n{report}")]
    Render {
        name: String,
        path: PathBuf,
        report: String,
    },
}

/// What the templates see besides the registry: `haproxy.*`.
#[derive(Debug, Clone, Serialize)]
pub struct HaproxyView {
    pub master_socket: String,
    pub runtime_socket: String,
    pub state_file: String,
    pub spare_slots: u32,
}

/// Per service, the last `Service` converted and its tera value. Converting the whole
/// registry to tera values is a third of a render at 2,000 services; a change touches one or
/// two, so the others are reused (tera values share their maps by `Arc`). A service reused by
/// the parse cache is the same `Arc`; any other is compared by value.
/// The map is kept and updated in place: a render touches the entries of the services that
/// changed, not a new map with a key per service (10,000 strings per render at 10,000x10).
#[derive(Default)]
struct ValueCache {
    by_backend: HashMap<String, Cached>,
    /// Counts renders; an entry not seen by the current one belongs to a service that is gone.
    generation: u64,
}

struct Cached {
    service: Arc<Service>,
    value: Value,
    seen: u64,
}

impl ValueCache {
    fn services(&mut self, services: &[Arc<Service>], fields: Fields) -> Value {
        self.generation += 1;
        let generation = self.generation;
        let values: Vec<Value> = services
            .iter()
            .map(|s| match self.by_backend.get_mut(&s.backend) {
                Some(c) => {
                    if !Arc::ptr_eq(&c.service, s) {
                        if *c.service != **s {
                            c.value = service_value(s, fields);
                        }
                        c.service = Arc::clone(s);
                    }
                    c.seen = generation;
                    c.value.clone()
                }
                None => {
                    let value = service_value(s, fields);
                    let cached = Cached {
                        service: Arc::clone(s),
                        value: value.clone(),
                        seen: generation,
                    };
                    self.by_backend.insert(s.backend.clone(), cached);
                    value
                }
            })
            .collect();
        // Backends are unique: more entries than services means some services are gone.
        if self.by_backend.len() > services.len() {
            self.by_backend.retain(|_, c| c.seen == generation);
        }
        Value::from(values)
    }
}

/// A map value whose keys are static strings, where `Value::from_serializable` allocates a key
/// per field per instance. tera is built with `preserve_order`: an attribute (`i.addr`, 20,000
/// lookups per render at 2,000x10) is found by scanning a few contiguous entries, where a
/// hashed map cost two or three cache misses per lookup, a third of the render.
fn map<const N: usize>(fields: [(&'static str, Value); N]) -> Value {
    let mut m = tera::Map::with_capacity(N);
    for (k, v) in fields {
        m.insert(k.into(), v);
    }
    Value::from(m)
}

static EMPTY_MAP: std::sync::LazyLock<Value> =
    std::sync::LazyLock::new(|| Value::from(BTreeMap::<String, Value>::new()));

fn strings(list: &[String]) -> Value {
    Value::from(
        list.iter()
            .map(|s| Value::from(s.as_str()))
            .collect::<Vec<_>>(),
    )
}

/// Field `n` of [`fields::INSTANCE_FIELDS`] of an instance, built only for the fields the
/// templates name (a string over 21 bytes is an allocation in tera).
fn instance_field(i: &Instance, n: usize) -> Value {
    match n {
        0 => Value::from(i.id.as_str()),
        1 => Value::from(i.name.as_str()),
        2 => Value::from(i.host.as_str()),
        3 => Value::from(i.port),
        4 => Value::from(i.addr.as_str()),
        5 => Value::from(i.weight),
        6 => Value::from(i.state.as_str()),
        // Most instances have no meta: they share one empty map instead of an allocation each
        // (2 MB at 2,000x10).
        _ if i.meta.is_empty() => EMPTY_MAP.clone(),
        _ => Value::from(
            i.meta
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect::<BTreeMap<String, Value>>(),
        ),
    }
}

/// The template value of a service: what `Value::from_serializable` makes of it (a test holds
/// the two equal), built by hand, except `slots`: each is the instance in that slot, or the
/// server name of a free slot; and instances hold only the `fields` the templates read.
fn service_value(s: &Service, fields: Fields) -> Value {
    let route = s.route.as_ref().map(|r| {
        map([
            ("hosts", strings(&r.hosts)),
            ("paths", strings(&r.paths)),
            ("balance", Value::from(r.balance.as_str())),
            ("check", Value::from(r.check.as_deref())),
        ])
    });
    let instances: Vec<Value> = s
        .instances
        .iter()
        .map(|i| {
            let mut m = tera::Map::with_capacity(fields.count());
            for (n, name) in fields::INSTANCE_FIELDS.iter().enumerate() {
                if fields.has(n) {
                    m.insert((*name).into(), instance_field(i, n));
                }
            }
            Value::from(m)
        })
        .collect();
    // A slot is the instance in it (the same value, shared) or, when free, its server name: a
    // map per slot doubled the memory of the template values.
    let slots: Vec<Value> = s
        .slots
        .iter()
        .map(|slot| match slot.instance.and_then(|i| instances.get(i)) {
            Some(i) => i.clone(),
            None => Value::from(slot.name.as_str()),
        })
        .collect();
    map([
        ("name", Value::from(s.name.as_str())),
        ("backend", Value::from(s.backend.as_str())),
        ("route", Value::from(route)),
        ("instances", Value::from(instances)),
        ("slots", Value::from(slots)),
    ])
}

/// The loaded templates, ready to render.
pub struct Templates {
    tera: Tera,
    list: Vec<TemplateConfig>,
    /// Per template, how often each guarded directive appears in its source.
    allowed: Vec<BTreeMap<&'static str, usize>>,
    values: ValueCache,
    /// The instance fields the templates name: the only ones their values hold.
    fields: Fields,
    /// Per template, the size of its last render: the next one is written into a buffer of
    /// about that size, where a growing one was copied at each doubling (10 MB of copies and
    /// page faults per render of a 5 MB file at 10,000x10).
    sizes: Vec<usize>,
    frontend: FrontendConfig,
    haproxy: HaproxyView,
    env: Arc<BTreeMap<String, String>>,
    /// `files.<template name>`: where each template is installed (`map(...)` needs it).
    files: BTreeMap<String, String>,
}

impl Templates {
    /// Reads and parses every template of `config`.
    pub fn load(config: &Config) -> Result<Templates, RenderError> {
        let mut sources = Vec::with_capacity(config.templates.len());
        for t in &config.templates {
            let text = std::fs::read_to_string(&t.src).map_err(|source| RenderError::Read {
                name: t.name.clone(),
                path: t.src.clone(),
                source,
            })?;
            sources.push((t, text));
        }
        Self::from_sources(config, sources.iter().map(|(t, s)| (*t, s.as_str())))
    }

    /// Parses templates from text already read (`load` and tests).
    pub fn from_sources<'a>(
        config: &Config,
        sources: impl IntoIterator<Item = (&'a TemplateConfig, &'a str)>,
    ) -> Result<Templates, RenderError> {
        let mut tera = Tera::new();
        functions::register_filters(&mut tera);
        // Register the functions once with an empty snapshot so that parsing knows the names.
        functions::register_functions(
            &mut tera,
            &Arc::new(Snapshot::default()),
            &Arc::new(BTreeMap::new()),
        );
        let mut list = Vec::new();
        let mut allowed = Vec::new();
        let mut texts = Vec::new();
        for (t, text) in sources {
            allowed.push(structure::count(text));
            texts.push(text);
            // The template's file name is its tera name, so errors point at the file.
            tera.add_raw_template(&tera_name(t), text)
                .map_err(|e| RenderError::Parse {
                    name: t.name.clone(),
                    path: t.src.clone(),
                    report: report(&e),
                })?;
            list.push(t.clone());
        }
        let h = &config.haproxy;
        Ok(Templates {
            tera,
            list,
            allowed,
            values: ValueCache::default(),
            fields: Fields::read_by(texts),
            sizes: Vec::new(),
            frontend: config.frontend.clone(),
            haproxy: HaproxyView {
                master_socket: h.master_socket.display().to_string(),
                runtime_socket: h.runtime_socket.display().to_string(),
                state_file: h.state_file.display().to_string(),
                spare_slots: h.spare_slots,
            },
            env: Arc::new(std::env::vars().collect()),
            files: config
                .templates
                .iter()
                .map(|t| (t.name.clone(), t.dest.display().to_string()))
                .collect(),
        })
    }

    /// Free server slots each backend gets at a reload (`[haproxy] spare_slots`).
    pub fn spare_slots(&self) -> usize {
        self.haproxy.spare_slots as usize
    }

    /// Renders every template over one snapshot and its registry, in config order.
    pub fn render_all(
        &mut self,
        snapshot: &Arc<Snapshot>,
        registry: &Registry,
    ) -> Result<Vec<Rendered>, RenderError> {
        functions::register_functions(&mut self.tera, snapshot, &self.env);
        let mut ctx = Context::new();
        ctx.insert_value(
            "services",
            self.values.services(&registry.services, self.fields),
        );
        ctx.insert("frontend", &self.frontend);
        ctx.insert("haproxy", &self.haproxy);
        ctx.insert("files", &self.files);
        ctx.insert("revision", &snapshot.revision);
        let mut out = Vec::with_capacity(self.list.len());
        self.sizes.resize(self.list.len(), 0);
        for ((t, allowed), size) in self.list.iter().zip(&self.allowed).zip(&mut self.sizes) {
            // A change rarely moves the size by more than a few lines: 1/64 more, and a page.
            let mut bytes = Vec::with_capacity(*size + *size / 64 + 4096);
            let rendered = self.tera.render_to(&tera_name(t), &ctx, &mut bytes);
            rendered.map_err(|e| RenderError::Render {
                name: t.name.clone(),
                path: t.src.clone(),
                report: report(&e),
            })?;
            *size = bytes.len();
            // Values are strings and templates are text: a render is UTF-8, checked here as
            // tera's `render` did.
            let text = std::str::from_utf8(&bytes).map_err(|e| RenderError::Render {
                name: t.name.clone(),
                path: t.src.clone(),
                report: format!("the output is not UTF-8: {e}"),
            })?;
            // A map file is data HAProxy looks up, never config lines: a host named `user` or
            // `global` is no directive there.
            let allowed = if t.map { None } else { Some(allowed) };
            allowed
                .map_or(Ok(()), |a| structure::check(a, text))
                .map_err(|v| RenderError::Structure {
                    name: t.name.clone(),
                    path: t.src.clone(),
                    directive: v.directive,
                    line: v.line,
                    in_template: v.in_template,
                })?;
            out.push(Rendered {
                template: t.clone(),
                bytes,
            });
        }
        Ok(out)
    }
}

/// The renders a command shows: the one named by `--template`, or every one; with `one` (a
/// print, which writes one file's bytes), the HAProxy file when there are several. The error
/// is the usage problem, for the operator.
pub fn choose<'a>(
    rendered: &'a [Rendered],
    config: &Config,
    name: Option<&str>,
    one: bool,
) -> Result<Vec<&'a Rendered>, String> {
    let mut chosen: Vec<&Rendered> = match name {
        Some(n) => {
            if config.template(n).is_none() {
                let names: Vec<&str> = config.templates.iter().map(|t| t.name.as_str()).collect();
                return Err(format!(
                    "--template {n:?}: no [[template]] has that name (configured: {})",
                    names.join(", ")
                ));
            }
            rendered.iter().filter(|r| r.template.name == n).collect()
        }
        None => rendered.iter().collect(),
    };
    if one && chosen.len() > 1 {
        // Several files (a host map beside haproxy.cfg): the HAProxy one.
        if let Some(main) = config.haproxy_template() {
            chosen.retain(|r| r.template.name == main.name);
        }
        if chosen.len() > 1 {
            return Err(format!(
                "{} templates are configured: choose one with --template",
                chosen.len()
            ));
        }
    }
    Ok(chosen)
}

/// One rendered file, not yet installed.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub template: TemplateConfig,
    pub bytes: Vec<u8>,
}

fn tera_name(t: &TemplateConfig) -> String {
    t.src.display().to_string()
}

/// tera's errors print a report with the file, line and column; keep the whole cause chain.
fn report(e: &tera::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!("\ncaused by: {s}"));
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, Route, Slot, State};

    #[test]
    fn the_value_cache_follows_the_services_and_reuses_unchanged_ones() {
        let service = |name: &str, port: u16| {
            Arc::new(Service {
                name: name.into(),
                backend: format!("be_{name}"),
                route: None,
                instances: vec![Instance {
                    id: "a".into(),
                    name: "srv1".into(),
                    host: "127.0.0.1".into(),
                    port,
                    addr: format!("127.0.0.1:{port}"),
                    weight: 1,
                    state: State::Ready,
                    meta: Default::default(),
                }],
                slots: vec![Slot {
                    name: "srv1".into(),
                    instance: Some(0),
                }],
            })
        };
        let values = |v: Value| -> Vec<Value> { v.as_array().expect("array").to_vec() };
        let mut cache = ValueCache::default();
        let (a, b) = (service("a", 1), service("b", 2));
        let first = values(cache.services(&[Arc::clone(&a), Arc::clone(&b)], Fields::ALL));
        assert_eq!(
            first,
            [
                service_value(&a, Fields::ALL),
                service_value(&b, Fields::ALL)
            ]
        );
        // b changes, c comes, a goes; an equal copy of an unchanged service is no change.
        let (b2, c) = (service("b", 3), service("c", 4));
        let again = values(cache.services(&[Arc::clone(&b2), Arc::clone(&c)], Fields::ALL));
        assert_eq!(
            again,
            [
                service_value(&b2, Fields::ALL),
                service_value(&c, Fields::ALL)
            ]
        );
        assert_eq!(cache.by_backend.len(), 2);
        assert!(!cache.by_backend.contains_key("be_a"));
        let copy = service("c", 4);
        let third = values(cache.services(&[Arc::clone(&b2), Arc::clone(&copy)], Fields::ALL));
        assert_eq!(third, again);
        assert!(Arc::ptr_eq(&cache.by_backend["be_c"].service, &copy));
    }

    #[test]
    fn hand_built_values_equal_serialized_ones() {
        let instance = |id: &str, state| Instance {
            id: id.into(),
            name: format!("srv-{id}"),
            host: "127.0.0.1".into(),
            port: 8080,
            addr: "127.0.0.1:8080".into(),
            weight: 7,
            state,
            meta: [("zone".to_owned(), "a".to_owned())].into(),
        };
        for route in [
            None,
            Some(Route {
                hosts: vec!["a.test".into(), "b.test".into()],
                paths: vec!["/api".into()],
                balance: "leastconn".into(),
                check: Some("/health".into()),
            }),
            Some(Route {
                hosts: vec![],
                paths: vec![],
                balance: "roundrobin".into(),
                check: None,
            }),
        ] {
            let s = Service {
                name: "web".into(),
                backend: "be_web".into(),
                route,
                instances: vec![
                    instance("a", State::Ready),
                    instance("b", State::Maint),
                    Instance {
                        meta: Default::default(),
                        ..instance("c", State::Drain)
                    },
                ],
                slots: vec![
                    Slot {
                        name: "srv1".into(),
                        instance: Some(1),
                    },
                    Slot {
                        name: "srv2".into(),
                        instance: None,
                    },
                ],
            };
            let value = service_value(&s, Fields::ALL);
            let mut plain = s.clone();
            plain.slots.clear();
            assert_eq!(
                service_value(&plain, Fields::ALL),
                Value::from_serializable(&plain),
                "{s:?}"
            );
            // Slots: the instance itself, or a free slot's name.
            let mut tera = Tera::new();
            let t = "{% for x in s.slots %}{% if x is string %}free {{ x }}{% else %}{{ x.name }} {{ x.id }}{% endif %};{% endfor %}";
            tera.add_raw_template("t", t).expect("parses");
            let mut ctx = Context::new();
            ctx.insert_value("s", value);
            assert_eq!(
                tera.render("t", &ctx).expect("renders"),
                "srv-b b;free srv2;"
            );
        }
    }
}
