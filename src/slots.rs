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

/// Slot tables per backend, kept across applies.
#[derive(Debug, Default, Clone)]
pub struct Slots {
    /// Per backend: slot index → instance id (None: free).
    tables: HashMap<String, Vec<Option<String>>>,
    /// Per backend, the service last given to `assign`, what it became, and whether that pass
    /// regrew the table. The same service (the parse cache hands out the same `Arc` for
    /// unchanged keys) gets the same slotted service back without a look at its slots, so an
    /// apply touches only the services that changed, and the render's value cache sees the
    /// same `Arc` for every other one.
    last: HashMap<String, Memo>,
}

#[derive(Debug, Clone)]
struct Memo {
    /// The parsed service, until [`Slots::forget_parsed`]: once the parse cache has adopted
    /// `output`, holding it would keep a second copy of every service alive.
    input: Option<Arc<Service>>,
    output: Arc<Service>,
    regrown: bool,
}

impl Slots {
    /// Assigns every instance of `registry` a slot and fills `Service::slots` and
    /// `Instance::name`. With `regrow`, each backend ends with exactly `spare` free slots
    /// beyond its last occupied one (at least), so the structure may change; without it, slots
    /// are only added when a backend has no free one left.
    pub fn assign(&mut self, registry: &mut Registry, spare: usize, regrow: bool) {
        if regrow {
            // Backends that no longer exist lose their tables at a reload.
            let live: std::collections::HashSet<&str> = registry
                .services
                .iter()
                .map(|s| s.backend.as_str())
                .collect();
            self.tables.retain(|b, _| live.contains(b.as_str()));
            self.last.retain(|b, _| live.contains(b.as_str()));
        }
        for service in &mut registry.services {
            // A service seen last time comes out as it did then: its table has not moved since
            // (only this function changes it), unless this pass regrows a table the last one
            // did not.
            // The same goes for what it became: the parse cache adopts slotted services.
            if let Some(m) = self.last.get(&service.backend)
                && (m.input.as_ref().is_some_and(|i| Arc::ptr_eq(i, service))
                    || Arc::ptr_eq(&m.output, service))
                && (m.regrown || !regrow)
            {
                *service = Arc::clone(&m.output);
                continue;
            }
            let input = Arc::clone(service);
            let table = match self.tables.get_mut(&service.backend) {
                Some(t) => t,
                None => self.tables.entry(service.backend.clone()).or_default(),
            };
            // Instances are sorted by id: find one by binary search, without a map.
            let instances = &service.instances;
            let find = |id: &str| instances.binary_search_by(|i| i.id.as_str().cmp(id)).ok();
            // Free the slots of instances that are gone; note who already has one.
            let mut placed = vec![false; service.instances.len()];
            for slot in table.iter_mut() {
                match slot.as_deref().map(find) {
                    Some(Some(i)) => placed[i] = true,
                    Some(None) => *slot = None,
                    None => {}
                }
            }
            for (i, inst) in service.instances.iter().enumerate() {
                if placed[i] {
                    continue;
                }
                match table.iter_mut().find(|s| s.is_none()) {
                    Some(free) => *free = Some(inst.id.clone()),
                    None => table.push(Some(inst.id.clone())),
                }
            }
            if regrow {
                let used = table.iter().rposition(Option::is_some).map_or(0, |p| p + 1);
                let free_inside = table[..used].iter().filter(|s| s.is_none()).count();
                let want = used + spare.saturating_sub(free_inside);
                table.resize(want.max(used), None);
            }
            // Touch the service only when its layout changed, so that an unchanged service
            // stays shared with the previous registry (and with the render's value cache).
            let same = service.slots.len() == table.len()
                && service.slots.iter().zip(table.iter()).all(|(slot, id)| {
                    let want = id.as_deref().and_then(find);
                    slot.instance == want
                        && want.is_none_or(|i| service.instances[i].name == slot.name)
                });
            if !same {
                let slots: Vec<Slot> = table
                    .iter()
                    .enumerate()
                    .map(|(n, id)| Slot {
                        name: format!("srv{}", n + 1),
                        instance: id.as_deref().and_then(find),
                    })
                    .collect();
                let service = Arc::make_mut(service);
                for slot in &slots {
                    if let Some(i) = slot.instance {
                        service.instances[i].name = slot.name.clone();
                    }
                }
                service.slots = slots;
            }
            let memo = Memo {
                input: Some(input),
                output: Arc::clone(service),
                regrown: regrow,
            };
            self.last.insert(service.backend.clone(), memo);
        }
    }
}

