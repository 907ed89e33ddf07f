//! sockpeer: the tests' separate process for sockets, so that ownership can be checked
//! against a pid and comm that are not the test's own.
//!
//! - `sockpeer serve ADDR:PORT` prints `listening PORT`, serves one connection and exits;
//! - `sockpeer connect ADDR:PORT` prints `local ADDR:PORT` after its round trip and exits;
//! - `sockpeer serve-forked ADDR:PORT [hold]` listens, forks, and lets the child serve one
//!   connection (with `hold`: accept one and keep it until stdin closes);
//! - `sockpeer fork-exec` holds a TCP listener (close-on-exec) and a UDP socket (inherited
//!   across exec), forks a child that execs `sleep`, prints `ready PARENT CHILD`, and keeps
//!   them until its stdin closes;
//! - `sockpeer pass-fd` binds a UDP socket, forks a child and passes it the socket over a
//!   unix socket pair with SCM_RIGHTS (the child closes its inherited copy first), prints
//!   `ready PARENT CHILD FD`, and keeps both until its stdin closes;
//! - `sockpeer serve-many ADDR:PORT N [server-first]` prints `listening PORT` and serves N
//!   connections (closing each first, with `server-first`);
//! - `sockpeer listen ADDR:PORT` prints `listening PORT` and never accepts, until its stdin
//!   closes; `sockpeer listen-shared ADDR:PORT` does so with SO_REUSEPORT and a backlog of 5;
//! - `sockpeer churn ADDR:PORT N [server-first]` makes N round trips to it, one after
//!   another (reading to the server's close before closing, with `server-first`);
//! - `sockpeer rate SECONDS` serves itself on loopback: prints `ready`, waits for a line on
//!   stdin (so that several start together), makes round trips for SECONDS and prints how
//!   many (for benchmarks);
//! - `sockpeer udp-sends ADDR:PORT N` sends one datagram from each of N new, unbound UDP
//!   sockets (the kernel binds each as it sends) and fails if any send does;
//! - `sockpeer pairs N` makes a listener and N/2 established loopback pairs (N sockets),
//!   prints `ready`, and keeps them until its stdin closes (for benchmarks);
//! - `sockpeer connect-hold ADDR:PORT` connects, prints `ready LOCALPORT`, and keeps the
//!   connection until its stdin closes;
//! - `sockpeer connect-fail ADDR:PORT timeout|abort` connects somewhere that never answers:
//!   `timeout` waits for the kernel to give up (one SYN retry, about 3 s), `abort` closes the
//!   socket 200 ms into the attempt;
//! - `sockpeer refused SECONDS` connects to 127.0.0.1:1, where nothing listens, again and
//!   again (each refusal is a RST the kernel handles in softirq), and prints how many;
//! - `sockpeer syscalls getppid|file|unix SECONDS` loops over system calls with no TCP in
//!   them and prints ns per iteration (for benchmarks; see [`syscalls`]);
//! - `sockpeer hold` makes a mix of sockets in every state and shape `ss` lists, in two
//!   steps (see [`hold`]).
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::ExitCode,
    thread,
    time::Duration,
};

use netwatch_tests::{client_roundtrip, serve_one};

mod hold;
mod syscalls;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", addr] => TcpListener::bind(addr).and_then(|listener| {
            println!("listening {}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            serve_one(&listener).map(drop)
        }),
        ["connect", addr] => match addr.parse() {
            Ok(server) => client_roundtrip(server).map(|local| println!("local {local}")),
            Err(error) => Err(std::io::Error::other(format!("bad address {addr}: {error}"))),
        },
        ["serve-forked", addr] => serve_forked(addr, false),
        ["serve-forked", addr, "hold"] => serve_forked(addr, true),
        ["hold"] => hold::hold(),
        ["connect-hold", addr] => connect_hold(addr),
        ["connect-fail", addr, how] => connect_fail(addr, how),
        ["pairs", count] => pairs(count),
        ["fork-exec"] => fork_exec(),
        ["pass-fd"] => pass_fd(),
        ["serve-many", addr, count] => serve_many(addr, count, false),
        ["serve-many", addr, count, "server-first"] => serve_many(addr, count, true),
        ["churn", addr, count] => churn(addr, count, false),
        ["churn", addr, count, "server-first"] => churn(addr, count, true),
        ["udp-sends", addr, count] => udp_sends(addr, count),
        ["rate", seconds] => rate(seconds, None),
        ["rate", seconds, per_second] => rate(seconds, Some(per_second)),
        ["refused", seconds] => refused(seconds),
        ["syscalls", what, seconds] => syscalls::run(what, seconds).map(|ns| println!("{ns:.1}")),
        ["listen-shared", addr] => hold::listen_shared(addr),
        ["listen", addr] => TcpListener::bind(addr).and_then(|listener| {
            println!("listening {}", listener.local_addr()?.port());
            std::io::stdout().flush()?;
            std::io::stdin().read_to_end(&mut Vec::new()).map(drop)
        }),
        _ => Err(std::io::Error::other("usage: sockpeer serve|connect ADDR:PORT | hold")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sockpeer: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A pre-forking server: the parent listens and forks; the child accepts one connection.
/// Prints `listening PORT parent PID child PID`.
fn serve_forked(addr: &str, hold: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    let port = listener.local_addr()?.port();
    std::io::stdout().flush()?;
    // SAFETY: this process is single-threaded here; the child only uses the listener and exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            let served = if hold {
                listener
                    .accept()
                    .and_then(|(_kept, _)| std::io::stdin().read_to_end(&mut Vec::new()).map(drop))
            } else {
                serve_one(&listener).map(drop)
            };
            let code = i32::from(served.is_err());
            // SAFETY: leaves the child without running the parent's atexit handlers twice.
            unsafe { libc::_exit(code) }
        }
        child => {
            println!("listening {port} parent {} child {child}", std::process::id());
            std::io::stdout().flush()?;
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(child, &mut status, 0) };
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::other(format!("child failed: status {status}")))
            }
        }
    }
}

