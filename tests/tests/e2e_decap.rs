//! End-to-end tier for `lb decap`: a sender namespace emits real IPIP,
//! IPv4-in-IPv6 and IP6IP6 packets (raw sockets; the kernel builds the outer
//! header) to a backend that holds the VIPs on loopback and has no ipip or
//! ip6_tunnel module. Only the decap program can deliver them. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use etherparse::PacketBuilder;
use lb_tests::{
    netns::{Netns, run},
    root::root_or_skip,
    topology::DecapProcess,
};
use nix::sys::socket::{MsgFlags, SockaddrStorage, sendto};

const SENDER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const PORT: u16 = 5353;
const SENDER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 1);
const BACKEND6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x88, 0, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// How the sender wraps the datagrams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tunnel {
    /// IPv4 in IPv4.
    Ipip,
    /// IPv4 in IPv6.
    Ip4in6,
    /// IPv6 in IPv6.
    Ip6ip6,
}

/// Sends `n` UDP datagrams to the VIP (of the inner family) on PORT inside
/// `tunnel` packets to the backend, from the sender's `sport`, and counts
/// the answers (which come back directly, not tunnelled). The kernel builds
/// the outer header (a raw socket of the tunnel's protocol). Runs inside the
/// sender's namespace.
fn exchange(tunnel: Tunnel, n: usize, sport: u16) -> usize {
    let (outer_family, protocol) = match tunnel {
        Tunnel::Ipip => (libc::AF_INET, libc::IPPROTO_IPIP),
        Tunnel::Ip4in6 => (libc::AF_INET6, libc::IPPROTO_IPIP),
        Tunnel::Ip6ip6 => (libc::AF_INET6, libc::IPPROTO_IPV6),
    };
    // SAFETY: plain socket(2) call; the descriptor is owned right away.
    let raw = unsafe { libc::socket(outer_family, libc::SOCK_RAW, protocol) };
    assert!(
        raw >= 0,
        "raw {tunnel:?} socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    let raw = unsafe { OwnedFd::from_raw_fd(raw) };
    let (source, vip): (IpAddr, IpAddr) = match tunnel {
        Tunnel::Ipip | Tunnel::Ip4in6 => (SENDER.into(), VIP.into()),
        Tunnel::Ip6ip6 => (SENDER6.into(), VIP6.into()),
    };
    let answers = UdpSocket::bind(SocketAddr::new(source, sport)).unwrap();
    answers
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = match tunnel {
        Tunnel::Ipip => SockaddrStorage::from(SocketAddrV4::new(BACKEND, 0)),
        Tunnel::Ip4in6 | Tunnel::Ip6ip6 => {
            SockaddrStorage::from(SocketAddrV6::new(BACKEND6, 0, 0, 0))
        }
    };
    let mut got = 0;
    for i in 0..n {
        let mut inner = Vec::new();
        let builder = match (source, vip) {
            (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!("one family inside"),
        };
        builder
            .udp(sport, PORT)
            .write(&mut inner, format!("ping {i}").as_bytes())
            .unwrap();
        let sent = sendto(raw.as_raw_fd(), &inner, &to, MsgFlags::empty());
        assert_eq!(sent, Ok(inner.len()), "{tunnel:?}");
        let mut buf = [0u8; 64];
        if let Ok((len, from)) = answers.recv_from(&mut buf) {
            assert_eq!(
                from,
                SocketAddr::new(vip, PORT),
                "the answer comes from the VIP"
            );
            assert_eq!(&buf[..len], b"backend");
            got += 1;
        }
    }
    got
}

/// [`exchange`] over every kind of tunnel.
fn exchange_all(n: usize, sport: u16) -> Vec<(Tunnel, usize)> {
    [Tunnel::Ipip, Tunnel::Ip4in6, Tunnel::Ip6ip6]
        .into_iter()
        .zip(sport..)
        .map(|(t, port)| (t, exchange(t, n, port)))
        .collect()
}

/// Every tunnel answered `n` times.
fn all(n: usize) -> Vec<(Tunnel, usize)> {
    [Tunnel::Ipip, Tunnel::Ip4in6, Tunnel::Ip6ip6]
        .into_iter()
        .map(|t| (t, n))
        .collect()
}

#[test]
fn decap_delivers_every_tunnel_to_a_backend_without_tunnel_modules_and_survives_restarts() {
    if !root_or_skip(
        "decap_delivers_every_tunnel_to_a_backend_without_tunnel_modules_and_survives_restarts",
    ) {
        return;
    }
    let sender = Netns::new("send").unwrap();
    let backend = Netns::new("be").unwrap();
    run(
        "ip",
        &[
            "link",
            "add",
            "eth0",
            "netns",
            sender.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            backend.name(),
        ],
    )
    .unwrap();
    for (ns, v4, v6) in [(&sender, SENDER, SENDER6), (&backend, BACKEND, BACKEND6)] {
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])
            .unwrap();
        // nodad: usable at once, no duplicate address detection to wait for.
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut serving = Vec::new();
    for vip in [IpAddr::V4(VIP), IpAddr::V6(VIP6)] {
        let prefix = if vip.is_ipv4() { 32 } else { 128 };
        backend
            .ip(&["addr", "add", &format!("{vip}/{prefix}"), "dev", "lo"])
            .unwrap();
        let server = backend
            .enter(move || UdpSocket::bind(SocketAddr::new(vip, PORT)))
            .unwrap()
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let stop = stop.clone();
        serving.push(std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(b"backend", from);
                }
            }
        }));
    }

    // Without decap the kernel cannot open the tunnel: nothing arrives.
    assert_eq!(
        sender.enter(|| exchange_all(5, 41000)).unwrap(),
        all(0),
        "no ipip or ip6_tunnel module here"
    );

    let mut decap = DecapProcess::start(&backend).unwrap();
    assert_eq!(
        sender.enter(|| exchange_all(100, 41010)).unwrap(),
        all(100),
        "every datagram answered"
    );

    // kill -9 leaves it working; a new `lb decap` adopts it.
    decap.kill9();
    assert_eq!(
        sender.enter(|| exchange_all(50, 41020)).unwrap(),
        all(50),
        "still decapsulating without lb"
    );
    decap.spawn().unwrap();
    assert!(decap.log().contains("adopted=true"), "{}", decap.log());
    assert_eq!(sender.enter(|| exchange_all(50, 41030)).unwrap(), all(50));

    // `lb decap --stop` is refused while an `lb decap` holds the lock, then
    // detaches.
    assert!(decap.stop().is_err(), "refused while lb decap runs");
    decap.kill9();
    assert!(decap.stop().unwrap().contains("detached"));
    let link = backend.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    assert_eq!(
        sender.enter(|| exchange_all(5, 41040)).unwrap(),
        all(0),
        "gone with the program"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in serving {
        s.join().unwrap();
    }
}
