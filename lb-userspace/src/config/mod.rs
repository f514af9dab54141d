//! The YAML configuration: parsed strictly (unknown fields are errors), then
//! validated into typed values. Nothing touches the kernel until a file has
//! passed both steps, so a bad file changes nothing.
//!
//! [`raw`] is what the file says, defaults included; [`validate`] turns it
//! into the [`model`] the program uses, or into [`Problem`]s naming their
//! field; [`fixed`] is what a reload must leave alone.

mod errors;
mod fixed;
mod model;
mod raw;
pub mod source;
#[cfg(test)]
mod tests;
mod validate;

use std::path::Path;

pub use errors::{ConfigError, Problem};
pub use fixed::Fixed;
pub use model::{
    Backend, BackendState, Bgp, Config, Forwarding, HealthCheck, HealthKind, OnAllDown, Protocol,
    Vip, XdpMode,
};
pub use raw::{
    DEFAULT_ADMIN_LISTEN, DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAX_VIPS, DEFAULT_PIN_ROOT,
    DEFAULT_TABLE_SIZE,
};
pub use validate::{
    FLOW_TABLE_SIZE_MAX, FLOW_TABLE_SIZE_MIN, TABLE_SIZE_MAX, TABLE_SIZE_MIN, WEIGHT_MAX,
};

impl Config {
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = source::read(file).map_err(|source| ConfigError::Read {
            file: file.to_owned(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates `text`; `file` only labels error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        source::check_bounds(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        let raw: raw::RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: e.to_string(),
        })?;
        validate::validate(raw).map_err(|problems| ConfigError::Invalid {
            file: file.to_owned(),
            problems,
        })
    }
}
