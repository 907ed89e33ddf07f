//! Loads the kernel programs, patches in the offsets they need, attaches them, and degrades
//! (with one warning each) where a hook is missing rather than refusing to start.
//!
//! Order: resolve offsets (BTF, tracepoint format) -> load the object -> attach the state
//! program (tp_btf, or the classic tracepoint as fallback) -> attach the cgroup hooks on the
//! cgroup v2 root -> enable the deferred-connect path only once `sock_ops` is attached.
//! Dropping [`Probes`] detaches everything; the links are fds, so a killed process detaches too.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
};
use netwatch_common::{global, map, program};

use super::{
    attach::Attacher,
    hooks::{self, HookStatus},
};
use crate::{
    error::{Error, Result},
    kernel::btf::KernelBtf,
    kernel::events::StateSource,
};

/// The kernel object built by build.rs from `netwatch-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netwatch-ebpf"));

/// The `EVENTS` ring buffer's size when `--ring-size` is not given (as netwatch-ebpf declares it).
pub const DEFAULT_RING_SIZE: u32 = 8 << 20;

/// Which TCP state source to use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceChoice {
    /// tp_btf when the kernel has BTF, else the classic tracepoint.
    #[default]
    Auto,
    /// Only tp_btf/inet_sock_set_state (socket cookies, netns).
    Btf,
    /// Only the classic sock:inet_sock_set_state tracepoint (no BTF needed).
    Classic,
}

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    pub source: SourceChoice,
    /// Ring buffer size in bytes (a power of two, at least one page); None keeps the default.
    pub ring_size: Option<u32>,
}

/// The attached programs and the maps the agent reads.
pub struct Probes {
    ebpf: Ebpf,
    pub source: StateSource,
    /// One line per hook that could not be used, and what that costs the user.
    pub warnings: Vec<String>,
    /// How every program fared, for `netwatch check`.
    pub hooks: Vec<HookStatus>,
    /// From start of loading to the last attach.
    pub load_time: Duration,
}

impl Probes {
    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(map::EVENTS).ok_or(Error::Missing(map::EVENTS))?;
        RingBuf::try_from(map).map_err(|source| Error::Map { name: map::EVENTS, source })
    }

    pub fn take_ring_counters(&mut self) -> Result<RingCounters> {
        let map = self.ebpf.take_map(map::LOST).ok_or(Error::Missing(map::LOST))?;
        let map =
            PerCpuArray::try_from(map).map_err(|source| Error::Map { name: map::LOST, source })?;
        Ok(RingCounters { map })
    }
}

/// The kernel side's per-CPU count of events it could not reserve ring buffer space for, and
/// the ring buffer's fill level each CPU saw.
pub struct RingCounters {
    map: PerCpuArray<MapData, u64>,
}

impl RingCounters {
    /// Events lost since the programs were loaded, summed over CPUs.
    pub fn lost(&self) -> Result<u64> {
        let values =
            self.map.get(&0, 0).map_err(|source| Error::Map { name: map::LOST, source })?;
        Ok(values.iter().sum())
    }

    /// The most bytes the ring buffer held unread at once since the programs were loaded.
    pub fn peak_unread(&self) -> Result<u64> {
        let values =
            self.map.get(&1, 0).map_err(|source| Error::Map { name: map::LOST, source })?;
        Ok(values.iter().copied().max().unwrap_or(0))
    }
}

/// Runs of this process's BPF programs the kernel skipped because the same program was
/// already running on that CPU (`recursion_misses` in each program fd's fdinfo; tracing
/// programs only). Each one is an event that was never made. The program fds are found once
/// (a scan of every fd's fdinfo) and then read alone, since this is asked every second.
#[derive(Default)]
pub struct SkippedRuns {
    programs: Vec<std::path::PathBuf>,
    /// The highest total read: a count never goes back, even if a rescan missed an fd.
    most: u64,
}

impl SkippedRuns {
    pub fn read(&mut self) -> u64 {
        let total = self.sum();
        self.most = self.most.max(total);
        self.most
    }

