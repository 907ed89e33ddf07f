//! Each kernel program's hook, what it gives netwatch, and what is lost without it; and how
//! each one fared on this kernel. Every program loads and attaches on its own: a verifier
//! rejection, a missing tracepoint or helper, or no BTF costs only what that program gives,
//! with one warning that names it. `netwatch check` prints the whole list.
use serde::Serialize;

/// A program and what netwatch loses without it.
pub struct Hook {
    pub program: &'static str,
    /// Where it attaches, as a user would name it.
    pub attach: &'static str,
    pub loses: &'static str,
}

use netwatch_common::program as p;

pub const HOOKS: &[Hook] = &[
    Hook {
        program: p::STATE_BTF,
        attach: "tp_btf/inet_sock_set_state",
        loses: "the classic tracepoint is used instead: sockets are identified by address, not \
                cookie; no netns, byte totals, or refused-vs-timeout; SYN_SENT shows port 0",
    },
    Hook {
        program: p::STATE_CLASSIC,
        attach: "tracepoint/sock/inet_sock_set_state",
        loses: "no TCP state transitions at all",
    },
    Hook {
        program: p::ACCEPT_EXIT,
        attach: "tracepoint/syscalls/sys_exit_accept{,4}",
        loses: "an accepted connection keeps its listener's owner, not the accepting process's",
    },
    Hook {
        program: p::FD_OPEN_EXIT,
        attach: "tracepoint/syscalls/sys_exit_{socket,dup,dup2,dup3,fcntl,pidfd_getfd}",
        loses: "new and duplicated fds (socket, dup, fcntl) are not listed as holders",
    },
    Hook {
        program: p::CLOSE_ENTER,
        attach: "tracepoint/syscalls/sys_enter_close",
        loses: "a process that closes a shared socket stays listed as a holder",
    },
    Hook {
        program: p::ADDR_SYSCALL_ENTER,
        attach: "tracepoint/syscalls/sys_enter_{bind,connect}",
        loses: "UDP sockets are not listed when they bind or connect",
    },
    Hook {
        program: p::ADDR_SYSCALL_EXIT,
        attach: "tracepoint/syscalls/sys_exit_{bind,connect}",
        loses: "UDP sockets are not listed when they bind or connect",
    },
    Hook {
        program: p::RECVMSG_ENTER,
        attach: "tracepoint/syscalls/sys_enter_recvmsg",
        loses: "sockets passed over unix sockets (SCM_RIGHTS) are not listed for the receiver",
    },
    Hook {
        program: p::RECVMSG_EXIT,
        attach: "tracepoint/syscalls/sys_exit_recvmsg",
        loses: "sockets passed over unix sockets (SCM_RIGHTS) are not listed for the receiver",
    },
    Hook {
        program: p::PROCESS_FORK,
        attach: "tp_btf/sched_process_fork",
        loses: "child processes are not listed as holders of the sockets they inherit",
    },
    Hook {
        program: p::PROCESS_EXEC,
        attach: "tracepoint/sched/sched_process_exec",
        loses: "a process keeps its old name after exec, and its close-on-exec fds stay listed",
    },
    Hook {
        program: p::PROCESS_EXIT,
        attach: "tracepoint/sched/sched_process_exit",
        loses: "processes that exit stay listed as holders until the socket closes",
    },
    Hook {
        program: p::RESET_RECEIVED,
        attach: "tracepoint/tcp/tcp_receive_reset",
        loses: "a refused or reset connection is reported as a timeout or an abort",
    },
    Hook {
        program: p::RETRANSMIT,
        attach: "tp_btf/tcp_retransmit_skb",
        loses: "retransmits are counted only at close, and not streamed",
    },
    Hook {
        program: p::SYNACK_RETRANSMIT,
        attach: "tp_btf/tcp_retransmit_synack",
        loses: "SYN-ACK retransmits are not counted",
    },
    Hook {
        program: p::CHILD_OF,
        attach: "fexit/inet_csk_clone_lock",
        loses: "connections to SO_REUSEPORT listeners that share an address are counted \
                against one of them in stats",
    },
    Hook {
        program: p::SOCK_CREATE,
        attach: "cgroup/sock_create",
        loses: "the first transition of a socket shows no time since its creation",
    },
    Hook {
        program: p::SOCK_RELEASE,
        attach: "cgroup/sock_release",
        loses: "closed sockets that never connected are forgotten only by eviction",
    },
    Hook {
        program: p::UDP_SENDMSG4,
        attach: "cgroup/sendmsg4",
        loses: "an IPv4 UDP socket bound implicitly by its first send is not listed",
    },
    Hook {
        program: p::UDP_SENDMSG6,
        attach: "cgroup/sendmsg6",
        loses: "an IPv6 UDP socket bound implicitly by its first send is not listed",
    },
    Hook {
        program: p::CONNECT_PORT,
        attach: "sock_ops (TCP connect callback)",
        loses: "SYN_SENT shows local port 0, as the kernel assigns it after the transition",
    },
];

