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
