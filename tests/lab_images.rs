//! The Glance image store against the lab's real Glance (v2, noauth) and `qemu-img`.
//!
//! Runs inside `scripts/lab exec` (scripts/test does this); skips with a message when the
//! lab is not up. Images uploaded here have unique names and are deleted afterwards.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use devvm_core::backends::glance::{GlanceConfig, GlanceImageStore};
use devvm_core::testkit::conformance::{ImageStoreFixture, image_store};
use devvm_core::{ErrorKind, HostId, ImageStore, Progress, TemplateName, VmName};
use devvm_tests::{Lab, Uploads, run_ok};

/// Temporary cache and disk directories, and a store on them.
struct Setup {
    _dir: tempfile::TempDir,
    cache: PathBuf,
    disks: PathBuf,
    store: GlanceImageStore,
}

/// The one owner of the disks these tests make.
fn own() -> devvm_core::RequestId {
    devvm_core::RequestId::new("lab-images-test").expect("a valid request id")
}

fn setup(lab: &Lab, extra: &str) -> Setup {
    setup_url(lab.var("glance_url"), extra)
}

fn setup_url(url: &str, extra: &str) -> Setup {
    let dir = tempfile::tempdir().expect("temp dir");
    let config: GlanceConfig = toml::from_str(&format!(
        r#"
url = "{url}"
cache_dir = "cache"
disk_dir = "disks"
timeout_secs = 5
{extra}
"#
    ))
    .expect("glance config");
    let store =
        GlanceImageStore::from_config(&config, dir.path()).expect("glance store from the config");
    Setup {
        cache: store.cache_dir().to_owned(),
        disks: store.disk_dir().expect("disk_dir").to_owned(),
        _dir: dir,
        store,
    }
}

fn template(lab: &Lab) -> TemplateName {
    TemplateName::new(lab.var("template")).expect("DEVVM_LAB_TEMPLATE is a template name")
}

fn host() -> HostId {
    HostId::new("localhost").expect("a valid host id")
}

fn vm(prefix: &str) -> VmName {
    VmName::new(format!("{prefix}-{}", &uuid_like()[..8])).expect("a valid vm name")
}

fn uuid_like() -> String {
    let out = run_ok("cat", &["/proc/sys/kernel/random/uuid"]);
    String::from_utf8_lossy(&out).trim().replace('-', "")
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(bytes)))
}

fn sha512sum(path: &Path) -> String {
    let p = path.to_string_lossy();
    let out = String::from_utf8_lossy(&run_ok("sha512sum", &[&p])).into_owned();
    out.split_whitespace().next().unwrap_or_default().to_owned()
}

fn qemu_info(path: &Path) -> serde_json::Value {
    let p = path.to_string_lossy();
    json(&run_ok("qemu-img", &["info", "-U", "--output=json", &p]))
}

