//! The etcd source's state: the raw pairs of a full read ([`RawState`], which keeps no bytes of
//! a pair the screen refuses) and the screened state the watcher keeps ([`ScreenedState`]),
//! brought up to date key by key, so that one watch event costs one screen. The raw pairs live
//! only while a read is turned into its screened state: keeping them beside it held every key
//! and value twice (3 MB at 2,000x10).

use std::collections::{BTreeMap, BTreeSet};

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

/// What the screen made of every key under the prefixes: the pairs it passed, and the keys it
/// left out with why. The watcher keeps this and only this between reads, so that an update
/// after one event costs one screen and a clone of a persistent map, not a screen of every key.
/// Two states that screen alike are alike: a value that changes from one refused form to
/// another refused for the same reason changes nothing a template or an operator sees.
#[derive(Default, Debug, PartialEq, Eq)]
pub(super) struct ScreenedState {
    kv: Kv,
    /// Pairs the screen left out, by held key.
    rejected: BTreeMap<Vec<u8>, Rejection>,
}

/// What the screen makes of a held pair (`k` is the held key).
fn screen_held(prefixes: &[String], k: &[u8], held: &Held) -> Screened {
    match held {
        Held::Value(v) => screen_pair(prefixes, k, v),
        Held::Oversized {
            rejection: Some(r), ..
        } => Screened::Reject(r.clone()),
        Held::Oversized {
            rejection: None, ..
        } => Screened::Outside,
    }
}

impl ScreenedState {
    pub(super) fn build(prefixes: &[String], state: &RawState) -> ScreenedState {
        let mut s = ScreenedState::default();
        for (k, (held, _)) in state {
            s.set(k, screen_held(prefixes, k, held));
        }
        s
    }

    /// [`ScreenedState::build`], consuming the read: each raw pair is freed once screened, so
    /// the read and its screened state do not both live whole.
    pub(super) fn from_read(prefixes: &[String], state: RawState) -> ScreenedState {
        let mut s = ScreenedState::default();
        for (k, (held, _)) in state {
            let screened = screen_held(prefixes, &k, &held);
            drop(held);
            s.set(&k, screened);
        }
        s
    }

    /// The keys held, screened in or left out.
    pub(super) fn len(&self) -> usize {
        self.kv.len() + self.rejected.len()
    }

    /// Puts what the screen made of the pair under held key `k`. Whether anything changed;
    /// an unchanged pair leaves the map alone, so that it stays shared with the snapshots
    /// already handed out.
    fn set(&mut self, k: &[u8], screened: Screened) -> bool {
        match screened {
            Screened::Outside => false,
            Screened::Pass(key, value) => {
                let was_rejected = self.rejected.remove(k).is_some();
                if self.kv.get(&key) == Some(&value) {
                    return was_rejected;
                }
                self.kv.insert(key, value);
                true
            }
            Screened::Reject(r) => {
                let was_in = std::str::from_utf8(k).is_ok_and(|key| self.kv.remove(key).is_some());
                if self.rejected.get(k) == Some(&r) {
                    return was_in;
                }
                self.rejected.insert(k.to_vec(), r);
                true
            }
        }
    }

    /// Applies a put from a watch event. Whether the state changed.
    pub(super) fn put(&mut self, prefixes: &[String], k: &[u8], v: &[u8]) -> bool {
        match hold_oversized(prefixes, k, v) {
            Some((held_key, held)) => {
                let screened = screen_held(prefixes, &held_key, &held);
                self.set(&held_key, screened)
            }
            None => self.set(k, screen_pair(prefixes, k, v)),
        }
    }

    /// Applies a delete from a watch event. Whether the state changed.
    pub(super) fn delete(&mut self, k: &[u8]) -> bool {
        let k = held_key(k);
        let rejected = self.rejected.remove(k.as_ref()).is_some();
        let passed = std::str::from_utf8(&k).is_ok_and(|key| self.kv.remove(key).is_some());
        rejected || passed
    }

