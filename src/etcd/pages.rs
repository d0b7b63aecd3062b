//! Reading a range in pages at one revision, with a bound on every message.

use std::time::Duration;

use etcd_client::{GetOptions, KvClient};

use super::{Failure, Kind};
use crate::model::display_key;

/// The largest read or watch message decoded (gRPC's default). Decoding holds a message about
/// twice (its bytes and what they decode to), so this bounds the memory a read or a watch
/// answer takes at about 8 MiB, whatever etcd holds. A page of [`PAGE_KEYS`] registry keys
/// (about 150 bytes each) is far below it; a page of larger values is read in smaller pages.
/// A watch answer for one revision is at most etcd's `--max-request-bytes` (1.5 MiB by
/// default), since the watch asks for no previous values; a watch that resumes far behind
/// gets up to 1,000 revisions in one answer, and a paged read replaces one above this.
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// Keys per page of a full read: 100,000 keys are 10 round trips. Each round trip costs: pages
/// of 1,000 made the first read at 2,000 × 10 take 306 ms against 242 ms with 10,000 (197 ms
/// as one message per prefix), while the message bound keeps the memory bounded either way.
pub(crate) const PAGE_KEYS: i64 = 10_000;
/// A deadline for one page of a read: large pages take a while, hung servers forever.
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty, or only 0xff bytes: to the end of the key space.
    vec![0]
}

/// A range read in pages of at most [`PAGE_KEYS`] keys, every page at the revision of the
/// first one (or a given one), so that the whole read is one consistent state. A page whose
/// answer is larger than [`MAX_MESSAGE`] is asked for again with half as many keys, down to
/// one; a single key too large even alone is listed in [`Page::unreadable`], with its key and
/// revision only.
pub(crate) struct Pages {
    next: Vec<u8>,
    end: Vec<u8>,
    revision: i64,
    limit: i64,
    done: bool,
}

/// One page of a [`Pages`] read.
#[derive(Default)]
pub(crate) struct Page {
    pub(crate) kvs: Vec<etcd_client::KeyValue>,
    /// Keys (with their mod revisions) whose value is too large to be read at all.
    pub(crate) unreadable: Vec<(Vec<u8>, i64)>,
}

impl Pages {
    /// Every key under `prefix`, at `revision` (0: etcd's current one, taken by the first page).
    pub(crate) fn prefix(prefix: &[u8], revision: i64) -> Pages {
        Pages {
            next: prefix.to_vec(),
            end: prefix_end(prefix),
            revision,
            limit: PAGE_KEYS,
            done: false,
        }
    }

    /// The revision every page is read at (0 before the first page of a read at "now").
    pub(crate) fn revision(&self) -> i64 {
        self.revision
    }

    /// The next page, or None after the last one. `what` names the read in errors.
    pub(crate) async fn next(
        &mut self,
        kv: &mut KvClient,
        what: &str,
        user: Option<&str>,
    ) -> Result<Option<Page>, Failure> {
        if self.done {
            return Ok(None);
        }
        loop {
            let mut options = GetOptions::new()
                .with_range(self.end.clone())
                .with_limit(self.limit);
            if self.revision > 0 {
                options = options.with_revision(self.revision);
            }
            let answer =
                tokio::time::timeout(READ_TIMEOUT, kv.get(self.next.clone(), Some(options)))
                    .await
                    .map_err(|_| Failure::timeout(what, READ_TIMEOUT))?;
            let mut resp = match answer {
                Ok(resp) => resp,
                Err(e) => {
                    let f = Failure::from_etcd(what, &e, user);
                    if f.kind != Kind::TooLarge {
                        return Err(f);
                    }
                    if self.limit > 1 {
                        self.limit = (self.limit / 2).max(1);
                        tracing::debug!(error = %f, keys = self.limit, "etcd page too large; asking for fewer keys");
                        continue;
                    }
                    return self.skip_unreadable(kv, what, user, f).await.map(Some);
                }
            };
            if self.revision <= 0 {
                self.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
                if self.revision <= 0 {
                    return Err(Failure::new(
                        Kind::Other,
                        format!("{what}: etcd answered without a revision"),
                    ));
                }
            }
            let kvs = resp.take_kvs();
            match kvs.last() {
                Some(last) if resp.more() => self.next = after(last.key()),
                _ => self.done = true,
            }
            // After a page too large, grow back while pages stay small.
            let bytes: usize = kvs.iter().map(|kv| kv.key().len() + kv.value().len()).sum();
            if bytes < MAX_MESSAGE / 4 {
                self.limit = (self.limit * 2).min(PAGE_KEYS);
            }
            return Ok(Some(Page {
                kvs,
                unreadable: Vec::new(),
            }));
        }
    }

    /// The next key alone was too large to read: learn its key (a keys-only read) and go on
    /// after it.
    async fn skip_unreadable(
        &mut self,
        kv: &mut KvClient,
        what: &str,
        user: Option<&str>,
        cause: Failure,
    ) -> Result<Page, Failure> {
        let mut options = GetOptions::new()
            .with_range(self.end.clone())
            .with_limit(1)
            .with_keys_only();
        if self.revision > 0 {
            options = options.with_revision(self.revision);
        }
        let resp = tokio::time::timeout(READ_TIMEOUT, kv.get(self.next.clone(), Some(options)))
            .await
            .map_err(|_| Failure::timeout(what, READ_TIMEOUT))?
            .map_err(|e| Failure::from_etcd(what, &e, user))?;
        if self.revision <= 0 {
            self.revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let Some(item) = resp.kvs().first() else {
            // The key went away between the two reads (only at "now"): nothing to skip.
            return Err(cause);
        };
        tracing::warn!(key = %display_key(item.key()), error = %cause, "an etcd value too large to read is left out");
        if resp.more() {
            self.next = after(item.key());
        } else {
            self.done = true;
        }
        Ok(Page {
            kvs: Vec::new(),
            unreadable: vec![(item.key().to_vec(), item.mod_revision())],
        })
    }
}

/// The first key after `key`.
fn after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/services/"), b"/services0");
        assert_eq!(prefix_end(b"/a\xff"), b"/b");
        assert_eq!(prefix_end(b"\xff\xff"), b"\0");
        assert_eq!(after(b"/a"), b"/a\0");
    }
}
