//! The `netwatch table` view: sockets as `ss -tanup` lays them out (text), or as JSON.
use std::{collections::HashMap, time::Duration};

use comfy_table::{CellAlignment, ContentArrangement, Table, presets};
use serde::Serialize;

use super::address;
use crate::{
    host::services::Services,
    host::snapshot::{Holder, Protocol, SocketRow, Timer},
    host::tcp_info::TcpInfoRecord,
    kernel::events::{Family, TcpState},
    record::Listed,
};

/// The state as ss spells it (a closed socket, e.g. unconnected UDP, is UNCONN).
pub fn ss_state(state: TcpState) -> &'static str {
    use TcpState::*;
    match state {
        Established => "ESTAB",
        Close => "UNCONN",
        SynSent => "SYN-SENT",
        SynRecv => "SYN-RECV",
        FinWait1 => "FIN-WAIT-1",
        FinWait2 => "FIN-WAIT-2",
        TimeWait => "TIME-WAIT",
        CloseWait => "CLOSE-WAIT",
        LastAck => "LAST-ACK",
        Listen => "LISTEN",
        Closing => "CLOSING",
        NewSynRecv => "NEW-SYN-RECV",
    }
}

/// A row's local and peer endpoints as ss prints them (the interface on the local end only),
/// with service names unless `services` is None (`-n`).
pub fn endpoints(row: &SocketRow, services: Option<&Services>) -> (String, String) {
    let service = |port: u16| services.and_then(|s| s.name_of(port, row.protocol));
    (
        address::endpoint(row.local, row.v6only, row.scope.as_deref(), service(row.local.1)),
        address::endpoint(row.remote, row.v6only, None, service(row.remote.1)),
    )
}

/// `users:(("nginx",pid=812,fd=6),...)`, as `ss -p` prints owners.
pub fn users(owners: &[Holder]) -> String {
    if owners.is_empty() {
        return String::new();
    }
    // A comm may hold any byte but NUL: a control character would break the table's lines.
    let comm = |o: &Holder| o.comm.replace(|c: char| c.is_control(), "?");
    let list: Vec<String> =
        owners.iter().map(|o| format!("(\"{}\",pid={},fd={})", comm(o), o.pid, o.fd)).collect();
    format!("users:({})", list.join(","))
}

fn timer_text(timer: &Timer) -> String {
    let kind = serde_json::to_value(timer.kind).ok().and_then(|v| v.as_str().map(String::from));
    format!("timer:({},{:.3}sec)", kind.unwrap_or_default(), f64::from(timer.remaining_ms) / 1000.0)
}

fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => format!("{}ms", d.as_millis()),
        1..=59 => format!("{:.1}s", d.as_secs_f64()),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

fn queue(listed: &Listed, length: u32) -> String {
    if listed.queues_known { length.to_string() } else { "-".to_string() }
}

/// What `-e` and `-i` add to the rows, read from the kernel at the moment of asking.
#[derive(Debug, Default)]
pub struct Extras {
    /// User names by uid.
    pub users: HashMap<u32, String>,
    /// tcp_info by socket cookie (`-i`).
    pub info: HashMap<u64, TcpInfoRecord>,
}

impl Extras {
    /// The row's uid, when the kernel gave it at the moment of asking (a timewait or
    /// request socket has none).
    fn uid(listed: &Listed) -> Option<u32> {
        let kept = listed.row.inode != 0
            || !matches!(
                listed.row.state,
                TcpState::TimeWait | TcpState::SynRecv | TcpState::NewSynRecv
            );
        (listed.queues_known && kept).then_some(listed.row.uid)
    }

    fn user(&self, listed: &Listed) -> Option<String> {
        let uid = Self::uid(listed)?;
        Some(self.users.get(&uid).cloned().unwrap_or_else(|| uid.to_string()))
    }
}

pub struct TextOptions<'a> {
    /// None: numeric ports (`-n`).
    pub services: Option<&'a Services>,
    pub timers: bool,
    /// The Netid column; ss leaves it out when only one protocol was asked for.
    pub netid: bool,
    /// The State column; ss leaves it out when only one state can be shown.
    pub state: bool,
    /// `-e`: the User, Inode and Cookie columns.
    pub extended: bool,
    /// `-e` user names and `-i` tcp_info (a line under each connection that has it).
    pub extras: &'a Extras,
}

