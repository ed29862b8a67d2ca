//! The journal as an operator meets it: rows corrupted by hand (with the `sqlite3` tool)
//! or written by another devvm version are reported for their run alone; `list`,
//! `recover` and `deprovision` keep working for every other run, and a run whose rows
//! cannot be read is never rolled back on a guess.

use std::path::Path;
use std::process::Command;

use devvm_core::{ProvisionRequest, Provisioner, VmName};
use devvm_tests::{reference_backends, user, write_config};

fn sql(db: &Path, statement: &str) {
    let out = Command::new("sqlite3")
        .arg(db)
        .arg(statement)
        .output()
        .expect("sqlite3 (apt-get install sqlite3)");
    assert!(
        out.status.success(),
        "sqlite3 {statement}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn name(s: &str) -> VmName {
    VmName::new(s).expect("a valid vm name")
}

#[tokio::test]
async fn a_corrupted_row_is_reported_for_its_run_and_everything_else_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let p = Provisioner::from_config(&config).unwrap();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        p.provision(ProvisionRequest::new(user("alice")).with_name(name(vm)))
            .await
            .unwrap_or_else(|e| panic!("{vm}: {e}"));
    }
    drop(p);
    let db = dir.path().join("state/journal.sqlite3");
    // vm-a: its request is no longer JSON.
    sql(&db, "UPDATE runs SET request = '{broken' WHERE vm = 'vm-a'");
    // vm-c: a rollback its (dead) owner left unfinished, one of whose steps is corrupt.
    sql(
        &db,
        "UPDATE runs SET state = 'rolling_back', owner = 'a-dead-owner' WHERE vm = 'vm-c'",
    );
    sql(
        &db,
        "UPDATE steps SET undo_key = '{not json' WHERE step = 'ip' AND request_id =
           (SELECT request_id FROM runs WHERE vm = 'vm-c')",
    );
    let held_before = reference_backends(Some(dir.path())).held_total().unwrap();

    let p = Provisioner::from_config(&config).unwrap();
    let listed: Vec<String> = p
        .list()
        .await
        .expect("list keeps working")
        .into_iter()
        .map(|v| v.name.to_string())
        .collect();
    assert_eq!(listed, vec!["vm-b"], "the readable VMs are listed");
    let bad = p.unreadable().await.unwrap();
    assert!(bad.iter().any(|u| u.vm == "vm-a"), "{bad:?}");

    let report = p.recover().await.expect("recover keeps working");
    assert!(
        report.unreadable.iter().any(|u| u.vm == "vm-c"),
        "the run with a corrupt step is reported: {report:?}"
    );
    assert!(
        report.rolled_back.is_empty(),
        "nothing rolled back on a guess: {report:?}"
    );
    assert_eq!(
        reference_backends(Some(dir.path())).held_total().unwrap(),
        held_before,
        "the unreadable runs' resources are untouched"
    );

    // The readable VM is removed as usual; the unreadable one is a typed error naming it.
    p.deprovision(&name("vm-b"))
        .await
        .expect("deprovision of a readable vm");
    let e = p
        .deprovision(&name("vm-a"))
        .await
        .expect_err("its row cannot be read");
    assert!(e.to_string().contains("cannot be read"), "{e}");
    assert!(e.to_string().contains("vm-a"), "{e}");

    // A row written by a newer devvm (another JSON version) is reported, not guessed at.
    p.provision(ProvisionRequest::new(user("alice")).with_name(name("vm-d")))
        .await
        .expect("vm-d");
    sql(&db, "UPDATE runs SET json_version = 99 WHERE vm = 'vm-d'");
    let bad = p.unreadable().await.unwrap();
    assert!(
        bad.iter()
            .any(|u| u.vm == "vm-d" && u.error.contains("journal format 99")),
        "{bad:?}"
    );
    assert!(
        p.list().await.unwrap().is_empty(),
        "neither vm-a nor vm-d is listed"
    );
}