/// Glance's own record of the newest active image named `name`.
fn glance_image(lab: &Lab, name: &str) -> serde_json::Value {
    let url = format!(
        "{}/v2/images?name={name}&status=active&sort_key=created_at&sort_dir=desc",
        lab.var("glance_url")
    );
    let list = json(&run_ok("curl", &["-sSf", "-m", "30", &url]));
    list["images"][0].clone()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn prepare(store: &GlanceImageStore, t: &TemplateName) -> devvm_core::Template {
    store
        .prepare(t, &host(), &Progress::discard())
        .await
        .unwrap_or_else(|e| panic!("prepare {t}: {e:?}"))
}

#[tokio::test]
async fn glance_image_store_conforms() {
    let Some(lab) = Lab::get("glance_image_store_conforms") else {
        return;
    };
    let s = setup(&lab, "");
    image_store(
        Arc::new(s.store.clone()),
        ImageStoreFixture {
            template: template(&lab),
            host: host(),
            size_gib: 2,
        },
    )
    .await;
    assert!(files_in(&s.disks).is_empty(), "{:?}", files_in(&s.disks));
}

#[tokio::test]
async fn the_template_matches_glance_and_is_downloaded_once() {
    let Some(lab) = Lab::get("the_template_matches_glance_and_is_downloaded_once") else {
        return;
    };
    let s = setup(&lab, "");
    let name = template(&lab);
    let t = prepare(&s.store, &name).await;
    let g = glance_image(&lab, name.as_str());
    let hash = g["os_hash_value"].as_str().unwrap_or_default();
    assert_eq!(g["os_hash_algo"], "sha512");
    assert_eq!(sha512sum(&t.path), hash, "the template is Glance's image");
    assert_eq!(t.digest.as_deref(), Some(format!("sha512:{hash}").as_str()));
    assert!(t.path.starts_with(&s.cache));

    // Direct kernel boot: kernel and initrd are Glance's too.
    let kernel = t
        .boot
        .kernel
        .clone()
        .unwrap_or_else(|| panic!("no kernel: {t:?}"));
    let initrd = t
        .boot
        .initrd
        .clone()
        .unwrap_or_else(|| panic!("no initrd: {t:?}"));
    for (path, id) in [(&kernel, &g["kernel_id"]), (&initrd, &g["ramdisk_id"])] {
        let id = id.as_str().unwrap_or_default();
        let url = format!("{}/v2/images/{id}", lab.var("glance_url"));
        let meta = json(&run_ok("curl", &["-sSf", "-m", "30", &url]));
        assert_eq!(
            sha512sum(path),
            meta["os_hash_value"].as_str().unwrap_or_default()
        );
    }
    assert_eq!(t.boot.cmdline.as_deref(), g["os_command_line"].as_str());
    assert_eq!(s.store.downloads(), 3, "image, kernel, initrd");

    // Again: nothing is downloaded, nothing is rewritten.
    let before = std::fs::metadata(&t.path).unwrap();
    let t2 = prepare(&s.store, &name).await;
    let after = std::fs::metadata(&t2.path).unwrap();
    assert_eq!(t, t2);
    assert_eq!(s.store.downloads(), 3, "a second prepare downloads nothing");
    assert_eq!(
        (before.ino(), before.mtime_nsec()),
        (after.ino(), after.mtime_nsec())
    );

    // A second store on the same cache (another process) reuses it too.
    let config: GlanceConfig = toml::from_str(&format!(
        "url = \"{}\"\ncache_dir = \"{}\"\ndisk_dir = \"{}\"\n",
        lab.var("glance_url"),
        s.cache.display(),
        s.disks.display()
    ))
    .unwrap();
    let other = GlanceImageStore::from_config(&config, Path::new("/")).unwrap();
    assert_eq!(prepare(&other, &name).await, t);
    assert_eq!(other.downloads(), 0);
    let listed = other.templates().await.unwrap();
    assert_eq!(listed, vec![t]);
}

#[tokio::test]
async fn a_corrupted_cache_is_detected_and_downloaded_again() {
    let Some(lab) = Lab::get("a_corrupted_cache_is_detected_and_downloaded_again") else {
        return;
    };
    let s = setup(&lab, "");
    let name = template(&lab);
    let t = prepare(&s.store, &name).await;
    let good = sha512sum(&t.path);
    let n = s.store.downloads();

    // Flip a byte in place: the file's identity changes, it is hashed, found wrong,
    // downloaded again.
    let flip = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 0xff;
        std::fs::write(path, bytes).unwrap();
    };
    flip(&t.path);
    assert_ne!(sha512sum(&t.path), good);
    let t2 = prepare(&s.store, &name).await;
    assert_eq!(t2.path, t.path);
    assert_eq!(sha512sum(&t2.path), good);
    assert_eq!(s.store.downloads(), n + 1, "the image, and only it, again");

    // A sidecar that no longer matches Glance: the file is hashed again; it is intact,
    // so it is kept and the sidecar is repaired without a download.
    let sidecar = t.path.with_file_name("template.json");
    let text = std::fs::read_to_string(&sidecar).unwrap();
    let hash = good.as_str();
    std::fs::write(&sidecar, text.replacen(hash, &"0".repeat(128), 1)).unwrap();
    prepare(&s.store, &name).await;
    assert_eq!(s.store.downloads(), n + 1);
    assert_eq!(std::fs::read_to_string(&sidecar).ok(), Some(text.clone()));

    // A mismatching sidecar and a damaged file: downloaded again.
    std::fs::write(&sidecar, text.replacen(hash, &"0".repeat(128), 1)).unwrap();
    flip(&t.path);
    prepare(&s.store, &name).await;
    assert_eq!(s.store.downloads(), n + 2);
    assert_eq!(sha512sum(&t.path), good);

    // No sidecar at all and a damaged kernel: only the kernel comes again.
    std::fs::remove_file(&sidecar).unwrap();
    let kernel = t.boot.kernel.clone().expect("no kernel");
    flip(&kernel);
    let t3 = prepare(&s.store, &name).await;
    assert_eq!(t3, t);
    assert_eq!(s.store.downloads(), n + 3);
    // No temporary file is left anywhere.
    let dir = t.path.parent().expect("no parent");
    assert!(
        files_in(dir).iter().all(|f| !f.ends_with(".part")),
        "{:?}",
        files_in(dir)
    );
}

