//! A quick run of the whole benchmark (few iterations, no targets asserted),
//! so `cargo xtask bench` cannot rot. Needs root.

use lb_tests::{
    bench::{self, Settings},
    root::root_or_skip,
};

#[test]
fn the_benchmark_runs_and_reports_every_figure() {
    if !root_or_skip("the_benchmark_runs_and_reports_every_figure") {
        return;
    }
    let report = bench::run(&Settings::smoke()).expect("bench runs");
    assert_eq!(report.per_packet.len(), 13);
    for c in &report.per_packet {
        assert!(c.a_ns.median > 0.0 && c.a_ratio.median.is_finite(), "{c:?}");
        assert_eq!(
            c.b_ns.is_some(),
            !c.case.contains("new flow") && !c.case.contains("IPIP") && !c.case.contains("IP6IP6"),
            "method B only where the packet is reusable: {c:?}"
        );
    }
    assert!(
        (report.per_packet[0].a_ratio.median - 1.0).abs() < 1e-9,
        "the ceiling is its own unit"
    );
    let t = &report.throughput;
    assert!(
        t.lb_pps.median > 0.0 && t.trivial_tx_pps.median > 0.0,
        "{t:?}"
    );
    assert_eq!(report.maglev_build.len(), 6);
    assert!(report.health_transition_to_swap_ms.median > 0.0);
    let default = &report.memory[0];
    assert_eq!(default.maps.len(), lb_common::map_names::ALL.len());
    assert!(default.maps["MAGLEV"] >= 16 * 2 * 65537 * 4, "{default:?}");
    let table = bench::render(&report);
    for c in &report.per_packet {
        assert!(table.contains(&c.case));
    }
}
