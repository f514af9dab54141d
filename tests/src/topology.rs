//! The L2 direct-server-return topology: a client, the load balancer and
//! backends on one bridge, each in its own namespace.
//!
//! ```text
//!   client 10.77.0.2 ─┐
//!   lb     10.77.0.3 ─┼─ br0 (namespace "sw")
//!   b1..bN 10.77.0.11+┘   backends hold the VIP 10.77.0.100 on lo
//! ```
//! The client routes the VIP via the load balancer; the load balancer's
//! namespace does not forward IP, so only the XDP program's MAC rewrite can
//! deliver a packet to a backend, and backends answer the client directly.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use crate::netns::Netns;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const LB: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 5353;

/// The i-th backend's address (10.77.0.11, .12, ...).
pub fn backend_address(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 11 + i as u8)
}

pub struct Backend {
    pub name: String,
    pub address: Ipv4Addr,
    pub ns: Netns,
}

/// Fields drop in declaration order: servers and the load balancer stop
/// before the namespaces they live in are deleted.
pub struct L2Topology {
    servers: Vec<Server>,
    _peer_pass: Ebpf,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    _switch: Netns,
}

impl L2Topology {
    /// Builds the topology with one backend per name, each running a TCP
    /// server on VIP:80 and a UDP server on VIP:5353 that answer with the
    /// backend's name.
    pub fn new(backend_names: &[&str]) -> anyhow::Result<L2Topology> {
        let switch = Netns::new("sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;

        let client = Netns::new("client")?;
        plug(&switch, &client, "p-client", CLIENT)?;
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", &LB.to_string()])?;
        // veth leaves TCP/UDP checksums for "later"; XDP_TX drops that
        // promise, so the client must send complete checksums (a real NIC
        // would finish them in hardware).
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;

        let lb = Netns::new("lb")?;
        plug(&switch, &lb, "p-lb", LB)?;
        lb.sysctl("net.ipv4.ip_forward", "0")?;
        // veth drops frames XDP_TX sends into it unless the peer runs an XDP
        // program; a trivial XDP_PASS on the bridge port is enough.
        let peer_pass = switch.enter(|| attach_pass("p-lb"))??;

        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (i, name) in backend_names.iter().enumerate() {
            let ns = Netns::new(name)?;
            let address = backend_address(i);
            plug(&switch, &ns, &format!("p-{name}"), address)?;
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            // Hold the VIP without answering ARP for it or using it as an ARP
            // source: only the load balancer attracts VIP traffic.
            for dev in ["all", "eth0"] {
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
            }
            servers.push(Server::start(&ns, name)?);
            backends.push(Backend {
                name: name.to_string(),
                address,
                ns,
            });
        }

        Ok(L2Topology {
            servers,
            _peer_pass: peer_pass,
            client,
            lb,
            backends,
            _switch: switch,
        })
    }

    /// Starts `lb run` inside the load balancer's namespace with `config` and
    /// waits until the program is attached.
    pub fn start_lb(&self, config: &str) -> anyhow::Result<LbProcess> {
        LbProcess::start(&self.lb, config)
    }

    /// Connections each backend's servers answered so far.
    pub fn served(&self) -> Vec<(String, usize)> {
        self.servers
            .iter()
            .map(|s| (s.name.clone(), s.served.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Connects `ns` to the bridge in `switch` with a veth pair: `eth0` in `ns`
/// with `addr/24`, `port` in the switch.
fn plug(switch: &Netns, ns: &Netns, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    crate::netns::run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            switch.name(),
        ],
    )?;
    switch.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    Ok(())
}

fn attach_pass(interface: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(lb_userspace::loader::BASELINE_OBJECT)?;
    let prog: &mut Xdp = ebpf
        .program_mut("xdp_pass")
        .context("xdp_pass missing")?
        .try_into()?;
    prog.load()?;
    prog.attach(interface, XdpMode::Driver)?;
    Ok(ebpf)
}

/// A backend's TCP and UDP servers: each answers with the backend's name.
struct Server {
    name: String,
    served: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, name: &str) -> anyhow::Result<Server> {
        let (tcp, udp) = ns.enter(|| -> std::io::Result<(TcpListener, UdpSocket)> {
            Ok((
                TcpListener::bind(SocketAddr::from((VIP, TCP_PORT)))?,
                UdpSocket::bind(SocketAddr::from((VIP, UDP_PORT)))?,
            ))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reply = name.as_bytes().to_vec();

        let tcp_thread = {
            let (stop, served, reply) = (stop.clone(), served.clone(), reply.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            if conn.write_all(&reply).is_ok() {
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(1)),
                    }
                }
            })
        };
        let udp_thread = {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = udp.recv_from(&mut buf)
                        && udp.send_to(&reply, from).is_ok()
                    {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Ok(Server {
            name: name.to_string(),
            served,
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

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

/// A running `lb run`, stopped (SIGKILL) on drop if not stopped before.
pub struct LbProcess {
    child: Child,
    dir: PathBuf,
}

impl LbProcess {
    fn start(ns: &Netns, config: &str) -> anyhow::Result<LbProcess> {
        let dir = std::env::temp_dir().join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("lb.yaml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.join("lb.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(lb_binary()?)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting lb")?;
        let mut lb = LbProcess { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !lb.log().contains("attached") {
            if let Some(status) = lb.child.try_wait()? {
                bail!("lb exited with {status} before attaching:\n{}", lb.log());
            }
            if Instant::now() > deadline {
                bail!("lb did not attach within 30s:\n{}", lb.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(lb)
    }

    /// Everything `lb` logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("lb.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Sends SIGTERM, waits (at most 10s) for the exit, and returns the exit
    /// status with everything lb logged.
    pub fn stop(mut self) -> anyhow::Result<(ExitStatus, String)> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((status, self.log()));
            }
            if Instant::now() > deadline {
                bail!("lb did not exit within 10s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LbProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
