//! wraith's XDP filter program: load it (libbpf, the library xsk-rs already links), tell it the
//! port, attach it to an interface through a BPF link, and register AF_XDP sockets in its map.
//!
//! Attaching through a *link* means the kernel detaches the program when the last file
//! descriptor of the link closes: on a normal exit, on Ctrl-C, and also when the process is
//! killed or crashes. A wraith program found attached the old way (netlink, no link: e.g. by
//! `ip link set ... xdp obj`, or by an older build) has no live owner: it is detected by name and
//! replaced. One attached by a link belongs to a running process and is left alone.

use std::ffi::{c_void, CStr};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Once;

use libbpf_sys as bpf;

/// The compiled filter (build.rs runs clang on bpf/wraith_xdp.c).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wraith_xdp.o"));
const PROG_NAME: &CStr = c"wraith_xdp";
const CFG_MAP: &CStr = c"wraith_cfg";
const XSK_MAP: &CStr = c"wraith_xsks";
/// Entries of the XSKMAP: the highest queue index a socket can be bound to, plus one.
pub const MAX_QUEUES: u32 = 256;

/// What the filter takes: UDP to `port` and one of these addresses (a family left out is passed
/// to the kernel whole).
#[derive(Clone, Copy, Debug)]
pub struct Filter {
    pub port: u16,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// `struct wraith_cfg` of bpf/wraith_xdp.c.
#[repr(C)]
struct Cfg {
    port_be: u16,
    flags: u16,
    v4: [u8; 4],
    v6: [u8; 16],
}

const _: () = assert!(std::mem::size_of::<Cfg>() == 24);

impl Filter {
    fn cfg(&self) -> Cfg {
        Cfg {
            port_be: self.port.to_be(),
            flags: u16::from(self.v4.is_some()) | (u16::from(self.v6.is_some()) << 1),
            v4: self.v4.map_or([0; 4], |a| a.octets()),
            v6: self.v6.map_or([0; 16], |a| a.octets()),
        }
    }
}

/// Where the program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver, before an skb exists (veth, most 10G+ NICs).
    Native,
    /// After the kernel built an skb: works on every interface, slower.
    Generic,
}