/// How one program fared: attached, failed (and why), or not used on purpose.
#[derive(Clone, Debug, Serialize)]
pub struct HookStatus {
    pub program: &'static str,
    pub attach: &'static str,
    pub state: HookState,
    /// Instructions the verifier processed for it (`verified_insns`), when loaded.
    pub verified_insns: Option<u32>,
    /// Why it failed or is not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What is lost without it, when it is not attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loses: Option<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookState {
    Attached,
    Failed,
    /// Not needed (the classic tracepoint when tp_btf works) or not possible here (no BTF,
    /// no cgroup v2), which `reason` says.
    NotUsed,
    /// Not needed: another program does its work (a tracepoint program whose trampoline
    /// variant is attached), which `reason` says.
    Replaced,
}

impl HookStatus {
    pub fn new(program: &'static str, outcome: Result<Option<u32>, (HookState, String)>) -> Self {
        let hook = HOOKS.iter().find(|h| h.program == program);
        let attach = hook.map_or("", |h| h.attach);
        match outcome {
            Ok(verified_insns) => HookStatus {
                program,
                attach,
                state: HookState::Attached,
                verified_insns,
                reason: None,
                loses: None,
            },
            Err((state, reason)) => HookStatus {
                program,
                attach,
                state,
                verified_insns: None,
                reason: Some(reason),
                loses: hook.map(|h| h.loses),
            },
        }
    }

    /// Attached at another hook than its catalog entry's (a trampoline variant).
    pub fn attached_at(program: &'static str, attach: &'static str, insns: Option<u32>) -> Self {
        HookStatus { attach, ..HookStatus::new(program, Ok(insns)) }
    }

    /// The one warning line for a program that is not attached, if it costs anything.
    fn warning_line(&self) -> Option<String> {
        match (self.state, &self.reason, self.loses) {
            (HookState::Attached | HookState::Replaced, ..) => None,
            // The classic fallback not used because tp_btf works costs nothing.
            (HookState::NotUsed, _, _) if self.program == p::STATE_CLASSIC => None,
            (_, Some(reason), Some(loses)) => {
                Some(format!("{} not attached ({reason}): {loses}", self.attach))
            }
            _ => None,
        }
    }
}

/// One warning line per cause: each failed program, and each reason some programs were not
/// used (no BTF, no cgroup v2, the classic fallback), naming those programs.
pub fn warnings(hooks: &[HookStatus]) -> Vec<String> {
    let mut lines: Vec<String> = hooks
        .iter()
        .filter(|h| h.state == HookState::Failed)
        .filter_map(HookStatus::warning_line)
        .collect();
    let mut reasons: Vec<&str> = Vec::new();
    for hook in hooks.iter().filter(|h| h.state == HookState::NotUsed && h.warning_line().is_some())
    {
        let reason = hook.reason.as_deref().unwrap_or_default();
        if !reasons.contains(&reason) {
            reasons.push(reason);
        }
    }
    for reason in reasons {
        let same: Vec<&HookStatus> = hooks
            .iter()
            .filter(|h| h.state == HookState::NotUsed && h.reason.as_deref() == Some(reason))
            .filter(|h| h.warning_line().is_some())
            .collect();
        lines.push(match same.as_slice() {
            [one] => one.warning_line().unwrap_or_default(),
            many => format!(
                "not attached ({reason}): {}; `netwatch check` says what each gives",
                many.iter().map(|h| h.program).collect::<Vec<_>>().join(", ")
            ),
        });
    }
    lines
}

impl HookStatus {
    /// Whether this hook's absence costs anything (and so is reported).
    pub fn costs(&self) -> bool {
        self.warning_line().is_some()
    }
}

/// Programs a test asked to refuse (`NETWATCH_REFUSE_PROGRAMS=state_btf,accept_exit`): each
/// fails as if the kernel had rejected it, so that degraded modes can be tested anywhere.
pub fn refused(program: &str) -> bool {
    std::env::var("NETWATCH_REFUSE_PROGRAMS")
        .is_ok_and(|list| list.split(',').any(|name| name.trim() == program))
}

pub const REFUSED: &str = "refused by NETWATCH_REFUSE_PROGRAMS";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_program_has_a_hook_and_says_what_is_lost() {
        for program in netwatch_common::program::ALL {
            let hook = HOOKS.iter().find(|h| h.program == program);
            assert!(hook.is_some_and(|h| !h.loses.is_empty()), "{program} has no hook entry");
        }
        let failed = HookStatus::new(p::ACCEPT_EXIT, Err((HookState::Failed, "EINVAL".into())));
        let warning = warnings(std::slice::from_ref(&failed)).join("");
        assert!(warning.contains("sys_exit_accept") && warning.contains("EINVAL"), "{warning}");
        assert!(warning.contains("accepting process"), "{warning}");
        assert!(!HookStatus::new(p::ACCEPT_EXIT, Ok(Some(10))).costs());
        let no_btf = [p::PROCESS_FORK, p::RETRANSMIT]
            .map(|name| HookStatus::new(name, Err((HookState::NotUsed, "no kernel BTF".into()))));
        let lines = warnings(&no_btf);
        assert_eq!(lines.len(), 1, "one line per cause: {lines:?}");
        assert!(lines[0].contains("process_fork, retransmit"), "{lines:?}");
    }
}
