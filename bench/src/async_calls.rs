//! `pingpong --async` and `concurrent --async`: the same workloads as the
//! blocking modes, through `AsyncClient` and `AsyncServer` (feature
//! `tokio`), set up the way `../shared/peers/tonic-bulk` runs tonic: the
//! server on its own runtime with one worker, the client body as a task on
//! another runtime with one worker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc::proto::MetadataEntry;
use pagerpc::{AsyncClient, AsyncServer, Payload};

use crate::{report, Res};

/// Errors that may cross tasks.
type ARes<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
}

/// Runs `body` with a client connected to an echo server, each on its own
/// one-worker runtime.
fn with_client<F, Fut>(body: F) -> Res
where
    F: FnOnce(AsyncClient) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ARes> + Send + 'static,
{
    let srt = runtime()?;
    let server = srt.block_on(
        AsyncServer::builder()
            .register("echo", |_ctx, req: MetadataEntry, pages| async move {
                Ok((req, Payload::Pages(pages)))
            })
            .bind("127.0.0.1:0"),
    )?;
    let addr = server.local_addr();
    let crt = runtime()?;
    let r = crt.block_on(async move {
        tokio::spawn(async move {
            let client = AsyncClient::connect(addr).await?;
            body(client).await
        })
        .await
        .map_err(|e| e.to_string())?
    });
    drop(crt);
    srt.block_on(server.shutdown());
    r.map_err(|e| e as Box<dyn std::error::Error>)
}

async fn echo(client: &AsyncClient, payload: &[u8]) -> ARes {
    let r = client
        .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), payload.to_vec())
        .await?;
    if r.payload.len() != payload.len() {
        return Err("short echo".into());
    }
    Ok(())
}

/// Sequential calls from one task.
pub(crate) fn pingpong(calls: usize, size: usize, warmup: usize) -> Res {
    with_client(move |client| async move {
        let payload = vec![b'x'; size];
        for _ in 0..warmup {
            echo(&client, &payload).await?;
        }
        let mut lat = Vec::with_capacity(calls);
        let t0 = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            echo(&client, &payload).await?;
            lat.push(t.elapsed());
        }
        report(format!("async pingpong {size} B"), &mut lat, t0.elapsed());
        Ok(())
    })
}

/// `inflight` tasks share one client and claim call numbers until `calls`
/// calls were made.
async fn run(
    client: &AsyncClient,
    inflight: usize,
    calls: usize,
    size: usize,
) -> ARes<Vec<Duration>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::with_capacity(inflight);
    for _ in 0..inflight {
        let (client, next) = (client.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let payload = vec![b'x'; size];
            let mut v = Vec::with_capacity(calls / inflight + 1);
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let t = Instant::now();
                echo(&client, &payload).await.map_err(|e| e.to_string())?;
                v.push(t.elapsed());
            }
            Ok::<_, String>(v)
        }));
    }
    let mut all = Vec::with_capacity(calls);
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(all)
}

/// `inflight` calls outstanding on one connection.
pub(crate) fn concurrent(inflight: usize, calls: usize, size: usize) -> Res {
    let inflight = inflight.max(1);
    with_client(move |client| async move {
        run(&client, inflight, (calls / 10).max(inflight), size).await?;
        let t0 = Instant::now();
        let mut lat = run(&client, inflight, calls, size).await?;
        report(
            format!("async concurrent {inflight} inflight {size} B"),
            &mut lat,
            t0.elapsed(),
        );
        Ok(())
    })
}
