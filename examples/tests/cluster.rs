//! Three storage nodes in three network namespaces and the client in a
//! fourth, joined by a bridge in a fifth (veths with MTU 4148, so TCP
//! segments carry whole pages), on 10.214.0.0/24. Nodes are shut down in
//! the middle of a PUT and of a GET; the client says so and falls back to
//! the other replicas. Needs root and iproute2 (CI has both). All traffic
//! stays inside the namespaces created here, which are deleted at the end.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{sha256_file, write_random_file, TempDir};
use pagerpc_examples::storage::{
    rank_nodes, ClientOptions, GetReport, NodeConfig, PutReport, StorageClient, StorageError,
    StorageNode,
};

/// A bridge namespace with one veth to each of `n` host namespaces; host
/// `i` (1-based) has 10.214.0.i/24. Everything is deleted on drop.
struct Lab {
    prefix: String,
    n: usize,
}

impl Lab {
    fn create(n: usize) -> io::Result<Lab> {
        let lab = Lab {
            prefix: format!("pgx{}", std::process::id()),
            n,
        };
        lab.delete();
        let br = lab.bridge();
        let mut steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), br.clone()],
            args(&["-n", &br, "link", "add", "br0", "type", "bridge"]),
            args(&["-n", &br, "link", "set", "lo", "up"]),
        ];
        for i in 1..=n {
            let ns = lab.host(i);
            let v = format!("v{i}");
            let cidr = format!("{}/24", Lab::ip(i));
            steps.extend([
                args(&["netns", "add", &ns]),
                args(&[
                    "-n", &br, "link", "add", &v, "type", "veth", "peer", "name", "eth0", "netns",
                    &ns,
                ]),
                args(&["-n", &br, "link", "set", &v, "mtu", "4148"]),
                args(&["-n", &br, "link", "set", &v, "master", "br0"]),
                args(&["-n", &br, "link", "set", &v, "up"]),
                args(&["-n", &ns, "link", "set", "eth0", "mtu", "4148"]),
                args(&["-n", &ns, "addr", "add", &cidr, "dev", "eth0"]),
                args(&["-n", &ns, "link", "set", "eth0", "up"]),
                args(&["-n", &ns, "link", "set", "lo", "up"]),
            ]);
        }
        steps.push(args(&["-n", &br, "link", "set", "br0", "mtu", "4148"]));
        steps.push(args(&["-n", &br, "link", "set", "br0", "up"]));
        for a in steps {
            let out = Command::new("ip").args(&a).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "ip {}: {} (this test needs root and iproute2)",
                    a.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(lab)
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    fn ip(i: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 214, 0, i as u8))
    }

    /// Runs `f` on a thread inside host namespace `i`; sockets it creates,
    /// and threads it spawns, live there.
    fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = self.host(i);
        std::thread::spawn(move || {
            pagerpc::netns::enter(&ns).expect("enter the namespace");
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    fn delete(&self) {
        for i in 1..=self.n {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.host(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.delete();
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

const PORT: u16 = 7100;
const CLIENT_HOST: usize = 4;

type Nodes = Arc<Mutex<Vec<Option<StorageNode>>>>;

fn node_addr(i: usize) -> SocketAddr {
    SocketAddr::new(Lab::ip(i + 1), PORT)
}

fn start_node(lab: &Lab, i: usize, dir: PathBuf) -> StorageNode {
    lab.run_in(i + 1, move || {
        StorageNode::start(node_addr(i), NodeConfig::new(dir)).expect("start a node")
    })
}

fn kill(nodes: &Nodes, addr: SocketAddr) {
    let i = (0..3).find(|&i| node_addr(i) == addr).unwrap();
    let n = nodes.lock().unwrap()[i].take();
    // As abrupt as a crash: calls in flight are cut off.
    n.expect("the node is running").kill();
}

type Warnings = Arc<Mutex<Vec<String>>>;

/// A client for the three nodes with `replicas`, collecting warnings, that
/// calls `hook(op, bytes done)` after every chunk.
fn client(
    replicas: usize,
    warnings: &Warnings,
    hook: impl Fn(&str, u64) + Send + Sync + 'static,
) -> StorageClient {
    let mut opts = ClientOptions::new((0..3).map(node_addr).collect());
    opts.replicas = replicas;
    opts.progress = false;
    let w = warnings.clone();
    StorageClient::new(opts)
        .on_warning(move |m| {
            eprintln!("client warning: {m}");
            w.lock().unwrap().push(m.to_owned());
        })
        .on_progress(hook)
}

fn put(
    lab: &Lab,
    replicas: usize,
    src: PathBuf,
    id: &str,
    hook: impl Fn(&str, u64) + Send + Sync + 'static,
) -> (Result<PutReport, StorageError>, Vec<String>) {
    let warnings = Warnings::default();
    let w = warnings.clone();
    let id = id.to_owned();
    let r = lab.run_in(CLIENT_HOST, move || {
        client(replicas, &w, hook).put_file(&src, &id)
    });
    let w = warnings.lock().unwrap().clone();
    (r, w)
}

fn get(
    lab: &Lab,
    id: &str,
    dst: PathBuf,
    hook: impl Fn(&str, u64) + Send + Sync + 'static,
) -> (Result<GetReport, StorageError>, Vec<String>) {
    let warnings = Warnings::default();
    let w = warnings.clone();
    let id = id.to_owned();
    let r = lab.run_in(CLIENT_HOST, move || {
        client(1, &w, hook).get_to_file(&id, &dst)
    });
    let w = warnings.lock().unwrap().clone();
    (r, w)
}

fn none(_: &str, _: u64) {}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

#[test]
fn three_nodes_survive_a_node_shut_down_mid_transfer() {
    let t0 = std::time::Instant::now();
    let phase = |what: &str| eprintln!("[{:6.2} s] {what}", t0.elapsed().as_secs_f64());
    let lab = Lab::create(4).expect("create the namespaces");
    phase("namespaces up");
    let tmp = TempDir::new("cluster");
    let dirs: Vec<PathBuf> = (0..3).map(|i| tmp.join(&format!("node{i}"))).collect();
    let nodes: Nodes = Arc::new(Mutex::new(
        (0..3)
            .map(|i| Some(start_node(&lab, i, dirs[i].clone())))
            .collect(),
    ));
    let all: Vec<SocketAddr> = (0..3).map(node_addr).collect();

    phase("nodes started");
    // 1. A node dies while a PUT with two replicas is writing to it.
    let src1 = tmp.join("src1");
    let sha1 = write_random_file(&src1, 192 << 20, 11);
    let ranked = rank_nodes(&all, "blob-1");
    let victim = ranked[0];
    let (fired, n2) = (Arc::new(AtomicBool::new(false)), nodes.clone());
    let f = fired.clone();
    let (r, warnings) = put(&lab, 2, src1.clone(), "blob-1", move |op, done| {
        if op == "put" && done >= 48 << 20 && !f.swap(true, Ordering::SeqCst) {
            kill(&n2, victim);
        }
    });
    assert!(fired.load(Ordering::SeqCst));
    let r = r.expect("the PUT succeeds on the other replicas");
    assert_eq!(r.stored_on, vec![ranked[1], ranked[2]], "{r:?}");
    assert_eq!(r.failures.len(), 1);
    assert_eq!(r.failures[0].0, victim);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&format!("node {victim} failed during PUT of 'blob-1'"))),
        "the client says which node failed: {warnings:?}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&format!("to {} instead", ranked[2]))),
        "the client says where the replica went: {warnings:?}"
    );

    phase("phase 1 done");
    // 2. With that node still down, a GET reads a replica.
    let dst = tmp.join("dst");
    let (g, warnings) = get(&lab, "blob-1", dst.clone(), none);
    let g = g.expect("the GET reads a replica");
    assert_eq!(g.served_by, vec![(ranked[1], 192 << 20)]);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(&format!("node {victim} cannot serve 'blob-1'"))),
        "{warnings:?}"
    );
    assert_eq!(sha256_file(&dst), sha1);
    std::fs::remove_file(&dst).unwrap();

    phase("phase 2 done");
    // 3. The node comes back without the blob and without leftovers.
    let vi = (0..3).find(|&i| node_addr(i) == victim).unwrap();
    nodes.lock().unwrap()[vi] = Some(start_node(&lab, vi, dirs[vi].clone()));
    let back = nodes.lock().unwrap()[vi]
        .as_ref()
        .unwrap()
        .temps_removed_at_start();
    assert_eq!(
        back, 1,
        "the killed upload's temporary file is removed at start"
    );
    let left: Vec<String> = std::fs::read_dir(&dirs[vi])
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let listed = lab.run_in(CLIENT_HOST, || {
        client(2, &Warnings::default(), none).list().unwrap()
    });
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].nodes, {
        let mut v = vec![ranked[1], ranked[2]];
        v.sort();
        v
    });

    phase("phase 3 done");
    // 4. A node dies while a GET is reading from it: the GET goes on from
    // the same offset on the other replica.
    let src2 = tmp.join("src2");
    let sha2 = write_random_file(&src2, 128 << 20, 12);
    let (r, warnings) = put(&lab, 2, src2.clone(), "blob-2", none);
    let r = r.unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let ranked2 = rank_nodes(&all, "blob-2");
    assert_eq!(r.stored_on, ranked2[..2].to_vec());
    let (fired, n2) = (Arc::new(AtomicBool::new(false)), nodes.clone());
    let f = fired.clone();
    let first = ranked2[0];
    let (g, warnings) = get(&lab, "blob-2", dst.clone(), move |op, done| {
        if op == "get" && done >= 32 << 20 && !f.swap(true, Ordering::SeqCst) {
            kill(&n2, first);
        }
    });
    let g = g.expect("the GET finishes from the other replica");
    assert_eq!(g.served_by.len(), 2, "{g:?}");
    assert_eq!(g.served_by[0].0, first);
    assert_eq!(g.served_by[1].0, ranked2[1]);
    assert_eq!(g.served_by[0].1 + g.served_by[1].1, 128 << 20);
    assert!(
        warnings.iter().any(
            |w| w.contains(&format!("node {first} failed during GET of 'blob-2'"))
                && w.contains(&format!("continuing from the replica on {}", ranked2[1]))
        ),
        "{warnings:?}"
    );
    assert_eq!(sha256_file(&dst), sha2);
    std::fs::remove_file(&dst).unwrap();
    let fi = (0..3).find(|&i| node_addr(i) == first).unwrap();
    nodes.lock().unwrap()[fi] = Some(start_node(&lab, fi, dirs[fi].clone()));

    phase("phase 4 done");
    // 5. Throughput across namespaces, one replica, all nodes up.
    let src3 = tmp.join("src3");
    let sha3 = write_random_file(&src3, 512 << 20, 13);
    let (r, _) = put(&lab, 1, src3.clone(), "blob-3", none);
    let r = r.unwrap();
    let (g, _) = get(&lab, "blob-3", dst.clone(), none);
    let g = g.unwrap();
    assert_eq!(sha256_file(&dst), sha3);
    println!(
        "storage across namespaces (veth + bridge, MTU 4148): PUT 512 MiB in {:.2} s = {:.0} MiB/s, \
         node mapped {:.1} %; GET in {:.2} s = {:.0} MiB/s, client mapped {:.1} %",
        r.elapsed.as_secs_f64(),
        mib_s(r.size, r.elapsed.as_secs_f64()),
        r.node_mapped_percent(),
        g.elapsed.as_secs_f64(),
        mib_s(g.size, g.elapsed.as_secs_f64()),
        g.mapped_percent()
    );
    let (r, _) = put(&lab, 3, src3.clone(), "blob-3r", none);
    let r = r.unwrap();
    assert_eq!(r.stored_on.len(), 3);
    println!(
        "storage across namespaces, 3 replicas: PUT 512 MiB to 3 nodes in {:.2} s = {:.0} MiB/s \
         of blob ({:.0} MiB/s on the wire), nodes mapped {:.1} %",
        r.elapsed.as_secs_f64(),
        mib_s(r.size, r.elapsed.as_secs_f64()),
        3.0 * mib_s(r.size, r.elapsed.as_secs_f64()),
        r.node_mapped_percent()
    );
    phase("phase 5 done");
    drop(nodes);
    phase("nodes stopped");
}
