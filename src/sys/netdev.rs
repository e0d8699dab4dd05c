//! Network-device queries for the AF_XDP path, answered by the kernel for the calling thread's
//! network namespace (ioctl on a socket, getifaddrs): /sys/class/net is not used because it
//! shows the namespace sysfs was mounted in, which `nsenter --net` does not change.

use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// What the AF_XDP path needs to know about an interface.
#[derive(Clone, Debug)]
pub struct NetDev {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    pub up: bool,
    pub running: bool,
    /// Receive queues (ethtool channels); 1 when the driver does not say.
    pub rx_queues: u32,
    pub ipv4: Vec<Ipv4Addr>,
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name '{name}'")));
    }
    // SAFETY: ifreq is a plain C struct (name array and a union of plain fields); zero is valid.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(r)
}

fn ioctl(sock: &UdpSocket, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: `r` is a valid ifreq that lives across the call; each request used here reads the
    // name and writes one member of the union, which fits in the struct.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, r as *mut libc::ifreq) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

const ETHTOOL_GCHANNELS: u32 = 0x3c;

fn rx_queues(sock: &UdpSocket, name: &str) -> io::Result<u32> {
    let mut ch = EthtoolChannels { cmd: ETHTOOL_GCHANNELS, ..Default::default() };
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_data = (&mut ch as *mut EthtoolChannels).cast();
    ioctl(sock, libc::SIOCETHTOOL, &mut r)?;
    Ok(ch.rx_count.max(ch.combined_count).max(1))
}

/// Look up `name` in the current network namespace.
pub fn netdev(name: &str) -> io::Result<NetDev> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let cname = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
    // SAFETY: `cname` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    let mut r = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFHWADDR, &mut r)?;
    // SAFETY: SIOCGIFHWADDR filled the sockaddr member of the union.
    let hw = unsafe { r.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(hw.sa_data.iter()) {
        *m = *b as u8;
    }
    let mut r = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFMTU, &mut r)?;
    // SAFETY: SIOCGIFMTU filled the int member of the union.
    let mtu = unsafe { r.ifr_ifru.ifru_mtu }.max(0) as u32;
    let mut r = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the short flags member of the union.
    let flags = unsafe { r.ifr_ifru.ifru_flags } as i32;
    let rx_queues = rx_queues(&sock, name).unwrap_or(1);
    Ok(NetDev {
        name: name.to_string(),
        index,
        mac,
        mtu,
        up: flags & libc::IFF_UP != 0,
        running: flags & libc::IFF_RUNNING != 0,
        rx_queues,
        ipv4: ipv4_addrs(name)?,
    })
}

/// The name of interface `index` in the current network namespace.
pub fn ifname(index: u32) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, the most if_indextoname writes.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success `buf` holds a NUL-terminated name.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

fn ipv4_addrs(name: &str) -> io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut p = head;
    while !p.is_null() {
        // SAFETY: `p` is a node of the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a valid C string for every node.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if n.to_bytes() == name.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null; its family field says which sockaddr it is.
            let fam = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if fam == libc::AF_INET {
                // SAFETY: AF_INET means the pointee is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        p = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Wait until any of `fds` is readable or `timeout` passes. True if one is.
pub fn poll_any_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<bool> {
    Ok(poll_readable_last(fds, timeout)?.0)
}

/// Wait until any of `fds` is readable or `timeout` passes: whether one is, and whether the last
/// one is.
pub fn poll_readable_last(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<(bool, bool)> {
    let mut p: Vec<libc::pollfd> =
        fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let ms = if ms == 0 && !timeout.is_zero() { 1 } else { ms };
    loop {
        // SAFETY: `p` holds `p.len()` initialised pollfds.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
        if r >= 0 {
            return Ok((r > 0, p.last().is_some_and(|f| f.revents != 0)));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
