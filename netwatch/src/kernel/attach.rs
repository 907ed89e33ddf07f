//! Attaching each program on its own, recording how each fared ([`HookStatus`]): the state
//! program (tp_btf, or the classic tracepoint when tp_btf cannot be had), the programs that
//! follow sockets through fd tables and processes, the TCP tracepoints, and the cgroup hooks.
use std::{fs::File, path::Path};

use aya::{
    Btf, Ebpf,
    maps::Array,
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSock, CgroupSockAddr, FExit, Program, ProgramError,
        SockOps, TracePoint,
    },
};
use netwatch_common::{config, map, program};

use super::hooks::{HookState, HookStatus, REFUSED, refused};
use crate::{
    error::{Error, Result},
    kernel::events::StateSource,
};

/// Attaches programs one at a time into `statuses`.
pub(super) struct Attacher<'a> {
    pub(super) ebpf: &'a mut Ebpf,
    pub(super) statuses: Vec<HookStatus>,
}

/// Why a program could not be loaded or attached, in one line: the verifier's log (many
/// lines) goes to the debug log.
fn one_line(error: &ProgramError) -> String {
    let text = error.to_string();
    let (first, log) = text.split_once(". Verifier output:").unwrap_or((&text, ""));
    match log.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(last) => {
            tracing::debug!("verifier: {log}");
            format!("{first}; the verifier said: {last}")
        }
        None => first.to_string(),
    }
}

/// The instructions the verifier processed for the loaded program `name`, if it says.
fn verified_insns(ebpf: &Ebpf, name: &str) -> Option<u32> {
    ebpf.program(name)?.info().ok()?.verified_instruction_count()
}

