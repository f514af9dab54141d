//! Backend entries: flags, MACs, families and new ids.

use super::*;

#[test]
fn a_mac_change_rewrites_only_the_backend_entry() {
    let mut r = reconciler();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let mark = r.dataplane().log.len();
    let mut n = neighbours();
    n.get_mut(&ip(12)).unwrap().mac = [2, 9, 9, 9, 9, 9];
    r.apply(&config(false, 1), &all_up(), &n).unwrap();
    assert_eq!(r.dataplane().log[mark..], ["set_backend 1".to_string()]);
}

#[test]
fn unresolved_backends_stay_in_the_table_but_are_flagged() {
    let mut r = reconciler();
    let mut n = neighbours();
    n.remove(&ip(12));
    let c = config(false, 1);
    r.apply(&c, &all_up(), &n).unwrap();
    let e = entry_of(&r, &c, 12);
    assert_eq!((e.flags & BACKEND_F_RESOLVED, e.dst_mac), (0, [0; 6]));
}

#[test]
fn a_down_backend_leaves_the_table_and_loses_its_flows() {
    let mut r = reconciler();
    let c = config(true, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let swaps = r.apply(&c, &down(&c, &[12]), &neighbours()).unwrap();
    assert_eq!(swaps, [swap("web", 2, false)]);
    assert!(!active_addresses(&r, &c.vips[0]).contains(&Some(ip(12))));
    assert_eq!(
        entry_of(&r, &c, 12).flags & (BACKEND_F_KEEP_FLOWS | BACKEND_F_HEALTHY),
        0
    );
    // Coming back restores the very same table.
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let expected = planned_addresses(&c);
    assert_eq!(active_addresses(&r, &c.vips[0]), expected);
}

#[test]
fn drain_keeps_flows_but_takes_no_new_ones_and_disabled_keeps_neither() {
    let mut r = reconciler();
    let c = config_with(
        &backends(&[(11, 1, "active"), (12, 1, "drain"), (13, 1, "disabled")]),
        "fail_open",
    );
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let table = active_addresses(&r, &c.vips[0]);
    assert!(
        table.iter().all(|a| *a == Some(ip(11))),
        "only the active backend takes new flows"
    );
    assert_ne!(
        entry_of(&r, &c, 12).flags & BACKEND_F_KEEP_FLOWS,
        0,
        "drain keeps flows"
    );
    assert_eq!(
        entry_of(&r, &c, 13).flags & BACKEND_F_KEEP_FLOWS,
        0,
        "disabled loses flows"
    );
    // A draining backend that goes down loses its flows too.
    r.apply(&c, &down(&c, &[12]), &neighbours()).unwrap();
    assert_eq!(entry_of(&r, &c, 12).flags & BACKEND_F_KEEP_FLOWS, 0);
}

#[test]
fn all_down_fails_open_over_every_active_backend() {
    let mut r = reconciler();
    let c = config_with(
        &backends(&[(11, 1, "active"), (12, 1, "active"), (13, 1, "drain")]),
        "fail_open",
    );
    let swaps = r
        .apply(&c, &down(&c, &[11, 12, 13]), &neighbours())
        .unwrap();
    assert_eq!(swaps[0], swap("web", 2, true));
    let table: BTreeSet<_> = active_addresses(&r, &c.vips[0]).into_iter().collect();
    assert_eq!(table, BTreeSet::from([Some(ip(11)), Some(ip(12))]));
    for i in [11, 12, 13] {
        assert_ne!(
            entry_of(&r, &c, i).flags & BACKEND_F_KEEP_FLOWS,
            0,
            "{i} keeps flows"
        );
    }
}

#[test]
fn all_down_with_drop_empties_the_table() {
    let mut r = reconciler();
    let c = config_with(&backends(&[(11, 1, "active"), (12, 1, "active")]), "drop");
    let swaps = r.apply(&c, &down(&c, &[11, 12]), &neighbours()).unwrap();
    assert_eq!(swaps[0], swap("web", 0, true));
    let table = r.dataplane().active_table(&c.vips[0].key).unwrap();
    assert!(table.iter().all(|&id| id == lb_common::NO_BACKEND));
    assert_eq!(entry_of(&r, &c, 11).flags & BACKEND_F_KEEP_FLOWS, 0);
}

#[test]
fn ipv6_vips_and_backends_get_their_family_s_entries() {
    let text = format!(
        "interface: eth0\nmaglev: {{ table_size: {M}, seed: 7 }}\nvips:\n\
         - name: web6\n  address: 2001:db8::100\n  port: 80\n  protocol: tcp\n  forwarding: ipip\n  backends:\n\
         \x20   - {{ address: \"2001:db8:1::11\", weight: 1 }}\n\
         - name: web4\n  address: 10.0.0.100\n  port: 80\n  protocol: tcp\n  forwarding: ipip\n  backends:\n\
         \x20   - {{ address: \"2001:db8:1::11\", weight: 1 }}\n\
         - name: l2\n  address: 2001:db8::100\n  port: 53\n  protocol: udp\n  forwarding: l2\n  backends:\n\
         \x20   - {{ address: 10.0.0.11, weight: 1 }}\n"
    );
    let c = Config::parse(&text, Path::new("t.yaml")).expect("valid");
    let backend: IpAddr = "2001:db8:1::11".parse().unwrap();
    let source: IpAddr = "2001:db8::3".parse().unwrap();
    let mut n = neighbours();
    n.insert(
        backend,
        Neighbour {
            ifindex: 3,
            mac: [2, 0, 0, 0, 0, 0x66],
            src_mac: [2; 6],
            src_addr: Some(source),
            mtu: 1500,
        },
    );
    let mut r = reconciler();
    r.apply(&c, &all_up(), &n).unwrap();
    let entry = |vip: usize, addr: IpAddr| {
        let id = r.applied.backend_ids[&(c.vips[vip].key, addr)];
        r.dataplane().backends[&id]
    };
    for vip in [0, 1] {
        let e = entry(vip, backend);
        assert_eq!(e.forwarding, FORWARD_IP6, "{}", c.vips[vip].name);
        assert_eq!((key_addr(e.addr), key_addr(e.encap_src)), (backend, source));
        assert_eq!(e.flags & BACKEND_F_RESOLVED, BACKEND_F_RESOLVED);
    }
    assert_eq!(entry(2, ip(11)).forwarding, FORWARD_L2);
    assert_eq!(
        key_addr(c.vips[0].key.addr),
        "2001:db8::100".parse::<IpAddr>().unwrap()
    );
    let filter = &r.dataplane().vip_filter;
    assert!(FakeDataplane::admits(filter, c.vips[0].address));
    assert!(FakeDataplane::admits(filter, ip(100)));
}

#[test]
fn a_new_backend_id_gets_zeroed_counters_and_a_flagless_entry_first() {
    let mut r = reconciler();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let mark = r.dataplane().log.len();
    r.apply(&config(true, 1), &all_up(), &neighbours()).unwrap();
    let log = &r.dataplane().log[mark..];
    assert_eq!(
        &log[..3],
        [
            "set_backend 3",
            "zero_traffic None Some(3)",
            "set_backend 3"
        ],
        "{log:?}"
    );
}
