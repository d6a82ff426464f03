//! Containers' binds of mount paths: a process in a mount namespace of its own with slave
//! propagation binds an agent's mount path recursively (as Docker's `-v PATH:…:rslave`
//! does), and every check of that mount reads the bind's view too, which must be the very
//! tree the mount path shows.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// One bind, alive while its process is.
pub(super) struct Bind {
    pub(super) agent: usize,
    pub(super) vol: &'static str,
    child: Child,
    at: PathBuf,
}

impl Bind {
    /// Binds `path` at `at` (a directory made here, seen in the new namespace too).
    pub(super) fn start(
        agent: usize,
        vol: &'static str,
        path: &Path,
        at: &Path,
    ) -> anyhow::Result<Bind> {
        std::fs::create_dir_all(at)?;
        // The process waits on its input: it ends when the trial drops it.
        let script = format!(
            "mount --rbind '{}' '{}' && echo ready && read -r _",
            path.display(),
            at.display()
        );
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("unshare")?;
        let mut line = String::new();
        let out = child.stdout.take().context("the bind's output")?;
        std::io::BufReader::new(out).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the bind of {} could not be made", path.display());
        }
        Ok(Bind {
            agent,
            vol,
            child,
            at: at.to_path_buf(),
        })
    }

    /// Where this process reads what the bind shows: through the namespace's root.
    pub(super) fn view(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.child.id()))
            .join(self.at.strip_prefix("/").unwrap_or(&self.at))
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