/// The aligned text table. Optional columns appear only when they carry information: the
/// time in state when known, the netns when the rows span more than one namespace, the
/// container when an owner runs in one.
pub fn text(rows: &[Listed], options: &TextOptions<'_>) -> String {
    let show_in_state = rows.iter().any(|r| r.in_state.is_some());
    let show_netns = rows.windows(2).any(|w| w[0].row.netns != w[1].row.netns);
    let show_workload = rows.iter().any(|r| r.workload.as_ref().is_some_and(|w| w.is_container()));
    let mut header = vec![
        "Netid",
        "State",
        "Recv-Q",
        "Send-Q",
        "Local Address:Port",
        "Peer Address:Port",
        "Process",
    ];
    if !options.state {
        header.remove(1);
    }
    if !options.netid {
        header.remove(0);
    }
    if show_in_state {
        header.push("In-State");
    }
    if show_netns {
        header.push("Netns");
    }
    if show_workload {
        header.push("Container");
    }
    if options.timers {
        header.push("Timer");
    }
    if options.extended {
        header.extend(["User", "Inode", "Cookie"]);
    }
    let mut table = Table::new();
    table
        .load_style(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header);
    for listed in rows {
        let row = &listed.row;
        let (local, remote) = endpoints(row, options.services);
        let mut cells = vec![
            row.protocol.name().to_string(),
            ss_state(row.state).to_string(),
            queue(listed, row.recv_q),
            queue(listed, row.send_q),
            local,
            remote,
            users(&listed.owners),
        ];
        if !options.state {
            cells.remove(1);
        }
        if !options.netid {
            cells.remove(0);
        }
        if show_in_state {
            cells.push(listed.in_state.map_or("-".to_string(), duration_text));
        }
        if show_netns {
            cells.push(listed.netns_name.clone().unwrap_or_else(|| row.netns.to_string()));
        }
        if show_workload {
            cells.push(listed.workload.as_ref().map_or_else(|| "-".into(), |w| w.label()));
        }
        if options.timers {
            cells.push(row.timer.as_ref().map(timer_text).unwrap_or_default());
        }
        if options.extended {
            cells.push(options.extras.user(listed).unwrap_or_else(|| "-".into()));
            cells.push(row.inode.to_string());
            cells.push(row.cookie.to_string());
        }
        table.add_row(cells);
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let first_queue = usize::from(options.netid) + usize::from(options.state);
    for column in [first_queue, first_queue + 1] {
        if let Some(column) = table.column_mut(column) {
            column.set_cell_alignment(CellAlignment::Right);
        }
    }
    let mut lines = Vec::with_capacity(rows.len() + 1);
    // One line per row, after the header: no cell wraps.
    for (n, line) in table.lines().enumerate() {
        lines.push(line.trim_end().to_string());
        let info = n.checked_sub(1).and_then(|i| options.extras.info.get(&rows.get(i)?.row.cookie));
        if let Some(info) = info {
            lines.push(format!("\t {}", info.text()));
        }
    }
    lines.join("\n")
}

#[derive(Serialize)]
struct OwnerRecord<'a> {
    pid: u32,
    comm: &'a str,
    ago_ms: Option<u128>,
}

/// One socket as a JSON object.
#[derive(Serialize)]
struct Record<'a> {
    netid: Protocol,
    state: TcpState,
    family: Family,
    recv_q: Option<u32>,
    send_q: Option<u32>,
    laddr: String,
    lport: u16,
    raddr: String,
    rport: u16,
    /// The interface the socket is bound to (ss's `%IF`).
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    /// An IPv6 socket that takes no IPv4 (IPV6_V6ONLY).
    v6only: bool,
    owners: &'a [Holder],
    in_state_ms: Option<u128>,
    owner_history: Vec<OwnerRecord<'a>>,
    netns: u32,
    netns_name: Option<&'a str>,
    cookie: u64,
    inode: u64,
    /// Null where the kernel was not asked, or has none (timewait and request sockets).
    uid: Option<u32>,
    user: Option<String>,
    timer: Option<Timer>,
    /// With `-i`, for a TCP socket the kernel still has.
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp_info: Option<&'a TcpInfoRecord>,
    /// The owner's container, pod or systemd unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<&'a crate::host::workload::Workload>,
}

