//! cgroup v2 ids and paths: the id the kernel programs record with each event
//! (`bpf_get_current_cgroup_id`, the inode of the cgroup's directory in the cgroup2 mount),
//! the path it names, and a process's id from `/proc/PID/cgroup` for the snapshot.
use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

/// The cgroup2 hierarchy netwatch resolves ids in: a mount of its root. In a container
/// with its own cgroup namespace the runtime's `/sys/fs/cgroup` shows only the container's
/// subtree, so the host's is bind-mounted and named with `--cgroup-root`.
#[derive(Debug)]
pub struct Hierarchy {
    root: PathBuf,
    /// An open descriptor of the root, which `open_by_handle_at` needs.
    dir: std::fs::File,
    /// `open_by_handle_at` failed with EPERM (it needs CAP_DAC_READ_SEARCH) or is not
    /// supported: ids are looked for by walking the tree instead.
    walk_only: bool,
}

impl Hierarchy {
    /// The cgroup2 hierarchy mounted at `root`.
    pub fn open(root: &Path) -> std::io::Result<Hierarchy> {
        let dir = std::fs::File::open(root)?;
        Ok(Hierarchy { root: root.to_path_buf(), dir, walk_only: false })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The path under the root (`/kubepods.slice/...`) of the cgroup with id `id`, or None
    /// if it no longer exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if !self.walk_only {
            match self.open_by_id(id) {
                Ok(path) => return path,
                // Not allowed (no CAP_DAC_READ_SEARCH) or not supported: walk from now on.
                Err(error)
                    if matches!(
                        error.raw_os_error(),
                        Some(libc::EPERM | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS)
                    ) =>
                {
                    tracing::debug!("open_by_handle_at on {}: {error}", self.root.display());
                    self.walk_only = true;
                }
                // Out of descriptors or memory for a moment: this id is walked for.
                Err(error) => tracing::debug!("open_by_handle_at: {error}"),
            }
        }
        walk_for(&self.root, id)
    }

    /// The cgroup `id` through a kernfs file handle, as systemd does: three system calls
    /// wherever the cgroup is. `Ok(None)`: no such cgroup; `Err`: the call is not allowed.
    fn open_by_id(&self, id: u64) -> std::io::Result<Option<String>> {
        // No crate wraps open_by_handle_at (nix and rustix do not); the handle is the
        // kernel's `struct file_handle` with a FILEID_KERNFS payload of the 64-bit id.
        #[repr(C)]
        struct KernfsHandle {
            handle_bytes: u32,
            handle_type: i32,
            id: u64,
        }
        const FILEID_KERNFS: i32 = 0xfe;
        let mut handle = KernfsHandle { handle_bytes: 8, handle_type: FILEID_KERNFS, id };
        // SAFETY: the handle is a valid `struct file_handle` of 8 payload bytes, the mount
        // fd is open for the call's duration; the returned fd is owned below.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_open_by_handle_at,
                self.dir.as_raw_fd(),
                &raw mut handle,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let error = std::io::Error::last_os_error();
            return match error.raw_os_error() {
                Some(libc::ESTALE | libc::ENOENT) => Ok(None),
                _ => Err(error),
            };
        }
        // SAFETY: a new descriptor this function owns.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        // A cgroup removed meanwhile has no path any more.
        let target = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok();
        Ok(target.map(|target| relative(&self.root, &target)))
    }
}

/// `target` (a path in this mount namespace) as a path under `root`, starting with `/`.
fn relative(root: &Path, target: &Path) -> String {
    match target.strip_prefix(root) {
        Ok(rest) => format!("/{}", rest.display()),
        Err(_) => target.display().to_string(),
    }
}

/// The cgroup with inode `id` under `root`, found by walking the tree: what is left when
/// file handles are not allowed.
fn walk_for(root: &Path, id: u64) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(relative(root, &dir));
        }
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        pending.extend(
            entries.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_dir())).map(|e| e.path()),
        );
    }
    None
}

static ROOT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Names the cgroup2 root netwatch uses (`--cgroup-root`) instead of the first mount; call
/// before anything asks [`root`]. False if it was already decided.
pub fn set_root(path: PathBuf) -> bool {
    ROOT.set(Some(path)).is_ok()
}