#[tokio::test]
async fn an_overlay_is_backed_by_the_template() {
    let Some(lab) = Lab::get("an_overlay_is_backed_by_the_template") else {
        return;
    };
    let s = setup(&lab, "");
    let t = prepare(&s.store, &template(&lab)).await;
    let vm = vm("overlay");
    let d = s
        .store
        .create_disk(&vm, &host(), &t, 3, &own(), &Progress::discard())
        .await
        .unwrap();
    assert_eq!(d.path, s.disks.join(format!("{vm}.qcow2")));
    let info = qemu_info(&d.path);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 3u64 << 30);
    assert_eq!(info["backing-filename"].as_str(), t.path.to_str());
    assert_eq!(info["backing-filename-format"], "qcow2");
    // The disk and its owner record (a dot file: a libvirt dir pool does not list it).
    assert_eq!(
        files_in(&s.disks),
        vec![format!(".{vm}.qcow2.owner"), format!("{vm}.qcow2")]
    );
    // Another run can neither adopt nor delete it.
    let other = devvm_core::RequestId::random();
    let e = s
        .store
        .create_disk(&vm, &host(), &t, 3, &other, &Progress::discard())
        .await
        .expect_err("never adopted");
    assert_eq!(e.kind(), devvm_core::ErrorKind::AlreadyExists, "{e}");
    let theirs = s.store.delete_disk(&vm, &host(), &other).await;
    assert!(
        matches!(theirs, Ok(devvm_core::Undone::Foreign { .. })),
        "{theirs:?}"
    );
    assert_eq!(
        qemu_info(&d.path)["backing-filename"].as_str(),
        t.path.to_str()
    );
    assert_eq!(
        s.store.delete_disk(&vm, &host(), &own()).await.unwrap(),
        devvm_core::Undone::Removed
    );
    assert!(files_in(&s.disks).is_empty());
}

/// A disk file of the VM's name that devvm did not make (copied in by hand, another
/// tool's) is refused, never adopted, and survives the undo byte for byte.
#[tokio::test]
async fn a_hand_made_disk_of_the_name_is_refused_and_left_alone() {
    let Some(lab) = Lab::get("a_hand_made_disk_of_the_name_is_refused_and_left_alone") else {
        return;
    };
    let s = setup(&lab, "");
    let t = prepare(&s.store, &template(&lab)).await;
    let vm = vm("handmade");
    let path = s.disks.join(format!("{vm}.qcow2"));
    std::fs::write(&path, b"someone else's disk").unwrap();
    let e = s
        .store
        .create_disk(&vm, &host(), &t, 3, &own(), &Progress::discard())
        .await
        .expect_err("a foreign file of that name");
    assert_eq!(e.kind(), devvm_core::ErrorKind::AlreadyExists, "{e}");
    let undone = s.store.delete_disk(&vm, &host(), &own()).await;
    assert!(
        matches!(undone, Ok(devvm_core::Undone::Foreign { .. })),
        "{undone:?}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap_or_default(),
        b"someone else's disk",
        "untouched"
    );
    assert_eq!(
        files_in(&s.disks),
        vec![format!("{vm}.qcow2")],
        "nothing of ours"
    );
    std::fs::remove_file(&path).unwrap();
}