impl Slots {
    /// What `assign` made of `parsed` last time, if `parsed` is what it was given.
    pub fn slotted(&self, parsed: &Arc<Service>) -> Option<&Arc<Service>> {
        self.last
            .get(&parsed.backend)
            .filter(|m| m.input.as_ref().is_some_and(|i| Arc::ptr_eq(i, parsed)))
            .map(|m| &m.output)
    }

    /// Lets go of the parsed services `assign` was given, keeping what they became: call it
    /// once the parse cache has adopted the slotted services (`ParseCache::adopt` with
    /// [`Slots::slotted`]), which it hands out from then on. Until then each service lives
    /// twice, parsed and slotted: 5 MB of the heap at 2,000x10. A service the cache did not
    /// adopt (one the guard held back) is slotted again at the next apply: same layout, same
    /// result.
    pub fn forget_parsed(&mut self) {
        for m in self.last.values_mut() {
            m.input = None;
        }
    }
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
        slots.assign(&mut r, 2, true);
        let slotted = Arc::clone(&r.services[0]);
        assert!(!Arc::ptr_eq(&parsed, &slotted), "slots were added");

        // The parse cache hands out the same parsed service: the same slotted one comes back.
        let mut again = Registry {
            services: vec![Arc::clone(&parsed)],
        };
        slots.assign(&mut again, 2, false);
        assert!(Arc::ptr_eq(&again.services[0], &slotted));
        slots.assign(&mut again, 2, true);
        assert!(Arc::ptr_eq(&again.services[0], &slotted));

        // What it became comes back as it is too (the parse cache adopts slotted services).
        assert!(Arc::ptr_eq(slots.slotted(&parsed).expect("memo"), &slotted));
        let mut adopted = Registry {
            services: vec![Arc::clone(&slotted)],
        };
        slots.assign(&mut adopted, 2, true);
        assert!(Arc::ptr_eq(&adopted.services[0], &slotted));

        // A changed service is slotted afresh, keeping the layout.
        let mut changed = registry(&["a", "b", "c"]);
        let parsed = Arc::clone(&changed.services[0]);
        slots.assign(&mut changed, 2, false);
        assert_eq!(layout(&changed), ["srv1=a", "srv2=b", "srv3=c", "srv4=-"]);
        // A regrow after a pass without one looks at the table again, for the same service.
        let mut same = Registry {
            services: vec![parsed],
        };
        slots.assign(&mut same, 2, true);
        assert_eq!(layout(&same).len(), 5);
    }

    #[test]
    fn forgetting_the_parsed_services_keeps_one_copy_and_the_same_results() {
        let mut slots = Slots::default();
        let mut r = registry(&["a", "b"]);
        let parsed = Arc::clone(&r.services[0]);
        slots.assign(&mut r, 2, true);
        let slotted = Arc::clone(&r.services[0]);
        assert_eq!(
            Arc::strong_count(&parsed),
            2,
            "the memo holds the parsed copy"
        );
        assert!(slots.slotted(&parsed).is_some());
        slots.forget_parsed();
        // Only this test holds the parsed copy now: the daemon's would be freed.
        assert_eq!(Arc::strong_count(&parsed), 1);
        assert!(slots.slotted(&parsed).is_none());
        // What it became (which the parse cache adopted) still comes back as it is.
        let mut adopted = Registry {
            services: vec![Arc::clone(&slotted)],
        };
        slots.assign(&mut adopted, 2, false);
        assert!(Arc::ptr_eq(&adopted.services[0], &slotted));
        // The parsed copy, seen again (a service the cache did not adopt), slots the same.
        let mut again = Registry {
            services: vec![parsed],
        };
        slots.assign(&mut again, 2, true);
        assert_eq!(layout(&again), layout(&adopted));
    }
}