impl Attacher<'_> {
    /// Loads and attaches `name` with `attach`, unless refused; true if attached.
    fn attach<T>(
        &mut self,
        name: &'static str,
        attach: impl FnOnce(&mut T) -> Result<(), ProgramError>,
    ) -> bool
    where
        for<'p> &'p mut T: TryFrom<&'p mut Program>,
    {
        let outcome = if refused(name) {
            Err((HookState::Failed, REFUSED.to_string()))
        } else {
            match self.ebpf.program_mut(name).map(<&mut T>::try_from) {
                Some(Ok(program)) => attach(program).map_err(|e| (HookState::Failed, one_line(&e))),
                _ => Err((HookState::Failed, Error::Missing(name).to_string())),
            }
        };
        let attached = outcome.is_ok();
        let outcome = outcome.map(|()| verified_insns(self.ebpf, name));
        self.statuses.push(HookStatus::new(name, outcome));
        attached
    }

    pub(super) fn not_used(&mut self, name: &'static str, reason: impl Into<String>) {
        self.statuses.push(HookStatus::new(name, Err((HookState::NotUsed, reason.into()))));
    }

    /// The state program: tp_btf when there is BTF (and not `classic_only`), else, or when
    /// it fails, the classic tracepoint. None when neither attaches.
    pub(super) fn state(&mut self, btf: Option<&Btf>, classic_ready: bool) -> Option<StateSource> {
        let btf_attached = match btf {
            Some(btf) => self.attach::<BtfTracePoint>(program::STATE_BTF, |p| {
                p.load("inet_sock_set_state", btf)?;
                p.attach().map(drop)
            }),
            None => {
                self.not_used(program::STATE_BTF, "no kernel BTF");
                false
            }
        };
        if btf_attached {
            self.not_used(program::STATE_CLASSIC, "tp_btf/inet_sock_set_state is attached");
            return Some(StateSource::TpBtf);
        }
        if !classic_ready {
            self.not_used(program::STATE_CLASSIC, "its tracepoint's format could not be read");
            return None;
        }
        self.attach::<TracePoint>(program::STATE_CLASSIC, |p| {
            p.load()?;
            p.attach("sock", "inet_sock_set_state").map(drop)
        })
        .then_some(StateSource::Tracepoint)
    }

    /// The programs that follow sockets through fd tables and processes, and the TCP ones.
    /// `no_cookies`: why none of the ownership programs can be used (the classic state
    /// source); `why_not`: why the tracepoint ones cannot (no syscall formats).
    pub(super) fn ownership(
        &mut self,
        btf: Option<&Btf>,
        no_cookies: Option<&str>,
        why_not: Option<&str>,
    ) {
        let syscalls: [(&'static str, &[&str]); 7] = [
            (program::ACCEPT_EXIT, &["sys_exit_accept4", "sys_exit_accept"]),
            // fcntl's return is an fd only for F_DUPFD(_CLOEXEC); for other commands a socket
            // found at that fd number is one the process does hold, so the event is true,
            // and the table already has it. (Its exit has no `cmd` to tell; an enter hook to
            // keep it would cost every fcntl more.)
            (
                program::FD_OPEN_EXIT,
                &[
                    "sys_exit_socket",
                    "sys_exit_dup",
                    "sys_exit_dup2",
                    "sys_exit_dup3",
                    "sys_exit_fcntl",
                    "sys_exit_pidfd_getfd",
                ],
            ),
            (program::CLOSE_ENTER, &["sys_enter_close"]),
            (program::ADDR_SYSCALL_ENTER, &["sys_enter_bind", "sys_enter_connect"]),
            (program::ADDR_SYSCALL_EXIT, &["sys_exit_bind", "sys_exit_connect"]),
            (program::RECVMSG_ENTER, &["sys_enter_recvmsg"]),
            (program::RECVMSG_EXIT, &["sys_exit_recvmsg"]),
        ];
        let processes = [
            (program::PROCESS_EXEC, "sched_process_exec"),
            (program::PROCESS_EXIT, "sched_process_exit"),
        ];
        let Some(ownership_btf) = btf.filter(|_| no_cookies.is_none()) else {
            let why = no_cookies.unwrap_or("no kernel BTF");
            let names = syscalls.iter().map(|(n, _)| *n).chain(processes.iter().map(|(n, _)| *n));
            for name in names.chain([program::PROCESS_FORK, program::CHILD_OF]) {
                self.not_used(name, why);
            }
            let reset_why = no_cookies.unwrap_or("no socket cookies without kernel BTF");
            self.not_used(program::RESET_RECEIVED, reset_why);
            return self.retransmits(btf);
        };
        let btf = ownership_btf;
        // Trampolines first: where they attach, no syscalls tracepoint taxes every system call
        // on the host. They need no tracepoint format, so `why_not` does not stop them.
        let on_trampolines = self.trampolines(btf);
        for (name, tracepoints) in syscalls {
            let by_group = on_trampolines
                .iter()
                .find(|(group, _)| group.stands_for == name || group.replaces == Some(name));
            match (by_group, why_not) {
                (Some((group, insns)), _) if group.stands_for == name => {
                    self.statuses.push(HookStatus::attached_at(name, group.attach, *insns));
                }
                (Some((group, _)), _) => self.statuses.push(HookStatus::new(
                    name,
                    Err((HookState::Replaced, format!("{} does its work", group.attach))),
                )),
                (None, Some(why)) => self.not_used(name, why),
                (None, None) => {
                    self.attach::<TracePoint>(name, |p| {
                        p.load()?;
                        tracepoints.iter().try_for_each(|t| p.attach("syscalls", t).map(drop))
                    });
                }
            }
        }
        for (name, tracepoint) in processes {
            match why_not {
                Some(why) => self.not_used(name, why),
                None => {
                    self.attach::<TracePoint>(name, |p| {
                        p.load()?;
                        p.attach("sched", tracepoint).map(drop)
                    });
                }
            }
        }
        self.attach::<BtfTracePoint>(program::PROCESS_FORK, |p| {
            p.load("sched_process_fork", btf)?;
            p.attach().map(drop)
        });
        self.attach::<FExit>(program::CHILD_OF, |p| {
            p.load("inet_csk_clone_lock", btf)?;
            p.attach().map(drop)
        });
        match why_not {
            Some(why) => self.not_used(program::RESET_RECEIVED, why),
            None => {
                self.attach::<TracePoint>(program::RESET_RECEIVED, |p| {
                    p.load()?;
                    p.attach("tcp", "tcp_receive_reset").map(drop)
                });
            }
        }
        self.retransmits(Some(btf));
    }

    /// The retransmit programs (tp_btf).
    fn retransmits(&mut self, btf: Option<&Btf>) {
        for (name, function) in [
            (program::RETRANSMIT, "tcp_retransmit_skb"),
            (program::SYNACK_RETRANSMIT, "tcp_retransmit_synack"),
        ] {
            match btf {
                Some(btf) => {
                    self.attach::<BtfTracePoint>(name, |p| {
                        p.load(function, btf)?;
                        p.attach().map(drop)
                    });
                }
                None => self.not_used(name, "no kernel BTF"),
            }
        }
    }

    /// Every trampoline group that attaches here (not refused), with the instructions the
    /// verifier processed for it; one info line for those that do not.
    fn trampolines(&mut self, btf: &Btf) -> Vec<(&'static program::TrampolineGroup, Option<u32>)> {
        let mut refusals = Vec::new();
        let mut attached = Vec::new();
        for group in program::TRAMPOLINES.iter().filter(|g| !refused(g.stands_for)) {
            match self.trampoline_group(group.programs, btf) {
                Ok(insns) => attached.push((group, insns)),
                Err(why) => {
                    tracing::debug!("{} not attached: {why}", group.attach);
                    refusals.push(why);
                }
            }
        }
        if let Some(why) = refusals.first() {
            tracing::info!(
                "system-call hooks on tracepoints, which slow every system call on the host: \
                 BPF trampolines not attached ({why})"
            );
        }
        attached
    }

    /// Loads and attaches a group of trampoline programs, all or none: the instructions the
    /// verifier processed for them, or why not (the first failure; those already attached
    /// are unloaded). Only x86-64 has the entry points they name.
    fn trampoline_group(
        &mut self,
        variants: &[program::Trampoline],
        btf: &Btf,
    ) -> std::result::Result<Option<u32>, String> {
        if !cfg!(target_arch = "x86_64") {
            return Err("x86-64 only".into());
        }
        let mut attached: Vec<&str> = Vec::new();
        let mut insns = Some(0u32);
        for variant in variants {
            let outcome = if refused(variant.program) {
                Err(REFUSED.to_string())
            } else {
                let program = self.ebpf.program_mut(variant.program);
                let loaded = match (program, variant.hook) {
                    (Some(Program::FEntry(p)), program::TrampolineHook::Entry) => {
                        p.load(variant.function, btf).and_then(|()| p.attach().map(drop))
                    }
                    (Some(Program::FExit(p)), program::TrampolineHook::Exit) => {
                        p.load(variant.function, btf).and_then(|()| p.attach().map(drop))
                    }
                    _ => Err(ProgramError::UnexpectedProgramType),
                };
                loaded.map_err(|e| one_line(&e))
            };
            match outcome {
                Ok(()) => {
                    attached.push(variant.program);
                    let verified = verified_insns(self.ebpf, variant.program);
                    insns = insns.zip(verified).map(|(sum, n)| sum + n);
                }
                Err(why) => {
                    for name in attached {
                        let _ = match self.ebpf.program_mut(name) {
                            Some(Program::FEntry(p)) => p.unload(),
                            Some(Program::FExit(p)) => p.unload(),
                            _ => Ok(()),
                        };
                    }
                    return Err(format!("{}: {why}", variant.function));
                }
            }
        }
        Ok(insns)
    }

    /// The cgroup hooks on the cgroup v2 root, and the deferred-connect path once `sock_ops`
    /// is attached (only tp_btf events can wait for it).
    pub(super) fn cgroup(&mut self, root: Option<&Path>, source: StateSource) -> Result<()> {
        let cgroup_programs = [
            program::SOCK_CREATE,
            program::SOCK_RELEASE,
            program::UDP_SENDMSG4,
            program::UDP_SENDMSG6,
            program::CONNECT_PORT,
        ];
        let Some(root) = root else {
            for name in cgroup_programs {
                self.not_used(name, "no cgroup v2 hierarchy is mounted");
            }
            return Ok(());
        };
        let root =
            File::open(root).map_err(|e| Error::io(format!("open {}", root.display()), e))?;
        // Single = flags 0, which bpf_link_create requires; cgroup links are multi-attach
        // anyway, so this coexists with other tools' programs (and another netwatch).
        for name in [program::SOCK_CREATE, program::SOCK_RELEASE] {
            self.attach::<CgroupSock>(name, |p| {
                p.load()?;
                p.attach(&root, CgroupAttachMode::Single).map(drop)
            });
        }
        for name in [program::UDP_SENDMSG4, program::UDP_SENDMSG6] {
            self.attach::<CgroupSockAddr>(name, |p| {
                p.load()?;
                p.attach(&root, CgroupAttachMode::Single).map(drop)
            });
        }
        if source != StateSource::TpBtf {
            self.not_used(
                program::CONNECT_PORT,
                "the classic tracepoint cannot wait for the connect callback",
            );
            return Ok(());
        }
        let attached = self.attach::<SockOps>(program::CONNECT_PORT, |p| {
            p.load()?;
            p.attach(&root, CgroupAttachMode::Single).map(drop)
        });
        if attached {
            let map = self.ebpf.map_mut(map::CONFIG).ok_or(Error::Missing(map::CONFIG))?;
            let mut config: Array<_, u32> =
                Array::try_from(map).map_err(|source| Error::Map { name: map::CONFIG, source })?;
            config
                .set(config::DEFER_CONNECT, 1, 0)
                .map_err(|source| Error::Map { name: map::CONFIG, source })?;
        }
        Ok(())
    }
}
