//! The fleet's view: each host's use, and the moves that empty a host (`drain`) or even
//! out the hosts (`rebalance`), planned from that view alone (sans-I/O) and carried out
//! one live migration at a time.

use std::collections::BTreeMap;

use super::*;
use crate::types::{HostUsage, Move};

impl Provisioner {
    /// Each placement host with its capacity, what is used, and its VMs, read now.
    pub async fn hosts(&self) -> Result<Vec<HostUsage>> {
        self.inner.backends.placement.usage().await
    }

    /// Moves every VM of this provisioner's off `host`, each to the other host with the
    /// most free memory that has room, one live migration at a time; with `dry_run` only
    /// says which moves it would make. The whole plan is made first: when some VM fits on
    /// no other host, nothing moves ([`ErrorKind::Exhausted`]). VMs devvm did not make are
    /// not moved. Stops at the first failed move (the moves before it stand).
    pub async fn drain(&self, host: &HostId, dry_run: bool) -> Result<Vec<Move>> {
        let (usage, sizes) = self.fleet_view().await?;
        let moves = plan_drain(&usage, &sizes, host)?;
        self.carry_out(moves, dry_run).await
    }

    /// Moves VMs so that no host is above its capacity and the hosts' VM counts differ by
    /// at most one, where VMs fit; with `dry_run` only says which moves it would make.
    /// Stops at the first failed move (the moves before it stand).
    pub async fn rebalance(&self, dry_run: bool) -> Result<Vec<Move>> {
        let (usage, sizes) = self.fleet_view().await?;
        let moves = plan_rebalance(&usage, &sizes);
        self.carry_out(moves, dry_run).await
    }

    async fn fleet_view(&self) -> Result<(Vec<HostUsage>, BTreeMap<VmName, VmSize>)> {
        let usage = self.hosts().await?;
        let sizes = self.inner.journal(|j| j.active_sizes()).await?;
        Ok((usage, sizes))
    }

    async fn carry_out(&self, moves: Vec<Move>, dry_run: bool) -> Result<Vec<Move>> {
        if !dry_run {
            for m in &moves {
                self.migrate(&m.vm, &m.to).await?;
            }
        }
        Ok(moves)
    }
}

fn free_memory(h: &HostUsage) -> u64 {
    h.capacity.memory_mib.saturating_sub(h.used.memory_mib)
}

fn take(h: &mut HostUsage, vm: &VmName, size: &VmSize) {
    h.vms.retain(|v| v != vm);
    h.used.vcpus = h.used.vcpus.saturating_sub(size.vcpus);
    h.used.memory_mib = h.used.memory_mib.saturating_sub(size.memory_mib);
    h.used.disk_gib = h.used.disk_gib.saturating_sub(size.disk_gib);
}

fn put(h: &mut HostUsage, vm: &VmName, size: &VmSize) {
    h.vms.push(vm.clone());
    h.used.vcpus += size.vcpus;
    h.used.memory_mib += size.memory_mib;
    h.used.disk_gib += size.disk_gib;
}

fn over(h: &HostUsage) -> bool {
    h.used.vcpus > h.capacity.vcpus
        || h.used.memory_mib > h.capacity.memory_mib
        || h.used.disk_gib > h.capacity.disk_gib
}

/// The moves that empty `host` of the VMs in `sizes` (this provisioner's), each to the
/// reachable other host with the most free memory that fits it (sans-I/O).
pub(super) fn plan_drain(
    usage: &[HostUsage],
    sizes: &BTreeMap<VmName, VmSize>,
    host: &HostId,
) -> Result<Vec<Move>> {
    let mut hosts = usage.to_vec();
    let Some(src) = hosts.iter().position(|h| &h.host == host) else {
        return Err(Error::not_found(format!("{host} is not a placement host")));
    };
    if !hosts[src].reachable {
        // Its VMs cannot be read: "nothing to move" would be a guess.
        return Err(Error::unavailable(format!(
            "{host} does not answer; cannot tell which vms to move off it"
        )));
    }
    let mut moves = Vec::new();
    for vm in hosts[src].vms.clone() {
        let Some(size) = sizes.get(&vm) else {
            continue;
        };
        let target = hosts
            .iter()
            .enumerate()
            .filter(|(i, h)| *i != src && h.reachable && h.fits(size))
            .max_by_key(|(_, h)| free_memory(h))
            .map(|(i, _)| i)
            .ok_or_else(|| {
                Error::exhausted(format!(
                    "no other host has room for {vm}; nothing was moved"
                ))
            })?;
        take(&mut hosts[src], &vm, size);
        put(&mut hosts[target], &vm, size);
        moves.push(Move {
            vm,
            from: host.clone(),
            to: hosts[target].host.clone(),
        });
    }
    Ok(moves)
}

