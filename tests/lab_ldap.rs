//! The LDAP user directory against the lab's real OpenLDAP `slapd`.
//!
//! Runs inside `scripts/lab exec` (scripts/test does this); skips with a message when the
//! lab is not up.

use std::sync::Arc;

use devvm_core::backends::ldap::{LdapConfig, LdapDirectory};
use devvm_core::testkit::conformance::{UserDirectoryFixture, user_directory};
use devvm_core::{ErrorKind, ExposeSecret, UserDirectory, UserName};
use devvm_tests::Lab;

fn config(lab: &Lab, extra: &str) -> LdapConfig {
    toml::from_str(&format!(
        r#"
url = "{url}"
base_dn = "{base}"
bind_dn = "{bind}"
bind_password = {{ file = "{pw}" }}
required_group = "{group}"
timeout_secs = 3
{extra}
"#,
        url = lab.var("ldap_url"),
        base = lab.var("ldap_base_dn"),
        bind = lab.var("ldap_bind_dn"),
        pw = lab.var("ldap_password_file"),
        group = lab.var("ldap_group_dn"),
    ))
    .expect("LDAP config")
}

fn directory(lab: &Lab, extra: &str) -> LdapDirectory {
    LdapDirectory::from_config(&config(lab, extra), std::path::Path::new("/"))
        .expect("LDAP directory from the config")
}

fn member(lab: &Lab) -> UserName {
    let first = lab
        .var("ldap_users")
        .split_whitespace()
        .next()
        .unwrap_or("alice");
    UserName::new(first).expect("DEVVM_LAB_LDAP_USERS starts with a user name")
}

#[tokio::test]
async fn ldap_directory_conforms() {
    let Some(lab) = Lab::get("ldap_directory_conforms") else {
        return;
    };
    user_directory(
        Arc::new(directory(&lab, "")),
        UserDirectoryFixture {
            member: member(&lab),
            outsider: Some(UserName::new(lab.var("ldap_outsider")).unwrap()),
        },
    )
    .await;
}

#[tokio::test]
async fn a_member_comes_with_mail_name_and_ssh_keys() {
    let Some(lab) = Lab::get("a_member_comes_with_mail_name_and_ssh_keys") else {
        return;
    };
    let user = directory(&lab, "").find_user(&member(&lab)).await.unwrap();
    assert!(
        user.mail.as_deref().is_some_and(|m| m.contains('@')),
        "{user:?}"
    );
    assert!(user.display_name.is_some(), "{user:?}");
    assert!(
        user.ssh_keys.iter().any(|k| k.starts_with("ssh-")),
        "the lab's users carry sshPublicKey: {user:?}"
    );
}

#[tokio::test]
async fn without_a_required_group_the_outsider_is_found() {
    let Some(lab) = Lab::get("without_a_required_group_the_outsider_is_found") else {
        return;
    };
    let mut c = config(&lab, "");
    c.required_group = None;
    let d = LdapDirectory::from_config(&c, std::path::Path::new("/")).unwrap();
    let outsider = UserName::new(lab.var("ldap_outsider")).unwrap();
    assert_eq!(
        d.find_user(&outsider).await.map(|u| u.name).ok(),
        Some(outsider)
    );
}

#[tokio::test]
async fn a_wrong_bind_password_is_unauthorized() {
    let Some(lab) = Lab::get("a_wrong_bind_password_is_unauthorized") else {
        return;
    };
    let mut c = config(&lab, "");
    c.bind_password = Some(
        toml::from_str::<toml::Table>("p = \"definitely-wrong\"")
            .ok()
            .and_then(|t| t.get("p").cloned())
            .and_then(|v| v.try_into().ok())
            .expect("secret spec"),
    );
    let d = LdapDirectory::from_config(&c, std::path::Path::new("/")).unwrap();
    let e = d.find_user(&member(&lab)).await.expect_err("bad password");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
    assert!(!e.to_string().contains("definitely-wrong"));
    assert!(!format!("{e:?}").contains("definitely-wrong"));
}

