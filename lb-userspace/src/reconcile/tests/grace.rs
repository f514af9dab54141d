//! The grace a retired table half gets: a rebuild that comes too soon is
//! deferred, not waited for.

use std::time::Instant;

use super::*;

/// Long enough that two applies in a row fall within it even on a loaded
/// machine.
const GRACE: Duration = Duration::from_millis(500);

#[test]
fn a_rebuild_within_the_grace_is_deferred_and_happens_after() {
    let mut r = Reconciler::new(FakeDataplane::default(), M, 4).with_swap_grace(GRACE);
    let three = config(true, 1);
    let web = three.vips[0].key;
    r.apply(&three, &all_up(), &neighbours()).unwrap();
    assert_eq!(r.next_deadline(), None, "nothing waits");
    let table_before = r.dataplane().active_table(&web).unwrap();
    let id13 = r.applied().backend_id(&web, ip(13)).unwrap();

    // .13 leaves right after the first swap: the half to write was active
    // until then.
    let two = config(false, 1);
    let mark = r.dataplane().log.len();
    let started = Instant::now();
    let swaps = r.apply(&two, &all_up(), &neighbours()).unwrap();
    assert!(started.elapsed() < GRACE, "apply does not wait");
    assert!(swaps.is_empty(), "{swaps:?}");
    let deadline = r.next_deadline().expect("the rebuild waits for a deadline");
    let log = &r.dataplane().log[mark..];
    assert!(
        !log.iter()
            .any(|l| l.starts_with("write_table") || l.starts_with("set_vip ")),
        "{log:?}"
    );
    assert_eq!(r.dataplane().active_table(&web).unwrap(), table_before);
    // The active table still names .13, so it keeps its entry and flows.
    assert_eq!(r.applied().backend_id(&web, ip(13)), Some(id13));
    assert_ne!(r.dataplane().backends[&id13].vip_id, NO_VIP);

    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
    let swaps = r.apply(&two, &all_up(), &neighbours()).unwrap();
    assert_eq!(swaps, [swap("web", 2, false)]);
    assert_eq!(r.next_deadline(), None);
    assert_eq!(active_addresses(&r, &two.vips[0]), planned_addresses(&two));
    let gone = r.dataplane().backends[&id13];
    assert_eq!((gone.flags, gone.vip_id), (0, NO_VIP), "released after");
}

#[test]
fn a_deferred_rebuild_no_longer_needed_stops_waiting() {
    let mut r = Reconciler::new(FakeDataplane::default(), M, 4).with_swap_grace(GRACE);
    let three = config(true, 1);
    r.apply(&three, &all_up(), &neighbours()).unwrap();
    r.apply(&config(false, 1), &all_up(), &neighbours())
        .unwrap();
    assert!(r.next_deadline().is_some());
    // Back to the members of the active table before the deadline.
    let swaps = r.apply(&three, &all_up(), &neighbours()).unwrap();
    assert!(swaps.is_empty());
    assert_eq!(r.next_deadline(), None);
    assert_eq!(
        active_addresses(&r, &three.vips[0]),
        planned_addresses(&three)
    );
}

#[test]
fn a_new_vip_is_never_deferred() {
    let mut r = Reconciler::new(FakeDataplane::default(), M, 4).with_swap_grace(GRACE);
    let c = config(false, 1);
    let swaps = r.apply(&c, &all_up(), &neighbours()).unwrap();
    assert_eq!(swaps.len(), 2, "both VIPs built at once");
    assert_eq!(r.next_deadline(), None);
}
