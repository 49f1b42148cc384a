//! Who holds what: the share of each projection's units a process plans to hold, from
//! the live processes and the units as a tick read them. Pure, so that the fairness of
//! the sharing is tested without a database.

use std::collections::{BTreeMap, BTreeSet};

use keel_schemas::TopicPartition;
use uuid::Uuid;

use super::{Member, Unit, UnitRow};

/// What one tick does: the units this process keeps, claims and releases.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Plan {
    /// How many units this process should hold, over its projections.
    pub(super) share: usize,
    pub(super) kept: Vec<(&'static str, Unit)>,
    pub(super) claim: Vec<(&'static str, TopicPartition)>,
    pub(super) release: Vec<(&'static str, TopicPartition)>,
}

impl Plan {
    /// The plan of process `me` among `members` (the live processes, sorted by id, with
    /// the projections each runs), for the projections it runs, `projections`, over every
    /// unit as `rows` hold them. Each projection's units are shared by the members that run
    /// it: as many each as divide evenly, and the ones left over one each to the members in
    /// turn, the turn carrying on from projection to projection (all of them, in name
    /// order, so that every member reckons the same turns), and no member collects every
    /// projection's leftover. A member holding more than its share of a projection lets
    /// the last go; one holding fewer claims free units up to it.
    pub(super) fn of(
        me: Uuid,
        members: &[Member],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &[UnitRow],
    ) -> Self {
        let mut plan = Plan::default();
        let mut turn = 0;
        let names: BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        for every in names {
            let mut running: Vec<Uuid> = members
                .iter()
                .filter(|(_, runs)| runs.iter().any(|r| r == every))
                .map(|(id, _)| *id)
                .collect();
            let name = projections.keys().copied().find(|n| *n == every);
            if name.is_some() && !running.contains(&me) {
                running.push(me);
                running.sort();
            }
            let total = rows.iter().filter(|r| r.0 == every).count();
            let count = running.len().max(1);
            let left_over = total % count;
            let first_extra = turn % count;
            turn += left_over;
            // Only the projections this process runs are its to plan.
            let Some(name) = name else {
                continue;
            };
            let rank = running.iter().position(|m| *m == me).unwrap_or(0);
            let (mut mine, mut free) = (Vec::new(), Vec::new());
            for (projection, topic, partition, holder, alive, claims) in rows {
                if projection != name {
                    continue;
                }
                let at = TopicPartition::new(topic.clone(), *partition);
                if *holder == Some(me) {
                    mine.push(Unit { at, claim: *claims });
                } else if holder.is_none() || !alive {
                    free.push(at);
                }
            }
            let share =
                total / count + usize::from((rank + count - first_extra) % count < left_over);
            plan.share += share;
            while mine.len() > share {
                if let Some(unit) = mine.pop() {
                    plan.release.push((name, unit.at));
                }
            }
            let wanted = share - mine.len();
            for at in free.into_iter().take(wanted) {
                plan.claim.push((name, at));
            }
            plan.kept.extend(mine.into_iter().map(|unit| (name, unit)));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn projections(units: &[(&'static str, i32)]) -> BTreeMap<&'static str, Vec<TopicPartition>> {
        units
            .iter()
            .map(|(name, partitions)| {
                (
                    *name,
                    (0..*partitions)
                        .map(|p| TopicPartition::new(format!("{name}.events"), p))
                        .collect(),
                )
            })
            .collect()
    }

    /// Runs the plans of `members` in turn (each sees the others' claims and releases) until
    /// nobody changes anything; returns how many units each holds.
    fn settle(
        members: &[Uuid],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &mut [UnitRow],
    ) -> Vec<usize> {
        let running: Vec<Member> = members
            .iter()
            .map(|m| (*m, projections.keys().map(|n| n.to_string()).collect()))
            .collect();
        settle_running(&running, projections, rows)
    }

    /// [`settle`] with members that may run different projections.
    fn settle_running(
        members: &[Member],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &mut [UnitRow],
    ) -> Vec<usize> {
        for _ in 0..20 {
            let mut changed = false;
            for (me, runs) in members {
                let mine: BTreeMap<&'static str, Vec<TopicPartition>> = projections
                    .iter()
                    .filter(|(n, _)| runs.iter().any(|r| r == *n))
                    .map(|(n, u)| (*n, u.clone()))
                    .collect();
                let plan = Plan::of(*me, members, &mine, rows);
                for row in rows.iter_mut() {
                    let at = TopicPartition::new(row.1.clone(), row.2);
                    if plan.release.iter().any(|(n, u)| *n == row.0 && *u == at) {
                        row.3 = None;
                        row.4 = false;
                        changed = true;
                    }
                    if plan.claim.iter().any(|(n, u)| *n == row.0 && *u == at) {
                        row.3 = Some(*me);
                        row.4 = true;
                        row.5 += 1;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        members
            .iter()
            .map(|(m, _)| rows.iter().filter(|r| r.3 == Some(*m)).count())
            .collect()
    }

    fn rows_of(projections: &BTreeMap<&'static str, Vec<TopicPartition>>) -> Vec<UnitRow> {
        projections
            .iter()
            .flat_map(|(name, units)| {
                units.iter().map(|at| {
                    (
                        name.to_string(),
                        at.topic.clone(),
                        at.partition,
                        None,
                        false,
                        0,
                    )
                })
            })
            .collect()
    }

    #[test]
    fn shares_settle_within_one_of_each_other_as_processes_join_and_leave() {
        let projections = projections(&[("orders", 8), ("daily_sales", 8), ("audit_log", 24)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        for n in 1..=4 {
            let counts = settle(&ids[..n], &projections, &mut rows);
            assert_eq!(
                counts.iter().sum::<usize>(),
                40,
                "every unit held: {counts:?}"
            );
            let (most, fewest) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
            assert!(most - fewest <= 1, "{n} processes: {counts:?}");
        }
        // One dies: its units are free once its heartbeat expired.
        let dead = ids.remove(1);
        for row in rows.iter_mut().filter(|r| r.3 == Some(dead)) {
            row.4 = false;
        }
        let counts = settle(&ids, &projections, &mut rows);
        assert_eq!(counts.iter().sum::<usize>(), 40, "{counts:?}");
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
    }

    #[test]
    fn each_projection_is_spread_over_the_processes_too() {
        let projections = projections(&[("orders", 8), ("customers", 8)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        settle(&ids, &projections, &mut rows);
        for name in ["orders", "customers"] {
            for id in &ids {
                let held = rows
                    .iter()
                    .filter(|r| r.0 == name && r.3 == Some(*id))
                    .count();
                assert_eq!(held, 4, "{name} on {id}");
            }
        }
    }

    #[test]
    fn a_process_keeps_what_it_holds_within_its_share() {
        let projections = projections(&[("orders", 4)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        settle(&ids, &projections, &mut rows);
        let members: Vec<Member> = ids.iter().map(|id| (*id, vec!["orders".into()])).collect();
        let plan = Plan::of(ids[0], &members, &projections, &rows);
        assert!(plan.claim.is_empty() && plan.release.is_empty(), "{plan:?}");
        assert_eq!(plan.kept.len(), 2);
    }

    /// Processes that run different projections (one standing by for a projection newer
    /// code rebuilt, one started with `--projection`): every unit is held all the same,
    /// each by a process that runs its projection.
    #[test]
    fn every_unit_is_held_when_processes_run_different_projections() {
        let projections = projections(&[("orders", 4), ("customers", 8)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        let members: Vec<Member> = vec![
            (ids[0], vec!["customers".into()]),
            (ids[1], vec!["orders".into(), "customers".into()]),
            (ids[2], vec!["orders".into()]),
        ];
        let counts = settle_running(&members, &projections, &mut rows);
        assert_eq!(
            counts.iter().sum::<usize>(),
            12,
            "every unit held: {counts:?}"
        );
        for name in ["orders", "customers"] {
            let holders: BTreeSet<Uuid> = rows
                .iter()
                .filter(|r| r.0 == name)
                .filter_map(|r| r.3)
                .collect();
            for (id, runs) in &members {
                assert_eq!(
                    holders.contains(id),
                    runs.iter().any(|r| r == name),
                    "{name} held by exactly those that run it"
                );
            }
        }
    }
}
