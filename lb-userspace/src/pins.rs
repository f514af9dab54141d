//! The pin directory and the filesystem it lives on, made safe to trust.
//!
//! Whoever can write to a directory on the way to `pin_path` can delete or
//! rename `lb`'s pins (unpinning the link detaches the program) or put a
//! directory of their own in its place. So `lb` only uses a pin directory
//! nobody else controls: every component must be a real directory (not a
//! symbolic link), owned by root or by the user running `lb`, and writable by
//! nobody else. The one exception is a root-owned sticky directory, such as a
//! bpffs root mounted with the kernel's default mode 1777: there others can
//! add entries but cannot remove or rename the ones they do not own.
//! Directories `lb` creates are 0700, and the bpffs it mounts is too.

use std::{
    fs::{self, DirBuilder, Metadata},
    io,
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _},
    path::{Component, Path, PathBuf},
};

use crate::loader::LoadError;

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where bpffs is conventionally mounted; `lb` mounts it there when missing.
const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Makes sure `dir` is on a bpffs, then creates it and any missing parent
/// (0700), refusing it when any component could be changed by someone else.
pub fn prepare(dir: &Path) -> Result<(), LoadError> {
    ensure_bpffs(dir)?;
    make_private_dir(dir)
}

/// Creates the missing components of `dir` with mode 0700 after checking
/// each existing one (see the module docs). Components are checked from the
/// root down, so by the time one is judged its parent is known to be safe:
/// nobody else can swap it for something else afterwards.
pub fn make_private_dir(dir: &Path) -> Result<(), LoadError> {
    let me = current_uid();
    let mut at = PathBuf::new();
    for component in dir.components() {
        match component {
            Component::RootDir | Component::Normal(_) => at.push(component),
            Component::CurDir => continue,
            Component::ParentDir | Component::Prefix(_) => {
                return Err(LoadError::UnsafePinPath {
                    path: dir.to_owned(),
                    why: "must be an absolute path without `..`".into(),
                });
            }
        }
        if !at.is_absolute() {
            return Err(LoadError::UnsafePinPath {
                path: dir.to_owned(),
                why: "must be an absolute path".into(),
            });
        }
        let io_err = |source| LoadError::Io {
            path: at.clone(),
            source,
        };
        let meta = match fs::symlink_metadata(&at) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match DirBuilder::new().mode(0o700).create(&at) {
                    // Ours, created inside a directory already judged safe.
                    Ok(()) => continue,
                    // Someone created it in between: judge what is there.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        fs::symlink_metadata(&at).map_err(io_err)?
                    }
                    Err(e) => return Err(io_err(e)),
                }
            }
            Err(e) => return Err(io_err(e)),
        };
        judge(Entry::of(&meta), me).map_err(|why| LoadError::UnsafePinPath {
            path: at.clone(),
            why,
        })?;
    }
    Ok(())
}

fn current_uid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// What [`judge`] looks at in a directory entry.
#[derive(Clone, Copy, Debug)]
struct Entry {
    symlink: bool,
    dir: bool,
    uid: u32,
    mode: u32,
}

impl Entry {
    fn of(meta: &Metadata) -> Entry {
        Entry {
            symlink: meta.file_type().is_symlink(),
            dir: meta.is_dir(),
            uid: meta.uid(),
            mode: meta.mode(),
        }
    }
}

/// Why `e` cannot be trusted on the way to a pin directory of user `me`.
fn judge(e: Entry, me: u32) -> Result<(), String> {
    if e.symlink {
        return Err("is a symbolic link; name the real directory".into());
    }
    if !e.dir {
        return Err("is not a directory".into());
    }
    if e.uid != 0 && e.uid != me {
        return Err(format!(
            "is owned by uid {}, not root: its owner could remove or replace lb's pins; \
             remove it (lb creates it) or choose another pin_path",
            e.uid
        ));
    }
    let others_write = e.mode & 0o022 != 0;
    let sticky = e.mode & libc::S_ISVTX != 0;
    if others_write && !(e.uid == 0 && sticky) {
        return Err(format!(
            "has mode {:o}: group or others could remove or replace lb's pins; \
             chmod go-w it or choose another pin_path",
            e.mode & 0o7777
        ));
    }
    Ok(())
}

/// Makes sure `dir` can hold pins: its nearest existing ancestor must be on a
/// bpffs. The conventional /sys/fs/bpf is mounted when it is not yet.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    // Only the conventional mount point is mounted on demand (needs
    // CAP_SYS_ADMIN); anything else is the operator's to set up.
    let root = Path::new(BPFFS_ROOT);
    if existing == root {
        mount_bpffs(root)?;
        if is_bpffs(root) {
            return Ok(());
        }
    }
    Err(LoadError::NotBpffs {
        path: dir.to_owned(),
    })
}

