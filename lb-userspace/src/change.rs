//! What a config change does to each VIP, before it is applied: backends
//! added, removed and re-weighted, the share of table slots that change owner
//! (the share of new flows that land elsewhere), and which backends' established
//! flows are re-placed. `lb check-config NEW --against OLD` prints it.

use std::{collections::BTreeSet, fmt::Write as _, net::IpAddr};

use crate::{
    config::{BackendState, Config, Vip},
    maglev::Table,
    reconcile::{plan, plan_vip},
};

/// The change to one VIP, matched by name.
#[derive(Debug, Clone, PartialEq)]
pub struct VipChange {
    pub name: String,
    pub kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Added,
    Removed,
    Changed {
        /// The VIP's address, port or protocol changed.
        moved: bool,
        added: Vec<IpAddr>,
        removed: Vec<IpAddr>,
        /// (address, old weight, new weight)
        reweighted: Vec<(IpAddr, u32, u32)>,
        /// Fraction of table slots whose backend changes, all backends up.
        slots_moved: f64,
        /// Backends whose established flows are re-placed: removed, or
        /// disabled by the change. All others keep theirs.
        flows_replaced: Vec<IpAddr>,
    },
}

/// Each VIP of `old` and `new`, by name, in `new`'s order then the removed.
pub fn diff(old: &Config, new: &Config) -> Vec<VipChange> {
    let old_tables = plan(old);
    let new_tables = plan(new);
    let mut changes: Vec<VipChange> = new_tables
        .iter()
        .map(|(v, table)| {
            let kind = match old_tables.iter().find(|(o, _)| o.name == v.name) {
                None => Kind::Added,
                Some((o, old_table)) => changed(o, old_table, v, table),
            };
            VipChange {
                name: v.name.clone(),
                kind,
            }
        })
        .collect();
    changes.extend(
        old.vips
            .iter()
            .filter(|o| !new.vips.iter().any(|v| v.name == o.name))
            .map(|o| VipChange {
                name: o.name.clone(),
                kind: Kind::Removed,
            }),
    );
    changes
}

fn changed(old: &Vip, old_table: &Table, new: &Vip, new_table: &Table) -> Kind {
    let addresses =
        |v: &Vip| -> BTreeSet<IpAddr> { v.backends.iter().map(|b| b.address).collect() };
    let (before, after) = (addresses(old), addresses(new));
    let reweighted = new
        .backends
        .iter()
        .filter_map(|b| {
            let o = old.backends.iter().find(|o| o.address == b.address)?;
            (o.weight != b.weight).then_some((b.address, o.weight, b.weight))
        })
        .collect();
    let kept = plan_vip(new, |_| true).keep_flows;
    let flows_replaced = old
        .backends
        .iter()
        .filter(|b| b.state != BackendState::Disabled && !kept.contains(&b.address))
        .map(|b| b.address)
        .collect();
    Kind::Changed {
        moved: old.key != new.key,
        added: after.difference(&before).copied().collect(),
        removed: before.difference(&after).copied().collect(),
        reweighted,
        slots_moved: slots_moved(old_table, new_table),
        flows_replaced,
    }
}

/// Fraction of slots whose backend differs between two tables of one size.
fn slots_moved(old: &Table, new: &Table) -> f64 {
    let owner = |t: &Table, s: u32| t.backends.get(s as usize).map(|b| b.address);
    let moved = old
        .slots
        .iter()
        .zip(&new.slots)
        .filter(|&(&a, &b)| owner(old, a) != owner(new, b))
        .count();
    moved as f64 / new.slots.len().max(1) as f64
}

