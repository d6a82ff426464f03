//! A container's view of a mount path: a process in a mount namespace of its own that binds
//! it, and which snapshot a path shows.

use std::path::Path;

/// A process in a mount namespace of its own with slave propagation, as a container's,
/// that binds a mount path recursively (`mount --rbind`, as Docker's `-v PATH:…:rslave`
/// does) and reports what a file reads there whenever asked.
#[derive(Debug)]
pub struct Container {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
    input: std::process::ChildStdin,
}

impl Container {
    /// Binds `path` at `at` in a new namespace.
    pub fn bind(path: &Path, at: &Path) -> Self {
        std::fs::create_dir_all(at).unwrap();
        let script = format!(
            "mount --rbind '{p}' '{x}' && echo ready && while read -r c f; do case $c in \
             open) exec 3>>\"{x}/$f\" && echo ok ;; \
             write) echo \"$f\" >&3 && echo ok ;; \
             close) exec 3>&- && echo ok ;; \
             *) cat \"{x}/$f\" 2>/dev/null; echo ;; esac; done",
            p = path.display(),
            x = at.display()
        );
        let mut child = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "slave", "sh", "-c", &script])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("unshare runs");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let input = child.stdin.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the bind could not be made");
        Container { child, out, input }
    }

    /// What `file` (relative to the bind) holds, as the container sees it (empty if
    /// missing).
    pub fn read(&mut self, file: &str) -> String {
        self.say(&format!("cat {file}"))
    }

    /// Opens `file` (relative to the bind) for appending, and holds it open.
    pub fn open(&mut self, file: &str) {
        assert_eq!(self.say(&format!("open {file}")), "ok");
    }

    /// Appends a line (no spaces) to the file held open.
    pub fn write(&mut self, line: &str) {
        assert_eq!(self.say(&format!("write {line}")), "ok");
    }

    /// Closes the file held open.
    pub fn close(&mut self) {
        assert_eq!(self.say("close -"), "ok");
    }

    fn say(&mut self, command: &str) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.input, "{command}").unwrap();
        let mut l = String::new();
        self.out.read_line(&mut l).unwrap();
        l.trim_end_matches('\n').to_string()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which snapshot a mount path shows: the link's target (copy mode), or the device of
/// the file system mounted there (overlay mode: each snapshot is an overlay of its own).
pub fn shown(path: &Path) -> String {
    match std::fs::read_link(path) {
        Ok(t) => t.display().to_string(),
        Err(_) => format!(
            "device {}",
            std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(path).unwrap())
        ),
    }
}