fn fork_exec() -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    // SAFETY: clearing FD_CLOEXEC on our own fd.
    if unsafe { libc::fcntl(udp.as_raw_fd(), libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: single-threaded here; the child only calls async-signal-safe functions.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: the child dies with its parent, then becomes `sleep` (fds without
        // FD_CLOEXEC stay open across the exec).
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            let argv = [c"sleep".as_ptr(), c"60".as_ptr(), std::ptr::null()];
            libc::execvp(c"sleep".as_ptr(), argv.as_ptr());
            libc::_exit(127);
        }
    }
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    thread::sleep(Duration::from_millis(200));
    println!("ready {} {child}", std::process::id());
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    // SAFETY: our own child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    drop((listener, udp));
    Ok(())
}

fn pass_fd() -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (parent_end, child_end) = std::os::unix::net::UnixStream::pair()?;
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let (mut report_read, report_write) = std::os::unix::net::UnixStream::pair()?;
    // SAFETY: single-threaded here.
    let child = unsafe { libc::fork() };
    if child == 0 {
        // SAFETY: the child gives up the copy of the socket fork gave it, so that it holds the
        // socket only through the fd it receives; it dies with its parent.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            libc::close(udp.as_raw_fd());
        }
        let received = receive_fd(child_end.as_raw_fd());
        let mut report = &report_write;
        let _ = writeln!(report, "{received}");
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    }
    if child < 0 {
        return Err(std::io::Error::last_os_error());
    }
    send_fd(parent_end.as_raw_fd(), udp.as_raw_fd())?;
    let mut received = [0u8; 16];
    let n = report_read.read(&mut received)?;
    let received = String::from_utf8_lossy(&received[..n]).trim().to_string();
    println!("ready {} {child} {received}", std::process::id());
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    // SAFETY: our own child.
    unsafe { libc::kill(child, libc::SIGKILL) };
    drop(udp);
    Ok(())
}

/// Sends `fd` over the unix socket `over` with SCM_RIGHTS.
fn send_fd(over: i32, fd: i32) -> std::io::Result<()> {
    let mut byte = [0u8; 1];
    let mut control = [0u64; 4]; // room for CMSG_SPACE(4), 8-byte aligned
    // SAFETY: msghdr and cmsg built in buffers that outlive the call.
    unsafe {
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(4) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>(), fd);
        if libc::sendmsg(over, &msg, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one fd sent with SCM_RIGHTS; -1 on failure.
fn receive_fd(over: i32) -> i32 {
    let mut byte = [0u8; 1];
    let mut control = [0u64; 4];
    // SAFETY: as in send_fd.
    unsafe {
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        if libc::recvmsg(over, &mut msg, 0) < 0 {
            return -1;
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return -1;
        }
        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<i32>())
    }
}

fn pairs(count: &str) -> std::io::Result<()> {
    // Each socket is an fd: raise the soft limit to the hard one.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers to a local rlimit.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let mut kept = Vec::new();
    for _ in 0..count_arg(count)? / 2 {
        kept.push(pair(&listener)?);
    }
    println!("ready");
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    // Reset rather than close: no TIME_WAIT left behind to weigh on whatever is measured
    // in the next minute.
    for (client, server) in &kept {
        socket2::SockRef::from(client).set_linger(Some(Duration::ZERO))?;
        socket2::SockRef::from(server).set_linger(Some(Duration::ZERO))?;
    }
    drop(kept);
    Ok(())
}

fn connect_hold(addr: &str) -> std::io::Result<()> {
    let stream = TcpStream::connect(addr)?;
    println!("ready {}", stream.local_addr()?.port());
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    drop(stream);
    Ok(())
}

fn connect_fail(addr: &str, how: &str) -> std::io::Result<()> {
    let SocketAddr::V4(to) =
        addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?
    else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    // SAFETY: plain socket calls on our own fd, closed below.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        let one_retry: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&one_retry as *const libc::c_int).cast(),
            4,
        );
        if how == "abort" {
            libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        }
        let address = sockaddr_in(to);
        let rc = libc::connect(
            fd,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        let error = std::io::Error::last_os_error();
        if how == "abort" {
            thread::sleep(Duration::from_millis(200));
        }
        libc::close(fd);
        match (how, rc, error.raw_os_error()) {
            ("timeout", -1, Some(libc::ETIMEDOUT)) | ("abort", -1, Some(libc::EINPROGRESS)) => {
                Ok(())
            }
            _ => Err(std::io::Error::other(format!("connect {how}: rc {rc}, {error}"))),
        }
    }
}

