//! Loads the embedded eBPF object, pins its maps and its XDP attachment under
//! the configured bpffs directory, and adopts them when they already exist, so
//! a restarted `lb` takes over without detaching or clearing anything.
//!
//! Layout of the pin directory:
//! ```text
//! <pin_path>/link          the XDP attachment (a bpf_link)
//! <pin_path>/maps/<NAME>   every map of lb_common::map_names::ALL
//! ```

use std::{
    io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::MapInfo,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    BackendEntry, FLOWS_MAP_FLAGS, FlowEntry, FlowKey, FlowKey6, GlobalConfig, MAGLEV_MAP_FLAGS,
    PROGRAM_NAME, SlotPair, StatBlock, Traffic, VIPS_MAP_FLAGS, VipEntry, VipKey, map_names,
};

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// `lb decap`'s program (see lb-ebpf/src/bin/decap.rs).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));

/// The reference programs used by test rigs and the benchmark (`xdp_pass`,
/// `xdp_tx_swap`, `xdp_gen`, `xdp_count_drop`).
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

/// `statfs` magic of the BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {PROGRAM_NAME}: {0}")]
    Program(#[from] ProgramError),
    #[error("program {PROGRAM_NAME} is missing from the eBPF object")]
    MissingProgram,
    #[error(
        "pinned map {path} has {what} {found}, this config/build needs {wanted}; \
         remove the old state first (`lb stop`, or `lb decap --stop` for decap's)"
    )]
    PinMismatch {
        path: PathBuf,
        what: &'static str,
        found: u32,
        wanted: u32,
    },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: LinkError },
    #[error(
        "{path} is not on a BPF filesystem; mount one there (mount -t bpf bpf DIR) or choose another pin_path"
    )]
    NotBpffs { path: PathBuf },
    #[error("another lb is running with pin_path {path}")]
    Locked { path: PathBuf },
}

/// Map sizes fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub table_size: u32,
    pub max_vips: u32,
    pub max_flows: u32,
    pub max_flows_v6: u32,
}

impl Sizes {
    fn maglev_entries(&self) -> u32 {
        lb_common::maglev_entries(self.max_vips, self.table_size)
    }

    /// What this build and these sizes expect of each map.
    fn layout(&self, map: &str) -> Layout {
        let (key, value, entries, flags) = match map {
            map_names::VIPS => (
                size_of::<VipKey>(),
                size_of::<VipEntry>(),
                None,
                VIPS_MAP_FLAGS,
            ),
            map_names::BACKENDS => (4, size_of::<BackendEntry>(), None, 0),
            map_names::MAGLEV => (
                4,
                size_of::<SlotPair>(),
                Some(self.maglev_entries()),
                MAGLEV_MAP_FLAGS,
            ),
            map_names::CONFIG => (4, size_of::<GlobalConfig>(), None, 0),
            map_names::STATS => (4, size_of::<StatBlock>(), None, 0),
            map_names::VIP_FILTER => (4, 8, None, 0),
            map_names::VIP_STATS | map_names::BACKEND_STATS => (4, size_of::<Traffic>(), None, 0),
            map_names::FLOWS => (
                size_of::<FlowKey>(),
                size_of::<FlowEntry>(),
                lru_capacity(self.max_flows),
                FLOWS_MAP_FLAGS,
            ),
            map_names::FLOWS6 => (
                size_of::<FlowKey6>(),
                size_of::<FlowEntry>(),
                lru_capacity(self.max_flows_v6),
                FLOWS_MAP_FLAGS,
            ),
            _ => (0, 0, None, 0),
        };
        Layout {
            key: key as u32,
            value: value as u32,
            entries,
            flags,
        }
    }
}

/// The capacity the kernel gives a flow table created for `n` entries: with
/// per-CPU LRU lists it rounds `n` to a multiple of the possible CPUs, so a
/// pinned table is compared against that. `None` (not checked) when the CPU
/// count cannot be read.
fn lru_capacity(n: u32) -> Option<u32> {
    let cpus = aya::util::nr_cpus().ok()?;
    Some(per_cpu_lru_entries(n, cpus as u32))
}

/// `n` rounded up to a multiple of `cpus`, or down when that overflows, as
/// the kernel's `htab_map_alloc` does for `BPF_F_NO_COMMON_LRU`.
fn per_cpu_lru_entries(n: u32, cpus: u32) -> u32 {
    let cpus = cpus.max(1);
    n.div_ceil(cpus)
        .checked_mul(cpus)
        .unwrap_or(n / cpus * cpus)
}

