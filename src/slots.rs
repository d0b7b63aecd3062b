//! Server slots: which `server` line of its backend each instance occupies.
//!
//! An instance keeps its slot (`srv<N>`) for as long as it lives, and a new instance takes a
//! free slot, so a change that only adds, removes or moves instances changes only the address,
//! weight and `disabled` of existing server lines: the Runtime API can apply it without a
//! reload. Free slots are regrown to `spare` per backend at every reload, and trailing free
//! slots beyond that are trimmed.

use std::collections::HashMap;
use std::sync::Arc;

use crate::model::{Registry, Service, Slot};

/// The slot layout of every backend, kept across applies.
#[derive(Debug, Default, Clone)]
pub struct Slots {
    /// Per backend, what the service last given to `assign` became, and whether that pass
    /// regrew its slots. Its `slots` are the backend's table (slot → instance id): no copy of
    /// the ids is kept beside it. The same service (the parse cache adopts each slotted service
    /// and hands out that `Arc` while its keys do not change) comes back without a look at its
    /// slots, so an apply touches only the services that changed, and the render's value cache
    /// sees the same `Arc` for every other one.
    last: HashMap<String, Memo>,
}

#[derive(Debug, Clone)]
struct Memo {
    /// Not the parsed service it came from: once adopted, that one would be a second copy of
    /// the service, alive for nothing.
    output: Arc<Service>,
    regrown: bool,
}

impl Slots {
    /// Assigns every instance of `registry` a slot and fills `Service::slots` and
    /// `Instance::name`. With `regrow`, each backend ends with exactly `spare` free slots
    /// beyond its last occupied one (at least), so the structure may change; without it, slots
    /// are only added when a backend has no free one left.
    pub fn assign(&mut self, registry: &mut Registry, spare: usize, regrow: bool) {
        self.assign_adopting(registry, spare, regrow, |_, _| {});
    }

    /// [`Slots::assign`], calling `adopt(parsed, slotted)` for each service as soon as it is
    /// slotted anew, so that a parse cache keeps the slotted service in place of the parsed
    /// one (`ParseCache::adopt`) and hands it out next time: the parsed copy is freed at once,
    /// not after every service was slotted (during a burst that changes half the backends,
    /// both copies of each of them were alive at once).
    pub fn assign_adopting(
        &mut self,
        registry: &mut Registry,
        spare: usize,
        regrow: bool,
        mut adopt: impl FnMut(*const Service, &Arc<Service>),
    ) {
        if regrow {
            // Backends that no longer exist lose their slots at a reload.
            let live: std::collections::HashSet<&str> = registry
                .services
                .iter()
                .map(|s| s.backend.as_str())
                .collect();
            self.last.retain(|b, _| live.contains(b.as_str()));
        }
        for service in &mut registry.services {
            let memo = self.last.get(&service.backend);
            // A service seen last time comes out as it did then: its slots have not moved
            // since (only this function moves them), unless this pass regrows slots the last
            // one did not. The parse cache adopts slotted services: an unchanged one is what
            // it became.
            if let Some(m) = memo
                && Arc::ptr_eq(&m.output, service)
                && (m.regrown || !regrow)
            {
                continue;
            }
            let layout = layout(memo.map(|m| &*m.output), service, spare, regrow);
            // Touch the service only when its layout changed, so that an unchanged service
            // stays shared with the previous registry (and with the render's value cache).
            let same = service.slots.len() == layout.len()
                && service.slots.iter().zip(&layout).all(|(slot, want)| {
                    slot.instance == *want
                        && want.is_none_or(|i| service.instances[i].name == slot.name)
                });
            if !same {
                // Identifies the parsed service for `adopt`, without holding it: a service no
                // one else holds is slotted in place, not copied.
                let parsed = Arc::as_ptr(service);
                let slots: Vec<Slot> = layout
                    .iter()
                    .enumerate()
                    .map(|(n, instance)| Slot {
                        name: format!("srv{}", n + 1),
                        instance: *instance,
                    })
                    .collect();
                let slotted = Arc::make_mut(service);
                for slot in &slots {
                    if let Some(i) = slot.instance {
                        slotted.instances[i].name = slot.name.clone();
                    }
                }
                slotted.slots = slots;
                adopt(parsed, service);
            }
            let memo = Memo {
                output: Arc::clone(service),
                regrown: regrow,
            };
            match self.last.get_mut(&service.backend) {
                Some(m) => *m = memo,
                None => {
                    self.last.insert(service.backend.clone(), memo);
                }
            }
        }
    }
}

