//! Shared code of the examples: checks of what the lab's services really hold, asked of
//! the services themselves (BIND with `dig`, libvirt with `virsh`, the guest's SSH port,
//! the pool directory and the lease database), never of the library's own records.

pub mod lab {
    //! Independent checks against the lab (run inside its network namespace).

    use std::io::Read;
    use std::net::{IpAddr, SocketAddr, TcpStream};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::Duration;

    /// The lab's environment (`DEVVM_LAB_*`), read once.
    #[derive(Debug, Clone)]
    pub struct LabEnv {
        /// `DEVVM_LAB_DNS_SERVER`.
        pub dns_server: String,
        /// `DEVVM_LAB_DNS_PORT`.
        pub dns_port: String,
        /// `DEVVM_LAB_LIBVIRT_URI`.
        pub libvirt_uri: String,
        /// `DEVVM_LAB_POOL_DIR`.
        pub pool_dir: PathBuf,
        /// `DEVVM_LAB_HOST_URIS`: every libvirt host of the lab (host 1 first).
        pub host_uris: Vec<String>,
        /// `DEVVM_LAB_HOST_POOL_DIRS`: where each host's pool really is on this machine.
        pub host_pool_dirs: Vec<PathBuf>,
        /// `DEVVM_LAB_DIR`.
        pub dir: PathBuf,
        /// `DEVVM_LAB_CHEF_URL`, the lab's Chef server (goiardi), if it runs one.
        pub chef_url: Option<String>,
    }

    impl LabEnv {
        /// Reads the environment; `None` outside the lab.
        pub fn from_env() -> Option<LabEnv> {
            let v = |k: &str| std::env::var(format!("DEVVM_LAB_{k}")).ok();
            let libvirt_uri = v("LIBVIRT_URI")?;
            let pool_dir: PathBuf = v("POOL_DIR")?.into();
            let words = |k: &str| -> Option<Vec<String>> {
                let w: Vec<String> = v(k)?.split_whitespace().map(str::to_owned).collect();
                (!w.is_empty()).then_some(w)
            };
            Some(LabEnv {
                dns_server: v("DNS_SERVER")?,
                dns_port: v("DNS_PORT")?,
                host_uris: words("HOST_URIS").unwrap_or_else(|| vec![libvirt_uri.clone()]),
                host_pool_dirs: words("HOST_POOL_DIRS")
                    .map(|w| w.into_iter().map(PathBuf::from).collect())
                    .unwrap_or_else(|| vec![pool_dir.clone()]),
                libvirt_uri,
                pool_dir,
                dir: v("DIR")?.into(),
                chef_url: v("CHEF_URL"),
            })
        }

