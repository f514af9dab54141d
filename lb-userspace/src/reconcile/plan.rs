//! What each VIP should look like, computed from the config and backend
//! health alone: no map, no id, no clock.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::VipKey;

use crate::{
    config::{Backend, BackendState, Config, OnAllDown, Vip},
    maglev::{self, Weighted},
};

/// What one VIP should look like given backend health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPlan {
    /// Backends that take new flows (the Maglev table's input), sorted.
    pub members: Vec<Weighted>,
    /// Backends whose established flows stay.
    pub keep_flows: BTreeSet<IpAddr>,
    /// No active backend is healthy.
    pub all_down: bool,
}

/// Applies the backend states, health and the VIP's all-down policy.
pub fn plan_vip(vip: &Vip, up: impl Fn(IpAddr) -> bool) -> VipPlan {
    let active = |b: &&Backend| b.state == BackendState::Active;
    let all_down = !vip.backends.iter().filter(active).any(|b| up(b.address));
    let fail_open = all_down && vip.on_all_down == OnAllDown::FailOpen;
    let mut members: Vec<Weighted> = vip
        .backends
        .iter()
        .filter(active)
        .filter(|b| if all_down { fail_open } else { up(b.address) })
        .map(|b| Weighted {
            address: b.address,
            weight: b.weight,
        })
        .collect();
    members.sort_by_key(|b| b.address);
    let keep_flows = vip
        .backends
        .iter()
        .filter(|b| b.state != BackendState::Disabled && (up(b.address) || fail_open))
        .map(|b| b.address)
        .collect();
    VipPlan {
        members,
        keep_flows,
        all_down,
    }
}

/// The Maglev table each VIP of `config` gets with every backend healthy
/// (for `check-config`).
pub fn plan(config: &Config) -> Vec<(&Vip, maglev::Table)> {
    config
        .vips
        .iter()
        .map(|v| {
            let members = plan_vip(v, |_| true).members;
            (v, maglev::build(&members, config.table_size, config.seed))
        })
        .collect()
}

/// Every (VIP, backend) pair of `config`.
pub fn backend_keys(config: &Config) -> BTreeSet<(VipKey, IpAddr)> {
    config
        .vips
        .iter()
        .flat_map(|v| v.backends.iter().map(move |b| (v.key, b.address)))
        .collect()
}
