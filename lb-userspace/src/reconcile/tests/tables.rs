//! Tables, table halves, the VIP filter and the global settings.

use super::*;

#[test]
fn first_apply_writes_everything_table_before_vip() {
    let mut r = reconciler();
    let c = config(false, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let dp = r.dataplane();
    assert_eq!(dp.global.hash_seed, 7);
    assert_eq!(dp.global.udp_idle_timeout_ns, 30_000_000_000);
    assert_eq!(dp.vips.len(), 2);
    assert_eq!(dp.backends.len(), 3, "one entry per (VIP, backend) pair");
    // The program must never see a VIP whose table is not written yet.
    let table_at = dp
        .log
        .iter()
        .position(|l| l.starts_with("write_table 0 "))
        .unwrap();
    let vip_at = dp.log.iter().position(|l| l == "set_vip 0").unwrap();
    assert!(table_at < vip_at, "{:?}", dp.log);
    // The table in the map is the one the pure builder gives.
    assert_eq!(active_addresses(&r, &c.vips[0]), planned_addresses(&c));
    // MACs, flags, VIP id and a generation reach the backend entries.
    let e = entry_of(&r, &c, 12);
    assert_eq!(
        (e.dst_mac, e.src_mac, e.ifindex),
        ([2, 0, 0, 0, 0, 12], [2; 6], 2)
    );
    assert_eq!(
        e.flags,
        BACKEND_F_RESOLVED | BACKEND_F_KEEP_FLOWS | BACKEND_F_HEALTHY,
        "an l2 backend never answers with ICMP"
    );
    assert_eq!(e.vip_id, 0);
    assert_ne!(e.generation, 0);
}

#[test]
fn reapplying_the_same_state_writes_nothing() {
    let mut r = reconciler();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let before = r.dataplane().log.len();
    let swaps = r
        .apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    assert!(swaps.is_empty());
    assert_eq!(
        r.dataplane().log.len(),
        before,
        "{:?}",
        &r.dataplane().log[before..]
    );
}

#[test]
fn a_changed_backend_set_goes_to_the_other_half_and_only_that_vip_is_rebuilt() {
    let mut r = reconciler();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let base_before = r.dataplane().vips[&config(false, 1).vips[0].key].table_base;
    let mark = r.dataplane().log.len();
    let c = config(true, 1);
    let swaps = r.apply(&c, &all_up(), &neighbours()).unwrap();
    assert_eq!(swaps, [swap("web", 3, false)]);
    let new = r.dataplane().log[mark..].to_vec();
    let entry = r.dataplane().vips[&c.vips[0].key];
    assert_eq!(entry.table_base, base_before + M, "other half of VIP 0");
    assert_eq!(
        new,
        [
            "set_backend 3".to_string(),
            "zero_traffic None Some(3)".into(),
            "set_backend 3".into(),
            format!("write_table {M} {M}"),
            "set_vip 0".into()
        ]
    );
    assert!(active_addresses(&r, &c.vips[0]).contains(&Some(ip(13))));
    // A weight change flips back to the first half.
    r.apply(&config(true, 3), &all_up(), &neighbours()).unwrap();
    assert_eq!(r.dataplane().vips[&c.vips[0].key].table_base, base_before);
}

#[test]
fn the_vip_filter_admits_old_and_new_vips_during_a_change_and_only_new_ones_after() {
    let mut r = reconciler();
    let c = config(false, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    assert!(FakeDataplane::admits(&r.dataplane().vip_filter, ip(100)));
    let moved = Config::parse(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../config/example.yaml"
        ))
        .unwrap()
        .replace("table_size: 65537", "table_size: 251"),
        Path::new("example.yaml"),
    )
    .unwrap();
    let (mark, filters) = (r.dataplane().log.len(), r.dataplane().vip_filters.len());
    r.apply(&moved, &all_up(), &Neighbours::new()).unwrap();
    let log = &r.dataplane().log[mark..];
    let written = &r.dataplane().vip_filters[filters..];
    let new_vip = IpAddr::from([192, 0, 2, 10]);
    // Widened to both VIPs before any VIP entry changes...
    let first_vip_change = log.iter().position(|l| l.contains("_vip ")).unwrap();
    assert_eq!(
        log[..first_vip_change]
            .iter()
            .filter(|l| *l == "set_vip_filter")
            .count(),
        1,
        "{log:?}"
    );
    assert!(
        FakeDataplane::admits(&written[0], ip(100)) && FakeDataplane::admits(&written[0], new_vip)
    );
    // ...narrowed to the new one after the last.
    assert_eq!(
        log.last().map(String::as_str),
        Some("set_vip_filter"),
        "{log:?}"
    );
    let last = written.last().unwrap();
    assert!(FakeDataplane::admits(last, new_vip));
    assert!(
        !FakeDataplane::admits(last, ip(100)),
        "the old VIP address is filtered out"
    );
}

#[test]
fn a_seed_change_rebuilds_every_table() {
    let mut r = reconciler();
    let c = config(false, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let before = r.dataplane().active_table(&c.vips[0].key).unwrap();
    let mut reseeded = c.clone();
    reseeded.seed = 8;
    let swaps = r.apply(&reseeded, &all_up(), &neighbours()).unwrap();
    assert_eq!(swaps.len(), 2, "both VIPs rebuilt");
    assert_ne!(r.dataplane().active_table(&c.vips[0].key).unwrap(), before);
    let expected = planned_addresses(&reseeded);
    assert_eq!(active_addresses(&r, &c.vips[0]), expected);
}

#[test]
fn a_different_table_size_is_refused() {
    let mut r = Reconciler::new(FakeDataplane::default(), 257, 4);
    let e = r
        .apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap_err();
    assert!(matches!(
        e,
        ReconcileError::TableSizeChanged {
            loaded: 257,
            new: M
        }
    ));
    assert!(r.dataplane().log.is_empty());
}

#[test]
fn tables_built_elsewhere_are_used_and_nothing_is_needed_after() {
    let mut r = reconciler();
    let c = config(false, 1);
    let jobs = r.tables_needed(&c, &all_up());
    assert_eq!(jobs.len(), 2, "web and dns: {jobs:?}");
    // A marker build time tells a provided table from one built in place.
    let marker = Duration::from_secs(42);
    r.provide_tables(jobs.into_iter().map(|j| {
        let (table, _) = j.build();
        (j, table, marker)
    }));
    let swaps = r.apply(&c, &all_up(), &neighbours()).unwrap();
    assert!(swaps.iter().all(|s| s.build == marker), "{swaps:?}");
    assert_eq!(active_addresses(&r, &c.vips[0]), planned_addresses(&c));
    assert!(r.tables_needed(&c, &all_up()).is_empty());
    // A health change needs exactly the affected VIP's table.
    let jobs = r.tables_needed(&c, &down(&c, &[12]));
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].members.len(), 1);
}