    /// How many keys differ between this (watch-built) state and `read`, a full read's. A key
    /// in `newer` was written after the revision the watch had heard of: a change the watch is
    /// still delivering, not drift, and it is not counted.
    pub(super) fn differing_keys(&self, read: &ScreenedState, newer: &BTreeSet<Vec<u8>>) -> usize {
        let mut keys: BTreeSet<&[u8]> = BTreeSet::new();
        for item in self.kv.diff(&read.kv) {
            let key = match item {
                imbl::ordmap::DiffItem::Add(k, _)
                | imbl::ordmap::DiffItem::Remove(k, _)
                | imbl::ordmap::DiffItem::Update { new: (k, _), .. } => k,
            };
            keys.insert(key.as_bytes());
        }
        for (k, r) in &self.rejected {
            if read.rejected.get(k) != Some(r) {
                keys.insert(k);
            }
        }
        for k in read.rejected.keys() {
            if !self.rejected.contains_key(k) {
                keys.insert(k);
            }
        }
        keys.into_iter()
            .filter(|k| !(read.holds(k) && newer.contains(*k)))
            .count()
    }

    /// Whether held key `k` is in the state, screened in or left out.
    fn holds(&self, k: &[u8]) -> bool {
        self.rejected.contains_key(k)
            || std::str::from_utf8(k).is_ok_and(|k| self.kv.contains_key(k))
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

/// The keys of a full read written after `revision`: changes a watch at `revision` has not
/// delivered yet.
pub(super) fn newer_than(read: &RawState, revision: i64) -> BTreeSet<Vec<u8>> {
    read.iter()
        .filter(|(_, (_, rev))| *rev > revision)
        .map(|(k, _)| k.clone())
        .collect()
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

    fn screened(prefixes: &[String], read: &RawState) -> ScreenedState {
        ScreenedState::build(prefixes, read)
    }

    #[test]
    fn drift_counts_changed_and_missing_keys_not_newer_ones() {
        let prefixes = vec!["/".to_owned()];
        let watched = state(&[("/a", "1", 2), ("/b", "1", 3), ("/c", "1", 4)]);
        let read = state(&[("/a", "1", 2), ("/b", "2", 5), ("/d", "1", 9)]);
        let (w, r) = (screened(&prefixes, &watched), screened(&prefixes, &read));
        // /b changed at 5 and /d appeared at 9, both after the watch's revision 4: in flight.
        // /c is gone from the read: drift.
        assert_eq!(w.differing_keys(&r, &newer_than(&read, 4)), 1);
        // Had the watch heard of revision 9, /b and /d would be drift too.
        assert_eq!(w.differing_keys(&r, &newer_than(&read, 9)), 3);
        assert_eq!(w, screened(&prefixes, &watched));
        assert_ne!(w, r);
        // A key that went from refused to passed (or back) is one key that differs.
        let bad = state(&[("/a", "bad\nvalue", 2), ("/b", "1", 3), ("/c", "1", 4)]);
        let b = screened(&prefixes, &bad);
        assert_eq!(w.differing_keys(&b, &BTreeSet::new()), 1);
        assert_eq!(b.differing_keys(&w, &BTreeSet::new()), 1);
    }

    #[test]
    fn an_event_that_changes_nothing_screened_leaves_the_map_shared() {
        let prefixes = vec!["/services/".to_owned()];
        let mut s = ScreenedState::default();
        assert!(s.put(&prefixes, b"/services/a/1", b"127.0.0.1:80"));
        let before = s.kv.clone();
        assert!(!s.put(&prefixes, b"/services/a/1", b"127.0.0.1:80"));
        assert!(s.kv.ptr_eq(&before));
        // Two refused values, refused alike: nothing a template or an operator sees changed.
        assert!(s.put(&prefixes, b"/services/a/2", b"bad\nvalue"));
        assert!(!s.put(&prefixes, b"/services/a/2", b"bad\rvalue"));
        assert!(!s.delete(b"/services/a/3"));
        assert!(s.delete(b"/services/a/2"));
        assert!(s.rejected.is_empty());
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
