//! The flow hash, shared by the XDP program (to place packets) and userspace
//! (to predict placement in tests and to derive Maglev permutations).
//!
//! MurmurHash3's 32-bit block and finalisation steps over whole words: a few
//! multiplies and rotates per word, no tables, no loops the verifier has to
//! bound beyond a fixed word count, and a good avalanche. The seed is explicit
//! so every instance behind one ECMP VIP hashes identically.

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of an IPv4 5-tuple. Addresses and ports are host-order values
/// (`Ipv4Addr::to_bits()`, `u16` port numbers).
#[inline(always)]
pub fn flow_hash_v4(src: u32, dst: u32, sport: u16, dport: u16, proto: u8, seed: u32) -> u32 {
    let mut h = mix(seed, src);
    h = mix(h, dst);
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 16)
}

/// Hash of an IPv6 5-tuple. Addresses are as they sit in the packet; ports
/// are `u16` port numbers. The same words in the same order as
/// [`flow_hash_v4`], each address as four big-endian words.
#[inline(always)]
pub fn flow_hash_v6(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let word = |a: &[u8; 16], i: usize| u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mut h = seed;
    let mut i = 0;
    while i < 16 {
        h = mix(h, word(src, i));
        i += 4;
    }
    i = 0;
    while i < 16 {
        h = mix(h, word(dst, i));
        i += 4;
    }
    h = mix(h, ((sport as u32) << 16) | dport as u32);
    h = mix(h, proto as u32);
    finish(h, 40)
}

/// SipHash-1-3 state (Aumasson and Bernstein; the variant Rust's standard
/// hash maps use against hash flooding): a keyed pseudorandom function, so
/// without the key nobody can make flows collide in the flow table.
struct Sip([u64; 4]);

impl Sip {
    #[inline(always)]
    fn new(key: [u64; 2]) -> Sip {
        Sip([
            key[0] ^ 0x736f_6d65_7073_6575,
            key[1] ^ 0x646f_7261_6e64_6f6d,
            key[0] ^ 0x6c79_6765_6e65_7261,
            key[1] ^ 0x7465_6462_7974_6573,
        ])
    }

    #[inline(always)]
    fn round(&mut self) {
        let v = &mut self.0;
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    }

    /// One message block (8 bytes, little-endian), one compression round.
    #[inline(always)]
    fn block(&mut self, m: u64) {
        self.0[3] ^= m;
        self.round();
        self.0[0] ^= m;
    }

    /// The last block (with the message length in its top byte), then three
    /// finalisation rounds.
    #[inline(always)]
    fn finish(mut self, last: u64) -> u64 {
        self.block(last);
        self.0[2] ^= 0xff;
        self.round();
        self.round();
        self.round();
        self.0[0] ^ self.0[1] ^ self.0[2] ^ self.0[3]
    }
}

/// The flow table's keyed hash of an IPv4 5-tuple: SipHash-1-3 under `key`
/// of the 13 bytes source, destination (as they sit in the packet), source
/// and destination port (network order) and protocol.
#[inline(always)]
pub fn flow_key_v4(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    key: [u64; 2],
) -> u64 {
    let mut s = Sip::new(key);
    s.block(u64::from_le_bytes([
        src[0], src[1], src[2], src[3], dst[0], dst[1], dst[2], dst[3],
    ]));
    s.finish(tail(sport, dport, proto, 13))
}

