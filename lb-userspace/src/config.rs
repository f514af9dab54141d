//! The YAML configuration: parsed strictly (unknown fields are errors), then
//! validated into typed values. Nothing touches the kernel until a file has
//! passed both steps, so a bad file changes nothing.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
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
    vips: Vec<RawVip>,
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
    backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    weight: i64,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub interface: String,
    pub xdp_mode: XdpMode,
    pub table_size: u32,
    pub seed: u32,
    /// Capacity reserved for VIPs (sizes the Maglev table map at load time).
    pub max_vips: u32,
    pub vips: Vec<Vip>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub name: String,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub forwarding: Forwarding,
    pub backends: Vec<Backend>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub weight: u32,
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

    if raw.interface.is_empty() || raw.interface.len() >= libc::IF_NAMESIZE {
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
        let address = parse_v4(&mut p, &format!("{at}.address"), &v.address);
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
                format!("duplicate VIP {a}:{port}/{}", v.protocol),
            );
        }

        if v.backends.is_empty() {
            p.add(format!("{at}.backends"), "must list at least one backend");
        }
        let mut seen = HashSet::new();
        let mut backends = Vec::with_capacity(v.backends.len());
        for (j, b) in v.backends.into_iter().enumerate() {
            let bat = format!("{at}.backends[{j}]");
            let address = parse_v4(&mut p, &format!("{bat}.address"), &b.address);
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
                backends.push(Backend {
                    address,
                    weight: b.weight.clamp(1, WEIGHT_MAX) as u32,
                });
            }
        }
        backend_count += backends.len();
        if let (Some(address), Some(port)) = (address, port) {
            vips.push(Vip {
                name: v.name,
                address,
                port,
                protocol: v.protocol,
                forwarding: v.forwarding,
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

    if !p.0.is_empty() {
        return Err(p.0);
    }
    Ok(Config {
        interface: raw.interface,
        xdp_mode: raw.xdp_mode,
        table_size: table_size as u32,
        seed: seed as u32,
        max_vips: max_vips as u32,
        vips,
    })
}

fn parse_v4(p: &mut Problems, field: &str, text: &str) -> Option<Ipv4Addr> {
    match text.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Some(a),
        Ok(IpAddr::V6(_)) => {
            p.add(field, format!("`{text}`: IPv6 is not supported yet"));
            None
        }
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
        assert_eq!(c.vips[0].address, Ipv4Addr::new(192, 0, 2, 10));
        assert_eq!(c.vips[1].protocol, Protocol::Udp);
        assert_eq!(
            c.vips[0].backends[1],
            Backend {
                address: Ipv4Addr::new(198, 51, 100, 12),
                weight: 100
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
        let e = error_with("address: 192.0.2.10", "address: 2001:db8::1");
        assert!(e.contains("vips[0].address") && e.contains("IPv6"), "{e}");
    }

    #[test]
    fn rejects_a_bad_port() {
        let e = error_with("port: 80", "port: 0");
        assert!(e.contains("vips[0].port"), "{e}");
        let e = error_with("port: 80", "port: 65536");
        assert!(e.contains("vips[0].port"), "{e}");
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
    fn primes() {
        let primes: Vec<u32> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(primes, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65537) && is_prime(655373) && !is_prime(65535));
    }
}
