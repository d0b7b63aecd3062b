//! `ParseCache`: the registry parsed again only where the keys of a snapshot changed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::registry::{owner, parse_named, scan};
use super::{ROUTES_PREFIX, Registry, Rejection, SERVICES_PREFIX, Service, Snapshot};
/// Parsed services kept between parses of successive snapshots: a service whose keys (and
/// route) did not change is reused as it is, `Arc` and all, so a change to one service costs
/// the parse of one service. Downstream caches (slots, tera values) recognise reused services
/// by pointer.
#[derive(Debug, Default)]
pub struct ParseCache {
    prev: Option<Arc<Snapshot>>,
    /// Per service name: the service as parsed from `prev` (None when none of its keys
    /// parsed), and its keys that were left out.
    services: BTreeMap<String, (Option<Arc<Service>>, Vec<Rejection>)>,
    /// Registry keys of `prev` that belong to no service: the wrong shape.
    stray: Vec<Rejection>,
}

impl ParseCache {
    /// Keeps `slotted` (the same parse with its server slots) in place of the cached service
    /// `parsed` points to, so that one copy of the service lives instead of two. Only the
    /// cached `Arc` itself is replaced (`parsed` is compared, never read): a service the guard
    /// held back is another `Arc`, and the cache keeps what the keys say.
    pub fn adopt(&mut self, parsed: *const Service, slotted: &Arc<Service>) {
        if let Some((Some(s), _)) = self.services.get_mut(&slotted.name)
            && std::ptr::eq(Arc::as_ptr(s), parsed)
        {
            *s = Arc::clone(slotted);
        }
    }

    /// The registry the cache holds, with every key left out.
    fn registry(&self) -> (Registry, Vec<Rejection>) {
        let services = self
            .services
            .values()
            .filter_map(|(s, _)| s.clone())
            .collect();
        let mut rejected = self.stray.clone();
        for (_, r) in self.services.values() {
            rejected.extend(r.iter().cloned());
        }
        (Registry { services }, rejected)
    }
}

impl Registry {
    /// Parses the registry keys of a snapshot. Other keys are ignored (custom templates may read
    /// them through the raw functions); bad registry keys are returned as rejections.
    pub fn parse(snapshot: &Snapshot) -> (Registry, Vec<Rejection>) {
        let mut cache = ParseCache::default();
        Self::parse_into(snapshot, None, &mut cache);
        cache.registry()
    }

    /// [`Registry::parse`], reusing the services of the previous call whose keys did not change.
    pub fn parse_cached(
        snapshot: &Arc<Snapshot>,
        cache: &mut ParseCache,
    ) -> (Registry, Vec<Rejection>) {
        let prev = cache.prev.take();
        Self::parse_into(snapshot, prev.as_deref(), cache);
        cache.prev = Some(Arc::clone(snapshot));
        cache.registry()
    }

    /// Brings `cache` from `prev` (what it holds, if anything) to `snapshot`: with `prev`, only
    /// the services with a differing key are parsed again; [`imbl::OrdMap::diff`], which skips
    /// the nodes both snapshots share, finds them.
    fn parse_into(snapshot: &Snapshot, prev: Option<&Snapshot>, cache: &mut ParseCache) {
        let names: BTreeSet<String> = match prev {
            Some(p) => {
                let mut names = BTreeSet::new();
                let mut stray = false;
                for item in p.kv.diff(&snapshot.kv) {
                    let key = match item {
                        imbl::ordmap::DiffItem::Add(k, _)
                        | imbl::ordmap::DiffItem::Remove(k, _)
                        | imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
                    };
                    if !(key.starts_with(SERVICES_PREFIX) || key.starts_with(ROUTES_PREFIX)) {
                        continue;
                    }
                    match owner(key) {
                        Some(name) => {
                            if !names.contains(name) {
                                names.insert(name.to_owned());
                            }
                        }
                        None => stray = true,
                    }
                }
                if stray {
                    cache.stray = scan(snapshot).0;
                }
                names
            }
            None => {
                let (stray, names) = scan(snapshot);
                cache.stray = stray;
                cache.services.clear();
                names.into_iter().map(str::to_owned).collect()
            }
        };
        for name in names {
            match parse_named(snapshot, &name) {
                Some(entry) => {
                    cache.services.insert(name, entry);
                }
                None => {
                    cache.services.remove(&name);
                }
            }
        }
    }
}
