//! The journal store's contract, run against each store: SQLite always, PostgreSQL when
//! the lab's database is configured (`DEVVM_LAB_PG_URL`; required under
//! `DEVVM_REQUIRE_LAB=1`). Names are random, so runs of the suite share a database.

use std::net::Ipv4Addr;
#[cfg(feature = "postgres")]
use std::path::Path;

use super::*;
use crate::ErrorKind;
use crate::types::{BootstrapSettings, TemplateName, UserName, VmSize};

/// Opens a journal store for the owner given, on the one shared journal under test.
type Open<'a> = &'a dyn Fn(&str) -> Journal;

fn random(prefix: &str) -> String {
    let id = RequestId::random().to_string();
    format!("{prefix}{}", &id[..8])
}

fn request(vm: &VmName) -> ResolvedRequest {
    ResolvedRequest {
        request_id: RequestId::random(),
        user: UserName::new("alice").unwrap(),
        name: vm.clone(),
        template: TemplateName::new("t").unwrap(),
        size: VmSize::default(),
        bootstrap: BootstrapSettings::default(),
    }
}

fn key(vm: &VmName, host: Option<&str>) -> UndoKey {
    UndoKey {
        vm: vm.clone(),
        host: host.map(|h| HostId::new(h).unwrap()),
        ip: None,
    }
}

fn vm_record(req: &ResolvedRequest, host: &str) -> Vm {
    Vm {
        name: req.name.clone(),
        fqdn: format!("{}.lab.example", req.name),
        ip: Ipv4Addr::new(10, 0, 0, 5).into(),
        host: HostId::new(host).unwrap(),
        disk: format!("/pool/{}.qcow2", req.name).into(),
        owner: req.user.clone(),
        template: req.template.clone(),
        created: time::OffsetDateTime::UNIX_EPOCH,
        request_id: req.request_id.clone(),
        bootstrapped: false,
    }
}

/// Every rule of the contract, on the journal that `open` opens.
pub(super) fn check(open: Open<'_>) {
    runs_names_and_idempotency(open);
    claims_are_atomic_and_fence_the_old_owner(open);
    owners_are_alive_while_their_guard_lives(open);
    migrations_move_the_undo_keys(open);
}

fn runs_names_and_idempotency(open: Open<'_>) {
    let (a_owner, vm) = (random("owner-"), VmName::new(random("jr")).unwrap());
    let a = open(&a_owner);
    let req = request(&vm);
    let id = req.request_id.clone();
    assert!(matches!(a.begin(&req, &a_owner), Ok(Begin::Started)));
    assert!(
        matches!(a.begin(&req, &a_owner), Ok(Begin::Unfinished { owner }) if owner == a_owner),
        "the same request again: unfinished under its owner"
    );
    let other = request(&vm);
    let e = a.begin(&other, &a_owner).expect_err("the name is held");
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    let mut changed = req.clone();
    changed.size.vcpus += 1;
    let e = a.begin(&changed, &a_owner).expect_err("other parameters");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");

    // Steps in pipeline order, with their outputs.
    a.intent(&id, Step::Ip, &key(&vm, None)).unwrap();
    a.intent(&id, Step::User, &key(&vm, None)).unwrap();
    a.done(&id, Step::User, &serde_json::json!({"ok": 1}))
        .unwrap();
    let steps = a.steps(&id).unwrap();
    assert_eq!(
        steps.iter().map(|s| (s.step, s.state)).collect::<Vec<_>>(),
        vec![(Step::User, StepState::Done), (Step::Ip, StepState::Intent)]
    );
    assert_eq!(steps[0].output, Some(serde_json::json!({"ok": 1})));
    assert!(
        a.unfinished()
            .unwrap()
            .0
            .iter()
            .any(|r| r.request.request_id == id),
        "a running run is unfinished"
    );
    assert_eq!(
        a.live_run_of(&vm).unwrap().map(|r| r.request.request_id),
        Some(id.clone())
    );

    // Finished: the same request returns the VM; it is listed as active.
    let rec = vm_record(&req, "host-a");
    a.set_run(&id, RunState::Active, Some(&rec), None).unwrap();
    assert!(matches!(a.begin(&req, &a_owner), Ok(Begin::Finished(v)) if *v == rec));
    assert!(a.active_vms().unwrap().0.contains(&rec));
    assert_eq!(a.active_sizes().unwrap().get(&vm), Some(&req.size));
    assert_eq!(a.run(&id).unwrap().map(|r| r.state), Some(RunState::Active));

    // Removed: the request is spent, the name free for another run.
    a.set_run(&id, RunState::Removed, None, None).unwrap();
    let e = a.begin(&req, &a_owner).expect_err("removed");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(matches!(a.begin(&other, &a_owner), Ok(Begin::Started)));
    a.set_run(&other.request_id, RunState::Failed, None, None)
        .unwrap();
    // A failed request may start again, from no steps.
    assert!(matches!(a.begin(&other, &a_owner), Ok(Begin::Started)));
    assert!(a.steps(&other.request_id).unwrap().is_empty());
    a.set_run(&other.request_id, RunState::Failed, None, None)
        .unwrap();
}

