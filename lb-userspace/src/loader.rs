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
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use lb_common::{
    PROGRAM_NAME,
    flow_table::{FlowParams, flow_table_buckets},
    map_names,
};

use crate::{map_layout, pins};

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// `lb decap`'s program (see lb-ebpf/src/bin/decap.rs).
pub static DECAP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));

/// The reference programs used by test rigs and the benchmark (`xdp_pass`,
/// `xdp_tx_swap`, `xdp_gen`, `xdp_count_drop`).
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/baseline"));

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("loading the eBPF object: {0}")]
    Object(#[from] aya::EbpfError),
    #[error("program {PROGRAM_NAME}: {0}")]
    Program(#[from] ProgramError),
    #[error("program {PROGRAM_NAME} is missing from the eBPF object")]
    MissingProgram,
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
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
    #[error("pin_path: {path} {why}")]
    UnsafePinPath { path: PathBuf, why: String },
}

/// Map sizes, and the flow table's settings, fixed at load time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub table_size: u32,
    pub max_vips: u32,
    /// IPv4 and IPv6 flows the one flow table is sized for (together).
    pub max_flows: u32,
    pub max_flows_v6: u32,
    /// `flow_table.idle_evict`.
    pub idle_evict: Duration,
}

impl Sizes {
    /// The capacities set at load time, by map.
    pub fn capacities(&self) -> [(&'static str, u32); 2] {
        [
            (
                map_names::MAGLEV,
                lb_common::maglev_entries(self.max_vips, self.table_size),
            ),
            (map_names::FLOW_TABLE, self.flow_buckets()),
        ]
    }

    /// Buckets of the flow table.
    pub fn flow_buckets(&self) -> u32 {
        flow_table_buckets(self.max_flows as u64 + self.max_flows_v6 as u64)
    }
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
    pins::ensure_bpffs(pin_dir)?;
    lock_dir(pin_dir)
}

/// [`lock`] without the bpffs check.
fn lock_dir(pin_dir: &Path) -> Result<PinLock, LoadError> {
    use std::os::fd::AsRawFd as _;
    let io_err = |source| LoadError::Io {
        path: pin_dir.to_owned(),
        source,
    };
    pins::make_private_dir(pin_dir)?;
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
/// Pinned maps that differ from what this build and `sizes` create are
/// refused before anything is loaded. The flow table's parameters are
/// written before the program can run (see [`flow_params`]).
pub fn load(sizes: Sizes, pin_dir: Option<&Path>) -> Result<Ebpf, LoadError> {
    let mut loader = EbpfLoader::new();
    for (map, entries) in sizes.capacities() {
        loader.map_max_entries(map, entries);
    }
    let adopted_params = pin_dir.is_some_and(|dir| map_pin(dir, map_names::FLOW_PARAMS).exists());
    if let Some(dir) = pin_dir {
        pins::prepare(&dir.join("maps"))?;
        map_layout::check_pins(EBPF_OBJECT, dir, &map_names::ALL, &sizes.capacities())?;
        for map in map_names::ALL {
            loader.map_pin_path(map, map_pin(dir, map));
        }
    }
    let mut ebpf = loader.load(EBPF_OBJECT)?;
    flow_params(&mut ebpf, &sizes, adopted_params)?;
    program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

/// Writes the flow table's parameters. The key is the table's own: a new
/// table gets a fresh random one (per host, unrelated to the Maglev seed);
/// an adopted table keeps the key its entries were made with, or they could
/// not be found again.
fn flow_params(ebpf: &mut Ebpf, sizes: &Sizes, adopted: bool) -> Result<(), LoadError> {
    let name = map_names::FLOW_PARAMS;
    let map_error = |e: aya::maps::MapError| LoadError::Io {
        path: PathBuf::from(name),
        source: io::Error::other(e.to_string()),
    };
    let map = ebpf.map_mut(name).ok_or(LoadError::MissingMap { name })?;
    let mut params: aya::maps::Array<_, FlowParams> =
        aya::maps::Array::try_from(map).map_err(map_error)?;
    let old = params.get(&0, 0).map_err(map_error)?;
    let key = if adopted && old.key != [0, 0] {
        old.key
    } else {
        random_key()?
    };
    let new = FlowParams {
        key,
        buckets: sizes.flow_buckets(),
        _pad: 0,
        idle_evict_ns: sizes.idle_evict.as_nanos().min(u64::MAX as u128) as u64,
    };
    params.set(0, new, 0).map_err(map_error)
}

/// 128 bits from the kernel's random source.
fn random_key() -> Result<[u64; 2], LoadError> {
    let mut bytes = [0u8; 16];
    // SAFETY: writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(LoadError::Io {
            path: PathBuf::from("getrandom"),
            source: io::Error::last_os_error(),
        });
    }
    let (a, b) = bytes.split_at(8);
    Ok([
        u64::from_ne_bytes(a.try_into().expect("8 bytes")),
        u64::from_ne_bytes(b.try_into().expect("8 bytes")),
    ])
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
    /// The pinned link's interface was gone or re-created (the kernel
    /// severs such a link): a new link replaced it.
    Renewed,
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
    let mut renewed = false;
    if path.exists() {
        let pinned = PinnedLink::from_pin(&path).map_err(link_err)?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        match prog.attach_to_link(link) {
            Ok(id) => {
                // The pin keeps the link alive; this process needs no handle
                // on it.
                drop(prog.take_link(id)?);
                return Ok(Attached::Replaced);
            }
            // The interface the link was made for is gone: nothing runs
            // through it any more, so a new link takes its pin.
            Err(e) if severed(&e) => {
                tracing::warn!(link = %path.display(), "the pinned link's interface is gone or was re-created; attaching a new link");
                std::fs::remove_file(&path).map_err(|source| LoadError::Io {
                    path: path.clone(),
                    source,
                })?;
                renewed = true;
            }
            Err(e) => return Err(e.into()),
        }
    }
    let id = prog.attach_to_if_index(ifindex, mode)?;
    let link: FdLink = prog.take_link(id)?.try_into().map_err(link_err)?;
    link.pin(&path).map_err(|e| LoadError::Io {
        path: path.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    Ok(if renewed {
        Attached::Renewed
    } else {
        Attached::Fresh
    })
}

/// Whether `e` says the link was severed from its interface (ENOLINK).
fn severed(e: &ProgramError) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::ENOLINK)
        {
            return true;
        }
        source = err.source();
    }
    false
}

