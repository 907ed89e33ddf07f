//! A connection's `tcp_info` (sock_diag's INET_DIAG_INFO) as `netwatch table -i` shows it:
//! every field of the kernel's struct under its name, in JSON, and in ss -i's `key:value`
//! spelling as text.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::sock_diag::TcpInfo;

/// Every field of `struct tcp_info` that netlink-packet-sock-diag reads; times in the
/// kernel's units (µs for rtt, rto and busy times; ms for the last-send/receive ages), rates
/// in bytes per second.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpInfoRecord {
    pub ca_state: u8,
    pub retransmits: u8,
    pub probes: u8,
    pub backoff: u8,
    pub options: u8,
    pub snd_wscale: u8,
    pub rcv_wscale: u8,
    pub delivery_rate_app_limited: bool,
    pub rto_us: u32,
    pub ato_us: u32,
    pub snd_mss: u32,
    pub rcv_mss: u32,
    pub unacked: u32,
    pub sacked: u32,
    pub lost: u32,
    pub retrans: u32,
    pub fackets: u32,
    pub last_data_sent_ms: u32,
    pub last_ack_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub last_ack_recv_ms: u32,
    pub pmtu: u32,
    pub rcv_ssthresh: u32,
    pub rtt_us: u32,
    pub rttvar_us: u32,
    pub snd_ssthresh: u32,
    pub snd_cwnd: u32,
    pub advmss: u32,
    pub reordering: u32,
    pub rcv_rtt_us: u32,
    pub rcv_space: u32,
    pub total_retrans: u32,
    pub pacing_rate: u64,
    pub max_pacing_rate: u64,
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub segs_out: u32,
    pub segs_in: u32,
    pub notsent_bytes: u32,
    pub min_rtt_us: u32,
    pub data_segs_in: u32,
    pub data_segs_out: u32,
    pub delivery_rate: u64,
    pub busy_time_us: u64,
    pub rwnd_limited_us: u64,
    pub sndbuf_limited_us: u64,
    pub delivered: u32,
    pub delivered_ce: u32,
    pub bytes_sent: u64,
    pub bytes_retrans: u64,
    pub dsack_dups: u32,
    pub reord_seen: u32,
    pub rcv_ooopack: u32,
    pub snd_wnd: u32,
}

/// The kernel's "no slow-start threshold yet" (TCP_INFINITE_SSTHRESH); ss leaves it out.
const INFINITE_SSTHRESH: u32 = 0x7fff_ffff;

impl From<&TcpInfo> for TcpInfoRecord {
    fn from(i: &TcpInfo) -> Self {
        TcpInfoRecord {
            ca_state: i.ca_state,
            retransmits: i.retransmits,
            probes: i.probes,
            backoff: i.backoff,
            options: i.options,
            // Two 4-bit fields, the sender's first (lowest).
            snd_wscale: i.wscale & 0x0f,
            rcv_wscale: i.wscale >> 4,
            delivery_rate_app_limited: i.delivery_rate_app_limited & 1 != 0,
            rto_us: i.rto,
            ato_us: i.ato,
            snd_mss: i.snd_mss,
            rcv_mss: i.rcv_mss,
            unacked: i.unacked,
            sacked: i.sacked,
            lost: i.lost,
            retrans: i.retrans,
            fackets: i.fackets,
            last_data_sent_ms: i.last_data_sent,
            last_ack_sent_ms: i.last_ack_sent,
            last_data_recv_ms: i.last_data_recv,
            last_ack_recv_ms: i.last_ack_recv,
            pmtu: i.pmtu,
            rcv_ssthresh: i.rcv_ssthresh,
            rtt_us: i.rtt,
            rttvar_us: i.rttvar,
            snd_ssthresh: i.snd_ssthresh,
            snd_cwnd: i.snd_cwnd,
            advmss: i.advmss,
            reordering: i.reordering,
            rcv_rtt_us: i.rcv_rtt,
            rcv_space: i.rcv_space,
            total_retrans: i.total_retrans,
            pacing_rate: i.pacing_rate,
            max_pacing_rate: i.max_pacing_rate,
            bytes_acked: i.bytes_acked,
            bytes_received: i.bytes_received,
            segs_out: i.segs_out,
            segs_in: i.segs_in,
            notsent_bytes: i.notsent_bytes,
            min_rtt_us: i.min_rtt,
            data_segs_in: i.data_segs_in,
            data_segs_out: i.data_segs_out,
            delivery_rate: i.delivery_rate,
            busy_time_us: i.busy_time,
            rwnd_limited_us: i.rwnd_limited,
            sndbuf_limited_us: i.sndbuf_limited,
            delivered: i.delivered,
            delivered_ce: i.delivered_ce,
            bytes_sent: i.bytes_sent,
            bytes_retrans: i.bytes_retrans,
            dsack_dups: i.dsack_dups,
            reord_seen: i.reord_seen,
            rcv_ooopack: i.rcv_ooopack,
            snd_wnd: i.snd_wnd,
        }
    }
}

