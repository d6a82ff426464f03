//! A real etcd cluster for tests: three members on 127.0.0.1, each with its own ports and
//! data directory in a temp dir, killed when dropped. `scripts/etcd.sh` installs etcd from
//! Debian's packages; a test that needs it fails where it is missing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use tempfile::TempDir;

/// One member of the cluster.
#[derive(Debug)]
struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A running etcd cluster, killed when dropped.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: TempDir,
    members: Vec<Member>,
    /// With TLS: clients must show a certificate the cluster's CA signed.
    tls: Option<Tls>,
}

/// The PEM files of a cluster that speaks TLS to its clients.
#[derive(Clone, Debug)]
pub struct Tls {
    /// The CA that signed the members' and the client's certificates.
    pub ca: PathBuf,
    /// A member's certificate (for 127.0.0.1) and key.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client's certificate, which the CA signed.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A client certificate the CA did not sign (self-signed), and its key.
    pub stranger_cert: PathBuf,
    /// Its key.
    pub stranger_key: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let mut c = Command::new("openssl");
    c.current_dir(dir).args(args);
    crate::run_ok(
        c,
        &format!("openssl {args:?} (scripts/etcd.sh installs it)"),
    );
}

/// Makes a self-signed certificate `NAME.pem` with its key `NAME.key` in `dir`.
fn self_signed(dir: &std::path::Path, name: &str, subject: &str) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &pem,
        ],
    );
}

