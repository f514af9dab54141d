//! End-to-end tier for `lb decap`: a sender namespace emits real IPIP packets
//! (a raw IPPROTO_IPIP socket; the kernel builds the outer header) to a
//! backend that holds the VIP on loopback and has no ipip module. Only the
//! decap program can deliver them. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::Duration,
};

use etherparse::PacketBuilder;
use lb_tests::{
    netns::{Netns, run},
    root::root_or_skip,
    topology::DecapProcess,
};

const SENDER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
const PORT: u16 = 5353;

/// Sends `n` UDP datagrams to VIP:PORT inside IPIP packets to the backend,
/// from SENDER:`sport`, and counts the answers (which come back directly,
/// not tunnelled). Runs inside the sender's namespace.
fn exchange(n: usize, sport: u16) -> usize {
    // SAFETY: plain socket(2) call; the descriptor is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
    assert!(
        raw >= 0,
        "raw IPIP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nobody else owns.
    let raw = unsafe { OwnedFd::from_raw_fd(raw) };
    let answers = UdpSocket::bind(SocketAddr::from((SENDER, sport))).unwrap();
    answers
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(BACKEND.octets()),
        },
        sin_zero: [0; 8],
    };
    let mut got = 0;
    for i in 0..n {
        let mut inner = Vec::new();
        PacketBuilder::ipv4(SENDER.octets(), VIP.octets(), 64)
            .udp(sport, PORT)
            .write(&mut inner, format!("ping {i}").as_bytes())
            .unwrap();
        // SAFETY: valid buffer and address for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                inner.as_ptr().cast(),
                inner.len(),
                0,
                (&to as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            sent,
            inner.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        let mut buf = [0u8; 64];
        if let Ok((len, from)) = answers.recv_from(&mut buf) {
            assert_eq!(
                from,
                SocketAddr::from((VIP, PORT)),
                "the answer comes from the VIP"
            );
            assert_eq!(&buf[..len], b"backend");
            got += 1;
        }
    }
    got
}

#[test]
fn decap_delivers_ipip_to_a_backend_without_an_ipip_module_and_survives_restarts() {
    if !root_or_skip(
        "decap_delivers_ipip_to_a_backend_without_an_ipip_module_and_survives_restarts",
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
    for (ns, addr) in [(&sender, SENDER), (&backend, BACKEND)] {
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"])
            .unwrap();
        ns.ip(&["link", "set", "eth0", "up"]).unwrap();
    }
    backend
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    let server = backend
        .enter(|| UdpSocket::bind(SocketAddr::from((VIP, PORT))))
        .unwrap()
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let serving = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, from)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(b"backend", from);
                }
            }
        })
    };

    // Without decap the kernel cannot open the tunnel: nothing arrives.
    assert_eq!(
        sender.enter(|| exchange(5, 41000)).unwrap(),
        0,
        "no ipip module here"
    );

    let mut decap = DecapProcess::start(&backend).unwrap();
    assert_eq!(
        sender.enter(|| exchange(100, 41001)).unwrap(),
        100,
        "every datagram answered"
    );

    // kill -9 leaves it working; a new `lb decap` adopts it.
    decap.kill9();
    assert_eq!(
        sender.enter(|| exchange(50, 41002)).unwrap(),
        50,
        "still decapsulating without lb"
    );
    decap.spawn().unwrap();
    assert!(decap.log().contains("adopted=true"), "{}", decap.log());
    assert_eq!(sender.enter(|| exchange(50, 41003)).unwrap(), 50);

    // `lb decap --stop` is refused while an `lb decap` holds the lock, then
    // detaches.
    assert!(decap.stop().is_err(), "refused while lb decap runs");
    decap.kill9();
    assert!(decap.stop().unwrap().contains("detached"));
    let link = backend.ip(&["link", "show", "eth0"]).unwrap();
    assert!(!String::from_utf8_lossy(&link.stdout).contains("xdp"));
    assert_eq!(
        sender.enter(|| exchange(5, 41004)).unwrap(),
        0,
        "gone with the program"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    serving.join().unwrap();
}
