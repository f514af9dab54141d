//! The YAML configuration: parsed strictly (unknown fields are errors), then
//! validated into typed values. Nothing touches the kernel until a file has
//! passed both steps, so a bad file changes nothing.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

/// Smallest and largest accepted Maglev table size. Below the minimum the
/// balance between backends is too coarse; above the maximum the tables of
/// `max_vips` VIPs (two halves each) no longer fit a sensible memory budget.
pub const TABLE_SIZE_MIN: u32 = 251;
pub const TABLE_SIZE_MAX: u32 = 655_373;
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
pub const DEFAULT_MAX_VIPS: u32 = 16;
pub const WEIGHT_MAX: i64 = 65_535;
pub const DEFAULT_FLOW_TABLE_SIZE: u32 = 262_144;
pub const FLOW_TABLE_SIZE_MIN: i64 = 1024;
pub const FLOW_TABLE_SIZE_MAX: i64 = 16_777_216;
/// Where pinned maps and the XDP link live, unless `pin_path` says otherwise.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/lb";

// ---- What the file says -----------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: String,
    #[serde(default)]
    xdp_mode: XdpMode,
    #[serde(default)]
    maglev: RawMaglev,
    #[serde(default = "default_max_vips")]
    max_vips: i64,
    #[serde(default)]
    flow_table: RawFlowTable,
    pin_path: Option<PathBuf>,
    #[serde(default)]
    admin: RawAdmin,
    vips: Vec<RawVip>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace: String,
    #[serde(default = "default_admin_max_connections")]
    max_connections: i64,
}

impl Default for RawAdmin {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            shutdown_grace: default_shutdown_grace(),
            max_connections: default_admin_max_connections(),
        }
    }
}

/// Each admin connection holds a file descriptor; far below any sane limit.
const ADMIN_MAX_CONNECTIONS_MAX: i64 = 4096;

fn default_admin_max_connections() -> i64 {
    64
}

/// Loopback by default: the admin listener is unauthenticated.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9742";

fn default_admin_listen() -> String {
    DEFAULT_ADMIN_LISTEN.into()
}

fn default_shutdown_grace() -> String {
    "0s".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowTable {
    #[serde(default = "default_flow_table_size")]
    max_flows: i64,
    /// Capacity of the IPv6 flow table; defaults to `max_flows`.
    max_flows_v6: Option<i64>,
    #[serde(default = "default_udp_idle_timeout")]
    udp_idle_timeout: String,
}

fn default_flow_table_size() -> i64 {
    DEFAULT_FLOW_TABLE_SIZE as i64
}

fn default_udp_idle_timeout() -> String {
    "30s".into()
}

impl Default for RawFlowTable {
    fn default() -> Self {
        Self {
            max_flows: default_flow_table_size(),
            max_flows_v6: None,
            udp_idle_timeout: default_udp_idle_timeout(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(default)]
    kind: HealthKind,
    port: Option<i64>,
    path: Option<String>,
    #[serde(default = "default_interval")]
    interval: String,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default = "default_rise")]
    rise: i64,
    #[serde(default = "default_fall")]
    fall: i64,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        Self {
            kind: HealthKind::default(),
            port: None,
            path: None,
            interval: default_interval(),
            timeout: default_timeout(),
            rise: default_rise(),
            fall: default_fall(),
        }
    }
}

fn default_interval() -> String {
    "2s".into()
}
fn default_timeout() -> String {
    "1s".into()
}
fn default_rise() -> i64 {
    2
}
fn default_fall() -> i64 {
    3
}

