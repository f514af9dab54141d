//! Real BGP daemons from Debian in test namespaces: FRR (`zebra` + `bgpd`)
//! as the router, ExaBGP running `lb bgp-feed` on each load balancer. Each
//! runs in the foreground as a child of the test (it dies with it) and is
//! stopped, by its own process id, when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, run};

/// The programs the BGP tests need, and the package that has them.
pub const DAEMONS: [(&str, &str); 4] = [
    ("/usr/lib/frr/zebra", "frr"),
    ("/usr/lib/frr/bgpd", "frr"),
    ("/usr/bin/vtysh", "frr"),
    ("/usr/sbin/exabgp", "exabgp"),
];

/// The daemon programs that are missing, as `program (package)`.
pub fn missing_daemons() -> Vec<String> {
    DAEMONS
        .iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .map(|(p, pkg)| format!("{p} ({pkg})"))
        .collect()
}

/// A foreground daemon in a namespace (`nsenter --net`, so the child is the
/// daemon itself), its output appended to `log`.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(
        ns: &Netns,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Daemon> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", ns.name()))
            .arg(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        crate::netns::die_with_parent(&mut command);
        let child = command
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok(Daemon { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then SIGKILL after 3 s.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A scratch directory named for the namespace, removed on drop.
fn scratch(ns: &Netns, what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{}-{what}", ns.name()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// FRR's `zebra` and `bgpd` in a router namespace.
pub struct Frr {
    // Stopped in this order: bgpd, then zebra.
    bgpd: Daemon,
    zebra: Daemon,
    dir: PathBuf,
}

impl Frr {
    /// Starts zebra, then bgpd with `bgpd_conf`.
    pub fn start(ns: &Netns, bgpd_conf: &str) -> anyhow::Result<Frr> {
        let dir = scratch(ns, "frr")?;
        let d = dir.display();
        std::fs::write(dir.join("zebra.conf"), "hostname router\n")?;
        std::fs::write(dir.join("bgpd.conf"), bgpd_conf)?;
        // The daemons drop to user frr and must write their sockets here.
        run("chown", &["-R", "frr:frr", &d.to_string()])?;
        let common = |name: &str| {
            vec![
                "-f".to_string(),
                format!("{d}/{name}.conf"),
                "-i".into(),
                format!("{d}/{name}.pid"),
                "-z".into(),
                format!("{d}/zserv.api"),
                "--vty_socket".into(),
                d.to_string(),
            ]
        };
        let args = common("zebra");
        let zebra = Daemon::start(
            ns,
            "/usr/lib/frr/zebra",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            dir.join("zebra.log"),
        )?;
        wait_for(&dir.join("zserv.api"), Duration::from_secs(10))?;
        let args = common("bgpd");
        let bgpd = Daemon::start(
            ns,
            "/usr/lib/frr/bgpd",
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            &[],
            dir.join("bgpd.log"),
        )?;
        Ok(Frr { bgpd, zebra, dir })
    }

    /// `vtysh -c command`'s output.
    pub fn vtysh(&self, command: &str) -> anyhow::Result<String> {
        let out = run(
            "vtysh",
            &[
                "--vty_socket",
                &self.dir.display().to_string(),
                "-c",
                command,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn log(&self) -> String {
        format!("{}{}", self.zebra.log(), self.bgpd.log())
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        self.bgpd.stop();
        self.zebra.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(path: &Path, patience: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + patience;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {patience:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// ExaBGP on a load balancer, its `process` being `lb bgp-feed`.
pub struct ExaBgp {
    daemon: Daemon,
    dir: PathBuf,
}

/// One BGP session of an ExaBGP instance.
pub struct Session {
    pub peer: std::net::IpAddr,
    pub local: std::net::IpAddr,
}

impl ExaBgp {
    /// Starts ExaBGP in `ns` as AS `local_as` with `router_id`, one session
    /// per entry of `sessions` (each carrying its own family) to AS
    /// `peer_as`, hold time 3 s; its process runs `lb bgp-feed --admin
    /// admin`.
    pub fn start(
        ns: &Netns,
        router_id: std::net::Ipv4Addr,
        local_as: u32,
        peer_as: u32,
        sessions: &[Session],
        admin: std::net::SocketAddr,
    ) -> anyhow::Result<ExaBgp> {
        let dir = scratch(ns, "exabgp")?;
        let d = dir.display();
        let lb = crate::topology::lb_binary()?;
        // ExaBGP mangles quoted arguments of a `run` line: a wrapper script
        // holds the command. It records its pid, which `exec` keeps.
        let feed = format!(
            "#!/bin/sh\necho $$ > {d}/feed.pid\nRUST_LOG=info exec {} bgp-feed --admin {admin} 2>>{d}/feed.log\n",
            lb.display()
        );
        let script = dir.join("feed.sh");
        std::fs::write(&script, feed)?;
        run("chmod", &["+x", &script.display().to_string()])?;
        let mut conf = format!(
            "process feed {{\n    run {};\n    encoder text;\n}}\n",
            script.display()
        );
        for s in sessions {
            let family = if s.peer.is_ipv4() { "ipv4" } else { "ipv6" };
            conf += &format!(
                "neighbor {} {{\n    router-id {router_id};\n    local-address {};\n    \
                 local-as {local_as};\n    peer-as {peer_as};\n    hold-time 3;\n    \
                 family {{ {family} unicast; }}\n    api {{ processes [ feed ]; }}\n}}\n",
                s.peer, s.local
            );
        }
        let conf_path = dir.join("exabgp.conf");
        std::fs::write(&conf_path, conf)?;
        let daemon = Daemon::start(
            ns,
            "/usr/sbin/exabgp",
            &[&conf_path.display().to_string()],
            &[
                ("exabgp_daemon_user", "root"),
                ("exabgp_daemon_daemonize", "false"),
                ("exabgp_log_destination", "stdout"),
            ],
            dir.join("exabgp.log"),
        )?;
        Ok(ExaBgp { daemon, dir })
    }

    /// The running feed's process id, once it started.
    pub fn feed_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.dir.join("feed.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// ExaBGP's log and the feed's.
    pub fn log(&self) -> String {
        let feed = std::fs::read_to_string(self.dir.join("feed.log")).unwrap_or_default();
        format!("{}\n--- feed ---\n{feed}", self.daemon.log())
    }
}

impl Drop for ExaBgp {
    fn drop(&mut self) {
        self.daemon.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