fn count_arg(count: &str) -> std::io::Result<usize> {
    count.parse().map_err(|e| std::io::Error::other(format!("bad count {count}: {e}")))
}

/// `server_first`: the server closes as soon as it has answered, as an HTTP/1.0 server
/// does, so its end keeps the 4-tuple in TIME_WAIT.
fn serve_many(addr: &str, count: &str, server_first: bool) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening {}", listener.local_addr()?.port());
    std::io::stdout().flush()?;
    for _ in 0..count_arg(count)? {
        if server_first {
            let (mut stream, _) = listener.accept()?;
            stream.read_exact(&mut [0u8; 4])?;
            stream.write_all(b"pong")?;
        } else {
            serve_one(&listener)?;
        }
    }
    Ok(())
}

/// `server_first`: the client reads to the server's close before it closes its own end.
fn churn(addr: &str, count: &str, server_first: bool) -> std::io::Result<()> {
    let server: SocketAddr =
        addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    for _ in 0..count_arg(count)? {
        if server_first {
            let mut stream = TcpStream::connect(server)?;
            stream.write_all(b"ping")?;
            stream.read_to_end(&mut Vec::new())?;
        } else {
            client_roundtrip(server)?;
        }
    }
    Ok(())
}

/// Round trips to a server of its own for `seconds`, as fast as it can or, with `per_second`,
/// paced to that rate (the pace is kept on average: a late round trip is made up at once).
fn rate(seconds: &str, per_second: Option<&str>) -> std::io::Result<()> {
    let seconds: f64 =
        seconds.parse().map_err(|e| std::io::Error::other(format!("{seconds}: {e}")))?;
    let interval = match per_second {
        Some(rate) => {
            let rate: f64 =
                rate.parse().map_err(|e| std::io::Error::other(format!("{rate}: {e}")))?;
            Some(Duration::from_secs_f64(1.0 / rate))
        }
        None => None,
    };
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let server = listener.local_addr()?;
    thread::spawn(move || while serve_one(&listener).is_ok() {});
    println!("ready");
    std::io::stdout().flush()?;
    std::io::stdin().read_line(&mut String::new())?;
    let started = std::time::Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let mut round_trips = 0u64;
    while std::time::Instant::now() < until {
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(round_trips as f64);
            thread::sleep(due.saturating_duration_since(std::time::Instant::now()));
        }
        client_roundtrip(server)?;
        round_trips += 1;
    }
    println!("{round_trips}");
    Ok(())
}

fn refused(seconds: &str) -> std::io::Result<()> {
    let seconds: f64 =
        seconds.parse().map_err(|e| std::io::Error::other(format!("{seconds}: {e}")))?;
    let until = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let mut refusals = 0u64;
    while std::time::Instant::now() < until {
        match TcpStream::connect((Ipv4Addr::LOCALHOST, 1)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refusals += 1,
            Err(e) => return Err(e),
            Ok(_) => return Err(std::io::Error::other("something listens on 127.0.0.1:1")),
        }
    }
    println!("{refusals}");
    Ok(())
}

fn udp_sends(addr: &str, count: &str) -> std::io::Result<()> {
    let to: SocketAddr = addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    for _ in 0..count_arg(count)? {
        autobound_udp(to)?;
    }
    Ok(())
}

/// A UDP socket never bound nor connected, that sends once: the kernel binds it to an
/// ephemeral port as it sends (std's UdpSocket always binds first, hence libc).
pub(crate) fn autobound_udp(to: SocketAddr) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(to) = to else { return Err(std::io::Error::other("IPv4 only")) };
    // SAFETY: plain socket calls on a new fd, handed to UdpSocket, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = UdpSocket::from_raw_fd(fd);
        let address = sockaddr_in(to);
        let sent = libc::sendto(
            fd,
            b"x".as_ptr().cast(),
            1,
            0,
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        if sent < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(socket)
    }
}

/// `to` as the C struct connect/sendto take.
fn sockaddr_in(to: std::net::SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: to.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.ip().octets()) },
        sin_zero: [0; 8],
    }
}

/// A connected pair through `listener`: (client, accepted server side).
pub(crate) fn pair(listener: &TcpListener) -> std::io::Result<(TcpStream, TcpStream)> {
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server))
}