/// Key and value sizes, capacity (for maps sized at load) and flags of a map.
struct Layout {
    key: u32,
    value: u32,
    entries: Option<u32>,
    flags: u32,
}

pub fn map_pin(dir: &Path, map: &str) -> PathBuf {
    dir.join("maps").join(map)
}

fn link_pin(dir: &Path) -> PathBuf {
    dir.join("link")
}

/// True when `dir` holds any map of a previous `lb run` (whether or not its
/// attachment survived): they must be adopted, never treated as empty.
pub fn is_pinned(dir: &Path) -> bool {
    map_names::ALL.iter().any(|m| map_pin(dir, m).exists())
}

/// True while the attachment's link is pinned (`lb stop` removes it).
pub fn link_is_pinned(dir: &Path) -> bool {
    link_pin(dir).exists()
}

/// An exclusive lock on the pin directory, held for the life of `lb run`, so
/// two control planes never write the same maps.
pub struct PinLock {
    _dir: std::fs::File,
}

pub fn lock(pin_dir: &Path) -> Result<PinLock, LoadError> {
    ensure_bpffs(pin_dir)?;
    lock_dir(pin_dir)
}

/// [`lock`] without the bpffs check.
fn lock_dir(pin_dir: &Path) -> Result<PinLock, LoadError> {
    use std::os::fd::AsRawFd as _;
    let io_err = |source| LoadError::Io {
        path: pin_dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(pin_dir).map_err(io_err)?;
    let dir = std::fs::File::open(pin_dir).map_err(io_err)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(LoadError::Locked {
                path: pin_dir.to_owned(),
            });
        }
        return Err(io_err(e));
    }
    Ok(PinLock { _dir: dir })
}

