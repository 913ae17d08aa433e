//! An upload session: begin with the blob's size, write its chunks, then
//! commit (verify, persist, publish) or abort.
//!
//! The session owns its temporary file `DIR/.tmp-<id>-<tag>` and removes it
//! when it is dropped without a successful commit, so every way an upload
//! can end (abort, a failed commit, a broken stream, shutdown) leaves
//! nothing behind. The node's `Put` handler drives it:
//! [`UploadSession::begin`] on the stream's header,
//! [`UploadSession::append`] for each chunk message,
//! [`UploadSession::commit`] when the client half-closes, dropping it if
//! the stream breaks. [`UploadSession::write_chunk`] writes a chunk at any
//! offset, for a writer whose chunks may arrive out of order.
//!
//! Nothing here is allocated in proportion to the size announced at
//! `begin`: the chunk CRC table grows by 4 bytes per chunk actually
//! written, and the header is built at commit, once every chunk is there.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use pagerpc::Status;

use super::format::{chunk_count, header_len, BlobHeader, MAX_CHUNKS};
use super::{
    check_id, chunk_len, io_status, open_split, sync_dir, write_split, BlobInfo, PutHeader,
    MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, PAGE,
};

/// Prefix of temporary upload files in the node's directory.
pub const TMP_PREFIX: &str = ".tmp-";

/// What writing one chunk did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkWritten {
    /// Bytes of the blob received so far (each chunk counted once).
    pub received: u64,
    /// Whether the chunk had to be copied into fresh page-aligned memory
    /// because the kernel refused `O_DIRECT` from the received pages.
    pub copied: bool,
}

/// One blob being uploaded. See the [module documentation](self).
#[derive(Debug)]
pub struct UploadSession {
    id: String,
    tmp: PathBuf,
    size: u64,
    chunk_size: u64,
    chunks: u64,
    version: u64,
    crc: Option<u32>,
    /// Where the data starts in the file (the header's length).
    data_offset: u64,
    /// `O_DIRECT` descriptor for whole pages (buffered if direct I/O is off).
    direct: File,
    /// Buffered descriptor for the last chunk's tail.
    buffered: File,
    /// CRCs of chunks `0..crcs.len()`, all written.
    crcs: Vec<u32>,
    /// CRCs of chunks written past that prefix (out of order).
    ahead: BTreeMap<u64, u32>,
    received: u64,
    /// Set once the file is published (or must be left for a restart).
    keep_file: bool,
}

