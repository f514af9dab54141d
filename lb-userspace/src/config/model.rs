//! What the program uses: validated settings, and the config's enums. Each
//! enum variant is declared with the word the file spells it with; parsing,
//! serializing (`/status`), `as_str` (metric labels) and `Display`
//! (`check-config`, `lb status`, logs) all use that word, so renaming a
//! variant changes no output.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Declares an enum whose variants are config words: `Variant => "word"`.
macro_rules! config_words {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $( $(#[$variant_meta:meta])* $variant:ident => $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $( $(#[$variant_meta])* #[serde(rename = $word)] $variant, )+
        }

        impl $name {
            /// The word the config file uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $word, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                // `pad`, so column widths in tables apply.
                f.pad(self.as_str())
            }
        }
    };
}

config_words! {
    #[derive(Default)]
    pub enum XdpMode {
        /// In the driver: the fast path.
        #[default]
        Native => "native",
        /// In the kernel's generic receive path: works on any interface, slower.
        Generic => "generic",
    }
}

config_words! {
    #[derive(PartialOrd, Ord)]
    pub enum Protocol {
        Tcp => "tcp",
        Udp => "udp",
    }
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

config_words! {
    pub enum Forwarding {
        /// Rewrite MACs; backends share an L2 segment with the load balancer.
        L2 => "l2",
        /// Encapsulate in IPIP; backends anywhere routable, running `lb decap`.
        Ipip => "ipip",
    }
}

config_words! {
    #[derive(Default)]
    pub enum HealthKind {
        /// A TCP connect succeeds.
        #[default]
        Tcp => "tcp",
        /// `GET path` answers with a 2xx status.
        Http => "http",
    }
}

config_words! {
    #[derive(Default)]
    pub enum OnAllDown {
        /// When no active backend is healthy, keep using every active backend.
        #[default]
        FailOpen => "fail_open",
        /// When no active backend is healthy, drop the VIP's traffic (counted).
        Drop => "drop",
    }
}

config_words! {
    #[derive(Default, PartialOrd, Ord)]
    pub enum BackendState {
        /// Takes new flows when healthy.
        #[default]
        Active => "active",
        /// No new flows; established flows stay while it is healthy.
        Drain => "drain",
        /// Out of the table; established flows are re-placed.
        Disabled => "disabled",
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub table_size: u32,
    pub seed: u32,
    pub max_vips: u32,
    /// IPv4 flows the flow table is sized for (one table holds both
    /// families, two entries per configured flow).
    pub max_flows: u32,
    /// IPv6 flows the flow table is sized for.
    pub max_flows_v6: u32,
    pub udp_idle_timeout: Duration,
    /// An established flow idle for longer than this may lose its entry to
    /// a new flow whose bucket is full (`flow_table.idle_evict`).
    pub flow_idle_evict: Duration,
    pub pin_path: PathBuf,
    /// Where the admin HTTP listener (metrics, status, readiness) binds.
    pub admin_listen: SocketAddr,
    /// After SIGINT/SIGTERM, how long `/ready` answers 503 before `lb` exits.
    pub shutdown_grace: Duration,
    /// Connections the admin listener serves at once.
    pub admin_max_connections: u32,
    /// Announcing the VIPs over BGP (through `lb bgp-feed`); `None` when the
    /// file has no `bgp` section.
    pub bgp: Option<Bgp>,
    pub vips: Vec<Vip>,
}

/// The `bgp` section: when a VIP is announced, and the attributes every
/// announcement carries (identical on every instance, or the router keeps
/// one path instead of spreading flows over all of them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bgp {
    /// Healthy active backends a VIP needs to be announced.
    pub min_healthy: u32,
    /// How long a VIP must be fit without interruption before it is announced.
    #[serde(with = "millis")]
    pub announce_after: Duration,
    /// After SIGTERM, how long the VIPs stay announced with the
    /// GRACEFUL_SHUTDOWN community before they are withdrawn.
    #[serde(with = "millis")]
    pub shutdown_delay: Duration,
    /// How long `lb bgp-feed` keeps the last state while `lb` is unreachable.
    #[serde(with = "millis")]
    pub feed_grace: Duration,
    pub med: u32,
    /// `ASN:VALUE` standard communities added to every announcement.
    pub communities: Vec<String>,
    /// `self`, or an address used for the VIPs of its family.
    pub next_hop: String,
}

/// Durations in `/status` as whole milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub port: u16,
    /// Request path (http only).
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    /// The VIPS map key of `address:port/protocol`, computed at validation.
    pub key: lb_common::VipKey,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    /// `ipip`: outer source address, of the backends' family; `None` takes
    /// the route's preferred source (one of the host's addresses).
    pub encap_source: Option<IpAddr>,
    /// `ipip`: answer packets too big once encapsulated with ICMP
    /// "fragmentation needed" or ICMPv6 "packet too big" (path MTU
    /// discovery) rather than drop them.
    pub icmp_too_big: bool,
    pub health_check: HealthCheck,
    pub on_all_down: OnAllDown,
    /// Whether `bgp` may announce this VIP from this instance.
    pub announce: bool,
    pub backends: Vec<Backend>,
}

impl Vip {
    /// Address and port as logs and metric labels show them (an IPv6
    /// address bracketed: `[2001:db8::10]:443`).
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::new(self.address, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: IpAddr,
    pub weight: u32,
    pub state: BackendState,
}
