//! The operations of a trial, drawn at random, and the faults that strike them.

use super::*;

impl Trial<'_> {
    /// Writes or deletes a few files in one agent's mount.
    pub(super) fn write(&mut self, agent: usize, vol: &'static str) -> anyhow::Result<()> {
        let r = self.write_files(agent, vol);
        if tracing() {
            (self.say)(format!(
                "    agent {agent} {vol} pending {:?}",
                self.views[agent][vol]
                    .pending
                    .iter()
                    .map(|(p, c)| (p, c.map(|c| c.size)))
                    .collect::<Vec<_>>()
            ));
        }
        r
    }

    pub(super) fn write_files(&mut self, agent: usize, vol: &'static str) -> anyhow::Result<()> {
        let mnt = self.mount_path(agent, vol);
        for _ in 0..self.rng.random_range(1..4) {
            let path = random_path(&mut self.rng);
            let p = mnt.join(&path);
            let view = &self.views[agent][vol];
            if self.rng.random_bool(0.15) {
                if view.expected().contains_key(&path) {
                    std::fs::remove_file(&p).with_context(|| p.display().to_string())?;
                    let view = self.views[agent].get_mut(vol).expect("mounted");
                    view.delete(path.clone());
                    remove_made_dir(&mnt, view, &path);
                }
                continue;
            }
            let size = random_size(&mut self.rng);
            let seed = self.fresh_seed();
            let bytes = bytes_of(seed, size);
            let parent = p.parent().expect("a file in a directory");
            if !parent.exists() {
                let dir = path.split('/').next().unwrap_or_default().to_string();
                self.views[agent]
                    .get_mut(vol)
                    .expect("mounted")
                    .made
                    .insert(dir);
            }
            std::fs::create_dir_all(parent)?;
            let written = std::fs::write(&p, &bytes);
            let pending = &mut self.views[agent].get_mut(vol).expect("mounted").pending;
            match written {
                Ok(()) => {
                    pending.insert(path, Some(content_of(&bytes)));
                }
                Err(e) if e.raw_os_error() == Some(28) => {
                    // A full disk (agent 2): the user removes what could not be written.
                    std::fs::remove_file(&p)?;
                    let view = self.views[agent].get_mut(vol).expect("mounted");
                    view.delete(path.clone());
                    remove_made_dir(&mnt, view, &path);
                }
                Err(e) => return Err(e).with_context(|| p.display().to_string()),
            }
        }
        Ok(())
    }

    /// A commit of one agent's mount, maybe struck by a kill of the agent or the
    /// coordinator.
    pub(super) async fn commit(
        &mut self,
        agent: usize,
        vol: &'static str,
        strike: Option<Strike>,
    ) -> anyhow::Result<()> {
        let before = self.views[agent][vol].clone();
        let req = Request::Commit {
            name: Some(vol.into()),
        };
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        if struck {
            self.count_strike(strike, "agent_killed_mid_commit");
            self.heal().await?;
            // The mount shows its own view: the commit either did not land, or landed and
            // the mount followed to the merged head.
            let landed = apply(&self.model[vol], &before.pending);
            self.check_mount(
                agent,
                vol,
                &[before.expected(), landed],
                "after a kill mid-commit",
            )?;
        }
        let Some(reply) = self.settle(agent, &req, answer, struck, &|_| false).await? else {
            return Ok(());
        };
        self.saw_reply(vol, &reply);
        let Reply::Committed(rep) = reply else {
            bail!("unexpected answer to commit: {reply:?}");
        };
        if rep
            .reloaded
            .as_ref()
            .is_some_and(|r| !r.sources.banned.is_empty())
        {
            self.out.fault("lying_peer_banned");
        }
        let latest = apply(&self.model[vol], &before.pending);
        self.model.insert(vol.to_string(), latest.clone());
        if let Some(why) = rep.stayed {
            self.out.acknowledged += 1;
            let view = self.views[agent].get_mut(vol).expect("mounted");
            view.pending.clear();
            view.made.clear();
            view.base = latest;
            self.out.unexplained_errors += 1;
            self.out.problem(format!(
                "agent {agent}: commit of {vol} stayed on its view: {why}"
            ));
            // Its own changes are committed: a discarding reload brings the merged head.
            return self.reload(agent, vol, None).await;
        }
        self.moved_to(agent, vol, latest, "after its commit")
    }

    /// A reload (discarding what the mount holds uncommitted, if anything), maybe struck.
    pub(super) async fn reload(
        &mut self,
        agent: usize,
        vol: &'static str,
        strike: Option<Strike>,
    ) -> anyhow::Result<()> {
        let before = self.views[agent][vol].clone();
        let (req, mode) = reload_request(vol, &before);
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        let latest = self.model[vol].clone();
        if struck {
            self.count_strike(strike, "agent_killed_mid_reload");
            self.heal().await?;
            let mut allowed = vec![before.expected(), latest.clone()];
            if mode == ReloadMode::Discard {
                allowed.push(before.base.clone());
            }
            self.check_mount(agent, vol, &allowed, "after a kill mid-reload")?;
        }
        let Some(reply) = self.settle(agent, &req, answer, struck, &|_| false).await? else {
            return Ok(());
        };
        self.saw_reply(vol, &reply);
        if let Reply::Reloaded(r) = &reply
            && !r.sources.banned.is_empty()
        {
            self.out.fault("lying_peer_banned");
        }
        self.moved_to(agent, vol, latest, "after its reload")
    }

    /// A volume operation through an agent (put, rm, cp, create, rename, delete): applied
    /// to the model once acknowledged.
    pub(super) async fn volume_op(
        &mut self,
        agent: usize,
        req: Request,
        strike: Option<Strike>,
        done_if: &dyn Fn(&ErrorReply) -> bool,
        change: impl FnOnce(&mut BTreeMap<String, Tree>),
    ) -> anyhow::Result<()> {
        let (answer, struck) = self.run(agent, req.clone(), strike).await;
        if struck {
            self.count_strike(strike, "agent_killed_mid_volume_op");
        }
        if self
            .settle(agent, &req, answer, struck, done_if)
            .await?
            .is_some()
        {
            self.out.acknowledged += 1;
            change(&mut self.model);
        }
        Ok(())
    }

    pub(super) fn random_volume(&mut self) -> String {
        let mut all: Vec<String> = self.model.keys().cloned().collect();
        all.sort();
        all.swap_remove(self.rng.random_range(0..all.len()))
    }

    /// A strike at the coordinator with probability `p`: its kill -9, or in failover a
    /// fault of failover (twice as often: they are what `--ha` tests).
    pub(super) fn maybe_coordinator_strike(&mut self, p: f64) -> Option<Strike> {
        let p = if self.ha.is_some() { 2.0 * p } else { p };
        if !self.rng.random_bool(p) {
            return None;
        }
        let after = Duration::from_millis(self.rng.random_range(0..60));
        Some(match self.ha {
            Some(_) => Strike::Ha {
                fault: HaFault::random(&mut self.rng),
                after,
            },
            None => Strike::Kill { node: 0, after },
        })
    }

    /// A kill of `agent` within `within_ms` of the start (one time in five), else maybe
    /// one of the coordinator.
    pub(super) fn strike_agent_or_coordinator(
        &mut self,
        agent: usize,
        within_ms: u64,
    ) -> Option<Strike> {
        if self.rng.random_bool(0.2) {
            Some(Strike::Kill {
                node: self.fleet.agent_node(agent),
                after: Duration::from_millis(self.rng.random_range(0..within_ms)),
            })
        } else {
            self.maybe_coordinator_strike(0.1)
        }
    }

    pub(super) async fn step(&mut self) -> anyhow::Result<()> {
        let writer = WRITERS[self.rng.random_range(0..WRITERS.len())];
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        self.last = match self.rng.random_range(0..100) {
            0..19 => "write",
            19..22 => "follow",
            22..42 => "commit",
            42..58 => "reload",
            58..68 => "put",
            68..74 => "rm",
            74..80 => "cp",
            80..87 => "scratch",
            87..90 => "bind",
            90..95 => "peer_leaves",
            _ => "full_disk",
        };
        match self.last {
            "write" => self.write(writer, vol),
            "follow" => self.follow().await,
            "commit" => {
                if self.views[writer][vol].pending.is_empty() {
                    self.write(writer, vol)?;
                }
                let strike = self.strike_agent_or_coordinator(writer, 80);
                self.commit(writer, vol, strike).await
            }
            "reload" => {
                // The lying peer reloads most, so that it holds what the others fetch.
                let agent = if self.rng.random_bool(0.4) {
                    LIAR
                } else {
                    self.rng.random_range(0..AGENTS)
                };
                let strike = self.strike_agent_or_coordinator(agent, 60);
                self.reload(agent, vol, strike).await
            }
            "put" => self.put(writer).await,
            "rm" => self.rm(writer).await,
            "cp" => self.cp(writer).await,
            "scratch" => self.scratch(writer).await,
            "bind" => self.bind(vol),
            "peer_leaves" => self.peer_leaves().await,
            _ => self.full_disk().await,
        }
    }

    pub(super) async fn put(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut changes = Vec::new();
        for _ in 0..self.rng.random_range(1..3) {
            let remote = random_path(&mut self.rng);
            let seed = self.fresh_seed();
            let size = random_size(&mut self.rng);
            let bytes = bytes_of(seed, size);
            files.retain(|(r, _)| *r != remote);
            changes.retain(|(r, _): &(String, Content)| *r != remote);
            changes.push((remote.clone(), content_of(&bytes)));
            files.push((remote, bytes));
        }
        let entries = files
            .iter()
            .map(|(remote, _)| UploadEntry {
                path: remote.clone(),
                kind: UploadKind::File {
                    mode: 0o644,
                    mtime_ns: 0,
                },
            })
            .collect();
        self.uploading = files.into_iter().map(|(_, b)| b).collect();
        let req = Request::VolumeUpload {
            name: vol.clone(),
            entries,
            force: true,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        self.volume_op(agent, req, strike, &|_| false, move |m| {
            let t = m.get_mut(&vol).expect("a volume of the model");
            for (p, c) in changes {
                t.insert(p, c);
            }
        })
        .await
    }

    pub(super) async fn rm(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let files: Vec<String> = self.model[&vol].keys().cloned().collect();
        if files.is_empty() {
            return Ok(());
        }
        let file = files[self.rng.random_range(0..files.len())].clone();
        // Now and then the whole directory.
        let (path, recursive) = if self.rng.random_bool(0.2) {
            (file.split('/').next().expect("d/f").to_string(), true)
        } else {
            (file, false)
        };
        let req = Request::VolumeRm {
            name: vol.clone(),
            path: path.clone(),
            recursive,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        let prefix = format!("{path}/");
        self.volume_op(
            agent,
            req,
            strike,
            &|e| e.code == ErrorCode::NotFound,
            move |m| {
                m.get_mut(&vol)
                    .expect("a volume of the model")
                    .retain(|p, _| *p != path && !p.starts_with(&prefix));
            },
        )
        .await
    }

    pub(super) async fn cp(&mut self, agent: usize) -> anyhow::Result<()> {
        let vol = self.random_volume();
        let files: Vec<(String, Content)> = self.model[&vol]
            .iter()
            .map(|(p, c)| (p.clone(), *c))
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        let (src, content) = files[self.rng.random_range(0..files.len())].clone();
        let dst = random_path(&mut self.rng);
        if dst == src {
            return Ok(());
        }
        let req = Request::VolumeCp {
            name: vol.clone(),
            srcs: vec![src],
            dst: dst.clone(),
            recursive: false,
        };
        let strike = self.maybe_coordinator_strike(0.15);
        self.volume_op(agent, req, strike, &|_| false, move |m| {
            m.get_mut(&vol)
                .expect("a volume of the model")
                .insert(dst, content);
        })
        .await
    }

    /// Creates, renames or deletes a scratch volume (never one that is mounted).
    pub(super) async fn scratch(&mut self, agent: usize) -> anyhow::Result<()> {
        let scratch = self.scratch_volumes();
        let strike = self.maybe_coordinator_strike(0.15);
        if scratch.is_empty() || scratch.len() < 3 && self.rng.random_bool(0.5) {
            self.next_volume += 1;
            let name = format!("s{}", self.next_volume);
            let req = Request::VolumeCreate {
                name: name.clone(),
                allow_existing: false,
            };
            return self
                .volume_op(
                    agent,
                    req,
                    strike,
                    &|e| e.code == ErrorCode::Exists,
                    move |m| {
                        m.insert(name, Tree::new());
                    },
                )
                .await;
        }
        let name = scratch[self.rng.random_range(0..scratch.len())].clone();
        if self.rng.random_bool(0.5) {
            self.next_volume += 1;
            let to = format!("s{}", self.next_volume);
            let req = Request::VolumeRename {
                from: name.clone(),
                to: to.clone(),
            };
            self.volume_op(
                agent,
                req,
                strike,
                &|e| e.code == ErrorCode::NotFound,
                move |m| {
                    let t = m.remove(&name).expect("a volume of the model");
                    m.insert(to, t);
                },
            )
            .await
        } else {
            let req = Request::VolumeDelete {
                name: name.clone(),
                allow_missing: false,
            };
            self.volume_op(
                agent,
                req,
                strike,
                &|e| e.code == ErrorCode::NotFound,
                move |m| {
                    m.remove(&name);
                },
            )
            .await
        }
    }

    /// A new file of a size in `sizes`, written into agent 0's mount and committed.
    pub(super) async fn commit_new_file(
        &mut self,
        vol: &'static str,
        sizes: std::ops::Range<u64>,
    ) -> anyhow::Result<()> {
        let path = random_path(&mut self.rng);
        let seed = self.fresh_seed();
        let bytes = bytes_of(seed, self.rng.random_range(sizes));
        let p = self.mount_path(0, vol).join(&path);
        std::fs::create_dir_all(p.parent().expect("in a directory"))?;
        std::fs::write(&p, &bytes)?;
        self.views[0]
            .get_mut(vol)
            .expect("mounted")
            .pending
            .insert(path, Some(content_of(&bytes)));
        self.commit(0, vol, None).await
    }

    /// A large file committed by agent 0 and fetched by agent 1; then agent 2 or 3
    /// fetches it while agent 1 is killed (a peer leaving mid-piece).
    /// A container binds an agent's mount path in a namespace of its own (overlay mode,
    /// where the path is a mount point; a link in copy mode is resolved once by any
    /// bind). At most four at a time: the oldest goes first.
    /// An agent follows a volume as a host (a mounted one or a scratch one), or stops:
    /// its downloads go on in the background while the trial runs on, under its faults.
    pub(super) async fn follow(&mut self) -> anyhow::Result<()> {
        let agent = self.rng.random_range(0..AGENTS);
        let name = self.random_volume();
        let on = self.rng.random_bool(0.7);
        let req = Request::Follow { name, on };
        self.out.operations += 1;
        match call(self.agent(agent), req.clone(), Vec::new()).await {
            Answer::Ok(_) => self
                .out
                .fault(if on { "host_follows" } else { "host_unfollows" }),
            // A scratch volume deleted or renamed meanwhile.
            Answer::Refused(e) if e.code == ErrorCode::NotFound => {}
            Answer::TimedOut => {
                self.out.stuck_agents += 1;
                self.out.problem(format!(
                    "agent {agent}: {req:?}: no answer in {OP_TIMEOUT:?}"
                ));
            }
            other => {
                self.out.unexplained_errors += 1;
                self.out
                    .problem(format!("agent {agent}: {req:?} failed: {other:?}"));
            }
        }
        Ok(())
    }

    pub(super) fn bind(&mut self, vol: &'static str) -> anyhow::Result<()> {
        let agent = self.rng.random_range(0..AGENTS);
        if self.switching.contains(&(agent, vol)) {
            // A mount that moves by itself may move between reading it and its bind.
            return Ok(());
        }
        let path = self.mount_path(agent, vol);
        if std::fs::symlink_metadata(&path)?.file_type().is_symlink() {
            return Ok(());
        }
        if self.binds.len() >= 4 {
            self.binds.remove(0);
        }
        let n = self.fresh_seed();
        let at = self.fleet.root.join(format!("ctr-{n}"));
        self.binds
            .push(super::binds::Bind::start(agent, vol, &path, &at)?);
        self.out.fault("container_bind");
        let seen = read_tree(&path)?;
        self.check_binds(agent, vol, &seen, "when it was made")?;
        Ok(())
    }

    pub(super) async fn peer_leaves(&mut self) -> anyhow::Result<()> {
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        self.commit_new_file(vol, 4 << 20..8 << 20).await?;
        self.reload(1, vol, None).await?;
        let fetcher = [TMPFS_AGENT, LIAR][self.rng.random_range(0..2)];
        let strike = Strike::Kill {
            node: self.fleet.agent_node(1),
            after: Duration::from_millis(self.rng.random_range(0..40)),
        };
        let before = self.views[fetcher][vol].clone();
        let (req, _) = reload_request(vol, &before);
        let (answer, struck) = self.run(fetcher, req.clone(), Some(strike)).await;
        if struck {
            self.out.fault("peer_left_mid_fetch");
        }
        // The fetcher itself was not struck: a failure is not explained by a fault of its
        // own, but the reload may still have been refused for the disk.
        let latest = self.model[vol].clone();
        let settled = self
            .settle(fetcher, &req, answer, false, &|_| false)
            .await?;
        self.heal().await?;
        if let Some(reply) = &settled {
            self.saw_reply(vol, reply);
            self.moved_to(fetcher, vol, latest, "after a reload its peer left")?;
        }
        // Agent 1 was killed idle: its mount is still whole.
        let v1 = self.views[1][vol].expected();
        self.check_mount(1, vol, &[v1], "after a restart")?;
        Ok(())
    }

    /// Agent 2's disk filled by another program; an operation on agent 2 meets it; the
    /// space comes back; the operation goes through.
    pub(super) async fn full_disk(&mut self) -> anyhow::Result<()> {
        let vol = MOUNTED[self.rng.random_range(0..MOUNTED.len())];
        // Something new to fetch.
        self.commit_new_file(vol, 256 << 10..2 << 20).await?;
        let filler = self.fleet.agents[TMPFS_AGENT].join("filler");
        fill(&filler)?;
        self.out.fault("full_disk");
        let before = self.views[TMPFS_AGENT][vol].clone();
        let commit = !before.pending.is_empty() && self.rng.random_bool(0.5);
        let req = if commit {
            Request::Commit {
                name: Some(vol.into()),
            }
        } else {
            Request::Reload {
                name: Some(vol.into()),
                mode: ReloadMode::Discard,
                lazy: false,
            }
        };
        let (first, _) = self.run(TMPFS_AGENT, req.clone(), None).await;
        let refused = match &first {
            Answer::Ok(_) => None,
            Answer::Refused(e) => Some(e.message.clone()),
            Answer::Lost(e) => Some(format!("lost: {e}")),
            Answer::TimedOut => Some("timed out".into()),
        };
        if let Some(msg) = &refused {
            if !is_disk_full(msg) {
                self.out.unexplained_errors += 1;
                self.out
                    .problem(format!("agent 2 on a full disk: {req:?}: {msg}"));
            }
            // Refused: the mount is as it was.
            self.check_mount(
                TMPFS_AGENT,
                vol,
                &[before.expected()],
                "after a refusal for a full disk",
            )?;
        }
        std::fs::remove_file(&filler)?;
        let answer = match first {
            Answer::Ok(r) => Answer::Ok(r),
            _ => {
                self.out.operations += 1;
                call(self.agent(TMPFS_AGENT), req.clone(), Vec::new()).await
            }
        };
        let Some(reply) = self
            .settle(TMPFS_AGENT, &req, answer, true, &|_| false)
            .await?
        else {
            return Ok(());
        };
        self.saw_reply(vol, &reply);
        let latest = if commit {
            let l = apply(&self.model[vol], &before.pending);
            self.model.insert(vol.to_string(), l.clone());
            l
        } else {
            self.model[vol].clone()
        };
        self.moved_to(TMPFS_AGENT, vol, latest, "after the disk had room again")
    }
}

/// After the user removed `path` from the mount at `mnt`: its directory too, if the user
/// made it since the snapshot and nothing else of the model is in it.
fn remove_made_dir(mnt: &std::path::Path, view: &mut View, path: &str) {
    let dir = path.split('/').next().unwrap_or_default().to_string();
    let prefix = format!("{dir}/");
    if view.made.contains(&dir)
        && !view.expected().keys().any(|k| k.starts_with(&prefix))
        && std::fs::remove_dir(mnt.join(&dir)).is_ok()
    {
        view.made.remove(&dir);
    }
}
