//! `volume get` into local files, written by the client: the agent sends what lies at a
//! path of the volume (entries, and each file's bytes after its entry), and the client
//! (the CLI, as the calling user) writes it. The agent never opens a local path for it.

use super::*;

impl Inner {
    /// Sends what lies at `remote` of volume `name`, from one verified head: an
    /// [`Event::Item`] for the path itself (`path` empty), then one for each entry below
    /// it in path order (`path` relative to `remote`), each file's bytes following its item
    /// as [`Event::Data`].
    pub(super) async fn export(
        &self,
        name: &str,
        remote: &str,
        events: &Events,
    ) -> OpResult<Reply> {
        let (src, entry, below) = self.entries_at(name, remote).await?;
        let mut items: Vec<(String, Entry)> = Vec::new();
        match entry {
            Some(e @ (Entry::File { .. } | Entry::Symlink { .. })) => {
                items.push((String::new(), e))
            }
            _ => {
                items.push((String::new(), Entry::Dir { mode: 0o755 }));
                for (p, e) in below {
                    let rel = match &src {
                        Some(s) => p.as_str()[s.as_str().len() + 1..].to_string(),
                        None => p.to_string(),
                    };
                    items.push((rel, e));
                }
            }
        }
        let blobs: Vec<(Hash, u64)> = items.iter().filter_map(|(_, e)| e.blob()).collect();
        let total: u64 = blobs.iter().map(|(_, s)| s).sum();
        self.fetch_blobs(&blobs, events).await?;
        let n = items.len();
        for (rel, e) in items {
            events.item(volume::ls_entry(&rel, &e)).await?;
            if let Some(b) = e.blob() {
                self.stream_blobs(&[b], events).await?;
            }
        }
        Ok(Reply::Done(format!(
            "{n} entr{} ({total} bytes)",
            if n == 1 { "y" } else { "ies" }
        )))
    }
}