fn default_max_vips() -> i64 {
    DEFAULT_MAX_VIPS as i64
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaglev {
    #[serde(default = "default_table_size")]
    table_size: i64,
    #[serde(default)]
    seed: i64,
}

fn default_table_size() -> i64 {
    DEFAULT_TABLE_SIZE as i64
}

impl Default for RawMaglev {
    fn default() -> Self {
        Self {
            table_size: default_table_size(),
            seed: 0,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVip {
    name: String,
    address: String,
    port: i64,
    protocol: Protocol,
    forwarding: Forwarding,
    encap_source: Option<String>,
    icmp_too_big: Option<bool>,
    #[serde(default)]
    health_check: RawHealthCheck,
    #[serde(default)]
    on_all_down: OnAllDown,
    backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    weight: i64,
    #[serde(default)]
    state: BackendState,
}

// ---- What the program uses ----------------------------------------------------

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// In the driver: the fast path.
    #[default]
    Native,
    /// In the kernel's generic receive path: works on any interface, slower.
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::IPPROTO_TCP,
            Protocol::Udp => lb_common::IPPROTO_UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Rewrite MACs; backends share an L2 segment with the load balancer.
    L2,
    /// Encapsulate in IPIP; backends anywhere routable, running `lb decap`.
    Ipip,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds.
    #[default]
    Tcp,
    /// `GET path` answers with a 2xx status.
    Http,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAllDown {
    /// When no active backend is healthy, keep using every active backend.
    #[default]
    FailOpen,
    /// When no active backend is healthy, drop the VIP's traffic (counted).
    Drop,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows when healthy.
    #[default]
    Active,
    /// No new flows; established flows stay while it is healthy.
    Drain,
    /// Out of the table; established flows are re-placed.
    Disabled,
}

/// What must not change while `lb` runs: the sizes of the maps and where they
/// and the attachment are pinned. A reload that changes any of it is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixed {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub table_size: u32,
    /// Capacity reserved for VIPs (sizes the Maglev table map at load time).
    pub max_vips: u32,
    pub max_flows: u32,
    pub max_flows_v6: u32,
    pub pin_path: PathBuf,
    pub admin_listen: SocketAddr,
    pub admin_max_connections: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub table_size: u32,
    pub seed: u32,
    pub max_vips: u32,
    /// Capacity of the IPv4 flow table.
    pub max_flows: u32,
    /// Capacity of the IPv6 flow table.
    pub max_flows_v6: u32,
    pub udp_idle_timeout: Duration,
    pub pin_path: PathBuf,
    /// Where the admin HTTP listener (metrics, status, readiness) binds.
    pub admin_listen: SocketAddr,
    /// After SIGINT/SIGTERM, how long `/ready` answers 503 before `lb` exits.
    pub shutdown_grace: Duration,
    /// Connections the admin listener serves at once.
    pub admin_max_connections: u32,
    pub vips: Vec<Vip>,
}

impl Config {
    pub fn fixed(&self) -> Fixed {
        Fixed {
            interface: self.interface.clone(),
            xdp_mode: self.xdp_mode,
            table_size: self.table_size,
            max_vips: self.max_vips,
            max_flows: self.max_flows,
            max_flows_v6: self.max_flows_v6,
            pin_path: self.pin_path.clone(),
            admin_listen: self.admin_listen,
            admin_max_connections: self.admin_max_connections,
        }
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

// ---- Errors -------------------------------------------------------------------

/// One problem in a config file, naming the field it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// serde_yaml's message names the field path and the line.
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        file: PathBuf,
        problems: Vec<Problem>,
    },
}

impl ConfigError {
    /// The problems found by validation (empty for read and parse errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}

// ---- Loading ------------------------------------------------------------------

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text`; `file` only labels error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        validate(raw).map_err(|problems| ConfigError::Invalid {
            file: file.to_owned(),
            problems,
        })
    }
}

struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            message: message.into(),
        });
    }
}

fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut p = Problems(Vec::new());

    // The name also becomes a path component of the default pin_path.
    if raw.interface.contains('/') || raw.interface == "." || raw.interface == ".." {
        p.add(
            "interface",
            format!("`{}` is not an interface name", raw.interface),
        );
    } else if raw.interface.is_empty() || raw.interface.len() >= libc::IF_NAMESIZE {
        p.add(
            "interface",
            format!("must be 1 to {} characters", libc::IF_NAMESIZE - 1),
        );
    }

    let table_size = raw.maglev.table_size;
    if !(TABLE_SIZE_MIN as i64..=TABLE_SIZE_MAX as i64).contains(&table_size) {
        p.add(
            "maglev.table_size",
            format!("{table_size} is out of range {TABLE_SIZE_MIN}..={TABLE_SIZE_MAX}"),
        );
    } else if !is_prime(table_size as u32) {
        p.add(
            "maglev.table_size",
            format!("{table_size} is not prime (Maglev needs a prime table size)"),
        );
    }
    let seed = raw.maglev.seed;
    if !(0..=u32::MAX as i64).contains(&seed) {
        p.add("maglev.seed", format!("{seed} does not fit in 32 bits"));
    }

    let max_vips = raw.max_vips;
    if !(1..=lb_common::MAX_VIPS as i64).contains(&max_vips) {
        p.add(
            "max_vips",
            format!("{max_vips} is out of range 1..={}", lb_common::MAX_VIPS),
        );
    } else if (raw.vips.len() as i64) > max_vips {
        p.add(
            "vips",
            format!("{} VIPs exceed max_vips = {max_vips}", raw.vips.len()),
        );
    }

    let max_flows = raw.flow_table.max_flows;
    let max_flows_v6 = raw.flow_table.max_flows_v6.unwrap_or(max_flows);
    for (field, n) in [("max_flows", max_flows), ("max_flows_v6", max_flows_v6)] {
        if !(FLOW_TABLE_SIZE_MIN..=FLOW_TABLE_SIZE_MAX).contains(&n) {
            p.add(
                format!("flow_table.{field}"),
                format!("{n} is out of range {FLOW_TABLE_SIZE_MIN}..={FLOW_TABLE_SIZE_MAX}"),
            );
        }
    }
    let udp_idle_timeout = parse_duration(
        &mut p,
        "flow_table.udp_idle_timeout",
        &raw.flow_table.udp_idle_timeout,
    )
    .filter(|d| {
        let ok = *d >= Duration::from_secs(1);
        if !ok {
            p.add("flow_table.udp_idle_timeout", "must be at least 1s");
        }
        ok
    });
    let pin_path = raw
        .pin_path
        .unwrap_or_else(|| Path::new(DEFAULT_PIN_ROOT).join(&raw.interface));
    if !pin_path.is_absolute() {
        p.add(
            "pin_path",
            format!("{} is not an absolute path", pin_path.display()),
        );
    }
    let admin_listen = raw.admin.listen.parse::<SocketAddr>().map_err(|_| {
        p.add(
            "admin.listen",
            format!("`{}` is not an address:port", raw.admin.listen),
        );
    });
    let shutdown_grace = parse_duration(&mut p, "admin.shutdown_grace", &raw.admin.shutdown_grace);
    if !(1..=ADMIN_MAX_CONNECTIONS_MAX).contains(&raw.admin.max_connections) {
        p.add(
            "admin.max_connections",
            format!(
                "{} is out of range 1..={ADMIN_MAX_CONNECTIONS_MAX}",
                raw.admin.max_connections
            ),
        );
    }

    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut backend_count = 0usize;
    let mut vips = Vec::with_capacity(raw.vips.len());
    for (i, v) in raw.vips.into_iter().enumerate() {
        let at = format!("vips[{i}]");
        if v.name.is_empty() {
            p.add(format!("{at}.name"), "must not be empty");
        } else if !names.insert(v.name.clone()) {
            p.add(
                format!("{at}.name"),
                format!("duplicate VIP name `{}`", v.name),
            );
        }
        let address = parse_ip(&mut p, &format!("{at}.address"), &v.address);
        let port = match u16::try_from(v.port) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                p.add(
                    format!("{at}.port"),
                    format!("{} is not a port (1..=65535)", v.port),
                );
                None
            }
        };
        if let (Some(a), Some(port)) = (address, port)
            && !keys.insert((a, port, v.protocol))
        {
            p.add(
                at.clone(),
                format!("duplicate VIP {}/{}", SocketAddr::new(a, port), v.protocol),
            );
        }

        let health_check =
            validate_health(&mut p, &format!("{at}.health_check"), v.health_check, port);
        if v.backends.is_empty() {
            p.add(format!("{at}.backends"), "must list at least one backend");
        }
        let mut seen = HashSet::new();
        let mut backends = Vec::with_capacity(v.backends.len());
        // Each parsed backend address with its index in the file.
        let mut addresses = Vec::with_capacity(v.backends.len());
        for (j, b) in v.backends.into_iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            let address = parse_ip(&mut p, &format!("{bat}.address"), &b.address);
            if let Some(a) = address
                && !seen.insert(a)
            {
                p.add(format!("{bat}.address"), format!("duplicate backend {a}"));
            }
            if !(1..=WEIGHT_MAX).contains(&b.weight) {
                p.add(
                    format!("{bat}.weight"),
                    format!("{} is out of range 1..={WEIGHT_MAX}", b.weight),
                );
            }
            if let Some(address) = address {
                addresses.push((j, address));
                backends.push(Backend {
                    address,
                    weight: b.weight.clamp(1, WEIGHT_MAX) as u32,
                    state: b.state,
                });
            }
        }
        backend_count += backends.len();
        let encap_source = match (&v.encap_source, v.forwarding) {
            (None, _) => None,
            (Some(_), Forwarding::L2) => {
                p.add(
                    format!("{at}.encap_source"),
                    "only applies to forwarding: ipip",
                );
                None
            }
            (Some(text), Forwarding::Ipip) => parse_ip(&mut p, &format!("{at}.encap_source"), text),
        };
        if v.forwarding == Forwarding::Ipip {
            check_tunnel_families(&mut p, &at, address, encap_source, &addresses);
        }
        if v.icmp_too_big.is_some() && v.forwarding == Forwarding::L2 {
            p.add(
                format!("{at}.icmp_too_big"),
                "only applies to forwarding: ipip",
            );
        }
        if let (Some(address), Some(port), Some(health_check)) = (address, port, health_check) {
            vips.push(Vip {
                name: v.name,
                address,
                port,
                protocol: v.protocol,
                forwarding: v.forwarding,
                encap_source,
                icmp_too_big: v.icmp_too_big.unwrap_or(true),
                health_check,
                on_all_down: v.on_all_down,
                backends,
            });
        }
    }
    if backend_count > lb_common::MAX_BACKENDS as usize {
        p.add(
            "vips",
            format!(
                "{backend_count} backends in all exceed the limit of {}",
                lb_common::MAX_BACKENDS
            ),
        );
    }

    let (Some(udp_idle_timeout), Ok(admin_listen), Some(shutdown_grace)) = (
        udp_idle_timeout.filter(|_| p.0.is_empty()),
        admin_listen,
        shutdown_grace,
    ) else {
        return Err(p.0);
    };
    Ok(Config {
        interface: raw.interface,
        xdp_mode: raw.xdp_mode,
        table_size: table_size as u32,
        seed: seed as u32,
        max_vips: max_vips as u32,
        max_flows: max_flows as u32,
        max_flows_v6: max_flows_v6 as u32,
        udp_idle_timeout,
        pin_path,
        admin_listen,
        shutdown_grace,
        admin_max_connections: raw
            .admin
            .max_connections
            .clamp(1, ADMIN_MAX_CONNECTIONS_MAX) as u32,
        vips,
    })
}

fn validate_health(
    p: &mut Problems,
    at: &str,
    raw: RawHealthCheck,
    vip_port: Option<u16>,
) -> Option<HealthCheck> {
    let port = match raw.port {
        None => vip_port,
        Some(n) => match u16::try_from(n) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                p.add(
                    format!("{at}.port"),
                    format!("{n} is not a port (1..=65535)"),
                );
                None
            }
        },
    };
    let path = match (raw.kind, raw.path) {
        (HealthKind::Http, None) => "/".to_string(),
        (HealthKind::Http, Some(path))
            if path.starts_with('/') && !path.contains(char::is_whitespace) =>
        {
            path
        }
        (HealthKind::Http, Some(path)) => {
            p.add(
                format!("{at}.path"),
                format!("`{path}` must start with / and contain no spaces"),
            );
            String::new()
        }
        (HealthKind::Tcp, None) => String::new(),
        (HealthKind::Tcp, Some(_)) => {
            p.add(format!("{at}.path"), "only applies to kind: http");
            String::new()
        }
    };
    let interval = parse_duration(p, &format!("{at}.interval"), &raw.interval);
    let timeout = parse_duration(p, &format!("{at}.timeout"), &raw.timeout);
    if let Some(i) = interval
        && i < Duration::from_millis(10)
    {
        p.add(format!("{at}.interval"), "must be at least 10ms");
    }
    if let (Some(i), Some(t)) = (interval, timeout)
        && (t.is_zero() || t >= i)
    {
        p.add(
            format!("{at}.timeout"),
            format!(
                "must be above 0 and below the interval ({})",
                humantime::format_duration(i)
            ),
        );
    }
    for (name, value) in [("rise", raw.rise), ("fall", raw.fall)] {
        if !(1..=100).contains(&value) {
            p.add(
                format!("{at}.{name}"),
                format!("{value} is out of range 1..=100"),
            );
        }
    }
    Some(HealthCheck {
        kind: raw.kind,
        port: port?,
        path,
        interval: interval?,
        timeout: timeout?,
        rise: raw.rise.clamp(1, 100) as u32,
        fall: raw.fall.clamp(1, 100) as u32,
    })
}

fn parse_duration(p: &mut Problems, field: &str, text: &str) -> Option<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) => Some(d),
        Err(e) => {
            p.add(
                field,
                format!("`{text}` is not a duration like 2s or 500ms: {e}"),
            );
            None
        }
    }
}

/// The encapsulations `ipip` supports: IPIP (IPv4 in IPv4), IP6IP6 and
/// IPv4-in-IPv6. One VIP has one outer family, so its backends and its
/// `encap_source` must all be of it.
fn check_tunnel_families(
    p: &mut Problems,
    at: &str,
    vip: Option<IpAddr>,
    encap_source: Option<IpAddr>,
    backends: &[(usize, IpAddr)],
) {
    let Some(&(first, first_address)) = backends.first() else {
        return;
    };
    let outer_v6 = first_address.is_ipv6();
    let family = |v6: bool| if v6 { "IPv6" } else { "IPv4" };
    for &(j, address) in backends {
        if address.is_ipv6() != outer_v6 {
            p.add(
                format!("{at}.backends[{j}].address"),
                format!(
                    "is {} but backends[{first}] is {}: the backends of an ipip VIP share one family",
                    family(!outer_v6),
                    family(outer_v6)
                ),
            );
        }
    }
    if vip.is_some_and(|v| v.is_ipv6()) && !outer_v6 {
        p.add(
            format!("{at}.backends"),
            "an IPv6 VIP needs IPv6 backends with forwarding: ipip (IPv6 in IPv4 is not supported)",
        );
    }
    if let Some(src) = encap_source
        && src.is_ipv6() != outer_v6
    {
        p.add(
            format!("{at}.encap_source"),
            format!(
                "is {} but the backends are {}: the outer header is of the backends' family",
                family(src.is_ipv6()),
                family(outer_v6)
            ),
        );
    }
}

/// Why `a` cannot be a VIP, backend or tunnel source address: the load
/// balancer neither sends to nor answers from these, and an IPv6 link-local
/// address would need a zone (interface) the config has no place for.
fn unusable(a: IpAddr) -> Option<&'static str> {
    match a {
        a if a.is_unspecified() => Some("the unspecified address"),
        a if a.is_loopback() => Some("a loopback address"),
        a if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(a) if a.is_broadcast() => Some("the broadcast address"),
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("a link-local address (it needs an interface zone)")
        }
        _ => None,
    }
}

fn parse_ip(p: &mut Problems, field: &str, text: &str) -> Option<IpAddr> {
    match text.parse::<IpAddr>() {
        // The maps hold IPv4 addresses IPv4-mapped: such an IPv6 address
        // would be the IPv4 one there, while packets carry it as IPv6.
        Ok(IpAddr::V6(a)) if a.to_ipv4_mapped().is_some() => {
            p.add(
                field,
                format!("`{text}` is an IPv4-mapped IPv6 address; write the IPv4 address"),
            );
            None
        }
        Ok(a) => match unusable(a) {
            Some(why) => {
                p.add(field, format!("`{text}` is {why}"));
                None
            }
            None => Some(a),
        },
        Err(_) => {
            p.add(field, format!("`{text}` is not an IP address"));
            None
        }
    }
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface: eth0
xdp_mode: native
maglev:
  table_size: 65537
  seed: 0x5eed
vips:
  - name: web
    address: 192.0.2.10
    port: 80
    protocol: tcp
    forwarding: l2
    backends:
      - { address: 198.51.100.11, weight: 100 }
      - { address: 198.51.100.12, weight: 100 }
  - name: dns
    address: 192.0.2.10
    port: 53
    protocol: udp
    forwarding: l2
    backends:
      - { address: 198.51.100.11, weight: 1 }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    /// Parses GOOD with `from` replaced by `to` and returns the error text.
    fn error_with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "test fixture lacks {from:?}");
        let text = GOOD.replacen(from, to, 1);
        match parse(&text) {
            Ok(c) => panic!("accepted {to:?}: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_the_documented_example() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.interface, "eth0");
        assert_eq!(c.xdp_mode, XdpMode::Native);
        assert_eq!(
            (c.table_size, c.seed, c.max_vips),
            (65537, 0x5eed, DEFAULT_MAX_VIPS)
        );
        assert_eq!(c.vips.len(), 2);
        assert_eq!(c.vips[0].address, IpAddr::from([192, 0, 2, 10]));
        assert_eq!(c.vips[1].protocol, Protocol::Udp);
        assert_eq!(
            c.vips[0].backends[1],
            Backend {
                address: IpAddr::from([198, 51, 100, 12]),
                weight: 100,
                state: BackendState::Active,
            }
        );
    }

    #[test]
    fn the_shipped_configs_are_valid() {
        for name in ["demo.yaml", "example.yaml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../config")
                .join(name);
            Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn rejects_a_non_prime_table_size() {
        let e = error_with("table_size: 65537", "table_size: 65536");
        assert!(
            e.contains("maglev.table_size") && e.contains("not prime"),
            "{e}"
        );
    }

    #[test]
    fn rejects_an_out_of_range_table_size() {
        for size in ["7", "1000003", "-5"] {
            let e = error_with("table_size: 65537", &format!("table_size: {size}"));
            assert!(
                e.contains("maglev.table_size") && e.contains("out of range"),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_a_duplicate_vip() {
        let e = error_with("port: 53\n    protocol: udp", "port: 80\n    protocol: tcp");
        assert!(
            e.contains("vips[1]") && e.contains("duplicate VIP 192.0.2.10:80/tcp"),
            "{e}"
        );
    }

    #[test]
    fn rejects_a_duplicate_vip_name() {
        let e = error_with("name: dns", "name: web");
        assert!(e.contains("vips[1].name") && e.contains("duplicate"), "{e}");
    }

    #[test]
    fn rejects_a_duplicate_backend() {
        let e = error_with("198.51.100.12", "198.51.100.11");
        assert!(
            e.contains("vips[0].backends[1].address") && e.contains("duplicate backend"),
            "{e}"
        );
    }

    #[test]
    fn rejects_zero_and_negative_weights() {
        for w in ["0", "-3", "70000"] {
            let e = error_with("weight: 1 }", &format!("weight: {w} }}"));
            assert!(
                e.contains("vips[1].backends[0].weight") && e.contains("out of range"),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_an_unknown_protocol() {
        let e = error_with("protocol: tcp", "protocol: sctp");
        assert!(
            e.contains("vips[0].protocol") && e.contains("unknown variant `sctp`"),
            "{e}"
        );
    }

    #[test]
    fn rejects_an_unknown_forwarding_mode() {
        let e = error_with("forwarding: l2", "forwarding: gre");
        assert!(
            e.contains("vips[0].forwarding") && e.contains("unknown variant `gre`"),
            "{e}"
        );
    }

    #[test]
    fn rejects_an_unknown_xdp_mode() {
        let e = error_with("xdp_mode: native", "xdp_mode: offload");
        assert!(
            e.contains("xdp_mode") && e.contains("unknown variant `offload`"),
            "{e}"
        );
    }

    #[test]
    fn rejects_unparsable_addresses() {
        let e = error_with("address: 192.0.2.10", "address: 192.0.2.300");
        assert!(
            e.contains("vips[0].address") && e.contains("not an IP address"),
            "{e}"
        );
        let e = error_with("198.51.100.11, weight: 100", "backend-1, weight: 100");
        assert!(
            e.contains("vips[0].backends[0].address") && e.contains("not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn accepts_ipv6_wherever_it_accepts_ipv4() {
        let text = GOOD
            .replacen("address: 192.0.2.10", "address: 2001:db8::10", 1)
            .replace("198.51.100.1", "2001:db8:1::1")
            .replacen(
                "forwarding: l2",
                "forwarding: ipip\n    encap_source: 2001:db8::1",
                1,
            );
        let c = parse(&text).expect("valid");
        assert_eq!(c.vips[0].address, "2001:db8::10".parse::<IpAddr>().unwrap());
        assert_eq!(
            c.vips[0].backends[1].address,
            "2001:db8:1::12".parse::<IpAddr>().unwrap()
        );
        assert_eq!(c.vips[0].encap_source, Some("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn rejects_addresses_nothing_can_be_balanced_to() {
        for (address, why) in [
            ("\"::\"", "unspecified"),
            ("\"::1\"", "loopback"),
            ("\"ff02::1\"", "multicast"),
            ("\"fe80::1\"", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
        ] {
            let e = error_with(
                "198.51.100.11, weight: 100",
                &format!("{address}, weight: 100"),
            );
            assert!(
                e.contains("vips[0].backends[0].address") && e.contains(why),
                "{address}: {e}"
            );
        }
    }

    #[test]
    fn rejects_ipv4_mapped_ipv6_addresses() {
        let e = error_with("address: 192.0.2.10", "address: \"::ffff:192.0.2.10\"");
        assert!(
            e.contains("vips[0].address") && e.contains("IPv4-mapped"),
            "{e}"
        );
    }

    #[test]
    fn rejects_tunnel_family_combinations_ipip_does_not_support() {
        let ipip = |vip: &str, b0: &str, src: &str| {
            let text = GOOD
                .replacen("address: 192.0.2.10", &format!("address: {vip}"), 1)
                .replacen("198.51.100.11,", &format!("{b0},"), 1)
                .replacen("forwarding: l2", &format!("forwarding: ipip{src}"), 1);
            match parse(&text) {
                Ok(_) => String::new(),
                Err(e) => e.to_string(),
            }
        };
        // IPv4 in IPv6 (every backend IPv6) is supported.
        let v4_in_v6 = GOOD
            .replacen("forwarding: l2", "forwarding: ipip", 1)
            .replace("198.51.100.1", "2001:db8:1::1");
        parse(&v4_in_v6).expect("IPv4 VIP with IPv6 backends");
        // IPv6 VIP to an IPv4 backend: IPv6 in IPv4 is not.
        let e = ipip("2001:db8::10", "198.51.100.11", "");
        assert!(
            e.contains("vips[0].backends") && e.contains("IPv6 in IPv4 is not supported"),
            "{e}"
        );
        // Mixed families under one VIP.
        let e = ipip("192.0.2.10", "2001:db8:1::11", "");
        assert!(
            e.contains("vips[0].backends[1].address") && e.contains("share one family"),
            "{e}"
        );
        // An outer source of the other family.
        let e = ipip(
            "192.0.2.10",
            "198.51.100.11",
            "\n    encap_source: 2001:db8::1",
        );
        assert!(
            e.contains("vips[0].encap_source") && e.contains("backends' family"),
            "{e}"
        );
        // Errors name the backend's place in the file, unparsable ones
        // included.
        let text = GOOD
            .replacen("forwarding: l2", "forwarding: ipip", 1)
            .replacen("198.51.100.11", "bogus", 1)
            .replacen(
                "      - { address: 198.51.100.12, weight: 100 }\n",
                "      - { address: 198.51.100.12, weight: 100 }\n      - { address: \"2001:db8:1::13\", weight: 1 }\n",
                1,
            );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("vips[0].backends[2].address: is IPv6 but backends[1] is IPv4"),
            "{e}"
        );
        // l2 only rewrites MACs: any family goes.
        parse(&GOOD.replace("198.51.100.1", "2001:db8:1::1")).expect("l2 with IPv6 backends");
    }

    #[test]
    fn rejects_a_bad_port() {
        let e = error_with("port: 80", "port: 0");
        assert!(e.contains("vips[0].port"), "{e}");
        let e = error_with("port: 80", "port: 65536");
        assert!(e.contains("vips[0].port"), "{e}");
    }

    #[test]
    fn accepts_ipip_with_an_encap_source_and_rejects_it_for_l2() {
        let text = GOOD.replacen(
            "forwarding: l2",
            "forwarding: ipip\n    encap_source: 203.0.113.1",
            1,
        );
        let c = parse(&text).expect("valid");
        assert_eq!(c.vips[0].forwarding, Forwarding::Ipip);
        assert_eq!(c.vips[0].encap_source, Some(IpAddr::from([203, 0, 113, 1])));
        let e = error_with(
            "forwarding: l2",
            "forwarding: l2\n    encap_source: 203.0.113.1",
        );
        assert!(
            e.contains("vips[0].encap_source") && e.contains("only applies to forwarding: ipip"),
            "{e}"
        );
        let e = error_with("forwarding: l2", "forwarding: l2\n    icmp_too_big: false");
        assert!(
            e.contains("vips[0].icmp_too_big") && e.contains("only applies to forwarding: ipip"),
            "{e}"
        );
        let ipip_default = GOOD.replacen("forwarding: l2", "forwarding: ipip", 1);
        assert!(parse(&ipip_default).expect("valid").vips[0].icmp_too_big);
        let ipip_off = GOOD.replacen(
            "forwarding: l2",
            "forwarding: ipip\n    icmp_too_big: false",
            1,
        );
        assert!(!parse(&ipip_off).expect("valid").vips[0].icmp_too_big);
        let e = error_with(
            "forwarding: l2",
            "forwarding: ipip\n    encap_source: nowhere",
        );
        assert!(
            e.contains("vips[0].encap_source") && e.contains("not an IP address"),
            "{e}"
        );
    }

    #[test]
    fn rejects_interface_names_that_are_paths() {
        for name in ["..", ".", "eth0/../x"] {
            let e = error_with("interface: eth0", &format!("interface: \"{name}\""));
            assert!(
                e.contains("interface") && e.contains("not an interface name"),
                "{e}"
            );
        }
    }

    #[test]
    fn rejects_unknown_fields() {
        let e = error_with("xdp_mode: native", "xdp_mode: native\ncolour: blue");
        assert!(e.contains("unknown field `colour`"), "{e}");
        let e = error_with("weight: 1 }", "weight: 1, port: 8080 }");
        assert!(
            e.contains("vips[1].backends[0]") && e.contains("unknown field `port`"),
            "{e}"
        );
    }

    #[test]
    fn rejects_a_vip_without_backends() {
        let text = GOOD.replace(
            "    backends:\n      - { address: 198.51.100.11, weight: 1 }\n",
            "    backends: []\n",
        );
        let e = parse(&text).expect_err("no backends").to_string();
        assert!(
            e.contains("vips[1].backends") && e.contains("at least one"),
            "{e}"
        );
    }

    #[test]
    fn reports_every_problem_and_the_file() {
        let text = GOOD
            .replace("port: 80", "port: 0")
            .replace("weight: 1 }", "weight: 0 }");
        let e = parse(&text).expect_err("two problems");
        assert_eq!(e.problems().len(), 2, "{e}");
        assert!(e.to_string().starts_with("test.yaml: "), "{e}");
    }

    #[test]
    fn defaults_for_health_flows_and_pinning() {
        let c = parse(GOOD).expect("valid");
        let h = &c.vips[0].health_check;
        assert_eq!((h.kind, h.port, h.path.as_str()), (HealthKind::Tcp, 80, ""));
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (Duration::from_secs(2), Duration::from_secs(1), 2, 3)
        );
        assert_eq!(
            c.vips[1].health_check.port, 53,
            "defaults to the VIP's port"
        );
        assert_eq!(c.vips[0].on_all_down, OnAllDown::FailOpen);
        assert_eq!(c.vips[0].backends[0].state, BackendState::Active);
        assert_eq!(
            (c.max_flows, c.udp_idle_timeout),
            (DEFAULT_FLOW_TABLE_SIZE, Duration::from_secs(30))
        );
        assert_eq!(c.pin_path, Path::new("/sys/fs/bpf/lb/eth0"));
        assert_eq!(c.admin_listen, "127.0.0.1:9742".parse().unwrap());
        assert_eq!(c.shutdown_grace, Duration::ZERO);
        assert_eq!(c.admin_max_connections, 64);
    }

    #[test]
    fn accepts_a_full_health_check_and_backend_states() {
        let text = GOOD
            .replace(
                "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11, weight: 100 }",
                "    forwarding: l2\n    health_check: { kind: http, port: 8080, path: /healthz, interval: 500ms, timeout: 200ms, rise: 1, fall: 4 }\n    on_all_down: drop\n    backends:\n      - { address: 198.51.100.11, weight: 100, state: drain }",
            )
            .replace("xdp_mode: native", "xdp_mode: native\npin_path: /sys/fs/bpf/x\nflow_table: { max_flows: 2048, udp_idle_timeout: 5s }");
        let c = parse(&text).expect("valid");
        let h = &c.vips[0].health_check;
        assert_eq!(
            (h.kind, h.port, h.path.as_str()),
            (HealthKind::Http, 8080, "/healthz")
        );
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (Duration::from_millis(500), Duration::from_millis(200), 1, 4)
        );
        assert_eq!(c.vips[0].on_all_down, OnAllDown::Drop);
        assert_eq!(c.vips[0].backends[0].state, BackendState::Drain);
        assert_eq!(
            (c.max_flows, c.udp_idle_timeout, c.pin_path.as_path()),
            (2048, Duration::from_secs(5), Path::new("/sys/fs/bpf/x"))
        );
    }

    /// Parses GOOD with a health_check for the first VIP and returns the error.
    fn health_error(check: &str) -> String {
        error_with(
            "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11",
            &format!(
                "    forwarding: l2\n    health_check: {check}\n    backends:\n      - {{ address: 198.51.100.11"
            ),
        )
    }

    #[test]
    fn rejects_nonsense_health_checks() {
        for (check, field, words) in [
            (
                "{ timeout: 2s, interval: 2s }",
                "health_check.timeout",
                "below the interval",
            ),
            ("{ timeout: 0s }", "health_check.timeout", "above 0"),
            (
                "{ interval: soon }",
                "health_check.interval",
                "not a duration",
            ),
            (
                "{ interval: 1ms, timeout: 500us }",
                "health_check.interval",
                "at least 10ms",
            ),
            ("{ rise: 0 }", "health_check.rise", "out of range"),
            ("{ fall: -1 }", "health_check.fall", "out of range"),
            ("{ port: 70000 }", "health_check.port", "not a port"),
            (
                "{ kind: tcp, path: /x }",
                "health_check.path",
                "only applies to kind: http",
            ),
            (
                "{ kind: http, path: healthz }",
                "health_check.path",
                "must start with /",
            ),
            (
                "{ kind: icmp }",
                "health_check.kind",
                "unknown variant `icmp`",
            ),
        ] {
            let e = health_error(check);
            assert!(
                e.contains(&format!("vips[0].{field}")) && e.contains(words),
                "{check}: {e}"
            );
        }
    }

    #[test]
    fn rejects_unknown_states_policies_and_bad_flow_settings() {
        let e = error_with("weight: 1 }", "weight: 1, state: sleeping }");
        assert!(
            e.contains("state") && e.contains("unknown variant `sleeping`"),
            "{e}"
        );
        let e = error_with(
            "    forwarding: l2\n    backends:\n      - { address: 198.51.100.11",
            "    forwarding: l2\n    on_all_down: panic\n    backends:\n      - { address: 198.51.100.11",
        );
        assert!(
            e.contains("on_all_down") && e.contains("unknown variant `panic`"),
            "{e}"
        );
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\nflow_table: { max_flows: 10 }",
        );
        assert!(
            e.contains("flow_table.max_flows") && e.contains("out of range"),
            "{e}"
        );
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\nflow_table: { udp_idle_timeout: 100ms }",
        );
        assert!(
            e.contains("flow_table.udp_idle_timeout") && e.contains("at least 1s"),
            "{e}"
        );
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\nadmin: { listen: localhost }",
        );
        assert!(
            e.contains("admin.listen") && e.contains("not an address:port"),
            "{e}"
        );
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\nadmin: { shutdown_grace: never }",
        );
        assert!(
            e.contains("admin.shutdown_grace") && e.contains("not a duration"),
            "{e}"
        );
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\nadmin: { max_connections: 0 }",
        );
        assert!(e.contains("admin.max_connections"), "{e}");
        let e = error_with(
            "xdp_mode: native",
            "xdp_mode: native\npin_path: relative/dir",
        );
        assert!(
            e.contains("pin_path") && e.contains("not an absolute path"),
            "{e}"
        );
    }

    #[test]
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(655373) && !is_prime(65535));
    }
}
