//! `lb decap` on a backend.

use std::{ffi::OsStr, path::PathBuf, time::Duration};

use anyhow::Context as _;

use super::process::LbCommand;
use crate::netns::Netns;

/// The interface `lb decap` attaches to in every backend.
const INTERFACE: &str = "eth0";

/// `lb decap` on a backend's `eth0`, with its own pin directory and log;
/// killed and its pins removed on drop.
pub struct DecapProcess {
    decap: LbCommand,
    pin: PathBuf,
    dir: PathBuf,
}

impl DecapProcess {
    /// Starts `lb decap` in `ns` and waits until it has attached.
    pub fn start(ns: &Netns) -> anyhow::Result<DecapProcess> {
        let dir = std::env::temp_dir().join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let mut d = DecapProcess {
            decap: LbCommand::new(ns.name(), dir.join("decap.log")),
            pin: PathBuf::from("/sys/fs/bpf").join(ns.name()),
            dir,
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts `lb decap` (again, after [`kill9`](Self::kill9)) and waits
    /// until its program is the one on the interface. `lb decap` has no admin
    /// listener; a fresh start attaches a program where none was, a restart
    /// swaps its own into the pinned link: either way the interface's XDP
    /// program changes.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let before = self.attached_program()?;
        let pin = self.pin.clone();
        self.decap.spawn(
            &[
                OsStr::new("decap"),
                OsStr::new("--interface"),
                OsStr::new(INTERFACE),
                OsStr::new("--pin-path"),
                pin.as_os_str(),
            ],
            "info",
        )?;
        self.decap
            .wait_until("lb decap has attached", Duration::from_secs(20), |decap| {
                Ok(xdp_program(decap.netns())? != before)
            })
    }

    /// The id of the XDP program on the interface, if any.
    fn attached_program(&self) -> anyhow::Result<Option<u64>> {
        xdp_program(self.decap.netns())
    }

    pub fn log(&self) -> String {
        self.decap.log()
    }

    pub fn kill9(&mut self) {
        let _ = self.decap.kill9();
    }

    /// Runs `lb decap --stop` for this instance.
    pub fn stop(&self) -> anyhow::Result<String> {
        self.decap.run(&[
            OsStr::new("decap"),
            OsStr::new("--interface"),
            OsStr::new(INTERFACE),
            OsStr::new("--pin-path"),
            self.pin.as_os_str(),
            OsStr::new("--stop"),
        ])
    }
}

impl Drop for DecapProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = lb_userspace::loader::remove_pins_of(&self.pin, &lb_common::decap::map_names::ALL);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The id of the XDP program on [`INTERFACE`] in namespace `netns`, as
/// `ip -j link` reports it.
fn xdp_program(netns: &str) -> anyhow::Result<Option<u64>> {
    let out = crate::netns::run("ip", &["-n", netns, "-j", "link", "show", "dev", INTERFACE])?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).context("ip -j link")?;
    Ok(links[0]["xdp"]["prog"]["id"].as_u64())
}
