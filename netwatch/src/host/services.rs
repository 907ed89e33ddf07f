//! Service names for ports, from `/etc/services` only (as `ss` does without DNS): used to
//! show `:http` instead of `:80` and to accept `sport = :ssh` in filters.
use std::collections::HashMap;

use crate::host::snapshot::Protocol;

#[derive(Debug, Default)]
pub struct Services {
    by_port: HashMap<(u16, Protocol), String>,
    by_name: HashMap<String, u16>,
}

impl Services {
    /// Reads /etc/services; a missing or unreadable file means numeric ports only.
    pub fn load() -> Services {
        std::fs::read_to_string("/etc/services")
            .map(|text| Services::parse(&text))
            .unwrap_or_default()
    }

    /// Parses `name port/proto [aliases...] [# comment]` lines; bad lines are skipped.
    pub fn parse(text: &str) -> Services {
        let mut services = Services::default();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("");
            let mut words = line.split_whitespace();
            let (Some(name), Some(port_proto)) = (words.next(), words.next()) else {
                continue;
            };
            let Some((port, proto)) = port_proto.split_once('/') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            let protocol = match proto {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                _ => continue,
            };
            services.by_port.entry((port, protocol)).or_insert_with(|| name.to_string());
            for alias in std::iter::once(name).chain(words) {
                services.by_name.entry(alias.to_string()).or_insert(port);
            }
        }
        services
    }

    pub fn name_of(&self, port: u16, protocol: Protocol) -> Option<&str> {
        self.by_port.get(&(port, protocol)).map(String::as_str)
    }

    pub fn port_of(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_aliases_and_protocols() {
        let services = Services::parse(
            "# comment\nhttp\t80/tcp\twww # WorldWideWeb\nntp 123/udp\nbroken line\nx 99999/tcp\n",
        );
        assert_eq!(services.name_of(80, Protocol::Tcp), Some("http"));
        assert_eq!(services.name_of(80, Protocol::Udp), None);
        assert_eq!(services.name_of(123, Protocol::Udp), Some("ntp"));
        assert_eq!(services.port_of("www"), Some(80));
        assert_eq!(services.port_of("x"), None);
    }
}