/// Creates (or, with `pin_dir`, opens or creates and pins) the maps, sized for
/// `sizes`, and loads the program through the verifier. Nothing is attached.
/// Pinned maps that do not fit `sizes` or this build's layouts are refused.
pub fn load(sizes: Sizes, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::MAGLEV, sizes.maglev_entries())
        .map_max_entries(map_names::FLOWS, sizes.max_flows)
        .map_max_entries(map_names::FLOWS6, sizes.max_flows_v6);
    if let Some(dir) = pin_dir {
        ensure_bpffs(dir)?;
        let maps = dir.join("maps");
        std::fs::create_dir_all(&maps).map_err(|source| LoadError::Io { path: maps, source })?;
        for map in map_names::ALL {
            let path = map_pin(dir, map);
            if path.exists() {
                check_pinned(&path, sizes.layout(map))?;
            }
            loader.map_pin_path(map, path);
        }
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

/// Refuses the map pinned at `path`, if any, unless its key and value sizes
/// and flags are the given ones (for maps outside [`Sizes`]' layouts).
pub fn check_pinned_sizes(
    path: &Path,
    key: usize,
    value: usize,
    flags: u32,
) -> Result<(), LoadError> {
    if !path.exists() {
        return Ok(());
    }
    let want = Layout {
        key: key as u32,
        value: value as u32,
        entries: None,
        flags,
    };
    check_pinned(path, want)
}

fn check_pinned(path: &Path, want: Layout) -> Result<(), LoadError> {
    let info = MapInfo::from_pin(path).map_err(|e| LoadError::Io {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    let checks = [
        ("key size", info.key_size(), Some(want.key)),
        ("value size", info.value_size(), Some(want.value)),
        ("max entries", info.max_entries(), want.entries),
        ("flags", info.map_flags(), Some(want.flags)),
    ];
    for (what, found, wanted) in checks {
        if let Some(wanted) = wanted
            && found != wanted
        {
            return Err(LoadError::PinMismatch {
                path: path.to_owned(),
                what,
                found,
                wanted,
            });
        }
    }
    Ok(())
}

/// The load balancer's XDP program inside `ebpf`.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(LoadError::MissingProgram)?;
    Ok(prog.try_into()?)
}

/// Whether [`attach`] created the attachment or took over a pinned one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    Fresh,
    /// The pinned link now runs this process's program; it was replaced
    /// atomically, so no packet went unprocessed.
    Replaced,
}

/// Attaches the load balancer's program (see [`attach_program`]).
pub fn attach(
    ebpf: &mut Ebpf,
    ifindex: u32,
    mode: XdpMode,
    pin_dir: &Path,
) -> Result<Attached, LoadError> {
    attach_program(program(ebpf)?, ifindex, mode, pin_dir)
}

/// Attaches the loaded `prog` to `ifindex` and pins the link under
/// `pin_dir`, or, when a link is pinned there already, swaps `prog` into it.
pub fn attach_program(
    prog: &mut Xdp,
    ifindex: u32,
    mode: XdpMode,
    pin_dir: &Path,
) -> Result<Attached, LoadError> {
    let path = link_pin(pin_dir);
    let link_err = |source| LoadError::Link {
        path: path.clone(),
        source,
    };
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(link_err)?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        let id = prog.attach_to_link(link)?;
        // The pin keeps the link alive; this process needs no handle on it.
        drop(prog.take_link(id)?);
        return Ok(Attached::Replaced);
    }
    let id = prog.attach_to_if_index(ifindex, mode)?;
    let link: FdLink = prog.take_link(id)?.try_into().map_err(link_err)?;
    link.pin(&path).map_err(|e| LoadError::Io {
        path: path.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(Attached::Fresh)
}

/// Detaches and forgets what `lb` pinned under `pin_dir`: unpinning the link
/// detaches the program (no process holds it), then the maps go. Only the
/// files `lb` creates are removed, and the directories only if that leaves
/// them empty, so a mistaken `pin_path` cannot take other pins with it.
/// Returns whether anything was there.
pub fn remove_pins(pin_dir: &Path) -> Result<bool, LoadError> {
    remove_pins_of(pin_dir, &map_names::ALL)
}

/// [`remove_pins`] for a program whose maps are `maps`.
pub fn remove_pins_of(pin_dir: &Path, maps: &[&str]) -> Result<bool, LoadError> {
    let mut found = false;
    let files = std::iter::once(link_pin(pin_dir)).chain(maps.iter().map(|m| map_pin(pin_dir, m)));
    for path in files {
        match std::fs::remove_file(&path) {
            Ok(()) => found = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(LoadError::Io { path, source }),
        }
    }
    for dir in [pin_dir.join("maps"), pin_dir.to_owned()] {
        // Fails harmlessly when missing or when something else lives there.
        let _ = std::fs::remove_dir(dir);
    }
    Ok(found)
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
    let root = Path::new("/sys/fs/bpf");
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
            std::ptr::null(),
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
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lb-loader-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("maps")).unwrap();
        dir
    }

    #[test]
    fn remove_pins_removes_only_what_lb_pins() {
        let dir = scratch("remove");
        for f in ["link", "maps/VIPS", "maps/FLOWS"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        std::fs::write(dir.join("someone-elses-pin"), "").unwrap();
        assert!(remove_pins(&dir).unwrap());
        assert!(!dir.join("link").exists() && !dir.join("maps").exists());
        assert!(
            dir.join("someone-elses-pin").exists(),
            "foreign files stay, and so does their directory"
        );
        assert!(!remove_pins(&dir).unwrap(), "nothing of lb's left");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flow_tables_are_sized_like_the_kernel_sizes_per_cpu_lru_maps() {
        assert_eq!(per_cpu_lru_entries(1024, 2), 1024);
        assert_eq!(per_cpu_lru_entries(1025, 2), 1026);
        assert_eq!(per_cpu_lru_entries(1024, 6), 1026);
        assert_eq!(per_cpu_lru_entries(262_144, 48), 262_176);
        assert_eq!(
            per_cpu_lru_entries(u32::MAX, 2),
            u32::MAX - 1,
            "rounded down"
        );
        assert_eq!(per_cpu_lru_entries(7, 0), 7, "no CPU count: as is");
    }

    #[test]
    fn a_second_lock_on_the_same_pin_directory_is_refused() {
        let dir = scratch("lock");
        let first = lock_dir(&dir).unwrap();
        assert!(matches!(lock_dir(&dir), Err(LoadError::Locked { .. })));
        drop(first);
        assert!(lock_dir(&dir).is_ok(), "released with its holder");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn any_pinned_map_counts_as_state_to_adopt() {
        let dir = scratch("pinned");
        assert!(!is_pinned(&dir));
        std::fs::write(dir.join("maps/FLOWS"), "").unwrap();
        assert!(
            is_pinned(&dir),
            "flows alone must not be mistaken for a fresh start"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
