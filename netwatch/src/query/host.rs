//! ss's host conditions, `src`/`dst ADDR[/LEN][:PORT]` and `sport`/`dport` ports: how their
//! words are read and what they match. Written by hand because these are ss's own forms
//! (`127/8`, `*:80`, `[::1]:22`, masks like `/255.0.0.0`), which no address crate reads.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::host::services::Services;

/// `src`/`dst` condition: an address prefix (None: any), a port (None: any), and an
/// interface the socket is bound to (`fe80::1%eth0`; netwatch's addition, ss has no form).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostCond {
    pub net: Option<(IpAddr, u8)>,
    pub port: Option<u16>,
    pub scope: Option<String>,
}

impl HostCond {
    /// `scope` is the interface the socket is bound to, if any.
    pub fn matches(&self, addr: (IpAddr, u16), scope: Option<&str>) -> bool {
        self.port.is_none_or(|port| port == addr.1)
            && self.net.is_none_or(|(net, len)| in_prefix(addr.0, net, len))
            && self.scope.as_deref().is_none_or(|wanted| scope == Some(wanted))
    }
}

/// Whether `addr` lies in `net/len`, as the kernel's inet_diag filter decides it for ss: the
/// families must agree, except that an IPv4 prefix also matches an IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`). An IPv6 prefix matches mapped addresses as the IPv6 bits they are.
pub fn in_prefix(addr: IpAddr, net: IpAddr, len: u8) -> bool {
    match (addr, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            bits_match(u32::from(a).into(), u32::from(n).into(), 32, len)
        }
        (IpAddr::V6(a), IpAddr::V4(n)) => a
            .to_ipv4_mapped()
            .is_some_and(|a| bits_match(u32::from(a).into(), u32::from(n).into(), 32, len)),
        (IpAddr::V6(a), IpAddr::V6(n)) => bits_match(u128::from(a), u128::from(n), 128, len),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

fn bits_match(a: u128, n: u128, width: u32, len: u8) -> bool {
    let len = u32::from(len).min(width);
    if len == 0 {
        return true;
    }
    let shift = width - len;
    a >> shift == n >> shift
}

/// Why a host or port word was not understood; the parser adds the token's position.
pub type Expected = &'static str;

const ADDRESS: Expected = "an address, prefix or ADDR:PORT, e.g. 10.0.0.0/8, 127/8, \
                           [::1]:22, *:80 or fe80::1%eth0 (host names are not resolved)";

/// A port word: `80`, `:80`, `:http`, `http`, or `*` / `:*` for any port.
pub fn port(word: &str, services: &Services) -> Result<Option<u16>, Expected> {
    let text = word.strip_prefix(':').unwrap_or(word);
    if text == "*" {
        return Ok(None);
    }
    text.parse::<u16>()
        .ok()
        .or_else(|| services.port_of(text))
        .map(Some)
        .ok_or("a port number (0-65535), a service name from /etc/services, or *")
}

/// A `src`/`dst` word, split as ss splits it: `[ADDR]:PORT`; `*:PORT`; otherwise the port
/// follows the last ':' (after the '/' when there is one). Where that split does not read,
/// an IPv6 address without brackets (`fe80::1`, which ss rejects) is taken whole.
pub fn host(word: &str, services: &Services) -> Result<HostCond, Expected> {
    let read = |addr: &str, port_text: Option<&str>| -> Result<HostCond, Expected> {
        let (net, scope) = address(addr)?;
        let port = match port_text {
            Some(text) if !text.is_empty() => port(text, services)?,
            _ => None,
        };
        Ok(HostCond { net, port, scope })
    };
    if let Some(rest) = word.strip_prefix('[') {
        let (inside, after) = rest.split_once(']').ok_or(ADDRESS)?;
        // `[ADDR]/LEN[:PORT]` too, which ss does not take.
        return match after.strip_prefix('/') {
            Some(tail) => {
                let (len, port) = tail.split_once(':').map_or((tail, None), |(l, p)| (l, Some(p)));
                read(&format!("{inside}/{len}"), port)
            }
            None if after.is_empty() => read(inside, None),
            None => read(inside, Some(after.strip_prefix(':').ok_or(ADDRESS)?)),
        };
    }
    if let Some(rest) = word.strip_prefix('*') {
        return read("*", Some(rest.strip_prefix(':').unwrap_or(rest)));
    }
    let search_from = word.find('/').unwrap_or(0);
    match word[search_from..].rfind(':').map(|i| i + search_from) {
        Some(colon) => read(&word[..colon], Some(&word[colon + 1..]))
            .or_else(|error| read(word, None).map_err(|_| error)),
        None => read(word, None),
    }
}

/// An address prefix (None: any address).
type Prefix = Option<(IpAddr, u8)>;

/// An address or prefix with an optional interface: `fe80::1%eth0`, `fe80::1%eth0/64`.
fn address(text: &str) -> Result<(Prefix, Option<String>), Expected> {
    let Some((addr, rest)) = text.split_once('%') else {
        return Ok((prefix(text)?, None));
    };
    let (scope, len) = rest.split_once('/').map_or((rest, None), |(s, l)| (s, Some(l)));
    if scope.is_empty() {
        return Err(ADDRESS);
    }
    let text = len.map_or(addr.to_string(), |len| format!("{addr}/{len}"));
    Ok((prefix(&text)?, Some(scope.to_string())))
}

/// An address or prefix: `*`, `any`, `all` and `default` (and nothing) match every address;
/// IPv4 may be short (`127/8` is 127.0.0.0/8), with a length or a dotted mask.
fn prefix(text: &str) -> Result<Prefix, Expected> {
    let (addr, len) = match text.split_once('/') {
        Some((addr, len)) => (addr, Some(len)),
        None => (text, None),
    };
    if matches!(addr, "" | "*" | "any" | "all" | "default") {
        return if len.is_none() || addr == "default" { Ok(None) } else { Err(ADDRESS) };
    }
    let addr: IpAddr = if addr.contains(':') {
        IpAddr::V6(addr.parse::<Ipv6Addr>().map_err(|_| ADDRESS)?)
    } else {
        IpAddr::V4(short_ipv4(addr).ok_or(ADDRESS)?)
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len {
        None => max,
        Some(len) => match len.parse::<u8>() {
            Ok(len) if len <= max => len,
            Ok(_) => return Err(ADDRESS),
            Err(_) if addr.is_ipv4() => mask_length(len).ok_or(ADDRESS)?,
            Err(_) => return Err(ADDRESS),
        },
    };
    Ok(Some((addr, len)))
}

/// `127`, `10.1`, `192.168.1.1`: up to four dotted parts, missing ones zero, each a number
/// as strtoul reads it (decimal, 0x hex, 0 octal), as iproute2's get_addr_ipv4 does.
fn short_ipv4(text: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    for (octet, part) in octets.iter_mut().zip(&parts) {
        let value = if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            u8::from_str_radix(hex, 16).ok()?
        } else if part.len() > 1 && part.starts_with('0') {
            u8::from_str_radix(&part[1..], 8).ok()?
        } else {
            part.parse::<u8>().ok()?
        };
        *octet = value;
    }
    Some(Ipv4Addr::from(octets))
}

/// A dotted netmask (`255.255.0.0`) as a prefix length; None unless its ones are contiguous.
fn mask_length(text: &str) -> Option<u8> {
    let mask = u32::from(text.parse::<Ipv4Addr>().ok()?);
    let ones = mask.leading_ones();
    (mask.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(word: &str) -> HostCond {
        host(word, &Services::parse("http 80/tcp\n")).unwrap_or_else(|e| panic!("{word}: {e}"))
    }

    fn net(addr: &str, len: u8) -> Option<(IpAddr, u8)> {
        Some((addr.parse().unwrap(), len))
    }

    #[test]
    fn words_split_as_ss_splits_them() {
        let cases = [
            ("127.0.0.1", net("127.0.0.1", 32), None),
            ("127/8", net("127.0.0.0", 8), None),
            ("10.1/16", net("10.1.0.0", 16), None),
            ("10.0.0.0/255.0.0.0", net("10.0.0.0", 8), None),
            ("127.0.0.1:22", net("127.0.0.1", 32), Some(22)),
            ("127.0.0.1:http", net("127.0.0.1", 32), Some(80)),
            ("127/8:80", net("127.0.0.0", 8), Some(80)),
            ("[::1]", net("::1", 128), None),
            ("[::1]:22", net("::1", 128), Some(22)),
            ("[::ffff:127.0.0.1]", net("::ffff:127.0.0.1", 128), None),
            ("::ffff:127.0.0.0/104", net("::ffff:127.0.0.0", 104), None),
            ("::/0", net("::", 0), None),
            ("::1:80", net("::1", 128), Some(80)),
            ("fe80::1", net("fe80::1", 128), None),
            ("*:80", None, Some(80)),
            ("*", None, None),
            (":80", None, Some(80)),
            ("any", None, None),
        ];
        for (word, want_net, want_port) in cases {
            let got = cond(word);
            assert_eq!((got.net, got.port), (want_net, want_port), "{word}");
        }
        let scoped = cond("fe80::1%lo");
        assert_eq!((scoped.net, scoped.scope.as_deref()), (net("fe80::1", 128), Some("lo")));
        let scoped = cond("[fe80::1%eth0]:22");
        assert_eq!((scoped.port, scoped.scope.as_deref()), (Some(22), Some("eth0")));
        for bad in [
            "banana",
            "10.0.0.0/33",
            "1.2.3.4.5",
            "256.1.1.1",
            "[::1",
            "[::1]x",
            "::1%",
            "10/255.0.255.0",
            "host:nosuchport",
        ] {
            assert!(host(bad, &Services::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefixes_match_as_the_kernel_filter_does() {
        let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
        let mapped = v4("::ffff:127.0.0.1");
        assert!(in_prefix(v4("10.1.2.3"), v4("10.0.0.0"), 8));
        assert!(!in_prefix(v4("11.1.2.3"), v4("10.0.0.0"), 8));
        // An IPv4 prefix matches the mapped address; an IPv6 one its IPv6 bits.
        assert!(in_prefix(mapped, v4("127.0.0.0"), 8));
        assert!(in_prefix(mapped, v4("::ffff:127.0.0.0"), 104));
        assert!(in_prefix(mapped, v4("::"), 0));
        assert!(in_prefix(mapped, mapped, 128));
        // Families must agree otherwise, even for /0.
        assert!(!in_prefix(v4("127.0.0.1"), v4("::"), 0));
        assert!(!in_prefix(v4("::1"), v4("0.0.0.0"), 0));
        assert!(!in_prefix(v4("127.0.0.1"), mapped, 128));
    }
}