#[tokio::test]
async fn copy_mode_makes_a_standalone_disk() {
    let Some(lab) = Lab::get("copy_mode_makes_a_standalone_disk") else {
        return;
    };
    let s = setup(&lab, "mode = \"copy\"");
    let t = prepare(&s.store, &template(&lab)).await;
    let vm = vm("copy");
    let d = s
        .store
        .create_disk(&vm, &host(), &t, 2, &own(), &Progress::discard())
        .await
        .unwrap();
    let info = qemu_info(&d.path);
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["virtual-size"], 2u64 << 30);
    assert_eq!(d.size_gib, 2);
    // Standalone: the guest sees the template's data.
    let p = d.path.to_string_lossy().into_owned();
    let tp = t.path.to_string_lossy().into_owned();
    let cmp = Command::new("qemu-img")
        .args(["compare", "-U", "-f", "qcow2", "-F", "qcow2", &tp, &p])
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    s.store.delete_disk(&vm, &host(), &own()).await.unwrap();
    assert!(files_in(&s.disks).is_empty());
}

#[tokio::test]
async fn glance_down_is_unavailable() {
    if Lab::get("glance_down_is_unavailable").is_none() {
        return;
    }
    let s = setup_url("http://127.0.0.1:1", "");
    let t = TemplateName::new("devvm-debian12").unwrap();
    let e = s
        .store
        .prepare(&t, &host(), &Progress::discard())
        .await
        .expect_err("prepare with glance down succeeded");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e:?}");
    assert!(e.is_retryable());
    assert_eq!(e.backend_name(), Some("glance"));
    assert!(files_in(&s.cache).is_empty());
}

#[tokio::test]
async fn glance_down_falls_back_to_a_verified_cache() {
    let Some(lab) = Lab::get("glance_down_falls_back_to_a_verified_cache") else {
        return;
    };
    let s = setup(&lab, "");
    let t = prepare(&s.store, &template(&lab)).await;
    let down = |extra: &str| {
        let config: GlanceConfig = toml::from_str(&format!(
            "url = \"http://127.0.0.1:1\"\ncache_dir = \"{}\"\ndisk_dir = \"{}\"\n{extra}",
            s.cache.display(),
            s.disks.display()
        ))
        .unwrap();
        GlanceImageStore::from_config(&config, Path::new("/")).unwrap()
    };
    assert_eq!(prepare(&down(""), &t.name).await, t);
    let strict = down("offline_fallback = false");
    let e = strict
        .prepare(&t.name, &host(), &Progress::discard())
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::Unavailable));
}

#[tokio::test]
async fn an_unknown_template_is_not_found_and_leaves_nothing() {
    let Some(lab) = Lab::get("an_unknown_template_is_not_found_and_leaves_nothing") else {
        return;
    };
    let s = setup(&lab, "");
    let t = TemplateName::new(format!("no-such-{}", uuid_like())).unwrap();
    let e = s
        .store
        .prepare(&t, &host(), &Progress::discard())
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::NotFound));
    assert!(files_in(&s.cache).is_empty(), "{:?}", files_in(&s.cache));
    // The lab's template exists, but not with a tag it does not carry.
    let tagged = setup(&lab, "tag = \"no-such-tag\"");
    let e = tagged
        .store
        .prepare(&template(&lab), &host(), &Progress::discard())
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::NotFound));
    assert!(files_in(&tagged.cache).is_empty());
}

