//! The settings fixed at start-up: they size the maps the program is loaded
//! with, or say where it attaches, pins and listens. A reload that changes
//! any of them is refused, naming them.

use std::{net::SocketAddr, path::PathBuf};

use super::model::{Config, XdpMode};
use crate::loader::Sizes;

/// What must not change while `lb` runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixed {
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// The map sizes the program is loaded with.
    pub sizes: Sizes,
    pub pin_path: PathBuf,
    pub admin_listen: SocketAddr,
    pub admin_max_connections: u32,
}

impl Fixed {
    /// The settings that differ in `new`, named as the file names them.
    pub fn changed(&self, new: &Fixed) -> Vec<&'static str> {
        // Destructured, so a setting added to `Fixed` or `Sizes` cannot be
        // left out of this list.
        let Fixed {
            interface,
            xdp_mode,
            sizes:
                Sizes {
                    table_size,
                    max_vips,
                    max_flows,
                    max_flows_v6,
                    idle_evict,
                },
            pin_path,
            admin_listen,
            admin_max_connections,
        } = self;
        [
            ("interface", *interface != new.interface),
            ("xdp_mode", *xdp_mode != new.xdp_mode),
            ("maglev.table_size", *table_size != new.sizes.table_size),
            ("max_vips", *max_vips != new.sizes.max_vips),
            ("flow_table.max_flows", *max_flows != new.sizes.max_flows),
            (
                "flow_table.max_flows_v6",
                *max_flows_v6 != new.sizes.max_flows_v6,
            ),
            ("flow_table.idle_evict", *idle_evict != new.sizes.idle_evict),
            ("pin_path", *pin_path != new.pin_path),
            ("admin.listen", *admin_listen != new.admin_listen),
            (
                "admin.max_connections",
                *admin_max_connections != new.admin_max_connections,
            ),
        ]
        .into_iter()
        .filter_map(|(name, differs)| differs.then_some(name))
        .collect()
    }
}

impl Config {
    pub fn fixed(&self) -> Fixed {
        Fixed {
            interface: self.interface.clone(),
            xdp_mode: self.xdp_mode,
            sizes: self.sizes(),
            pin_path: self.pin_path.clone(),
            admin_listen: self.admin_listen,
            admin_max_connections: self.admin_max_connections,
        }
    }

    /// The map sizes to load the program with.
    pub fn sizes(&self) -> Sizes {
        Sizes {
            table_size: self.table_size,
            max_vips: self.max_vips,
            max_flows: self.max_flows,
            max_flows_v6: self.max_flows_v6,
            idle_evict: self.flow_idle_evict,
        }
    }
}
