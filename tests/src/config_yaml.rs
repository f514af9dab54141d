//! The packet tier's load-balancer configs, written as the YAML an operator
//! writes (the harness parses them with the real config parser): the
//! `web` (TCP) and `dns` (UDP) VIPs of the address plan, their backends and
//! the few settings the tests vary.

use std::{fmt, net::IpAddr};

use crate::addresses::{TCP_PORT, UDP_PORT};

/// A whole config on `lo`, the interface BPF_PROG_TEST_RUN runs on.
#[derive(Clone, Debug)]
pub struct ConfigYaml {
    table_size: u32,
    max_vips: Option<u32>,
    udp_idle_timeout: Option<&'static str>,
    max_flows: Option<u32>,
    vips: Vec<VipYaml>,
}

impl ConfigYaml {
    /// A Maglev table of 65537 slots with the tests' fixed seed, so expected
    /// backends and flow labels can be computed from it.
    pub fn new(vips: impl IntoIterator<Item = VipYaml>) -> ConfigYaml {
        ConfigYaml {
            table_size: 65537,
            max_vips: None,
            udp_idle_timeout: None,
            max_flows: None,
            vips: vips.into_iter().collect(),
        }
    }

    pub fn table_size(mut self, slots: u32) -> Self {
        self.table_size = slots;
        self
    }

    pub fn max_vips(mut self, n: u32) -> Self {
        self.max_vips = Some(n);
        self
    }

    pub fn udp_idle_timeout(mut self, duration: &'static str) -> Self {
        self.udp_idle_timeout = Some(duration);
        self
    }

    /// `flow_table.max_flows` (and so `max_flows_v6`, which defaults to it).
    pub fn max_flows(mut self, n: u32) -> Self {
        self.max_flows = Some(n);
        self
    }
}

/// The Maglev seed every packet-tier config uses.
pub const SEED: u32 = 0x5eed;

impl fmt::Display for ConfigYaml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "interface: lo")?;
        writeln!(
            f,
            "maglev: {{ table_size: {}, seed: {SEED:#x} }}",
            self.table_size
        )?;
        if let Some(n) = self.max_vips {
            writeln!(f, "max_vips: {n}")?;
        }
        let flow_table: Vec<String> = [
            self.udp_idle_timeout
                .map(|t| format!("udp_idle_timeout: {t}")),
            self.max_flows.map(|n| format!("max_flows: {n}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !flow_table.is_empty() {
            writeln!(f, "flow_table: {{ {} }}", flow_table.join(", "))?;
        }
        writeln!(f, "vips:")?;
        self.vips.iter().try_for_each(|v| write!(f, "{v}"))
    }
}

/// One VIP: `forwarding: l2` unless told otherwise.
#[derive(Clone, Debug)]
pub struct VipYaml {
    name: String,
    address: IpAddr,
    port: u16,
    protocol: &'static str,
    forwarding: &'static str,
    /// `key: value` lines, in order.
    settings: Vec<String>,
    backends: Vec<String>,
}

/// `web`: TCP port 80 on `address` (`web6` for an IPv6 address).
pub fn web(address: impl Into<IpAddr>) -> VipYaml {
    VipYaml::new("web", address.into(), TCP_PORT, "tcp")
}

/// `dns`: UDP port 5353 on `address` (`dns6` for an IPv6 address).
pub fn dns(address: impl Into<IpAddr>) -> VipYaml {
    VipYaml::new("dns", address.into(), UDP_PORT, "udp")
}

impl VipYaml {
    fn new(name: &str, address: IpAddr, port: u16, protocol: &'static str) -> VipYaml {
        let family = if address.is_ipv6() { "6" } else { "" };
        VipYaml {
            name: format!("{name}{family}"),
            address,
            port,
            protocol,
            forwarding: "l2",
            settings: Vec::new(),
            backends: Vec::new(),
        }
    }

    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// `forwarding: ipip`: to routed backends in an outer IP header.
    pub fn ipip(mut self) -> Self {
        self.forwarding = "ipip";
        self
    }

    /// A VIP setting line, `key: value`.
    pub fn setting(mut self, key: &str, value: impl fmt::Display) -> Self {
        self.settings.push(format!("{key}: {value}"));
        self
    }

    /// Backends of weight 1.
    pub fn backends<A: Into<IpAddr>>(self, addrs: impl IntoIterator<Item = A>) -> Self {
        addrs
            .into_iter()
            .fold(self, |v, a| v.backend(a.into(), 1, None))
    }

    /// A backend of `weight`, in `state` when given (else active, by default).
    pub fn backend(mut self, address: IpAddr, weight: u32, state: Option<&str>) -> Self {
        let state = state.map_or(String::new(), |s| format!(", state: {s}"));
        self.backends.push(format!(
            "{{ address: \"{address}\", weight: {weight}{state} }}"
        ));
        self
    }
}

impl fmt::Display for VipYaml {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  - name: {}", self.name)?;
        writeln!(f, "    address: \"{}\"", self.address)?;
        writeln!(f, "    port: {}", self.port)?;
        writeln!(f, "    protocol: {}", self.protocol)?;
        writeln!(f, "    forwarding: {}", self.forwarding)?;
        for s in &self.settings {
            writeln!(f, "    {s}")?;
        }
        writeln!(f, "    backends:")?;
        for b in &self.backends {
            writeln!(f, "      - {b}")?;
        }
        Ok(())
    }
}
