//! The direct-server-return test topologies, dual-stack: a client, the load
//! balancer and backends, each in its own namespace, every interface with an
//! IPv4 and an IPv6 address on parallel schemes.
//!
//! Same segment ([`Topology::new`], `l2` forwarding):
//! ```text
//!   client 10.77.0.2   fd00:77::2   ─┐
//!   lb     10.77.0.3   fd00:77::3   ─┼─ br0 (namespace "sw")
//!   b1..bN 10.77.0.11+ fd00:77::11+ ─┘   backends hold the VIPs 10.77.0.100
//!                                        and fd00:77::100 on lo
//! ```
//! Routed ([`Topology::routed`], `ipip` forwarding): the backends sit on
//! 10.99.0.0/24 and fd00:99::/64 behind a router (10.77.0.1 / fd00:77::1 on
//! the front segment, 10.99.0.1 / fd00:99::1 on the back one) and run
//! `lb decap`. [`Topology::routed_via_link_local`] is the same, except that
//! the client and the load balancer reach fd00:99::/64 via the router's
//! link-local address fe80::1 on eth0, as real IPv6 routes usually do.
//!
//! The client routes the VIPs via the load balancer; the load balancer's
//! namespace forwards neither IPv4 nor IPv6, so only the XDP program (MAC
//! rewrite or encapsulation) can deliver a packet to a backend, and backends
//! answer the client directly.

use std::{
    io::{Read as _, Write as _},
    net::{
        IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
    },
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

pub use crate::addresses::*;
use crate::netns::Netns;

pub struct Backend {
    pub name: String,
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
    pub ns: Netns,
}

/// Where the backends are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// On the load balancer's segment (`l2` forwarding).
    SameSegment,
    /// On another segment behind a router, each running `lb decap`
    /// (`ipip` forwarding). IPv6 goes via the router's global address
    /// [`ROUTER6`].
    Routed,
    /// [`Routed`](Self::Routed), but the client and the load balancer route
    /// fd00:99::/64 via the router's link-local [`ROUTER6_LINK_LOCAL`] on
    /// eth0 (IPv4 still via [`ROUTER`]).
    RoutedViaLinkLocal,
}

impl Layout {
    fn routed(self) -> bool {
        matches!(self, Layout::Routed | Layout::RoutedViaLinkLocal)
    }
}

/// Fields drop in declaration order: servers, decap processes and the load
/// balancer stop before the namespaces they live in are deleted.
pub struct Topology {
    servers: Vec<Server>,
    _decaps: Vec<DecapProcess>,
    _peer_pass: Ebpf,
    pub client: Netns,
    pub lb: Netns,
    pub backends: Vec<Backend>,
    _router: Option<Netns>,
    _switches: Vec<Netns>,
}

/// The topology most tests use: everything on one segment.
pub type L2Topology = Topology;

/// A namespace whose interfaces skip IPv6 duplicate address detection, so
/// every address, the link-local ones included, is usable at once (`nodad`
/// covers only the addresses added with it). Without this a backend's
/// link-local address stays tentative for a second or so after its link
/// comes up, and until then the kernel sends no neighbour solicitation for
/// a reply whose source (the VIP, on lo) is not an address of the outgoing
/// interface: an early connection could fail (seen here: now and then one
/// of 1500). Set before any interface exists: new interfaces copy `default`.
fn namespace(role: &str) -> anyhow::Result<Netns> {
    let ns = Netns::new(role)?;
    for dev in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
    }
    Ok(ns)
}

fn switch() -> anyhow::Result<Netns> {
    let sw = namespace("sw")?;
    sw.ip(&["link", "add", "br0", "type", "bridge"])?;
    sw.ip(&["link", "set", "br0", "up"])?;
    Ok(sw)
}