/// The report `check-config --against` prints.
pub fn render(changes: &[VipChange]) -> String {
    let list = |a: &[IpAddr]| {
        a.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::new();
    for c in changes {
        let _ = match &c.kind {
            Kind::Added => writeln!(out, "VIP {}: added", c.name),
            Kind::Removed => writeln!(out, "VIP {}: removed (its flows end)", c.name),
            Kind::Changed {
                moved,
                added,
                removed,
                reweighted,
                slots_moved,
                flows_replaced,
            } => {
                let mut line = format!(
                    "VIP {}: {:.1}% of table slots change backend (that share of new flows lands elsewhere)",
                    c.name,
                    slots_moved * 100.0
                );
                if *moved {
                    line += "; address, port or protocol changes (its flows end)";
                }
                if !added.is_empty() {
                    line += &format!("; added {}", list(added));
                }
                if !removed.is_empty() {
                    line += &format!("; removed {}", list(removed));
                }
                for (a, from, to) in reweighted {
                    line += &format!("; {a} weight {from} -> {to}");
                }
                line += &if flows_replaced.is_empty() {
                    "; established flows all kept".to_string()
                } else {
                    format!("; established flows of {} re-placed", list(flows_replaced))
                };
                writeln!(out, "{line}")
            }
        };
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn config(backends: &[(u8, u32, &str)]) -> Config {
        let list: String = backends
            .iter()
            .map(|(i, w, s)| {
                format!("      - {{ address: 10.0.1.{i}, weight: {w}, state: {s} }}\n")
            })
            .collect();
        let text = format!(
            "interface: eth0\nvips:\n  - name: web\n    address: 10.0.0.100\n    port: 80\n    \
             protocol: tcp\n    forwarding: l2\n    backends:\n{list}"
        );
        Config::parse(&text, Path::new("t.yaml")).expect("valid")
    }

    fn ten() -> Vec<(u8, u32, &'static str)> {
        (1..=10).map(|i| (i, 1, "active")).collect()
    }

    #[test]
    fn adding_one_backend_to_ten_moves_about_one_eleventh_of_the_slots() {
        let mut eleven = ten();
        eleven.push((11, 1, "active"));
        let changes = diff(&config(&ten()), &config(&eleven));
        let [
            VipChange {
                kind:
                    Kind::Changed {
                        added,
                        removed,
                        slots_moved,
                        flows_replaced,
                        ..
                    },
                ..
            },
        ] = changes.as_slice()
        else {
            panic!("{changes:?}");
        };
        assert_eq!(added, &[IpAddr::from([10, 0, 1, 11])]);
        assert!(removed.is_empty() && flows_replaced.is_empty());
        // Maglev's minimal disruption: 1/11 = 9.1% must move to the new
        // backend, and little else does.
        assert!((0.085..0.12).contains(slots_moved), "{slots_moved}");
        assert!(render(&changes).contains("% of table slots change backend"));
    }

    #[test]
    fn removal_reweighting_and_disabling_are_named() {
        let mut new = ten();
        new.retain(|(i, _, _)| *i != 3);
        new[0].1 = 2;
        new[1].2 = "disabled";
        new[2].2 = "drain";
        let changes = diff(&config(&ten()), &config(&new));
        let Kind::Changed {
            removed,
            reweighted,
            flows_replaced,
            slots_moved,
            ..
        } = &changes[0].kind
        else {
            panic!("{changes:?}");
        };
        let ip = |i: u8| IpAddr::from([10, 0, 1, i]);
        assert_eq!(removed, &[ip(3)]);
        assert_eq!(reweighted, &[(ip(1), 1, 2)]);
        // .3 removed and .2 disabled lose their flows; draining .4 keeps its.
        assert_eq!(flows_replaced, &[ip(2), ip(3)]);
        assert!(*slots_moved > 0.2, "{slots_moved}");
        let text = render(&changes);
        assert!(
            text.contains("removed 10.0.1.3") && text.contains("10.0.1.1 weight 1 -> 2"),
            "{text}"
        );
    }

    #[test]
    fn added_and_removed_vips_and_an_unchanged_one() {
        let old = config(&ten());
        let same = diff(&old, &old);
        assert!(
            matches!(&same[0].kind, Kind::Changed { slots_moved, flows_replaced, .. } if *slots_moved == 0.0 && flows_replaced.is_empty())
        );
        let mut renamed = old.clone();
        renamed.vips[0].name = "www".into();
        let kinds: Vec<_> = diff(&old, &renamed)
            .into_iter()
            .map(|c| (c.name, c.kind))
            .collect();
        assert_eq!(
            kinds,
            [("www".into(), Kind::Added), ("web".into(), Kind::Removed)]
        );
    }
}