/// When `dir` lies under a `/sys` that is private to this process's mount
/// namespace, the name of that sysfs's source. `ip netns exec` gives its
/// command such a `/sys` (a sysfs of the network namespace, mounted in a
/// mount namespace of its own): a bpffs `lb` mounts under it vanishes with
/// the process, and with it every pin a restart should adopt.
pub fn private_sysfs_under(dir: &Path) -> Option<String> {
    if !dir.starts_with("/sys") {
        return None;
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    private_sysfs(&mountinfo)
}

/// The source of the last sysfs mounted on `/sys` in `mountinfo`, unless it
/// is the host's (source `sysfs`).
fn private_sysfs(mountinfo: &str) -> Option<String> {
    // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPER"
    let (fstype, source) = mountinfo
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some("/sys"))
        .filter_map(|l| {
            let mut after = l.split(" - ").nth(1)?.split(' ');
            Some((after.next()?, after.next()?))
        })
        .next_back()?;
    (fstype == "sysfs" && source != "sysfs").then(|| source.to_owned())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; `c` outlives the call.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Mounts bpffs at `at` with mode 0700 rather than the kernel's default 1777,
/// so no other user can create directories in it at all.
fn mount_bpffs(at: &Path) -> Result<(), LoadError> {
    let target =
        std::ffi::CString::new(at.as_os_str().as_encoded_bytes()).map_err(|e| LoadError::Io {
            path: at.to_owned(),
            source: io::Error::other(e),
        })?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(LoadError::Io {
            path: at.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn a_sysfs_of_ip_netns_exec_is_private_and_the_hosts_is_not() {
        let host = "22 1 0:21 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
                    23 22 0:22 / /sys/fs/bpf rw shared:8 - bpf bpf rw,mode=700\n";
        assert_eq!(private_sysfs(host), None);
        let netns_exec = format!("{host}301 280 0:70 / /sys rw,relatime - sysfs lbt-1-lb rw\n");
        assert_eq!(private_sysfs(&netns_exec).as_deref(), Some("lbt-1-lb"));
        assert_eq!(private_sysfs("1 0 8:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    fn dir(uid: u32, mode: u32) -> Entry {
        Entry {
            symlink: false,
            dir: true,
            uid,
            mode: libc::S_IFDIR | mode,
        }
    }

    #[test]
    fn trusts_directories_only_root_or_the_user_can_change() {
        assert!(judge(dir(0, 0o755), 0).is_ok());
        assert!(judge(dir(0, 0o700), 0).is_ok());
        assert!(
            judge(dir(1000, 0o700), 1000).is_ok(),
            "the running user's own"
        );
        assert!(
            judge(dir(0, 0o1777), 0).is_ok(),
            "a root-owned sticky directory (a default bpffs root)"
        );
    }

    #[test]
    fn distrusts_what_another_user_could_change() {
        let foreign = judge(dir(65534, 0o700), 0).unwrap_err();
        assert!(foreign.contains("uid 65534"), "{foreign}");
        assert!(judge(dir(0, 0o775), 0).unwrap_err().contains("mode 775"));
        assert!(judge(dir(0, 0o757), 0).is_err());
        assert!(
            judge(dir(1000, 0o1777), 1000).is_err(),
            "sticky, but not root's"
        );
        let link = Entry {
            symlink: true,
            ..dir(0, 0o777)
        };
        assert!(judge(link, 0).unwrap_err().contains("symbolic link"));
        let file = Entry {
            dir: false,
            ..dir(0, 0o600)
        };
        assert!(judge(file, 0).is_err());
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-pins-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn creates_missing_directories_private() {
        let top = scratch("create");
        let pins = top.join("a/b");
        make_private_dir(&pins).unwrap();
        for d in [&top, &top.join("a"), &pins] {
            let mode = fs::metadata(d).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", d.display());
        }
        make_private_dir(&pins).expect("its own directories are accepted again");
        fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn refuses_a_symlinked_component_naming_it() {
        let top = scratch("symlink");
        make_private_dir(&top.join("real")).unwrap();
        std::os::unix::fs::symlink(top.join("real"), top.join("link")).unwrap();
        let e = make_private_dir(&top.join("link/pins")).unwrap_err();
        match &e {
            LoadError::UnsafePinPath { path, why } => {
                assert_eq!(path, &top.join("link"));
                assert!(why.contains("symbolic link"), "{why}");
            }
            other => panic!("{other}"),
        }
        assert!(
            e.to_string()
                .contains(&top.join("link").display().to_string())
        );
        assert!(
            !top.join("real/pins").exists(),
            "nothing created through it"
        );
        fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn refuses_a_component_writable_by_others() {
        let top = scratch("writable");
        make_private_dir(&top.join("open")).unwrap();
        fs::set_permissions(top.join("open"), fs::Permissions::from_mode(0o777)).unwrap();
        let e = make_private_dir(&top.join("open/pins")).unwrap_err();
        assert!(
            matches!(&e, LoadError::UnsafePinPath { path, .. } if path == &top.join("open")),
            "{e}"
        );
        fs::remove_dir_all(&top).unwrap();
    }

    #[test]
    fn refuses_relative_paths() {
        assert!(matches!(
            make_private_dir(Path::new("relative/pins")),
            Err(LoadError::UnsafePinPath { .. })
        ));
    }
}
