//! An in-memory key-value server whose values are the page-aligned
//! payloads it received.
//!
//! A PUT keeps the request's payload [`Pages`] as the value. A large value
//! is kept as it arrived: no copy is made on the server, and with zero-copy
//! receive its pages are the very pages the kernel mapped from the socket.
//! A small value (at most [`KvConfig::compact_below`], 64 KiB by default)
//! is copied into the compacting pool ([`Pages::compact`]), where many
//! values share one mapping: kept as received, every zero-copy value would
//! be a mapping of its own, and a process has at most `vm.max_map_count`
//! (65,530 by default) of them. A GET sends the kept pages back as they are
//! (`Payload::Pages(value.clone())`, a reference-count bump), with
//! `MSG_ZEROCOPY` when the server runs in zero-copy mode and the value is
//! page-aligned.
//!
//! The protocol is `service Kv` of `examples/proto/kv.proto` (package
//! `pagerpc.examples.kv`), so clients in other languages can speak it.
//! pagerpc-build generates from it, in [`proto`], the messages, the typed
//! client [`proto::KvClient`], the server trait [`Kv`] (which this server
//! implements), its registration [`proto::KvServer`] and the wire names
//! [`kv_methods`]. [`KvClient`] is the generated client with this
//! example's conveniences (a missing key as `None`, a listing as an
//! iterator of keys); [`KvServer`] is a running server.
//!
//! | method | request | payload in | response | payload out |
//! |---|---|---|---|---|
//! | `pagerpc.examples.kv.Kv/Put` | [`PutRequest`] | the value | [`PutResponse`] | none |
//! | `pagerpc.examples.kv.Kv/Get` | [`KeyRequest`] | none | [`GetResponse`] | the value |
//! | `pagerpc.examples.kv.Kv/Delete` | [`KeyRequest`] | none | [`DeleteResponse`] | none |
//! | `pagerpc.examples.kv.Kv/List` | [`ListRequest`] | none | a stream of [`ListChunk`] | none |
//! | `pagerpc.examples.kv.Kv/Stats` | [`StatsRequest`] | none | [`StatsResponse`] | none |
//!
//! # Memory cap
//! The store accounts, per entry, the memory it really holds: the key, the
//! value's [`Pages::footprint`] (whole pages, or its pool slot once
//! compacted; a 1-byte value received on its own holds a 4 KiB page) and
//! [`ENTRY_OVERHEAD`] bytes of bookkeeping. It never accounts more than
//! [`KvConfig::max_bytes`]. A PUT that would go over is refused with
//! [`Code::ResourceExhausted`] naming the cap and the value, and changes
//! nothing. Replacing a key counts the new entry minus the old one.
//!
//! # Mappings
//! A value larger than [`KvConfig::compact_below`] keeps the mapping it
//! arrived in: at most `max_bytes / compact_below` of them. A value
//! received zero-copy is a mapping of the socket it came in on; it keeps
//! that socket's file open (a few KiB of kernel memory) until the value is
//! replaced or deleted. Compacted values hold no socket.
//!
//! # Listing
//! `List` is a server-streaming call: it sends the matching keys
//! in byte order as [`ListChunk`] messages of at most [`LIST_CHUNK_KEYS`]
//! entries and [`LIST_CHUNK_BYTES`] encoded, then ends the stream with
//! status OK. [`KvClient::keys`] and [`KvClient::list`] consume it as an
//! iterator; a listing cut short (the server gone, the connection lost,
//! the deadline) ends with an `Err` item, never early with `None`.
//!
//! The handler takes each chunk's keys under the store's lock, releases
//! it, and only then sends the chunk, so it holds one chunk at a time and
//! never blocks PUTs while it waits. pagerpc's flow control makes that
//! wait: a client that stops reading stops the listing once the client's
//! stream window (`ClientConfig::stream_window`, 8 MiB by default) of
//! chunks is unread, so a stalled listing holds at most about one window
//! of queued chunks on the server, and a thread (one of
//! `ServerConfig::max_streams`), until the client reads on, cancels or
//! disconnects. That window is the one the client announces: pagerpc
//! (this version) sets the server's side no bound of its own, so a client
//! announcing a huge window and reading nothing makes the server queue
//! the whole listing, until its progress timeout closes the connection. A listing is not a snapshot: keys stored or deleted while
//! it runs appear or not depending on whether the listing had passed them;
//! a key present throughout appears exactly once.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use pagerpc::prost::Message;
use pagerpc::typed::{NoPayload, Outbound, Receiver};
use pagerpc::{
    CallError, CallOptions, Client, ClientConfig, Code, Context, CountersSnapshot, Origin, PageBuf,
    Pages, Payload, Server, ServerConfig, Status,
};

