//! What a peer can make the server hold: payloads announced before
//! authentication, payloads left unfinished, connections that never
//! authenticate, and a reader that is slow but steady. Real server, real
//! sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use pagerpc::codec::{decode_stream, encode_head, DecodedFrame, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, PageBuf, Pages, Payload, Server, ServerConfig, Status};

use common::{is_connection_frame, rss_bytes, wait_until};

const KEY: &[u8] = b"budget test key";

/// The prefix and header of a request announcing a separate payload.
fn request_head(call_id: u64, payload_len: u64) -> Vec<u8> {
    let h = Header {
        call_id,
        kind: Kind::Request as i32,
        method: "put".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    let limits = Limits {
        max_payload_bytes: u64::MAX,
        ..Limits::default()
    };
    encode_head(&h, payload_len, Flags::NONE, &limits, &mut wire).unwrap();
    wire
}

/// Reads until the peer closes (or `limit` passes); returns the frames.
fn frames_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<DecodedFrame>, bool) {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut wire = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => wire.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (decode_stream(&wire, Limits::default(), &[]).frames, closed)
}

fn keyed_server(cfg: ServerConfig) -> Server {
    Server::builder()
        .config(ServerConfig {
            auth_key: Some(KEY.into()),
            ..cfg
        })
        .register("put", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

fn keyed_client() -> ClientConfig {
    ClientConfig {
        auth_key: Some(KEY.into()),
        ..ClientConfig::default()
    }
}

/// Defect 6: before authenticating, a peer could make the server reserve
/// and fill a whole max_payload_bytes.
#[test]
fn an_unauthenticated_payload_is_refused_at_the_prefix() {
    let server = keyed_server(ServerConfig::default());
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    // Skip the challenge, announce 256 MiB and start sending it.
    s.write_all(&request_head(1, 256 << 20)).unwrap();
    let _ = s.write_all(&vec![7u8; 1 << 20]);
    let (frames, closed) = frames_until_close(&mut s, Duration::from_secs(5));
    assert!(closed, "the connection stays open");
    let err = frames
        .iter()
        .find(|f| f.head.kind() == Kind::Error)
        .expect("an error frame");
    let m = &err.head.header.status_message;
    assert!(
        m.contains("max_payload_bytes") && m.contains("268435456") && m.contains("limit of 0"),
        "{m}"
    );
    assert_eq!(server.receive_budget().0, 0, "nothing was reserved");
}

/// Defect 12: a peer that never authenticated held its slot until the
/// 5-minute idle timeout.
#[test]
fn a_peer_that_never_authenticates_is_closed_after_the_handshake_timeout() {
    let server = keyed_server(ServerConfig {
        handshake_timeout: Some(Duration::from_millis(500)),
        ..ServerConfig::default()
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    let (frames, closed) = frames_until_close(&mut s, Duration::from_secs(10));
    assert!(closed);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let last = frames.last().expect("challenge and error");
    assert_eq!(last.head.kind(), Kind::Error);
    assert!(
        last.head
            .header
            .status_message
            .contains("handshake_timeout"),
        "{}",
        last.head.header.status_message
    );
}

/// Defect 12: 1,000 idle unauthenticated connections used to fill every
/// connection slot.
#[test]
fn idle_unauthenticated_connections_do_not_lock_clients_out() {
    // 1,000 sockets here and 1,000 in the server: raise the soft limit.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.min(8192);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, hard).unwrap();
    assert!(want >= 2200, "hard fd limit {hard} too low for this test");
    let server = keyed_server(ServerConfig {
        max_connections: 1024,
        max_unauthenticated: 256,
        ..ServerConfig::default()
    });
    let addr = server.local_addr();
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    assert!(wait_until(Duration::from_secs(10), || server.connections() <= 256));
    let c = Client::connect_with(addr, keyed_client()).expect("an authenticated client gets in");
    c.call::<_, MetadataEntry>("put", &MetadataEntry::default(), Vec::new())
        .unwrap();
    drop(idle);
}

/// Defect 11: payloads left unfinished took memory without bound (8
/// connections pausing before the last page of a 256 MiB PUT took 2 GiB).
#[test]
fn unfinished_payloads_are_bounded_by_the_receive_budget() {
    const BUDGET: usize = 256 << 20;
    const PAYLOAD: usize = 64 << 20;
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            max_receive_bytes: Some(BUDGET),
            // Long enough that the peers are still open when the healthy
            // call below returns, even on a loaded machine.
            progress_timeout: Some(Duration::from_secs(5)),
            ..ServerConfig::default()
        })
        .register("put", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let rss0 = rss_bytes();
    // 16 peers each send all but the last page of a 64 MiB payload, then
    // pause: 1 GiB announced against a 256 MiB budget.
    let peers: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(&request_head(1, PAYLOAD as u64)).unwrap();
                let chunk = vec![3u8; 1 << 20];
                let mut left = PAYLOAD - 4096;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if s.write_all(&chunk[..n]).is_err() {
                        return; // closed by the server
                    }
                    left -= n;
                }
                // Pause; the server closes us after the progress timeout.
                let mut b = [0u8; 4096];
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            })
        })
        .collect();
    let healthy = Client::connect(addr).unwrap();
    // The paused peers hold the whole budget...
    assert!(
        wait_until(Duration::from_secs(20), || server.receive_budget().0
            + PAYLOAD
            > BUDGET),
        "the peers never filled the budget: {:?}",
        server.receive_budget()
    );
    // ...and a healthy client is served while they do: its calls never
    // wait for a paused peer to be closed (which takes the 5 s progress
    // timeout; the bound is that, not a speed goal).
    let mut peak = 0;
    let t_end = Instant::now() + Duration::from_secs(4);
    while Instant::now() < t_end {
        let t = Instant::now();
        healthy
            .call::<_, MetadataEntry>("put", &MetadataEntry::default(), vec![1u8; 100])
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "a call waited {:?}: for a paused peer to be closed?",
            t.elapsed()
        );
        peak = peak.max(rss_bytes().saturating_sub(rss0));
        assert!(server.receive_budget().0 <= BUDGET);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every paused peer is closed in turn by the progress timeout.
    for p in peers {
        p.join().unwrap();
        peak = peak.max(rss_bytes().saturating_sub(rss0));
    }
    assert!(
        peak < BUDGET + (64 << 20),
        "grew by {} MiB with a {} MiB budget",
        peak >> 20,
        BUDGET >> 20
    );
    assert!(wait_until(Duration::from_secs(10), || server.connections() == 1));
    // A closed connection's reservation goes when its last handle does.
    assert!(
        wait_until(Duration::from_secs(5), || server.receive_budget().0 == 0),
        "reservations left: {:?}",
        server.receive_budget()
    );
}