fn claims_are_atomic_and_fence_the_old_owner(open: Open<'_>) {
    let (a_owner, b_owner, c_owner) = (random("owner-"), random("owner-"), random("owner-"));
    let (a, b, c) = (open(&a_owner), open(&b_owner), open(&c_owner));
    let vm = VmName::new(random("jc")).unwrap();
    let req = request(&vm);
    let id = req.request_id.clone();
    assert!(matches!(a.begin(&req, &a_owner), Ok(Begin::Started)));
    a.intent(&id, Step::User, &key(&vm, None)).unwrap();

    // Two claims at once from the same old owner: exactly one wins.
    let (bj, cj) = (b.clone(), c.clone());
    let (i1, i2) = (id.clone(), id.clone());
    let (ao1, ao2, bo, co) = (
        a_owner.clone(),
        a_owner.clone(),
        b_owner.clone(),
        c_owner.clone(),
    );
    let t1 = std::thread::spawn(move || bj.claim(&i1, &ao1, &bo, RunState::RollingBack));
    let t2 = std::thread::spawn(move || cj.claim(&i2, &ao2, &co, RunState::RollingBack));
    let won = [t1.join().unwrap().unwrap(), t2.join().unwrap().unwrap()];
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let (winner, loser) = if won[0] { (&b, &c) } else { (&c, &b) };
    let winner_owner = if won[0] { &b_owner } else { &c_owner };
    assert_eq!(
        a.run(&id).unwrap().map(|r| r.owner).as_ref(),
        Some(winner_owner)
    );

    // The old owner and the loser write nothing any more.
    for j in [&a, loser] {
        let late = [
            j.done(&id, Step::User, &serde_json::json!({"late": true})),
            j.intent(&id, Step::Placement, &key(&vm, None)),
            j.undone(&id, Step::User, None),
            j.set_run(&id, RunState::Active, None, None),
        ];
        for r in late {
            let e = r.expect_err("fenced");
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    let steps = winner.steps(&id).unwrap();
    assert_eq!(steps.len(), 1, "nothing added by a fenced writer");
    assert_eq!(steps[0].output, None, "nothing written by a fenced writer");
    winner.undone(&id, Step::User, None).unwrap();
    winner.set_run(&id, RunState::Failed, None, None).unwrap();
    assert!(
        !winner
            .claim(&id, winner_owner, &a_owner, RunState::RollingBack)
            .unwrap(),
        "a failed run cannot be claimed"
    );
}

fn owners_are_alive_while_their_guard_lives(open: Open<'_>) {
    let (a_owner, b_owner) = (random("owner-"), random("owner-"));
    let (a, b) = (open(&a_owner), open(&b_owner));
    assert!(!b.owner_alive(&a_owner), "never registered: dead");
    let guard = a.register_owner().unwrap();
    assert!(b.owner_alive(&a_owner), "registered and its guard lives");
    drop(guard);
    assert!(!b.owner_alive(&a_owner), "its guard was dropped");
    b.forget_owner(&a_owner);
    assert!(!b.owner_alive(&a_owner));
}

fn migrations_move_the_undo_keys(open: Open<'_>) {
    let owner = random("owner-");
    let j = open(&owner);
    let vm = VmName::new(random("jm")).unwrap();
    let req = request(&vm);
    let id = req.request_id.clone();
    assert!(matches!(j.begin(&req, &owner), Ok(Begin::Started)));
    j.intent(&id, Step::Disk, &key(&vm, Some("host-a")))
        .unwrap();
    j.intent(&id, Step::Ip, &key(&vm, None)).unwrap();
    let rec = vm_record(&req, "host-a");
    j.set_run(&id, RunState::Active, Some(&rec), None).unwrap();
    let (a, b) = (
        HostId::new("host-a").unwrap(),
        HostId::new("host-b").unwrap(),
    );
    let e = j.begin_migration(&id, &a, &b).expect_err("not migrating");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    assert!(j.claim(&id, &owner, &owner, RunState::Migrating).unwrap());
    j.begin_migration(&id, &a, &b).unwrap();
    j.migration_phase(&id, MigrationPhase::Migrating).unwrap();
    assert_eq!(
        j.migration(&id).unwrap(),
        Some(MigrationRecord {
            from: a.clone(),
            to: b.clone(),
            phase: MigrationPhase::Migrating
        })
    );
    assert!(
        j.unfinished()
            .unwrap()
            .0
            .iter()
            .any(|r| r.request.request_id == id),
        "a migrating run is unfinished"
    );
    let moved = vm_record(&req, "host-b");
    j.end_migration(&id, &moved, None).unwrap();
    assert_eq!(j.migration(&id).unwrap(), None);
    assert_eq!(j.run(&id).unwrap().and_then(|r| r.vm), Some(moved));
    let steps = j.steps(&id).unwrap();
    let host_of = |s: Step| steps.iter().find(|r| r.step == s).unwrap().key.host.clone();
    assert_eq!(host_of(Step::Disk), Some(b), "undo keys name the new host");
    assert_eq!(host_of(Step::Ip), None, "keys without a host stay so");
    j.set_run(&id, RunState::Removed, None, None).unwrap();
}

#[test]
fn the_sqlite_journal_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    check(&|owner: &str| Journal::sqlite(&state, owner).unwrap());
}

/// The `[journal]` section for the lab's PostgreSQL, or `None` (a failure under
/// `DEVVM_REQUIRE_LAB=1`).
#[cfg(feature = "postgres")]
pub(crate) fn lab_database() -> Option<toml::Table> {
    let (Ok(url), Ok(password)) = (
        std::env::var("DEVVM_LAB_PG_URL"),
        std::env::var("DEVVM_LAB_PG_PASSWORD_FILE"),
    ) else {
        assert!(
            std::env::var("DEVVM_REQUIRE_LAB").as_deref() != Ok("1"),
            "the lab's PostgreSQL is not configured (DEVVM_LAB_PG_URL)"
        );
        eprintln!("SKIPPED: the lab's PostgreSQL is not configured (DEVVM_LAB_PG_URL)");
        return None;
    };
    let mut db = toml::Table::new();
    db.insert("url".into(), url.into());
    let mut pw = toml::Table::new();
    pw.insert("file".into(), password.into());
    db.insert("password".into(), pw.into());
    let mut section = toml::Table::new();
    section.insert("database".into(), db.into());
    Some(section)
}

#[cfg(feature = "postgres")]
#[test]
fn the_postgres_journal_conforms() {
    let Some(section) = lab_database() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    check(&|owner: &str| Journal::open(dir.path(), owner, Some(&section), Path::new("/")).unwrap());
}

/// A PostgreSQL owner whose heartbeat stops (its process was killed: here, its row is
/// left to expire) is dead to every other provisioner once its time to live has passed.
#[cfg(feature = "postgres")]
#[test]
fn a_postgres_owner_whose_heartbeat_stops_is_dead() {
    let Some(mut section) = lab_database() else {
        return;
    };
    section.insert("owner_ttl_secs".into(), 1.into());
    let dir = tempfile::tempdir().unwrap();
    let (a_owner, b_owner) = (random("owner-"), random("owner-"));
    let open = |o: &str| Journal::open(dir.path(), o, Some(&section), Path::new("/")).unwrap();
    let (a, b) = (open(&a_owner), open(&b_owner));
    let guard = a.register_owner().unwrap();
    // The process "dies": its heartbeat stops without its row being deleted (SIGKILL).
    std::mem::forget(guard);
    drop(a);
    let dead = (0..600).any(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        !b.owner_alive(&a_owner)
    });
    assert!(dead, "an owner not heard from for its time to live is dead");
    b.forget_owner(&a_owner);
}