use crate::util::{self, human_bytes, human_latency, percentile};

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Most entries in one [`ListChunk`] of a listing.
pub const LIST_CHUNK_KEYS: usize = 1000;
/// Most bytes one [`ListChunk`] encodes to. A chunk ends before it would
/// grow past this; since a key is at most [`MAX_KEY_LEN`] bytes, every
/// chunk holds at least one entry.
pub const LIST_CHUNK_BYTES: usize = 32 * 1024;
/// Bytes of bookkeeping the store accounts for every entry besides its key
/// and value: the map's share of a tree node, the key's and the value
/// handle's allocations. Measured on x86-64: `kv-server`'s RSS grows by
/// 223 bytes per entry of a 7-byte key and a 1-byte value (a 16-byte
/// slot) over 200,000 of them.
pub const ENTRY_OVERHEAD: u64 = 200;
/// How long [`KvServer::shutdown`] (and dropping a [`KvServer`]) lets
/// in-flight calls finish before it cuts them short. Without it, a listing
/// whose client stopped reading would hold the shutdown until the server's
/// progress timeout closed that client's connection.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Values up to this many bytes are compacted by default
/// ([`KvConfig::compact_below`]): the largest payload the pages crate's
/// compacting pool takes.
pub const DEFAULT_COMPACT_BELOW: usize = 64 * 1024;

pub use proto::{
    kv_methods, DeleteResponse, GetResponse, KeyRequest, Kv, ListChunk, ListEntry, ListRequest,
    PutRequest, PutResponse, StatsRequest, StatsResponse,
};

/// What pagerpc-build generates from `examples/proto/kv.proto` (package
/// `pagerpc.examples.kv`) at build time: the messages, and for
/// `service Kv` the typed client [`KvClient`](proto::KvClient), the server
/// trait [`Kv`], its registration [`KvServer`](proto::KvServer) and the
/// wire names [`kv_methods`]. Each is documented in the `.proto` file.
pub mod proto {
    pagerpc::include_proto!("pagerpc.examples.kv");
}

impl StatsResponse {
    /// Percentage of received payload bytes that were mapped (0 when none).
    pub fn mapped_percent(&self) -> f64 {
        mapped_percent(self.bytes_mapped, self.bytes_copied)
    }
}