impl Topology {
    /// Everything on one segment (see the module docs).
    pub fn new(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::SameSegment)
    }

    /// Backends on 10.99.0.0/24 and fd00:99::/64 behind a router (10.77.0.1
    /// / fd00:77::1 and 10.99.0.1 / fd00:99::1), each running `lb decap`;
    /// the load balancer routes to them via the router and still does not
    /// forward IP itself.
    pub fn routed(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::Routed)
    }

    /// [`routed`](Self::routed) with the IPv6 routes to fd00:99::/64 via the
    /// router's link-local address `fe80::1` on eth0 (see
    /// [`Layout::RoutedViaLinkLocal`]).
    pub fn routed_via_link_local(backend_names: &[&str]) -> anyhow::Result<Topology> {
        Self::build(backend_names, Layout::RoutedViaLinkLocal)
    }

    /// Builds the topology with one backend per name, each running a TCP
    /// server on port 80 and UDP servers on VIP:5353 and [VIP6]:5353 that
    /// answer with the backend's name, in both families.
    pub fn build(backend_names: &[&str], layout: Layout) -> anyhow::Result<Topology> {
        let front = switch()?;
        let client = namespace("client")?;
        plug(&front, &client, "p-client", CLIENT, CLIENT6)?;
        client.ip(&["route", "add", &format!("{VIP}/32"), "via", &LB.to_string()])?;
        client.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &LB6.to_string(),
        ])?;
        // veth leaves TCP/UDP checksums for "later"; XDP_TX drops that
        // promise, so the client must send complete checksums (a real NIC
        // would finish them in hardware). Covers both families.
        client.exec("ethtool", &["-K", "eth0", "tx", "off"])?;

        let lb = namespace("lb")?;
        plug(&front, &lb, "p-lb", LB, LB6)?;
        // Neither family may be forwarded by the kernel: only the XDP program
        // may move a VIP packet on.
        lb.sysctl("net.ipv4.ip_forward", "0")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "0")?;
        // veth drops frames XDP_TX sends into it unless the peer runs an XDP
        // program; a trivial XDP_PASS on the bridge port is enough.
        let peer_pass = front.enter(|| attach_pass("p-lb"))??;

        let mut switches = vec![front];
        let (router, back) = match layout {
            Layout::SameSegment => (None, None),
            Layout::Routed | Layout::RoutedViaLinkLocal => {
                let back = switch()?;
                let router = namespace("router")?;
                plug_as(&switches[0], &router, "p-router", "eth0", ROUTER, ROUTER6)?;
                plug_as(&back, &router, "p-router", "eth1", ROUTER_B, ROUTER6_B)?;
                router.sysctl("net.ipv4.ip_forward", "1")?;
                router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
                for dev in ["all", "default", "eth0", "eth1"] {
                    router.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
                }
                // The IPv6 next hop, and with a link-local one its interface
                // (a link-local address is only unique per link).
                let (via6, dev6) = if layout == Layout::RoutedViaLinkLocal {
                    router.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{ROUTER6_LINK_LOCAL}/64"),
                        "dev",
                        "eth0",
                        "nodad",
                    ])?;
                    (ROUTER6_LINK_LOCAL, &["dev", "eth0"][..])
                } else {
                    (ROUTER6, &[][..])
                };
                let via6 = via6.to_string();
                for ns in [&client, &lb] {
                    ns.ip(&["route", "add", "10.99.0.0/24", "via", &ROUTER.to_string()])?;
                    let mut route = vec!["-6", "route", "add", "fd00:99::/64", "via", &via6];
                    route.extend(dev6);
                    ns.ip(&route)?;
                }
                (Some(router), Some(back))
            }
        };

        let mut backends = Vec::new();
        let mut servers = Vec::new();
        let mut decaps = Vec::new();
        for (i, name) in backend_names.iter().enumerate() {
            let ns = namespace(name)?;
            let (address, address6) = match &back {
                None => {
                    let (a, a6) = (backend_address(i), backend_address6(i));
                    plug(&switches[0], &ns, &format!("p-{name}"), a, a6)?;
                    (a, a6)
                }
                Some(back) => {
                    let (a, a6) = (routed_backend_address(i), routed_backend_address6(i));
                    plug(back, &ns, &format!("p-{name}"), a, a6)?;
                    ns.ip(&["route", "add", "default", "via", &ROUTER_B.to_string()])?;
                    ns.ip(&[
                        "-6",
                        "route",
                        "add",
                        "default",
                        "via",
                        &ROUTER6_B.to_string(),
                    ])?;
                    (a, a6)
                }
            };
            ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
            // Hold the VIP without answering ARP for it or using it as an ARP
            // source: only the load balancer attracts VIP traffic. IPv6 needs
            // no counterpart: the kernel answers a neighbour solicitation only
            // for addresses of the interface it arrived on (not lo's), and
            // solicits from an address of the outgoing interface.
            for dev in ["all", "eth0"] {
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
                ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
            }
            if layout.routed() {
                decaps.push(DecapProcess::start(&ns)?);
            }
            servers.push(Server::start(&ns, name)?);
            backends.push(Backend {
                name: name.to_string(),
                address,
                address6,
                ns,
            });
        }
        switches.extend(back);

        Ok(Topology {
            servers,
            _decaps: decaps,
            _peer_pass: peer_pass,
            client,
            lb,
            backends,
            _router: router,
            _switches: switches,
        })
    }

    /// Starts `lb run` inside the load balancer's namespace with `config` and
    /// waits until the program is attached.
    pub fn start_lb(&self, config: &str) -> anyhow::Result<LbProcess> {
        let mut lb = LbProcess::start(&self.lb, config)?;
        lb.wait_attached(0)?;
        Ok(lb)
    }

    /// Starts `lb run` and returns at once (see [`LbProcess::wait_attached`]).
    pub fn start_lb_unwaited(&self, config: &str) -> anyhow::Result<LbProcess> {
        LbProcess::start(&self.lb, config)
    }

    /// Per backend: (name, TCP connections accepted, UDP datagrams answered).
    pub fn served(&self) -> Vec<(String, usize, usize)> {
        self.servers
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.tcp_accepted.load(Ordering::Relaxed),
                    s.udp_answered.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Makes `flows` TCP connections (to `vip`:80) and `flows` UDP exchanges
    /// (to `vip`:5353) from the client and asserts that every one succeeds,
    /// that each protocol's shares are within 15% of `weights`, and that the
    /// servers answered exactly those (nothing twice).
    pub fn assert_spread_by_weight(
        &self,
        lb: &LbProcess,
        vip: IpAddr,
        weights: &[(&str, u32)],
        flows: usize,
    ) {
        use crate::traffic::{tcp_connections, udp_exchanges};
        // The servers count for the topology's lifetime; compare the change.
        let served = || -> usize { self.served().iter().map(|s| s.1 + s.2).sum() };
        let before = served();
        let tcp = self
            .client
            .enter(move || tcp_connections(SocketAddr::new(vip, TCP_PORT), flows))
            .unwrap();
        let udp = self
            .client
            .enter(move || udp_exchanges(SocketAddr::new(vip, UDP_PORT), flows))
            .unwrap();
        println!("{vip} tcp: {tcp:?}\n{vip} udp: {udp:?}");
        for (what, tally) in [("tcp", &tcp), ("udp", &udp)] {
            assert_eq!(tally.attempts(), flows);
            assert_eq!(
                tally.failures,
                0,
                "{what}: every exchange succeeds; lb log:\n{}",
                lb.log()
            );
            let off = tally.off_weight(weights, 0.15);
            assert!(
                off.is_empty(),
                "{what}: shares off weight by > 15%: {off:?}"
            );
        }
        assert_eq!(
            served() - before,
            2 * flows,
            "every backend answer was one client exchange"
        );
    }

    /// Opens or closes backend `i`'s service port (TCP 80). Closing refuses
    /// new connections; established ones keep being served.
    pub fn set_service(&mut self, i: usize, on: bool) -> anyhow::Result<()> {
        self.servers[i].set_service(&self.backends[i].ns, on)
    }

    /// Opens or closes backend `i`'s health port (TCP 8080).
    pub fn set_health(&mut self, i: usize, on: bool) -> anyhow::Result<()> {
        self.servers[i].set_health(&self.backends[i].ns, on)
    }
}

