//! `sockpeer hold`: a mix of sockets in every state and shape `ss` lists, made in two steps
//! so that a test can start an agent between them. The first step runs at start; it prints
//! `ready V4 V6 DUAL` (three listeners' ports). Each line `next` on stdin runs the following
//! step, which prints `done`. Everything is kept until stdin closes.
//!
//! Shapes: IPv4, IPv6, dual-stack, IPV6_V6ONLY and IPv4-mapped listeners; a link-local
//! listener and connection bound to `lo` (the namespace needs fe80::1 on lo); two
//! SO_REUSEPORT listeners on one port with unaccepted connections; ESTABLISHED pairs,
//! FIN_WAIT2/CLOSE_WAIT, TIME_WAIT, a half-open connection on port 9000 (when the
//! namespace drops the client's final ACK there), UDP bound, connected and auto-bound.
//! The second step acts on sockets from the first: it connects a never-bound UDP socket,
//! sends from another, reconnects a connected UDP socket to a new peer, duplicates an
//! ESTABLISHED socket with fcntl(F_DUPFD) and closes the original, resets a connection whose
//! server closes with unread data, and forks a child that keeps everything.
use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{
        Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
    },
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use netwatch_tests::HALF_OPEN_PORT;

use crate::{autobound_udp, pair};

fn listener(address: SocketAddr, v6only: bool, reuseport: bool) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    if address.is_ipv6() {
        socket.set_only_v6(v6only)?;
    }
    socket.set_reuse_port(reuseport)?;
    socket.bind(&address.into())?;
    socket.listen(16)?;
    Ok(socket.into())
}

fn unbound_udp() -> std::io::Result<UdpSocket> {
    Ok(Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?.into())
}

