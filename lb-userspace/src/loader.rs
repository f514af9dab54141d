//! Loads the embedded eBPF object with maps sized for a config.

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp},
};
use lb_common::{PROGRAM_NAME, TABLE_HALVES, map_names};

/// The XDP object built by build.rs from lb-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));
/// The reference programs (`xdp_pass`, `xdp_tx_swap`) used by test rigs and the
/// benchmark.
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
}

/// Creates the maps (the Maglev array sized for `max_vips` VIPs of
/// `table_size` slots, two halves each) and loads the program through the
/// verifier. Nothing is attached yet.
pub fn load(table_size: u32, max_vips: u32) -> Result<Ebpf, LoadError> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(map_names::MAGLEV, max_vips * TABLE_HALVES * table_size)
        .load(EBPF_OBJECT)?;
    program(&mut ebpf)?.load()?;
    Ok(ebpf)
}

/// The load balancer's XDP program inside `ebpf`.
pub fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, LoadError> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(LoadError::MissingProgram)?;
    Ok(prog.try_into()?)
}