/// Defect 12: the write timeout bounded a whole response, so an honest
/// client reading a large value slowly was cut off. Progress is what
/// counts now: 64 MiB read at 8 MiB/s (8 s) against a 2 s progress
/// timeout.
#[test]
fn a_slow_but_steady_reader_gets_the_whole_response() {
    let mut big = PageBuf::new(64 << 20).unwrap();
    for (i, x) in big.iter_mut().enumerate() {
        *x = (i % 241) as u8;
    }
    let big = big.freeze();
    let server = Server::builder()
        .config(ServerConfig {
            progress_timeout: Some(Duration::from_secs(2)),
            ..ServerConfig::default()
        })
        .register("get", move |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(big.clone())))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let h = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: "get".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.write_all(&wire).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::with_capacity((64 << 20) + 4096);
    let mut buf = vec![0u8; 256 << 10];
    let t0 = Instant::now();
    while got.len() < (64 << 20)
        || decode_stream(&got, Limits::default(), &[])
            .frames
            .iter()
            .all(is_connection_frame)
    {
        // 8 MiB/s: 256 KiB every 31 ms.
        let n = s
            .read(&mut buf)
            .expect("the server cut a moving reader off");
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(31));
    }
    // The server's SETTINGS come first; the response after them.
    let frames: Vec<_> = decode_stream(&got, Limits::default(), &[])
        .frames
        .into_iter()
        .filter(|f| !is_connection_frame(f))
        .collect();
    assert_eq!(frames.len(), 1, "after {:?}", t0.elapsed());
    assert_eq!(frames[0].payload.len(), 64 << 20);
    assert!(frames[0]
        .payload
        .iter()
        .enumerate()
        .all(|(i, &x)| x == (i % 241) as u8));
}

/// Regression: every message body was reserved from the receive budget,
/// so while other connections held the whole budget a new connection
/// stopped at its first frame (the client's SETTINGS, a few bytes of
/// body) and its calls waited until a peer holding the budget was closed.
/// Small bodies, like headers and inline payloads, cost only the
/// connection's own buffer.
#[test]
fn a_new_client_is_served_while_other_peers_hold_the_whole_budget() {
    const PAYLOAD: usize = 64 << 20;
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            max_receive_bytes: Some(PAYLOAD),
            progress_timeout: Some(Duration::from_secs(60)),
            ..ServerConfig::default()
        })
        .register("put", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // One peer takes the whole budget and pauses before its last page.
    let mut peer = TcpStream::connect(addr).unwrap();
    peer.write_all(&request_head(1, PAYLOAD as u64)).unwrap();
    peer.write_all(&vec![3u8; PAYLOAD - 4096]).unwrap();
    assert!(wait_until(Duration::from_secs(20), || server
        .receive_budget()
        .0
        >= PAYLOAD));
    // A new client connects and calls; it must not wait for the peer.
    let r = common::with_watchdog(Duration::from_secs(20), "new client", move || {
        let c = Client::connect(addr).unwrap();
        c.call::<_, MetadataEntry>("put", &MetadataEntry::default(), vec![1u8; 100])
            .map(|_| ())
    });
    r.unwrap();
    assert!(
        server.receive_budget().0 >= PAYLOAD,
        "the paused peer still holds the budget: the call did not wait for it"
    );
    drop(peer);
}
