//! Two network namespaces joined by a veth pair, for tests and benchmarks
//! that need a real link between two hosts on one machine. Needs root and
//! `ip` (iproute2). Traffic stays inside the namespaces created here.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use nix::sched::{setns, CloneFlags};

/// A pair of namespaces `a` and `b`, linked by veth with the given MTU;
/// `a` has [`NetnsPair::ADDR_A`], `b` has [`NetnsPair::ADDR_B`]. Both are
/// deleted on drop.
#[derive(Debug)]
pub struct NetnsPair {
    a: String,
    b: String,
}

impl NetnsPair {
    /// The address of namespace `a`.
    pub const ADDR_A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 1));
    /// The address of namespace `b`.
    pub const ADDR_B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 213, 0, 2));

    /// Creates `<prefix>-a` and `<prefix>-b` (deleting stale ones of the
    /// same name first) and a veth pair with `mtu` between them.
    ///
    /// # Errors
    /// If `ip` is missing or fails (for example without root).
    pub fn create(prefix: &str, mtu: u32) -> io::Result<NetnsPair> {
        let a = format!("{prefix}-a");
        let b = format!("{prefix}-b");
        let _ = Command::new("ip").args(["netns", "del", &a]).output();
        let _ = Command::new("ip").args(["netns", "del", &b]).output();
        let pair = NetnsPair { a, b };
        let mtu = mtu.to_string();
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        let va = format!("{prefix}-va");
        let vb = format!("{prefix}-vb");
        let ca = format!("{}/24", Self::ADDR_A);
        let cb = format!("{}/24", Self::ADDR_B);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec![
                "-n", a, "link", "add", &va, "type", "veth", "peer", "name", &vb, "netns", b,
            ],
            vec!["-n", a, "link", "set", &va, "mtu", &mtu, "up"],
            vec!["-n", b, "link", "set", &vb, "mtu", &mtu, "up"],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
            vec!["-n", a, "addr", "add", &ca, "dev", &va],
            vec!["-n", b, "addr", "add", &cb, "dev", &vb],
        ];
        for args in steps {
            let out = Command::new("ip").args(&args).output()?;
            if !out.status.success() {
                return Err(io::Error::other(format!(
                    "ip {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        Ok(pair)
    }

    /// The name of namespace `a`.
    pub fn name_a(&self) -> &str {
        &self.a
    }

    /// The name of namespace `b`.
    pub fn name_b(&self) -> &str {
        &self.b
    }

    /// Moves the calling thread into namespace `a`: sockets it creates
    /// afterwards (and threads it spawns) live there.
    ///
    /// # Errors
    /// If the namespace cannot be entered.
    pub fn enter_a(&self) -> io::Result<()> {
        enter(&self.a)
    }

    /// Moves the calling thread into namespace `b`.
    ///
    /// # Errors
    /// If the namespace cannot be entered.
    pub fn enter_b(&self) -> io::Result<()> {
        enter(&self.b)
    }
}

/// Moves the calling thread into the named network namespace.
///
/// # Errors
/// If the namespace does not exist or cannot be entered.
pub fn enter(name: &str) -> io::Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    setns(f, CloneFlags::CLONE_NEWNET).map_err(|e| io::Error::from_raw_os_error(e as i32))
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        // Deleting a namespace removes the veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
    }
}