/// Removes what a start pinned under a pin directory that held nothing of
/// `lb`'s, unless the start succeeds ([`keep`](Self::keep)): a start that
/// fails part-way (after its maps were pinned, before its attachment was)
/// leaves nothing behind. A directory that held pins already is left alone:
/// those pins are a running instance's state.
pub struct FreshPins {
    dir: Option<PathBuf>,
}

impl FreshPins {
    pub fn watch(dir: &Path) -> FreshPins {
        let fresh = !is_pinned(dir) && !link_is_pinned(dir);
        FreshPins {
            dir: fresh.then(|| dir.to_owned()),
        }
    }

    /// The start succeeded: the pins stay.
    pub fn keep(mut self) {
        self.dir = None;
    }
}

impl Drop for FreshPins {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir
            && let Err(e) = remove_pins(dir)
        {
            tracing::warn!(error = %e, "removing the pins of a failed start");
        }
    }
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
    // Unpinning alone detaches only when the kernel drops the link's last
    // reference, which may come a moment after `lb stop` returns; detaching
    // first makes the program leave the interface before we answer.
    detach_link(&link_pin(pin_dir));
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

/// Detaches the pinned link at `path` from its interface (BPF_LINK_DETACH,
/// Linux 5.9), leaving the pin for the caller to remove. Best effort: a
/// missing pin or an older kernel leaves detaching to the unpin.
fn detach_link(path: &Path) {
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags.
    let mut attr = [0u64; 2];
    attr[0] = c.as_ptr() as u64;
    // SAFETY: attr is a zeroed bpf_attr prefix of the size passed; pathname
    // points at a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return;
    }
    // bpf_attr for BPF_LINK_DETACH: link_fd.
    let detach = [fd as u32, 0];
    // SAFETY: a bpf_attr prefix of the size passed; fd is ours.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            detach.as_ptr(),
            size_of_val(&detach),
        );
        libc::close(fd as libc::c_int);
    }
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
        for f in ["link", "maps/VIPS", "maps/FLOW_TABLE"] {
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
        std::fs::write(dir.join("maps/FLOW_TABLE"), "").unwrap();
        assert!(
            is_pinned(&dir),
            "flows alone must not be mistaken for a fresh start"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
