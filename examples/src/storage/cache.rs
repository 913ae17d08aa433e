//! The node's cache of open blob files: at most `cap` descriptors (and
//! [`MAX_HEADER_BYTES`] of headers), least recently used evicted first.
//! An entry is served only while the blob's path still names the same
//! file ([`FileIdent`]); the caller stats the path and passes its identity
//! to [`OpenBlobs::get`]. An evicted file stays open for readers that still
//! hold it and closes when the last of them is done.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use super::reader::{BlobFile, FileIdent};

/// Most bytes of chunk-CRC tables the cache keeps (a header holds 4 bytes
/// per chunk: 1 KiB for a 1 GiB blob in 4 MiB chunks, at most 4 MiB).
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

struct Entry {
    blob: Arc<BlobFile>,
    tick: u64,
    bytes: u64,
}

#[derive(Default)]
struct Inner {
    map: HashMap<String, Entry>,
    /// Entries by last use, oldest first.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: u64,
}

impl Inner {
    fn remove(&mut self, id: &str) -> Option<Entry> {
        let e = self.map.remove(id)?;
        self.order.remove(&e.tick);
        self.bytes -= e.bytes;
        Some(e)
    }
}

/// See the [module documentation](self).
pub(crate) struct OpenBlobs {
    cap: usize,
    inner: Mutex<Inner>,
}

impl OpenBlobs {
    /// A cache of at most `cap` open files (0: none are kept).
    pub(crate) fn new(cap: usize) -> OpenBlobs {
        OpenBlobs {
            cap,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every step leaves the maps consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached file of blob `id` if it is still the file its path names
    /// (`current`: the path's identity now). A stale entry is dropped.
    pub(crate) fn get(&self, id: &str, current: &FileIdent) -> Option<Arc<BlobFile>> {
        let mut g = self.lock();
        let inner = &mut *g;
        let e = inner.map.get_mut(id)?;
        if e.blob.ident() != *current {
            drop(inner.remove(id));
            return None;
        }
        inner.order.remove(&e.tick);
        inner.tick += 1;
        e.tick = inner.tick;
        inner.order.insert(e.tick, id.to_owned());
        Some(e.blob.clone())
    }

    /// Caches `blob` (replacing any entry for its id), evicting the least
    /// recently used entries past the bounds.
    pub(crate) fn insert(&self, blob: Arc<BlobFile>) {
        if self.cap == 0 {
            return;
        }
        let id = blob.id().to_owned();
        let bytes = 4 * blob.header().chunk_crcs.len() as u64 + id.len() as u64 + 128;
        let mut evicted = Vec::new();
        let mut g = self.lock();
        if let Some(old) = g.remove(&id) {
            evicted.push(old);
        }
        g.tick += 1;
        let tick = g.tick;
        g.order.insert(tick, id.clone());
        g.bytes += bytes;
        g.map.insert(id, Entry { blob, tick, bytes });
        while g.map.len() > self.cap || (g.bytes > MAX_HEADER_BYTES && g.map.len() > 1) {
            let Some((_, oldest)) = g.order.pop_first() else {
                break;
            };
            if let Some(e) = g.map.remove(&oldest) {
                g.bytes -= e.bytes;
                evicted.push(e);
            }
        }
        drop(g);
        // Files close here, outside the lock.
        drop(evicted);
    }

    /// Forgets blob `id`'s file.
    pub(crate) fn remove(&self, id: &str) {
        let e = self.lock().remove(id);
        drop(e);
    }

    /// Files cached.
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Forgets every file.
    pub(crate) fn clear(&self) {
        let mut g = self.lock();
        let map = std::mem::take(&mut g.map);
        g.order.clear();
        g.bytes = 0;
        drop(g);
        drop(map);
    }
}
