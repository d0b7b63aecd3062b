//! The etcd source's state: the raw pairs as read and watched ([`RawState`], which keeps no
//! bytes of a pair the screen refuses) and their screened view ([`ScreenedState`]), kept in step
//! key by key, so that one watch event costs one screen.

use std::collections::BTreeMap;

use super::super::Update;
use crate::etcd::MAX_MESSAGE;
use std::sync::Arc;

use crate::model::{
    Kv, MAX_KEY_LEN, MAX_VALUE_LEN, Rejection, Screened, Snapshot, display_key, screen_pair,
};

/// One key as kept, by its [`held_key`]: what it holds and the revision that last modified it.
pub(super) type RawState = BTreeMap<Vec<u8>, (Held, i64)>;

/// What the raw state keeps of a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Held {
    /// The value's bytes: the key and the value are within the screen's limits.
    Value(Vec<u8>),
    /// A key longer than [`MAX_KEY_LEN`] or a value longer than [`MAX_VALUE_LEN`]: the screen
    /// rejects the pair whatever its bytes, so only a digest of the value (to tell a change)
    /// and the rejection are kept (none for a key outside every prefix).
    Oversized {
        digest: u64,
        rejection: Option<Rejection>,
    },
}

/// The key the raw state keeps a key under: the key itself, or for a key longer than
/// [`MAX_KEY_LEN`] its first `MAX_KEY_LEN` bytes, a 0xff byte and a 128-bit digest of the
/// whole key. Such a stand-in is longer than `MAX_KEY_LEN`, so it is never a kept key itself.
fn held_key(k: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if k.len() <= MAX_KEY_LEN {
        return std::borrow::Cow::Borrowed(k);
    }
    let mut held = Vec::with_capacity(MAX_KEY_LEN + 17);
    held.extend_from_slice(&k[..MAX_KEY_LEN]);
    held.push(0xff);
    held.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(k).to_be_bytes());
    std::borrow::Cow::Owned(held)
}

/// The held form of a pair whose key or value is longer than the screen accepts, or None for
/// a pair within the limits (kept as it is, with no copy). Two length comparisons for every
/// pair; the rest only for oversized ones.
fn hold_oversized(prefixes: &[String], k: &[u8], v: &[u8]) -> Option<(Vec<u8>, Held)> {
    if k.len() <= MAX_KEY_LEN && v.len() <= MAX_VALUE_LEN {
        return None;
    }
    // The screen looks at the lengths before any byte of the long part.
    let rejection = match screen_pair(prefixes, k, v) {
        Screened::Reject(r) => Some(r),
        Screened::Outside | Screened::Pass(..) => None,
    };
    let held = Held::Oversized {
        digest: xxhash_rust::xxh3::xxh3_64(v),
        rejection,
    };
    Some((held_key(k).into_owned(), held))
}

/// The held form of a pair read whole: within the limits it is kept as it is, with no copy.
pub(super) fn hold(prefixes: &[String], k: Vec<u8>, v: Vec<u8>) -> (Vec<u8>, Held) {
    match hold_oversized(prefixes, &k, &v) {
        Some(oversized) => oversized,
        None => (k, Held::Value(v)),
    }
}

/// Applies a put (from a watch event) to both states. Whether the screened state changed.
pub(super) fn apply_put(
    state: &mut RawState,
    screened: &mut ScreenedState,
    prefixes: &[String],
    k: &[u8],
    v: &[u8],
    mod_revision: i64,
) -> bool {
    let (key, held) =
        hold_oversized(prefixes, k, v).unwrap_or_else(|| (k.to_vec(), Held::Value(v.to_vec())));
    // One lookup: the entry API, not a get and an insert.
    match state.entry(key) {
        std::collections::btree_map::Entry::Occupied(mut e) => {
            let changed = e.get().0 != held;
            if changed {
                screened.put(prefixes, e.key(), &held);
            }
            e.insert((held, mod_revision));
            changed
        }
        std::collections::btree_map::Entry::Vacant(e) => {
            screened.put(prefixes, e.key(), &held);
            e.insert((held, mod_revision));
            true
        }
    }
}

/// Applies a delete (from a watch event) to both states. Whether the screened state changed.
pub(super) fn apply_delete(state: &mut RawState, screened: &mut ScreenedState, k: &[u8]) -> bool {
    let key = held_key(k);
    let removed = state.remove(key.as_ref()).is_some();
    if removed {
        screened.delete(&key);
    }
    removed
}

