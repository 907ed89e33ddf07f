//! One way to write a socket's end, ss's, for every view: `127.0.0.1:80`, `[::1]:80`, `*:80`
//! for a dual-stack wildcard, `[::]:80` for an IPV6_V6ONLY one, `[fe80::1]%eth0:22` for a
//! socket bound to an interface, and `*` for port 0. Each view passes what it knows of the
//! socket (V6ONLY, the interface).
use std::net::IpAddr;

/// An endpoint as ss prints it. `v6only`: the socket takes no IPv4 (an IPv6 wildcard is then
/// `[::]`, else `*`); `scope`: the interface it is bound to (ss shows it on the local end
/// only); `service`: the port's name, unless numeric output was asked for.
pub fn endpoint(
    (addr, port): (IpAddr, u16),
    v6only: bool,
    scope: Option<&str>,
    service: Option<&str>,
) -> String {
    let mut text = match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) if v6.is_unspecified() && !v6only => "*".to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    if let Some(scope) = scope {
        text.push('%');
        text.push_str(scope);
    }
    text.push(':');
    match (port, service) {
        (0, _) => text.push('*'),
        (_, Some(name)) => text.push_str(name),
        (port, None) => text.push_str(&port.to_string()),
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_written_as_ss_writes_them() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(endpoint((ip("127.0.0.1"), 80), false, None, None), "127.0.0.1:80");
        assert_eq!(endpoint((ip("0.0.0.0"), 0), false, None, None), "0.0.0.0:*");
        assert_eq!(endpoint((ip("::"), 80), false, None, None), "*:80");
        assert_eq!(endpoint((ip("::"), 0), true, None, None), "[::]:*");
        assert_eq!(
            endpoint((ip("::ffff:127.0.0.1"), 80), false, None, Some("http")),
            "[::ffff:127.0.0.1]:http"
        );
        assert_eq!(endpoint((ip("fe80::1"), 2222), false, Some("lo"), None), "[fe80::1]%lo:2222");
    }
}
