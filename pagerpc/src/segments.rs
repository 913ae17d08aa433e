//! Segment alignment: making every TCP segment carry whole pages.

use std::net::SocketAddr;

use crate::sys;

/// How a connection sizes its TCP segments.
///
/// Zero-copy receive can map a payload page only if it arrived in a segment
/// whose data fills exactly whole pages. On loopback that takes
/// `TCP_MAXSEG` = 4096·k + the TCP option bytes in use (12 with timestamps,
/// so 4108 for one page). On a real link the MTU decides instead: 4148 for
/// IPv4 (4096 + 20 IP + 20 TCP + 12 options) or 4168 for IPv6 (40-byte IP
/// header); set the interface MTU and leave this at `Auto` or `Off`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SegmentAlign {
    /// One page per segment when the address is loopback; the kernel's own
    /// MSS otherwise. The default.
    #[default]
    Auto,
    /// Never set `TCP_MAXSEG`.
    Off,
    /// `k` pages per segment: `TCP_MAXSEG` = 4096·k + option bytes.
    Pages(u32),
    /// This exact `TCP_MAXSEG`.
    Mss(u32),
}

impl SegmentAlign {
    /// The `TCP_MAXSEG` to set for a socket talking to or bound to `addr`,
    /// if any.
    pub fn mss_for(&self, addr: &SocketAddr) -> Option<u32> {
        let pages = |k: u32| 4096 * k.max(1) + if sys::tcp_timestamps_on() { 12 } else { 0 };
        match *self {
            SegmentAlign::Auto if addr.ip().is_loopback() => Some(pages(1)),
            SegmentAlign::Auto | SegmentAlign::Off => None,
            SegmentAlign::Pages(k) => Some(pages(k)),
            SegmentAlign::Mss(m) => Some(m),
        }
    }
}