#[tokio::test]
async fn the_newest_image_with_the_tag_wins() {
    let Some(lab) = Lab::get("the_newest_image_with_the_tag_wins") else {
        return;
    };
    let name = format!("devvm-test-{}", &uuid_like()[..12]);
    let t = TemplateName::new(&name).unwrap();
    let mut up = Uploads::new(&lab);
    let tag = "devvm-test";
    let _old = up.qcow2(&name, "1G", &[tag]);
    // Glance's created_at has one-second resolution.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let tagged = up.qcow2(&name, "3G", &[tag]);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newest = up.qcow2(&name, "2G", &[]);

    let s = setup(&lab, &format!("tag = \"{tag}\""));
    let got = prepare(&s.store, &t).await;
    assert!(got.path.to_string_lossy().contains(&tagged), "{got:?}");
    assert_eq!(
        got.boot,
        Default::default(),
        "no kernel_id: boots from disk"
    );
    // A disk smaller than the template's virtual size (3 GiB) is refused.
    let e = s
        .store
        .create_disk(&vm("small"), &host(), &got, 1, &own(), &Progress::discard())
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::InvalidInput));
    assert!(files_in(&s.disks).is_empty());

    let any = setup(&lab, "");
    let got = prepare(&any.store, &t).await;
    assert!(got.path.to_string_lossy().contains(&newest), "{got:?}");

    // A newer image replaces the cached one under a new file; the old file stays, as
    // disks may be backed by it.
    let s_old = prepare(&s.store, &t).await;
    let vm = vm("keep");
    let d = s
        .store
        .create_disk(&vm, &host(), &s_old, 3, &own(), &Progress::discard())
        .await
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let newer = up.qcow2(&name, "4G", &[tag]);
    let s_new = prepare(&s.store, &t).await;
    assert!(s_new.path.to_string_lossy().contains(&newer));
    assert!(s_old.path.is_file(), "the old version backs a disk");
    assert_eq!(
        qemu_info(&d.path)["backing-filename"].as_str(),
        s_old.path.to_str()
    );
    // The same vm again returns its existing disk.
    let again = s
        .store
        .create_disk(&vm, &host(), &s_new, 4, &own(), &Progress::discard())
        .await
        .unwrap();
    assert_eq!(again, d);
    s.store.delete_disk(&vm, &host(), &own()).await.unwrap();
}

#[tokio::test]
async fn a_crafted_cache_entry_cannot_escape() {
    let Some(lab) = Lab::get("a_crafted_cache_entry_cannot_escape") else {
        return;
    };
    let s = setup(&lab, "");
    let outside = tempfile::tempdir().unwrap();
    let name = template(&lab);
    // Names with separators never become TemplateNames.
    for bad in ["../etc", "a/b", ".hidden", ".."] {
        assert!(TemplateName::new(bad).is_err(), "{bad:?}");
    }
    // A template directory that is a symbolic link out of the cache is refused.
    std::os::unix::fs::symlink(outside.path(), s.cache.join(name.as_str())).unwrap();
    let e = s
        .store
        .prepare(&name, &host(), &Progress::discard())
        .await
        .err();
    assert_eq!(e.map(|e| e.kind()), Some(ErrorKind::InvalidInput));
    assert!(files_in(outside.path()).is_empty());
    assert!(s.store.templates().await.unwrap().is_empty());

    // A Template pointing outside the cache is not used to make a disk.
    let mut forged = devvm_core::Template {
        name: name.clone(),
        path: PathBuf::from("/etc/passwd"),
        digest: None,
        boot: Default::default(),
    };
    std::fs::remove_file(s.cache.join(name.as_str())).unwrap();
    let real = prepare(&s.store, &name).await;
    for path in [
        PathBuf::from("/etc/passwd"),
        real.path.with_file_name("../../../../etc/passwd"),
        real.path.with_file_name("template.json"),
    ] {
        forged.path = path;
        let e = s
            .store
            .create_disk(
                &vm("forged"),
                &host(),
                &forged,
                2,
                &own(),
                &Progress::discard(),
            )
            .await
            .err();
        assert!(
            matches!(
                e.map(|e| e.kind()),
                Some(ErrorKind::NotFound | ErrorKind::InvalidInput)
            ),
            "{}",
            forged.path.display()
        );
    }
    assert!(files_in(&s.disks).is_empty());
}
