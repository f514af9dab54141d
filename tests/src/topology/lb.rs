//! `lb run` in the load balancer's namespace.

use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_userspace::{config::Config, status::Status};

use super::process::LbCommand;
use crate::http;
use crate::netns::Netns;

/// The message lb logs once its program is attached.
const ATTACHED: &str = "lb_userspace::run: attached ";

/// How long lb may take to become ready. Start-up waits up to 3s for
/// backends' MACs; the rest is headroom for a loaded machine.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// An `lb run` in the load balancer's namespace, with its own config file,
/// log and bpffs pin directory. On drop it is killed and its pins removed
/// (which detaches the program).
pub struct LbProcess {
    lb: LbCommand,
    dir: PathBuf,
    pin: PathBuf,
    /// Where its admin listener is reached (fixed while lb runs).
    admin: SocketAddr,
}

impl LbProcess {
    /// Writes `config` and starts `lb run` with it, without waiting.
    pub(super) fn start(ns: &Netns, config: &str) -> anyhow::Result<LbProcess> {
        let dir = std::env::temp_dir().join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let mut lb = LbProcess {
            lb: LbCommand::new(ns.name(), dir.join("lb.log")),
            pin: PathBuf::from("/sys/fs/bpf").join(ns.name()),
            dir,
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        };
        lb.write_config(config)?;
        lb.admin = lb.admin_address()?;
        lb.spawn()?;
        Ok(lb)
    }

    /// How many times lb logged that it attached (for assertions; waiting
    /// asks `/ready`).
    pub fn attach_count(&self) -> usize {
        self.log().matches(ATTACHED).count()
    }

    /// Waits until lb's admin listener answers `GET /ready` with 200: its
    /// program is attached and the config applied.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let url = format!("http://{}/ready", self.admin);
        self.lb.wait_until("lb is ready", READY_TIMEOUT, |lb| {
            answers_200(lb.netns(), &url)
        })
    }

    /// Where lb's admin listener is reached from inside its namespace: the
    /// configured `admin.listen`, through loopback when that is a wildcard.
    /// Read at start: later files may be invalid on purpose.
    fn admin_address(&self) -> anyhow::Result<SocketAddr> {
        let config = Config::load(&self.config_path())?;
        let mut admin = config.admin_listen;
        if admin.ip().is_unspecified() {
            admin.set_ip(match admin.ip() {
                IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
            });
        }
        Ok(admin)
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.yaml")
    }

    pub fn pin_path(&self) -> &Path {
        &self.pin
    }

    /// Writes `config` (plus this instance's pin_path) where `lb` reads it;
    /// returns the text written.
    pub fn write_config(&self, config: &str) -> anyhow::Result<String> {
        let text = format!("{}\npin_path: {}\n", config.trim_end(), self.pin.display());
        // Write then rename, so lb never reads a half-written file.
        let tmp = self.dir.join("lb.yaml.new");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(text)
    }

    /// Starts `lb run`; see [`wait_ready`](Self::wait_ready).
    fn spawn(&mut self) -> anyhow::Result<()> {
        let config = self.config_path();
        self.lb.spawn(
            &[
                OsStr::new("run"),
                OsStr::new("--config"),
                config.as_os_str(),
            ],
            "debug",
        )
    }

    /// Everything every `lb` of this instance logged so far.
    pub fn log(&self) -> String {
        self.lb.log()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.lb.pid().context("lb is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// `GET /status`, asked from inside lb's namespace.
    pub fn status(&self) -> anyhow::Result<Status> {
        let url = format!("http://{}/status", self.admin);
        let (code, body) = http::get_in(self.lb.netns(), &url, Duration::from_secs(5))?;
        anyhow::ensure!(code == 200, "/status answered {code}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Writes `config`, sends SIGHUP and waits (on `/status`) until lb
    /// either applied it (its SHA-256 is the applied config's) or rejected
    /// it (one more reload failure; the error is returned).
    pub fn reload(&self, config: &str) -> anyhow::Result<Result<(), String>> {
        let failures = self.status()?.config.reload_failures;
        let text = self.write_config(config)?;
        let wanted = lb_userspace::reload::digest(&text);
        self.sighup()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status()?;
            if status.config.applied_sha256 == wanted {
                return Ok(Ok(()));
            }
            if status.config.reload_failures > failures {
                return Ok(Err(status.config.last_error.unwrap_or_default()));
            }
            if Instant::now() > deadline {
                bail!("no reload within 10s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks lb to reload its config.
    pub fn sighup(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGHUP)
    }

    /// Kills lb with SIGKILL: no cleanup of any kind can run.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.lb.kill9()
    }

    /// Starts lb again with the same config and pin directory, and waits
    /// until it is ready.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready()
    }

    pub fn is_running(&mut self) -> bool {
        self.lb.is_running()
    }

    pub fn pid(&self) -> Option<u32> {
        self.lb.pid()
    }

    /// Sends SIGTERM and waits for the exit (see [`wait_exit`](Self::wait_exit)).
    /// The pinned state stays (and with it forwarding) unless lb was started
    /// to detach.
    pub fn terminate(&mut self) -> anyhow::Result<(ExitStatus, String)> {
        self.signal(nix::sys::signal::Signal::SIGTERM)?;
        self.wait_exit()
    }

    /// Waits (at most 10s) for lb to exit; returns the exit status and
    /// everything logged.
    pub fn wait_exit(&mut self) -> anyhow::Result<(ExitStatus, String)> {
        let mut child = self.lb.take().context("lb is not running")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok((status, self.log()));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("lb did not exit within 10s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A raw global counter (a pass/drop reason, flow result or forwarding
    /// action), read from the pinned `STATS` map and summed over CPUs.
    pub fn stat(&self, stat: lb_common::Stat) -> anyhow::Result<u64> {
        let path = self.pin.join("maps").join(lb_common::map_names::STATS);
        let data = aya::maps::MapData::from_pin(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let map = aya::maps::PerCpuArray::<_, lb_common::StatBlock>::try_from(
            aya::maps::Map::PerCpuArray(data),
        )?;
        Ok(map
            .get(&0, 0)?
            .iter()
            .map(|block| block[stat as usize])
            .sum())
    }

    /// Runs `lb stop` for this instance's config.
    pub fn lb_stop(&self) -> anyhow::Result<String> {
        let config = self.config_path();
        self.lb.run(&[
            OsStr::new("stop"),
            OsStr::new("--config"),
            config.as_os_str(),
        ])
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
        if let Err(e) = lb_userspace::loader::remove_pins(&self.pin) {
            eprintln!("warning: removing {}: {e}", self.pin.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `GET url` answers 200, asked from inside namespace `netns` (the
/// admin listener usually listens on that namespace's loopback). Refused or
/// failed connections count as no: the listener may not be up yet.
fn answers_200(netns: &str, url: &str) -> anyhow::Result<bool> {
    Ok(http::get_in(netns, url, Duration::from_secs(2)).is_ok_and(|(code, _)| code == 200))
}

/// `detection_to_swap_us` of the table swaps `lb` logged in `log` (one line
/// per transition a swap carries), after `backend` (if given) went up or
/// down (if `up` says which). These are measurements, not waits.
pub fn swaps_of(log: &str, backend: Option<IpAddr>, up: Option<bool>) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("table swapped"))
        .filter(|l| backend.is_none_or(|b| l.contains(&format!("backend={b} "))))
        .filter(|l| up.is_none_or(|up| l.contains(&format!("up={up} "))))
        .filter_map(|l| {
            l.split("detection_to_swap_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}
