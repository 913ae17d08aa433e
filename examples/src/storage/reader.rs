//! Reading blobs: a [`BlobFile`] is one blob file opened and its header
//! checked (including that the header names the blob the file name says),
//! and a [`BlobReader`] walks its chunks. The node's `Get` handler
//! opens a reader once and sends [`BlobReader::next_chunk`] until it
//! returns `None`.
//!
//! Reads use the descriptor opened at the start, so a reader keeps reading
//! the version it started with even if the blob is replaced or deleted
//! meanwhile (the old file stays readable until it is closed).

use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use pagerpc::{PageBuf, Status};

use super::format::BlobHeader;
use super::{chunk_len, io_status, round_up_page, BlobInfo, GetChunk, PAGE};

/// Which file a path named when it was looked at: device, inode, and the
/// inode's change time and size. A blob file is only ever replaced by a
/// rename (a new inode) or changed in place (a new ctime), so a cached
/// descriptor is still the blob's current file exactly when the path's
/// identity equals the descriptor's. While the descriptor is open its
/// inode cannot be freed, so its number cannot be reused by another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileIdent {
    dev: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
    len: u64,
}

impl FileIdent {
    /// The identity in `meta` (from `stat` on a path or `fstat` on a
    /// descriptor).
    pub fn of(meta: &Metadata) -> FileIdent {
        FileIdent {
            dev: meta.dev(),
            ino: meta.ino(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
            len: meta.len(),
        }
    }
}

/// Reads `buf.len()` bytes at `pos` (fewer at end of file), page by page
/// aligned as `O_DIRECT` needs; returns the bytes read.
fn read_full_at(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Reads and checks the header of blob `id` from `file` (opened with or
/// without `O_DIRECT`): its own checksum, and that it was written for
/// `id` (format-1 headers carry no id and are taken as they are).
///
/// # Errors
/// [`DataLoss`](pagerpc::Code::DataLoss) naming what is wrong with the
/// header, or that the file holds another blob; the read error otherwise.
pub fn read_header(file: &File, id: &str) -> Result<BlobHeader, Status> {
    let read_err = |e: io::Error| io_status(format_args!("reading the header of '{id}'"), &e);
    let corrupt = |e: String| {
        Status::data_loss(format!(
            "blob '{id}' is corrupt on this node: its header is unreadable: {e}"
        ))
    };
    let mut first = PageBuf::new(PAGE as usize).map_err(read_err)?;
    let n = read_full_at(file, &mut first, 0).map_err(read_err)?;
    let declared = BlobHeader::declared_len(&first[..n]).map_err(corrupt)?;
    let header = if declared <= PAGE {
        BlobHeader::decode(&first[..n]).map_err(corrupt)?
    } else {
        // At most format::max_header_len(), about 4 MiB.
        let mut all = PageBuf::new(round_up_page(declared) as usize).map_err(read_err)?;
        let n = read_full_at(file, &mut all, 0).map_err(read_err)?;
        BlobHeader::decode(&all[..n]).map_err(corrupt)?
    };
    match &header.id {
        Some(written) if written != id => Err(Status::data_loss(format!(
            "the file for blob '{id}' holds blob '{written}' (it was renamed or copied over \
             '{id}'); not serving it as '{id}'"
        ))),
        _ => Ok(header),
    }
}

/// One blob file, open for reading, its header read and checked.
#[derive(Debug)]
pub struct BlobFile {
    id: String,
    file: File,
    header: BlobHeader,
    ident: FileIdent,
}

impl BlobFile {
    /// Opens blob `id`'s file at `path` (with `O_DIRECT` when `direct`) and
    /// reads its header with [`read_header`].
    ///
    /// # Errors
    /// [`NotFound`](pagerpc::Code::NotFound) when there is no such file,
    /// the errors of [`read_header`], the open error otherwise.
    pub fn open(path: &Path, id: &str, direct: bool) -> Result<BlobFile, Status> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound {
                    Status::not_found(format!("no blob '{id}' on this node"))
                } else {
                    io_status(format_args!("cannot open {}", path.display()), &e)
                }
            })?;
        let ident = FileIdent::of(
            &file
                .metadata()
                .map_err(|e| io_status(format_args!("cannot stat {}", path.display()), &e))?,
        );
        let header = read_header(&file, id)?;
        Ok(BlobFile {
            id: id.to_owned(),
            file,
            header,
            ident,
        })
    }

    /// The blob id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The checked header.
    pub fn header(&self) -> &BlobHeader {
        &self.header
    }

    /// The identity of the open file.
    pub fn ident(&self) -> FileIdent {
        self.ident
    }

    /// The blob's description (no problem).
    pub fn info(&self) -> BlobInfo {
        BlobInfo {
            id: self.id.clone(),
            size: self.header.size,
            crc32c: self.header.crc32c,
            chunk_size: self.header.chunk_size,
            version: self.header.version,
            problem: String::new(),
        }
    }

