//! Ids of removed VIPs and backends, and adopting the maps of a previous run.

use super::*;

#[test]
fn a_removed_backend_is_invalidated_and_its_id_reused_with_a_new_generation() {
    let mut r = reconciler().with_id_quarantine(Duration::ZERO);
    let c = config(true, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let old = entry_of(&r, &c, 13);
    let id = r.applied.backend_ids[&(c.vips[0].key, ip(13))];
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let gone = r.dataplane().backends[&id];
    assert_eq!(
        (gone.flags, gone.vip_id),
        (0, NO_VIP),
        "its flows are re-placed"
    );
    // Another backend takes the id; flows of the old one cannot follow it.
    let c2 = config_with(
        &backends(&[(11, 1, "active"), (12, 1, "active"), (14, 1, "active")]),
        "fail_open",
    );
    r.apply(&c2, &all_up(), &neighbours()).unwrap();
    let reused = r.dataplane().backends[&id];
    assert_eq!(key_addr(reused.addr), ip(14));
    assert_ne!(reused.generation, old.generation);
}

#[test]
fn freed_ids_are_not_reused_while_a_packet_may_still_hold_them() {
    let mut r = reconciler();
    let c = config(true, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let web = c.vips[0].key;
    let id13 = r.applied().backend_id(&web, ip(13)).unwrap();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let c14 = config_with(
        &backends(&[(11, 1, "active"), (12, 1, "active"), (14, 1, "active")]),
        "fail_open",
    );
    r.apply(&c14, &all_up(), &neighbours()).unwrap();
    assert_ne!(
        r.applied().backend_id(&web, ip(14)),
        Some(id13),
        "quarantined id not reused at once"
    );
}

#[test]
fn a_removed_vip_is_removed_and_its_id_reused() {
    let mut r = reconciler().with_id_quarantine(Duration::ZERO);
    let c = config(false, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let mut only_dns = c.clone();
    only_dns.vips.remove(0);
    r.apply(&only_dns, &all_up(), &neighbours()).unwrap();
    assert!(!r.dataplane().vips.contains_key(&c.vips[0].key));
    assert_eq!(r.dataplane().vips.len(), 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    assert_eq!(r.dataplane().vips[&c.vips[0].key].id, 0, "lowest free id");
}

#[test]
fn adoption_keeps_ids_health_and_tables() {
    let mut r = reconciler();
    let c = config(true, 1);
    r.apply(&c, &down(&c, &[13]), &neighbours()).unwrap();
    let before_vips = r.dataplane().vips.clone();
    let before_backends = r.dataplane().backends.clone();
    let table_before = r.dataplane().active_table(&c.vips[0].key).unwrap();
    let mut dp = std::mem::take(&mut r.dp);
    dp.log.clear();

    let (mut adopted, health) = Reconciler::adopt(dp, M, 4).unwrap();
    assert!(
        adopted.dataplane().log.is_empty(),
        "adoption writes nothing"
    );
    assert!(!health[&(c.vips[0].key, ip(13))]);
    assert!(health[&(c.vips[0].key, ip(11))]);
    adopted.apply(&c, &health, &neighbours()).unwrap();
    let dp = adopted.dataplane();
    // Same ids and generations; one rebuild into the other half gives the
    // identical table, so no flow moves.
    assert_eq!(dp.backends, before_backends);
    assert_eq!(dp.active_table(&c.vips[0].key).unwrap(), table_before);
    for (k, e) in &before_vips {
        assert_eq!(dp.vips[k].id, e.id);
    }
    // A new backend gets a generation never used before.
    adopted
        .apply(
            &config_with(
                &backends(&[(11, 1, "active"), (14, 1, "active")]),
                "fail_open",
            ),
            &health,
            &neighbours(),
        )
        .unwrap();
    let max_before = before_backends
        .values()
        .map(|e| e.generation)
        .max()
        .unwrap();
    let new = adopted
        .dataplane()
        .backends
        .values()
        .find(|e| key_addr(e.addr) == ip(14))
        .unwrap();
    assert!(new.generation > max_before);
}

#[test]
fn adoption_refuses_maps_of_another_layout() {
    let mut r = reconciler();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    let mut dp = std::mem::take(&mut r.dp);
    dp.global.layout_version = lb_common::LAYOUT_VERSION + 1;
    assert!(matches!(
        Reconciler::adopt(dp, M, 4),
        Err(ReconcileError::Layout { .. })
    ));
}

/// `web` and `dns` of [`config`] with `web` at `address`, and a reconciler
/// with room for exactly two VIPs.
fn at_capacity(web_address: &str) -> (Reconciler<FakeDataplane>, Config) {
    let r = Reconciler::new(FakeDataplane::default(), M, 2).with_swap_grace(Duration::ZERO);
    let mut c = config(false, 1);
    c.vips[0].address = web_address.parse().unwrap();
    c.vips[0].key = VipKey::new(c.vips[0].address, c.vips[0].port, 6);
    (r, c)
}

#[test]
fn at_capacity_a_vip_that_changes_address_keeps_its_ids_and_applies_whole() {
    let (mut r, c) = at_capacity("10.0.0.100");
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let (old_key, id) = (c.vips[0].key, r.dataplane().vips[&c.vips[0].key].id);
    let backend = r.applied().backend_id(&old_key, ip(11)).unwrap();
    let dns = r.dataplane().vips[&c.vips[1].key];

    let (_, moved) = at_capacity("10.0.0.101");
    r.apply(&moved, &all_up(), &neighbours()).unwrap();
    let new_key = moved.vips[0].key;
    let dp = r.dataplane();
    assert!(!dp.vips.contains_key(&old_key), "the old address is gone");
    assert_eq!(dp.vips[&new_key].id, id, "the VIP kept its id");
    assert_eq!(r.applied().backend_id(&new_key, ip(11)), Some(backend));
    assert_eq!(dp.vips[&moved.vips[1].key], dns, "dns untouched");
    assert_eq!(
        active_addresses(&r, &moved.vips[0]),
        planned_addresses(&moved)
    );
    assert!(FakeDataplane::admits(&dp.vip_filter, moved.vips[0].address));
}

#[test]
fn at_capacity_a_new_vip_takes_over_a_removed_vips_id_with_fresh_counters() {
    let (mut r, c) = at_capacity("10.0.0.100");
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let web_id = r.dataplane().vips[&c.vips[0].key].id;
    let mut other = c.clone();
    other.vips[0].name = "other".into();
    other.vips[0].address = "10.0.0.102".parse().unwrap();
    other.vips[0].key = VipKey::new(other.vips[0].address, 80, 6);
    r.dp.log.clear();
    r.apply(&other, &all_up(), &neighbours()).unwrap();
    let dp = r.dataplane();
    assert_eq!(dp.vips[&other.vips[0].key].id, web_id);
    assert!(
        dp.log
            .contains(&format!("zero_traffic Some({web_id}) None")),
        "{:?}",
        dp.log
    );
    // The old VIP's backends were released, the new VIP's got fresh ids
    // (quarantined ones are not reused across VIPs).
    assert!(r.applied().backend_ids(&c.vips[0].key).next().is_none());
    assert_eq!(
        active_addresses(&r, &other.vips[0]),
        planned_addresses(&other)
    );
}

#[test]
fn a_change_that_does_not_fit_writes_nothing_and_says_whether_it_ever_will() {
    // Two VIPs in a reconciler with room for one: never fits.
    let mut r = Reconciler::new(FakeDataplane::default(), M, 1).with_swap_grace(Duration::ZERO);
    let c = config(false, 1);
    let e = r.apply(&c, &all_up(), &neighbours()).unwrap_err();
    assert!(
        matches!(
            e,
            ReconcileError::NoRoom {
                what: "VIP",
                needed: 2,
                free: 1,
                retry_at: None,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.retry_at(Instant::now()).is_none());
    assert!(r.dataplane().log.is_empty(), "{:?}", r.dataplane().log);

    // Backends: every id of another VIP is in quarantine, so a new backend
    // elsewhere waits for it; nothing is written meanwhile.
    let mut r = reconciler();
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let mut only_dns = c.clone();
    only_dns.vips.remove(0);
    r.apply(&only_dns, &all_up(), &neighbours()).unwrap();
    let written = r.dataplane().log.len();
    // Shrink the backend pool to the three ids in use: dns's, and web's two,
    // in quarantine since web left.
    r.ids.backends = ids::IdPool::new("backend", 3);
    for id in 0..3 {
        r.ids.backends.claim(id);
    }
    let now = Instant::now();
    let web_ids = [0, 1, 2].into_iter().filter(|id| {
        r.applied()
            .backend_ids(&only_dns.vips[0].key)
            .all(|(_, used)| used != *id)
    });
    for id in web_ids.collect::<Vec<_>>() {
        r.ids.backends.release(id, now);
    }
    let e = r.apply(&c, &all_up(), &neighbours()).unwrap_err();
    let ReconcileError::NoRoom {
        what: "backend",
        retry_at: Some(at),
        ..
    } = e
    else {
        panic!("{e}");
    };
    assert!(at > Instant::now());
    assert_eq!(r.dataplane().log.len(), written, "nothing written");
}

#[test]
fn a_replaced_backend_lends_its_id_to_its_successor_in_the_same_vip() {
    let mut r = reconciler();
    let c = config(true, 1);
    r.apply(&c, &all_up(), &neighbours()).unwrap();
    let web = c.vips[0].key;
    let id13 = r.applied().backend_id(&web, ip(13)).unwrap();
    let generation = r.dataplane().backends[&id13].generation;
    let c14 = config_with(
        &backends(&[(11, 1, "active"), (12, 1, "active"), (14, 1, "active")]),
        "fail_open",
    );
    r.apply(&c14, &all_up(), &neighbours()).unwrap();
    assert_eq!(r.applied().backend_id(&web, ip(14)), Some(id13));
    assert_eq!(r.applied().backend_id(&web, ip(13)), None);
    let entry = r.dataplane().backends[&id13];
    assert_eq!(key_addr(entry.addr), ip(14));
    assert_ne!(entry.generation, generation, "old flows cannot follow");
}
