//! Control plane of the load balancer: configuration, Maglev tables, the single
//! writer of the XDP program's maps, neighbour resolution and the `lb run` loop.

pub mod admin;
pub mod bgp;
pub mod change;
pub mod config;
pub mod dataplane;
pub mod decap;
pub mod fd_limit;
pub mod health;
pub mod loader;
pub mod maglev;
pub mod map_layout;
pub mod metrics;
pub mod model;
pub mod neighbour;
pub mod pins;
pub mod reconcile;
pub mod reload;
pub mod run;
pub mod status;
pub mod xdp_owner;