/// A value etcd could not send within [`MAX_MESSAGE`]: its key is known (from a keys-only
/// read), its bytes never were.
pub(super) fn unreadable(prefixes: &[String], k: &[u8], mod_revision: i64) -> (Vec<u8>, Held) {
    let rejection = prefixes
        .iter()
        .any(|p| k.starts_with(p.as_bytes()))
        .then(|| Rejection {
            key: display_key(k),
            reason: format!(
                "value too large to read (key and value above {} MiB)",
                MAX_MESSAGE >> 20
            ),
        });
    let held = Held::Oversized {
        // The revision stands for the bytes: a new value is a new revision.
        digest: mod_revision as u64,
        rejection,
    };
    (held_key(k).into_owned(), held)
}

/// The screened view of a [`RawState`], kept in step with it key by key, so that an update
/// after one event costs one screen and a clone of a persistent map, not a screen of every key.
#[derive(Default)]
pub(super) struct ScreenedState {
    kv: Kv,
    /// Pairs the screen left out, by held key.
    rejected: BTreeMap<Vec<u8>, Rejection>,
}

impl ScreenedState {
    pub(super) fn build(prefixes: &[String], state: &RawState) -> ScreenedState {
        let mut s = ScreenedState::default();
        for (k, (held, _)) in state {
            s.put(prefixes, k, held);
        }
        s
    }

    /// `k` is the held key.
    pub(super) fn put(&mut self, prefixes: &[String], k: &[u8], held: &Held) {
        let screened = match held {
            Held::Value(v) => screen_pair(prefixes, k, v),
            Held::Oversized {
                rejection: Some(r), ..
            } => Screened::Reject(r.clone()),
            Held::Oversized {
                rejection: None, ..
            } => Screened::Outside,
        };
        match screened {
            Screened::Outside => {}
            Screened::Pass(key, value) => {
                self.rejected.remove(k);
                self.kv.insert(key, value);
            }
            Screened::Reject(r) => {
                self.rejected.insert(k.to_vec(), r);
                if let Ok(key) = std::str::from_utf8(k) {
                    self.kv.remove(key);
                }
            }
        }
    }

    /// `k` is the held key.
    pub(super) fn delete(&mut self, k: &[u8]) {
        self.rejected.remove(k);
        if let Ok(key) = std::str::from_utf8(k) {
            self.kv.remove(key);
        }
    }

    pub(super) fn update(&self, revision: i64) -> Update {
        Update {
            snapshot: Arc::new(Snapshot {
                revision,
                kv: self.kv.clone(),
            }),
            rejected: self.rejected.values().cloned().collect(),
        }
    }
}

/// Whether two states hold the same keys and values (revisions aside).
pub(super) fn same_values(a: &RawState, b: &RawState) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, (va, _)), (kb, (vb, _)))| ka == kb && va == vb)
}