    /// The sum over the known program fds, found again if one of them is no longer one.
    fn sum(&mut self) -> u64 {
        if let Some(total) = misses_of(&self.programs).filter(|_| !self.programs.is_empty()) {
            return total;
        }
        let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else { return 0 };
        self.programs = fds
            .filter_map(|fd| Some(fd.ok()?.path()))
            .filter(|path| misses_of(std::slice::from_ref(path)).is_some())
            .collect();
        misses_of(&self.programs).unwrap_or(0)
    }
}

/// `recursion_misses` summed over the fdinfo files `paths`; None if one cannot be read or is
/// not a BPF program's.
fn misses_of(paths: &[std::path::PathBuf]) -> Option<u64> {
    paths
        .iter()
        .map(|path| {
            let info = std::fs::read_to_string(path).ok()?;
            info.contains("prog_type:").then(|| {
                info.lines()
                    .find_map(|line| line.strip_prefix("recursion_misses:"))
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
        })
        .sum()
}

pub fn load(options: &LoadOptions) -> Result<Probes> {
    let started = Instant::now();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::NotRoot);
    }
    raise_memlock_limit();

    let mut warnings = Vec::new();
    let kernel_btf = match options.source {
        SourceChoice::Classic => None,
        SourceChoice::Btf => Some(KernelBtf::from_sys_fs()?),
        SourceChoice::Auto => match KernelBtf::from_sys_fs() {
            Ok(btf) => Some(btf),
            Err(error) => {
                warnings.push(error.to_string());
                None
            }
        },
    };
    let offsets = match &kernel_btf {
        Some(btf) => kernel_offsets(btf)?,
        None => Vec::new(),
    };
    if kernel_btf.is_some()
        && offsets.iter().any(|&(name, offset)| name == global::OFF_NET_TW_HASHINFO && offset == 0)
    {
        warnings.push(
            "this kernel's net.ipv4.tcp_death_row has neither known layout: connections closed \
             into TIME_WAIT are shown closed, and ss lists TIME-WAIT rows netwatch does not"
                .into(),
        );
    }
    // Read even with BTF: the classic tracepoint is the fallback if tp_btf fails to load.
    let classic_fields = classic_tracepoint_fields();
    if kernel_btf.is_none() {
        // Without BTF the classic tracepoint is all there is.
        classic_fields.as_ref().map_err(|e| Error::TracepointFormat {
            path: PathBuf::from("events/sock/inet_sock_set_state/format"),
            reason: e.to_string(),
        })?;
    }
    let syscall_fields = syscall_field_offsets();

    let mut loader = EbpfLoader::new();
    let fields = [
        classic_fields.as_deref().unwrap_or_default(),
        syscall_fields.as_deref().unwrap_or_default(),
    ];
    for (name, value) in offsets.iter().chain(fields.into_iter().flatten()) {
        loader.override_global(name, value, true);
    }
    if let Some(size) = options.ring_size {
        loader.map_max_entries(map::EVENTS, size);
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;

    // aya's own parse of the kernel BTF, for the tp_btf programs (one parse for all of them).
    let aya_btf = match kernel_btf {
        Some(_) => Some(Btf::from_sys_fs().map_err(|e| Error::Btf {
            path: crate::kernel::btf::VMLINUX.into(),
            reason: e.to_string(),
        })?),
        None => None,
    };
    let mut attacher = Attacher { ebpf: &mut ebpf, statuses: Vec::new() };
    let Some(source) = attacher.state(aya_btf.as_ref(), classic_fields.is_ok()) else {
        let why = attacher.statuses.iter().filter_map(|s| s.reason.clone()).collect::<Vec<_>>();
        return Err(Error::NoStateSource { reasons: why.join("; ") });
    };
    if source != StateSource::TpBtf && options.source == SourceChoice::Btf {
        let status = attacher.statuses.iter().find(|s| s.program == program::STATE_BTF);
        let reason = status.and_then(|s| s.reason.clone()).unwrap_or_default();
        return Err(Error::NoTpBtf { reason });
    }
    // The fd-table programs name sockets by cookie, which classic state events do not carry.
    let no_cookies = (source == StateSource::Tracepoint)
        .then_some("the classic state tracepoint has no socket cookies to join them to");
    let no_formats = syscall_fields.as_ref().err().map(ToString::to_string);
    attacher.ownership(aya_btf.as_ref(), no_cookies, no_formats.as_deref());
    attacher.cgroup(crate::host::cgroup::root(), source)?;
    let hooks = attacher.statuses;
    warnings.extend(hooks::warnings(&hooks));
    Ok(Probes { ebpf, source, warnings, hooks, load_time: started.elapsed() })
}

/// Kernel struct offsets the programs read, named as the programs' globals.
fn kernel_offsets(btf: &KernelBtf) -> Result<Vec<(&'static str, u32)>> {
    const FIELDS: [(&str, &str, &str); 42] = [
        (global::OFF_SKC_DADDR, "sock", "__sk_common.skc_daddr"),
        (global::OFF_SKC_RCV_SADDR, "sock", "__sk_common.skc_rcv_saddr"),
        (global::OFF_SKC_DPORT, "sock", "__sk_common.skc_dport"),
        (global::OFF_SKC_NUM, "sock", "__sk_common.skc_num"),
        (global::OFF_SKC_FAMILY, "sock", "__sk_common.skc_family"),
        (global::OFF_SKC_NET, "sock", "__sk_common.skc_net.net"),
        (global::OFF_SKC_V6_DADDR, "sock", "__sk_common.skc_v6_daddr"),
        (global::OFF_SKC_V6_RCV_SADDR, "sock", "__sk_common.skc_v6_rcv_saddr"),
        (global::OFF_SK_PROTOCOL, "sock", "sk_protocol"),
        (global::OFF_INET_SPORT, "inet_sock", "inet_sport"),
        (global::OFF_NET_NS_INUM, "net", "ns.inum"),
        (global::OFF_TASK_GROUP_LEADER, "task_struct", "group_leader"),
        (global::OFF_TASK_COMM, "task_struct", "comm"),
        (global::OFF_TASK_FILES, "task_struct", "files"),
        (global::OFF_FILES_FDT, "files_struct", "fdt"),
        (global::OFF_FDT_FD, "fdtable", "fd"),
        (global::OFF_FDT_MAX_FDS, "fdtable", "max_fds"),
        (global::OFF_FILE_PRIVATE_DATA, "file", "private_data"),
        (global::OFF_SOCKET_FILE, "socket", "file"),
        (global::OFF_SOCKET_SK, "socket", "sk"),
        (global::OFF_SKC_COOKIE, "sock", "__sk_common.skc_cookie"),
        (global::OFF_SKC_STATE, "sock", "__sk_common.skc_state"),
        (global::OFF_FILE_INODE, "file", "f_inode"),
        (global::OFF_INODE_INO, "inode", "i_ino"),
        (global::OFF_SK_SOCKET, "sock", "sk_socket"),
        (global::OFF_TP_BYTES_SENT, "tcp_sock", "bytes_sent"),
        (global::OFF_TP_BYTES_RECEIVED, "tcp_sock", "bytes_received"),
        (global::OFF_TP_BYTES_RETRANS, "tcp_sock", "bytes_retrans"),
        (global::OFF_TP_TOTAL_RETRANS, "tcp_sock", "total_retrans"),
        // Moved into sock_common (as skc_flags) in 6.x; `sk_flags` on older kernels.
        (global::OFF_SK_FLAGS, "sock", "__sk_common.skc_flags|sk_flags"),
        (global::OFF_TP_RCV_NXT, "tcp_sock", "rcv_nxt"),
        (global::OFF_TP_COPIED_SEQ, "tcp_sock", "copied_seq"),
        (global::OFF_SKC_NULLS_NODE, "sock", "__sk_common.skc_nulls_node"),
        (global::OFF_SKC_HASH, "sock", "__sk_common.skc_hash"),
        (global::OFF_HASHINFO_EHASH, "inet_hashinfo", "ehash"),
        (global::OFF_HASHINFO_EHASH_MASK, "inet_hashinfo", "ehash_mask"),
        (global::OFF_TASK_NSPROXY, "task_struct", "nsproxy"),
        (global::OFF_NSPROXY_NET_NS, "nsproxy", "net_ns"),
        (global::OFF_TASK_PID, "task_struct", "pid"),
        (global::OFF_TASK_TGID, "task_struct", "tgid"),
        (global::OFF_MSGHDR_CONTROL, "user_msghdr", "msg_control"),
        (global::OFF_MSGHDR_CONTROLLEN, "user_msghdr", "msg_controllen"),
    ];
    FIELDS
        .iter()
        .map(|&(global, strukt, paths)| {
            // `a|b`: the first path this kernel has.
            let mut found = None;
            for path in paths.split('|') {
                match btf.offset_of(strukt, path) {
                    Ok(offset) => {
                        found = Some(Ok(offset));
                        break;
                    }
                    Err(error) => found = Some(Err(error)),
                }
            }
            Ok((global, found.unwrap_or_else(|| btf.offset_of(strukt, paths))?))
        })
        .chain(std::iter::once(Ok((
            global::RETRANSMIT_HAS_ERR,
            // A kernel without the tracepoint fails at attach, with its own warning.
            u32::from(btf.tracepoint_args("tcp_retransmit_skb").is_ok_and(|n| n >= 3)),
        ))))
        .chain(timewait_hash_offsets(btf).map(Ok))
        .collect()
}

/// Where a namespace's established hash is, for the state program's timewait check:
/// `net.ipv4.tcp_death_row` is a struct with a `hashinfo` pointer up to 5.17 and from 6.1,
/// and a pointer to one in 5.18-6.0 (then OFF_DEATH_ROW_HASHINFO, never 0 there, says where
/// `hashinfo` is in it). Both 0 where neither layout is found: the check is then skipped.
fn timewait_hash_offsets(btf: &KernelBtf) -> [(&'static str, u32); 2] {
    let embedded = btf.offset_of("net", "ipv4.tcp_death_row.hashinfo");
    let pointed = || {
        Ok::<_, crate::error::Error>((
            btf.offset_of("net", "ipv4.tcp_death_row")?,
            btf.offset_of("inet_timewait_death_row", "hashinfo")?,
        ))
    };
    let (net, row) = match embedded {
        Ok(offset) => (offset, 0),
        Err(_) => pointed().unwrap_or((0, 0)),
    };
    [(global::OFF_NET_TW_HASHINFO, net), (global::OFF_DEATH_ROW_HASHINFO, row)]
}

const TRACEFS_PATHS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Field offsets of the classic tracepoint, from its format file (mounting tracefs if needed).
fn classic_tracepoint_fields() -> Result<Vec<(&'static str, u32)>> {
    let tracefs = tracefs()?;
    let path = tracefs.join("events/sock/inet_sock_set_state/format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::TracepointFormat { path: path.clone(), reason: e.to_string() })?;
    let fields = parse_tracepoint_format(&text);
    [
        (global::TP_SKADDR, "skaddr"),
        (global::TP_OLDSTATE, "oldstate"),
        (global::TP_NEWSTATE, "newstate"),
        (global::TP_SPORT, "sport"),
        (global::TP_DPORT, "dport"),
        (global::TP_FAMILY, "family"),
        (global::TP_PROTOCOL, "protocol"),
        (global::TP_SADDR, "saddr"),
        (global::TP_DADDR, "daddr"),
        (global::TP_SADDR_V6, "saddr_v6"),
        (global::TP_DADDR_V6, "daddr_v6"),
    ]
    .into_iter()
    .map(|(global, field)| {
        let offset = fields.get(field).ok_or_else(|| Error::TracepointFormat {
            path: path.clone(),
            reason: format!("no field {field}"),
        })?;
        Ok((global, *offset))
    })
    .collect()
}

/// Record field offsets (`TP_*`) from the syscall and tcp tracepoints' format files.
fn syscall_field_offsets() -> Result<Vec<(&'static str, u32)>> {
    Ok(vec![
        (global::TP_SYSCALL_RET, syscall_field_offset("sys_exit_accept4", "ret")?),
        (global::TP_SYSCALL_ARG0, syscall_field_offset("sys_enter_close", "fd")?),
        (global::TP_RECVMSG_MSG, syscall_field_offset("sys_enter_recvmsg", "msg")?),
        (
            global::TP_RESET_COOKIE,
            tracepoint_field_offset("tcp", "tcp_receive_reset", "sock_cookie")?,
        ),
    ])
}

/// Offset of `field` in a `syscalls:*` record.
fn syscall_field_offset(tracepoint: &str, field: &str) -> Result<u32> {
    tracepoint_field_offset("syscalls", tracepoint, field)
}

/// Offset of `field` in a `category:tracepoint` record.
fn tracepoint_field_offset(category: &str, tracepoint: &str, field: &str) -> Result<u32> {
    let path = tracefs()?.join("events").join(category).join(tracepoint).join("format");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::TracepointFormat { path: path.clone(), reason: e.to_string() })?;
    parse_tracepoint_format(&text)
        .get(field)
        .copied()
        .ok_or_else(|| Error::TracepointFormat { path, reason: format!("no field {field}") })
}

/// Field name -> offset from a tracepoint `format` file
/// (`field:__u16 sport;<TAB>offset:24;<TAB>size:2;<TAB>signed:0;`).
pub fn parse_tracepoint_format(text: &str) -> HashMap<String, u32> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("field:")?;
            let (declaration, rest) = line.split_once(';')?;
            let name = declaration.split_whitespace().last()?;
            let name = name.split('[').next()?.trim_start_matches('*');
            let offset = rest.split(';').find_map(|part| part.trim().strip_prefix("offset:"))?;
            Some((name.to_string(), offset.parse().ok()?))
        })
        .collect()
}

