//! Reference programs that do the least possible work. The benchmark measures
//! the load balancer against them, and the test rigs attach `xdp_pass` to the
//! peer of a veth that receives XDP_TX frames (veth drops those frames unless
//! the peer runs an XDP program).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
