//! `sockpeer syscalls getppid|file|unix SECONDS`: a tight loop of system calls that have no
//! TCP in them, for the benchmark of what tracing costs work that is not TCP. Prints the mean
//! nanoseconds per iteration.
//!
//! - `getppid`: the cheapest system call, so any per-call tax shows;
//! - `file`: `open` of /dev/null, `dup`, and two `close`s (the fd paths netwatch watches);
//! - `unix`: a unix-domain `socket` and its `close` (a socket, but not an inet one).
use std::time::{Duration, Instant};

/// Runs the named loop for `seconds` and returns ns per iteration.
pub fn run(what: &str, seconds: &str) -> std::io::Result<f64> {
    let seconds: f64 =
        seconds.parse().map_err(|e| std::io::Error::other(format!("{seconds}: {e}")))?;
    let body: fn() -> std::io::Result<()> = match what {
        "getppid" => getppid,
        "file" => file,
        "unix" => unix,
        _ => return Err(std::io::Error::other(format!("{what}: not getppid, file or unix"))),
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut iterations = 0u64;
    // Checking the clock every 1024 iterations keeps its cost out of the figure.
    while Instant::now() < until {
        for _ in 0..1024 {
            body()?;
        }
        iterations += 1024;
    }
    Ok(started.elapsed().as_nanos() as f64 / iterations as f64)
}

fn check(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

fn getppid() -> std::io::Result<()> {
    // SAFETY: no arguments, no memory.
    unsafe { libc::getppid() };
    Ok(())
}

fn file() -> std::io::Result<()> {
    // SAFETY: a static C string, and fds this function opened.
    unsafe {
        let fd = check(libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC))?;
        let copy = check(libc::dup(fd))?;
        libc::close(copy);
        libc::close(fd);
    }
    Ok(())
}

fn unix() -> std::io::Result<()> {
    // SAFETY: a new fd, closed at once.
    unsafe {
        let fd = check(libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0))?;
        libc::close(fd);
    }
    Ok(())
}