/// Makes a CA, a member certificate for 127.0.0.1 and a client certificate in `dir`, and a
/// stranger's certificate the CA did not sign.
fn make_certs(dir: &std::path::Path) -> Tls {
    self_signed(dir, "ca", "/CN=voltool test CA");
    self_signed(dir, "stranger", "/CN=stranger");
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
        ),
        ("client", "extendedKeyUsage=clientAuth"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
    Tls {
        stranger_cert: dir.join("stranger.pem"),
        stranger_key: dir.join("stranger.key"),
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn program(name: &str) -> PathBuf {
    crate::on_path(name).unwrap_or_else(|| {
        panic!(
            "{name} is not installed: run scripts/etcd.sh (tests of coordinators in failover need a real etcd cluster)"
        )
    })
}

impl EtcdCluster {
    /// Starts a cluster of `n` members and waits (bounded) until every one is healthy.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, false)
    }

    /// Starts a cluster of `n` members that speak TLS to clients and require a client
    /// certificate their CA signed ([`Self::tls`]).
    pub fn start_tls(n: usize) -> Self {
        Self::start_with(n, true)
    }

    /// The cluster's certificates, if it speaks TLS.
    pub fn tls(&self) -> Option<&Tls> {
        self.tls.as_ref()
    }

    fn start_with(n: usize, tls: bool) -> Self {
        let dir = crate::test_dir();
        let tls = tls.then(|| make_certs(dir.path()));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { dir, members, tls };
        for i in 0..n {
            cluster.spawn(i, true);
        }
        cluster.await_healthy();
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn spawn(&mut self, i: usize, new: bool) {
        let initial = self.initial_cluster();
        let scheme = self.scheme();
        let tls_args: Vec<std::ffi::OsString> = match &self.tls {
            Some(t) => vec![
                "--cert-file".into(),
                t.server_cert.clone().into(),
                "--key-file".into(),
                t.server_key.clone().into(),
                "--client-cert-auth".into(),
                "--trusted-ca-file".into(),
                t.ca.clone().into(),
            ],
            None => Vec::new(),
        };
        let data = self.dir.path().join(&self.members[i].name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.members[i].name)),
            )
            .unwrap();
        let m = &mut self.members[i];
        let child = Command::new(program("etcd"))
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", m.client))
            .args(tls_args)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial)
            .arg("--initial-cluster-token")
            .arg("voltool-test")
            .arg("--initial-cluster-state")
            .arg(if new { "new" } else { "existing" })
            // Short elections: a killed member's place is taken within a second.
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting etcd");
        m.child = Some(child);
    }

    /// The client addresses of every member, `HOST:PORT,HOST:PORT,…`.
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--meta` address of a fleet's state under `prefix` in this cluster.
    pub fn meta_url(&self, prefix: &str) -> String {
        format!("etcd://{}/{prefix}", self.endpoints())
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The client address of member `i`, `HOST:PORT`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client)
    }

    /// The member that leads the cluster's raft now (as the running members say).
    pub fn raft_leader(&self) -> usize {
        let number_after = |text: &str, field: &str| -> Option<u64> {
            let at = text.find(field)? + field.len();
            let digits: String = text[at..]
                .chars()
                .skip_while(|c| !c.is_ascii_digit())
                .take_while(|c| c.is_ascii_digit())
                .collect();
            digits.parse().ok()
        };
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let mut c = self.etcdctl(&self.endpoint(i));
            c.args(["endpoint", "status", "-w", "json"]);
            let out = crate::run_ok(c, "etcdctl endpoint status");
            let me = number_after(&out, "\"member_id\":");
            if me.is_some() && me == number_after(&out, "\"leader\":") {
                return i;
            }
        }
        panic!("no member of the cluster leads its raft:\n{}", self.log());
    }

    /// Stops member `i` with SIGSTOP (`on`), or lets it go on with SIGCONT.
    pub fn pause(&self, i: usize, on: bool) {
        let pid = self.pid(i).expect("a running member");
        let mut c = Command::new("kill");
        c.arg(if on { "-STOP" } else { "-CONT" })
            .arg(pid.to_string());
        crate::run_ok(c, "kill");
    }

    /// The process id of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(|c| c.id())
    }

    /// Starts member `i` again if it was killed, and waits until the cluster is healthy.
    pub fn restart_if_down(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.restart(i);
        }
    }

    /// Starts member `i` again on its data directory and waits until the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, false);
        self.await_healthy();
    }

    /// `etcdctl` for this cluster (its TLS flags given).
    fn etcdctl(&self, endpoints: &str) -> Command {
        let mut c = Command::new(program("etcdctl"));
        c.env("ETCDCTL_API", "3").arg("--endpoints").arg(endpoints);
        if let Some(t) = &self.tls {
            c.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        c
    }

    /// Saves a snapshot of the cluster's data in `file` (from one member).
    pub fn snapshot(&self, file: &std::path::Path) {
        let member = self
            .members
            .iter()
            .find(|m| m.child.is_some())
            .expect("a running member");
        let mut c = self.etcdctl(&format!("127.0.0.1:{}", member.client));
        c.arg("snapshot").arg("save").arg(file);
        crate::run_ok(c, "etcdctl snapshot save");
    }

    /// Rebuilds the cluster from a snapshot, as an operator whose cluster is lost does:
    /// every member stopped, its data replaced by the snapshot's, started again; waits
    /// until healthy.
    pub fn restore(&mut self, file: &std::path::Path) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let initial = self.initial_cluster();
        for m in &self.members {
            let data = self.dir.path().join(&m.name);
            let _ = std::fs::remove_dir_all(&data);
            let mut c = Command::new(program("etcdctl"));
            c.env("ETCDCTL_API", "3")
                .arg("snapshot")
                .arg("restore")
                .arg(file)
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&data)
                .arg("--initial-cluster")
                .arg(&initial)
                .arg("--initial-cluster-token")
                .arg("voltool-test")
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{}", m.peer));
            crate::run_ok(c, "etcdctl snapshot restore");
        }
        for i in 0..self.members.len() {
            self.spawn(i, true);
        }
        self.await_healthy();
    }

    /// Runs `etcdctl` against the cluster.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut c = self.etcdctl(&self.endpoints());
        c.args(args);
        crate::run_ok(c, &format!("etcdctl {args:?}"))
    }

    /// Waits (bounded) until every running member says it is healthy.
    pub fn await_healthy(&self) {
        let running: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("127.0.0.1:{}", m.client))
            .collect();
        crate::until_command_succeeds(
            "etcd did not become healthy",
            || {
                let mut c = self.etcdctl(&running.join(","));
                c.args(["endpoint", "health", "--command-timeout=2s"]);
                c
            },
            || self.log(),
        );
    }

    /// Every member's log so far.
    pub fn log(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let f = self.dir.path().join(format!("{}.log", m.name));
                let text = std::fs::read_to_string(f).unwrap_or_default();
                let tail: String = text
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                format!("--- {}:\n{tail}\n", m.name)
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