#[tokio::test]
async fn a_directory_that_is_down_is_unavailable_and_retryable() {
    let Some(lab) = Lab::get("a_directory_that_is_down_is_unavailable_and_retryable") else {
        return;
    };
    let mut c = config(&lab, "");
    c.url = "ldap://127.0.0.1:1".into();
    let d = LdapDirectory::from_config(&c, std::path::Path::new("/")).unwrap();
    let e = d
        .find_user(&member(&lab))
        .await
        .expect_err("nothing listens on port 1");
    assert!(
        matches!(e.kind(), ErrorKind::Unavailable | ErrorKind::Timeout),
        "{e}"
    );
    assert!(e.is_retryable());
}

#[tokio::test]
async fn a_missing_base_dn_is_a_typed_error() {
    let Some(lab) = Lab::get("a_missing_base_dn_is_a_typed_error") else {
        return;
    };
    let mut c = config(&lab, "");
    c.base_dn = format!("ou=nowhere,{}", lab.var("ldap_base_dn"));
    let d = LdapDirectory::from_config(&c, std::path::Path::new("/")).unwrap();
    let e = d.find_user(&member(&lab)).await.expect_err("no such base");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// Names holding filter metacharacters, NUL, non-ASCII, or that are empty or too long are
/// refused before any request is made; a near miss of a real name is simply not found.
#[tokio::test]
async fn bad_user_names_never_reach_the_directory() {
    let Some(lab) = Lab::get("bad_user_names_never_reach_the_directory") else {
        return;
    };
    let long = "a".repeat(65);
    for bad in [
        "*",
        "alice*",
        "(uid=*)",
        "al)ce",
        "al(ce",
        "a\\b",
        "a\0b",
        "ålice",
        "",
        long.as_str(),
    ] {
        let e = UserName::new(bad).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
    }
    let d = directory(&lab, "");
    let near = UserName::new(format!("{}-x", member(&lab))).unwrap();
    let e = d.find_user(&near).await.expect_err("not a user");
    assert_eq!(e.kind(), ErrorKind::NotFound);
}

/// The lab's directory over TLS: `ldaps://` or `ldap://` with StartTLS,
/// trusting the CA file given (none: the platform's roots).
fn tls_directory(lab: &Lab, starttls: bool, ca_file: Option<&str>) -> LdapDirectory {
    let mut c = config(lab, "");
    if starttls {
        c.starttls = true;
    } else {
        c.url = lab.var("ldaps_url").to_owned();
    }
    c.ca_file = ca_file.map(std::path::PathBuf::from);
    LdapDirectory::from_config(&c, std::path::Path::new("/"))
        .expect("LDAP directory (TLS) from the config")
}

#[tokio::test]
async fn ldaps_directory_with_the_lab_ca_conforms() {
    let Some(lab) = Lab::get("ldaps_directory_with_the_lab_ca_conforms") else {
        return;
    };
    user_directory(
        Arc::new(tls_directory(&lab, false, Some(lab.var("ldap_ca_file")))),
        UserDirectoryFixture {
            member: member(&lab),
            outsider: Some(UserName::new(lab.var("ldap_outsider")).unwrap()),
        },
    )
    .await;
}

#[tokio::test]
async fn starttls_with_the_lab_ca_finds_a_member() {
    let Some(lab) = Lab::get("starttls_with_the_lab_ca_finds_a_member") else {
        return;
    };
    let d = tls_directory(&lab, true, Some(lab.var("ldap_ca_file")));
    let user = d.find_user(&member(&lab)).await.unwrap();
    assert_eq!(user.name, member(&lab));
    assert!(
        user.mail.as_deref().is_some_and(|m| m.contains('@')),
        "{user:?}"
    );
    assert!(
        user.ssh_keys.iter().any(|k| k.starts_with("ssh-")),
        "{user:?}"
    );
    // The outsider is still refused over TLS.
    let outsider = UserName::new(lab.var("ldap_outsider")).unwrap();
    let e = d.find_user(&outsider).await.expect_err("not in the group");
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
}

/// Without the lab's CA the platform's roots do not trust slapd's certificate, and a CA
/// file holding another certificate does not either: every lookup fails with
/// `Unavailable`, not retryable (a certificate does not become trusted by trying again),
/// and no user is ever returned.
#[tokio::test]
async fn tls_without_the_lab_ca_fails_typed_and_returns_no_user() {
    let Some(lab) = Lab::get("tls_without_the_lab_ca_fails_typed_and_returns_no_user") else {
        return;
    };
    // The server's own certificate is no CA for itself (it was issued by the lab's CA).
    let server_cert = std::path::Path::new(lab.var("ldap_ca_file")).with_file_name("ldap-tls.crt");
    let server_cert = server_cert.to_str().expect("utf-8 path");
    let outsider = UserName::new(lab.var("ldap_outsider")).unwrap();
    for (what, starttls, ca) in [
        ("ldaps, platform roots", false, None),
        ("StartTLS, platform roots", true, None),
        (
            "ldaps, the server certificate as CA",
            false,
            Some(server_cert),
        ),
    ] {
        let d = tls_directory(&lab, starttls, ca);
        for user in [member(&lab), outsider.clone()] {
            let e = match d.find_user(&user).await {
                Ok(u) => panic!("{what}: a user came back over an untrusted connection: {u:?}"),
                Err(e) => e,
            };
            assert_eq!(e.kind(), ErrorKind::Unavailable, "{what}: {e}");
            assert!(!e.is_retryable(), "{what}: {e}");
            assert!(e.to_string().contains("TLS"), "{what}: {e}");
        }
    }
}

fn user_password(lab: &Lab) -> devvm_core::SecretString {
    let pw = std::fs::read_to_string(lab.var("user_password_file"))
        .expect("read DEVVM_LAB_USER_PASSWORD_FILE");
    devvm_core::SecretString::from(pw.trim().to_owned())
}

/// Sign-in binds as the user's own entry: the right password passes; a wrong one, an
/// empty one and an unknown user are refused alike (one message that names no one); a
/// right password of a non-member is refused naming the group; the password shows in no
/// error.
#[tokio::test]
async fn sign_in_binds_as_the_user() {
    let Some(lab) = Lab::get("sign_in_binds_as_the_user") else {
        return;
    };
    let d = directory(&lab, "");
    let pw = user_password(&lab);
    let alice = member(&lab);
    let user = d.authenticate(&alice, &pw).await.expect("alice signs in");
    assert_eq!(user.name, alice);
    // Another spelling is the same user, under the directory's spelling.
    let shouted = UserName::new(alice.as_str().to_uppercase()).unwrap();
    let same = d.authenticate(&shouted, &pw).await.expect("ALICE signs in");
    assert_eq!(same.name, alice, "the directory's spelling");
    assert!(user.mail.is_some(), "{user:?}");

    let wrong = devvm_core::SecretString::from(format!("{}x", pw.expose_secret()));
    let ghost = UserName::new("nobody-here").unwrap();
    let empty = devvm_core::SecretString::from(String::new());
    let mut messages = Vec::new();
    for (who, password) in [(&alice, &wrong), (&ghost, &pw), (&alice, &empty)] {
        let e = d.authenticate(who, password).await.expect_err("refused");
        assert_eq!(e.kind(), ErrorKind::Unauthorized, "{e}");
        assert!(!e.is_retryable(), "{e}");
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains(pw.expose_secret()), "{shown}");
        messages.push(e.to_string());
    }
    assert_eq!(
        messages[0], messages[1],
        "unknown user and wrong password look alike"
    );

    let outsider = UserName::new(lab.var("ldap_outsider")).unwrap();
    let e = d
        .authenticate(&outsider, &pw)
        .await
        .expect_err("not a member");
    assert_eq!(e.kind(), ErrorKind::Unauthorized);
    assert!(e.to_string().contains("not a member"), "{e}");
    assert_ne!(e.to_string(), messages[0]);
}

#[tokio::test]
async fn group_membership_is_read_from_the_directory() {
    let Some(lab) = Lab::get("group_membership_is_read_from_the_directory") else {
        return;
    };
    let d = directory(&lab, "");
    let admins = lab.var("ldap_admin_group_dn");
    assert!(
        d.is_member(&UserName::new("carol").unwrap(), admins)
            .await
            .unwrap()
    );
    assert!(!d.is_member(&member(&lab), admins).await.unwrap());
    let e = d
        .is_member(&UserName::new("nobody-here").unwrap(), admins)
        .await
        .expect_err("unknown user");
    assert_eq!(e.kind(), ErrorKind::NotFound);
    // A group DN with filter metacharacters is a DN, never spliced into a filter.
    let e = d
        .is_member(&member(&lab), "cn=*)(uid=*,ou=groups,dc=nowhere")
        .await
        .expect_err("no such group");
    assert_ne!(e.kind(), ErrorKind::Backend, "{e}");
}