impl XdpMode {
    fn flags(self) -> u32 {
        match self {
            XdpMode::Native => bpf::XDP_FLAGS_DRV_MODE,
            XdpMode::Generic => bpf::XDP_FLAGS_SKB_MODE,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }
}

/// Why the program could not be attached.
#[derive(Debug)]
pub enum AttachError {
    /// Loading into the kernel failed (EPERM: no CAP_BPF/CAP_NET_ADMIN).
    Load(io::Error),
    /// Another XDP program is attached and is not a stale wraith one.
    InUse { prog_id: u32, name: String, live_wraith: bool },
    /// The kernel refused the attachment in every mode tried.
    Attach { mode: XdpMode, err: io::Error },
}

fn errno(ret: i32) -> io::Error {
    // libbpf returns -errno (and sets errno) on failure.
    if ret < 0 {
        io::Error::from_raw_os_error(-ret)
    } else {
        io::Error::last_os_error()
    }
}

fn quiet_libbpf() {
    static ONCE: Once = Once::new();
    // SAFETY: libbpf_set_print only swaps a global function pointer; None disables its printing
    // (its messages would otherwise go straight to stderr; we report errors ourselves).
    ONCE.call_once(|| unsafe {
        bpf::libbpf_set_print(None);
    });
}

/// The name and id of the XDP program attached to `ifindex`, and how it is attached.
struct Attached {
    prog_id: u32,
    mode_flags: u32,
}

fn query(ifindex: u32) -> io::Result<Option<Attached>> {
    let mut opts = bpf::bpf_xdp_query_opts { sz: std::mem::size_of::<bpf::bpf_xdp_query_opts>() as _, ..Default::default() };
    // SAFETY: `opts` is a valid, sized bpf_xdp_query_opts that libbpf fills in.
    let r = unsafe { bpf::bpf_xdp_query(ifindex as i32, 0, &mut opts) };
    if r < 0 {
        return Err(errno(r));
    }
    let (mode_flags, prog_id) = match opts.attach_mode as u32 {
        bpf::XDP_ATTACHED_NONE => return Ok(None),
        bpf::XDP_ATTACHED_DRV => (bpf::XDP_FLAGS_DRV_MODE, opts.prog_id),
        bpf::XDP_ATTACHED_SKB => (bpf::XDP_FLAGS_SKB_MODE, opts.prog_id),
        bpf::XDP_ATTACHED_HW => (bpf::XDP_FLAGS_HW_MODE, opts.prog_id),
        // Programs in more than one mode: name the driver's (else the generic one).
        _ if opts.drv_prog_id != 0 => (bpf::XDP_FLAGS_DRV_MODE, opts.drv_prog_id),
        _ => (bpf::XDP_FLAGS_SKB_MODE, opts.skb_prog_id),
    };
    Ok(Some(Attached { prog_id, mode_flags }))
}

/// The name the kernel keeps for program `id` (at most 15 bytes), and an fd that holds the
/// program (for a detach that removes this program and no other).
fn prog_name(id: u32) -> io::Result<(OwnedFd, String)> {
    // SAFETY: plain syscall wrapper; a negative return is an error, else a new fd we own.
    let fd = unsafe { bpf::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return Err(errno(fd));
    }
    // SAFETY: `fd` was just returned to us and is not owned elsewhere.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = bpf::bpf_prog_info::default();
    let mut len = std::mem::size_of::<bpf::bpf_prog_info>() as u32;
    // SAFETY: `info` is a zeroed bpf_prog_info of `len` bytes; all pointer fields are null, so
    // the kernel copies out nothing but the fixed fields.
    let r = unsafe { bpf::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if r < 0 {
        return Err(errno(r));
    }
    let name: Vec<u8> = info.name.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok((fd, String::from_utf8_lossy(&name).into_owned()))
}

/// wraith's filter, attached to one interface. Dropping it detaches the program.
pub struct XdpProgram {
    obj: NonNull<bpf::bpf_object>,
    /// Closing it detaches the program (also when the process dies).
    _link: OwnedFd,
    xsks_fd: i32,
    mode: XdpMode,
    replaced_stale: Option<u32>,
}

// SAFETY: the bpf_object is only touched again in Drop (closing it); libbpf objects are not tied
// to the thread that made them, and the map fd is used only through thread-safe syscalls.
unsafe impl Send for XdpProgram {}
// SAFETY: shared access only issues bpf(2) map updates on an fd, which the kernel serialises.
unsafe impl Sync for XdpProgram {}

impl XdpProgram {
    /// Load the filter for `filter`, and attach it to `ifindex` in `mode` (None: native, then
    /// generic). A stale wraith program is replaced; any other program makes this fail.
    pub fn attach(ifindex: u32, filter: Filter, mode: Option<XdpMode>) -> Result<Self, AttachError> {
        quiet_libbpf();
        let replaced_stale = remove_stale(ifindex)?;
        // SAFETY: OBJECT is a static byte slice that outlives the call; null opts = defaults.
        let obj = unsafe { bpf::bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len() as _, std::ptr::null()) };
        let obj = NonNull::new(obj).ok_or_else(|| AttachError::Load(io::Error::last_os_error()))?;
        let guard = ObjGuard(obj);
        // SAFETY: `obj` is a freshly opened, not yet loaded bpf_object.
        let r = unsafe { bpf::bpf_object__load(obj.as_ptr()) };
        if r < 0 {
            return Err(AttachError::Load(errno(r)));
        }
        // SAFETY: `obj` is loaded; the names are NUL-terminated; the results are checked.
        let (prog, cfg_fd, xsks_fd) = unsafe {
            let prog = bpf::bpf_object__find_program_by_name(obj.as_ptr(), PROG_NAME.as_ptr());
            let cfg = bpf::bpf_object__find_map_fd_by_name(obj.as_ptr(), CFG_MAP.as_ptr());
            let xsks = bpf::bpf_object__find_map_fd_by_name(obj.as_ptr(), XSK_MAP.as_ptr());
            (prog, cfg, xsks)
        };
        if prog.is_null() || cfg_fd < 0 || xsks_fd < 0 {
            return Err(AttachError::Load(io::Error::other("the embedded XDP object lacks its program or maps")));
        }
        // SAFETY: `prog` belongs to the loaded object.
        let prog_fd = unsafe { bpf::bpf_program__fd(prog) };
        let cfg = filter.cfg();
        let key = 0u32;
        // SAFETY: key and value point at live values of the map's key (4) and value (24, `Cfg`
        // is `repr(C)` like the program's struct) sizes.
        let r = unsafe {
            bpf::bpf_map_update_elem(cfg_fd, (&key as *const u32).cast(), (&cfg as *const Cfg).cast::<c_void>(), 0)
        };
        if r < 0 {
            return Err(AttachError::Load(errno(r)));
        }
        let modes = mode.map_or(vec![XdpMode::Native, XdpMode::Generic], |m| vec![m]);
        let mut last = None;
        for m in modes {
            match link_create(prog_fd, ifindex, m) {
                Ok(link) => {
                    std::mem::forget(guard);
                    return Ok(XdpProgram { obj, _link: link, xsks_fd, mode: m, replaced_stale });
                }
                Err(e) => last = Some((m, e)),
            }
        }
        let (mode, err) = last.expect("at least one mode tried");
        Err(AttachError::Attach { mode, err })
    }

    /// Send frames for our port arriving on `queue` to the AF_XDP socket `xsk`.
    pub fn register_socket(&self, queue: u32, xsk: BorrowedFd<'_>) -> io::Result<()> {
        if queue >= MAX_QUEUES {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("queue {queue} >= {MAX_QUEUES}")));
        }
        let fd = xsk.as_raw_fd() as u32;
        // SAFETY: key and value point at live u32s, the XSKMAP's key and value sizes.
        let r = unsafe {
            bpf::bpf_map_update_elem(self.xsks_fd, (&queue as *const u32).cast(), (&fd as *const u32).cast(), 0)
        };
        if r < 0 {
            return Err(errno(r));
        }
        Ok(())
    }

    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The id of a stale wraith program this one replaced, if any.
    pub fn replaced_stale(&self) -> Option<u32> {
        self.replaced_stale
    }
}

