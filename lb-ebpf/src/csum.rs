//! The Internet checksum (RFC 1071), summed piecewise so a header can be
//! checksummed together with a pseudo-header it is not contiguous with.

use network_types::ip::Ipv4Hdr;

/// The one's-complement sum of an even number of bytes, not yet folded.
#[inline(always)]
pub fn sum<const N: usize>(bytes: &[u8; N]) -> u32 {
    const { assert!(N % 2 == 0) };
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// The checksum of everything summed into `sum`.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The IPv4 header checksum of `h` (whose `check` is zero).
#[inline(always)]
pub fn ipv4_header(h: &Ipv4Hdr) -> u16 {
    // SAFETY: Ipv4Hdr is 20 plain bytes.
    let bytes: &[u8; Ipv4Hdr::LEN] = unsafe { &*(h as *const Ipv4Hdr as *const [u8; 20]) };
    fold(sum(bytes))
}
