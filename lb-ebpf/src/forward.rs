//! Forwarding modes. The IP packet is never modified: backends hold the VIP
//! and reply to the client directly (direct server return).

use aya_ebpf::programs::XdpContext;
use lb_common::{BACKEND_F_RESOLVED, BackendEntry, Stat};
use network_types::eth::EthHdr;

use crate::{Verdict, packet::ptr_at};

/// `l2` mode: the backend is on a segment this host is attached to. Rewrite the
/// destination MAC to the backend's and the source MAC to the egress
/// interface's; send back out of the ingress interface, or redirect when the
/// backend sits behind another one.
#[inline(always)]
pub fn l2(ctx: &XdpContext, backend: &BackendEntry) -> Result<Verdict, Verdict> {
    if backend.flags & BACKEND_F_RESOLVED == 0 {
        return Err(Verdict::Drop(Stat::DropNoNeighbour));
    }
    // The parser already read a whole Ethernet header; this check restates it
    // for the verifier.
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::Drop(Stat::DropTruncatedEth))?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = backend.dst_mac;
        (*eth).src_addr = backend.src_mac;
    }
    if backend.ifindex == 0 || backend.ifindex == ctx.ingress_ifindex() as u32 {
        Ok(Verdict::Tx)
    } else {
        Ok(Verdict::Redirect(backend.ifindex))
    }
}
