//! The few socket calls std and tokio do not offer. All `unsafe` of the agent lives here.
#![allow(unsafe_code)] // raw libc socket calls, each with its `// SAFETY:` line

use std::io;
use std::os::fd::{AsFd as _, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use aya::Pod;
use aya::maps::{HashMap, IterableMap as _, MapData};

/// The kernel's `struct tcp_info` up to `tcpi_bytes_received` (Linux >= 4.19 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct RawTcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    wscale: u8,
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

// TCP states (include/net/tcp_states.h) in which the peer's FIN has been received.
const TCP_TIME_WAIT: i32 = 6;
const TCP_CLOSE_WAIT: i32 = 8;
const TCP_LAST_ACK: i32 = 9;
const TCP_CLOSING: i32 = 11;

/// The byte counts of one TCP socket that the splice needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpBytes {
    /// Bytes the peer has acknowledged.
    pub acked: u64,
    /// Sequence space received in order, FIN included (it takes one sequence number).
    pub received: u64,
    /// Bytes written to the socket and not yet acknowledged (SIOCOUTQ).
    pub unacked: u64,
    /// The peer's FIN has arrived (so `received` counts it); a reset does not count.
    pub fin_received: bool,
}

impl TcpBytes {
    /// Every byte ever written into the socket's send queue.
    pub fn written(&self) -> u64 {
        self.acked + self.unacked
    }
}

/// Reads the counters of a TCP socket, its send queue included (one more syscall than
/// `tcp_counts`).
pub fn tcp_bytes(fd: BorrowedFd<'_>) -> io::Result<TcpBytes> {
    let mut bytes = tcp_counts(fd)?;
    let mut unacked: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `unacked`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut unacked) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    bytes.unacked = u64::try_from(unacked).unwrap_or(0);
    Ok(bytes)
}

/// Reads the counters `TCP_INFO` gives (`unacked` is left 0: see `tcp_bytes`).
pub fn tcp_counts(fd: BorrowedFd<'_>) -> io::Result<TcpBytes> {
    let mut info = RawTcpInfo::default();
    let mut len = size_of::<RawTcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<RawTcpInfo>() {
        return Err(io::Error::other(
            "kernel tcp_info lacks byte counters (needs Linux >= 4.19)",
        ));
    }
    Ok(TcpBytes {
        acked: info.bytes_acked,
        received: info.bytes_received,
        unacked: 0,
        fin_received: matches!(
            i32::from(info.state),
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT
        ),
    })
}

/// The socket's cookie: a 64-bit id unique for the life of the system, and our map key.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` is a writable u64 and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn set_int_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to an int that lives across the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets SO_RCVLOWAT. TCP wakes the socket's data-ready hook (and with it the verdict
/// program) only when this many bytes are queued, and it re-checks at once on every
/// call: raising it holds bytes in the receive queue, lowering it to 1 releases them.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// Sets the send buffer past `net.core.wmem_max` (SO_SNDBUFFORCE, needs CAP_NET_ADMIN);
/// the kernel doubles the value for its bookkeeping. Turns send-buffer autotuning off.
pub fn set_sndbuf_force(fd: BorrowedFd<'_>, bytes: libc::c_int) -> io::Result<()> {
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, bytes)
}

/// Shuts down the write side: the peer reads EOF after the bytes already queued.
pub fn shutdown_write(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor we borrow; no memory is passed.
    let rc = unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the next close() send a RST instead of a FIN (propagates a reset to the peer).
pub fn set_linger_zero(fd: impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: passes a pointer to a linger struct that lives across the call, with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns on TCP keepalive with the given idle time and probe interval (seconds).
pub fn set_keepalive(
    fd: BorrowedFd<'_>,
    idle_secs: u32,
    interval_secs: u32,
    probes: u32,
) -> io::Result<()> {
    let clamp = |v: u32| libc::c_int::try_from(v.max(1)).unwrap_or(libc::c_int::MAX);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, clamp(idle_secs))?;
    set_int_opt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        clamp(interval_secs),
    )?;
    set_int_opt(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, clamp(probes))
}

