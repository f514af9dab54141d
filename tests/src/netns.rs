//! Uniquely named network namespaces that remove themselves, even when a test
//! panics, plus a way to run code (bind sockets, attach programs) inside one.

use std::{
    fs::File,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

/// Every namespace this crate creates starts with this, followed by the
/// creating process's pid, so leftovers of a killed run can be recognised.
const PREFIX: &str = "lbt-";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` (or any command) and fails with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Connects `a` and `b` with a veth pair: `a_dev` in `a`, `b_dev` in `b`
/// (both down).
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "link",
            "add",
            a_dev,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_dev,
            "netns",
            b.name(),
        ],
    )?;
    Ok(())
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `lbt-<pid>-<n>-<role>` with loopback up.
    pub fn new(role: &str) -> anyhow::Result<Netns> {
        sweep_leftovers();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("{PREFIX}{}-{n}-{role}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on a thread that has entered the namespace. Sockets and
    /// attachments made there stay in the namespace and may be used from any
    /// thread afterwards.
    pub fn enter<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        enter_named(&self.name, f)
    }

    /// Like [`enter`](Self::enter), but returns at once; the thread keeps
    /// running in the namespace.
    pub fn spawn<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<R>>> {
        spawn_named(&self.name, f)
    }
}

/// [`Netns::enter`] for a namespace known only by its name, as a process
/// started in it with `nsenter` knows it.
pub fn enter_named<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> anyhow::Result<R> {
    spawn_named(name, f)?
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {name} panicked"))?
}

fn spawn_named<R: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> R + Send + 'static,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<R>>> {
    let path = format!("/var/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    Ok(std::thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(f())
    }))
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth ends and their peers.
        if let Err(e) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("warning: {e}");
        }
    }
}

/// Removes what runs whose process no longer exists left behind (a test
/// binary killed with SIGKILL cannot clean up after itself): namespaces,
/// pinned lb state under /sys/fs/bpf, and scratch directories. Their `lb`
/// and Prometheus processes died with them (parent-death signal).
fn sweep_leftovers() {
    let dead = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = run("ip", &["netns", "list"]) {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if dead(name) {
                let _ = run("ip", &["netns", "delete", name]);
            }
        }
    }
    for entry in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        if dead(&entry.file_name().to_string_lossy()) {
            let _ = lb_userspace::loader::remove_pins(&entry.path());
        }
    }
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if dead(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Makes `command`'s process get SIGKILL when this process dies, so a test
/// killed with SIGKILL leaves no lb or Prometheus running.
pub fn die_with_parent(command: &mut Command) {
    let parent = std::process::id() as i32;
    // SAFETY: only async-signal-safe calls between fork and exec. The setting
    // survives exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(command, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