impl UploadSession {
    /// Checks the request (id, chunk size, chunk count) and creates the
    /// temporary file in `dir`, named with `tag` (random, so uploads of the
    /// same id do not collide). The node checks its own limits (size, disk
    /// space, uploads under way) before calling this.
    ///
    /// # Errors
    /// [`InvalidArgument`](pagerpc::Code::InvalidArgument) for a bad id,
    /// chunk size or chunk count; the file's creation error otherwise
    /// ([`ResourceExhausted`](pagerpc::Code::ResourceExhausted) when the
    /// disk is full or the node is out of file descriptors).
    pub fn begin(
        dir: &Path,
        req: &PutHeader,
        tag: u64,
        direct_io: bool,
    ) -> Result<UploadSession, Status> {
        check_id(&req.id).map_err(Status::invalid_argument)?;
        let cs = req.chunk_size;
        if !cs.is_multiple_of(PAGE) || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(Status::invalid_argument(format!(
                "chunk size {cs} must be a multiple of {PAGE} between {MIN_CHUNK_SIZE} and \
                 {MAX_CHUNK_SIZE}"
            )));
        }
        let chunks = chunk_count(req.size, cs);
        if chunks > MAX_CHUNKS {
            return Err(Status::invalid_argument(format!(
                "'{}': {} bytes in chunks of {cs} is {chunks} chunks, over the limit of \
                 {MAX_CHUNKS} chunks per blob; use larger chunks",
                req.id, req.size
            )));
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{tag:016x}", req.id));
        let mut oo = OpenOptions::new();
        oo.write(true).create_new(true).mode(0o644);
        let (direct, buffered, _) = open_split(&tmp, &oo, direct_io).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_status(format_args!("cannot create {}", tmp.display()), &e)
        })?;
        Ok(UploadSession {
            id: req.id.clone(),
            tmp,
            size: req.size,
            chunk_size: cs,
            chunks,
            version: req.version,
            crc: req.crc32c,
            data_offset: header_len(req.id.len(), chunks),
            direct,
            buffered,
            crcs: Vec::new(),
            ahead: BTreeMap::new(),
            received: 0,
            keep_file: false,
        })
    }

    /// The blob id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The blob's announced size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The chunk size.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Bytes the blob's file will still grow by: the header and the data
    /// not received yet (what the upload still needs from the disk).
    pub fn bytes_to_come(&self) -> u64 {
        (self.data_offset + self.size).saturating_sub(self.received)
    }

    /// Chunks not written yet.
    pub fn missing(&self) -> u64 {
        self.chunks - self.crcs.len() as u64 - self.ahead.len() as u64
    }

    /// Offset of the first chunk not written yet (the size once all are):
    /// where [`append`](Self::append) writes.
    pub fn next_offset(&self) -> u64 {
        (self.crcs.len() as u64 * self.chunk_size).min(self.size)
    }

    /// Writes the next chunk in order (a stream's next message).
    ///
    /// # Errors
    /// As [`write_chunk`](Self::write_chunk); also when every chunk is
    /// already written.
    pub fn append(&mut self, data: &[u8], crc32c: Option<u32>) -> Result<ChunkWritten, Status> {
        if self.crcs.len() as u64 >= self.chunks {
            return Err(Status::invalid_argument(format!(
                "'{}' already has all its {} bytes; a chunk of {} more was sent",
                self.id,
                self.size,
                data.len()
            )));
        }
        self.write_chunk(self.next_offset(), data, crc32c)
    }

    /// Writes the chunk at `offset` (a chunk boundary; its length must be
    /// the chunk size, or what is left for the last chunk), checking its
    /// CRC32C when the client sent one. Writing a chunk again replaces it.
    ///
    /// # Errors
    /// [`InvalidArgument`](pagerpc::Code::InvalidArgument) for an offset or
    /// length that is not a chunk of this blob,
    /// [`DataLoss`](pagerpc::Code::DataLoss) when the bytes do not match
    /// `crc32c` (nothing is recorded), the write's error otherwise.
    pub fn write_chunk(
        &mut self,
        offset: u64,
        data: &[u8],
        crc32c: Option<u32>,
    ) -> Result<ChunkWritten, Status> {
        if !offset.is_multiple_of(self.chunk_size) || offset >= self.size {
            return Err(Status::invalid_argument(format!(
                "offset {offset} is not a chunk boundary of '{}' ({} bytes in chunks of {})",
                self.id, self.size, self.chunk_size
            )));
        }
        let want = chunk_len(self.size, self.chunk_size, offset);
        if data.len() as u64 != want {
            return Err(Status::invalid_argument(format!(
                "chunk at offset {offset} of '{}' has {} bytes; it must have {want}",
                self.id,
                data.len()
            )));
        }
        let crc = crc32c::crc32c(data);
        if let Some(sent) = crc32c {
            if sent != crc {
                return Err(Status::data_loss(format!(
                    "chunk at offset {offset} of '{}' arrived with CRC32C {crc:#010x}, but the \
                     client computed {sent:#010x}; it was not stored",
                    self.id
                )));
            }
        }
        let copied = write_split(
            &self.direct,
            &self.buffered,
            data,
            self.data_offset + offset,
        )
        .map_err(|e| io_status(format_args!("writing '{}' at {offset}", self.id), &e))?;
        let idx = offset / self.chunk_size;
        let prefix = self.crcs.len() as u64;
        let first = if idx < prefix {
            self.crcs[idx as usize] = crc;
            false
        } else if idx == prefix {
            self.crcs.push(crc);
            while let Some(c) = self.ahead.remove(&(self.crcs.len() as u64)) {
                self.crcs.push(c);
            }
            true
        } else {
            self.ahead.insert(idx, crc).is_none()
        };
        if first {
            self.received += want;
        }
        Ok(ChunkWritten {
            received: self.received,
            copied,
        })
    }

    /// Verifies the whole blob against the CRC32C given here or at begin,
    /// writes the header, fsyncs the file, renames it to `dest`, fsyncs its
    /// directory, and returns the stored blob's description. The session is
    /// used up either way; on failure its temporary file is removed.
    ///
    /// # Errors
    /// [`FailedPrecondition`](pagerpc::Code::FailedPrecondition) with chunks
    /// missing (see [`missing`](Self::missing): check it first to keep the
    /// session), [`InvalidArgument`](pagerpc::Code::InvalidArgument) without
    /// a CRC32C or with two that differ, [`DataLoss`](pagerpc::Code::DataLoss)
    /// when the data does not match it, the I/O error otherwise.
    pub fn commit(mut self, dest: &Path, crc32c: Option<u32>) -> Result<BlobInfo, Status> {
        let missing = self.missing();
        if missing > 0 {
            return Err(Status::failed_precondition(format!(
                "commit of '{}' with {missing} of {} chunks still missing",
                self.id, self.chunks
            )));
        }
        let expected = match (self.crc, crc32c) {
            (Some(a), Some(b)) if a != b => {
                return Err(Status::invalid_argument(format!(
                    "'{}': the put header gave CRC32C {a:#010x} but the end message gave \
                     {b:#010x}",
                    self.id
                )))
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => {
                return Err(Status::invalid_argument(format!(
                    "'{}': no CRC32C given in the put header or the end message",
                    self.id
                )))
            }
        };
        let mut whole = 0u32;
        let mut off = 0;
        for c in &self.crcs {
            let len = chunk_len(self.size, self.chunk_size, off);
            whole = crc32c::crc32c_combine(whole, *c, len as usize);
            off += len;
        }
        if whole != expected {
            return Err(Status::data_loss(format!(
                "blob '{}' ({} bytes) failed its checksum: the client's CRC32C is \
                 {expected:#010x}, the data received has {whole:#010x}; the upload was discarded",
                self.id, self.size
            )));
        }
        let header = BlobHeader {
            id: Some(self.id.clone()),
            size: self.size,
            crc32c: whole,
            chunk_size: self.chunk_size,
            version: self.version,
            chunk_crcs: std::mem::take(&mut self.crcs),
        };
        debug_assert_eq!(header.len(), self.data_offset);
        let what = |step: &str| format!("committing '{}': {step}", self.id);
        let hb = header
            .encode()
            .map_err(|e| io_status(what("header memory"), &e))?;
        write_split(&self.direct, &self.buffered, &hb, 0)
            .map_err(|e| io_status(what("writing the header"), &e))?;
        self.direct
            .sync_all()
            .map_err(|e| io_status(what("fsync"), &e))?;
        fs::rename(&self.tmp, dest).map_err(|e| io_status(what("rename"), &e))?;
        self.keep_file = true;
        let dir = dest.parent().unwrap_or(Path::new("."));
        sync_dir(dir).map_err(|e| io_status(what("fsync of the directory"), &e))?;
        Ok(BlobInfo {
            id: self.id.clone(),
            size: self.size,
            crc32c: whole,
            chunk_size: self.chunk_size,
            version: self.version,
            problem: String::new(),
        })
    }

    /// Gives the upload up: closes and removes the temporary file (as
    /// dropping the session does).
    pub fn abort(self) {}

    /// Closes the session but leaves its temporary file, as a crash would
    /// (the node's next start removes it).
    pub fn leave_behind(mut self) {
        self.keep_file = true;
    }
}

