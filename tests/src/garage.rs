//! A real S3 server for tests: a single-node Garage on 127.0.0.1, in a temp dir, with one
//! bucket and one key. `scripts/garage.sh` installs the pinned version.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};

use tempfile::TempDir;
use voltool_agent::store::S3Options;

/// The bucket every test origin lives in (each under a prefix of its own).
pub const BUCKET: &str = "voltool-test";
const KEY_ID: &str = "GK0123456789abcdef01234567";
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const REGION: &str = "garage";

/// A running Garage server, stopped when dropped.
#[derive(Debug)]
pub struct Garage {
    child: Child,
    dir: TempDir,
    bin: PathBuf,
    conf: PathBuf,
    /// `http://127.0.0.1:PORT`, its S3 API.
    pub endpoint: String,
}

/// The `garage` program: on `PATH`, or where `cargo install` puts it.
fn program() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin").join("garage"));
    crate::on_path("garage").or(cargo_home.filter(|p| p.is_file()))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Garage {
    /// Starts a server. Fails the test when Garage is not installed (`scripts/garage.sh`
    /// installs it; `scripts/test.sh` runs that first): a test of the origin on S3 never
    /// passes without a bucket.
    pub fn start() -> Self {
        let bin = program().expect(
            "garage is not installed: run scripts/garage.sh (tests of the origin on S3 need a real S3 server)",
        );
        let dir = crate::test_dir();
        let (s3, rpc) = (free_port(), free_port());
        let config = format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "lmdb"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{SECRET}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
"#,
            d = dir.path().display(),
        );
        let conf = dir.path().join("garage.toml");
        std::fs::write(&conf, config).unwrap();
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&conf)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting garage");
        let g = Garage {
            child,
            dir,
            bin,
            conf,
            endpoint: format!("http://127.0.0.1:{s3}"),
        };
        g.await_up();
        let id = g.cli(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap().to_string();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        g.cli(&["layout", "apply", "--version", "1"]);
        g.cli(&["key", "import", "--yes", KEY_ID, SECRET]);
        g.cli(&["bucket", "create", BUCKET]);
        g.cli(&[
            "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", KEY_ID,
        ]);
        g
    }

    /// Waits (bounded) until the server answers its own CLI.
    fn await_up(&self) {
        crate::until_command_succeeds(
            "garage did not come up",
            || {
                let mut c = Command::new(&self.bin);
                c.arg("-c").arg(&self.conf).arg("status");
                c
            },
            || self.log(),
        );
    }

    fn cli(&self, args: &[&str]) -> String {
        let mut c = Command::new(&self.bin);
        c.arg("-c").arg(&self.conf).args(args);
        crate::run_ok(c, &format!("garage {args:?}"))
    }

    /// Takes write access to the bucket from the key (puts fail), or gives it back.
    pub fn allow_writes(&self, allow: bool) {
        let verb = if allow { "allow" } else { "deny" };
        self.cli(&["bucket", verb, "--write", BUCKET, "--key", KEY_ID]);
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    /// Where an origin under `prefix` lives, with the server's address and key.
    pub fn origin(&self, prefix: &str) -> S3Options {
        S3Options {
            bucket: BUCKET.into(),
            prefix: prefix.into(),
            endpoint: Some(self.endpoint.clone()),
            region: Some(REGION.into()),
            access_key_id: Some(KEY_ID.into()),
            secret_access_key: Some(SECRET.into()),
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
