//! The `lb` binary run inside a namespace: what [`LbProcess`](super::LbProcess)
//! and [`DecapProcess`](super::DecapProcess) share.

use std::{
    ffi::OsStr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// The `lb` binary next to the running test or demo executable (cargo puts
/// both under target/<profile>/), or `$LB_BIN`.
pub fn lb_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_BIN") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join("lb"))
        .find(|p| p.is_file())
        .context("no `lb` binary beside this executable; run `cargo build -p lb-userspace` first")
}

/// `lb <args>` in a namespace's network stack only: `nsenter --net` keeps
/// the host's mounts, so pins under /sys/fs/bpf outlive the process (`ip
/// netns exec` would give it a /sys of its own). Each start appends the
/// process's stderr to one log file, kept for diagnostics and assertions.
pub(super) struct LbCommand {
    netns: String,
    log: PathBuf,
    child: Option<Child>,
}

impl LbCommand {
    pub(super) fn new(netns: &str, log: PathBuf) -> LbCommand {
        LbCommand {
            netns: netns.to_string(),
            log,
            child: None,
        }
    }

    pub(super) fn netns(&self) -> &str {
        &self.netns
    }

    fn command(&self, args: &[&OsStr]) -> anyhow::Result<Command> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(lb_binary()?)
            .args(args);
        Ok(command)
    }

    /// Starts `lb <args>` in the background with `RUST_LOG=rust_log`. It gets
    /// SIGKILL if the test process dies, so it never outlives it.
    pub(super) fn spawn(&mut self, args: &[&OsStr], rust_log: &str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = self.command(args)?;
        command
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log);
        crate::netns::die_with_parent(&mut command);
        self.child = Some(command.spawn().context("starting lb")?);
        Ok(())
    }

    /// Runs `lb <args>` to completion (a one-shot command such as `lb
    /// stop`); its standard output.
    pub(super) fn run(&self, args: &[&OsStr]) -> anyhow::Result<String> {
        let out = self.command(args)?.output().context("running lb")?;
        if !out.status.success() {
            bail!(
                "lb {:?} failed: {}",
                args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls `ready` every 20ms until it says yes; fails, with the log, if
    /// the process exits first or `timeout` passes. `what` names the
    /// awaited state in those errors.
    pub(super) fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Self) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready(self)? {
            if let Some(status) = self.exit_status() {
                bail!(
                    "lb exited with {status}, waiting until {what}:\n{}",
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!("waited {timeout:?} in vain until {what}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Everything every start logged so far.
    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, once the running process has exited.
    fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub(super) fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The running process, handed over (it is no longer this one's to kill).
    pub(super) fn take(&mut self) -> Option<Child> {
        self.child.take()
    }

    /// Kills the process with SIGKILL (no cleanup of any kind can run) and
    /// reaps it.
    pub(super) fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}