        /// Writes the lab's devvm config (printed by `scripts/lab-config`) into `dir`, with
        /// its journal in `dir/state`, and returns its path.
        pub fn write_config(&self, dir: &Path) -> std::io::Result<PathBuf> {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/lab-config");
            let out = Command::new(script).arg(dir.join("state")).output()?;
            if !out.status.success() {
                return Err(std::io::Error::other(format!(
                    "scripts/lab-config: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            let path = dir.join("devvm.toml");
            std::fs::write(&path, out.stdout)?;
            Ok(path)
        }

        /// The lease database `scripts/lab-config` configures.
        pub fn lease_db(&self) -> PathBuf {
            self.dir.join("devvm-shared/leases.sqlite3")
        }

        fn dig(&self, args: &[&str]) -> Vec<String> {
            let out = Command::new("dig")
                .arg(format!("@{}", self.dns_server))
                .args(["-p", &self.dns_port, "+short", "+time=2", "+tries=2"])
                .args(args)
                .output();
            match out {
                Ok(o) => String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| l.trim().trim_end_matches('.').to_owned())
                    .filter(|l| !l.is_empty() && !l.starts_with(';'))
                    .collect(),
                Err(_) => Vec::new(),
            }
        }

        /// The A records BIND serves for `fqdn`.
        pub fn dns_a(&self, fqdn: &str) -> Vec<String> {
            self.dig(&[fqdn, "A"])
        }

        /// The PTR records BIND serves for `ip` (names without the trailing dot).
        pub fn dns_ptr(&self, ip: IpAddr) -> Vec<String> {
            self.dig(&["-x", &ip.to_string()])
        }

        /// The hosts (of [`host_uris`](Self::host_uris)) where libvirt has a domain named
        /// `name` (running or not).
        pub fn domain_hosts(&self, name: &str) -> Vec<String> {
            self.host_uris
                .iter()
                .filter(|uri| {
                    Command::new("virsh")
                        .args(["-c", uri, "dominfo", name])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false)
                })
                .cloned()
                .collect()
        }

        /// Where the file that `host` sees at `path` (in its pool) really is on this
        /// machine: each host's pool is its own directory bind-mounted over the common
        /// pool path.
        pub fn local_path(&self, host: &str, path: &Path) -> PathBuf {
            let i = self.host_uris.iter().position(|u| u == host).unwrap_or(0);
            match (
                self.host_pool_dirs.get(i),
                path.strip_prefix(&self.pool_dir),
            ) {
                (Some(dir), Ok(rest)) => dir.join(rest),
                _ => path.to_owned(),
            }
        }

        /// Whether libvirt has a domain named `name` (running or not) on any lab host.
        pub fn domain_exists(&self, name: &str) -> bool {
            !self.domain_hosts(name).is_empty()
        }

        /// Files in `dirs` whose names pass `keep`.
        fn files_in(dirs: &[PathBuf], keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
            dirs.iter()
                .flat_map(|d| std::fs::read_dir(d).into_iter().flatten())
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(&keep))
                .collect()
        }

        /// Files in every host's pool whose name starts with `name` followed by `.` (the
        /// disk and its owner record), and devvm's hidden files of it (`.<name>.qcow2.owner`,
        /// partial copies).
        pub fn disk_files(&self, name: &str) -> Vec<PathBuf> {
            let (prefix, hidden) = (format!("{name}."), format!(".{name}."));
            let mut dirs = self.host_pool_dirs.clone();
            if !dirs.contains(&self.pool_dir) {
                dirs.push(self.pool_dir.clone());
            }
            Self::files_in(&dirs, |n| n.starts_with(&prefix) || n.starts_with(&hidden))
        }

        /// The first-boot seed images of `vm` (`<vm>-<request id>-cidata.img`) in the lab's
        /// seed directory and in every host's pool.
        pub fn seed_files(&self, vm: &str) -> Vec<PathBuf> {
            let prefix = format!("{vm}-");
            let mut dirs = vec![self.dir.join("devvm-shared/seeds")];
            dirs.extend(self.host_pool_dirs.iter().cloned());
            Self::files_in(&dirs, |n| {
                n.starts_with(&prefix) && n.ends_with("-cidata.img")
            })
        }

        /// What of `vm` each host still holds (a domain, files in its pool: a disk, its
        /// owner record, a seed), host by host in the order of
        /// [`host_uris`](Self::host_uris).
        pub fn leftovers_per_host(&self, vm: &str) -> Vec<(String, Vec<String>)> {
            let (prefix, hidden) = (format!("{vm}."), format!(".{vm}."));
            let seed = format!("{vm}-");
            self.host_uris
                .iter()
                .enumerate()
                .map(|(i, uri)| {
                    let mut left = Vec::new();
                    let on = Command::new("virsh")
                        .args(["-c", uri, "dominfo", vm])
                        .output()
                        .map(|o| o.status.success())
                        .unwrap_or(false);
                    if on {
                        left.push(format!("libvirt domain {vm}"));
                    }
                    let dir = self.host_pool_dirs.get(i).unwrap_or(&self.pool_dir);
                    for f in Self::files_in(std::slice::from_ref(dir), |n| {
                        n.starts_with(&prefix)
                            || n.starts_with(&hidden)
                            || (n.starts_with(&seed) && n.ends_with("-cidata.img"))
                    }) {
                        left.push(format!("file {}", f.display()));
                    }
                    (uri.clone(), left)
                })
                .collect()
        }

        /// The address leased to `vm` in the lease database, read with plain SQL.
        pub fn lease(&self, vm: &str) -> Option<IpAddr> {
            lease_in(&self.lease_db(), vm)
        }

        /// Whether the lab's Chef server has a node (`what = "nodes"`) or client
        /// (`"clients"`) named `name`, asked over HTTP with curl.
        pub fn chef_has(&self, what: &str, name: &str) -> bool {
            let Some(url) = &self.chef_url else {
                return false;
            };
            Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
                .arg(format!("{url}/{what}/{name}"))
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "200")
                .unwrap_or(false)
        }

        /// Everything of `vm` (at `ip`, named `fqdn`) that the services still hold, one
        /// line each; empty means nothing leaked.
        pub fn leftovers(&self, vm: &str, fqdn: &str, ip: Option<IpAddr>) -> Vec<String> {
            let mut left = Vec::new();
            if self.domain_exists(vm) {
                left.push(format!("libvirt domain {vm}"));
            }
            for f in self.disk_files(vm) {
                left.push(format!("disk {}", f.display()));
            }
            for seed in self.seed_files(vm) {
                left.push(format!("seed {}", seed.display()));
            }
            for a in self.dns_a(fqdn) {
                left.push(format!("dns A {fqdn} -> {a}"));
            }
            if let Some(ip) = ip {
                for n in self.dns_ptr(ip) {
                    if n == fqdn {
                        left.push(format!("dns PTR {ip} -> {n}"));
                    }
                }
            }
            if let Some(l) = self.lease(vm) {
                left.push(format!("ip lease {l} of {vm}"));
            }
            for what in ["nodes", "clients"] {
                if self.chef_has(what, vm) {
                    left.push(format!("chef {what}/{vm}"));
                }
            }
            left
        }
    }

    fn lease_in(db: &Path, vm: &str) -> Option<IpAddr> {
        let conn =
            rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .ok()?;
        conn.query_row("SELECT ip FROM addresses WHERE vm = ?1", [vm], |r| {
            r.get::<_, u32>(0)
        })
        .ok()
        .map(|n| IpAddr::from(std::net::Ipv4Addr::from(n)))
    }

    /// Whether `ip:22` answers with an SSH banner within `limit`.
    pub fn ssh_answers(ip: IpAddr, limit: Duration) -> bool {
        let addr = SocketAddr::new(ip, 22);
        let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(limit));
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
    }
}