pub fn hold() -> std::io::Result<()> {
    let mut kept: Vec<Box<dyn std::any::Any>> = Vec::new();
    let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let v6 = TcpListener::bind((Ipv6Addr::LOCALHOST, 0))?;
    let dual = listener((Ipv6Addr::UNSPECIFIED, 0).into(), false, false)?;
    let v6only = listener((Ipv6Addr::UNSPECIFIED, 0).into(), true, false)?;
    let mapped = listener("[::ffff:127.0.0.1]:0".parse().expect("address"), false, false)?;
    kept.push(Box::new(pair(&v4)?));
    kept.push(Box::new(pair(&v6)?));
    let mapped_client = TcpStream::connect((Ipv4Addr::LOCALHOST, dual.local_addr()?.port()))?;
    kept.push(Box::new((mapped_client, dual.accept()?)));
    kept.push(Box::new(pair(&mapped)?));

    // Link-local: the scope makes the socket bound to lo, which ss shows as `%lo`.
    let lo = lo_index()?;
    let link_local = SocketAddrV6::new("fe80::1".parse().expect("address"), 0, 0, lo);
    let link = listener(link_local.into(), false, false)?;
    kept.push(Box::new(pair(&link)?));

    // Two SO_REUSEPORT listeners on one port, with connections neither has accepted.
    let reuse_a = listener((Ipv4Addr::LOCALHOST, 0).into(), false, true)?;
    let reuse_b = listener(reuse_a.local_addr()?, false, true)?;
    for _ in 0..6 {
        kept.push(Box::new(TcpStream::connect(reuse_a.local_addr()?)?));
    }

    // Half-closed: the client's FIN makes it FIN_WAIT2 and the server CLOSE_WAIT.
    let (half_client, half_server) = pair(&v4)?;
    half_client.shutdown(Shutdown::Write)?;
    kept.push(Box::new((half_client, half_server)));

    // TIME_WAIT: the side that closes first keeps the 4-tuple for 60 s, owned by nobody.
    let (mut tw_client, mut tw_server) = pair(&v4)?;
    tw_client.write_all(b"x")?;
    tw_server.read_exact(&mut [0u8; 1])?;
    drop(tw_client);
    tw_server.read_to_end(&mut Vec::new())?;
    drop(tw_server);

    // Queued, never accepted: ESTAB without an owner, and Recv-Q 1 on the listener.
    kept.push(Box::new(TcpStream::connect(v4.local_addr()?)?));

    // Half-open: the server's side stays SYN_RECV while the final ACK is dropped. (Several
    // holders in one namespace share the port.)
    let half_open = listener((Ipv4Addr::LOCALHOST, HALF_OPEN_PORT).into(), false, true)?;
    let client = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    client.set_nonblocking(true)?;
    let _ = client.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, HALF_OPEN_PORT)).into());
    kept.push(Box::new(client));

    let udp_bound_v4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let udp_bound_v6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))?;
    let udp_connected_v4 = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    udp_connected_v4.connect(udp_bound_v4.local_addr()?)?;
    let udp_connected_v6 = UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))?;
    udp_connected_v6.connect(udp_bound_v6.local_addr()?)?;
    kept.push(Box::new(autobound_udp(udp_bound_v4.local_addr()?)?));
    // For the second step: never bound yet.
    let (to_connect, to_send) = (unbound_udp()?, unbound_udp()?);
    let (duplicated, _server) = pair(&v4)?;
    let resetting = v4.local_addr()?;

    // Let the last ACKs land so that queues and states are settled when the test looks.
    thread::sleep(Duration::from_millis(100));
    let ports = [v4.local_addr()?, v6.local_addr()?, dual.local_addr()?].map(|a| a.port());
    println!("ready {} {} {}", ports[0], ports[1], ports[2]);
    std::io::stdout().flush()?;

    let mut lines = std::io::stdin().lock().lines();
    if let Some(line) = lines.next() {
        line?;
        to_connect.connect(udp_bound_v4.local_addr()?)?;
        to_send.send_to(b"x", udp_bound_v4.local_addr()?)?;
        let (peer_v4, peer_v6) = (
            UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?,
            UdpSocket::bind((Ipv6Addr::LOCALHOST, 0))?,
        );
        udp_connected_v4.connect(peer_v4.local_addr()?)?;
        udp_connected_v6.connect(peer_v6.local_addr()?)?;
        kept.push(Box::new((peer_v4, peer_v6)));
        // SAFETY: fcntl on our own open fd; the new fd is owned by `copy`.
        let copy = unsafe {
            let fd = libc::fcntl(duplicated.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 60);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            OwnedFd::from_raw_fd(fd)
        };
        drop(duplicated);
        kept.push(Box::new(copy));
        reset_by_unread_data(&v4, resetting)?;
        fork_keeper()?;
        thread::sleep(Duration::from_millis(100));
        println!("done");
        std::io::stdout().flush()?;
    }
    for line in lines {
        line?;
    }
    drop((v4, v6, dual, v6only, mapped, link, reuse_a, reuse_b, half_open));
    drop((udp_bound_v4, udp_bound_v6, udp_connected_v4, udp_connected_v6, to_connect, to_send));
    drop(kept);
    Ok(())
}

/// The server side closes with the client's data unread, so the kernel sends a reset.
fn reset_by_unread_data(listener: &TcpListener, to: SocketAddr) -> std::io::Result<()> {
    let mut client = TcpStream::connect(to)?;
    let (server, _) = listener.accept()?;
    client.write_all(&[0u8; 4096])?;
    thread::sleep(Duration::from_millis(20));
    drop(server);
    thread::sleep(Duration::from_millis(20));
    drop(client);
    Ok(())
}

/// A child that inherits every socket and keeps them until the parent dies.
fn fork_keeper() -> std::io::Result<()> {
    // SAFETY: the child only calls async-signal-safe functions before it pauses.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            loop {
                libc::pause();
            }
        },
        _ => Ok(()),
    }
}

fn lo_index() -> std::io::Result<u32> {
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => Err(std::io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// `listen-shared ADDR:PORT`: a SO_REUSEPORT listener with a backlog of 5 that never
/// accepts, until stdin closes.
pub fn listen_shared(addr: &str) -> std::io::Result<()> {
    let address: SocketAddr =
        addr.parse().map_err(|e| std::io::Error::other(format!("{addr}: {e}")))?;
    let socket = Socket::new(Domain::for_address(address), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(5)?;
    println!("listening {}", address.port());
    std::io::stdout().flush()?;
    std::io::stdin().read_to_end(&mut Vec::new())?;
    drop(socket);
    Ok(())
}
