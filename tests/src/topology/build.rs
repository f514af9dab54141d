//! Building a topology's namespaces: switches, the client, the load
//! balancer, the router and the backends, wired as the module docs of
//! [`topology`](super) draw them.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use super::Layout;
use crate::{
    addresses::{
        CLIENT, CLIENT6, LB, LB6, ROUTER, ROUTER_B, ROUTER6, ROUTER6_B, ROUTER6_LINK_LOCAL, VIP,
        VIP6,
    },
    netns::Netns,
};

/// A namespace whose interfaces skip IPv6 duplicate address detection, so
/// every address, the link-local ones included, is usable at once (`nodad`
/// covers only the addresses added with it). Without this a backend's
/// link-local address stays tentative for a second or so after its link
/// comes up, and until then the kernel sends no neighbour solicitation for
/// a reply whose source (the VIP, on lo) is not an address of the outgoing
/// interface: an early connection could fail (seen here: now and then one
/// of 1500). Set before any interface exists: new interfaces copy `default`.
pub(super) fn namespace(role: &str) -> anyhow::Result<Netns> {
    let ns = Netns::new(role)?;
    for dev in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
    }
    Ok(ns)
}

/// A namespace holding the bridge `br0` of one segment.
pub(super) fn switch() -> anyhow::Result<Netns> {
    let sw = namespace("sw")?;
    sw.ip(&["link", "add", "br0", "type", "bridge"])?;
    sw.ip(&["link", "set", "br0", "up"])?;
    Ok(sw)
}

/// The client on the `front` segment, routing both VIPs via the load
/// balancer.
pub(super) fn client(front: &Netns) -> anyhow::Result<Netns> {
    let client = namespace("client")?;
    plug(front, &client, "p-client", CLIENT, CLIENT6)?;
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
    Ok(client)
}

/// The load balancer's namespace on the `front` segment, and the XDP_PASS
/// program its bridge port needs (dropping it detaches that program).
pub(super) fn load_balancer(front: &Netns) -> anyhow::Result<(Netns, Ebpf)> {
    let lb = namespace("lb")?;
    plug(front, &lb, "p-lb", LB, LB6)?;
    // Neither family may be forwarded by the kernel: only the XDP program
    // may move a VIP packet on.
    lb.sysctl("net.ipv4.ip_forward", "0")?;
    lb.sysctl("net.ipv6.conf.all.forwarding", "0")?;
    // veth drops frames XDP_TX sends into it unless the peer runs an XDP
    // program; a trivial XDP_PASS on the bridge port is enough.
    let peer_pass = front.enter(|| attach_pass("p-lb"))??;
    Ok((lb, peer_pass))
}

/// Deletes the load balancer's `eth0` (both ends of its veth, its XDP
/// program with it) and plugs a new one with the same MAC and addresses, as
/// a driver reload or a re-created interface would leave it. Returns the new
/// bridge port's XDP_PASS program.
pub(super) fn replug_load_balancer(front: &Netns, lb: &Netns) -> anyhow::Result<Ebpf> {
    let mac = lb_mac(lb)?;
    lb.ip(&["link", "del", "eth0"])?;
    plug(front, lb, "p-lb", LB, LB6)?;
    lb.ip(&["link", "set", "eth0", "address", &mac])?;
    front.enter(|| attach_pass("p-lb"))?
}

fn lb_mac(lb: &Netns) -> anyhow::Result<String> {
    let out = lb.ip(&["-j", "link", "show", "eth0"])?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    links[0]["address"]
        .as_str()
        .map(str::to_owned)
        .context("eth0 has no MAC")
}

/// The router between the `front` segment and a new back one, for the
/// routed layouts; `hosts` (the client and the load balancer) get routes to
/// the backends' subnets via it. Returns the router and the back segment's
/// switch.
pub(super) fn router(
    front: &Netns,
    layout: Layout,
    hosts: [&Netns; 2],
) -> anyhow::Result<(Netns, Netns)> {
    let back = switch()?;
    let router = namespace("router")?;
    plug_as(front, &router, "p-router", "eth0", ROUTER, ROUTER6)?;
    plug_as(&back, &router, "p-router", "eth1", ROUTER_B, ROUTER6_B)?;
    router.sysctl("net.ipv4.ip_forward", "1")?;
    router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    for dev in ["all", "default", "eth0", "eth1"] {
        router.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
    }
    // The IPv6 next hop, and with a link-local one its interface (a
    // link-local address is only unique per link).
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
    for ns in hosts {
        ns.ip(&["route", "add", "10.99.0.0/24", "via", &ROUTER.to_string()])?;
        let mut route = vec!["-6", "route", "add", "fd00:99::/64", "via", &via6];
        route.extend(dev6);
        ns.ip(&route)?;
    }
    Ok((router, back))
}

/// A backend named `name` at `address`/`address6` on `segment`, holding
/// the VIPs on lo; `routed` when `segment` is behind the router.
pub(super) fn backend(
    name: &str,
    segment: &Netns,
    address: Ipv4Addr,
    address6: Ipv6Addr,
    routed: bool,
) -> anyhow::Result<Netns> {
    let ns = namespace(name)?;
    plug(segment, &ns, &format!("p-{name}"), address, address6)?;
    if routed {
        ns.ip(&["route", "add", "default", "via", &ROUTER_B.to_string()])?;
        ns.ip(&[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &ROUTER6_B.to_string(),
        ])?;
    }
    ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"])?;
    // Hold the VIP without answering ARP for it or using it as an ARP
    // source: only the load balancer attracts VIP traffic. IPv6 needs no
    // counterpart: the kernel answers a neighbour solicitation only for
    // addresses of the interface it arrived on (not lo's), and solicits from
    // an address of the outgoing interface.
    for dev in ["all", "eth0"] {
        ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_ignore"), "1")?;
        ns.sysctl(&format!("net.ipv4.conf.{dev}.arp_announce"), "2")?;
    }
    Ok(ns)
}

/// Connects `ns` to the bridge in `switch` with a veth pair: `eth0` in `ns`
/// with `addr/24` and `addr6/64`, `port` in the switch.
pub(super) fn plug(
    switch: &Netns,
    ns: &Netns,
    port: &str,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
) -> anyhow::Result<()> {
    plug_as(switch, ns, port, "eth0", addr, addr6)
}

/// [`plug`] with another interface name in `ns`.
pub(super) fn plug_as(
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

pub(super) fn attach_pass(interface: &str) -> anyhow::Result<Ebpf> {
    let mut ebpf = Ebpf::load(lb_userspace::loader::BASELINE_OBJECT)?;
    let prog: &mut Xdp = ebpf
        .program_mut("xdp_pass")
        .context("xdp_pass missing")?
        .try_into()?;
    prog.load()?;
    prog.attach(interface, XdpMode::Driver)?;
    Ok(ebpf)
}
