//! The README's embedding example ("From a .proto service"), as written
//! there, run against its generated code (`proto/blobs.proto`).

mod blobs {
    pagerpc::include_proto!("blobs");
}

use blobs::{Blob, Blobs, BlobsClient, BlobsServer, Stored};
use pagerpc::typed::{Inbound, WithPayload};
use pagerpc::{Context, Pages, Payload, Server, Status};

struct Store;

impl Blobs for Store {
    fn put(&self, _ctx: &Context, _req: Blob, payload: Pages) -> Result<Stored, Status> {
        Ok(Stored {
            bytes: payload.len() as u64,
        })
    }

    fn get(&self, _ctx: &Context, req: Blob) -> Result<(Blob, Payload), Status> {
        Ok((req, vec![7u8; 1 << 20].into()))
    }

    fn upload(
        &self,
        _ctx: &Context,
        chunks: Inbound<'_, Blob, WithPayload>,
    ) -> Result<Stored, Status> {
        let mut bytes = 0;
        for chunk in chunks {
            let (_blob, pages) = chunk?; // a stream cut short is an Err
            bytes += pages.len() as u64;
        }
        Ok(Stored { bytes })
    }
}

#[test]
fn readme_embedding_example() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::builder()
        .add_service(BlobsServer::new(Store))
        .bind("127.0.0.1:0")?;
    let addr = server.local_addr();

    let client = BlobsClient::connect(addr)?;
    let id = Blob {
        id: "photo-1".into(),
    };
    assert_eq!(client.put(&id, vec![0u8; 1 << 20])?.message.bytes, 1 << 20);
    let got = client.get(&id)?; // got.message: Blob, got.payload: Pages
    assert_eq!(got.payload.len(), 1 << 20);

    let (mut tx, resp) = client.upload()?;
    for _ in 0..4 {
        tx.send(&id, vec![1u8; 1 << 20])?;
    }
    tx.finish()?;
    assert_eq!(resp.wait()?.message.bytes, 4 << 20);
    server.shutdown();
    Ok(())
}
