//! Kernel-side programs of the load balancer. The programs are the binaries
//! (`src/main.rs`: the balancer, `src/bin/decap.rs`: `lb decap`'s program,
//! `src/bin/baseline.rs`: the benchmark's reference programs); this library
//! holds what they share: the one bounds-checked accessor for packet memory
//! and the panic handler. lb-userspace names this crate as a build dependency
//! so that it is rebuilt when the programs change.
#![no_std]

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at byte `offset` of the packet, or `None` when the packet
/// ends before the whole `T`. The check is written against `data_end` so the
/// verifier accepts later dereferences. Every read and write of packet memory
/// goes through here.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A copy of the `T` at `offset`, bounds-checked (a copy, because the
/// helpers that move the packet's head and tail invalidate references).
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p: *const T = ptr_at(ctx, offset)?;
    // SAFETY: ptr_at checked that the whole `T` lies inside the packet.
    Some(unsafe { *p })
}

/// BPF programs cannot unwind or abort; the verifier rejects any path that
/// could reach here, so this only satisfies the compiler.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