/// Pending socket error (SO_ERROR), if any: how a reset shows up on a socket we only watch.
pub fn take_socket_error(fd: impl AsRawFd) -> io::Result<Option<io::Error>> {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` is a writable int and `len` says so.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((err != 0).then(|| io::Error::from_raw_os_error(err)))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` uses.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Raises RLIMIT_MEMLOCK so map creation does not fail on kernels that still charge it.
pub fn raise_memlock_limit() -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// flock(LOCK_EX | LOCK_NB): `WouldBlock` when another open file holds the lock.
pub fn lock_exclusive_now(file: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The uid and primary gid of a user named in the passwd database.
pub fn user_ids(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "user name with NUL"))?;
    // SAFETY: passwd is plain data (integers and pointers); all zeroes is a valid value.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pwd` and
    // `found` are ours, `buf` is writable for `buf.len()` bytes; `pwd`'s strings point
    // into `buf`, which we do not read through.
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok((!found.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Keeps permitted capabilities across the coming change of uid (this thread).
pub fn set_keep_capabilities(keep: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) })
}

/// Removes every capability not in `kept` (a bit mask) from the bounding set, so no
/// later exec can regain it. Needs CAP_SETPCAP: call it before giving up root.
pub fn drop_bounding_set_except(kept: u64) -> io::Result<()> {
    for cap in 0..64u32 {
        if kept & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            // Beyond the kernel's last capability.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Becomes `uid`/`gid` (real, effective and saved), with `gid` as the only group. glibc
/// applies each change to every thread of the process.
pub fn set_user(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: setgroups reads one gid through the pointer; the others take integers.
    unsafe {
        check(libc::setgroups(1, &gid))?;
        check(libc::setresgid(gid, gid, gid))?;
        check(libc::setresuid(uid, uid, uid))
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Sets this thread's effective, permitted and inheritable capabilities to `kept` (a bit
/// mask). Inheritable too, so `raise_ambient` can keep them across the exec of an upgrade.
pub fn set_capabilities(kept: u64) -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = kept as u32;
    let high = (kept >> 32) as u32;
    let data = [
        CapData {
            effective: low,
            permitted: low,
            inheritable: low,
        },
        CapData {
            effective: high,
            permitted: high,
            inheritable: high,
        },
    ];
    // SAFETY: capset reads the header and two data structs (version 3), which live
    // across the call.
    check(unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) as libc::c_int })
}

/// Makes the capabilities in `kept` ambient (they must be permitted and inheritable), so
/// the agent's next binary, exec'd by `forwarder upgrade`, starts with them: an ordinary
/// user's exec otherwise clears every capability.
pub fn raise_ambient(kept: u64) -> io::Result<()> {
    for cap in (0..64u32).filter(|c| kept & (1 << c) != 0) {
        // SAFETY: prctl with integer arguments only.
        check(unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap),
                0,
                0,
            )
        })?;
    }
    Ok(())
}

/// No exec of this process can gain privileges again (setuid binaries, file caps).
pub fn set_no_new_privileges() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
}

/// accept4(SOCK_NONBLOCK | SOCK_CLOEXEC) now, without waiting: `None` when the queue
/// is empty. Bypasses tokio's readiness, which may not know of a connection yet.
pub fn accept_now(listener: BorrowedFd<'_>) -> io::Result<Option<std::net::TcpStream>> {
    // SAFETY: accept4 with null address pointers writes nothing of ours.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(err),
        };
    }
    // SAFETY: accept4 returned a new descriptor that nothing else owns.
    Ok(Some(unsafe { std::net::TcpStream::from_raw_fd(fd) }))
}

/// RLIMIT_NOFILE as (soft, hard).
pub fn nofile_limits() -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through the pointer, which outlives the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (soft, hard) = nofile_limits()?;
    if soft >= hard {
        return Ok(soft);
    }
    let limit = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(hard)
}

/// Registers the eBPF log ring buffer with tokio for readability.
pub fn async_fd_readable<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `inner` owns its descriptor and the AsyncFd owns `inner`, so the descriptor
    // stays open and unchanged for the registration's whole lifetime.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(inner, tokio::io::Interest::READABLE)
    }
    .map_err(|e| io::Error::other(e.to_string()))
}

