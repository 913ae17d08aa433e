//! The `Lab` service's async implementation (`LabAsync`), for the tests of
//! the generated async server: the same answers as [`LabImpl`]'s blocking
//! one, with an `.await` in each handler.

use pagerpc::typed::{AsyncInbound, AsyncOutbound, NoPayload, WithPayload};
use pagerpc::{Context, MetadataEntry, Pages, Payload, Status};

use crate::lab::{Ack, Blob, LabAsync, Note};
use crate::lab_impl::{page_buf, pattern, pattern_bytes, reversed, sha256_hex};
use crate::LabImpl;

fn ack(parts: &[&[u8]], count: u64) -> Ack {
    Ack {
        bytes: parts.iter().map(|p| p.len() as u64).sum(),
        count,
        sha256: sha256_hex(parts),
    }
}

impl LabAsync for LabImpl {
    async fn say(&self, _ctx: Context, request: Note) -> Result<Note, Status> {
        tokio::task::yield_now().await;
        Ok(Note {
            text: request.text.to_uppercase(),
            seq: request.seq,
        })
    }

    async fn store(&self, _ctx: Context, _request: Blob, payload: Pages) -> Result<Ack, Status> {
        tokio::task::yield_now().await;
        Ok(ack(&[&payload], 1))
    }

    async fn fetch(&self, _ctx: Context, request: Blob) -> Result<(Blob, Payload), Status> {
        tokio::task::yield_now().await;
        let len = usize::try_from(request.len)
            .ok()
            .filter(|&l| l <= 64 << 20)
            .ok_or_else(|| Status::invalid_argument("len over 64 MiB"))?;
        let body = page_buf((0..len).map(|i| pattern(i, request.seq)))?;
        Ok((request, body.into()))
    }

    async fn mirror(
        &self,
        _ctx: Context,
        request: Blob,
        payload: Pages,
    ) -> Result<(Blob, Payload), Status> {
        tokio::task::yield_now().await;
        Ok((request, reversed(&payload)?.into()))
    }

    async fn upload(
        &self,
        _ctx: Context,
        mut requests: AsyncInbound<Blob, WithPayload>,
    ) -> Result<Ack, Status> {
        let mut kept = Vec::new();
        while let Some((blob, pages)) = requests.recv().await? {
            if blob.len != pages.len() as u64 {
                return Err(Status::invalid_argument("chunk length differs"));
            }
            kept.push(pages);
        }
        let parts: Vec<&[u8]> = kept.iter().map(|p| &p[..]).collect();
        Ok(ack(&parts, kept.len() as u64))
    }

    async fn count(
        &self,
        _ctx: Context,
        mut requests: AsyncInbound<Note, NoPayload>,
    ) -> Result<Ack, Status> {
        let mut n = 0;
        while let Some(note) = requests.recv().await? {
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

    async fn download(
        &self,
        _ctx: Context,
        request: Blob,
        mut responses: AsyncOutbound<Blob, WithPayload>,
    ) -> Result<(), Status> {
        for i in 0..request.seq {
            let chunk = Blob {
                name: request.name.clone(),
                len: request.len,
                seq: i,
            };
            responses
                .send(&chunk, pattern_bytes(request.len as usize, i))
                .await?;
        }
        Ok(())
    }

    async fn split(
        &self,
        _ctx: Context,
        request: Blob,
        payload: Pages,
        mut responses: AsyncOutbound<Blob, WithPayload>,
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
            responses.send(&msg, chunk.to_vec()).await?;
        }
        Ok(())
    }

    async fn countdown(
        &self,
        _ctx: Context,
        request: Note,
        mut responses: AsyncOutbound<Note, NoPayload>,
    ) -> Result<(), Status> {
        for seq in (1..=request.seq).rev() {
            responses
                .send(&Note {
                    text: request.text.clone(),
                    seq,
                })
                .await?;
        }
        Ok(())
    }

    async fn exchange(
        &self,
        _ctx: Context,
        mut requests: AsyncInbound<Blob, WithPayload>,
        mut responses: AsyncOutbound<Blob, WithPayload>,
    ) -> Result<(), Status> {
        while let Some((blob, pages)) = requests.recv().await? {
            let back = reversed(&pages)?;
            drop(pages);
            responses.send(&blob, back).await?;
        }
        Ok(())
    }

    async fn chat(
        &self,
        _ctx: Context,
        mut requests: AsyncInbound<Note, NoPayload>,
        mut responses: AsyncOutbound<Note, NoPayload>,
    ) -> Result<(), Status> {
        let mut n = 0u64;
        while let Some(note) = requests.recv().await? {
            responses
                .send(&Note {
                    text: note.text.to_uppercase(),
                    seq: note.seq,
                })
                .await?;
            n += 1;
        }
        responses.set_trailers(vec![MetadataEntry {
            key: "notes".into(),
            value: n.to_string().into_bytes(),
        }]);
        Ok(())
    }

    async fn r#type(&self, _ctx: Context, request: Note) -> Result<Note, Status> {
        Ok(request)
    }
}