fn record<'a>(listed: &'a Listed, extras: &'a Extras) -> Record<'a> {
    let row = &listed.row;
    Record {
        netid: row.protocol,
        state: row.state,
        family: row.family,
        recv_q: listed.queues_known.then_some(row.recv_q),
        send_q: listed.queues_known.then_some(row.send_q),
        laddr: row.local.0.to_string(),
        lport: row.local.1,
        raddr: row.remote.0.to_string(),
        rport: row.remote.1,
        scope: row.scope.as_deref(),
        v6only: row.v6only,
        owners: &listed.owners,
        in_state_ms: listed.in_state.map(|d| d.as_millis()),
        owner_history: listed
            .owner_history
            .iter()
            .map(|o| OwnerRecord {
                pid: o.owner.pid,
                comm: &o.owner.comm,
                ago_ms: o.ago.map(|d| d.as_millis()),
            })
            .collect(),
        netns: row.netns,
        netns_name: listed.netns_name.as_deref(),
        cookie: row.cookie,
        inode: row.inode,
        uid: Extras::uid(listed),
        user: extras.user(listed),
        timer: row.timer,
        tcp_info: extras.info.get(&row.cookie),
        workload: listed.workload.as_deref(),
    }
}

/// All rows as one JSON array.
pub fn json_array(rows: &[Listed], extras: &Extras) -> String {
    let records: Vec<Record<'_>> = rows.iter().map(|r| record(r, extras)).collect();
    serde_json::to_string(&records).unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
}

