//! The report as a table.

use super::{CEILING_SPREAD_WARNING, Report};

/// The report as the table `cargo xtask bench` prints.
pub fn render(r: &Report) -> String {
    let mut out = format!(
        "Machine: {}\n\nPer-packet cost (BPF_PROG_TEST_RUN; ratios to the trivial XDP_TX program in the same round; median [first - third quartile] of rounds)\n",
        r.machine
    );
    if let Some(ceiling) = r.per_packet.first()
        && ceiling.a_ns.spread() > CEILING_SPREAD_WARNING
    {
        out += &format!(
            "WARNING: the trivial XDP_TX program's own time varied by {:.0}% across rounds (min {:.1} ns, max {:.1} ns): the machine was busy, ratios are less certain\n",
            ceiling.a_ns.spread() * 100.0,
            ceiling.a_ns.min,
            ceiling.a_ns.max
        );
    }
    out += &format!(
        "{:<56} {:>22} {:>9} {:>10} {:>22} {:>9}\n",
        "case", "A ratio", "A ns", "target", "B ratio", "B ns"
    );
    for c in &r.per_packet {
        let target = match c.target {
            Some(t) if c.a_ratio.median <= t => format!("<={t} ok"),
            Some(t) => format!("<={t} MISS"),
            None => String::new(),
        };
        let b = match (&c.b_ratio, &c.b_ns) {
            (Some(r), Some(ns)) => (quartiles(r), format!("{:.1}", ns.median)),
            _ => ("n/a".into(), "n/a".into()),
        };
        out += &format!(
            "{:<56} {:>22} {:>9.1} {:>10} {:>22} {:>9}\n",
            c.case,
            quartiles(&c.a_ratio),
            c.a_ns.median,
            target,
            b.0,
            b.1
        );
    }
    let t = &r.throughput;
    out += &format!(
        "\nveth throughput ({} frames of 60 bytes per round; {}):\n  lb {:.0} pps, trivial XDP_TX {:.0} pps, ratio {:.2}x (min {:.2}x), target >= 0.6x {}\n",
        t.frames_per_round,
        t.cpu,
        t.lb_pps.median,
        t.trivial_tx_pps.median,
        t.ratio.median,
        t.ratio.min,
        if t.ratio.median >= 0.6 { "ok" } else { "MISS" }
    );
    out += "\nMaglev table build (median / min ms):\n";
    for m in &r.maglev_build {
        let target = if m.backends == 1000 && m.table_size == 65537 {
            if m.ms.median <= 2.0 {
                "  target <= 2 ms ok"
            } else {
                "  target <= 2 ms MISS"
            }
        } else {
            ""
        };
        out += &format!(
            "  N = {:>4}, M = {:>6}: {:>8.3} / {:>8.3}{target}\n",
            m.backends, m.table_size, m.ms.median, m.ms.min
        );
    }
    out += &format!(
        "\nHealth transition to table swap (rebuild + write + swap, M = 65537, 100 backends): median {:.3} ms, min {:.3} ms\n",
        r.health_transition_to_swap_ms.median, r.health_transition_to_swap_ms.min
    );
    for m in &r.memory {
        out += &format!("\nMap memory, {} (kernel memlock):\n", m.config);
        for (name, bytes) in &m.maps {
            out += &format!("  {name:<14} {:>14}\n", human(*bytes));
        }
        out += &format!("  {:<14} {:>14}\n", "total", human(m.total));
    }
    out
}

/// A ratio's median and interquartile range.
fn quartiles(s: &super::Stats) -> String {
    format!("{:.2}x [{:.2} - {:.2}]", s.median, s.q1, s.q3)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}