impl Drop for XdpProgram {
    fn drop(&mut self) {
        // The link fd closes after this body (field drop order does not matter: the object's
        // close releases its own program and map fds, the link holds its own reference).
        // SAFETY: `obj` came from bpf_object__open_mem and is closed exactly once, here.
        unsafe { bpf::bpf_object__close(self.obj.as_ptr()) };
    }
}

struct ObjGuard(NonNull<bpf::bpf_object>);

impl Drop for ObjGuard {
    fn drop(&mut self) {
        // SAFETY: the guard owns the object until it is forgotten on success.
        unsafe { bpf::bpf_object__close(self.0.as_ptr()) };
    }
}

fn link_create(prog_fd: i32, ifindex: u32, mode: XdpMode) -> io::Result<OwnedFd> {
    // SAFETY: bpf_link_create_opts is a plain C struct for which all-zero bytes are valid.
    let mut opts: bpf::bpf_link_create_opts = unsafe { std::mem::zeroed() };
    opts.sz = std::mem::size_of::<bpf::bpf_link_create_opts>() as _;
    opts.flags = mode.flags();
    // SAFETY: `opts` is valid and sized; the return is a new fd we own, or -errno.
    let fd = unsafe { bpf::bpf_link_create(prog_fd, ifindex as i32, bpf::BPF_XDP, &opts) };
    if fd < 0 {
        return Err(errno(fd));
    }
    // SAFETY: `fd` was just created for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// If a wraith program without a live owner is attached to `ifindex`, detach it.
fn remove_stale(ifindex: u32) -> Result<Option<u32>, AttachError> {
    // A program that vanishes between the query and reading its name (its owner just exited and
    // closed its link) is gone, not foreign: ask again, a bounded number of times.
    let mut tries = 0;
    let (cur, prog, name) = loop {
        tries += 1;
        let cur = match query(ifindex) {
            Ok(Some(a)) => a,
            Ok(None) => return Ok(None),
            Err(e) => return Err(AttachError::Load(e)),
        };
        // Reading another program's name needs CAP_SYS_ADMIN: without it, say that, rather than
        // call the program foreign.
        match prog_name(cur.prog_id) {
            Ok((fd, n)) => break (cur, Some(fd), n),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) => return Err(AttachError::Load(e)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && tries < 5 => continue,
            Err(_) => break (cur, None, String::new()),
        }
    };
    if name != PROG_NAME.to_str().unwrap_or_default() {
        return Err(AttachError::InUse { prog_id: cur.prog_id, name, live_wraith: false });
    }
    let Some(prog) = prog else { return Err(AttachError::InUse { prog_id: cur.prog_id, name, live_wraith: false }) };
    // A netlink attachment detaches; a link (a live process owns it) answers EBUSY. With the
    // old program's fd libbpf asks for XDP_FLAGS_REPLACE: if another program took its place
    // since the query, the kernel answers EEXIST and that program stays.
    let opts = bpf::bpf_xdp_attach_opts {
        sz: std::mem::size_of::<bpf::bpf_xdp_attach_opts>() as _,
        old_prog_fd: prog.as_raw_fd(),
        ..Default::default()
    };
    // SAFETY: plain netlink request; `opts` is a valid, sized bpf_xdp_attach_opts and `prog`
    // stays open for the call.
    let r = unsafe { bpf::bpf_xdp_detach(ifindex as i32, cur.mode_flags, &opts) };
    if r < 0 {
        let e = errno(r);
        if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
            return Err(AttachError::Load(e));
        }
        let live_wraith = e.raw_os_error() != Some(libc::EEXIST);
        return Err(AttachError::InUse { prog_id: cur.prog_id, name, live_wraith });
    }
    Ok(Some(cur.prog_id))
}