/// One JSON object per line.
pub fn ndjson(rows: &[Listed], extras: &Extras) -> String {
    rows.iter()
        .map(|r| {
            serde_json::to_string(&record(r, extras))
                .unwrap_or_else(|e| format!(r#"{{"error":"{e}"}}"#))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::host::snapshot::TimerKind;

    fn listed(
        protocol: Protocol,
        state: TcpState,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> Listed {
        Listed {
            row: SocketRow {
                netns: 4026531840,
                protocol,
                family: if local.0.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 },
                state,
                local,
                remote,
                cookie: 9,
                inode: 1234,
                uid: 0,
                recv_q: 0,
                send_q: 128,
                timer: None,
                v6only: true,
                scope: None,
            },
            owners: vec![
                Holder { pid: 812, comm: "nginx".into(), fd: 6, start_time: Some(1), cgroup_id: 0 },
                Holder { pid: 813, comm: "nginx".into(), fd: 6, start_time: Some(2), cgroup_id: 0 },
            ],
            in_state: None,
            netns_name: None,
            queues_known: true,
            owner_history: Vec::new(),
            workload: None,
        }
    }

    /// ss's columns, nothing extended.
    fn plain<'a>(
        services: Option<&'a Services>,
        timers: bool,
        extras: &'a Extras,
    ) -> TextOptions<'a> {
        TextOptions { services, timers, netid: true, state: true, extended: false, extras }
    }

    #[test]
    fn text_looks_like_ss() {
        let extras = Extras::default();
        let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let rows = vec![
            listed(Protocol::Tcp, TcpState::Listen, (any4, 80), (any4, 0)),
            listed(
                Protocol::Udp,
                TcpState::Close,
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 53),
                (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
            ),
        ];
        let services = Services::parse("http 80/tcp\n");
        let named = text(&rows, &plain(Some(&services), false, &extras));
        let lines: Vec<Vec<&str>> = named.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            [
                "Netid",
                "State",
                "Recv-Q",
                "Send-Q",
                "Local",
                "Address:Port",
                "Peer",
                "Address:Port",
                "Process"
            ]
        );
        assert_eq!(
            lines[1],
            [
                "tcp",
                "LISTEN",
                "0",
                "128",
                "0.0.0.0:http",
                "0.0.0.0:*",
                r#"users:(("nginx",pid=812,fd=6),("nginx",pid=813,fd=6))"#
            ]
        );
        assert_eq!(lines[2][..6], ["udp", "UNCONN", "0", "128", "[::1]:53", "[::]:*"]);
        let mut dual = rows[1].clone();
        dual.row.v6only = false;
        dual.row.local.0 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let out = text(&[dual], &plain(None, false, &extras));
        assert_eq!(
            out.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>()[4..6],
            ["*:53", "*:*"]
        );
        let numeric = text(&rows, &plain(None, false, &extras));
        assert!(numeric.contains("0.0.0.0:80"), "{numeric}");
    }

    #[test]
    fn optional_columns_appear_when_informative() {
        let extras = Extras::default();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut a = listed(Protocol::Tcp, TcpState::TimeWait, (lo, 1), (lo, 2));
        a.row.timer = Some(Timer { kind: TimerKind::Timewait, remaining_ms: 59_500 });
        a.in_state = Some(Duration::from_millis(500));
        let mut b = a.clone();
        b.row.netns = 1;
        b.netns_name = Some("blue".into());
        b.in_state = Some(Duration::from_secs(3725));
        let out = text(&[a, b], &plain(None, true, &extras));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("In-State  Netns       Timer"), "{out:?}");
        assert!(
            lines[1].contains("500ms")
                && lines[1].contains("4026531840")
                && lines[1].contains("timer:(timewait,59.500sec)"),
            "{out}"
        );
        assert!(lines[2].contains("1h02m") && lines[2].contains("blue"), "{out}");
    }

    #[test]
    fn extended_columns_and_tcp_info_lines() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut timewait = listed(Protocol::Tcp, TcpState::TimeWait, (lo, 3), (lo, 4));
        (timewait.row.inode, timewait.row.cookie) = (0, 10);
        let rows = vec![listed(Protocol::Tcp, TcpState::Established, (lo, 1), (lo, 2)), timewait];
        let info = netlink_packet_sock_diag::inet::nlas::TcpInfo::parse(&[0; 512]).unwrap();
        let extras = Extras {
            users: HashMap::from([(0, "root".to_string())]),
            info: HashMap::from([(9, TcpInfoRecord::from(&info))]),
        };
        let options = TextOptions {
            services: None,
            timers: false,
            netid: false,
            state: true,
            extended: true,
            extras: &extras,
        };
        let out = text(&rows[..1], &options);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].ends_with("User  Inode  Cookie"), "{out}");
        assert!(lines[1].ends_with("root  1234   9"), "{out}");
        assert!(lines[2].starts_with("\t wscale:0,0 rto:0"), "{out}");
        let out = text(&rows[1..], &TextOptions { extras: &Extras::default(), ..options });
        assert!(
            out.lines().nth(1).unwrap().ends_with("-     0      10"),
            "no uid for timewait: {out}"
        );
        let v: serde_json::Value = serde_json::from_str(&json_array(&rows, &extras)).unwrap();
        assert_eq!((v[0]["user"].as_str(), v[0]["uid"].as_u64()), (Some("root"), Some(0)));
        assert_eq!(v[0]["tcp_info"]["snd_cwnd"], 0);
        assert!(v[1]["uid"].is_null() && v[1]["tcp_info"].is_null());
    }

    #[test]
    fn json_has_every_field() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let rows = vec![listed(Protocol::Tcp, TcpState::Established, (lo, 1), (lo, 2))];
        let v: serde_json::Value =
            serde_json::from_str(&json_array(&rows, &Extras::default())).unwrap();
        let r = &v[0];
        assert_eq!((r["netid"].as_str(), r["state"].as_str()), (Some("tcp"), Some("ESTABLISHED")));
        assert_eq!(
            (r["laddr"].as_str(), r["lport"].as_u64(), r["rport"].as_u64()),
            (Some("127.0.0.1"), Some(1), Some(2))
        );
        assert_eq!(r["owners"][1]["pid"], 813);
        assert_eq!(
            (r["cookie"].as_u64(), r["inode"].as_u64(), r["send_q"].as_u64()),
            (Some(9), Some(1234), Some(128))
        );
        assert!(r["in_state_ms"].is_null() && r["timer"].is_null());
        let line: serde_json::Value =
            serde_json::from_str(&ndjson(&rows, &Extras::default())).unwrap();
        assert_eq!(&line, r);
    }
}