/// [`flow_key_v4`] for IPv6: the 37 bytes of the IPv6 5-tuple (the lengths
/// differ, so no IPv4 tuple hashes like an IPv6 one by construction).
#[inline(always)]
pub fn flow_key_v6(
    src: &[u8; 16],
    dst: &[u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    key: [u64; 2],
) -> u64 {
    let word = |a: &[u8; 16], i: usize| {
        u64::from_le_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    let mut s = Sip::new(key);
    s.block(word(src, 0));
    s.block(word(src, 8));
    s.block(word(dst, 0));
    s.block(word(dst, 8));
    s.finish(tail(sport, dport, proto, 37))
}

/// SipHash's last block: the ports and protocol (5 bytes) and the message
/// length in the top byte.
#[inline(always)]
fn tail(sport: u16, dport: u16, proto: u8, len: u8) -> u64 {
    let [s0, s1] = sport.to_be_bytes();
    let [d0, d1] = dport.to_be_bytes();
    u64::from_le_bytes([s0, s1, d0, d1, proto, 0, 0, len])
}

/// Hash of an arbitrary word sequence (used by the Maglev builder for a
/// backend's offset and skip).
pub fn hash_words(words: &[u32], seed: u32) -> u32 {
    let mut h = seed;
    for &w in words {
        h = mix(h, w);
    }
    finish(h, (words.len() as u32).wrapping_mul(4))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_hash_is_hash_words_of_the_tuple() {
        let (src, dst, sp, dp) = (0x0a00_0001, 0xc000_020a, 40000u16, 80u16);
        let words = [src, dst, ((sp as u32) << 16) | dp as u32, 6];
        assert_eq!(flow_hash_v4(src, dst, sp, dp, 6, 7), hash_words(&words, 7));
    }

    #[test]
    fn flow_hash_v6_is_hash_words_of_the_tuple() {
        let src = core::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let dst = core::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0xa, 0x64);
        let mut words = [0u32; 10];
        for i in 0..4 {
            words[i] = (src.to_bits() >> (96 - 32 * i)) as u32;
            words[4 + i] = (dst.to_bits() >> (96 - 32 * i)) as u32;
        }
        words[8] = (40000 << 16) | 80;
        words[9] = 6;
        assert_eq!(
            flow_hash_v6(&src.octets(), &dst.octets(), 40000, 80, 6, 7),
            hash_words(&words, 7)
        );
    }

    #[test]
    fn seed_and_every_field_change_the_hash() {
        let base = flow_hash_v4(1, 2, 3, 4, 6, 0x5eed);
        assert_ne!(base, flow_hash_v4(1, 2, 3, 4, 6, 0x5eee));
        assert_ne!(base, flow_hash_v4(9, 2, 3, 4, 6, 0x5eed));
        assert_ne!(base, flow_hash_v4(1, 9, 3, 4, 6, 0x5eed));
        assert_ne!(base, flow_hash_v4(1, 2, 9, 4, 6, 0x5eed));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 9, 6, 0x5eed));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 4, 17, 0x5eed));
    }

    #[test]
    fn known_vectors_are_stable() {
        // MurmurHash3_x86_32 of the little-endian bytes of the words, computed
        // with an independent implementation; pins the function so instances
        // running different builds keep agreeing on every flow's backend.
        assert_eq!(hash_words(&[0], 0), 0x2362_f9de);
        let (src, dst, sport, dport) = (0x0a00_0001, 0xc000_020a, 40000u16, 80u16);
        assert_eq!(flow_hash_v4(src, dst, sport, dport, 6, 0x5eed), 0x1d8b_9920);
    }

    #[test]
    fn siphash_1_3_matches_the_reference() {
        // SipHash-1-3 of the 13 bytes 0, 1, ..., 12 under the key bytes
        // 0..=15 (the reference implementation's convention), computed with
        // an independent implementation.
        let key = [
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        let h = flow_key_v4(
            [0, 1, 2, 3],
            [4, 5, 6, 7],
            u16::from_be_bytes([8, 9]),
            u16::from_be_bytes([10, 11]),
            12,
            key,
        );
        assert_eq!(h, 0x306f_760c_1229_ffa7);
    }

    #[test]
    fn the_flow_key_depends_on_the_key_and_every_field() {
        let k = [1, 2];
        let base = flow_key_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 6, k);
        assert_ne!(
            base,
            flow_key_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 6, [1, 3])
        );
        assert_ne!(base, flow_key_v4([10, 0, 0, 9], [10, 0, 0, 2], 1, 2, 6, k));
        assert_ne!(base, flow_key_v4([10, 0, 0, 1], [10, 0, 0, 9], 1, 2, 6, k));
        assert_ne!(base, flow_key_v4([10, 0, 0, 1], [10, 0, 0, 2], 9, 2, 6, k));
        assert_ne!(base, flow_key_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 9, 6, k));
        assert_ne!(base, flow_key_v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, 17, k));
        let a = [0u8; 16];
        assert_ne!(
            flow_key_v6(&a, &a, 1, 2, 6, k),
            flow_key_v6(&a, &a, 1, 2, 17, k)
        );
    }
}