/// Registers a descriptor with tokio for reading and writing.
pub fn async_fd<T: AsRawFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: as in `async_fd_readable`: the AsyncFd owns `inner`, which owns the
    // descriptor for the registration's whole lifetime.
    unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(
            inner,
            tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
        )
    }
    .map_err(|e| io::Error::other(e.to_string()))
}

/// recv(MSG_DONTWAIT) straight from the socket, bypassing tokio's cached readiness: the
/// session learns of passed bytes from the kernel counters, not from readiness events.
pub fn recv_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_with(fd, buf, libc::MSG_DONTWAIT)
}

/// recv(MSG_PEEK | MSG_DONTWAIT): what is queued now, left queued.
pub fn peek_now(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    recv_with(fd, buf, libc::MSG_PEEK | libc::MSG_DONTWAIT)
}

fn recv_with(fd: BorrowedFd<'_>, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// send(MSG_DONTWAIT | MSG_NOSIGNAL) straight to the socket: what the send buffer takes
/// now, without waiting (a session must never block on one direction's sink).
pub fn send_now(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole call.
    let n = unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// An epoll set of the agent's own, beside tokio's: tokio registers every socket for
/// reading and writing, and a spliced socket's data-ready hook fires for every segment
/// the verdict redirects, so a tokio registration would wake the agent per message. Here
/// a spliced socket is registered for hang-up and error only (`HANGUP_ONLY`), and for data
/// only while one of its directions runs through userspace (`HANGUP_AND_DATA`).
#[derive(Debug)]
pub struct Epoll(OwnedFd);

/// A peer's FIN (`EPOLLRDHUP`), edge-triggered; errors and hang-ups are always reported.
pub const HANGUP_ONLY: u32 = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
/// As `HANGUP_ONLY`, plus arriving bytes.
pub const HANGUP_AND_DATA: u32 = HANGUP_ONLY | libc::EPOLLIN as u32;

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall; on success we own the returned descriptor.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ctl(&self, op: libc::c_int, fd: BorrowedFd<'_>, events: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: both descriptors are open for the call; the kernel copies `event`.
        let rc = unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd.as_raw_fd(), &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for `events`, reporting `data` with each. The registration ends when
    /// the socket is closed.
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32, data: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)
    }

    /// Appends the (data, events) pairs that are ready now to `out`, without waiting;
    /// returns how many.
    pub fn ready_now(&self, out: &mut Vec<(u64, u32)>) -> io::Result<usize> {
        const BATCH: usize = 256;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; BATCH];
        // SAFETY: `events` has room for BATCH entries for the whole call.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                BATCH as libc::c_int,
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        out.extend(events[..n].iter().map(|e| (e.u64, e.events)));
        Ok(n)
    }
}

impl AsRawFd for Epoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (close-on-exec): message boundaries
/// are kept, and descriptors ride along (`send_with_fds`).
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into `fds`, which we then own.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets `O_NONBLOCK` (shared by every descriptor of the open file).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })
}

/// Lets `fd` survive an exec (clears `FD_CLOEXEC`).
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on an open descriptor with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, flags & !libc::FD_CLOEXEC) })
}

/// Takes ownership of a descriptor number inherited across exec (see `clear_cloexec`),
/// after checking it is open. Marks it close-on-exec again.
pub fn inherited_fd(raw: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only checks that the number is an open descriptor.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFD on the open descriptor.
    check(unsafe { libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) })?;
    // SAFETY: the descriptor was handed to this process to own (by the exec'ing agent),
    // and nothing else in this process refers to it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Most descriptors one message carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Sends one message with `fds` attached (SCM_RIGHTS): the receiver gets its own
/// descriptors for the same open files.
pub fn send_with_fds(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let raw: Vec<libc::c_int> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let payload = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    let mut control = vec![0u8; if raw.is_empty() { 0 } else { space }];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
        // SAFETY: `control` has room for one header and `payload` bytes (CMSG_SPACE), so
        // the first header and its data lie inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(cmsg).cast(), raw.len());
        }
    }
    loop {
        // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths.
        let n = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message (waiting for it) into `buf`; returns its length (0: the peer
/// closed) and the descriptors that came with it, owned by us now.
pub fn recv_with_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space =
        unsafe { libc::CMSG_SPACE((MAX_FDS_PER_MESSAGE * size_of::<libc::c_int>()) as u32) };
    let mut control = vec![0u8; space as usize];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid empty one.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control.len();
    let n = loop {
        // SAFETY: every pointer in `msg` refers to live buffers of the stated lengths.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_FIRSTHDR/NXTHDR stay
    // inside it, and each SCM_RIGHTS payload holds cmsg_len - CMSG_LEN(0) bytes of fresh
    // descriptors that this process now owns.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let count = bytes / size_of::<libc::c_int>();
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "hand-over message truncated",
        ));
    }
    Ok((n, fds))
}

