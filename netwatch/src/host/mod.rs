//! What netwatch reads from the host outside its event stream: the one-time socket
//! [`snapshot`] of every namespace, made of [`sock_diag`] dumps (or, as a fallback, the
//! [`procfs`] `/proc/net` tables) joined to the processes holding each socket through
//! `/proc/PID/fd`, with the [`unlisted`] sockets no dump shows made known by cookie; and
//! service names from `/etc/services`; the kernel's protocol [`counters`];
//! and a connection's [`tcp_info`] as `table -i` shows it; the [`cgroup`] a process is in
//! and the [`workload`] (container, pod, unit) it names, with what the Kubernetes API says
//! of the node's pods ([`kube`], on request).
pub mod cgroup;
pub mod counters;
pub mod kube;
pub mod procfs;
pub mod services;
pub mod snapshot;
pub mod sock_diag;
pub mod tcp_info;
pub mod unlisted;
pub mod workload;
