//! The seed's YAML against a real YAML parser: PyYAML, the parser cloud-init itself
//! uses. No hostile string, as a value or as a key, at any depth, may change the
//! document's structure, and every one reads back exactly as it was written.
//!
//! Needs `/usr/bin/python3` with PyYAML (`apt-get install python3-yaml`); without it the
//! tests fail, unless `DEVVM_SKIP_PYYAML=1` is set.

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

use devvm_core::seed::{GuestSeed, HostKey, network_config};
use devvm_core::{Lease, VmName};
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

const PYTHON: &str = "/usr/bin/python3";

/// Reads one YAML document from stdin and prints it as JSON; a key that is not a string
/// (a plain `yes` read as a boolean, say) is an error rather than silently stringified.
const LOAD: &str = r#"
import json, sys, yaml
def keys_are_strings(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                sys.exit("non-string key %r" % (k,))
            keys_are_strings(x)
    elif isinstance(v, list):
        for x in v:
            keys_are_strings(x)
doc = yaml.safe_load(sys.stdin.buffer.read())
keys_are_strings(doc)
print(json.dumps(doc))
"#;

/// Whether PyYAML is there; panics (with how to install it) when it is not, unless
/// `DEVVM_SKIP_PYYAML=1` asks to skip.
fn pyyaml() -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("DEVVM_SKIP_PYYAML").as_deref() == Ok("1") {
        eprintln!("skipped: {PYTHON} cannot import yaml and DEVVM_SKIP_PYYAML=1");
        return false;
    }
    panic!(
        "{PYTHON} cannot import yaml (PyYAML): apt-get install python3-yaml \
         (or set DEVVM_SKIP_PYYAML=1 to skip these tests)"
    );
}

/// `text` parsed by PyYAML's `safe_load`, as JSON.
fn parse(text: &str) -> Value {
    let mut child = Command::new(PYTHON)
        .args(["-c", LOAD])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(PYTHON);
    let mut stdin = child.stdin.take().expect("stdin");
    let input = text.as_bytes().to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect(PYTHON);
    let written = writer.join().expect("writer panicked");
    assert!(
        out.status.success(),
        "PyYAML cannot read the document: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        excerpt(text),
    );
    written.expect("writing the document to python3");
    serde_json::from_slice(&out.stdout).expect("PyYAML's JSON")
}

/// At most a few hundred characters of `s`, escaped, for failure messages.
fn excerpt(s: &str) -> String {
    let head: String = s.chars().take(400).collect();
    if head.len() < s.len() {
        format!("{head:?}... ({} bytes)", s.len())
    } else {
        format!("{head:?}")
    }
}

/// Asserts `got` equals `want`, naming the first place they differ.
fn assert_same(path: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            let gk: BTreeSet<&String> = g.keys().collect();
            let wk: BTreeSet<&String> = w.keys().collect();
            assert!(
                gk == wk,
                "{path}: keys differ: extra {:?}, missing {:?}",
                gk.difference(&wk).map(|k| excerpt(k)).collect::<Vec<_>>(),
                wk.difference(&gk).map(|k| excerpt(k)).collect::<Vec<_>>(),
            );
            for (k, w) in w {
                assert_same(&format!("{path}/{}", excerpt(k)), &g[k], w);
            }
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{path}: list lengths differ");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert_same(&format!("{path}[{i}]"), g, w);
            }
        }
        (Value::String(g), Value::String(w)) => {
            assert!(g == w, "{path}: read {} for {}", excerpt(g), excerpt(w));
        }
        _ => assert!(got == want, "{path}: read {got} for {want}"),
    }
}

/// A seed with `value` in every string field, in `authorized_keys`, and as a key and a
/// value at the top of `cloud_config` and inside nested objects and lists.
fn seed_with(value: &str, host_key: &HostKey) -> GuestSeed {
    let nested = json!({
        "list": [value, [value, [value]], {}, [], { "k": value }, null, 1, true],
        "object": { "inner": { "deep": value } },
        "empty": {},
    });
    let Value::Object(mut nested) = nested else {
        unreachable!()
    };
    nested.insert(value.to_owned(), json!([value, { value: value }]));
    let mut cloud_config = Map::new();
    cloud_config.insert(value.to_owned(), Value::String(value.to_owned()));
    cloud_config.insert("devvm_test_nested".into(), Value::Object(nested));
    cloud_config.insert(
        "runcmd".into(),
        json!([value, ["sh", "-c", value], { value: [value] }]),
    );
    GuestSeed {
        instance_id: value.to_owned(),
        hostname: value.to_owned(),
        fqdn: value.to_owned(),
        authorized_keys: vec![value.to_owned(), "ssh-ed25519 AAAA ok@x".into()],
        host_key: Some(host_key.clone()),
        cloud_config,
    }
}

