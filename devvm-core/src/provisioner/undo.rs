//! Undoing steps (rollback, deprovision, recovery), each checked for ownership by its
//! backend, bounded by the step's time limit, and retried after a transient failure.

use super::*;

pub(super) fn resource(step: Step, key: &UndoKey) -> String {
    let vm = &key.vm;
    let host = key
        .host
        .as_ref()
        .map(|h| format!(" on {h}"))
        .unwrap_or_default();
    match step {
        Step::User => format!("user check of vm {vm}"),
        Step::Placement => format!("placement slot of vm {vm}"),
        Step::Ip => format!("ip lease of vm {vm}"),
        Step::Dns => match key.ip {
            Some(ip) => format!("dns records of vm {vm} ({ip})"),
            None => format!("dns records of vm {vm}"),
        },
        Step::Image => format!("template for vm {vm}"),
        Step::Disk => format!("disk of vm {vm}{host}"),
        Step::Domain => format!("domain {vm}{host}"),
        Step::Bootstrap => format!("bootstrap registration of vm {vm}"),
    }
}

/// Undoes one step of the run `owner`, within the step's own time limit.
pub(super) async fn undo_one(
    b: &Backends,
    step: Step,
    key: &UndoKey,
    owner: &RequestId,
    limit: Duration,
) -> Result<Undone> {
    let (vm, host, owner) = (key.vm.clone(), key.host.clone(), owner.clone());
    match step {
        // Looking up a user and caching a template hold nothing for the VM.
        Step::User | Step::Image => Ok(Undone::Absent),
        Step::Placement => {
            let p = b.placement.clone();
            guarded(async move { p.release(&vm, &owner).await }, limit, None).await
        }
        Step::Ip => {
            let ip = b.ip.clone();
            guarded(async move { ip.release(&vm, &owner).await }, limit, None).await
        }
        Step::Dns => match key.ip {
            Some(addr) => {
                let dns = b.dns.clone();
                guarded(async move { dns.remove(&vm, addr).await }, limit, None).await
            }
            None => Ok(Undone::Absent),
        },
        Step::Disk => match host {
            Some(h) => {
                let images = b.images.clone();
                guarded(
                    async move { images.delete_disk(&vm, &h, &owner).await },
                    limit,
                    None,
                )
                .await
            }
            None => Ok(Undone::Absent),
        },
        Step::Domain => match host {
            Some(h) => {
                let hv = b.hypervisor.clone();
                guarded(
                    async move { hv.destroy(&vm, &h, &owner).await },
                    limit,
                    None,
                )
                .await
            }
            None => Ok(Undone::Absent),
        },
        Step::Bootstrap => {
            let bs = b.bootstrap.clone();
            guarded(async move { bs.unregister(&vm, &owner).await }, limit, None).await
        }
    }
}

/// Undoes `todo` in reverse pipeline order. Every undo is tried even if an earlier one
/// failed; each outcome is recorded, and the failures are returned.
pub(super) async fn undo_steps(
    inner: &Arc<Inner>,
    id: &RequestId,
    rec: &Recorder,
    mut todo: Vec<(Step, UndoKey)>,
) -> Vec<UndoFailure> {
    todo.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut failures = Vec::new();
    for (step, key) in todo {
        // A transient failure of an undo is retried like an act's: what is not undone
        // now stays held until recover() runs.
        let limit = inner.timeouts.get(step);
        let progress = rec.progress(step);
        let outcome = with_retries(&inner.retries, step, &progress, || {
            undo_one(&inner.backends, step, &key, id, limit)
        })
        .await
        .map_err(|e| e.or_step(step).or_backend(inner.backends.name_of(step)));
        if let Ok(Undone::Foreign { holder }) = &outcome {
            rec.left_alone(step, resource(step, &key), holder.clone());
        }
        failures.extend(rec.undone(step, &key, outcome.map(drop)).await);
    }
    failures
}
