//! A backend's servers: TCP and UDP services that answer with the backend's
//! name, and a health listener, each served by threads until dropped.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    addresses::{HEALTH_PORT, TCP_PORT, UDP_PORT, VIP, VIP6},
    netns::Netns,
};

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
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    // Counted before it leaves: a client that has its answer
                    // must find it counted (a send that fails leaves that
                    // client without one, a failure it reports itself).
                    answered.fetch_add(1, Ordering::Relaxed);
                    let _ = socket.send_to(&reply, from);
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
pub(super) struct Server {
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
    pub(super) fn start(ns: &Netns, name: &str) -> anyhow::Result<Server> {
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

    /// (name, TCP connections accepted, UDP datagrams answered) so far.
    pub(super) fn served(&self) -> (String, usize, usize) {
        (
            self.name.clone(),
            self.tcp_accepted.load(Ordering::Relaxed),
            self.udp_answered.load(Ordering::Relaxed),
        )
    }

    pub(super) fn set_service(&mut self, ns: &Netns, on: bool) -> anyhow::Result<()> {
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

    pub(super) fn set_health(&mut self, ns: &Netns, on: bool) -> anyhow::Result<()> {
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