/// How many keys differ between the watch-built state and a full read. A key the read shows
/// at a revision newer than the watch had heard of (`watch_revision`) is a change the watch
/// is still delivering, not drift, and is not counted.
pub(super) fn differing_keys(watched: &RawState, read: &RawState, watch_revision: i64) -> usize {
    let mut n = 0;
    for (k, (v, rev)) in read {
        match watched.get(k) {
            Some((wv, _)) if wv == v => {}
            _ if *rev > watch_revision => {}
            _ => n += 1,
        }
    }
    n + watched.keys().filter(|k| !read.contains_key(*k)).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(pairs: &[(&str, &str, i64)]) -> RawState {
        pairs
            .iter()
            .map(|(k, v, r)| {
                (
                    k.as_bytes().to_vec(),
                    (Held::Value(v.as_bytes().to_vec()), *r),
                )
            })
            .collect()
    }

    #[test]
    fn drift_counts_changed_and_missing_keys_not_newer_ones() {
        let watched = state(&[("/a", "1", 2), ("/b", "1", 3), ("/c", "1", 4)]);
        let read = state(&[("/a", "1", 2), ("/b", "2", 5), ("/d", "1", 9)]);
        // /b changed at 5 and /d appeared at 9, both after the watch's revision 4: in flight.
        // /c is gone from the read: drift.
        assert_eq!(differing_keys(&watched, &read, 4), 1);
        // Had the watch heard of revision 9, /b and /d would be drift too.
        assert_eq!(differing_keys(&watched, &read, 9), 3);
        assert!(same_values(&watched, &watched));
        assert!(!same_values(&watched, &read));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// The screened state kept event by event equals a screen of the whole raw state, and
        /// the state a full read would hold: oversized keys and values included, of which
        /// neither state keeps the bytes.
        #[test]
        fn screened_state_follows_the_raw_state(
            events in proptest::collection::vec((0usize..8, proptest::option::of(0usize..6)), 0..40)
        ) {
            let long_a = format!("/services/a/{}", "x".repeat(MAX_KEY_LEN));
            let long_b = format!("/services/a/{}y", "x".repeat(MAX_KEY_LEN));
            let keys: [&[u8]; 8] = [
                b"/services/a/1", b"/services/a/2", b"/routes/a", b"/other/x",
                b"/services/a/\xff", b"/services/b 1/x", long_a.as_bytes(), long_b.as_bytes(),
            ];
            let big_a = "1".repeat(MAX_VALUE_LEN + 1);
            let big_b = "2".repeat(MAX_VALUE_LEN + 1);
            let values: [&[u8]; 6] = [
                b"127.0.0.1:80", b"bad\nvalue", b"127.0.0.2:81", b"", big_a.as_bytes(),
                big_b.as_bytes(),
            ];
            let prefixes = vec!["/services/".to_owned(), "/routes/".to_owned()];
            let mut whole: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            let mut raw = RawState::new();
            let mut screened = ScreenedState::default();
            for (k, v) in events {
                match v {
                    Some(v) => {
                        whole.insert(keys[k].to_vec(), values[v].to_vec());
                        apply_put(&mut raw, &mut screened, &prefixes, keys[k], values[v], 1);
                    }
                    None => {
                        whole.remove(keys[k]);
                        apply_delete(&mut raw, &mut screened, keys[k]);
                    }
                }
            }
            let (snapshot, mut rejected) = Snapshot::screen(0, &prefixes, &whole);
            let mut kept: Vec<Rejection> = screened.rejected.values().cloned().collect();
            rejected.sort_by(|a, b| a.key.cmp(&b.key));
            kept.sort_by(|a, b| a.key.cmp(&b.key));
            proptest::prop_assert_eq!(&screened.kv, &snapshot.kv);
            proptest::prop_assert_eq!(kept, rejected);
            let rebuilt = ScreenedState::build(&prefixes, &raw);
            proptest::prop_assert_eq!(&rebuilt.kv, &snapshot.kv);
            // What a full read of `whole` keeps is what the events built.
            let read: RawState = whole
                .iter()
                .map(|(k, v)| {
                    let (k, held) = hold(&prefixes, k.clone(), v.clone());
                    (k, (held, 1))
                })
                .collect();
            proptest::prop_assert!(same_values(&read, &raw));
            proptest::prop_assert_eq!(differing_keys(&raw, &read, 1), 0);
            // No oversized bytes are kept.
            for (k, (held, _)) in &raw {
                proptest::prop_assert!(k.len() <= MAX_KEY_LEN + 17);
                if let Held::Value(v) = held {
                    proptest::prop_assert!(v.len() <= MAX_VALUE_LEN && k.len() <= MAX_KEY_LEN);
                }
            }
        }
    }

    #[test]
    fn oversized_pairs_keep_a_digest_and_their_rejection_not_their_bytes() {
        let prefixes = vec!["/services/".to_owned()];
        let big = vec![b'v'; 1 << 20];
        let (k, held) = hold(&prefixes, b"/services/web/a".to_vec(), big.clone());
        assert_eq!(k, b"/services/web/a");
        let Held::Oversized {
            rejection: Some(r), ..
        } = &held
        else {
            panic!("{held:?}")
        };
        assert_eq!(r.key, "\"/services/web/a\"");
        assert_eq!(r.reason, "value longer than 8192 bytes");
        // Another oversized value is a change; the same one is not.
        let (_, other) = hold(&prefixes, k.clone(), vec![b'w'; 1 << 20]);
        assert_ne!(held, other);
        assert_eq!(held, hold(&prefixes, k, big).1);

        let long = format!("/services/web/{}", "k".repeat(4096)).into_bytes();
        let (k, held) = hold(&prefixes, long.clone(), b"127.0.0.1:80".to_vec());
        assert_eq!(k.len(), MAX_KEY_LEN + 17);
        assert_eq!(k, held_key(&long).as_ref());
        assert!(k.starts_with(&long[..MAX_KEY_LEN]));
        let Held::Oversized {
            rejection: Some(r), ..
        } = &held
        else {
            panic!("{held:?}")
        };
        assert_eq!(r.reason, "key longer than 512 bytes");
        assert!(r.key.len() < 300, "{}", r.key);
        // Two long keys that share their first 512 bytes stay apart.
        let mut other = long.clone();
        other.push(b'x');
        assert_ne!(held_key(&other), held_key(&long));
        // Outside every prefix: no rejection.
        let (_, held) = hold(&prefixes, b"/other/x".to_vec(), big_value());
        assert!(matches!(
            held,
            Held::Oversized {
                rejection: None,
                ..
            }
        ));
        // Within the limits: kept as it is.
        let (_, held) = hold(
            &prefixes,
            b"/services/web/b".to_vec(),
            b"127.0.0.1:81".to_vec(),
        );
        assert_eq!(held, Held::Value(b"127.0.0.1:81".to_vec()));
    }

    fn big_value() -> Vec<u8> {
        vec![b'v'; MAX_VALUE_LEN + 1]
    }
}