impl Drop for UploadSession {
    fn drop(&mut self) {
        if !self.keep_file {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Removes temporary files left by uploads that never committed (a crash
/// or kill of the node); returns how many.
///
/// # Errors
/// When the directory cannot be read or a file removed.
pub fn clean_temps(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for ent in fs::read_dir(dir)? {
        let ent = ent?;
        if ent.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
            fs::remove_file(ent.path())?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether `dir`'s filesystem accepts `O_DIRECT` writes from page-aligned
/// memory.
pub fn probe_direct(dir: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let p = dir.join(format!("{TMP_PREFIX}probe-{}", std::process::id()));
    let ok = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&p)
        .and_then(|f| {
            let b = pagerpc::PageBuf::new(PAGE as usize)?;
            f.write_all_at(&b, 0)
        })
        .is_ok();
    let _ = fs::remove_file(&p);
    ok
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct Scratch(pub(crate) PathBuf);

    impl Scratch {
        pub(crate) fn new(name: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!(
                "pagerpc-storage-unit-{name}-{}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            Scratch(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    pub(crate) fn req(id: &str, size: u64) -> PutHeader {
        PutHeader {
            id: id.into(),
            size,
            crc32c: None,
            chunk_size: MIN_CHUNK_SIZE,
            version: 7,
        }
    }

    #[test]
    fn chunks_in_any_order_then_in_order_commit_whole() {
        let dir = Scratch::new("session");
        let cs = MIN_CHUNK_SIZE as usize;
        let blob = data(3 * cs + 100, 1);
        let mut s = UploadSession::begin(&dir.0, &req("b", blob.len() as u64), 1, false).unwrap();
        // Out of order (as concurrent unary calls arrive), then appended
        // in order (as a stream sends them).
        s.write_chunk(2 * cs as u64, &blob[2 * cs..3 * cs], None)
            .unwrap();
        s.write_chunk(0, &blob[..cs], Some(crc32c::crc32c(&blob[..cs])))
            .unwrap();
        assert_eq!(s.next_offset(), cs as u64);
        s.append(&blob[cs..2 * cs], None).unwrap();
        assert_eq!(s.next_offset(), 3 * cs as u64, "chunk 2 was already there");
        assert_eq!(s.missing(), 1);
        let w = s.append(&blob[3 * cs..], None).unwrap();
        assert_eq!(w.received, blob.len() as u64);
        assert!(
            s.append(&blob[..1], None).is_err(),
            "nothing is left to send"
        );
        let dest = dir.0.join("b.blob");
        let info = s.commit(&dest, Some(crc32c::crc32c(&blob))).unwrap();
        assert_eq!(info.size, blob.len() as u64);
        let file = fs::read(&dest).unwrap();
        let h = BlobHeader::decode(&file).unwrap();
        assert_eq!(h.id.as_deref(), Some("b"));
        assert_eq!(&file[h.len() as usize..], &blob[..]);
        assert_eq!(
            fs::read_dir(&dir.0).unwrap().count(),
            1,
            "no temporary file"
        );
    }

    #[test]
    fn a_dropped_or_failed_session_leaves_no_file() {
        let dir = Scratch::new("dropped");
        let s = UploadSession::begin(&dir.0, &req("d", 10), 1, false).unwrap();
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 1);
        drop(s);
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0);
        let mut s = UploadSession::begin(&dir.0, &req("d", 10), 2, false).unwrap();
        let e = s.append(&[1; 10], Some(5)).unwrap_err();
        assert_eq!(e.code(), pagerpc::Code::DataLoss);
        s.append(&[1; 10], None).unwrap();
        let e = s.commit(&dir.0.join("d.blob"), Some(5)).unwrap_err();
        assert_eq!(e.code(), pagerpc::Code::DataLoss);
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0);
    }
}