fn mapped_percent(mapped: u64, copied: u64) -> f64 {
    let total = mapped + copied;
    if total == 0 {
        0.0
    } else {
        100.0 * mapped as f64 / total as f64
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct KvConfig {
    /// The memory cap: most bytes the store accounts (keys, the memory the
    /// values hold, and [`ENTRY_OVERHEAD`] per entry).
    pub max_bytes: u64,
    /// Zero-copy receive and `MSG_ZEROCOPY` send.
    pub zerocopy: bool,
    /// Server pool threads (`None`: pagerpc's default).
    pub threads: Option<usize>,
    /// Values of at most this many bytes (at most 64 KiB take effect) are
    /// copied into the compacting pool instead of keeping the pages they
    /// arrived in (see [`Pages::compact`]); 0 keeps every value as
    /// received. Default [`DEFAULT_COMPACT_BELOW`].
    ///
    /// # Memory cost
    /// A compacted value holds its pool slot (less than twice its length
    /// below 2 KiB, whole pages above) instead of whole pages of its own;
    /// the PUT pays one copy of it. Values above this keep a mapping each:
    /// at most `max_bytes / compact_below` of them.
    pub compact_below: usize,
}

impl Default for KvConfig {
    fn default() -> Self {
        KvConfig {
            max_bytes: 1 << 30,
            zerocopy: true,
            threads: None,
            compact_below: DEFAULT_COMPACT_BELOW,
        }
    }
}

/// What one stored entry costs against the cap: its key, the memory its
/// value holds, and the bookkeeping.
pub fn entry_cost(key: &str, value: &Pages) -> u64 {
    key.len() as u64 + value.footprint() as u64 + ENTRY_OVERHEAD
}

/// Whether a value is a mapping of its own (one of the process's
/// `vm.max_map_count`).
fn own_mapping(value: &Pages) -> bool {
    matches!(value.origin(), Origin::Socket | Origin::Anonymous)
}

/// What the store holds, besides the map.
#[derive(Default)]
struct Totals {
    /// Accounted bytes (the sum of `entry_cost`).
    bytes: u64,
    /// Sum of footprints.
    memory: u64,
    /// Sum of lengths.
    value_bytes: u64,
    compacted: u64,
    own_mappings: u64,
}

impl Totals {
    fn add(&mut self, key: &str, v: &Pages) {
        self.bytes += entry_cost(key, v);
        self.memory += v.footprint() as u64;
        self.value_bytes += v.len() as u64;
        self.compacted += u64::from(v.origin() == Origin::Pooled);
        self.own_mappings += u64::from(own_mapping(v));
    }

    fn remove(&mut self, key: &str, v: &Pages) {
        self.bytes -= entry_cost(key, v);
        self.memory -= v.footprint() as u64;
        self.value_bytes -= v.len() as u64;
        self.compacted -= u64::from(v.origin() == Origin::Pooled);
        self.own_mappings -= u64::from(own_mapping(v));
    }
}

#[derive(Default)]
struct Inner {
    map: BTreeMap<String, Pages>,
    totals: Totals,
}

struct Store {
    max_bytes: u64,
    compact_below: usize,
    inner: Mutex<Inner>,
    puts: AtomicU64,
    puts_refused: AtomicU64,
    gets: AtomicU64,
    deletes: AtomicU64,
    lists_open: AtomicU64,
    lists_completed: AtomicU64,
    lists_cut_short: AtomicU64,
    list_bytes_sent: AtomicU64,
    /// The running server, for its counters. Taken out before shutdown.
    server: Mutex<Option<Server>>,
}

/// How a value is held, for messages.
fn held_as(v: &Pages) -> &'static str {
    match v.origin() {
        Origin::Empty => "nothing",
        Origin::Pooled => "a compacted pool slot",
        Origin::Heap => "whole pages",
        Origin::Anonymous => "a mapping of its own",
        Origin::Socket => "a mapping of the socket",
    }
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking handler cannot leave the map half-updated (every
        // update is one insert or remove plus counter arithmetic), so a
        // poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_key(key: &str) -> Result<(), Status> {
        if key.is_empty() {
            return Err(Status::invalid_argument("the key is empty"));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(Status::invalid_argument(format!(
                "the key is {} bytes long; the limit is {MAX_KEY_LEN}",
                key.len()
            )));
        }
        Ok(())
    }

    fn put(&self, key: String, value: Pages) -> Result<PutResponse, Status> {
        Self::check_key(&key)?;
        // The store keeps these pages for good and bounds them with its own
        // cap (`max_bytes`, across all connections): compacting takes them
        // out of the server's per-connection count, which would otherwise
        // stop reading a connection once one client had stored that much.
        // A small value is copied into the shared pool (outside the lock):
        // it no longer holds a page or a mapping of its own.
        let value = value.compact(self.compact_below);
        let add = entry_cost(&key, &value);
        let mut inner = self.lock();
        let (old_cost, old_len) = inner
            .map
            .get(&key)
            .map_or((0, 0), |v| (entry_cost(&key, v), v.len() as u64));
        let after = inner.totals.bytes - old_cost + add;
        if after > self.max_bytes {
            let held = inner.totals.bytes;
            let keys = inner.map.len();
            drop(inner);
            self.puts_refused.fetch_add(1, Ordering::Relaxed);
            return Err(Status::resource_exhausted(format!(
                "PUT '{key}' refused: the value of {} ({} bytes) holds {} of memory ({}), \
                 {add} bytes with its key and bookkeeping; storing it would bring the store \
                 to {after} bytes, over its memory cap of {} bytes (--max-bytes {}); it \
                 holds {held} bytes in {keys} keys, and nothing was changed",
                human_bytes(value.len() as u64),
                value.len(),
                human_bytes(value.footprint() as u64),
                held_as(&value),
                self.max_bytes,
                self.max_bytes,
            )));
        }
        inner.totals.add(&key, &value);
        let old = inner.map.insert(key.clone(), value);
        if let Some(old) = &old {
            inner.totals.remove(&key, old);
        }
        drop(inner);
        // The old value (maybe a socket mapping) is unmapped here, outside
        // the lock.
        drop(old);
        self.puts.fetch_add(1, Ordering::Relaxed);
        Ok(PutResponse {
            replaced: old_cost > 0,
            old_len,
            stored_bytes: after,
        })
    }

    fn get(&self, key: &str) -> Result<Pages, Status> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .map
            .get(key)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no key '{key}'")))
    }

    fn delete(&self, key: &str) -> DeleteResponse {
        self.deletes.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let Some(old) = inner.map.remove(key) else {
            return DeleteResponse {
                existed: false,
                freed: 0,
            };
        };
        let freed = entry_cost(key, &old);
        inner.totals.remove(key, &old);
        drop(inner);
        drop(old);
        DeleteResponse {
            existed: true,
            freed,
        }
    }

    /// The next chunk of a listing: the keys starting with `prefix` after
    /// `after` (or from the first such key, if `after` comes before the
    /// prefix), at most `max` of them and [`LIST_CHUNK_BYTES`] encoded.
    /// Empty when no key is left.
    fn list_chunk(&self, prefix: &str, after: &str, max: usize) -> ListChunk {
        // A start before the prefix must not start the scan among keys that
        // do not match.
        let from = if after >= prefix {
            Bound::Excluded(after)
        } else {
            Bound::Included(prefix)
        };
        let inner = self.lock();
        let mut entries = Vec::new();
        let mut size = 0;
        for (k, v) in inner
            .map
            .range::<str, _>((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            if entries.len() == max {
                break;
            }
            let e = ListEntry {
                key: k.clone(),
                len: v.len() as u64,
            };
            // The entry's bytes in the chunk: field tag, length, message.
            let n = e.encoded_len();
            let cost = 1 + pagerpc::prost::length_delimiter_len(n) + n;
            if !entries.is_empty() && size + cost > LIST_CHUNK_BYTES {
                break;
            }
            size += cost;
            entries.push(e);
        }
        ListChunk { entries }
    }

    /// Runs one listing: sends the chunks on `tx` until the keys (or the
    /// request's limit) run out. Each chunk is taken under the lock and
    /// sent after it is released; `send` waits for the client's credit.
    ///
    /// # Errors
    /// The status that cut the stream short (the client cancelled, the
    /// connection closed, the deadline passed, the server shutting down).
    fn list(
        &self,
        req: &ListRequest,
        mut tx: Outbound<'_, ListChunk, NoPayload>,
    ) -> Result<(), Status> {
        let mut listing = Listing::start(self);
        let limit = if req.limit == 0 { u64::MAX } else { req.limit };
        let mut sent = 0u64;
        let mut after = req.start_after.clone();
        while sent < limit {
            let max = (limit - sent).min(LIST_CHUNK_KEYS as u64) as usize;
            let chunk = self.list_chunk(&req.prefix, &after, max);
            let Some(last) = chunk.entries.last() else {
                break;
            };
            after.clone_from(&last.key);
            sent += chunk.entries.len() as u64;
            let bytes = chunk.encoded_len() as u64;
            tx.send(&chunk)?;
            self.list_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        }
        listing.completed = true;
        Ok(())
    }

    fn stats(&self) -> StatsResponse {
        let c = self
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Server::counters)
            .unwrap_or_default();
        let inner = self.lock();
        let t = &inner.totals;
        StatsResponse {
            keys: inner.map.len() as u64,
            bytes: t.bytes,
            max_bytes: self.max_bytes,
            memory: t.memory,
            puts: self.puts.load(Ordering::Relaxed),
            puts_refused: self.puts_refused.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            deletes: self.deletes.load(Ordering::Relaxed),
            payload_bytes_received: c.payload_bytes_received,
            payload_bytes_sent: c.payload_bytes_sent,
            bytes_mapped: c.bytes_mapped,
            bytes_copied: c.bytes_copied(),
            zc_sends: c.zc_sends,
            zc_send_copied: c.zc_send_copied,
            value_bytes: t.value_bytes,
            compacted: t.compacted,
            own_mappings: t.own_mappings,
            lists_open: self.lists_open.load(Ordering::Relaxed),
            lists_completed: self.lists_completed.load(Ordering::Relaxed),
            lists_cut_short: self.lists_cut_short.load(Ordering::Relaxed),
            list_bytes_sent: self.list_bytes_sent.load(Ordering::Relaxed),
        }
    }
}

