//! Reference programs that do the least possible work. The benchmark measures
//! the load balancer against them, and the test rigs attach `xdp_pass` to the
//! peer of a veth that receives XDP_TX frames (veth drops those frames unless
//! the peer runs an XDP program). `xdp_gen` and `xdp_count_drop` are the
//! benchmark's traffic generator and receiver.
#![no_std]
#![no_main]

// Linked for its panic handler.
use lb_ebpf as _;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// Frames generated (index 0) and received (index 1), per CPU.
#[map]
static BENCH_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Offset of the UDP source port in an untagged Ethernet + IPv4 (no options)
/// frame.
const UDP_SPORT: usize = 14 + 20;

/// Run with BPF_PROG_TEST_RUN in live-frames mode: gives each frame a new UDP
/// source port (1024..65535, cycling) and sends it out of the interface.
#[xdp]
pub fn xdp_gen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + UDP_SPORT + 2 > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let Some(n) = BENCH_COUNTS.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: per-CPU counter; the 2 bytes were bounds-checked above.
    unsafe {
        *n += 1;
        let port = 1024 + (*n % 64512) as u16;
        *((start + UDP_SPORT) as *mut [u8; 2]) = port.to_be_bytes();
    }
    xdp_action::XDP_TX
}

/// Counts and drops every frame: the receiving end of the benchmark.
#[xdp]
pub fn xdp_count_drop(_ctx: XdpContext) -> u32 {
    if let Some(n) = BENCH_COUNTS.get_ptr_mut(1) {
        // SAFETY: per-CPU counter.
        unsafe { *n += 1 };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Swaps source and destination MAC and sends the frame back out: the ceiling
/// for any program that forwards with XDP_TX.
#[xdp]
pub fn xdp_tx_swap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    let macs = start as *mut [u8; 12];
    // SAFETY: the 12 bytes were bounds-checked against data_end above.
    unsafe {
        let m = *macs;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&m[6..]);
        swapped[6..].copy_from_slice(&m[..6]);
        *macs = swapped;
    }
    xdp_action::XDP_TX
}
