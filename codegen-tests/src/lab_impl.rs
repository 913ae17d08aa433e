//! An implementation of the `Lab` service for the tests.

use pagerpc::typed::{Inbound, NoPayload, Outbound, WithPayload};
use pagerpc::{Context, MetadataEntry, PageBuf, Pages, Payload, Status};

use sha2::{Digest, Sha256};

use crate::lab::{Ack, Blob, Lab, Note};

/// Byte `i` of the `Fetch` pattern for `seq`.
pub fn pattern(i: usize, seq: u64) -> u8 {
    (i as u64).wrapping_mul(7).wrapping_add(seq) as u8
}

/// `len` bytes of the `Fetch` pattern for `seq`.
pub fn pattern_bytes(len: usize, seq: u64) -> Vec<u8> {
    (0..len).map(|i| pattern(i, seq)).collect()
}

/// SHA-256 of `parts`, in order, as lowercase hex.
pub fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The test implementation.
#[derive(Debug, Default)]
pub struct LabImpl;

impl LabImpl {
    fn ack(&self, parts: &[&[u8]], count: u64) -> Ack {
        Ack {
            bytes: parts.iter().map(|p| p.len() as u64).sum(),
            count,
            sha256: sha256_hex(parts),
        }
    }
}

/// `bytes` in a page-aligned buffer: a response payload that can go out
/// with `MSG_ZEROCOPY` and be mapped by the receiver.
pub(crate) fn page_buf(bytes: impl ExactSizeIterator<Item = u8>) -> Result<PageBuf, Status> {
    let mut pb = PageBuf::new(bytes.len())
        .map_err(|e| Status::resource_exhausted(format!("no memory for the payload: {e}")))?;
    for (d, s) in pb.iter_mut().zip(bytes) {
        *d = s;
    }
    Ok(pb)
}

pub(crate) fn reversed(p: &Pages) -> Result<PageBuf, Status> {
    page_buf(p.iter().rev().copied())
}

impl Lab for LabImpl {
    fn say(&self, _ctx: &Context, request: Note) -> Result<Note, Status> {
        Ok(Note {
            text: request.text.to_uppercase(),
            seq: request.seq,
        })
    }

    fn store(&self, _ctx: &Context, _request: Blob, payload: Pages) -> Result<Ack, Status> {
        Ok(self.ack(&[&payload], 1))
    }

    fn fetch(&self, _ctx: &Context, request: Blob) -> Result<(Blob, Payload), Status> {
        let len = usize::try_from(request.len)
            .ok()
            .filter(|&l| l <= 64 << 20)
            .ok_or_else(|| Status::invalid_argument("len over 64 MiB"))?;
        let body = page_buf((0..len).map(|i| pattern(i, request.seq)))?;
        Ok((request, body.into()))
    }

    fn mirror(
        &self,
        _ctx: &Context,
        request: Blob,
        payload: Pages,
    ) -> Result<(Blob, Payload), Status> {
        Ok((request, reversed(&payload)?.into()))
    }

    fn upload(
        &self,
        _ctx: &Context,
        requests: Inbound<'_, Blob, WithPayload>,
    ) -> Result<Ack, Status> {
        let mut kept = Vec::new();
        for m in requests {
            let (blob, pages) = m?;
            if blob.len != pages.len() as u64 {
                return Err(Status::invalid_argument(format!(
                    "chunk {} says {} bytes but carries {}",
                    blob.seq,
                    blob.len,
                    pages.len()
                )));
            }
            kept.push(pages);
        }
        let parts: Vec<&[u8]> = kept.iter().map(|p| &p[..]).collect();
        Ok(self.ack(&parts, kept.len() as u64))
    }

    fn count(
        &self,
        _ctx: &Context,
        mut requests: Inbound<'_, Note, NoPayload>,
    ) -> Result<Ack, Status> {
        let mut n = 0;
        while let Some(note) = requests.recv()? {
            if note.seq != n {
                return Err(Status::invalid_argument("notes out of order"));
            }
            n += 1;
        }
        Ok(Ack {
            count: n,
            ..Ack::default()
        })
    }

    fn download(
        &self,
        _ctx: &Context,
        request: Blob,
        mut responses: Outbound<'_, Blob, WithPayload>,
    ) -> Result<(), Status> {
        for i in 0..request.seq {
            let chunk = Blob {
                name: request.name.clone(),
                len: request.len,
                seq: i,
            };
            responses.send(&chunk, pattern_bytes(request.len as usize, i))?;
        }
        Ok(())
    }

    fn split(
        &self,
        _ctx: &Context,
        request: Blob,
        payload: Pages,
        mut responses: Outbound<'_, Blob, WithPayload>,
    ) -> Result<(), Status> {
        let size = usize::try_from(request.len)
            .ok()
            .filter(|&l| l > 0)
            .ok_or_else(|| Status::invalid_argument("len must be positive"))?;
        for (i, chunk) in payload.chunks(size).enumerate() {
            let msg = Blob {
                name: request.name.clone(),
                len: chunk.len() as u64,
                seq: i as u64,
            };
            responses.send(&msg, chunk.to_vec())?;
        }
        Ok(())
    }

    fn countdown(
        &self,
        _ctx: &Context,
        request: Note,
        mut responses: Outbound<'_, Note, NoPayload>,
    ) -> Result<(), Status> {
        for seq in (1..=request.seq).rev() {
            responses.send(&Note {
                text: request.text.clone(),
                seq,
            })?;
        }
        Ok(())
    }

    fn exchange(
        &self,
        _ctx: &Context,
        mut requests: Inbound<'_, Blob, WithPayload>,
        mut responses: Outbound<'_, Blob, WithPayload>,
    ) -> Result<(), Status> {
        while let Some((blob, pages)) = requests.recv()? {
            let back = reversed(&pages)?;
            drop(pages);
            responses.send(&blob, back)?;
        }
        Ok(())
    }

    fn chat(
        &self,
        _ctx: &Context,
        requests: Inbound<'_, Note, NoPayload>,
        mut responses: Outbound<'_, Note, NoPayload>,
    ) -> Result<(), Status> {
        let mut n = 0u64;
        for m in requests {
            let (note, ()) = m?;
            responses.send(&Note {
                text: note.text.to_uppercase(),
                seq: note.seq,
            })?;
            n += 1;
        }
        responses.set_trailers(vec![MetadataEntry {
            key: "notes".into(),
            value: n.to_string().into_bytes(),
        }]);
        Ok(())
    }

    fn r#type(&self, _ctx: &Context, request: Note) -> Result<Note, Status> {
        Ok(request)
    }
}
