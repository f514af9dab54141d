//! What `lb decap`'s XDP program and its control plane share.

/// Next-header values of the tunnels opened: IPv4 inside (IPIP from an IPv4
/// outer header, IPv4-in-IPv6 from an IPv6 one) and IPv6 inside (IP6IP6).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;

/// Capacity of the `DECAP_ADDRS` map: addresses of this host.
pub const DECAP_MAX_ADDRS: u32 = 256;

pub mod map_names {
    pub const DECAP_ADDRS: &str = "DECAP_ADDRS";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    pub const ALL: [&str; 2] = [DECAP_ADDRS, DECAP_STATS];
}

/// Name of the decap program in its object file.
pub const DECAP_PROGRAM: &str = "lb_decap";

/// Index of a counter in the per-CPU `DECAP_STATS` block.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapStat {
    /// A tunnelled packet to this host, opened and passed to the kernel.
    Decapsulated,
    /// Anything else, passed untouched.
    Passed,
    /// A tunnel to this host whose inner header is missing or not of the
    /// family its outer header announces: dropped.
    Malformed,
}

impl DecapStat {
    pub const ALL: [DecapStat; 3] = [
        DecapStat::Decapsulated,
        DecapStat::Passed,
        DecapStat::Malformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            DecapStat::Decapsulated => "decapsulated",
            DecapStat::Passed => "passed",
            DecapStat::Malformed => "malformed",
        }
    }
}

/// The only element of `DECAP_STATS`.
pub type DecapStats = [u64; 3];
