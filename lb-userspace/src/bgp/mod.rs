//! Announcing VIPs over BGP, so a router spreads their traffic over every
//! instance by ECMP. `lb run` decides per VIP whether this instance should
//! attract its traffic ([`decision`]) and shows that in `/status`; `lb
//! bgp-feed` ([`feed`]), started by ExaBGP, follows `/status` and speaks
//! ExaBGP's text API ([`exabgp`]). A SIGTERM drains first ([`shutdown`]).

pub mod decision;
pub mod exabgp;
pub mod feed;
pub mod shutdown;

pub use decision::{Decider, Fitness, Phase, Reason, VipBgp};

use lb_common::VipKey;

use crate::{
    config::{BackendState, Config},
    model::{Health, is_up},
};

/// What the decision needs of each VIP of `config`.
pub fn fitness(config: &Config, health: &Health, ready: bool) -> Vec<(VipKey, Fitness)> {
    config
        .vips
        .iter()
        .map(|v| {
            let healthy = v
                .backends
                .iter()
                .filter(|b| b.state == BackendState::Active && is_up(health, v.key, b.address))
                .count();
            let fit = Fitness {
                ready,
                enabled: v.announce,
                healthy,
            };
            (v.key, fit)
        })
        .collect()
}
