//! End-to-end tier for `lb decap`: a sender namespace emits real IPIP,
//! IPv4-in-IPv6 and IP6IP6 packets (raw sockets; the kernel builds the outer
//! header) to a backend that holds the VIPs on loopback and has no ipip or
//! ip6_tunnel module. Only the decap program can deliver them. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use lb_tests::{
    netns::{Netns, veth},
    root::root_or_skip,
    topology::{DecapProcess, lb_binary},
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
    veth(&sender, "eth0", &backend, "eth0").unwrap();
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
    // spawn() returns once the new program is on eth0; the line saying so
    // follows it into the log a moment later.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !decap.log().contains("adopted=true") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// A pinned map left by another build (here the IPv4-only key of an older
/// `lb decap`) is refused with a clear error, never reused as if it fitted.
#[test]
fn decap_refuses_a_pinned_map_of_another_layout() {
    if !root_or_skip("decap_refuses_a_pinned_map_of_another_layout") {
        return;
    }
    let ns = Netns::new("pin").unwrap();
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(ns.name());
    // The map is pinned before any lb runs, so mount bpffs as lb would.
    lb_userspace::pins::ensure_bpffs(&pin).expect("a bpffs at /sys/fs/bpf");
    let _cleanup = RemoveOnDrop(pin.clone());
    std::fs::create_dir_all(pin.join("maps")).unwrap();
    pin_hash_map(&pin.join("maps").join("DECAP_ADDRS"), 4, 1);

    let lb = lb_binary().unwrap();
    // Bounded: were the map accepted, `lb decap` would run until killed.
    // nsenter, not `ip netns exec`: the latter mounts its own /sys, hiding
    // the pinned map.
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", ns.name()))
        .args(["timeout", "10"])
        .arg(&lb)
        .args(["decap", "--interface", "lo", "--pin-path"])
        .arg(&pin)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert_ne!(
        out.status.code(),
        Some(124),
        "exited, not timed out: {stderr}"
    );
    assert!(
        stderr.contains("DECAP_ADDRS")
            && stderr.contains("key size 4")
            && stderr.contains("needs 16"),
        "{stderr}"
    );
    let link = ns.ip(&["link", "show", "lo"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "nothing attached"
    );
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a BPF hash map with these sizes and pins it at `path` (raw
/// bpf(2): aya creates maps only from an object file).
fn pin_hash_map(path: &std::path::Path, key_size: u32, value_size: u32) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_HASH: u32 = 1;
    // bpf_attr for BPF_MAP_CREATE: type, key size, value size, max entries.
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_HASH, key_size, value_size, 16]);
    let size = size_of_val(&attr);
    // SAFETY: a zeroed bpf_attr of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), size) };
    assert!(fd >= 0, "map create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let _fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // bpf_attr for BPF_OBJ_PIN: pathname (u64), bpf_fd (u32).
    let mut attr = [0u32; 32];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd as u32;
    // SAFETY: as above; `path` outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), size) };
    assert_eq!(r, 0, "pin: {}", std::io::Error::last_os_error());
}
