//! A secret file that other users may read still works, but every run says so with a
//! `warning` event, as ssh does for private keys. (Its own test binary: the warnings are
//! process-wide until a provisioner takes them.)

use std::os::unix::fs::PermissionsExt;

use devvm_core::config::SecretSpec;
use devvm_core::{EventKind, ProvisionRequest, Provisioner};
use devvm_tests::{reference_backends, user};
use secrecy::ExposeSecret;

#[tokio::test]
async fn a_secret_file_others_can_read_is_warned_about_in_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open.password");
    let closed = dir.path().join("closed.password");
    for (path, mode) in [(&open, 0o644), (&closed, 0o600)] {
        std::fs::write(path, "s3cret\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for path in [&open, &closed] {
        let secret = SecretSpec::File(path.clone()).resolve(dir.path()).unwrap();
        assert_eq!(secret.expose_secret(), "s3cret", "it still works");
    }
    let mem = reference_backends(None);
    let p = Provisioner::builder()
        .state_dir(dir.path().join("state"))
        .backends(mem.backends())
        .defaults(devvm_core::Defaults {
            template: Some(devvm_core::TemplateName::new(devvm_tests::TEMPLATE).unwrap()),
            ..Default::default()
        })
        .build()
        .unwrap();
    let mut sub = p.subscribe();
    let vm = p
        .provision(ProvisionRequest::new(user("alice")))
        .await
        .unwrap();
    p.deprovision(&vm.name).await.unwrap();
    let warnings: Vec<(String, String)> = sub
        .drain()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Warning { message } => Some((e.request_id.to_string(), message)),
            _ => None,
        })
        .collect();
    assert_eq!(warnings.len(), 2, "one per run: {warnings:?}");
    for (_, message) in &warnings {
        assert!(
            message.contains(&open.display().to_string()) && message.contains("644"),
            "{message}"
        );
        assert!(!message.contains("closed.password"), "{message}");
        assert!(!message.contains("s3cret"), "never the secret: {message}");
    }
}