/// One listing under way, counted in the store's statistics: open while it
/// lives, then completed or (however else it ends, a panic included) cut
/// short.
struct Listing<'a> {
    store: &'a Store,
    completed: bool,
}

impl Listing<'_> {
    fn start(store: &Store) -> Listing<'_> {
        store.lists_open.fetch_add(1, Ordering::Relaxed);
        Listing {
            store,
            completed: false,
        }
    }
}

impl Drop for Listing<'_> {
    fn drop(&mut self) {
        let s = self.store;
        if self.completed {
            s.lists_completed.fetch_add(1, Ordering::Relaxed);
        } else {
            s.lists_cut_short.fetch_add(1, Ordering::Relaxed);
        }
        s.lists_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The server's side of [`Kv`]: each rpc is a call on the store.
struct KvService {
    store: Arc<Store>,
}

impl Kv for KvService {
    fn put(
        &self,
        _ctx: &Context,
        request: PutRequest,
        value: Pages,
    ) -> Result<PutResponse, Status> {
        self.store.put(request.key, value)
    }

    fn get(&self, _ctx: &Context, request: KeyRequest) -> Result<(GetResponse, Payload), Status> {
        let v = self.store.get(&request.key)?;
        Ok((
            GetResponse {
                len: v.len() as u64,
            },
            Payload::Pages(v),
        ))
    }

    fn delete(&self, _ctx: &Context, request: KeyRequest) -> Result<DeleteResponse, Status> {
        Ok(self.store.delete(&request.key))
    }

    fn list(
        &self,
        _ctx: &Context,
        request: ListRequest,
        responses: Outbound<'_, ListChunk, NoPayload>,
    ) -> Result<(), Status> {
        self.store.list(&request, responses)
    }

    fn stats(&self, _ctx: &Context, _request: StatsRequest) -> Result<StatsResponse, Status> {
        Ok(self.store.stats())
    }
}

/// A running key-value server: the [`Kv`] service over one store, bound
/// to an address. Dropping it shuts it down. (Not to be confused with the
/// generated [`proto::KvServer`], which registers a [`Kv`] implementation
/// on a server builder; this type does that in [`start`](Self::start).)
pub struct KvServer {
    store: Arc<Store>,
    addr: SocketAddr,
}

impl std::fmt::Debug for KvServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl KvServer {
    /// Binds `listen` and serves.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub fn start(listen: impl ToSocketAddrs, cfg: &KvConfig) -> io::Result<KvServer> {
        let store = Arc::new(Store {
            max_bytes: cfg.max_bytes,
            compact_below: cfg.compact_below,
            inner: Mutex::new(Inner::default()),
            puts: AtomicU64::new(0),
            puts_refused: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            deletes: AtomicU64::new(0),
            lists_open: AtomicU64::new(0),
            lists_completed: AtomicU64::new(0),
            lists_cut_short: AtomicU64::new(0),
            list_bytes_sent: AtomicU64::new(0),
            server: Mutex::new(None),
        });
        let mut scfg = if cfg.zerocopy {
            ServerConfig::zerocopy()
        } else {
            ServerConfig::default()
        };
        if let Some(t) = cfg.threads {
            scfg.threads = t;
        }
        let server = Server::builder()
            .config(scfg)
            .add_service(proto::KvServer::new(KvService {
                store: store.clone(),
            }))
            .bind(listen)?;
        let addr = server.local_addr();
        *store.server.lock().unwrap_or_else(|e| e.into_inner()) = Some(server);
        Ok(KvServer { store, addr })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The same statistics the `Stats` rpc returns.
    pub fn stats(&self) -> StatsResponse {
        self.store.stats()
    }

    /// Stops accepting, finishes in-flight calls (giving them at most
    /// [`SHUTDOWN_GRACE`]), closes every connection. Dropping the server
    /// does the same.
    pub fn shutdown(self) {
        // Drop does it.
    }

    /// As [`shutdown`](Self::shutdown), giving in-flight calls at most
    /// `grace`; those still running then (a listing whose client stopped
    /// reading waits for it indefinitely) are cut short, and their clients
    /// see an error. Returns whether every call finished.
    pub fn shutdown_timeout(mut self, grace: Duration) -> bool {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> bool {
        // Take the server out first: a STATS handler locks this slot, and
        // shutdown waits for handlers.
        let server = self
            .store
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        server.is_none_or(|s| s.shutdown_timeout(grace))
    }
}

impl Drop for KvServer {
    fn drop(&mut self) {
        self.stop(SHUTDOWN_GRACE);
    }
}

/// A client of the key-value server: the generated [`proto::KvClient`]
/// with this example's conveniences (a missing key is `Ok(None)`, a
/// listing is an iterator of keys). [`rpc`](Self::rpc) is the generated
/// client itself, one method per rpc. Cheap to clone; clones share one
/// connection.
#[derive(Clone, Debug)]
pub struct KvClient {
    rpc: proto::KvClient,
}

impl KvClient {
    /// Connects to `addr`, in zero-copy mode if `zerocopy`.
    ///
    /// # Errors
    /// When the connection fails.
    pub fn connect(addr: impl ToSocketAddrs, zerocopy: bool) -> io::Result<KvClient> {
        let cfg = if zerocopy {
            ClientConfig::zerocopy()
        } else {
            ClientConfig::default()
        };
        Ok(KvClient {
            rpc: proto::KvClient::new(Client::connect_with(addr, cfg)?),
        })
    }

    /// The generated client underneath: one method per rpc, taking and
    /// answering the messages of `kv.proto`.
    pub fn rpc(&self) -> &proto::KvClient {
        &self.rpc
    }

    /// The underlying pagerpc client.
    pub fn inner(&self) -> &Client {
        self.rpc.inner()
    }

    /// Stores `value` under `key`. Send a [`PageBuf`] or [`Pages`] for a
    /// zero-copy send.
    ///
    /// # Errors
    /// [`Code::ResourceExhausted`] over the memory cap,
    /// [`Code::InvalidArgument`] for a bad key, or a transport error.
    pub fn put(&self, key: &str, value: impl Into<Payload>) -> Result<PutResponse, CallError> {
        let req = PutRequest { key: key.into() };
        Ok(self.rpc.put(&req, value)?.message)
    }

    /// Fetches the value of `key` (`Ok(None)` when there is none).
    ///
    /// # Errors
    /// A transport error.
    pub fn get(&self, key: &str) -> Result<Option<Pages>, CallError> {
        let req = KeyRequest { key: key.into() };
        match self.rpc.get(&req) {
            Ok(r) => Ok(Some(r.payload)),
            Err(e) if e.code() == Code::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `key`.
    ///
    /// # Errors
    /// A transport error.
    pub fn delete(&self, key: &str) -> Result<DeleteResponse, CallError> {
        let req = KeyRequest { key: key.into() };
        Ok(self.rpc.delete(&req)?.message)
    }

    /// Every key starting with `prefix` (empty: every key), in byte
    /// order, streamed by the server as the iterator is advanced (see
    /// [`list`](Self::list)).
    pub fn keys(&self, prefix: &str) -> Keys {
        let req = ListRequest {
            prefix: prefix.into(),
            ..ListRequest::default()
        };
        self.list(&req, &CallOptions::default())
    }

    /// The keys `req` asks for (a prefix, where to start, how many at
    /// most), in byte order: one `List` call, whose chunks are received as
    /// the iterator is advanced. Flow control keeps the server at most one
    /// stream window ahead of the consumer.
    ///
    /// The iterator ends (`None`) only when the server ended the listing
    /// with status OK, so every key asked for was yielded. A listing cut
    /// short yields one `Err` as its last item instead: the connection
    /// lost, the server gone, `opts.timeout` passed, or the call failing to
    /// start. Dropping the iterator early cancels the listing on the
    /// server.
    pub fn list(&self, req: &ListRequest, opts: &CallOptions) -> Keys {
        match self.rpc.list_with(req, opts) {
            Ok(rx) => Keys {
                rx: Some(rx),
                chunk: Vec::new().into_iter(),
                failed: None,
            },
            Err(e) => Keys {
                rx: None,
                chunk: Vec::new().into_iter(),
                failed: Some(e),
            },
        }
    }

    /// The server's statistics.
    ///
    /// # Errors
    /// A transport error.
    pub fn stats(&self) -> Result<StatsResponse, CallError> {
        Ok(self.rpc.stats(&StatsRequest {})?.message)
    }
}

/// The keys of one listing, as the server streams them (see
/// [`KvClient::list`]). Dropping it before the end cancels the listing.
#[derive(Debug)]
pub struct Keys {
    /// The stream, until it ended (either way).
    rx: Option<Receiver<ListChunk, NoPayload>>,
    /// The current chunk's entries not yet yielded.
    chunk: std::vec::IntoIter<ListEntry>,
    /// The call could not start: yielded first, then the end.
    failed: Option<CallError>,
}

impl Iterator for Keys {
    type Item = Result<ListEntry, CallError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(e) = self.chunk.next() {
                return Some(Ok(e));
            }
            if let Some(e) = self.failed.take() {
                return Some(Err(e));
            }
            let rx = self.rx.as_mut()?;
            match rx.recv() {
                Ok(Some(chunk)) => self.chunk = chunk.entries.into_iter(),
                Ok(None) => {
                    // Ended with status OK: the listing is complete.
                    self.rx = None;
                    return None;
                }
                Err(e) => {
                    self.rx = None;
                    return Some(Err(e));
                }
            }
        }
    }
}

impl std::iter::FusedIterator for Keys {}

/// Settings for [`bench()`].
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Concurrent clients, each with its own connection and thread.
    pub clients: usize,
    /// Bytes per value.
    pub value_size: usize,
    /// Operations in all (half PUTs, half GETs).
    pub ops: u64,
    /// Distinct keys per client (bounds the server memory the run uses).
    pub keys_per_client: u64,
    /// Zero-copy mode for the clients.
    pub zerocopy: bool,
    /// Draw a progress bar on stderr (only if it is a terminal).
    pub progress: bool,
}

/// What [`bench()`] measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// Settings used.
    pub opts: BenchOptions,
    /// Operations done.
    pub ops: u64,
    /// Wall time of the run (connections already open).
    pub elapsed: Duration,
    /// Median and 99th percentile latency over all operations.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// PUT latencies (p50, p99).
    pub put: (Duration, Duration),
    /// GET latencies (p50, p99).
    pub get: (Duration, Duration),
    /// Payload bytes the server received during the run.
    pub server_received: u64,
    /// Percentage of them it mapped (from STATS before and after).
    pub server_mapped_percent: f64,
    /// Payload bytes the clients received (GET values).
    pub clients_received: u64,
    /// Percentage of them the clients mapped.
    pub clients_mapped_percent: f64,
}

