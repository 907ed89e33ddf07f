//! sockpeer: the tests' separate process for one end of a TCP connection, so that ownership
//! can be checked against a pid and comm that are not the test's own.
//!
//! `sockpeer serve ADDR:PORT` prints `listening PORT`, serves one connection and exits;
//! `sockpeer connect ADDR:PORT` prints `local ADDR:PORT` after its round trip and exits.
use std::{io::Write as _, net::TcpListener, process::ExitCode};

use netwatch_tests::{client_roundtrip, serve_one};

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
            Err(error) => Err(std::io::Error::other(format!(
                "bad address {addr}: {error}"
            ))),
        },
        _ => Err(std::io::Error::other(
            "usage: sockpeer serve|connect ADDR:PORT",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sockpeer: {error}");
            ExitCode::FAILURE
        }
    }
}