/// A `[journal] database` that cannot be used is a clear error, also when the journal is
/// opened from async code (no runtime is dropped where tokio forbids it), and nothing is
/// contacted for it.
#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_bad_journal_database_is_a_clear_error_from_async_code() {
    let dir = tempfile::tempdir().unwrap();
    for (section, why) in [
        (
            "database = { url = \"postgres://devvm:secret@127.0.0.1:1/devvm\" }",
            "a password in the url",
        ),
        ("database = { url = \"not a url\" }", "not a url"),
        (
            "database = { url = \"postgres://devvm@127.0.0.1:1/devvm\", surprise = 1 }",
            "an unknown key",
        ),
        ("databse = {}", "a misspelt key"),
    ] {
        let t: toml::Table = toml::from_str(section).unwrap();
        let e = Journal::open(dir.path(), "o", Some(&t), dir.path())
            .map(|_| ())
            .expect_err(why);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{why}: {e}");
        assert!(!format!("{e:?}").contains("secret"), "{why}: {e:?}");
    }
    // A database that is down: unavailable (retryable), not a hang or a panic.
    let t: toml::Table = toml::from_str(
        "database = { url = \"postgres://devvm@127.0.0.1:1/devvm\", timeout_secs = 2 }",
    )
    .unwrap();
    let e = Journal::open(dir.path(), "o", Some(&t), dir.path())
        .map(|_| ())
        .expect_err("down");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}