    /// Reads the chunk at `offset` (a chunk boundary) of `len` bytes (the
    /// chunk's length) into page-aligned memory and checks it against the
    /// CRC32C stored at PUT time; returns that CRC and the bytes.
    ///
    /// # Errors
    /// [`InvalidArgument`](pagerpc::Code::InvalidArgument) when the bytes
    /// asked for are not a chunk, [`DataLoss`](pagerpc::Code::DataLoss)
    /// when the file is short or the chunk fails its checksum, the read
    /// error otherwise.
    pub fn read_chunk(&self, offset: u64, len: u64) -> Result<(u32, PageBuf), Status> {
        let h = &self.header;
        let id = &self.id;
        if !offset.is_multiple_of(h.chunk_size)
            || offset >= h.size
            || len != chunk_len(h.size, h.chunk_size, offset)
        {
            return Err(Status::invalid_argument(format!(
                "bytes {offset}+{len} are not a chunk of '{id}' ({} bytes in chunks of {})",
                h.size, h.chunk_size
            )));
        }
        let read_err = |e: io::Error| io_status(format_args!("reading '{id}' at {offset}"), &e);
        let mut buf = PageBuf::for_overwrite(round_up_page(len) as usize).map_err(read_err)?;
        let n = read_full_at(&self.file, &mut buf, h.len() + offset).map_err(read_err)?;
        if (n as u64) < len {
            return Err(Status::data_loss(format!(
                "blob '{id}' is corrupt on this node: the file ends {n} bytes into the chunk at \
                 offset {offset}, which has {len}"
            )));
        }
        buf.truncate(len as usize);
        let idx = (offset / h.chunk_size) as usize;
        let stored = h.chunk_crcs[idx];
        let crc = crc32c::crc32c(&buf);
        if crc != stored {
            return Err(Status::data_loss(format!(
                "blob '{id}' is corrupt on this node: chunk {idx} (bytes {offset}..{}) read from \
                 disk has CRC32C {crc:#010x}, but {stored:#010x} was stored when it was written",
                offset + len
            )));
        }
        Ok((stored, buf))
    }
}

/// Walks a blob's chunks in order, from one open file. See the
/// [module documentation](self).
#[derive(Debug)]
pub struct BlobReader {
    blob: Arc<BlobFile>,
    next: u64,
}

impl BlobReader {
    /// A reader from the start of `blob`.
    pub fn new(blob: Arc<BlobFile>) -> BlobReader {
        BlobReader { blob, next: 0 }
    }

    /// A reader from `offset` (a chunk boundary, or the blob's size: then
    /// there is nothing to read), to resume a transfer.
    ///
    /// # Errors
    /// [`InvalidArgument`](pagerpc::Code::InvalidArgument) when `offset`
    /// is not a chunk boundary within the blob.
    pub fn starting_at(blob: Arc<BlobFile>, offset: u64) -> Result<BlobReader, Status> {
        let h = blob.header();
        if offset != h.size && (!offset.is_multiple_of(h.chunk_size) || offset > h.size) {
            return Err(Status::invalid_argument(format!(
                "offset {offset} is not a chunk boundary of '{}' ({} bytes in chunks of {})",
                blob.id(),
                h.size,
                h.chunk_size
            )));
        }
        Ok(BlobReader { blob, next: offset })
    }

    /// The blob being read.
    pub fn blob(&self) -> &BlobFile {
        &self.blob
    }

    /// The offset of the next chunk.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next chunk (its offset and stored CRC32C, and its bytes), or
    /// `None` at the end. After an error the reader stays where it was.
    pub fn next_chunk(&mut self) -> Option<Result<(GetChunk, PageBuf), Status>> {
        let h = self.blob.header();
        if self.next >= h.size {
            return None;
        }
        let len = chunk_len(h.size, h.chunk_size, self.next);
        let offset = self.next;
        Some(self.blob.read_chunk(offset, len).map(|(crc32c, buf)| {
            self.next += len;
            (GetChunk { offset, crc32c }, buf)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::upload::tests::{data, req, Scratch};
    use crate::storage::upload::UploadSession;
    use crate::storage::MIN_CHUNK_SIZE;

    fn put(dir: &Path, id: &str, blob: &[u8]) {
        let mut s = UploadSession::begin(dir, &req(id, blob.len() as u64), 9, false).unwrap();
        for c in blob.chunks(MIN_CHUNK_SIZE as usize) {
            s.append(c, None).unwrap();
        }
        s.commit(&dir.join(format!("{id}.blob")), Some(crc32c::crc32c(blob)))
            .unwrap();
    }

    #[test]
    fn a_reader_keeps_reading_the_version_it_opened() {
        let dir = Scratch::new("reader");
        let path = dir.0.join("r.blob");
        let (v1, v2) = (data(150_000, 1), data(150_000, 2));
        put(&dir.0, "r", &v1);
        let mut reader = BlobReader::new(Arc::new(BlobFile::open(&path, "r", false).unwrap()));
        let (_, first) = reader.next_chunk().unwrap().unwrap();
        put(&dir.0, "r", &v2); // replaced mid-read
        let mut got = first.to_vec();
        while let Some(c) = reader.next_chunk() {
            got.extend_from_slice(&c.unwrap().1);
        }
        assert_eq!(got, v1, "the whole first version, from one descriptor");
        let now = BlobFile::open(&path, "r", false).unwrap();
        assert_ne!(now.ident(), reader.blob().ident());
        assert_eq!(
            now.read_chunk(0, MIN_CHUNK_SIZE).unwrap().1.to_vec()[..],
            v2[..65536]
        );
        assert_eq!(
            BlobFile::open(&path, "other", false).unwrap_err().code(),
            pagerpc::Code::DataLoss
        );
    }
}