/// Milliseconds with ss's precision (`0.034`, `204`).
fn ms(us: u32) -> String {
    let text = format!("{:.3}", f64::from(us) / 1000.0);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

impl TcpInfoRecord {
    /// ss -i's fields, in its order and spelling, those it leaves out when zero left out too.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let mut put = |field: String| {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&field);
        };
        put(format!("wscale:{},{}", self.snd_wscale, self.rcv_wscale));
        put(format!("rto:{}", ms(self.rto_us)));
        put(format!("rtt:{}/{}", ms(self.rtt_us), ms(self.rttvar_us)));
        put(format!("mss:{}", self.snd_mss));
        put(format!("pmtu:{}", self.pmtu));
        put(format!("rcvmss:{}", self.rcv_mss));
        put(format!("advmss:{}", self.advmss));
        put(format!("cwnd:{}", self.snd_cwnd));
        if self.snd_ssthresh < INFINITE_SSTHRESH {
            put(format!("ssthresh:{}", self.snd_ssthresh));
        }
        for (name, value) in [
            ("bytes_sent", self.bytes_sent),
            ("bytes_retrans", self.bytes_retrans),
            ("bytes_acked", self.bytes_acked),
            ("bytes_received", self.bytes_received),
        ] {
            if value > 0 {
                put(format!("{name}:{value}"));
            }
        }
        for (name, count) in [("segs_out", self.segs_out), ("segs_in", self.segs_in)] {
            if count > 0 {
                put(format!("{name}:{count}"));
            }
        }
        if self.retrans > 0 || self.total_retrans > 0 {
            put(format!("retrans:{}/{}", self.retrans, self.total_retrans));
        }
        put(format!(
            "lastsnd:{} lastrcv:{} lastack:{}",
            self.last_data_sent_ms, self.last_data_recv_ms, self.last_ack_recv_ms
        ));
        for (name, rate) in
            [("pacing_rate", self.pacing_rate), ("delivery_rate", self.delivery_rate)]
        {
            if rate > 0 {
                // bytes/s, shown in bits/s as ss does.
                put(format!("{name} {}bps", rate.saturating_mul(8)));
            }
        }
        if self.delivered > 0 {
            put(format!("delivered:{}", self.delivered));
        }
        if self.delivery_rate_app_limited {
            put("app_limited".into());
        }
        let mut rest = String::new();
        let _ = write!(rest, "rcv_space:{} rcv_ssthresh:{}", self.rcv_space, self.rcv_ssthresh);
        if self.min_rtt_us > 0 {
            let _ = write!(rest, " minrtt:{}", ms(self.min_rtt_us));
        }
        let _ = write!(rest, " snd_wnd:{}", self.snd_wnd);
        put(rest);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_uses_ss_spelling() {
        let mut info = TcpInfo::parse(&[0; 512]).unwrap();
        info.wscale = 0x97; // snd 7, rcv 9
        info.rto = 204_000;
        info.rtt = 34;
        info.rttvar = 17;
        info.snd_cwnd = 10;
        info.snd_ssthresh = INFINITE_SSTHRESH;
        info.bytes_acked = 5;
        info.total_retrans = 2;
        info.delivery_rate = 1000;
        let record = TcpInfoRecord::from(&info);
        let text = record.text();
        for field in [
            "wscale:7,9",
            "rto:204",
            "rtt:0.034/0.017",
            "cwnd:10",
            "bytes_acked:5",
            "retrans:0/2",
            "delivery_rate 8000bps",
        ] {
            assert!(
                text.split(' ').any(|f| f == field) || text.contains(field),
                "{field} in {text}"
            );
        }
        assert!(
            !text.contains("ssthresh:2147483647") && !text.contains("bytes_received"),
            "{text}"
        );
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!((json["rtt_us"].as_u64(), json["rcv_wscale"].as_u64()), (Some(34), Some(9)));
    }
}
