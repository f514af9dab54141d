//! Tests of [`Reconciler`] over a [`FakeDataplane`], which records every map
//! write: what each apply writes and in which order.

mod backends;
mod grace;
mod lifecycle;
mod tables;

use std::{net::IpAddr, path::Path, time::Duration};

use lb_common::{
    BACKEND_F_KEEP_FLOWS, BACKEND_F_RESOLVED, BackendEntry, FORWARD_IP6, FORWARD_L2, key_addr,
};

use super::entries::NO_VIP;
use super::*;
use crate::{config::Config, dataplane::fake::FakeDataplane, model::Neighbour};

const M: u32 = 251;

fn config_with(web_backends: &str, on_all_down: &str) -> Config {
    let text = format!(
        "interface: eth0\nmaglev: {{ table_size: {M}, seed: 7 }}\nvips:\n\
         - name: web\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: l2\n  \
         on_all_down: {on_all_down}\n  backends:\n{web_backends}\
         - name: dns\n  address: 10.0.0.100\n  port: 53\n  protocol: udp\n  forwarding: l2\n  backends:\n\
         \x20   - {{ address: 10.0.0.11, weight: 1 }}\n"
    );
    Config::parse(&text, Path::new("t.yaml")).expect("valid")
}

fn backends(list: &[(u8, u32, &str)]) -> String {
    list.iter()
        .map(|(i, w, state)| {
            format!("    - {{ address: 10.0.0.{i}, weight: {w}, state: {state} }}\n")
        })
        .collect()
}

fn config(extra_backend: bool, weight: u32) -> Config {
    let mut list = vec![(11, weight, "active"), (12, 1, "active")];
    if extra_backend {
        list.push((13, 1, "active"));
    }
    config_with(&backends(&list), "fail_open")
}

fn ip(i: u8) -> IpAddr {
    IpAddr::from([10, 0, 0, i])
}

fn neighbours() -> Neighbours {
    [11u8, 12, 13]
        .into_iter()
        .map(|i| {
            (
                ip(i),
                Neighbour {
                    ifindex: 2,
                    mac: [2, 0, 0, 0, 0, i],
                    src_mac: [2; 6],
                    src_addr: None,
                    mtu: 0,
                },
            )
        })
        .collect()
}

fn all_up() -> Health {
    Health::new()
}

fn down(c: &Config, addrs: &[u8]) -> Health {
    let key = c.vips[0].key;
    addrs.iter().map(|&i| ((key, ip(i)), false)).collect()
}

/// The swap of `web` expected in these tests (VIP key of `config`).
fn swap(name: &str, members: usize, all_down: bool) -> Swap {
    let vip = config(false, 1).vips[0].key;
    Swap {
        vip,
        name: name.into(),
        members,
        all_down,
        build: Duration::ZERO,
    }
}

/// A reconciler over fake maps with no swap grace: these tests are about
/// what gets written, back to back; `grace.rs` is about when.
fn reconciler() -> Reconciler<FakeDataplane> {
    Reconciler::new(FakeDataplane::default(), M, 4).with_swap_grace(Duration::ZERO)
}

/// The backend address each slot of the first VIP's table leads to, as
/// the pure builder gives it (all backends healthy).
fn planned_addresses(c: &Config) -> Vec<Option<IpAddr>> {
    let (_, table) = &plan(c)[0];
    table
        .slots
        .iter()
        .map(|&s| Some(table.backends[s as usize].address))
        .collect()
}

/// The backend address each slot of the VIP's active table leads to.
fn active_addresses(r: &Reconciler<FakeDataplane>, vip: &Vip) -> Vec<Option<IpAddr>> {
    let dp = r.dataplane();
    dp.active_table(&vip.key)
        .expect("table written")
        .iter()
        .map(|id| dp.backends.get(id).map(|e| key_addr(e.addr)))
        .collect()
}

fn entry_of(r: &Reconciler<FakeDataplane>, c: &Config, i: u8) -> BackendEntry {
    let id = r.applied.backend_ids[&(c.vips[0].key, ip(i))];
    r.dataplane().backends[&id]
}