/// Moves (of VMs in `sizes`) that bring every host within its capacity and the VM counts
/// of the reachable hosts within one of each other, as far as VMs fit (sans-I/O).
pub(super) fn plan_rebalance(usage: &[HostUsage], sizes: &BTreeMap<VmName, VmSize>) -> Vec<Move> {
    let mut hosts: Vec<HostUsage> = usage.iter().filter(|h| h.reachable).cloned().collect();
    let mut moves = Vec::new();
    let limit = sizes.len() * hosts.len().max(1);
    while moves.len() < limit {
        // From a host above its capacity, else from the one with the most VMs.
        let src = hosts.iter().position(over).or_else(|| {
            hosts
                .iter()
                .enumerate()
                .max_by_key(|(_, h)| h.vms.len())
                .map(|(i, _)| i)
        });
        let Some(src) = src else { break };
        let fewest = hosts
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != src)
            .map(|(_, h)| h.vms.len())
            .min();
        let Some(fewest) = fewest else { break };
        if !over(&hosts[src]) && hosts[src].vms.len() <= fewest + 1 {
            break;
        }
        // The smallest of our VMs there that fits on a host with the fewest VMs.
        let mut candidates: Vec<(VmName, VmSize)> = hosts[src]
            .vms
            .iter()
            .filter_map(|v| sizes.get(v).map(|s| (v.clone(), *s)))
            .collect();
        candidates.sort_by_key(|(v, s)| (s.memory_mib, s.vcpus, s.disk_gib, v.clone()));
        let choice = candidates.into_iter().find_map(|(vm, size)| {
            hosts
                .iter()
                .enumerate()
                .filter(|(i, h)| {
                    *i != src
                        && h.fits(&size)
                        && (over(&hosts[src]) || h.vms.len() + 1 < hosts[src].vms.len())
                })
                .min_by_key(|(_, h)| h.vms.len())
                .map(|(i, _)| (vm, size, i))
        });
        let Some((vm, size, dst)) = choice else { break };
        take(&mut hosts[src], &vm, &size);
        put(&mut hosts[dst], &vm, &size);
        moves.push(Move {
            vm,
            from: hosts[src].host.clone(),
            to: hosts[dst].host.clone(),
        });
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(s: &str) -> VmName {
        VmName::new(s).unwrap()
    }

    fn size(memory_mib: u64) -> VmSize {
        VmSize {
            vcpus: 1,
            memory_mib,
            disk_gib: 1,
        }
    }

    fn host(name: &str, memory_mib: u64, vms: &[(&str, u64)]) -> HostUsage {
        let mut h = HostUsage {
            host: HostId::new(name).unwrap(),
            reachable: true,
            capacity: VmSize {
                vcpus: 100,
                memory_mib,
                disk_gib: 100,
            },
            used: VmSize {
                vcpus: 0,
                memory_mib: 0,
                disk_gib: 0,
            },
            vms: Vec::new(),
            templates: Vec::new(),
        };
        for (v, m) in vms {
            put(&mut h, &vm(v), &size(*m));
        }
        h
    }

    fn sizes(usage: &[HostUsage], mem: &[(&str, u64)]) -> BTreeMap<VmName, VmSize> {
        let _ = usage;
        mem.iter().map(|(v, m)| (vm(v), size(*m))).collect()
    }

    #[test]
    fn a_drain_empties_the_host_onto_the_freest_hosts_or_moves_nothing() {
        let usage = vec![
            host("a", 1000, &[("v1", 300), ("v2", 300)]),
            host("b", 1000, &[("w", 600)]),
            host("c", 1000, &[]),
        ];
        let s = sizes(&usage, &[("v1", 300), ("v2", 300)]);
        let moves = plan_drain(&usage, &s, &HostId::new("a").unwrap()).unwrap();
        let to: Vec<&str> = moves.iter().map(|m| m.to.as_str()).collect();
        assert_eq!(
            to,
            vec!["c", "c"],
            "c has the most room, even after the first"
        );
        // A VM that fits nowhere: no plan at all.
        let usage = vec![host("a", 1000, &[("big", 900)]), host("b", 500, &[])];
        let s = sizes(&usage, &[("big", 900)]);
        let e = plan_drain(&usage, &s, &HostId::new("a").unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        // A host that does not answer: its vms are unknown, so no plan either.
        let mut down = host("a", 1000, &[]);
        down.reachable = false;
        let usage = vec![down, host("b", 1000, &[])];
        let e = plan_drain(&usage, &s, &HostId::new("a").unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        // Not ours (not in sizes): left where it is.
        let usage = vec![host("a", 1000, &[("theirs", 100)]), host("b", 1000, &[])];
        assert!(
            plan_drain(&usage, &BTreeMap::new(), &HostId::new("a").unwrap())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_rebalance_evens_the_counts_and_empties_overfull_hosts() {
        let usage = vec![
            host(
                "a",
                10_000,
                &[("v1", 100), ("v2", 100), ("v3", 100), ("v4", 100)],
            ),
            host("b", 10_000, &[]),
        ];
        let s = sizes(
            &usage,
            &[("v1", 100), ("v2", 100), ("v3", 100), ("v4", 100)],
        );
        let moves = plan_rebalance(&usage, &s);
        assert_eq!(moves.len(), 2, "{moves:?}");
        assert!(
            moves
                .iter()
                .all(|m| m.from.as_str() == "a" && m.to.as_str() == "b")
        );
        // Balanced already: nothing to do.
        let usage = vec![
            host("a", 10_000, &[("v1", 100)]),
            host("b", 10_000, &[("v2", 100)]),
        ];
        let s = sizes(&usage, &[("v1", 100), ("v2", 100)]);
        assert!(plan_rebalance(&usage, &s).is_empty());
        // Above capacity (it shrank): moved off even though counts are even.
        let mut a = host("a", 10_000, &[("v1", 600), ("v2", 600)]);
        a.capacity.memory_mib = 1000;
        let usage = vec![a, host("b", 10_000, &[("w1", 100), ("w2", 100)])];
        let s = sizes(&usage, &[("v1", 600), ("v2", 600)]);
        let moves = plan_rebalance(&usage, &s);
        assert_eq!(moves.len(), 1, "{moves:?}");
        assert_eq!(moves[0].to.as_str(), "b");
        // An unreachable host is neither source nor target.
        let mut b = host("b", 10_000, &[]);
        b.reachable = false;
        let usage = vec![host("a", 10_000, &[("v1", 1), ("v2", 1), ("v3", 1)]), b];
        let s = sizes(&usage, &[("v1", 1), ("v2", 1), ("v3", 1)]);
        assert!(plan_rebalance(&usage, &s).is_empty());
    }
}