/// The slots of `service`, each an index into its instances or free, given `prev`, what the
/// backend's service became at the last pass: each instance still there keeps its slot, a
/// new one takes the first free slot (or a new one at the end).
fn layout(
    prev: Option<&Service>,
    service: &Service,
    spare: usize,
    regrow: bool,
) -> Vec<Option<usize>> {
    // Instances are sorted by id: find one by binary search, without a map.
    let instances = &service.instances;
    let find = |id: &str| instances.binary_search_by(|i| i.id.as_str().cmp(id)).ok();
    let mut placed = vec![false; instances.len()];
    let mut table: Vec<Option<usize>> = match prev {
        Some(p) => p
            .slots
            .iter()
            .map(|slot| {
                let i = find(&p.instances[slot.instance?].id)?;
                placed[i] = true;
                Some(i)
            })
            .collect(),
        None => Vec::new(),
    };
    for (i, _) in placed.iter().enumerate().filter(|(_, placed)| !**placed) {
        match table.iter_mut().find(|s| s.is_none()) {
            Some(free) => *free = Some(i),
            None => table.push(Some(i)),
        }
    }
    if regrow {
        let used = table.iter().rposition(Option::is_some).map_or(0, |p| p + 1);
        let free_inside = table[..used].iter().filter(|s| s.is_none()).count();
        let want = used + spare.saturating_sub(free_inside);
        table.resize(want.max(used), None);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Instance, Service, State};

    fn registry(ids: &[&str]) -> Registry {
        Registry {
            services: vec![Arc::new(Service {
                name: "web".into(),
                backend: "be_web".into(),
                route: None,
                instances: ids
                    .iter()
                    .map(|id| Instance {
                        id: (*id).into(),
                        name: (*id).into(),
                        host: "127.0.0.1".into(),
                        port: 8000,
                        addr: "127.0.0.1:8000".into(),
                        weight: 100,
                        state: State::Ready,
                        meta: Default::default(),
                    })
                    .collect(),
                slots: Vec::new(),
            })],
        }
    }

    fn layout(r: &Registry) -> Vec<String> {
        let s = &r.services[0];
        s.slots
            .iter()
            .map(|slot| match slot.instance {
                Some(i) => format!("{}={}", slot.name, s.instances[i].id),
                None => format!("{}=-", slot.name),
            })
            .collect()
    }

    #[test]
    fn instances_keep_their_slots_and_new_ones_fill_holes() {
        let mut slots = Slots::default();
        let mut r = registry(&["a", "b", "c"]);
        slots.assign(&mut r, 2, true);
        assert_eq!(
            layout(&r),
            ["srv1=a", "srv2=b", "srv3=c", "srv4=-", "srv5=-"]
        );
        assert_eq!(r.services[0].instances[1].name, "srv2");

        // b leaves, d arrives: d takes b's slot; nothing else moves; no regrow.
        let mut r = registry(&["a", "c", "d"]);
        slots.assign(&mut r, 2, false);
        assert_eq!(
            layout(&r),
            ["srv1=a", "srv2=d", "srv3=c", "srv4=-", "srv5=-"]
        );

        // Two more fill the spares; a third needs a new slot even without regrow.
        let mut r = registry(&["a", "c", "d", "e", "f", "g"]);
        slots.assign(&mut r, 2, false);
        assert_eq!(layout(&r).len(), 6);

        // A reload regrows two spares, and trims free slots beyond them.
        slots.assign(&mut r, 2, true);
        assert_eq!(layout(&r).len(), 8);
        let mut r = registry(&["a"]);
        slots.assign(&mut r, 2, true);
        assert_eq!(layout(&r), ["srv1=a", "srv2=-", "srv3=-"]);
    }

    #[test]
    fn an_unchanged_service_comes_back_as_the_same_arc() {
        let mut slots = Slots::default();
        let mut r = registry(&["a", "b"]);
        let parsed = Arc::clone(&r.services[0]);
        let mut adopted = Vec::new();
        slots.assign_adopting(&mut r, 2, true, |p, s| adopted.push((p, Arc::clone(s))));
        let slotted = Arc::clone(&r.services[0]);
        assert!(!Arc::ptr_eq(&parsed, &slotted), "slots were added");
        // The cache is told what the parsed service became.
        assert_eq!(adopted.len(), 1);
        assert!(std::ptr::eq(adopted[0].0, Arc::as_ptr(&parsed)));
        assert!(Arc::ptr_eq(&adopted[0].1, &slotted));
        drop(adopted);

        // What it became (the parse cache adopts it and hands it out while its keys do not
        // change) comes back as it is, with or without a regrow.
        let mut again = Registry {
            services: vec![Arc::clone(&slotted)],
        };
        slots.assign_adopting(&mut again, 2, false, |_, _| panic!("nothing to adopt"));
        assert!(Arc::ptr_eq(&again.services[0], &slotted));
        slots.assign(&mut again, 2, true);
        assert!(Arc::ptr_eq(&again.services[0], &slotted));

        // The parsed copy seen again (one the cache did not adopt: the guard held it back) is
        // slotted again, the same way.
        let mut held = Registry {
            services: vec![parsed],
        };
        slots.assign(&mut held, 2, true);
        assert_eq!(layout(&held), layout(&again));

        // A changed service is slotted afresh, keeping the layout.
        let mut changed = registry(&["a", "b", "c"]);
        slots.assign(&mut changed, 2, false);
        assert_eq!(layout(&changed), ["srv1=a", "srv2=b", "srv3=c", "srv4=-"]);
        // A regrow after a pass without one looks at the table again, for the same service.
        slots.assign(&mut changed, 2, true);
        assert_eq!(layout(&changed).len(), 5);
    }

    #[test]
    fn with_a_parse_cache_one_copy_of_each_service_lives() {
        use crate::model::{ParseCache, Snapshot};
        let snapshot = |ids: &[&str]| {
            let mut s = Snapshot::default();
            for id in ids {
                s.kv.insert(format!("/services/web/{id}"), "127.0.0.1:80".into());
            }
            Arc::new(s)
        };
        let mut cache = ParseCache::default();
        let mut slots = Slots::default();
        for (round, ids) in [&["a", "b"][..], &["a", "b", "c"], &["a", "c"]]
            .into_iter()
            .enumerate()
        {
            let (mut r, _) = Registry::parse_cached(&snapshot(ids), &mut cache);
            let parsed = Arc::downgrade(&r.services[0]);
            slots.assign_adopting(&mut r, 2, true, |p, s| cache.adopt(p, s));
            // The parsed copy is gone: the cache holds the slotted one in its place.
            assert!(parsed.upgrade().is_none(), "round {round}");
            let slotted = Arc::clone(&r.services[0]);
            drop(r);
            // The next parse of the same keys hands out the slotted service itself.
            let (mut r, _) = Registry::parse_cached(&snapshot(ids), &mut cache);
            assert!(Arc::ptr_eq(&r.services[0], &slotted), "round {round}");
            slots.assign_adopting(&mut r, 2, true, |_, _| panic!("nothing to adopt"));
            assert!(Arc::ptr_eq(&r.services[0], &slotted), "round {round}");
        }
    }
}