/// The cgroup2 root the cgroup programs attach to and ids are resolved in: `--cgroup-root`,
/// or the first cgroup2 mount.
pub fn root() -> Option<&'static Path> {
    ROOT.get_or_init(mounted_root).as_deref()
}

/// The first cgroup2 mount of this mount namespace (`/sys/fs/cgroup` on pure v2 hosts, often
/// `/sys/fs/cgroup/unified` on hybrid ones).
pub fn mounted_root() -> Option<PathBuf> {
    let mounts = procfs::process::Process::myself().ok()?.mountinfo().ok()?;
    mounts.into_iter().find(|m| m.fs_type == "cgroup2").map(|m| m.mount_point)
}

/// The cgroup v2 id of process `pid` now (its `0::` line in `/proc/PID/cgroup`, looked up
/// under `root`); None if it is gone.
///
/// `/proc/PID/cgroup` is written relative to the reader's cgroup namespace: in a container
/// with one of its own, the host's processes read `/../../kubepods/...`. Those are taken
/// from where this process's namespace sits in the host's hierarchy ([`own_host_path`]).
pub fn id_of_pid(root: &Path, pid: u32) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = unified_path(&text)?;
    let path = if path.split('/').any(|part| part == "..") {
        normalize(&format!("{}/{path}", own_host_path()?))?
    } else {
        path.to_string()
    };
    let full = root.join(path.trim_start_matches('/'));
    std::fs::metadata(full).ok().map(|m| m.ino())
}

/// `path` with its `..` components applied; None if it climbs above the root.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            parts.pop()?;
        } else {
            parts.push(part);
        }
    }
    Some(format!("/{}", parts.join("/")))
}

/// Where this process's cgroup namespace root is in the host's hierarchy: its own cgroup as
/// read from the host's cgroup namespace (pid 1's, entered by a thread of its own: setns
/// into a cgroup namespace needs CAP_SYS_ADMIN and changes only the calling thread). None
/// if that cannot be done.
fn own_host_path() -> Option<&'static str> {
    static OWN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    OWN.get_or_init(|| {
        std::thread::spawn(|| {
            let host = std::fs::File::open("/proc/1/ns/cgroup").ok()?;
            // SAFETY: setns on this short-lived thread only, with an fd that stays open.
            if unsafe { libc::setns(host.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
                return None;
            }
            let text = std::fs::read_to_string("/proc/thread-self/cgroup").ok()?;
            unified_path(&text).map(String::from)
        })
        .join()
        .ok()
        .flatten()
    })
    .as_deref()
}

/// The unified hierarchy's path in a `/proc/PID/cgroup` text.
fn unified_path(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_is_the_path() {
        let text = "12:pids:/\n1:name=systemd:/user.slice\n0::/system.slice/nginx.service\n";
        assert_eq!(unified_path(text), Some("/system.slice/nginx.service"));
        assert_eq!(unified_path("1:cpu:/\n"), None);
    }

    #[test]
    fn paths_climb_out_of_a_cgroup_namespace() {
        let own = "/kubepods/besteffort/podX/agent";
        assert_eq!(
            normalize(&format!("{own}//../../../burstable/podY/web")).as_deref(),
            Some("/kubepods/burstable/podY/web")
        );
        assert_eq!(normalize("/a/../.."), None);
    }

    #[test]
    fn paths_are_relative_to_the_root() {
        let root = Path::new("/host/sys/fs/cgroup");
        assert_eq!(relative(root, Path::new("/host/sys/fs/cgroup/a/b.scope")), "/a/b.scope");
        assert_eq!(relative(root, Path::new("/host/sys/fs/cgroup")), "/");
    }

    /// This process's own cgroup is found by id both ways: by handle and by walking.
    #[test]
    fn own_cgroup_resolves() {
        let Some(root) = mounted_root() else { return };
        let Some(id) = id_of_pid(&root, std::process::id()) else { return };
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let expected = unified_path(&text).unwrap().to_string();
        assert_eq!(walk_for(&root, id), Some(expected.clone()));
        let mut hierarchy = Hierarchy::open(&root).unwrap();
        assert_eq!(hierarchy.path_of(id), Some(expected));
        assert_eq!(hierarchy.path_of(u64::MAX), None);
    }
}