/// Connects `ns` to the bridge in `switch` with a veth pair: `eth0` in `ns`
/// with `addr/24` and `addr6/64`, `port` in the switch.
fn plug(
    switch: &Netns,
    ns: &Netns,
    port: &str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> anyhow::Result<()> {
    plug_as(switch, ns, port, "eth0", addr, addr6)
}

/// [`plug`] with another interface name in `ns`.
fn plug_as(
    switch: &Netns,
    ns: &Netns,
    port: &str,
    dev: &str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> anyhow::Result<()> {
    crate::netns::veth(ns, dev, switch, port)?;
    switch.ip(&["link", "set", port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", dev])?;
    // nodad: usable at once, nothing waits for duplicate address detection.
    ns.ip(&["addr", "add", &format!("{addr6}/64"), "dev", dev, "nodad"])?;
    ns.ip(&["link", "set", dev, "up"])?;
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

/// TCP port of each backend's health listener (see [`L2Topology::set_health`]).
pub const HEALTH_PORT: u16 = 8080;

/// A listening socket served by a thread until dropped.
struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Serves `listeners` (one per address family), handing each accepted
    /// connection to `on_conn` on a thread of its own.
    fn tcp(
        listeners: Vec<TcpListener>,
        on_conn: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> std::io::Result<Listener> {
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let on_conn = Arc::new(on_conn);
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let mut idle = true;
                for listener in &listeners {
                    if let Ok((conn, _)) = listener.accept() {
                        idle = false;
                        let _ = conn.set_nonblocking(false);
                        let on_conn = on_conn.clone();
                        std::thread::spawn(move || on_conn(conn));
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }

    /// Answers every datagram `socket` receives with `reply`, counting the
    /// answers in `answered`.
    fn udp(
        socket: UdpSocket,
        reply: Vec<u8>,
        answered: Arc<AtomicUsize>,
    ) -> std::io::Result<Listener> {
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf)
                    && socket.send_to(&reply, from).is_ok()
                {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// TCP listeners on `port` of every address: one IPv4 socket on 0.0.0.0 and
/// one IPv6-only socket on [::]. Two sockets rather than one dual-stack
/// socket, so IPv4 connections stay plain IPv4 sockets (as before IPv6 was
/// added) whatever `net.ipv6.bindv6only` says. Must run inside the
/// namespace.
fn listen_both(port: u16) -> anyhow::Result<Vec<TcpListener>> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
        sockopt,
    };
    let v4 = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Without IPV6_V6ONLY the [::] socket would also claim IPv4 and clash
    // with the 0.0.0.0 one. SO_REUSEADDR as std sets it for `bind`.
    setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
    )?;
    // The backlog std's `TcpListener::bind` uses, as for the IPv4 socket.
    listen(&fd, Backlog::new(128)?)?;
    Ok(vec![v4, TcpListener::from(fd)])
}

/// A backend's servers, in both families: TCP on *:80 and UDP on VIP:5353
/// and [VIP6]:5353 answer with the backend's name (TCP: a line, then it
/// echoes whatever the client sends), and a TCP health listener on *:8080
/// accepts and closes. The UDP servers are bound to the VIPs so that their
/// answers leave from the VIP.
struct Server {
    name: String,
    /// New TCP connections accepted on the service port.
    tcp_accepted: Arc<AtomicUsize>,
    /// UDP datagrams answered.
    udp_answered: Arc<AtomicUsize>,
    /// Tells connection threads to finish.
    shutdown: Arc<AtomicBool>,
    service: Option<Listener>,
    health: Option<Listener>,
    _udp: Vec<Listener>,
}

impl Server {
    fn start(ns: &Netns, name: &str) -> anyhow::Result<Server> {
        let udp_answered = Arc::new(AtomicUsize::new(0));
        let mut udp = Vec::new();
        for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
            let socket = ns.enter(move || UdpSocket::bind(SocketAddr::new(vip, UDP_PORT)))??;
            udp.push(Listener::udp(
                socket,
                name.as_bytes().to_vec(),
                udp_answered.clone(),
            )?);
        }
        let mut server = Server {
            name: name.to_string(),
            tcp_accepted: Arc::new(AtomicUsize::new(0)),
            udp_answered,
            shutdown: Arc::new(AtomicBool::new(false)),
            service: None,
            health: None,
            _udp: udp,
        };
        server.set_service(ns, true)?;
        server.set_health(ns, true)?;
        Ok(server)
    }

    fn set_service(&mut self, ns: &Netns, on: bool) -> anyhow::Result<()> {
        self.service = None;
        if on {
            let l = ns.enter(|| listen_both(TCP_PORT))??;
            let (accepted, shutdown, line) = (
                self.tcp_accepted.clone(),
                self.shutdown.clone(),
                format!("{}\n", self.name).into_bytes(),
            );
            self.service = Some(Listener::tcp(l, move |mut conn| {
                accepted.fetch_add(1, Ordering::Relaxed);
                if conn.write_all(&line).is_err() {
                    return;
                }
                // Echo until the client closes or the server shuts down.
                let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                let mut buf = [0u8; 512];
                while !shutdown.load(Ordering::Relaxed) {
                    match conn.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            if conn.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => return,
                    }
                }
            })?);
        }
        Ok(())
    }

    fn set_health(&mut self, ns: &Netns, on: bool) -> anyhow::Result<()> {
        self.health = None;
        if on {
            let l = ns.enter(|| listen_both(HEALTH_PORT))??;
            self.health = Some(Listener::tcp(l, drop)?);
        }
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::Relaxed);
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

/// The message lb logs once its program is attached.
const ATTACHED: &str = "lb_userspace::run: attached ";

/// An `lb run` in the load balancer's namespace, with its own config file,
/// log and bpffs pin directory. On drop it is killed and its pins removed
/// (which detaches the program).
pub struct LbProcess {
    child: Option<Child>,
    netns: String,
    dir: PathBuf,
    pin: PathBuf,
}

impl LbProcess {
    fn start(ns: &Netns, config: &str) -> anyhow::Result<LbProcess> {
        let dir = std::env::temp_dir().join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let mut lb = LbProcess {
            child: None,
            netns: ns.name().to_string(),
            pin: PathBuf::from("/sys/fs/bpf").join(ns.name()),
            dir,
        };
        lb.write_config(config)?;
        lb.spawn()?;
        Ok(lb)
    }

    /// How many times lb logged that it attached.
    pub fn attach_count(&self) -> usize {
        self.log().matches(ATTACHED).count()
    }

    /// Waits until lb has logged that it attached `before + 1` times.
    pub fn wait_attached(&mut self, before: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.attach_count() <= before {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("lb exited with {status} before attaching:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("lb did not attach within 30s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("lb.yaml")
    }

    pub fn pin_path(&self) -> &std::path::Path {
        &self.pin
    }

    /// Writes `config` (plus this instance's pin_path) where `lb` reads it.
    pub fn write_config(&self, config: &str) -> anyhow::Result<()> {
        let text = format!("{}\npin_path: {}\n", config.trim_end(), self.pin.display());
        // Write then rename, so lb never reads a half-written file.
        let tmp = self.dir.join("lb.yaml.new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }

    /// Starts `lb run` in the namespace's network stack only (so it shares
    /// the host's /sys/fs/bpf); see [`wait_attached`](Self::wait_attached).
    /// lb gets SIGKILL if the test process dies, so it never outlives it.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("lb.log"))?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(lb_binary()?)
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        crate::netns::die_with_parent(&mut command);
        let child = command.spawn().context("starting lb")?;
        self.child = Some(child);
        Ok(())
    }

    /// Everything every `lb` of this instance logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("lb.log")).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("lb is not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    /// Asks lb to reload its config.
    pub fn sighup(&self) -> anyhow::Result<()> {
        self.signal(nix::sys::signal::Signal::SIGHUP)
    }

    /// Kills lb with SIGKILL: no cleanup of any kind can run.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts lb again with the same config and pin directory, and waits
    /// until it has attached.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let before = self.attach_count();
        self.spawn()?;
        self.wait_attached(before)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
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
        let mut child = self.child.take().context("lb is not running")?;
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
        let out = crate::netns::run(
            "nsenter",
            &[
                &format!("--net=/var/run/netns/{}", self.netns),
                lb_binary()?.to_str().context("lb path")?,
                "stop",
                "--config",
                self.config_path().to_str().context("config path")?,
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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

/// `lb decap` on a backend's `eth0`, with its own pin directory and log;
/// killed and its pins removed on drop.
pub struct DecapProcess {
    child: Option<Child>,
    netns: String,
    pin: PathBuf,
    log: PathBuf,
}

impl DecapProcess {
    /// Starts `lb decap` in `ns` and waits until it has attached.
    pub fn start(ns: &Netns) -> anyhow::Result<DecapProcess> {
        let dir = std::env::temp_dir().join(ns.name());
        std::fs::create_dir_all(&dir)?;
        let mut d = DecapProcess {
            child: None,
            netns: ns.name().to_string(),
            pin: PathBuf::from("/sys/fs/bpf").join(ns.name()),
            log: dir.join("decap.log"),
        };
        d.spawn()?;
        Ok(d)
    }

    /// Starts `lb decap` again (after [`kill9`](Self::kill9)).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let before = self.log().matches(DECAP_ATTACHED).count();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/var/run/netns/{}", self.netns))
            .arg(lb_binary()?)
            .args(["decap", "--interface", "eth0", "--pin-path"])
            .arg(&self.pin)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file);
        crate::netns::die_with_parent(&mut command);
        self.child = Some(command.spawn().context("starting lb decap")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log().matches(DECAP_ATTACHED).count() == before {
            if Instant::now() > deadline {
                bail!("lb decap did not attach:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs `lb decap --stop` for this instance.
    pub fn stop(&self) -> anyhow::Result<String> {
        let out = crate::netns::run(
            "nsenter",
            &[
                &format!("--net=/var/run/netns/{}", self.netns),
                lb_binary()?.to_str().context("lb path")?,
                "decap",
                "--interface",
                "eth0",
                "--pin-path",
                self.pin.to_str().context("pin path")?,
                "--stop",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for DecapProcess {
    fn drop(&mut self) {
        self.kill9();
        let _ = lb_userspace::loader::remove_pins_of(&self.pin, &lb_common::decap::map_names::ALL);
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The message `lb decap` logs once attached.
const DECAP_ATTACHED: &str = "decap attached";