/// Where tracefs is mounted, mounting it at /sys/kernel/tracing if it is nowhere.
pub fn tracefs() -> Result<PathBuf> {
    if let Some(path) = TRACEFS_PATHS.iter().map(Path::new).find(|p| p.join("events").is_dir()) {
        return Ok(path.to_path_buf());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(c"tracefs".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(Error::Tracefs { reason: std::io::Error::last_os_error().to_string() });
    }
    tracing::info!("mounted tracefs at /sys/kernel/tracing");
    Ok(PathBuf::from(TRACEFS_PATHS[0]))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; harmless on newer ones.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("setrlimit(RLIMIT_MEMLOCK) failed: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, SymbolKind};

    use super::*;

    /// The contract in netwatch-common names exactly the programs the kernel object defines,
    /// and every global and map the loader patches or opens is in the object.
    #[test]
    fn the_object_defines_what_netwatch_common_names() {
        let object = object::File::parse(EBPF_OBJECT).expect("the embedded eBPF object parses");
        let symbols: Vec<String> =
            object.symbols().filter_map(|s| Some(s.name().ok()?.to_string())).collect();
        // A program is a function in a section of its own; helpers (memcpy, subprograms the
        // compiler kept out of line) are in .text.
        let mut programs: Vec<&str> = object
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text)
            .filter(|s| {
                let section = s.section_index().and_then(|i| object.section_by_index(i).ok());
                section.and_then(|section| section.name().ok()).is_some_and(|n| n != ".text")
            })
            .filter_map(|s| s.name().ok())
            .collect();
        programs.sort_unstable();
        let mut named: Vec<&str> = netwatch_common::program::ALL
            .into_iter()
            .chain(netwatch_common::program::trampoline_programs())
            .collect();
        named.sort_unstable();
        assert_eq!(programs, named, "programs in the object vs netwatch_common::program::ALL");
        for name in global::ALL.iter().chain(&[map::EVENTS, map::LOST, map::CONFIG]) {
            assert!(symbols.iter().any(|s| s == name), "{name} is not in the eBPF object");
        }
    }

    #[test]
    fn parses_the_inet_sock_set_state_format() {
        let text = "name: inet_sock_set_state\nID: 2287\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;\n\
            \tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n\
            \tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;\n\
            \tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;\n\n\
            print fmt: \"family=%s\"";
        let fields = parse_tracepoint_format(text);
        assert_eq!(fields.get("skaddr"), Some(&8));
        assert_eq!(fields.get("oldstate"), Some(&16));
        assert_eq!(fields.get("sport"), Some(&24));
        assert_eq!(fields.get("saddr_v6"), Some(&40));
        assert_eq!(fields.get("common_type"), Some(&0));
        assert_eq!(fields.len(), 5);
    }
}