/// What `seed.user_data()` must read back as.
fn expected_user_data(seed: &GuestSeed, host_key: &HostKey) -> Value {
    let mut want = Map::new();
    want.insert("hostname".into(), seed.hostname.clone().into());
    want.insert("fqdn".into(), seed.fqdn.clone().into());
    want.insert("manage_etc_hosts".into(), true.into());
    want.insert("disable_root".into(), false.into());
    // Authorized keys are lines; the seed trims them (a key file's newline, say).
    want.insert(
        "ssh_authorized_keys".into(),
        seed.authorized_keys
            .iter()
            .map(|k| Value::String(k.trim().to_owned()))
            .collect(),
    );
    want.insert(
        "ssh_keys".into(),
        json!({
            "ed25519_private": host_key.private.expose_secret(),
            "ed25519_public": host_key.public,
        }),
    );
    want.insert("ssh_deletekeys".into(), true.into());
    for (k, v) in &seed.cloud_config {
        want.insert(k.clone(), v.clone());
    }
    Value::Object(want)
}

fn host_key() -> HostKey {
    HostKey::generate().expect("generate a host key")
}

/// Parses `seed`'s user-data and asserts it is `#cloud-config` with exactly the
/// expected top-level keys, every value read back exactly.
fn check_user_data(seed: &GuestSeed, host_key: &HostKey, what: &str) {
    let user_data = seed.user_data();
    let text = user_data.expose_secret();
    assert!(
        text.starts_with("#cloud-config\n"),
        "{what}: {}",
        excerpt(text)
    );
    let got = parse(text);
    let want = expected_user_data(seed, host_key);
    let keys = |v: &Value| -> BTreeSet<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(
        keys(&got),
        keys(&want),
        "{what}: the top-level keys changed"
    );
    assert_same(what, &got, &want);
}

#[test]
fn every_hostile_value_reads_back_exactly_from_user_data_and_meta_data() {
    if !pyyaml() {
        return;
    }
    let key = host_key();
    for value in devvm_tests::hostile_strings() {
        let what = excerpt(&value);
        let seed = seed_with(&value, &key);
        check_user_data(&seed, &key, &what);
        let meta = parse(&seed.meta_data());
        assert_same(
            &format!("meta-data of {what}"),
            &meta,
            &json!({ "instance-id": value, "local-hostname": value }),
        );
    }
}

#[test]
fn all_hostile_keys_together_keep_the_top_level_keys() {
    if !pyyaml() {
        return;
    }
    let key = host_key();
    let values = devvm_tests::hostile_strings();
    let mut seed = seed_with("web-1", &key);
    seed.fqdn = "web-1.lab.example".into();
    seed.authorized_keys = values.clone();
    let mut nested = Map::new();
    for (i, v) in values.iter().enumerate() {
        seed.cloud_config
            .insert(format!("devvm_test_{v}"), Value::String(v.clone()));
        nested.insert(
            v.clone(),
            json!({ "i": i, "v": v, "l": [v, [v], { v: v }] }),
        );
    }
    seed.cloud_config
        .insert("devvm_test_all".into(), Value::Object(nested));
    seed.cloud_config.insert(
        "write_files".into(),
        values
            .iter()
            .map(|v| json!({ "path": "/tmp/x", "content": v }))
            .collect(),
    );
    check_user_data(&seed, &key, "all keys");
}

#[test]
fn other_values_keep_their_type() {
    if !pyyaml() {
        return;
    }
    let key = host_key();
    let mut seed = seed_with("web-1", &key);
    seed.cloud_config.insert(
        "devvm_test_types".into(),
        json!({
            "floats": [1e100, 1e-7, 1.5, -0.25, 0.0, 123456789.0, f64::MAX, f64::MIN_POSITIVE],
            "ints": [0, -1, i64::MIN, u64::MAX],
            "other": [true, false, null, [], {}, [[]], [{}]],
        }),
    );
    check_user_data(&seed, &key, "types");
}

#[test]
fn network_config_reads_back() {
    if !pyyaml() {
        return;
    }
    let lease = Lease {
        vm: VmName::new("web-1").unwrap(),
        ip: [10, 99, 0, 7].into(),
        prefix_len: 24,
        gateway: Some([10, 99, 0, 1].into()),
    };
    let got = parse(&network_config(
        lease.ip,
        lease.prefix_len,
        lease.gateway,
        &[[10, 99, 0, 1].into()],
    ));
    assert_same(
        "network-config",
        &got,
        &json!({
            "version": 2,
            "ethernets": { "eth0": {
                "addresses": ["10.99.0.7/24"],
                "gateway4": "10.99.0.1",
                "nameservers": { "addresses": ["10.99.0.1"] },
            } },
        }),
    );
}