impl BenchReport {
    /// Operations per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.opts;
        let mb = (self.server_received + self.clients_received) as f64 / 1e6;
        write!(
            f,
            "kv bench: {} clients, {} B values, {} ops in {:.2} s: {:.0} ops/s, {:.1} MB/s; \
             latency p50 {}, p99 {} (put p50 {} p99 {}, get p50 {} p99 {}); \
             server received {:.1} MB, {:.1} % mmap'ed; clients received {:.1} MB, {:.1} % mmap'ed",
            o.clients,
            o.value_size,
            self.ops,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            mb / self.elapsed.as_secs_f64().max(1e-9),
            human_latency(self.p50),
            human_latency(self.p99),
            human_latency(self.put.0),
            human_latency(self.put.1),
            human_latency(self.get.0),
            human_latency(self.get.1),
            self.server_received as f64 / 1e6,
            self.server_mapped_percent,
            self.clients_received as f64 / 1e6,
            self.clients_mapped_percent,
        )
    }
}

/// PUT and GET latencies of one bench client.
type Latencies = (Vec<Duration>, Vec<Duration>);

/// Runs a PUT/GET load against the server at `addr`: `clients` threads,
/// each with its own connection, alternate a PUT and a GET of the same key
/// over `keys_per_client` keys; the keys are deleted afterwards. The
/// server's mapped share comes from its STATS before and after, so other
/// traffic during the run counts too.
///
/// # Errors
/// A message naming the failed operation.
pub fn bench(addr: SocketAddr, opts: &BenchOptions) -> Result<BenchReport, String> {
    if opts.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let control = KvClient::connect(addr, opts.zerocopy)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let conns = (0..opts.clients)
        .map(|_| KvClient::connect(addr, opts.zerocopy))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut value = PageBuf::new(opts.value_size).map_err(|e| e.to_string())?;
    util::FastRng::new(opts.value_size as u64).fill(&mut value);
    let value = value.freeze();
    let run = format!(
        "bench/{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let keys = opts.keys_per_client.max(1);
    let bar = util::ops_bar(opts.ops, opts.progress, "kv bench");
    let before = control
        .stats()
        .map_err(|e| format!("STATS: {}", util::call_error(&e)))?;
    let client_before: Vec<CountersSnapshot> = conns.iter().map(|c| c.inner().counters()).collect();
    let t0 = Instant::now();
    let results: Vec<Result<Latencies, String>> = thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(ci, c)| {
                let n = opts.ops / opts.clients as u64
                    + u64::from((ci as u64) < opts.ops % opts.clients as u64);
                let value = value.clone();
                let bar = bar.clone();
                let run = &run;
                s.spawn(move || -> Result<Latencies, String> {
                    let mut puts = Vec::with_capacity(n as usize / 2 + 1);
                    let mut gets = Vec::with_capacity(n as usize / 2 + 1);
                    for i in 0..n {
                        let key = format!("{run}/{ci}/{}", (i / 2) % keys);
                        let t = Instant::now();
                        if i % 2 == 0 {
                            c.put(&key, value.clone())
                                .map_err(|e| format!("PUT {key}: {}", util::call_error(&e)))?;
                            puts.push(t.elapsed());
                        } else {
                            let got = c
                                .get(&key)
                                .map_err(|e| format!("GET {key}: {}", util::call_error(&e)))?
                                .ok_or_else(|| format!("GET {key}: missing"))?;
                            gets.push(t.elapsed());
                            if got.len() != value.len() {
                                return Err(format!(
                                    "GET {key}: {} bytes, expected {}",
                                    got.len(),
                                    value.len()
                                ));
                            }
                        }
                        bar.inc(1);
                    }
                    Ok((puts, gets))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a bench thread panicked".into()))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    bar.finish_and_clear();
    let after = control
        .stats()
        .map_err(|e| format!("STATS: {}", util::call_error(&e)))?;
    let mut clients_received = 0;
    let (mut cm, mut cc) = (0, 0);
    for (c, b) in conns.iter().zip(&client_before) {
        let d = c.inner().counters().since(b);
        clients_received += d.payload_bytes_received;
        cm += d.bytes_mapped;
        cc += d.bytes_copied();
    }
    // Clean up the run's keys before reporting any failure.
    for ci in 0..opts.clients {
        for k in 0..keys {
            let _ = control.delete(&format!("{run}/{ci}/{k}"));
        }
    }
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    for r in results {
        let (p, g) = r?;
        puts.extend(p);
        gets.extend(g);
    }
    puts.sort_unstable();
    gets.sort_unstable();
    let mut all: Vec<Duration> = puts.iter().chain(&gets).copied().collect();
    all.sort_unstable();
    Ok(BenchReport {
        opts: opts.clone(),
        ops: all.len() as u64,
        elapsed,
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        put: (percentile(&puts, 50.0), percentile(&puts, 99.0)),
        get: (percentile(&gets, 50.0), percentile(&gets, 99.0)),
        server_received: after.payload_bytes_received - before.payload_bytes_received,
        server_mapped_percent: mapped_percent(
            after.bytes_mapped - before.bytes_mapped,
            after.bytes_copied - before.bytes_copied,
        ),
        clients_received,
        clients_mapped_percent: mapped_percent(cm, cc),
    })
}