/// Sends `signal` to process `pid`.
pub fn send_signal(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill with integer arguments only.
    check(unsafe { libc::kill(pid, signal) })
}

/// IP_TRANSPARENT (IPV6_TRANSPARENT for an IPv6 socket): a listener may then accept, and
/// answer from, destinations that are not this host's addresses (transparent mode's
/// intercepted connections; accepted sockets inherit it); a socket to be connected may
/// bind to a foreign source address. Needs CAP_NET_ADMIN (or CAP_NET_RAW).
pub fn set_ip_transparent(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        set_int_opt(fd, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1)
    } else {
        set_int_opt(fd, libc::SOL_IP, libc::IP_TRANSPARENT, 1)
    }
}

const CAP_NET_ADMIN_BIT: u32 = 12;

/// Lets a command the agent runs (`ip`, for transparent mode's routing rules) keep
/// CAP_NET_ADMIN although the agent is no longer root: the child raises it into its
/// inheritable and ambient sets before exec (allowed while it is in the permitted set;
/// `no_new_privs` does not stop ambient capabilities). A root agent's children need
/// nothing; where the raise fails, the command runs without it and says so itself.
pub fn keep_net_admin_across_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    if effective_uid() == 0 {
        return;
    }
    // SAFETY: the hook runs in the forked child before exec and calls only capget,
    // capset and prctl (async-signal-safe system calls) on memory of its own stack.
    unsafe {
        command.pre_exec(|| {
            let _ = raise_ambient_net_admin();
            Ok(())
        });
    }
}

/// In the calling thread: CAP_NET_ADMIN into the inheritable set, then the ambient set.
fn raise_ambient_net_admin() -> io::Result<()> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
        CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capget writes the header and two data structs (version 3) that live across
    // the call.
    check(unsafe {
        libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) as libc::c_int
    })?;
    data[0].inheritable |= 1 << CAP_NET_ADMIN_BIT;
    // SAFETY: as for `set_capabilities`.
    check(unsafe {
        libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) as libc::c_int
    })?;
    // SAFETY: prctl with integer arguments only.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
            libc::c_ulong::from(CAP_NET_ADMIN_BIT),
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    })
}

/// The kernel's `bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// Writes `keys[i] = values[i]` into a hash map in one `bpf()` call instead of one each
/// (the kernel applies them in order, exactly as separate updates). On an error, the
/// entries before the failing one are written. (aya has no batch calls.)
pub fn map_update_batch<K: Pod, V: Pod, const N: usize>(
    map: &HashMap<MapData, K, V>,
    keys: &[K; N],
    values: &[V; N],
) -> io::Result<()> {
    map_batch(BPF_MAP_UPDATE_BATCH, map, keys, Some(values))
}

/// Deletes `keys` from a hash map in one `bpf()` call. The kernel stops at the first key
/// it cannot delete (one not there) and fails: the caller deletes one by one then.
pub fn map_delete_batch<K: Pod, V: Pod, const N: usize>(
    map: &HashMap<MapData, K, V>,
    keys: &[K; N],
) -> io::Result<()> {
    map_batch(BPF_MAP_DELETE_BATCH, map, keys, None)
}

/// One `BPF_MAP_*_BATCH` command over `keys` (and, for an update, their `values`).
fn map_batch<K: Pod, V: Pod, const N: usize>(
    command: libc::c_long,
    map: &HashMap<MapData, K, V>,
    keys: &[K; N],
    values: Option<&[V; N]>,
) -> io::Result<()> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: N as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` points at `N` keys and (or no) `N` values of the map's sizes (aya
    // checked `K` and `V` when it typed the map), all alive for the call; the kernel
    // writes back only `count`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            &raw mut attr,
            size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
